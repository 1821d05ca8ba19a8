"""The tensor mapping between mimo models and Hugging Face MiMo-V2-Flash checkpoints (Hub naming), written once:
names, shapes, fused splits and tensor-parallel sharding, used by import, export and the checkpoint checks.

Hub naming (what ``save_pretrained`` and the released safetensors use; transformers fuses experts and renames the
sink only in memory): ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``, ``self_attn.attention_sink_bias``,
``mlp.{gate,up,down}_proj.weight`` (dense), ``mlp.experts.E.{gate,up,down}_proj.weight``, ``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
``model.embed_tokens``, ``lm_head``, and MTP blocks under ``model.mtp.layers.K.`` (``enorm``, ``hnorm``,
``eh_proj``, ``final_layernorm`` plus the layer's own tensors, whose second norm the Hub calls
``pre_mlp_layernorm``; transformers ignores MTP keys, the inference engines read them).

Both directions stream (name, tensor) pairs so a converter can read safetensors shard by shard. A mimo tensor
built from several HF tensors (fused QKV, gate+up) is emitted as soon as its last part has arrived. FP8 Hub
checkpoints must be dequantised first (``*_scale_inv`` keys are refused).

``hf_to_mimo`` produces the tensors one rank holds (``ShardLayout``), named as in that rank's model
``state_dict()``; ``mimo_to_hf`` reads full, unsharded mimo tensors, which ``checkpoint_tensors`` locates in a
distributed checkpoint of any layout (so export reads them one by one, without building the model).
"""

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from mimo.model.config import AttentionType, ModelConfig
from mimo.recipes.errors import MimoError

EXPERTS_CHECKPOINT_KEY = "mlp.experts.experts."
"""megatron-core checkpoints a MoE layer's routed experts as one tensor per FFN matrix,
``decoder.layers.N.mlp.experts.experts.linear_fc{1,2}.weight``, with the global expert index as a prepended axis
(SequentialMLP and the grouped-GEMM experts alike)."""
HUB_MTP_PRE_MLP_NORM = "pre_mlp_layernorm"
"""The Hub's name for the MTP layer's second norm (decoder layers call it post_attention_layernorm)."""
QUANT_SCALE_SUFFIX = "_scale_inv"

TensorStream = Iterable[tuple[str, torch.Tensor]]
Shape = tuple[int, ...]


class HFMappingError(MimoError, ValueError):
    """A checkpoint or config that does not match the model it is converted for."""


@dataclass(frozen=True)
class ShardLayout:
    """The part of the full model one rank's model chunk holds."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    first_layer: int = 0
    """Global index of the chunk's first decoder layer."""
    num_layers: int | None = None
    """Decoder layers in the chunk; None: all from first_layer on."""
    has_embedding: bool = True
    """Pipeline stages with the input embedding: the first, and the one running the MTP blocks."""
    has_output: bool = True
    """The last stage: final norm and LM head."""
    has_mtp: bool = True

    @classmethod
    def of_model(cls, model: Any) -> "ShardLayout":
        """The layout of a built chunk (a MimoGPTModel) under megatron's current parallel state."""
        from megatron.core import parallel_state as ps

        layers = model.decoder.layers
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            first_layer=layers[0].layer_number - 1 if len(layers) else 0,
            num_layers=len(layers),
            has_embedding=model.pre_process or model.mtp_process,
            has_output=model.post_process,
            has_mtp=model.mtp_process,
        )

    def holds_layer(self, layer: int) -> bool:
        return layer >= self.first_layer and (self.num_layers is None or layer < self.first_layer + self.num_layers)


class _Shard(Enum):
    """How a tensor is split over tensor (or expert-tensor) parallel ranks."""

    REPLICATED = "replicated"
    ROWS = "rows"
    """Output features (dim 0): column-parallel weights, vocab rows, per-head sinks, fused QKV (per-group layout)."""
    COLUMNS = "columns"
    """Input features (dim 1): row-parallel weights."""
    GATE_UP_ROWS = "gate_up_rows"
    """SwiGLU fc1 [gate; up]: each rank holds [its gate rows; its up rows]."""


