"""Micro-batches for the training loop, in an order that depends only on the seed and the sample count.

Global sample ``i`` is sample ``i`` of the blend's planned order (``mimo.data.order``: each dataset read epoch by
epoch through megatron-core's GPT dataset, interleaved by megatron's blending), which does not depend on the run's
length. Counting from ``consumed_samples``, micro-batch ``m`` covers the global samples
``[consumed + m * mbs * dp, consumed + (m + 1) * mbs * dp)`` and data-parallel rank ``r`` takes the
``r``-th contiguous slice of ``mbs``. So a resumed run continues with exactly the next unseen samples
whatever its data-parallel size or micro-batch size, and batch-size ramp-up is only a matter of how
many micro-batches the loop draws per step.
"""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from mimo.data.blend import Blend, dataset_token_counts, long_document_blend, resolve_blend
from mimo.data.config import DataConfig
from mimo.data.distributed import process_group_for_build
from mimo.data.documents import collate_with_documents
from mimo.data.errors import DataError
from mimo.data.order import BUILD_SAMPLES, EpochStream, PlannedSamples
from mimo.data.tokenizer import MimoTokenizer, build_tokenizer

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
CACHE_SUBDIR = "data_cache"
INDEX_SUBDIR = "indices"
LONG_DOC_SPLIT = "1,0,0"
"""Long-document subsets hold training documents only (see mimo.data.blend.long_document_blend)."""


@dataclass
class DataIterators:
    train: Iterator[Batch]
    """Endless micro-batches for this data-parallel rank."""
    valid: Iterable[Batch] | None
    """Endless validation micro-batches (cycling over data.valid_samples), or None without a validation split; each
    ``iter(valid)`` starts again at the first validation sample, so every validation can score the same ones."""
    tokenizer: MimoTokenizer
    dataset_names: list[str]
    """Label of each blended dataset; a micro-batch's ``dataset_id`` indexes this list."""


def _leaves(dataset: Dataset) -> list[Dataset]:
    return list(dataset.datasets) if isinstance(dataset, BlendedDataset) else [dataset]


class _ValidSamples(Dataset):
    """The validation split as megatron builds it, cycled, with the sample's number and dataset id."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Batch:
        sample = self.dataset[index % len(self.dataset)]
        sample["dataset_id"] = int(sample.get("dataset_id", 0))
        sample["sample_index"] = index
        return sample


@dataclass(frozen=True)
class DataRank:
    """Which slice of each window of samples this rank reads: ``micro_batch_size`` samples at offset
    ``dp_rank * micro_batch_size`` of every ``micro_batch_size * dp_size``."""

    dp_rank: int
    dp_size: int
    micro_batch_size: int

    def check(self) -> None:
        if self.micro_batch_size < 1 or self.dp_size < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise DataError(
                f"bad data layout: micro_batch_size={self.micro_batch_size}, dp_rank={self.dp_rank}, "
                f"dp_size={self.dp_size}; need micro_batch_size >= 1 and 0 <= dp_rank < dp_size"
            )


class _GlobalOrderSampler(Sampler[list[int]]):
    """Yields this rank's slice of each successive window of ``micro_batch_size * dp_size`` samples."""

    def __init__(self, consumed_samples: int, rank: DataRank) -> None:
        self.consumed_samples = consumed_samples
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        size = self.rank.micro_batch_size
        start = self.consumed_samples + self.rank.dp_rank * size
        window = size * self.rank.dp_size
        while True:
            yield list(range(start, start + size))
            start += window


def _gpt_config(
    cfg: DataConfig, blend: Blend, split: str, tokenizer: MimoTokenizer, seq_length: int, seed: int, cache_dir: Path
) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(blend.prefixes, blend.weights),
        split=split,
        path_to_cache=str(cache_dir / INDEX_SUBDIR),
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # document masking travels as ids (mimo.data.documents), not an s x s mask
    )


