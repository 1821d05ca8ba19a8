"""mimo-eval with data.reset_attention_mask=true: each JSONL record is a document of its own, so the figures are
those of transformers evaluating every record on its own (tests/tiny_hub.py's reference), combined token-weighted:
records shorter and longer than a sequence, one exactly a sequence's worth, one too short to predict anything;
and the same under context parallelism 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mimo.train.tools.evaluate import evaluate

from tiny_hub import IMPORT_OVERRIDES, IMPORT_SEQ, transformers_eval

RELATIVE = 1e-5
DOCUMENT_MASKING = (*IMPORT_OVERRIDES, "data.reset_attention_mask=true")
RECORD_LENGTHS = (50, 9, IMPORT_SEQ + 1, 1, 75, 17, 2, 30)
"""Tokens per record: several sequences long, short, exactly one sequence of predictions, none, ..."""


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    generator = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, 4096, (length,), generator=generator).tolist() for length in RECORD_LENGTHS]
    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    path.write_text("".join(json.dumps({"input_ids": record}) + "\n" for record in ids))
    return path, ids


@pytest.fixture(scope="module")
def masked_result(imported, records):
    return evaluate(imported, records[0], DOCUMENT_MASKING)


def per_record_reference(hub, ids: list[list[int]]) -> dict[str, float]:
    """transformers on each record alone, token-weighted over the records."""
    sums = {"loss": 0.0, "tokens": 0, "mtp_loss": 0.0, "mtp_tokens": 0, "accepted": 0.0}
    for record in ids:
        if len(record) < 2:
            continue
        alone = transformers_eval(hub, record, IMPORT_SEQ)
        sums["loss"] += alone.loss * alone.tokens
        sums["tokens"] += alone.tokens
        if alone.mtp_tokens:
            sums["mtp_loss"] += alone.mtp_loss * alone.mtp_tokens
            sums["accepted"] += alone.acceptance * alone.mtp_tokens
            sums["mtp_tokens"] += alone.mtp_tokens
    return {
        "loss": sums["loss"] / sums["tokens"],
        "tokens": sums["tokens"],
        "mtp_loss": sums["mtp_loss"] / sums["mtp_tokens"],
        "mtp_tokens": sums["mtp_tokens"],
        "acceptance": sums["accepted"] / sums["mtp_tokens"],
    }


def test_each_record_is_evaluated_as_if_alone(hub, records, masked_result):
    expected = per_record_reference(hub, records[1])
    result = masked_result
    assert result.tokens == expected["tokens"] == sum(length - 1 for length in RECORD_LENGTHS)
    assert result.loss == pytest.approx(expected["loss"], rel=RELATIVE)
    assert result.mtp_tokens == expected["mtp_tokens"]
    assert result.mtp_loss == pytest.approx(expected["mtp_loss"], rel=RELATIVE)
    assert result.mtp_acceptance == pytest.approx(expected["acceptance"], abs=0.5 / expected["mtp_tokens"])


def test_without_document_masking_records_see_each_other(imported, records, masked_result):
    stream = evaluate(imported, records[0], IMPORT_OVERRIDES)
    assert stream.tokens == sum(RECORD_LENGTHS) - 1  # the token after each record is a target too
    assert abs(stream.loss - masked_result.loss) > 1e-3


@pytest.mark.system
def test_context_parallel_evaluation_gives_the_same_result(imported, records, masked_result):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mimo.train.tools.evaluate",
        str(imported),
        str(records[0]),
        *DOCUMENT_MASKING,
        "parallel.cp=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert job.returncode == 0, job.stderr[-5000:]
    lines = [line for line in job.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, job.stdout
    result = json.loads(lines[0])
    assert result["tokens"] == masked_result.tokens and result["mtp_tokens"] == masked_result.mtp_tokens
    assert result["loss"] == pytest.approx(masked_result.loss, rel=RELATIVE)
    assert result["mtp_loss"] == pytest.approx(masked_result.mtp_loss, rel=RELATIVE)
    assert result["mtp_acceptance"] == pytest.approx(masked_result.mtp_acceptance, abs=0.5 / masked_result.mtp_tokens)
