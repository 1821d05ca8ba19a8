"""Sample order, blending, resumption and long-document upsampling of build_data_iterators."""

import collections
import dataclasses

import numpy
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from mimo.data.config import DataConfig, DataStageConfig, LongDocConfig
from mimo.data.errors import DataError
from mimo.data.indexed import write_indexed
from mimo.data.loader import DataRank, build_data_iterators
from mimo.data.stages import stage_config
from mimo.data.tokenizer import build_tokenizer

from multirank import LOOPBACK, spawn_ranks

SEQ = 32
SEED = 1234
EOD = 0  # the shipped tokenizer's end-of-document id


def _synthetic(prefix: str, lengths: list[int], first_token: int) -> str:
    """Documents whose tokens say which dataset they come from (first_token) and end with EOD."""
    rng = numpy.random.default_rng(first_token)
    docs = [numpy.concatenate([rng.integers(first_token, first_token + 50, n - 1), [EOD]]) for n in lengths]
    write_indexed(prefix, docs, numpy.uint16)
    return prefix


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("indexed")
    rng = numpy.random.default_rng(0)
    return {
        "web": _synthetic(str(root / "web"), list(rng.integers(20, 120, 400)), 100),
        "code": _synthetic(str(root / "code"), list(rng.integers(20, 120, 400)), 1000),
        # mostly short documents, a few long ones (>= 400 tokens, starting at token 2000)
        "mixed": _synthetic(str(root / "mixed"), [30] * 600 + [500] * 20, 2000),
    }


def _iterators(
    cfg: DataConfig,
    run_dir,
    *,
    mbs: int,
    consumed: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
    train_samples: int = 400,
    seed: int = SEED,
):
    return build_data_iterators(
        cfg,
        run_dir=str(run_dir),
        seq_length=SEQ,
        seed=seed,
        train_samples=train_samples,
        consumed_samples=consumed,
        rank=DataRank(dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=mbs),
    )


def _steps(cfg, run_dir, batch_sizes: list[int], *, mbs: int, dp_size: int, consumed: int = 0):
    """The global batches of consecutive steps, each as (sample ids, tokens) over all DP ranks in order."""
    iterators = [
        _iterators(cfg, run_dir, mbs=mbs, consumed=consumed, dp_rank=r, dp_size=dp_size).train for r in range(dp_size)
    ]
    steps = []
    for batch_size in batch_sizes:
        micro_batches = batch_size // (mbs * dp_size)
        ids, tokens = [], []
        for _ in range(micro_batches):
            for iterator in iterators:
                batch = next(iterator)
                ids.append(batch["sample_index"])
                tokens.append(batch["tokens"])
        steps.append((torch.cat(ids), torch.cat(tokens)))
    return steps


def test_micro_batch_contents(tmp_path):
    """The shipped corpus out of the box: shapes, dtypes, shifted labels and a round-tripping tokenizer."""
    data = _iterators(DataConfig(), tmp_path, mbs=2)
    batch = next(data.train)
    assert batch["tokens"].shape == (2, SEQ) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    second = next(data.train)
    assert torch.equal(batch["sample_index"], torch.tensor([0, 1])) and torch.equal(
        second["sample_index"], torch.tensor([2, 3])
    )
    assert data.valid is not None and next(iter(data.valid))["tokens"].shape == (2, SEQ)
    text = data.tokenizer.decode(batch["tokens"][0].tolist())
    assert data.tokenizer.encode(text)[: SEQ - 4] == batch["tokens"][0].tolist()[: SEQ - 4]


def test_resume_with_other_dp_size_and_micro_batch_consumes_the_same_samples(tmp_path, datasets):
    cfg = DataConfig(blend=["0.5", datasets["web"], "0.5", datasets["code"]], cache_dir=str(tmp_path / "cache"))
    batch_sizes = [8, 8, 16, 16, 16]  # with a batch ramp-up after two steps
    reference = _steps(cfg, tmp_path, batch_sizes, mbs=4, dp_size=1)
    first = _steps(cfg, tmp_path, batch_sizes[:2], mbs=4, dp_size=1)
    resumed = _steps(cfg, tmp_path, batch_sizes[2:], mbs=2, dp_size=2, consumed=sum(batch_sizes[:2]))
    for (want_ids, want_tokens), (ids, tokens) in zip(reference, first + resumed):
        assert torch.equal(ids, want_ids) and torch.equal(tokens, want_tokens)
    all_ids = torch.cat([ids for ids, _ in reference])
    assert torch.equal(all_ids, torch.arange(sum(batch_sizes)))


