"""A random tiny MiMo-V2-Flash in Hub format, and transformers' computation of its main and MTP predictions and of
the figures mimo-eval reports on it.

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
import torch.nn.functional as F
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
HF_INTERLEAVED = {
    **HF_TINY,  # four layers, a dense layer after MoE layers, 8 experts (ep 2 x 4), a vocabulary of its own
    "vocab_size": 256,
    "num_hidden_layers": 4,
    "n_routed_experts": 8,
    "layer_types": [FULL, SLIDING, SLIDING, FULL],
    "mlp_layer_types": ["dense", "sparse", "sparse", "dense"],
}
"""A dense/MoE pattern mimo once refused: each half (pipeline stage of pp 2) holds a dense and a MoE layer."""
DOMINANT_NORM_WEIGHT = 300.0
SHARD_SIZE = "150KB"
MTP_SHARD = "model-mtp.safetensors"
INDEX = "model.safetensors.index.json"


SINK_STD = 1.0
EXPERT_BIAS_STD = 0.05
"""transformers starts sinks and expert biases at zero; nonzero values make their mapping matter."""
NORM_RANGE = (0.5, 1.5)
IMPORT_SEQ = 32
IMPORT_OVERRIDES = (f"train.seq_length={IMPORT_SEQ}", "train.global_batch_size=4", "train.micro_batch_size=2")
"""The settings the tests import the tiny Hub checkpoint with (``imported`` in conftest.py)."""


def randomize_sinks_and_expert_biases(layers) -> None:
    """Nonzero attention sinks and expert biases in transformers decoder layers."""
    with torch.no_grad():
        for layer in layers:
            if layer.self_attn.sinks is not None:
                layer.self_attn.sinks.normal_(0.0, SINK_STD)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, EXPERT_BIAS_STD)


@dataclass
class MtpBlock:
    """MTP block 0 built from transformers' modules: ``body`` is a one-layer MiMoV2FlashModel whose layer is the
    block's SWA + dense-FFN layer and whose final norm is the block's final_layernorm."""

    enorm: MiMoV2FlashRMSNorm
    hnorm: MiMoV2FlashRMSNorm
    eh_proj: torch.nn.Linear
    body: MiMoV2FlashModel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The block in the Hub's naming."""
        prefix = "model.mtp.layers.0."
        layer = self.body.layers[0]
        tensors = {
            f"{prefix}enorm.weight": self.enorm.weight,
            f"{prefix}hnorm.weight": self.hnorm.weight,
            f"{prefix}eh_proj.weight": self.eh_proj.weight,
            f"{prefix}final_layernorm.weight": self.body.norm.weight,
            f"{prefix}input_layernorm.weight": layer.input_layernorm.weight,
            f"{prefix}pre_mlp_layernorm.weight": layer.post_attention_layernorm.weight,
            f"{prefix}self_attn.attention_sink_bias": layer.self_attn.sinks,
            **{f"{prefix}self_attn.{p}_proj.weight": getattr(layer.self_attn, f"{p}_proj").weight for p in "qkvo"},
            **{f"{prefix}mlp.{p}_proj.weight": getattr(layer.mlp, f"{p}_proj").weight for p in ("gate", "up", "down")},
        }
        return {name: tensor.detach() for name, tensor in tensors.items()}

    @torch.no_grad()
    def hidden(self, model: MiMoV2FlashForCausalLM, ids: torch.Tensor) -> torch.Tensor:
        """[b, s - 1, hidden]: the block's output at position i, which predicts ids[:, i + 2] (``model`` supplies
        the embedding and the main model's hidden states)."""
        main = model.model(ids).last_hidden_state
        embedded = model.model.embed_tokens(ids[:, 1:])
        fused = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(main[:, :-1])], -1))
        return self.body(inputs_embeds=fused).last_hidden_state

    @torch.no_grad()
    def logits(self, model: MiMoV2FlashForCausalLM, ids: torch.Tensor) -> torch.Tensor:
        """[b, s - 1, vocab] through the shared LM head."""
        return model.lm_head(self.hidden(model, ids))


def make_mtp_block(hf_config: dict) -> MtpBlock:
    """A random MTP block for the model of ``hf_config`` (transformers keyword arguments), norms and sink random."""
    body = MiMoV2FlashModel(
        MiMoV2FlashConfig(
            **{**hf_config, "num_hidden_layers": 1, "layer_types": [SLIDING], "mlp_layer_types": ["dense"]}
        )
    ).eval()
    hidden = hf_config["hidden_size"]
    block = MtpBlock(
        MiMoV2FlashRMSNorm(hidden, 1e-5),
        MiMoV2FlashRMSNorm(hidden, 1e-5),
        torch.nn.Linear(2 * hidden, hidden, bias=False),
        body,
    )
    layer = body.layers[0]
    with torch.no_grad():
        for norm in (block.enorm, block.hnorm, body.norm, layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.uniform_(*NORM_RANGE)
    randomize_sinks_and_expert_biases(body.layers)
    return block


@dataclass
class TinyHub:
    directory: Path
    model: MiMoV2FlashForCausalLM
    mtp: MtpBlock
    tensors: dict[str, torch.Tensor]
    """Every tensor of the checkpoint, Hub-named, as written."""

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits

    def mtp_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mtp.logits(self.model, ids)


def make_tiny_hub(directory: Path, seed: int = 0, hf_config: dict = HF_TINY) -> TinyHub:
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**hf_config)).eval()
    block = make_mtp_block(hf_config)
    randomize_sinks_and_expert_biases(model.model.layers)
    with torch.no_grad():
        model.model.norm.weight[0] = DOMINANT_NORM_WEIGHT
        block.body.norm.weight[0] = DOMINANT_NORM_WEIGHT

    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    index = json.loads((directory / INDEX).read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(directory / shard)))

    mtp = {name: tensor.clone().contiguous() for name, tensor in block.tensors().items()}
    save_file(mtp, str(directory / MTP_SHARD), metadata={"format": "pt"})
    index["weight_map"].update({name: MTP_SHARD for name in mtp})
    (directory / INDEX).write_text(json.dumps(index))
    return TinyHub(directory, model, block, {**tensors, **mtp})


@dataclass
class EvalReference:
    loss: float
    tokens: int
    mtp_loss: float
    mtp_tokens: int
    acceptance: float


def transformers_eval(hub: TinyHub, stream, seq_length: int) -> EvalReference:
    """What mimo-eval should report, from per-sequence transformers forward passes over the same cut: sequence i
    is stream[i*S : i*S + S + 1]."""
    sums = torch.zeros(5, dtype=torch.float64)
    for start in range(0, len(stream) - 1, seq_length):
        window = torch.tensor(stream[start : start + seq_length + 1])
        ids, labels = window[:-1].unsqueeze(0), window[1:]
        logits = hub.logits(ids)[0]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += len(labels)
        if len(labels) > 1:
            mtp = hub.mtp_logits(ids)[0]
            sums[2] += F.cross_entropy(mtp, labels[1:], reduction="sum").double()
            sums[3] += len(labels) - 1
            sums[4] += (mtp.argmax(-1) == logits[1:].argmax(-1)).sum()
    return EvalReference(
        loss=(sums[0] / sums[1]).item(),
        tokens=int(sums[1]),
        mtp_loss=(sums[2] / sums[3]).item(),
        mtp_tokens=int(sums[3]),
        acceptance=(sums[4] / sums[3]).item(),
    )
