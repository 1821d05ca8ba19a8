"""Progress of a conversion: tensors and tensors/s on the bar, bytes and bytes/s beside it."""

from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

BYTES_DIVISOR = 1000
"""SI units (kB, MB, GB), as the file sizes the export reports."""


class TransferProgress:
    """A progress bar over the tensors a conversion moves; ``track`` counts a (name, tensor) stream as it flows."""

    def __init__(self, desc: str, total: int, enabled: bool = True) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)
        self.bytes = 0

    def __enter__(self) -> "TransferProgress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        elapsed = self._bar.format_dict["elapsed"]
        moved = tqdm.format_sizeof(self.bytes, "B", BYTES_DIVISOR)
        rate = tqdm.format_sizeof(self.bytes / elapsed if elapsed else 0.0, "B/s", BYTES_DIVISOR)
        self._bar.set_postfix_str(f"{moved}, {rate}", refresh=False)
        self._bar.update()

    def track(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            self.update(tensor)
            yield name, tensor