@dataclass(frozen=True)
class _Rule:
    """One mimo tensor and the HF tensors it is made of."""

    mimo: str
    """Name in a full (unsharded, single-stage) mimo model."""
    hf: tuple[str, ...]
    shapes: tuple[Shape, ...]
    """The shape of each HF tensor in ``hf``, in the Hub checkpoint."""
    shard: _Shard
    merge: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    place: str
    """embedding | decoder | output | mtp: which pipeline chunk holds it."""
    layer: int | None = None
    expert: int | None = None
    checkpoint_key: str | None = None
    """The key of a mimo checkpoint that holds the tensor, where it differs from ``mimo`` (routed experts)."""


def _identity_merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def _identity_split(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


def _concat_merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(parts), dim=0)


def _halves_split(tensor: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.chunk(tensor, 2, dim=0))


def _qkv_ops(cfg: ModelConfig, kind: AttentionType):
    """Fuse q/k/v into mimo's per-KV-group layout [queries of group g | key g | value g] and back."""
    groups, dk, dv = cfg.num_kv_heads(kind), cfg.head_dim, cfg.v_head_dim
    q_rows = cfg.num_attention_heads // groups * dk

    def merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        hidden = q.shape[-1]
        fused = torch.cat([q.view(groups, q_rows, hidden), k.view(groups, dk, hidden), v.view(groups, dv, hidden)], 1)
        return fused.reshape(-1, hidden)

    def split(tensor: torch.Tensor) -> list[torch.Tensor]:
        hidden = tensor.shape[-1]
        q, k, v = torch.split(tensor.view(groups, q_rows + dk + dv, hidden), [q_rows, dk, dv], dim=1)
        return [part.reshape(-1, hidden).contiguous() for part in (q, k, v)]

    return merge, split


def _plain(mimo: str, hf: str, shape: Shape, shard: _Shard, **where: Any) -> _Rule:
    """A mimo tensor that is one HF tensor."""
    return _Rule(mimo, (hf,), (shape,), shard, merge=_identity_merge, split=_identity_split, **where)


