"""Training, evaluation, conversion and planning entry points.

megatron-core announces at import time that it falls back to torch implementations when Transformer Engine or
Apex are missing (every CPU run), and uses torch.distributed names that torch has since renamed. Both are
expected here and would bury mimo's own output, so they are filtered once for every mimo entry point.
"""

import warnings

EXPECTED_WARNINGS = (r".*(Transformer Engine|Apex).* not installed", r".*torch\.distributed\.\w+` is deprecated")

for _pattern in EXPECTED_WARNINGS:
    warnings.filterwarnings("ignore", message=_pattern)
