"""``mimo-convert export-hf``: a mimo checkpoint as a directory that ``MiMoV2FlashForCausalLM.from_pretrained``
loads (safetensors, config.json and the run's tokenizer), the MTP blocks kept under ``model.mtp.layers.K.*`` for
the inference engines.

The checkpoint is streamed: each tensor of the full model is read from the checkpoint on its own (whatever layout
wrote it), split into its HF tensors and written into its place in the safetensors shards, so the export holds
about one tensor at a time, needs no process group, no GPU and no model, and runs on one machine at any scale.
The files are those a single-rank model's ``state_dict`` gives through ``mimo_to_hf``, in its order.
"""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mimo.data.config import DataConfig
from mimo.data.tokenizer import save_tokenizer
from mimo.model.hf.configs import CONFIG_FILE, mimo_config_to_hf
from mimo.model.hf.mapping import CheckpointTensor, checkpoint_tensors, mimo_to_hf
from mimo.train.checkpoint.lookup import checkpoint_model, checkpoint_precision, resolve_checkpoint, run_config_file
from mimo.train.checkpoint.storage import verify_files
from mimo.train.tools.convert.checkpoint_reader import CheckpointReader
from mimo.train.tools.convert.hf_files import TOKENIZER_KEY, ConvertError
from mimo.train.tools.convert.hf_writer import PlannedTensor, ShardedSafetensorsWriter
from mimo.train.tools.convert.progress import TransferProgress

logger = logging.getLogger("mimo")

BYTES_PER_GB = 10**9
DEFAULT_MAX_SHARD_GB = 5.0
"""Largest safetensors file export-hf writes, as transformers' save_pretrained does by default."""
HF_ARCHITECTURE = "MiMoV2FlashForCausalLM"
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def export_hf(
    ckpt_dir: Path, out_dir: Path, max_shard_bytes: int = int(DEFAULT_MAX_SHARD_GB * BYTES_PER_GB)
) -> list[Path]:
    """Write the latest (or the named) checkpoint as an HF directory; returns the files written."""
    from transformers import MiMoV2FlashConfig

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConvertError(
            "export-hf runs in one process (it reads the checkpoint tensor by tensor); launch it without torchrun"
        )
    checkpoint = resolve_checkpoint(ckpt_dir)
    model = checkpoint_model(checkpoint)
    hf_config = MiMoV2FlashConfig(**mimo_config_to_hf(model))  # refuses a model transformers cannot describe, early
    hf_config.architectures = [HF_ARCHITECTURE]
    hf_config.dtype = HF_DTYPES[checkpoint_precision(checkpoint)]
    verify_files(checkpoint)
    reader = CheckpointReader(checkpoint)
    sources = checkpoint_tensors(model)
    planned = [
        PlannedTensor(name, reader.dtype(source.key), shape)
        for source in sources
        for name, shape in zip(source.hf, source.hf_shapes)
    ]
    out_dir = Path(out_dir)
    with (
        ShardedSafetensorsWriter(out_dir, planned, max_shard_bytes) as writer,
        TransferProgress("exporting", len(planned)) as progress,
    ):
        for name, tensor in progress.track(mimo_to_hf(_read_all(reader, sources), model)):
            writer.write(name, tensor)
        files = writer.finish()
    hf_config.save_pretrained(out_dir)
    files += [out_dir / CONFIG_FILE, *_write_tokenizer(checkpoint, out_dir)]
    logger.info(
        "exported %s to %s (%d files, %.2f GB of tensors)",
        checkpoint,
        out_dir,
        len(files),
        progress.bytes / BYTES_PER_GB,
    )
    return files


def _read_all(reader: CheckpointReader, sources: list[CheckpointTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(mimo name, full tensor) of every source, one at a time."""
    for source in sources:
        index = () if source.expert is None else (source.expert,)
        yield source.mimo, reader.read(source.key, source.shape, index)


def _write_tokenizer(checkpoint: Path, out_dir: Path) -> list[Path]:
    """The tokenizer of the run that wrote the checkpoint (its config.yaml's data.tokenizer; null is the one
    shipped with mimo), next to config.json."""
    run_config = run_config_file(checkpoint)
    if run_config is None:
        logger.warning(
            "no config.yaml next to %s, so its tokenizer is unknown and none was written; copy the tokenizer's files"
            " into %s",
            checkpoint,
            out_dir,
        )
        return []
    tokenizer = OmegaConf.select(OmegaConf.load(run_config), TOKENIZER_KEY)
    return save_tokenizer(DataConfig(tokenizer=tokenizer), out_dir)