def test_order_depends_on_seed(tmp_path, datasets):
    cfg = DataConfig(blend=[datasets["web"]], cache_dir=str(tmp_path / "cache"))
    same = [next(_iterators(cfg, tmp_path, mbs=4).train)["tokens"] for _ in range(2)]
    other = next(_iterators(cfg, tmp_path, mbs=4, seed=SEED + 1).train)["tokens"]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)


def test_blend_draws_datasets_in_proportion_to_weights(tmp_path, datasets):
    cfg = DataConfig(blend=["0.25", datasets["web"], "0.75", datasets["code"]], cache_dir=str(tmp_path / "cache"))
    data = _iterators(cfg, tmp_path, mbs=8, train_samples=800)
    ids = torch.cat([next(data.train)["dataset_id"] for _ in range(100)])
    assert data.dataset_names == ["web", "code"]
    share_code = ids.float().mean().item()
    assert abs(share_code - 0.75) < 0.01
    # the samples really come from the dataset their id names (token ranges are disjoint)
    batch = next(data.train)
    for dataset_id, tokens in zip(batch["dataset_id"], batch["tokens"]):
        body = tokens[tokens != EOD]
        assert ((body >= 1000) == bool(dataset_id)).all()


def test_long_document_upsampling(tmp_path, datasets):
    base = DataConfig(blend=[datasets["mixed"]], cache_dir=str(tmp_path / "cache"))
    upsampled = DataConfig(
        blend=[datasets["mixed"]],
        cache_dir=str(tmp_path / "cache"),
        long_docs=LongDocConfig(min_tokens=400, weight=0.6),
    )
    data = _iterators(upsampled, tmp_path, mbs=8, train_samples=800)
    assert data.dataset_names == ["mixed", "mixed>=400"]
    batches = [next(data.train) for _ in range(100)]
    ids = torch.cat([b["dataset_id"] for b in batches])
    assert abs(ids.float().mean().item() - 0.6) < 0.01
    for batch in batches[:10]:
        for dataset_id, tokens in zip(batch["dataset_id"], batch["tokens"]):
            if dataset_id == 1:  # a sample from the subset lies inside one 500-token document: no EOD before its end
                assert (tokens[:-1] != EOD).sum() >= SEQ - 2

    def eod_rate(cfg):
        loader = _iterators(cfg, tmp_path, mbs=8, train_samples=800).train
        tokens = torch.cat([next(loader)["tokens"] for _ in range(50)])
        return (tokens == EOD).float().mean().item()

    # fewer document ends per token: the mix shifted towards long documents
    assert eod_rate(upsampled) < 0.5 * eod_rate(base)


def test_stage_configs_select_their_own_mixture(tmp_path, datasets):
    cfg = DataConfig(
        blend=[datasets["web"]],
        cache_dir=str(tmp_path / "cache"),
        stages=[
            DataStageConfig(name="pretrain"),
            DataStageConfig(name="code_heavy", blend=["0.2", datasets["web"], "0.8", datasets["code"]]),
            DataStageConfig(
                name="long_context", long_docs=LongDocConfig(min_tokens=400, weight=0.5), blend=[datasets["mixed"]]
            ),
        ],
    )
    assert stage_config(cfg, "pretrain").blend == [datasets["web"]]
    code = _iterators(stage_config(cfg, "code_heavy"), tmp_path, mbs=8, train_samples=400)
    assert code.dataset_names == ["web", "code"]
    long = stage_config(cfg, "long_context")
    assert long.long_docs.weight == 0.5 and long.stages == []
    with pytest.raises(DataError, match="no stage named 'decay'"):
        stage_config(cfg, "decay")


def test_document_boundaries(tmp_path, datasets):
    cfg = DataConfig(
        blend=[datasets["web"]],
        cache_dir=str(tmp_path / "cache"),
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
    )
    train = _iterators(cfg, tmp_path, mbs=4).train
    checked = 0
    for _ in range(10):
        batch = next(train)
        for row in range(4):
            tokens, positions = batch["tokens"][row], batch["position_ids"][row]
            assert (batch["loss_mask"][row][tokens == EOD] == 0).all()
            for i in (tokens[:-1] == EOD).nonzero().flatten().tolist():
                assert positions[i + 1] == 0
                documents = batch["document_ids"][row]
                assert documents[i + 1] == documents[i] + 1  # the next document is another one
                assert (documents[: i + 1] <= documents[i]).all() and (documents[i + 1 :] > documents[i]).all()
                checked += 1
    assert checked > 5, "samples of 20-120 token documents should cross document boundaries"


