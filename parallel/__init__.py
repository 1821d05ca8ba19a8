"""Parallel layout, the distributed runtime, context-parallel helpers and mimo's patches to megatron-core.

``config`` and ``layout`` are pure Python (the planner and the command-line checks use them without torch);
``runtime``, ``context_parallel`` and ``megatron_patches`` pull in torch.distributed and megatron-core. Nothing is
imported here: import the module you need.
"""
