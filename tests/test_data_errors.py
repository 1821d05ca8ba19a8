"""Bad data inputs stop the run before training with an error that names the file and the fix."""

import numpy
import pytest

from mimo.data.config import DataConfig, LongDocConfig
from mimo.data.errors import DataError
from mimo.data.indexed import write_indexed
from mimo.data.loader import DataRank, build_data_iterators
from mimo.data.tokenizer import MimoTokenizer, build_tokenizer, check_vocab


@pytest.fixture
def dataset(tmp_path):
    rng = numpy.random.default_rng(0)
    docs = [numpy.append(rng.integers(1, 4000, int(n)), 0) for n in rng.integers(10, 80, 300)]
    prefix = str(tmp_path / "good")
    write_indexed(prefix, docs, numpy.uint16)
    return prefix


def _build(tmp_path, **data):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **data)
    return build_data_iterators(
        cfg,
        run_dir=str(tmp_path),
        seq_length=16,
        seed=1,
        train_samples=64,
        consumed_samples=0,
        rank=DataRank(dp_rank=0, dp_size=1, micro_batch_size=2),
    )


def test_good_dataset_builds(tmp_path, dataset):
    assert next(_build(tmp_path, blend=[dataset]).train)["tokens"].shape == (2, 16)


def test_missing_dataset_file(tmp_path, dataset):
    with pytest.raises(DataError, match=r"elsewhere\.idx does not exist"):
        _build(tmp_path, blend=["0.5", dataset, "0.5", str(tmp_path / "elsewhere")])
    (tmp_path / "good.bin").unlink()
    with pytest.raises(DataError, match=r"good\.bin does not exist"):
        _build(tmp_path, blend=[dataset])


def test_unreadable_index(tmp_path, dataset):
    (tmp_path / "good.idx").write_bytes(b"definitely not a megatron index")
    with pytest.raises(DataError, match=r"good\.idx is not a readable megatron-core index"):
        _build(tmp_path, blend=[dataset])


def test_index_that_does_not_match_its_bin(tmp_path, dataset):
    data = (tmp_path / "good.bin").read_bytes()
    (tmp_path / "good.bin").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(DataError, match=r"good\.bin has \d+ bytes but .*good\.idx describes"):
        _build(tmp_path, blend=[dataset])


def test_tokenizer_larger_than_model_vocabulary():
    tokenizer = build_tokenizer(DataConfig())
    check_vocab(tokenizer, tokenizer.vocab_size)
    with pytest.raises(DataError, match=r"4096 tokens but model.vocab_size is 1024"):
        check_vocab(tokenizer, 1024)


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(DataError, match="no_such_tokenizer"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "no_such_tokenizer")))


def test_dataset_ids_narrower_than_the_vocabulary(tmp_path, dataset, monkeypatch):
    """uint16 token ids cannot come from a 70,000-token vocabulary: that dataset was made with another tokenizer."""
    monkeypatch.setattr(MimoTokenizer, "vocab_size", property(lambda self: 70_000))
    with pytest.raises(DataError, match=r"good\.idx stores uint16 token ids"):
        _build(tmp_path, blend=[dataset])


def test_bad_blend_and_empty_split(tmp_path, dataset):
    with pytest.raises(DataError, match="must alternate a non-negative weight and a dataset prefix"):
        _build(tmp_path, blend=[dataset, dataset])
    tiny = str(tmp_path / "tiny")
    write_indexed(tiny, [numpy.array([5, 6, 7, 0])] * 10, numpy.uint16)
    with pytest.raises(DataError, match=r"tiny has 10 documents, too few for a non-empty valid split"):
        _build(tmp_path, blend=[tiny])
    with pytest.raises(DataError, match="long_docs.min_tokens=500"):
        _build(tmp_path, blend=[dataset], long_docs=LongDocConfig(min_tokens=500, weight=0.5))
