"""``mimo-plan``: what a recipe needs on a cluster before a single GPU is spent on it.

Per GPU memory by part and pipeline stage, FLOPs per token, tokens/s and days per training stage at a stated
MFU, and the communication volume of one step; a layout that does not fit is refused with the amount it is over
by and the changes that would make it fit. Everything is closed-form arithmetic on the config (no torch), so the
numbers can be checked by hand and compared with a measured run.

Modules: ``settings`` (GPUs, byte sizes, the planner's own settings), ``parameters``, ``activations``, ``memory``,
``communication``, ``timing``, ``planning`` (the plan and the changes that make a layout fit), ``report`` and
``cli``. The memory model is described in ``memory``.
"""
