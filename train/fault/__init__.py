"""What keeps a months-long run alive through faults.

``guard`` (a step with a non-finite loss or gradient changes nothing), ``spikes`` (loss-spike detection and the
log / skip / rollback / stop policies, decided alike on every rank by ``monitor``), ``rollback`` (which checkpoint
a rollback returns to), ``watchdog`` (a hung step dumps every rank's stacks and ends the job), ``run_lock`` (one
job per run directory) and ``injection`` (the testing hook that injects real faults into a run).
"""

from mimo.recipes.errors import MimoError


class FaultStop(MimoError, RuntimeError):
    """The run stopped itself to protect its checkpoints (diverged, or a spike under spike_policy=stop)."""


class RunDirBusy(MimoError, RuntimeError):
    """Another job holds the run directory."""
