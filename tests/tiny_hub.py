"""A random tiny MiMo-V2-Flash in Hub format, and transformers' computation of its main and MTP predictions.

The main model is transformers' ``MiMoV2FlashForCausalLM`` written by ``save_pretrained`` (sharded, with an
index). transformers has no MTP module, so MTP block 0 is assembled from transformers' own modules (RMSNorms, a
linear eh_proj, a one-layer SWA dense MiMoV2FlashModel whose final norm is the block's final_layernorm) and its
tensors are added under ``model.mtp.layers.0.*`` in Hub naming, in a shard of their own listed in the index.

Both final norms weigh one hidden dimension heavily, so the main model's and the MTP block's top-1 predictions
often (not always) coincide: the MTP acceptance rate of this random model is neither 0 nor 1.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM, MiMoV2FlashModel
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashRMSNorm

FULL, SLIDING = "full_attention", "sliding_attention"
HF_TINY = dict(
    vocab_size=4096,  # the tokenizer shipped with mimo
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    v_head_dim=16,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    n_routed_experts=4,
    sliding_window=9,
    layer_types=[FULL, SLIDING, SLIDING],
    mlp_layer_types=["dense", "sparse", "sparse"],
    rope_parameters={
        FULL: {"rope_type": "default", "rope_theta": 640_000.0, "partial_rotary_factor": 0.334},
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
    },
    initializer_range=0.1,
    attention_value_scale=0.707,
    max_position_embeddings=512,
)
DOMINANT_NORM_WEIGHT = 300.0
SHARD_SIZE = "150KB"
MTP_SHARD = "model-mtp.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class TinyHub:
    directory: Path
    model: MiMoV2FlashForCausalLM
    enorm: MiMoV2FlashRMSNorm
    hnorm: MiMoV2FlashRMSNorm
    eh_proj: torch.nn.Linear
    mtp_body: MiMoV2FlashModel
    tensors: dict[str, torch.Tensor]
    """Every tensor of the checkpoint, Hub-named, as written."""

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits

    @torch.no_grad()
    def mtp_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, s - 1, vocab]: position i predicts ids[:, i + 2] from ids[:, :i + 2]."""
        hidden = self.model.model(ids).last_hidden_state
        embedded = self.model.model.embed_tokens(ids[:, 1:])
        fused = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden[:, :-1])], -1))
        return self.model.lm_head(self.mtp_body(inputs_embeds=fused).last_hidden_state)


def mtp_block_tensors(enorm, hnorm, eh_proj, body) -> dict[str, torch.Tensor]:
    """MTP block 0 in the Hub's naming, from transformers modules: ``body`` is a one-layer MiMoV2FlashModel
    whose layer is the block's SWA + dense-FFN layer and whose final norm is the block's final_layernorm."""
    prefix = "model.mtp.layers.0."
    layer = body.layers[0]
    tensors = {
        f"{prefix}enorm.weight": enorm.weight,
        f"{prefix}hnorm.weight": hnorm.weight,
        f"{prefix}eh_proj.weight": eh_proj.weight,
        f"{prefix}final_layernorm.weight": body.norm.weight,
        f"{prefix}input_layernorm.weight": layer.input_layernorm.weight,
        f"{prefix}pre_mlp_layernorm.weight": layer.post_attention_layernorm.weight,
        f"{prefix}self_attn.attention_sink_bias": layer.self_attn.sinks,
        **{f"{prefix}self_attn.{p}_proj.weight": getattr(layer.self_attn, f"{p}_proj").weight for p in "qkvo"},
        **{f"{prefix}mlp.{p}_proj.weight": getattr(layer.mlp, f"{p}_proj").weight for p in ("gate", "up", "down")},
    }
    return {name: tensor.detach() for name, tensor in tensors.items()}


def make_tiny_hub(directory: Path, seed: int = 0) -> TinyHub:
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**HF_TINY)).eval()
    body = MiMoV2FlashModel(
        MiMoV2FlashConfig(**{**HF_TINY, "num_hidden_layers": 1, "layer_types": [SLIDING], "mlp_layer_types": ["dense"]})
    ).eval()
    hidden = HF_TINY["hidden_size"]
    enorm, hnorm = MiMoV2FlashRMSNorm(hidden, 1e-5), MiMoV2FlashRMSNorm(hidden, 1e-5)
    eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
    layer = body.layers[0]
    with torch.no_grad():
        for decoder_layer in model.model.layers:
            if decoder_layer.self_attn.sinks is not None:
                decoder_layer.self_attn.sinks.normal_(0.0, 1.0)
            if hasattr(decoder_layer.mlp, "gate"):
                decoder_layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
        for norm in (enorm, hnorm, body.norm, layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.uniform_(0.5, 1.5)
        layer.self_attn.sinks.normal_(0.0, 1.0)
        model.model.norm.weight[0] = DOMINANT_NORM_WEIGHT
        body.norm.weight[0] = DOMINANT_NORM_WEIGHT

    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    index = json.loads((directory / INDEX).read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(directory / shard)))

    mtp = {name: tensor.clone().contiguous() for name, tensor in mtp_block_tensors(enorm, hnorm, eh_proj, body).items()}
    save_file(mtp, str(directory / MTP_SHARD), metadata={"format": "pt"})
    index["weight_map"].update({name: MTP_SHARD for name in mtp})
    (directory / INDEX).write_text(json.dumps(index))
    return TinyHub(directory, model, enorm, hnorm, eh_proj, body, {**tensors, **mtp})
