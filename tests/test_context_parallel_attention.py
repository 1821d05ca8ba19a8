"""Context-parallel core attention on 2 and 4 real gloo ranks against a dense FP64 reference of the whole sequence:
the halo exchange (sliding-window layers' default) and the all-gather, with windows inside one chunk, crossing
into the previous chunk, and spanning several chunks (chunks shorter than the window), with and without sinks;
global layers all-gather. Outputs and the gradients of queries, keys, values and sinks must match the unsplit
attention, and the bytes each rank sends must be the closed forms of the two exchanges."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mimo.model.attention import AttentionGeometry
from mimo.model.config import AttentionType, ModelConfig
from mimo.model.core_attention import SINK_SOFTMAX_TYPE, LocalCoreAttention
from mimo.model.specs import TE_CP_COMM_TYPE, BackendModules, core_attention_module, cp_comm_type
from mimo.parallel.config import ALLGATHER, HALO, ParallelConfig
from mimo.parallel.context_parallel import SENT_BYTES
from mimo.parallel.layout import LayoutError, validate_layout
from mimo.parallel.megatron_patches import apply_megatron_patches
from mimo.parallel.sequence_chunks import halo_pieces, halo_tokens_sent

BATCH, HEADS, GROUPS, QK_DIM, V_DIM, SCALE = 2, 4, 2, 12, 8, 0.3
FP64_BYTES = 8

CASES = {
    # (cp, seq, window): chunks of seq / (2 * cp) tokens
    2: [(2, 32, 5), (2, 32, 8), (2, 32, 20), (2, 32, None)],
    4: [(4, 64, 5), (4, 64, 8), (4, 64, 16), (4, 64, 30), (4, 64, None)],
}


def dense_reference(query, key, value, *, window, sink):
    """[s, b, heads, d] tensors; softmax over the full masked [s, s] matrix with the sink as one more column."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    k, v = k.repeat_interleave(HEADS // GROUPS, 1), v.repeat_interleave(HEADS // GROUPS, 1)
    scores = q @ k.transpose(-1, -2) * SCALE
    row, col = torch.arange(q.shape[2]).unsqueeze(1), torch.arange(q.shape[2]).unsqueeze(0)
    visible = (col <= row) if window is None else (col <= row) & (col >= row - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = scores.softmax(-1)
    if sink is not None:
        probs = probs[..., :-1]
    return (probs @ v).permute(2, 0, 1, 3)


def whole_sequence(seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "query": draw(seq, BATCH, HEADS, QK_DIM),
        "key": draw(seq, BATCH, GROUPS, QK_DIM),
        "value": draw(seq, BATCH, GROUPS, V_DIM),
        "grad": draw(seq, BATCH, HEADS, V_DIM),
        "sink": draw(HEADS) * 2,
    }


def rank_rows(seq: int, cp: int, rank: int) -> torch.Tensor:
    """The positions context-parallel rank ``rank`` holds: chunks rank and 2 * cp - 1 - rank (megatron's split)."""
    chunk = seq // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)])


def core_attention(window: int | None, sink: bool, exchange: str, groups: ProcessGroupCollection):
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * QK_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=QK_DIM,
        window_size=None if window is None else (window, 0),
        softmax_type=SINK_SOFTMAX_TYPE if sink else "vanilla",
        params_dtype=torch.float64,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )
    return LocalCoreAttention(
        config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        softmax_scale=SCALE,
        cp_comm_type=exchange if window is not None else None,
        pg_collection=groups,
    )


def run_case(cp: int, seq: int, window: int | None, sink: bool, exchange: str, groups) -> dict:
    """This rank's output rows, their input gradients, its share of the sink gradient, and the bytes it sent."""
    rank = dist.get_rank()
    data = whole_sequence(seq, seed=seq + (window or 0))
    rows = rank_rows(seq, cp, rank)
    local = {name: data[name][rows].clone().requires_grad_() for name in ("query", "key", "value")}
    module = core_attention(window, sink, exchange, groups)
    if sink:
        module.softmax_offset.data.copy_(data["sink"])
    before = SENT_BYTES.copy()
    out = module(local["query"], local["key"], local["value"], None)
    out.backward(data["grad"][rows].reshape(out.shape))
    sent = SENT_BYTES - before
    return {
        "out": out.detach().view(len(rows), BATCH, HEADS, V_DIM),
        **{f"grad_{name}": tensor.grad for name, tensor in local.items()},
        "grad_sink": module.softmax_offset.grad if sink else None,
        "sent": dict(sent),
    }


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # megatron's all-gather allocates on "the current CUDA device"
    apply_megatron_patches(cuda=False, transformer_engine=False, fused_adam=False)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        singles = [dist.new_group([r]) for r in range(world)]
        groups = ProcessGroupCollection()
        groups.tp, groups.cp = singles[rank], dist.group.WORLD
        results = {}
        for cp, seq, window in CASES[world]:
            exchanges = (HALO, ALLGATHER) if window is not None else (ALLGATHER,)
            for exchange in exchanges:
                for sink in (False, True):
                    results[cp, seq, window, sink, exchange] = run_case(cp, seq, window, sink, exchange, groups)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(CASES))
