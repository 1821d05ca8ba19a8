"""profile.steps writes a torch profiler trace of those steps; a CUDA memory snapshot is refused on CPU."""

import json

import pytest
import torch

from mimo.recipes.errors import ConfigError
from mimo.train.config import ProfileConfig
from mimo.train.profiling import StepProfiler


@pytest.mark.system
def test_the_profiled_steps_leave_a_chrome_trace(observed_run):
    traces = sorted((observed_run.run_dir / "profile").iterdir())
    assert [path.name for path in traces] == ["rank0_steps2-3.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    assert any(name.startswith("aten::") for name in names), "no operator was recorded"
    assert any("Optimizer.step" in name for name in names), "the optimizer update is part of each traced step"


def test_a_memory_snapshot_on_cpu_is_refused_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"profile.memory_snapshot=true .* on CPU"):
        StepProfiler(ProfileConfig(steps=[1, 2], memory_snapshot=True), str(tmp_path), 0, torch.device("cpu"))


@pytest.mark.parametrize("steps", [[3], [4, 2], [0, 1]])
def test_profile_steps_must_be_a_first_last_pair(steps):
    with pytest.raises(ConfigError, match=r"profile.steps="):
        ProfileConfig(steps=steps).validate()


def test_a_run_ending_inside_the_profiled_steps_stops_the_profiler_and_keeps_its_trace(tmp_path):
    profiler = StepProfiler(ProfileConfig(steps=[1, 3]), str(tmp_path), 0, torch.device("cpu"))
    with profiler.step(1):
        torch.ones(4).sum()
    assert torch.autograd.profiler._is_profiler_enabled
    profiler.close(last_step=1)  # e.g. train.stop_after_steps=1
    assert not torch.autograd.profiler._is_profiler_enabled
    assert [path.name for path in (tmp_path / "profile").iterdir()] == ["rank0_steps1-1.trace.json"]
