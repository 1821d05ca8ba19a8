"""Bytes each GPU sends per optimizer step over each kind of group, and the time that takes at link speed."""

from dataclasses import dataclass

from mimo.model.config import AttentionType
from mimo.parallel.config import HALO
from mimo.parallel.layout import ResolvedLayout
from mimo.parallel.sequence_chunks import halo_tokens_sent
from mimo.recipes.schema import MimoConfig
from mimo.train.tools.plan.activations import recompute_of, selective
from mimo.train.tools.plan.parameters import stage_params
from mimo.train.tools.plan.settings import BYTES, FP32, GpuSpec


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends per optimizer step over one kind of group (on the busiest stage), and the time that
    takes at the link bandwidth without any overlap with compute."""

    kind: str
    group_size: int
    bytes: int
    between_nodes: float
    """Share of the bytes that leave the node."""
    seconds: float


def context_parallel_bytes(cfg: MimoConfig, kind: AttentionType, layout: ResolvedLayout, forwards: int) -> float:
    """Bytes the busiest rank sends for one layer's attention under context parallelism, over a step's passes of
    one micro-batch.

    Sliding-window layers with the halo exchange (``parallel.cp_window_exchange``, mimo's core attention on either
    backend): the ``window`` tokens' keys and values after each of its chunks whose successor is on another rank,
    in each forward, and their gradients back in the backward (``halo_tokens_sent``, what the exchange sends).
    Otherwise the keys and values of every other rank's tokens come in (Transformer Engine's ring on global
    layers, mimo's all-gather) in each forward, and in the backward again (ring) or their gradients go back
    (reduce-scatter), plus the key/value gradients of the ring: counted as two passes."""
    model, train = cfg.model, cfg.train
    token_bytes = model.num_kv_heads(kind) / layout.tp * (model.head_dim + model.v_head_dim)
    token_bytes *= BYTES[cfg.precision.dtype]
    window = model.window(kind)
    if window is not None and cfg.parallel.cp_window_exchange == HALO:
        chunk = train.seq_length // (2 * layout.cp)
        tokens = max(
            forwards * halo_tokens_sent(layout.cp, chunk, window, rank)
            + halo_tokens_sent(layout.cp, chunk, window, rank, backward=True)
            for rank in range(layout.cp)
        )
        return train.micro_batch_size * tokens * token_bytes
    own_tokens = train.micro_batch_size * train.seq_length / layout.cp  # sent to each of the cp - 1 others
    return own_tokens * (layout.cp - 1) * token_bytes * (forwards + 2)


def communication(cfg: MimoConfig, layout: ResolvedLayout, gpu: GpuSpec) -> tuple[Traffic, ...]:
    model, recompute = cfg.model, recompute_of(cfg)
    act_bytes = BYTES[cfg.precision.dtype]
    local_tokens = cfg.train.micro_batch_size * cfg.train.seq_length / layout.cp
    local_tokens /= layout.tp if layout.sequence_parallel else 1
    full_tokens = cfg.train.micro_batch_size * cfg.train.seq_length / layout.cp
    hidden = model.hidden_size * act_bytes
    m = layout.num_microbatches
    forwards = 2 if recompute.granularity == "full" else 1
    per_rank = [layout.rank_layers(rank) for rank in range(layout.pp)]
    moe_layers = max(sum(model.is_moe(layer) for layer in layers) for layers in per_rank)
    dense_layers = max(sum(not model.is_moe(layer) for layer in layers) for layers in per_rank)
    layers = max(len(layers) for layers in per_rank)
    traffic = []

    def add(kind: str, group: int, volume: float, between_nodes: float) -> None:
        if group > 1 and volume > 0:
            seconds = volume * (1 - between_nodes) / (gpu.nvlink_gb_s * 1e9) + volume * between_nodes / (
                gpu.network_gb_s * 1e9
            )
            traffic.append(Traffic(kind, group, round(volume), between_nodes, seconds))

    ep_forwards = forwards + (1 if selective(recompute, "moe") else 0)
    ep_passes = 2 * (ep_forwards + 1)  # dispatch + combine, in each forward and the backward
    dispatched = local_tokens * model.moe_router_topk * hidden * (layout.ep - 1) / layout.ep
    same_node = min(layout.ep, max(1, gpu.gpus_per_node // layout.etp))
    ep_between = (layout.ep - same_node) / (layout.ep - 1) if layout.ep > 1 else 0.0
    add("EP all-to-all", layout.ep, ep_passes * moe_layers * m * dispatched, ep_between)

    kinds = model.layer_types()
    attention_kinds = [[kinds[layer] for layer in layers] for layers in per_rank]
    attention_kinds[-1] += [AttentionType.SLIDING] * model.mtp_num_layers  # the MTP blocks' attention
    cp_volume = max(
        sum(context_parallel_bytes(cfg, kind, layout, forwards) for kind in stage) for stage in attention_kinds
    )
    cp_same_node = min(layout.cp, max(1, gpu.gpus_per_node // layout.tp))  # megatron puts cp right after tp
    cp_between = (layout.cp - cp_same_node) / (layout.cp - 1) if layout.cp > 1 else 0.0
    add("CP attention exchange", layout.cp, m * cp_volume, cp_between)

    tp_collectives = 2 * (forwards + 1) * (layers + dense_layers)  # all-gather + reduce-scatter per block
    add(
        "TP all-gather/reduce-scatter",
        layout.tp,
        tp_collectives * m * full_tokens * hidden * (layout.tp - 1) / layout.tp,
        0.0,
    )

    params = stage_params(model, layout, max(range(layout.pp), key=lambda r: len(per_rank[r])))
    dense = params.tensor_parallel / layout.tp + params.replicated
    experts = params.experts / (layout.ep * layout.etp)
    per_param = FP32 + act_bytes if cfg.parallel.distributed_optimizer else 2 * FP32
    dense_group, expert_group = layout.dp * layout.cp, layout.expert_dp
    dp_volume = dense * per_param * (dense_group - 1) / max(dense_group, 1)
    dp_volume += experts * per_param * (expert_group - 1) / max(expert_group, 1)
    dp_between = 1.0 if layout.world_size > gpu.gpus_per_node else 0.0
    add("DP gradients and parameters", max(dense_group, expert_group), dp_volume, dp_between)

    pp_between = 1.0 if layout.world_size // layout.pp >= gpu.gpus_per_node else 0.0
    add("PP activations", layout.pp, 2 * m * (layout.vpp or 1) * local_tokens * hidden, pp_between)
    return tuple(traffic)
