"""``mimo-convert``: Hugging Face MiMo-V2-Flash checkpoints in and out of mimo training checkpoints.

``import-hf`` (``importer``) and ``export-hf`` (``exporter``); this module parses the command line.
"""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mimo.recipes.errors import run_command
from mimo.train.commands import quiet_expected_warnings, setup_logging
from mimo.train.tools.convert.exporter import BYTES_PER_GB, DEFAULT_MAX_SHARD_GB, export_hf
from mimo.train.tools.convert.importer import import_hf

PROG = "mimo-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert MiMo-V2-Flash checkpoints between Hugging Face and mimo formats."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser(
        "import-hf",
        help="HF directory (BF16/FP32, or the released FP8) -> mimo run directory",
        description="Read a transformers-format MiMo-V2-Flash directory (config.json + safetensors, single file or"
        " sharded; FP8 128x128-block weights are dequantised) and write OUT_DIR/checkpoints (step 0, no optimizer"
        " state), OUT_DIR/config.yaml and the model as recipe group OUT_DIR/recipes/model/imported.yaml. Runs in"
        " one process or under torchrun with the layout given by parallel.* overrides; each rank reads only its"
        " tensors. MTP blocks: all the checkpoint has, or model.mtp_num_layers=N of them. The directory's"
        " tokenizer, when it has one, becomes the run's data.tokenizer.",
        epilog="example: torchrun --nproc-per-node 8 -m mimo.train.tools.convert import-hf /ckpt/MiMo-V2-Flash"
        " runs/flash"
        " model.mtp_num_layers=1 precision.dtype=bf16 parallel.ep=8",
    )
    importer.add_argument("hf_dir", type=Path)
    importer.add_argument("out_dir", type=Path)
    importer.add_argument("--config-name", "-c", default="config", help="recipe the imported model trains with")
    importer.add_argument("overrides", nargs="*", metavar="key=value")
    exporter = commands.add_parser(
        "export-hf",
        help="mimo checkpoint -> HF directory that MiMoV2FlashForCausalLM.from_pretrained loads",
        description="Read a mimo checkpoint (a run directory, its checkpoints/ directory, or one step_N directory;"
        " written under any layout) tensor by tensor and write safetensors shards, their index, config.json and the"
        " run's tokenizer. One process, no GPU: the model is never built and about one tensor is held at a time, so"
        " even the 309B model exports on one machine with a few GB of memory.",
    )
    exporter.add_argument("ckpt_dir", type=Path)
    exporter.add_argument("out_dir", type=Path)
    exporter.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_GB, help="largest file written (GB)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_expected_warnings()
    args = build_parser().parse_args(argv)
    setup_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
    if args.command == "import-hf":
        return run_command(PROG, lambda: import_hf(args.hf_dir, args.out_dir, args.overrides, args.config_name))
    return run_command(PROG, lambda: export_hf(args.ckpt_dir, args.out_dir, int(args.max_shard_gb * BYTES_PER_GB)))


if __name__ == "__main__":
    sys.exit(main())
