"""Which document of a packed sample each token belongs to (data.reset_attention_mask).

Token i's document id is the number of end-of-document tokens before it: a document ends with its EOD token and
the next starts right after, the boundaries megatron's GPT dataset uses for ``reset_attention_mask`` and
``reset_position_ids``. The ids travel in each micro-batch as ``document_ids`` [b, s] instead of the dense
[b, 1, s, s] mask megatron's dataset would build (1 GiB per 32K-token sample); the model turns them into masking
(``mimo.model.documents``).
"""

import torch
from torch.utils.data import default_collate

DOCUMENTS = "document_ids"
"""The batch key of the document ids; absent without document masking."""


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[..., s] int64 ids from [..., s] tokens: the number of ``eod`` tokens strictly before each position."""
    ends = (tokens == eod).long()
    return ends.cumsum(-1) - ends


def collate_with_documents(eod: int, samples: list[dict]) -> dict[str, torch.Tensor]:
    """The DataLoader's batch of ``samples`` with their ``document_ids``."""
    batch = default_collate(samples)
    batch[DOCUMENTS] = document_ids(batch["tokens"], eod)
    return batch
