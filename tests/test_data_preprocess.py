"""mimo-preprocess against an independent reference: the tokenizer applied directly to the input texts."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from mimo.data.config import PreprocessConfig
from mimo.data.errors import DataError
from mimo.data.preprocess import main, preprocess
from mimo.data.shipped_corpus import shipped_corpus_path
from mimo.data.train_tokenizer import SHIPPED_TOKENIZER_DIR


@pytest.fixture(scope="module")
def texts():
    with gzip.open(shipped_corpus_path(), "rt", encoding="utf-8") as reader:
        return [json.loads(line)["text"] for line in reader]


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, texts):
    """JSONL + Parquet + a plain-text directory, with one bad record of each kind in the mix.

    Returns the inputs and the texts that should come out, in order."""
    root = tmp_path_factory.mktemp("inputs")
    jsonl, parquet, text_dir = root / "a.jsonl", root / "b.parquet", root / "docs"
    with open(jsonl, "w", encoding="utf-8") as writer:
        writer.writelines(json.dumps({"text": text, "id": 1}) + "\n" for text in texts[:300])
        writer.write("\n")  # empty
        writer.write(json.dumps({"text": 7}) + "\n")  # non-text
        writer.write("{not json\n")  # undecodable
    with open(jsonl, "ab") as writer:
        writer.write(b'{"text": "bad \xff byte"}\n')  # undecodable (invalid UTF-8)
    pq.write_table(pa.table({"text": texts[300:500] + [None, "  "]}), parquet)
    text_dir.mkdir()
    for i, text in enumerate(texts[500:620]):
        (text_dir / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    (text_dir / "zz_bad.txt").write_bytes(b"caf\xe9 latin-1")
    expected = texts[:500] + texts[500:620]
    return [str(jsonl), str(parquet), str(text_dir)], expected


def _read_back(prefix: str):
    dataset = IndexedDataset(prefix)
    return [numpy.array(dataset[i]) for i in range(len(dataset))]


def _reference(expected_texts):
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER_DIR))
    return [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in expected_texts]


def _config(inputs, output, **overrides) -> PreprocessConfig:
    options = {"inputs": inputs, "output": str(output), "workers": 2, "shard_documents": 64, "read_batch": 50}
    options.update(overrides)
    return PreprocessConfig(**options)


def test_mixed_formats_read_back_token_for_token(tmp_path, mixed_inputs):
    inputs, expected = mixed_inputs
    summary = preprocess(_config(inputs, tmp_path / "mix"))
    documents = _read_back(str(tmp_path / "mix"))
    reference = _reference(expected)
    assert len(documents) == len(reference)
    for got, want in zip(documents, reference):
        assert got.tolist() == want
    assert summary.documents == len(expected)
    assert summary.tokens == sum(map(len, reference))
    assert summary.skipped == {"empty": 2, "non_text": 2, "undecodable": 3}
    assert summary.records == len(expected) + 7
    assert any("a.jsonl line 303" in where for where in summary.examples["undecodable"])
    assert summary.lengths["max"] == max(map(len, reference))
    assert not (tmp_path / "mix.shards").exists(), "shards are removed after a merge"

    again = preprocess(_config(inputs, tmp_path / "mix"))
    assert again.up_to_date and again.documents == summary.documents


def test_no_merge_lists_shards_as_blend(tmp_path, mixed_inputs):
    inputs, expected = mixed_inputs
    summary = preprocess(_config(inputs, tmp_path / "mix", merge=False))
    lines = (tmp_path / "mix.blend.txt").read_text().split()
    weights, prefixes = [int(w) for w in lines[0::2]], lines[1::2]
    assert prefixes == summary.outputs and len(prefixes) > 3
    documents = [doc for prefix in prefixes for doc in _read_back(prefix)]
    assert [d.tolist() for d in documents] == _reference(expected)
    assert sum(weights) == summary.tokens


@pytest.mark.system
def test_interrupted_run_resumes_to_identical_output(tmp_path, texts):
    big = tmp_path / "big.jsonl"
    with open(big, "w", encoding="utf-8") as writer:
        for _ in range(4):
            writer.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    clean = preprocess(
        PreprocessConfig(inputs=[str(big)], output=str(tmp_path / "clean"), workers=1, shard_documents=200)
    )

    killed = tmp_path / "killed"
    shards = Path(str(killed) + ".shards")
    command = [
        sys.executable,
        "-m",
        "mimo.data.preprocess",
        "--input",
        str(big),
        "--output",
        str(killed),
        "--workers",
        "1",
        "--shard-documents",
        "200",
    ]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(shards.glob("*.idx"))) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not Path(str(killed) + ".idx").exists(), "the run finished before it could be interrupted"
    finished_before = len(list(shards.glob("*.idx")))
    assert finished_before >= 3

    resumed = preprocess(PreprocessConfig(inputs=[str(big)], output=str(killed), workers=1, shard_documents=200))
    assert resumed.shards_reused >= finished_before
    for suffix in (".bin", ".idx"):
        assert Path(str(killed) + suffix).read_bytes() == Path(str(tmp_path / "clean") + suffix).read_bytes()
    assert (resumed.documents, resumed.tokens) == (clean.documents, clean.tokens)


def test_changed_options_refuse_a_stale_work_dir(tmp_path, mixed_inputs):
    inputs, _ = mixed_inputs
    preprocess(_config(inputs, tmp_path / "mix", keep_shards=True))
    (tmp_path / "mix.stats.json").unlink()
    with pytest.raises(DataError, match="mix.shards"):
        preprocess(_config(inputs, tmp_path / "mix", shard_documents=32))


def test_missing_and_unreadable_inputs_name_the_file(tmp_path, capsys):
    with pytest.raises(DataError, match="nope.jsonl"):
        preprocess(_config([str(tmp_path / "nope.jsonl")], tmp_path / "out"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        preprocess(_config([str(broken)], tmp_path / "out"))
    assert main(["--input", str(broken), "--output", str(tmp_path / "out")]) == 2
    assert "broken.parquet" in capsys.readouterr().err