def _rank_main(rank: int, ports: list[int], cfg: DataConfig, run_dir: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{ports[0]}", rank=rank, world_size=2)
    try:
        data = build_data_iterators(
            cfg,
            run_dir=run_dir,
            seq_length=SEQ,
            seed=SEED,
            train_samples=400,
            consumed_samples=4,
            rank=DataRank(dp_rank=rank, dp_size=2, micro_batch_size=2),
        )
        queue.put((rank, [next(data.train)["sample_index"].tolist() for _ in range(3)]))
    finally:
        dist.destroy_process_group()


@pytest.mark.system
def test_two_ranks_build_once_and_split_each_window(tmp_path):
    """Under torch.distributed rank 0 builds the shipped dataset and index caches while rank 1 waits."""
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    queue = mp.get_context("spawn").SimpleQueue()
    spawn_ranks(_rank_main, 2, cfg, str(tmp_path), queue)
    results = dict(queue.get() for _ in range(2))
    assert results[0] == [[4, 5], [8, 9], [12, 13]]
    assert results[1] == [[6, 7], [10, 11], [14, 15]]
    assert len(list((tmp_path / "cache" / "shipped").glob("*/*.idx"))) == 1


def _planned(cfg: DataConfig, run_dir, count: int, horizon: int) -> list[tuple[int, ...]]:
    """The tokens of global samples 0..count-1 as a run planned for ``horizon`` samples reads them."""
    train = _iterators(cfg, run_dir, mbs=count, train_samples=horizon).train
    return [tuple(row.tolist()) for row in next(train)["tokens"]]


@pytest.mark.parametrize("mixture", ["one", "blend", "long_docs"])
def test_a_longer_run_reads_the_same_first_samples(tmp_path, datasets, mixture):
    """Raising train.steps must not reorder what a shorter run planned. 3000 samples span several epochs of each
    dataset here (about 850 samples per epoch of web, code and mixed, 300 of mixed's long-document subset)."""
    blends = {
        "one": DataConfig(blend=[datasets["web"]]),
        "blend": DataConfig(blend=["0.3", datasets["web"], "0.7", datasets["code"]]),
        "long_docs": DataConfig(blend=[datasets["mixed"]], long_docs=LongDocConfig(min_tokens=400, weight=0.5)),
    }
    cfg = dataclasses.replace(blends[mixture], cache_dir=str(tmp_path / "cache"))
    assert _planned(cfg, tmp_path, 3000, horizon=3000) == _planned(cfg, tmp_path, 3000, horizon=12_000)


def test_each_epoch_is_a_new_order_of_the_same_samples_and_the_first_is_megatrons(tmp_path, datasets):
    """Epoch 0 is what megatron-core's own builder gives for one epoch (the reference); every further epoch is
    another pass over the same documents in another order."""
    cfg = DataConfig(blend=[datasets["web"]], cache_dir=str(tmp_path / "cache"))
    config = GPTDatasetConfig(
        random_seed=SEED,
        sequence_length=SEQ,
        blend=([datasets["web"]], None),
        split=cfg.split,
        path_to_cache=str(tmp_path / "reference_cache"),
        tokenizer=build_tokenizer(cfg),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    reference, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [1, 0, 0], lambda: True, config).build()
    epoch = len(reference)
    samples = _planned(cfg, tmp_path, 3 * epoch, horizon=3 * epoch)
    epochs = [samples[e * epoch : (e + 1) * epoch] for e in range(3)]
    assert epochs[0] == [tuple(reference[i]["tokens"].tolist()) for i in range(epoch)]
    # Each epoch packs every document once, in another order (so other windows): the same tokens up to the
    # partial sample each epoch drops at its end, and not the same samples.
    tokens = [collections.Counter(token for sample in e for token in sample) for e in epochs]
    assert all(sum(((tokens[0] - other) + (other - tokens[0])).values()) <= 2 * (SEQ + 1) for other in tokens[1:])
    assert len(set(epochs[0]) & set(epochs[1])) < epoch // 10 and len(set(epochs[1]) & set(epochs[2])) < epoch // 10
