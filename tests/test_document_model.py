"""Document masking through the whole model on one rank: a batch of packed documents (document ids as
``attention_mask``, positions restarting at each document) computes what each document computes alone, for the
main model and the MTP block, against transformers run on each document separately, and the training loss, the
MTP loss and the gradients equal those of mimo's own unmasked runs of each document alone."""

import pytest
import torch
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from test_model_parity import TOLERANCE, mimo_from_hub

from mimo.model.config import ModelConfig
from mimo.model.hf.configs import hf_config_to_mimo

SEQ = 40
DOCUMENTS = [[14, 1, 25], [21, 19]]
"""Document lengths of each row: longer and shorter than the sliding window (8), and a one-token document."""


def document_ids() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in DOCUMENTS])


def restarting_positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(length) for length in row]) for row in DOCUMENTS])


def spans(row: int) -> list[slice]:
    ends = torch.tensor(DOCUMENTS[row]).cumsum(0).tolist()
    return [slice(end - length, end) for end, length in zip(ends, DOCUMENTS[row])]


@pytest.fixture(scope="module")
def model(single_rank, hub):
    cfg = hf_config_to_mimo(hub.model.config, base=ModelConfig(mtp_num_layers=1, moe_aux_loss_coeff=0.0))
    assert cfg.sliding_window < max(max(row) for row in DOCUMENTS)
    return mimo_from_hub(cfg, hub.tensors)


@pytest.fixture(scope="module")
def ids(model) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (len(DOCUMENTS), SEQ), generator=torch.Generator().manual_seed(3))


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within TOLERANCE of the largest magnitude: the hub's dominant norm weight makes logits of ~100 (FP32)."""
    return (actual - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item())


def test_logits_equal_transformers_on_each_document_alone(model, hub, ids):
    model.eval()
    with torch.no_grad():
        main, (mtp,) = model(ids, restarting_positions(), document_ids(), return_mtp_logits=True)
        plain = model(ids, restarting_positions(), None)
    documents = document_ids()
    for row in range(len(DOCUMENTS)):
        for span in spans(row):
            alone = ids[row : row + 1, span]
            assert close(main[row, span], hub.logits(alone)[0])
            if alone.shape[1] > 1:  # MTP at i reads token i + 1: its last position reads the next document
                inside = slice(span.start, span.stop - 1)
                assert close(mtp[row, inside], hub.mtp_logits(alone)[0])
    # the masking matters: without it, the later documents' logits differ
    assert (plain[documents != 0] - main[documents != 0]).abs().max().item() > 1e-2


def masked_losses(model, ids, positions, documents, loss_mask) -> tuple[torch.Tensor, float]:
    """Per-token LM losses [b, s] and the tracked MTP loss of one training forward."""
    if "values" in MTPLossLoggingHelper.tracker:
        MTPLossLoggingHelper.clean_loss_in_tracker()
    labels = torch.roll(ids, -1, 1)
    losses = model(ids, positions, documents, labels=labels, loss_mask=loss_mask)
    return losses, MTPLossLoggingHelper.tracker["values"].sum().item()


def test_training_loss_mtp_loss_and_gradients_equal_each_document_alone(model, ids):
    """The references are mimo's own runs of each document on its own (no document ids), labels inside it."""
    model.train()
    model.config.mtp_loss_scaling_factor = 0.0  # gradients of the LM loss alone: the MTP mean is not additive
    loss_mask = torch.ones(ids.shape)
    loss_mask[:, -1] = 0.0
    documents = document_ids()
    for row in range(len(DOCUMENTS)):  # the last token of each document predicts the next document
        for span in spans(row):
            loss_mask[row, span.stop - 1] = 0.0
    model.zero_grad()
    packed, packed_mtp = masked_losses(model, ids, restarting_positions(), documents, loss_mask)
    (packed * loss_mask).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    mtp_sum, mtp_count = 0.0, 0
    for row in range(len(DOCUMENTS)):
        for span in spans(row):
            alone, mask = ids[row : row + 1, span], loss_mask[row : row + 1, span]
            losses, mtp_mean = masked_losses(model, alone, None, None, mask)
            (losses * mask).sum().backward()
            if span.stop - span.start > 1:  # the last token's label lies outside the document (masked)
                assert close(packed[row, span][:-1], losses[0, :-1])
            counted = mask[0, 1:].sum().item()  # MTP at i predicts i + 2: counted where i + 1 has a target
            mtp_sum, mtp_count = mtp_sum + mtp_mean * counted, mtp_count + counted
    assert packed_mtp == pytest.approx(mtp_sum / mtp_count, rel=1e-5)
    for name, grad in packed_grads.items():
        reference = dict(model.named_parameters())[name].grad
        assert close(grad, reference), name
    model.zero_grad()


def test_a_document_sees_no_earlier_document_through_any_layer(model, ids):
    """Changing the first document's tokens leaves every later document's logits as they were."""
    model.eval()
    changed = ids.clone()
    changed[0, :14] = (ids[0, :14] + 1) % model.vocab_size
    with torch.no_grad():
        before = model(ids, restarting_positions(), document_ids())
        after = model(changed, restarting_positions(), document_ids())
    assert torch.equal(before[0, 14:], after[0, 14:])
    assert not torch.allclose(before[0, :14], after[0, :14])
    assert torch.equal(before[1], after[1])