def ranks(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(_worker, args=(world, str(out_dir / "store"), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assemble(results: list[dict], name: str, seq: int, cp: int) -> torch.Tensor:
    whole = torch.empty(seq, *results[0][name].shape[1:], dtype=torch.float64)
    for rank, result in enumerate(results):
        whole[rank_rows(seq, cp, rank)] = result[name]
    return whole


@pytest.mark.system
def test_outputs_and_gradients_equal_the_unsplit_attention(ranks):
    world, results = ranks
    for key in results[0]:
        cp, seq, window, sink, exchange = key
        data = whole_sequence(seq, seed=seq + (window or 0))
        inputs = {name: data[name].clone().requires_grad_() for name in ("query", "key", "value", "sink")}
        expected = dense_reference(
            inputs["query"], inputs["key"], inputs["value"], window=window, sink=inputs["sink"] if sink else None
        )
        expected.backward(data["grad"])
        per_rank = [result[key] for result in results]
        assert torch.allclose(assemble(per_rank, "out", seq, cp), expected.detach(), atol=1e-12, rtol=0), key
        for name in ("query", "key", "value"):
            actual = assemble(per_rank, f"grad_{name}", seq, cp)
            assert torch.allclose(actual, inputs[name].grad, atol=1e-10, rtol=0), (key, name)
        if sink:
            total = sum(result["grad_sink"] for result in per_rank)
            assert torch.allclose(total, inputs["sink"].grad, atol=1e-10, rtol=0), key


def closed_form_halo_tokens(cp: int, rank: int, chunk: int, window: int) -> int:
    """Tokens rank ``rank`` sends per direction, closed form (window <= chunk): the last ``window`` tokens of each of
    its chunks whose successor lives on another rank. Rank r holds chunks r and 2cp-1-r: chunk r's successor is
    on rank r + 1 except for r = cp - 1 (it holds chunk cp itself); chunk 2cp-1-r's successor 2cp-r is on rank
    r - 1, and rank 0's second chunk is the last."""
    successors_elsewhere = (rank < cp - 1) + (rank > 0)
    return successors_elsewhere * window


@pytest.mark.system
def test_each_rank_sends_what_the_closed_forms_say(ranks):
    world, results = ranks
    for key in results[0]:
        cp, seq, window, sink, exchange = key
        chunk = seq // (2 * cp)
        token_bytes = BATCH * GROUPS * (QK_DIM + V_DIM) * FP64_BYTES
        for rank, result in enumerate(results):
            sent = result[key]["sent"]
            if exchange == ALLGATHER:
                # keys and values each: this rank's 2 * chunk tokens to the cp - 1 others, and so its gradients
                expected = (cp - 1) * 2 * chunk * token_bytes
                assert sent == {(ALLGATHER, "forward"): expected, (ALLGATHER, "backward"): expected}, (key, rank)
                continue
            if window <= chunk:
                expected = closed_form_halo_tokens(cp, rank, chunk, window) * token_bytes
                assert sent == {(HALO, "forward"): expected, (HALO, "backward"): expected}, (key, rank)
            else:  # the halo reaches over several chunks: at most the tokens before each chunk, far fewer than seq
                assert sent[HALO, "forward"] == sent[HALO, "backward"] <= 2 * window * token_bytes, (key, rank)
            # what the planner counts (halo_tokens_sent) is what the exchange sent, windows over several chunks too
            for step in ("forward", "backward"):
                tokens = halo_tokens_sent(cp, chunk, window, rank, backward=step == "backward")
                assert sent[HALO, step] == tokens * token_bytes, (key, rank, step)


@pytest.mark.parametrize("cp, chunk, window", [(2, 8, 5), (2, 8, 20), (4, 8, 16), (4, 8, 30), (8, 3, 128)])
def test_halo_pieces_cover_exactly_the_window_before_each_chunk(cp, chunk, window):
    pieces = halo_pieces(cp, chunk, window)
    for target in range(2 * cp):
        start = target * chunk
        covered = [
            position
            for piece in pieces
            if piece.target == target
            for position in range((piece.source + 1) * chunk - piece.length, (piece.source + 1) * chunk)
        ]
        assert covered == list(range(max(0, start - window), start)), target
    assert all(0 < piece.length <= chunk for piece in pieces)
    assert len(pieces) == sum(math.ceil(min(window, j * chunk) / chunk) for j in range(1, 2 * cp))


def test_sliding_window_layers_use_the_halo_under_cp_and_global_layers_keep_the_backends_attention():
    class BackendAttention:  # stands in for TEDotProductAttention, which needs a GPU
        pass

    backend = BackendModules(provider=LocalSpecProvider(), norm=torch.nn.Identity, core_attention=BackendAttention)
    cfg = ModelConfig(add_swa_attention_sink_bias=False)  # a window alone is enough
    sliding, full = (AttentionGeometry.for_layer(cfg, kind) for kind in (AttentionType.SLIDING, AttentionType.GLOBAL))
    assert core_attention_module(backend, sliding, context_parallel=True) is LocalCoreAttention
    assert core_attention_module(backend, full, context_parallel=True) is BackendAttention
    assert cp_comm_type(LocalCoreAttention, sliding, HALO) == HALO
    assert cp_comm_type(LocalCoreAttention, sliding, ALLGATHER) == ALLGATHER
    assert cp_comm_type(LocalCoreAttention, full, HALO) == ALLGATHER
    assert cp_comm_type(BackendAttention, full, HALO) == TE_CP_COMM_TYPE


def test_an_unknown_window_exchange_is_refused():
    with pytest.raises(LayoutError, match="parallel.cp_window_exchange='ring' is not one of halo, allgather"):
        validate_layout(
            ParallelConfig(cp=2, cp_window_exchange="ring"),
            ModelConfig(),
            2,
            global_batch_size=2,
            micro_batch_size=1,
            seq_length=128,
        )


@pytest.mark.parametrize("cp, chunk, window", [(2, 8, 5), (2, 8, 8), (4, 8, 3), (8, 16384, 128)])
def test_the_planners_halo_count_is_the_closed_form(cp, chunk, window):
    for rank in range(cp):
        expected = closed_form_halo_tokens(cp, rank, chunk, window)
        assert halo_tokens_sent(cp, chunk, window, rank) == expected == halo_tokens_sent(cp, chunk, window, rank, True)
