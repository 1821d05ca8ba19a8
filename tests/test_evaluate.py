"""mimo-eval measures what transformers computes on the same tokens, for the main model and the MTP block.

The reference runs transformers' model (and an MTP block built from transformers' modules, tests/tiny_hub.py) on
each sequence of the token stream separately; mimo-eval batches, pads and masks. FP32 on both sides: the per-token
logits agree to ~1e-6, so the token-averaged losses agree to 1e-5 relative, and top-1 choices (the acceptance
rate) agree exactly.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from mimo.data import build_tokenizer
from mimo.data.config import DataConfig
from mimo.train.tools.evaluate import evaluate, main

from tiny_hub import IMPORT_OVERRIDES, IMPORT_SEQ, transformers_eval

SEQ = IMPORT_SEQ
EVAL = IMPORT_OVERRIDES
RELATIVE = 1e-5
TEXT = (
    "The Jargon File is a comprehensive compendium of hacker slang illuminating many aspects of hackish tradition,"
    " folklore, and humor. A hacker is a person who enjoys exploring the details of programmable systems and how"
    " to stretch their capabilities, as opposed to most users, who prefer to learn only the minimum necessary."
    " Kludge: a clever programming trick intended to solve a particular nasty case in an expedient way."
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(DataConfig())


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def single_rank_result(imported, text_file):
    return evaluate(imported, text_file, EVAL)


def test_loss_mtp_loss_and_acceptance_match_transformers(hub, tokenizer, single_rank_result):
    stream = tokenizer.encode(TEXT) + [tokenizer.eod]
    expected = transformers_eval(hub, stream, SEQ)
    result = single_rank_result
    assert len(stream) - 1 > 3 * SEQ and (len(stream) - 1) % SEQ, (
        "the text should fill several sequences, the last partly"
    )
    assert result.tokens == expected.tokens == len(stream) - 1
    assert result.sequences == math.ceil((len(stream) - 1) / SEQ)
    assert result.loss == pytest.approx(expected.loss, rel=RELATIVE)
    assert result.perplexity == pytest.approx(math.exp(expected.loss), rel=RELATIVE)
    assert result.mtp_tokens == expected.mtp_tokens
    assert result.mtp_loss == pytest.approx(expected.mtp_loss, rel=RELATIVE)
    assert result.mtp_loss_per_depth == [result.mtp_loss]
    assert 0 < expected.acceptance < 1, "the reference model should accept some drafts and reject others"
    assert result.mtp_acceptance == pytest.approx(expected.acceptance, abs=0.5 / expected.mtp_tokens)


def test_jsonl_text_and_input_ids_give_the_same_result_as_one_json_line(imported, tokenizer, tmp_path, capsys):
    documents = [TEXT[:200], TEXT[200:]]
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps({"text": doc}) for doc in documents) + "\n\n")
    ids = [token for doc in documents for token in tokenizer.encode(doc) + [tokenizer.eod]]
    (tmp_path / "ids.jsonl").write_text(
        json.dumps({"input_ids": ids[:45]}) + "\n" + json.dumps({"input_ids": ids[45:]}) + "\n"
    )
    from_text = evaluate(imported, tmp_path / "text.jsonl", EVAL)
    capsys.readouterr()
    assert main([str(imported), str(tmp_path / "ids.jsonl"), *EVAL]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == json.loads(json.dumps(asdict(from_text)))
    assert from_text.tokens == len(ids) - 1


def test_out_of_vocabulary_ids_are_refused(imported, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [1, 2, 4096]}) + "\n")
    assert main([str(imported), str(tmp_path / "bad.jsonl"), *EVAL]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "0..4095" in captured.err


@pytest.mark.system
@pytest.mark.parametrize(
    "layout",
    [
        "parallel.ep=2",  # dp=2 (each rank evaluates half the sequences), experts split and tokens exchanged
        "parallel.cp=2",  # each rank runs half of every sequence; MTP acceptance compares across the halves
    ],
    ids=["dp2-ep2", "cp2"],
)
def test_two_ranks_give_the_same_result(imported, text_file, single_rank_result, layout):
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
        str(text_file),
        *EVAL,
        layout,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert job.returncode == 0, job.stderr[-5000:]
    lines = [line for line in job.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, job.stdout
    result = json.loads(lines[0])
    assert result["tokens"] == single_rank_result.tokens and result["mtp_tokens"] == single_rank_result.mtp_tokens
    assert result["loss"] == pytest.approx(single_rank_result.loss, rel=RELATIVE)
    assert result["mtp_loss"] == pytest.approx(single_rank_result.mtp_loss, rel=RELATIVE)
    assert result["mtp_acceptance"] == pytest.approx(
        single_rank_result.mtp_acceptance, abs=0.5 / single_rank_result.mtp_tokens
    )
