"""A run moves to another parallel layout by rerunning it with other parallel.* on the same run.dir, and carries
on exactly as if it had never stopped.

Each pair trains the tiny MiMo (MTP on, FP32) for 2 steps under one layout (``train.stop_after_steps=2``, which
saves a checkpoint), then resumes the same run directory under another layout for step 3: TP2 x EP2 -> PP2 x DP2
on 4 ranks, DP2 (distributed optimizer) -> one rank, EP2 -> TP2, CP2 (optimizer state sharded over the two
context-parallel ranks) -> EP2, and PP2 x VPP2 -> EP2 with the allgather dispatcher. Against one uninterrupted
single-rank run of the 3 steps: the resumed run says it resumed and what
changed; the losses and gradient norms of all 3 steps match (steps 1-2 under the first layout, step 3 under the
second); and every tensor of the checkpoints at step 2 and step 3 (weights, expert biases, Adam moments in the
fully reshardable format) matches. Step 3 is the first step whose loss sees a real update, and its Adam update
uses the moments the first layout saved, so a moment or weight loaded into the wrong place shows up in both.

Tolerance 1e-5 relative, for the reasons given in tests/test_layouts.py: FP32 runs that differ only in the order
of sums agree to about 1e-7 in the metrics and 1e-6 in the tensors; loading a checkpoint adds no rounding.
"""

from dataclasses import dataclass

import pytest

from layout_runs import Run, run_group, run_single, tensor_differences, worst_metric_difference

pytestmark = pytest.mark.system

TOLERANCE = 1e-5
STEPS = ("train.steps=3", "checkpoint.interval=2")
FIRST_PART = ("train.stop_after_steps=2",)


@dataclass(frozen=True)
class Move:
    name: str
    ranks_before: int
    before: list[str]
    ranks_after: int
    after: list[str]
    changes: list[str]
    """What the resume log must report as changed."""


MOVES = [
    Move(
        "tp2-ep2-to-pp2-dp2",
        4,
        ["parallel.tp=2", "parallel.ep=2"],
        4,
        ["parallel.pp=2"],
        ["tp: 2 -> 1", "pp: 1 -> 2", "ep: 2 -> 1"],
    ),
    Move("dp2-to-one-rank", 2, ["parallel.distributed_optimizer=true"], 1, [], ["world_size: 2 -> 1", "dp: 2 -> 1"]),
    Move("ep2-to-tp2", 2, ["parallel.ep=2"], 2, ["parallel.tp=2"], ["tp: 1 -> 2", "ep: 2 -> 1", "dp: 2 -> 1"]),
    Move("cp2-to-ep2", 2, ["parallel.cp=2"], 2, ["parallel.ep=2"], ["ep: 1 -> 2", "cp: 2 -> 1", "dp: 1 -> 2"]),
    Move(
        "pp2-vpp2-to-ep2-allgather",
        2,
        ["parallel.pp=2", "parallel.vpp=2"],
        2,
        ["parallel.ep=2", "model.moe_token_dispatcher=allgather"],
        ["pp: 2 -> 1", "vpp: 2 -> None", "ep: 1 -> 2", "dp: 1 -> 2"],
    ),
]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache) -> Run:
    return run_single(Run(tmp_path_factory.mktemp("single"), STEPS), data_cache)


@pytest.fixture(scope="module")
def moved(tmp_path_factory, data_cache, single) -> dict:
    """Per move, the resumed run (its directory also holds the first part's metrics and checkpoint).

    Runs are grouped by world size so each group of ranks starts once: the 2-rank group runs every 2-rank first
    part and then the 2-rank resumes, the one-rank resume follows, then the 4-rank group."""
    dirs = {move.name: tmp_path_factory.mktemp(move.name) for move in MOVES}
    first = {move.name: Run(dirs[move.name], [*move.before, *STEPS, *FIRST_PART]) for move in MOVES}
    second = {move.name: Run(dirs[move.name], [*move.after, *STEPS]) for move in MOVES}
    for nproc in (2, 1, 4):
        runs = [first[m.name] for m in MOVES if m.ranks_before == nproc]
        runs += [second[m.name] for m in MOVES if m.ranks_after == nproc]
        if nproc == 1:
            for run in runs:
                run_single(run, data_cache)
        elif runs:
            run_group(nproc, runs, data_cache)
    return second


@pytest.mark.parametrize("move", MOVES, ids=lambda move: move.name)
def test_resume_reports_the_layout_change(move, moved):
    log = "\n".join(moved[move.name].log)
    assert f"resumed from {moved[move.name].run_dir / 'checkpoints' / 'step_0000002'}" in log
    assert "layout changed: " in log
    for change in move.changes:
        assert change in log


@pytest.mark.parametrize("move", MOVES, ids=lambda move: move.name)
def test_resumed_run_matches_the_uninterrupted_one(move, moved, single):
    records = moved[move.name].metrics()
    assert [r["step"] for r in records] == [1, 2, 3]
    worst = worst_metric_difference(single.metrics(), records)
    assert max(worst.values()) <= TOLERANCE, worst
    for step in (2, 3):
        differences = tensor_differences(single.checkpoint(step), moved[move.name].checkpoint(step))
        assert max(differences.values()) <= TOLERANCE, (step, sorted(differences.items(), key=lambda d: -d[1])[:5])