def _build(config: GPTDatasetConfig, sizes: list[int]) -> list[Dataset | None]:
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _datasets(
    cfg: DataConfig, tokenizer: MimoTokenizer, cache_dir: Path, seq_length: int, seed: int
) -> tuple[PlannedSamples, Dataset | None, list[str]]:
    """(train, valid, dataset names): megatron-core builds the first epoch of every dataset of the blend (and of
    the long-document subsets, if asked) and the validation split; the training order is planned over them."""
    blend = resolve_blend(cfg, tokenizer, cache_dir)
    share = cfg.long_docs.weight
    if cfg.long_docs.min_tokens <= 0 or share <= 0:
        config = _gpt_config(cfg, blend, cfg.split, tokenizer, seq_length, seed, cache_dir)
        train, valid, _ = _build(config, [BUILD_SAMPLES, cfg.valid_samples, 0])
        leaves, weights = _leaves(_trained(train, cfg)), list(blend.weights or [1.0])  # no weights: one dataset
        return PlannedSamples([EpochStream(leaf, seed) for leaf in leaves], weights), valid, blend.names
    subsets = long_document_blend(blend, cfg.long_docs, cfg.split, cache_dir)
    main = Blend(blend.prefixes, blend.weights or dataset_token_counts(blend), blend.names)
    config = _gpt_config(cfg, main, cfg.split, tokenizer, seq_length, seed, cache_dir)
    main_train, valid, _ = _build(config, [BUILD_SAMPLES, cfg.valid_samples, 0])
    long_config = _gpt_config(cfg, subsets, LONG_DOC_SPLIT, tokenizer, seq_length, seed, cache_dir)
    long_train, _, _ = _build(long_config, [BUILD_SAMPLES, 0, 0])
    weights = [w / sum(main.weights) * (1 - share) for w in main.weights] + [
        w / sum(subsets.weights) * share for w in subsets.weights
    ]
    leaves = _leaves(_trained(main_train, cfg)) + _leaves(long_train)
    return PlannedSamples([EpochStream(leaf, seed) for leaf in leaves], weights), valid, main.names + subsets.names


def _trained(train: Dataset | None, cfg: DataConfig) -> Dataset:
    if train is None:
        raise DataError(f"data.split={cfg.split!r} leaves no training documents; give the training split a share")
    return train


def _loader(dataset: Dataset, consumed: int, rank: DataRank, cfg: DataConfig, tokenizer: MimoTokenizer) -> DataLoader:
    """Micro-batches of this rank's samples from ``consumed`` on, with their document ids under document masking."""
    sampler = _GlobalOrderSampler(consumed, rank)
    collate = partial(collate_with_documents, tokenizer.eod) if cfg.reset_attention_mask else None
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        collate_fn=collate,
    )


def build_data_iterators(
    cfg: DataConfig,
    *,
    run_dir: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    consumed_samples: int,
    rank: DataRank,
) -> DataIterators:
    """Builds (or reuses from the cache) the datasets of ``cfg`` and this rank's iterators.

    Call it on every rank (megatron-core's builder synchronises them with barriers). The sample order
    depends on ``seed`` (keep it fixed across resumes); ``train_samples`` (the run's total) only decides how many
    epochs are built, so a longer run reads the same first samples.
    """
    rank.check()
    if consumed_samples < 0:
        raise DataError(f"consumed_samples is {consumed_samples}; it counts samples already trained on (>= 0)")
    if train_samples < 1:
        raise DataError(f"train_samples is {train_samples}; it must be the run's total number of samples (>= 1)")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(run_dir) / CACHE_SUBDIR
    tokenizer = build_tokenizer(cfg)
    with process_group_for_build():
        train, valid, names = _datasets(cfg, tokenizer, cache_dir, seq_length, seed)
        if len(train):
            train.build_for(train_samples)
    if not len(train):
        raise DataError(
            f"data.blend {cfg.blend} yields no training sample of {seq_length + 1} tokens with "
            f"split {cfg.split!r}; add data or shorten train.seq_length"
        )
    has_valid = valid is not None and len(valid) > 0
    logger.info(
        "data: %d training samples per epoch from %s, %s validation samples",
        len(train),
        names,
        len(valid) if has_valid else "no",
    )
    return DataIterators(
        train=iter(_loader(train, consumed_samples, rank, cfg, tokenizer)),
        valid=_loader(_ValidSamples(valid), 0, rank, cfg, tokenizer) if has_valid else None,
        tokenizer=tokenizer,
        dataset_names=names,
    )
