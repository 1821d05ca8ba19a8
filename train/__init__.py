"""The training run (``trainer``: the Trainer; ``step``, ``schedule``, ``checkpoint``, ``metrics``, ``preemption``)
and, in ``tools``, the commands built on it (planning, conversion, evaluation, layout comparison)."""
