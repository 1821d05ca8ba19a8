"""The training sample order: the same first samples whatever the run's length.

megatron-core's GPT dataset shuffles its documents and samples over all the epochs it builds for a requested
number of samples, and its blend sizes each dataset from that number, so asking for more samples (a run extended
by raising ``train.steps``) reorders the ones already planned. mimo builds every dataset of a blend epoch by epoch
instead: epoch ``e`` of a dataset is megatron's one-epoch GPT dataset built with its own seed (epoch 0 with the run
seed itself, so a run that stays within one epoch reads what megatron's builder gives), and global sample ``i``
comes from the dataset and position that megatron's error-minimising blending assigns to it within a fixed block
of ``BLEND_BLOCK`` samples; that blending's first ``n`` choices do not depend on how many follow. So sample ``i``
depends on the seed, the blend and ``i`` alone; the run's length only decides how many epochs are built.
"""

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy
import torch
from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]
BLEND_BLOCK = 1 << 16
"""Samples over which each blending pass runs; every block interleaves the datasets identically."""
BUILD_SAMPLES = 1
"""Samples requested from megatron for each epoch: any count within one epoch builds exactly that whole epoch."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of ``epoch``: the run seed for the first, independent 32-bit seeds after it."""
    return seed if epoch == 0 else int(numpy.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochStream:
    """One dataset's training samples, epoch after epoch, each epoch a new shuffle of the whole dataset."""

    def __init__(self, first_epoch: GPTDataset, seed: int) -> None:
        self.epochs = [first_epoch]
        self.seed = seed

    @property
    def epoch_samples(self) -> int:
        return len(self.epochs[0])

    def build_epochs(self, count: int) -> None:
        """Make the first ``count`` epochs available (call on every rank: rank 0 builds the index caches)."""
        first = self.epochs[0]
        while len(self.epochs) < count:
            config = replace(first.config, random_seed=epoch_seed(self.seed, len(self.epochs)))
            self.epochs.append(
                BlendedMegatronDatasetBuilder.build_generic_dataset(
                    GPTDataset,
                    lambda: True,
                    True,
                    first.dataset,
                    first.dataset_path,
                    first.indices,
                    BUILD_SAMPLES,
                    first.index_split,
                    config,
                )
            )

    def __getitem__(self, position: int) -> dict:
        """Sample ``position`` of the stream; past the epochs built, the built ones come round again."""
        epoch, index = divmod(position, self.epoch_samples)
        return self.epochs[epoch % len(self.epochs)][index]


class PlannedSamples(Dataset):
    """Global sample ``i`` of a blend of epoch streams, with its dataset id and its own number."""

    def __init__(self, streams: Sequence[EpochStream], weights: Sequence[float]) -> None:
        self.streams = list(streams)
        total = float(sum(weights))
        self.dataset_index = numpy.zeros(BLEND_BLOCK, dtype=numpy.int16)
        self.dataset_sample_index = numpy.zeros(BLEND_BLOCK, dtype=numpy.int64)
        normalized = numpy.array([w / total for w in weights], dtype=numpy.float64)
        helpers.build_blending_indices(
            self.dataset_index, self.dataset_sample_index, normalized, len(self.streams), BLEND_BLOCK, False
        )
        self.per_block = numpy.bincount(self.dataset_index, minlength=len(self.streams))

    def samples_needed(self, total: int) -> list[int]:
        """How many samples of each stream the first ``total`` global samples use."""
        blocks, rest = divmod(total, BLEND_BLOCK)
        partial = numpy.bincount(self.dataset_index[:rest], minlength=len(self.streams))
        return [int(blocks * per_block + part) for per_block, part in zip(self.per_block, partial)]

    def build_for(self, total: int) -> None:
        """Build the epochs the first ``total`` global samples reach."""
        for stream, needed in zip(self.streams, self.samples_needed(total)):
            stream.build_epochs(max(1, math.ceil(needed / stream.epoch_samples)))

    def __len__(self) -> int:
        """One epoch of every stream's worth (what the log reports); indices past it stay valid."""
        return sum(stream.epoch_samples for stream in self.streams)

    def __getitem__(self, index: int) -> Batch:
        block, offset = divmod(index, BLEND_BLOCK)
        dataset_id = int(self.dataset_index[offset])
        position = block * int(self.per_block[dataset_id]) + int(self.dataset_sample_index[offset])
        sample = self.streams[dataset_id][position]
        sample["dataset_id"] = dataset_id
        sample["sample_index"] = index
        return sample