def _layer_rules(
    cfg: ModelConfig, mimo: str, hf: str, kind: AttentionType, moe: bool, mtp: bool, **where: Any
) -> list[_Rule]:
    """Rules of one transformer layer: decoder layer (mimo ``decoder.layers.i.``) or MTP layer, in the order of
    the layer's ``state_dict``."""
    hidden, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(kind)
    qkv_merge, qkv_split = _qkv_ops(cfg, kind)
    pre_mlp_norm = HUB_MTP_PRE_MLP_NORM if mtp else "post_attention_layernorm"
    attn = f"{hf}self_attn."
    rules = [
        _plain(f"{mimo}input_layernorm.weight", f"{hf}input_layernorm.weight", (hidden,), _Shard.REPLICATED, **where),
        _Rule(
            f"{mimo}self_attention.linear_qkv.weight",
            (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
            ((heads * cfg.head_dim, hidden), (groups * cfg.head_dim, hidden), (groups * cfg.v_head_dim, hidden)),
            _Shard.ROWS,
            merge=qkv_merge,
            split=qkv_split,
            **where,
        ),
    ]
    if cfg.has_sink(kind):
        rules.append(
            _plain(
                f"{mimo}self_attention.core_attention.softmax_offset",
                f"{attn}attention_sink_bias",
                (heads,),
                _Shard.ROWS,
                **where,
            )
        )
    rules += [
        _plain(
            f"{mimo}self_attention.linear_proj.weight",
            f"{attn}o_proj.weight",
            (hidden, heads * cfg.v_head_dim),
            _Shard.COLUMNS,
            **where,
        ),
        _plain(f"{mimo}pre_mlp_layernorm.weight", f"{hf}{pre_mlp_norm}.weight", (hidden,), _Shard.REPLICATED, **where),
    ]
    if not moe:
        return rules + _mlp_rules(f"{mimo}mlp.", f"{hf}mlp.", cfg.ffn_hidden_size, cfg, where)
    experts = cfg.num_experts
    rules += [
        _plain(f"{mimo}mlp.router.weight", f"{hf}mlp.gate.weight", (experts, hidden), _Shard.REPLICATED, **where),
        _plain(
            f"{mimo}mlp.router.expert_bias",
            f"{hf}mlp.gate.e_score_correction_bias",
            (experts,),
            _Shard.REPLICATED,
            **where,
        ),
    ]
    for expert in range(experts):
        if cfg.moe_grouped_gemm:
            fc1, fc2 = f"{mimo}mlp.experts.linear_fc1.weight{expert}", f"{mimo}mlp.experts.linear_fc2.weight{expert}"
        else:
            fc1 = f"{mimo}mlp.experts.local_experts.{expert}.linear_fc1.weight"
            fc2 = f"{mimo}mlp.experts.local_experts.{expert}.linear_fc2.weight"
        hf_expert = f"{hf}mlp.experts.{expert}."
        keys = (f"{mimo}{EXPERTS_CHECKPOINT_KEY}linear_fc1.weight", f"{mimo}{EXPERTS_CHECKPOINT_KEY}linear_fc2.weight")
        rules += _mlp_rules(
            fc1, hf_expert, cfg.moe_ffn_hidden_size, cfg, dict(where, expert=expert), fc2=fc2, checkpoint_keys=keys
        )
    return rules


def _mlp_rules(
    mimo: str,
    hf: str,
    width: int,
    cfg: ModelConfig,
    where: dict[str, Any],
    fc2: str | None = None,
    checkpoint_keys: tuple[str, str] | None = None,
) -> list[_Rule]:
    """SwiGLU FFN of ``width``: fc1 = [gate; up], fc2 = down. ``mimo`` is the module prefix, or fc1's full name
    with ``fc2``; ``checkpoint_keys`` are fc1's and fc2's checkpoint keys where they differ from the names."""
    hidden = cfg.hidden_size
    fc1_name, fc2_name = (mimo, fc2) if fc2 else (f"{mimo}linear_fc1.weight", f"{mimo}linear_fc2.weight")
    fc1_key, fc2_key = checkpoint_keys or (None, None)
    return [
        _Rule(
            fc1_name,
            (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"),
            ((width, hidden), (width, hidden)),
            _Shard.GATE_UP_ROWS,
            merge=_concat_merge,
            split=_halves_split,
            checkpoint_key=fc1_key,
            **where,
        ),
        _plain(fc2_name, f"{hf}down_proj.weight", (hidden, width), _Shard.COLUMNS, checkpoint_key=fc2_key, **where),
    ]


def _rules(cfg: ModelConfig) -> list[_Rule]:
    """Every tensor of the full model, in the order of a single-rank model's ``state_dict`` (local backend):
    export writes the HF tensors in this order, as it did when it read them from a built model."""
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    rules = [
        _plain(
            "embedding.word_embeddings.weight",
            "model.embed_tokens.weight",
            (vocab, hidden),
            _Shard.ROWS,
            place="embedding",
        )
    ]
    for layer, kind in enumerate(cfg.layer_types()):
        decoder, hub = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        rules += _layer_rules(cfg, decoder, hub, kind, cfg.is_moe(layer), False, place="decoder", layer=layer)
    rules.append(
        _plain("decoder.final_layernorm.weight", "model.norm.weight", (hidden,), _Shard.REPLICATED, place="output")
    )
    for depth in range(cfg.mtp_num_layers):
        rules += _mtp_rules(cfg, f"mtp.layers.{depth}.", f"model.mtp.layers.{depth}.")
    rules.append(_plain("output_layer.weight", "lm_head.weight", (vocab, hidden), _Shard.ROWS, place="output"))
    return rules


def _mtp_rules(cfg: ModelConfig, mimo: str, hf: str) -> list[_Rule]:
    """One MTP block: enorm, hnorm, eh_proj, its SWA dense-FFN layer, final_layernorm."""
    hidden = cfg.hidden_size

    def norm(name: str) -> _Rule:
        return _plain(f"{mimo}{name}.weight", f"{hf}{name}.weight", (hidden,), _Shard.REPLICATED, place="mtp")

    eh_proj = _plain(f"{mimo}eh_proj.weight", f"{hf}eh_proj.weight", (hidden, 2 * hidden), _Shard.ROWS, place="mtp")
    layer = _layer_rules(cfg, f"{mimo}transformer_layer.", hf, AttentionType.SLIDING, False, True, place="mtp")
    return [norm("enorm"), norm("hnorm"), eh_proj, *layer, norm("final_layernorm")]


def hub_tensor_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Name and shape of every tensor of a Hub-format checkpoint of this model, MTP blocks included: what
    ``save_pretrained`` writes plus ``model.mtp.layers.K.*``."""
    cfg.validate()
    return {name: shape for rule in _rules(cfg) for name, shape in zip(rule.hf, rule.shapes)}


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of the full model as a mimo checkpoint (megatron dist_checkpointing) stores it, and the HF
    tensors it becomes."""

    mimo: str
    """Its name in a single-rank model's ``state_dict`` (what ``mimo_to_hf`` takes)."""
    key: str
    """The checkpoint key holding it: the same name, but one key per MoE layer and FFN matrix for the routed
    experts (``EXPERTS_CHECKPOINT_KEY``)."""
    expert: int | None
    """For a routed expert: its index on the key's prepended expert axis."""
    shape: Shape
    """Shape of the tensor (of one expert's slice for experts): the HF parts stacked on dim 0."""
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]


def checkpoint_tensors(cfg: ModelConfig) -> list[CheckpointTensor]:
    """Every tensor of the full model, MTP blocks included, in the order of a single-rank model's ``state_dict``
    (on the local backend), with the checkpoint key and slice that hold it whatever layout wrote the checkpoint
    (layer numbers in checkpoint keys are global)."""
    cfg.validate()
    return [
        CheckpointTensor(
            mimo=rule.mimo,
            key=rule.checkpoint_key or rule.mimo,
            expert=rule.expert,
            shape=(sum(shape[0] for shape in rule.shapes), *rule.shapes[0][1:]),
            hf=rule.hf,
            hf_shapes=rule.shapes,
        )
        for rule in _rules(cfg)
    ]


def _holds(rule: _Rule, layout: ShardLayout, cfg: ModelConfig) -> bool:
    if rule.place == "embedding":
        return layout.has_embedding
    if rule.place == "output":
        return layout.has_output
    if rule.place == "mtp":
        return layout.has_mtp
    if not layout.holds_layer(rule.layer):
        return False
    return rule.expert is None or rule.expert // (cfg.num_experts // layout.ep_size) == layout.ep_rank


def _local_name(rule: _Rule, layout: ShardLayout, cfg: ModelConfig) -> str:
    """The name in this rank's state_dict: layer and expert indices become chunk-local."""
    name = rule.mimo
    if rule.layer is not None:
        name = name.replace(f"decoder.layers.{rule.layer}.", f"decoder.layers.{rule.layer - layout.first_layer}.", 1)
    if rule.expert is not None:
        local = rule.expert % (cfg.num_experts // layout.ep_size)
        name = re.sub(rf"(local_experts\.){rule.expert}\.", rf"\g<1>{local}.", name)
        name = re.sub(rf"(weight){rule.expert}$", rf"\g<1>{local}", name)
    return name


def _shard(rule: _Rule, tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    rank, size = (layout.etp_rank, layout.etp_size) if rule.expert is not None else (layout.tp_rank, layout.tp_size)
    if rule.shard is _Shard.REPLICATED or size == 1:
        return tensor
    dim = 1 if rule.shard is _Shard.COLUMNS else 0
    parts = 2 * size if rule.shard is _Shard.GATE_UP_ROWS else size
    if tensor.shape[dim] % parts:
        raise HFMappingError(
            f"{rule.mimo}: dim {dim} of size {tensor.shape[dim]} does not split evenly over {size} tensor-parallel"
            " ranks; choose a TP/ETP degree dividing it"
        )
    if rule.shard is not _Shard.GATE_UP_ROWS:
        return torch.chunk(tensor, size, dim=dim)[rank].clone()
    gate, up = torch.chunk(tensor, 2, dim=0)
    return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)


def _check_divisible(cfg: ModelConfig, layout: ShardLayout) -> None:
    if cfg.num_experts % layout.ep_size:
        raise HFMappingError(f"ep_size={layout.ep_size} does not divide model.num_experts={cfg.num_experts}")


def hf_names(cfg: ModelConfig, layout: ShardLayout = ShardLayout()) -> list[str]:
    """Hub names of the HF tensors one rank's chunk is built from (the whole model with the default layout), so a
    converter reads only those. Tensors fused into one mimo tensor are listed next to each other."""
    cfg.validate()
    _check_divisible(cfg, layout)
    return [name for rule in _rules(cfg) if _holds(rule, layout, cfg) for name in rule.hf]


def hf_to_mimo(
    hf_tensors: TensorStream,
    cfg: ModelConfig,
    layout: ShardLayout = ShardLayout(),
    *,
    drop_extra_mtp_layers: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hub-named HF tensors -> the (name, tensor) pairs of one rank's mimo state dict.

    Tensors of other ranks (other pipeline stages or expert-parallel ranks) are read and skipped. Raises
    HFMappingError for an HF key the model has no place for, and at the end for any tensor of this rank that
    never arrived. ``drop_extra_mtp_layers`` skips MTP blocks beyond ``cfg.mtp_num_layers`` (the release has 3,
    pre-training uses 1).
    """
    cfg.validate()
    _check_divisible(cfg, layout)
    by_hf: dict[str, _Rule] = {}
    for rule in _rules(cfg):
        for name in rule.hf:
            by_hf[name] = rule
    pending: dict[str, dict[str, torch.Tensor]] = {}
    needed = {rule.mimo for rule in by_hf.values() if _holds(rule, layout, cfg)}
    for name, tensor in hf_tensors:
        rule = by_hf.get(name)
        if rule is None:
            _unknown_hf_key(name, cfg, drop_extra_mtp_layers)
            continue
        if rule.mimo not in needed:
            continue
        parts = pending.setdefault(rule.mimo, {})
        parts[name] = tensor
        if len(parts) == len(rule.hf):
            del pending[rule.mimo]
            needed.discard(rule.mimo)
            full = rule.merge([parts[hf_name] for hf_name in rule.hf])
            yield _local_name(rule, layout, cfg), _shard(rule, full, layout)
    if needed:
        missing = sorted(needed)
        raise HFMappingError(
            f"{len(missing)} mimo tensors never received all their HF parts, e.g. {missing[:3]}; the checkpoint does"
            " not match the model config (layer count, experts, MTP blocks?)"
        )


def _unknown_hf_key(name: str, cfg: ModelConfig, drop_extra_mtp_layers: bool) -> None:
    if name.endswith(QUANT_SCALE_SUFFIX):
        raise HFMappingError(f"{name}: FP8-quantised checkpoint; dequantise the weights to BF16/FP32 before converting")
    mtp = re.match(r"model\.mtp\.layers\.(\d+)\.", name)
    if mtp and int(mtp.group(1)) >= cfg.mtp_num_layers:
        if drop_extra_mtp_layers:
            return
        raise HFMappingError(
            f"{name}: the checkpoint has more MTP blocks than model.mtp_num_layers={cfg.mtp_num_layers}; raise"
            " model.mtp_num_layers or pass drop_extra_mtp_layers=True"
        )
    raise HFMappingError(
        f"{name}: no mimo tensor corresponds to this HF key; does the model config match the checkpoint?"
    )


def mimo_to_hf(mimo_tensors: TensorStream, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """A full (single-rank, unsharded) mimo state dict -> Hub-named HF tensors (MTP blocks included).

    megatron's ``_extra_state`` entries (FP8 metadata) carry no weights and are skipped.
    """
    cfg.validate()
    by_mimo = {rule.mimo: rule for rule in _rules(cfg)}
    for name, tensor in mimo_tensors:
        if name.endswith("_extra_state"):
            continue
        rule = by_mimo.get(name)
        if rule is None:
            raise HFMappingError(
                f"{name}: not a tensor of a full mimo model for this config (a sharded or pipeline-stage state"
                " dict? mimo_to_hf needs the unsharded model)"
            )
        yield from zip(rule.hf, rule.split(tensor))
