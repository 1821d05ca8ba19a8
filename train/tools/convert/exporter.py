"""``mimo-convert export-hf``: a mimo checkpoint as a directory that ``MiMoV2FlashForCausalLM.from_pretrained``
loads (safetensors and config.json), the MTP blocks kept under ``model.mtp.layers.K.*`` for the inference
engines."""

import logging
import os
from pathlib import Path

from mimo.model.builder import build_model
from mimo.model.config import PrecisionConfig
from mimo.model.hf.configs import mimo_config_to_hf
from mimo.model.hf.mapping import hub_tensor_shapes, mimo_to_hf
from mimo.parallel.config import ParallelConfig
from mimo.parallel.runtime import initialize, shutdown
from mimo.train.checkpoint.lookup import checkpoint_model, checkpoint_precision, resolve_checkpoint
from mimo.train.checkpoint.manager import load_checkpoint
from mimo.train.tools.convert.hf_files import ConvertError, save_sharded

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
            "export-hf runs in one process (it reshards the checkpoint to one rank); launch it without torchrun"
        )
    checkpoint = resolve_checkpoint(ckpt_dir)
    model = checkpoint_model(checkpoint)
    hf_config = MiMoV2FlashConfig(**mimo_config_to_hf(model))  # refuses a model transformers cannot describe, early
    precision = PrecisionConfig(dtype=checkpoint_precision(checkpoint))
    single = ParallelConfig()
    initialize(single, model, seed=0, global_batch_size=1, micro_batch_size=1, seq_length=1)
    try:
        chunk = build_model(model, single, precision, seq_length=1)[0]
        load_checkpoint(checkpoint, [chunk], None, model)
        state = {name: tensor for name, tensor in chunk.state_dict().items() if not name.endswith("_extra_state")}
        out_dir = Path(out_dir)
        files = save_sharded(mimo_to_hf(state.items(), model), out_dir, max_shard_bytes, len(hub_tensor_shapes(model)))
        hf_config.architectures = [HF_ARCHITECTURE]
        hf_config.dtype = HF_DTYPES[precision.dtype]
        hf_config.save_pretrained(out_dir)
        logger.info("exported %s to %s (%d files)", checkpoint, out_dir, len(files))
        return files + [out_dir / "config.json"]
    finally:
        shutdown()
