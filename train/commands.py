"""What every training-side command does first: quiet the warnings megatron-core is expected to give and
configure logging. (Errors map to ``<command>: error: ...`` and exit 2 through ``mimo.recipes.errors.run_command``.)

Library modules never configure logging or warning filters at import; the commands call these first.
"""

import logging
import warnings

LOG_FORMAT = "[mimo %(asctime)s] %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
EXPECTED_WARNINGS = (
    r".*(Transformer Engine|Apex).* not installed",
    r".*torch\.distributed\.\w+` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)
"""megatron-core announces at import time that it falls back to torch implementations when Transformer Engine or
Apex are missing (every CPU run), uses torch.distributed names that torch has since renamed, and its distributed
optimizer reads ``.grad`` of its shard views (non-leaf tensors) when zeroing gradients. All are expected and
would bury mimo's own output."""


def quiet_expected_warnings() -> None:
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging(is_main: bool) -> None:
    """mimo's own lines on the main rank only; megatron-core's INFO chatter (bucket listings, dataset index
    building) is kept to warnings so the per-step lines stay readable."""
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, force=True)
    logging.getLogger("mimo").setLevel(level)
