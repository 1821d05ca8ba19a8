"""megatron's GPTModel, adapted to MiMo's per-layer RoPE and to inference with MTP blocks present.

GPTModel builds one RotaryEmbedding (one base) for the whole model and turns ``position_ids`` into nothing but
the sequence length. MiMo needs two bases (GA and SWA layers) and positions that restart at document
boundaries of packed sequences, so the model is built with ``position_embedding_type="none"`` and
``rotary_pos_emb`` carries the token positions, [s, b], down to every ``MimoAttention`` (the MTP blocks receive
the same tensor from GPTModel).
"""

from typing import Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel


class MimoGPTModel(GPTModel):
    """GPTModel whose attention layers read token positions, and whose forward without labels gives logits.

    ``position_ids`` ([b, s], as for GPTModel) reach every pipeline stage's attention when passed to that stage's
    forward; a stage given none uses 0 .. s-1. Packed documents therefore need position_ids on every stage.
    """

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        preprocessed = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        positions = None if position_ids is None else position_ids.t()
        return (preprocessed[0], positions, *preprocessed[2:])

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """With labels: megatron's path (main loss; MTP losses attached to the graph, scaled by the live config).

        Without labels megatron would still run the MTP blocks and then fail on the missing labels; the MTP
        blocks only exist to be trained, so logits come from the main model alone.
        """
        if labels is None and self.mtp_process and self.post_process:
            logits, _ = self.output_layer(hidden_states, runtime_gather_output=kwargs.get("runtime_gather_output"))
            return logits.transpose(0, 1).contiguous()
        return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], *args, **kwargs):
        """MTP shifts position_ids along with input_ids, so a stage that has tokens always gets positions."""
        if position_ids is None and input_ids is not None:
            batch, seq = input_ids.shape
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        return super().forward(input_ids, position_ids, *args, **kwargs)
