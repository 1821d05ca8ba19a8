"""megatron's GPTModel, adapted to MiMo's per-layer RoPE and to inference with MTP blocks present.

GPTModel builds one RotaryEmbedding (one base) for the whole model and turns ``position_ids`` into nothing but
the sequence length. MiMo needs two bases (GA and SWA layers) and positions that restart at document
boundaries of packed sequences, so the model is built with ``position_embedding_type="none"`` and
``rotary_pos_emb`` carries the token positions, [s, b], down to every ``MimoAttention`` (the MTP blocks receive
the same tensor from GPTModel). With document masking ``attention_mask`` carries the document ids of the whole
sequence (``mimo.model.documents``) to every decoder and MTP layer.
"""

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MTPLossLoggingHelper,
    roll_tensor,
)
from megatron.core.utils import get_pg_size

from mimo.model.documents import same_document_ahead
from mimo.parallel.context_parallel import sequence_positions, sum_over_context_parallel


class MimoGPTModel(GPTModel):
    """GPTModel whose attention layers read token positions, and whose forward without labels gives logits.

    ``position_ids`` ([b, s], as for GPTModel) reach every pipeline stage's attention when passed to that stage's
    forward; a stage given none uses 0 .. s-1. Packed documents therefore need position_ids on every stage, and,
    to be masked from each other, their document ids [b, whole sequence] as ``attention_mask`` on every stage.
    """

    _return_mtp_logits = False
    """Set for the duration of one ``forward(..., return_mtp_logits=True)`` call."""

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        preprocessed = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        positions = None if position_ids is None else position_ids.t()
        return (preprocessed[0], positions, *preprocessed[2:])

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """The last stage with MTP blocks runs them here; other stages take megatron's path.

        Without labels megatron would still run the MTP blocks and then fail on the missing labels; the MTP
        blocks only exist to be trained, so logits come from the main model alone, unless the caller asked for the
        MTP blocks' logits as well (``forward(..., return_mtp_logits=True)``, for evaluating the draft heads).
        With labels, the MTP losses are attached as megatron does, normalised by ``_mtp_token_count``.
        """
        if not (self.mtp_process and self.post_process):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        gather = kwargs.get("runtime_gather_output")
        if labels is None and not self._return_mtp_logits:
            return self._logits(hidden_states, gather)
        stacked = self.mtp(
            input_ids=input_ids,
            position_ids=position_ids,
            hidden_states=hidden_states,
            attention_mask=kwargs.get("attention_mask"),
            inference_params=kwargs.get("inference_params"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
            embedding=self.embedding,
            **(kwargs.get("extra_block_kwargs") or {}),
        )
        main, *depths = torch.chunk(stacked, 1 + self.config.mtp_num_layers, 0)
        if labels is None:
            return self._logits(main, gather), [self._logits(part, gather) for part in depths]
        mask = kwargs.get("loss_mask")
        mask = torch.ones_like(labels) if mask is None else mask
        main = self._attach_mtp_losses(main, depths, labels, (mask, kwargs.get("attention_mask")), gather)
        logits, _ = self.output_layer(main, weight=self._output_weight(), runtime_gather_output=gather)
        return self.compute_language_model_loss(labels, logits)

    def _attach_mtp_losses(
        self,
        hidden_states: torch.Tensor,
        depths: list[torch.Tensor],
        labels: torch.Tensor,
        masking: tuple[torch.Tensor, torch.Tensor | None],
        gather: bool | None,
    ) -> torch.Tensor:
        """Depth k predicts token i + 1 + k: labels and mask roll left once per depth (across context-parallel
        chunks); each depth's token mean, weighted by mtp_loss_scaling_factor / depths, joins the backward through
        ``hidden_states`` and is tracked for logging. ``masking``: the loss mask and the document ids (or None).

        With documents, position i counts at depth k only if token i + k is in i's document: the block's inputs
        at i (tokens i + 1 .. i + k) then all come from it, and the target is what the main model would be asked
        at i + k, so each document trains as it would alone (its target after its EOD token follows
        data.eod_mask_loss, as the main loss's)."""
        weight = self.config.mtp_loss_scaling_factor / self.config.mtp_num_layers
        mask, documents = masking
        if documents is not None:
            positions = sequence_positions(labels.shape[-1], self.cp_group, labels.device)
        for depth, depth_hidden in enumerate(depths, start=1):
            logits, _ = self.output_layer(depth_hidden, weight=self._output_weight(), runtime_gather_output=gather)
            labels, _ = roll_tensor(labels, shifts=-1, dims=-1, cp_group=self.cp_group)
            mask, _ = roll_tensor(mask, shifts=-1, dims=-1, cp_group=self.cp_group)
            counted = mask if documents is None else mask * same_document_ahead(documents, positions, depth)
            loss_sum = (counted * self.compute_language_model_loss(labels, logits)).sum()
            mean = loss_sum / self._mtp_token_count(counted)
            if self.training:
                MTPLossLoggingHelper.save_loss_to_tracker(
                    mean,
                    depth - 1,
                    self.config.mtp_num_layers,
                    avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
                )
            hidden_states = MTPLossAutoScaler.apply(hidden_states, weight * mean)
        return hidden_states

    def _mtp_token_count(self, mask: torch.Tensor) -> torch.Tensor:
        """The divisor of this rank's MTP loss sum: its share of the sequence's MTP tokens.

        megatron divides by the rank's own count, but rolling drops the sequence's last token from one
        context-parallel rank only, so ranks would weigh their tokens differently and the loss would depend on
        cp. Dividing by (tokens over the context-parallel group) / cp gives every token the weight it has on one
        rank, and the data-parallel average over dp x cp then yields the whole micro-batch's token mean.
        """
        sequence_count = sum_over_context_parallel(mask.sum().float(), self.cp_group)
        return (sequence_count / get_pg_size(self.cp_group)).clamp(min=1)

    def _output_weight(self) -> torch.Tensor | None:
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

    def _logits(self, hidden_states: torch.Tensor, runtime_gather_output: bool | None) -> torch.Tensor:
        logits, _ = self.output_layer(hidden_states, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        *args,
        return_mtp_logits: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """MTP shifts position_ids along with input_ids, so a stage that has tokens always gets positions.

        ``return_mtp_logits=True`` (evaluation, no labels) makes the last stage also run the MTP blocks and return
        ``(logits, [mtp logits of depth 1, 2, ...])``, each [b, s, vocab]: the depth-k logits at position i predict
        token i + 1 + k. It needs a model with MTP blocks; other stages return what they always do.
        """
        if return_mtp_logits and not self.config.mtp_num_layers:
            raise ValueError("return_mtp_logits=True needs MTP blocks; this model has model.mtp_num_layers=0")
        if position_ids is None and input_ids is not None:
            batch, seq = input_ids.shape
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        self._return_mtp_logits = return_mtp_logits
        try:
            return super().forward(input_ids, position_ids, *args, **kwargs)
        finally:
            self._return_mtp_logits = False
