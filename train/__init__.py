"""Training, evaluation, conversion and planning entry points.

megatron-core announces at import time that it falls back to torch implementations when Transformer Engine or
Apex are missing (every CPU run), uses torch.distributed names that torch has since renamed, and its distributed
optimizer reads ``.grad`` of its shard views (non-leaf tensors) when zeroing gradients. All are expected here and
would bury mimo's own output, so they are filtered once for every mimo entry point.
"""

import warnings

EXPECTED_WARNINGS = (
    r".*(Transformer Engine|Apex).* not installed",
    r".*torch\.distributed\.\w+` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)

for _pattern in EXPECTED_WARNINGS:
    warnings.filterwarnings("ignore", message=_pattern)
