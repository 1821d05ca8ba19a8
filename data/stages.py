"""Per-stage data mixtures: a recipe lists them in data.stages, the schedule says which stage is on."""

import dataclasses

from mimo.data.config import DataConfig
from mimo.data.errors import DataError


def stage_config(cfg: DataConfig, name: str) -> DataConfig:
    """The DataConfig for stage ``name``: its blend and long-document setting over the top-level ones.

    A config without stages serves every stage with its top-level mixture. ``cfg`` must be a
    DataConfig object (``OmegaConf.to_object`` of the Hydra node), not a DictConfig.
    """
    if not cfg.stages:
        return cfg
    stages = {stage.name: stage for stage in cfg.stages}
    if name not in stages:
        raise DataError(
            f"data.stages has no stage named {name!r} (it has {sorted(stages)}); "
            f"add one or rename it to match schedule.stages"
        )
    stage = stages[name]
    return dataclasses.replace(
        cfg,
        blend=list(stage.blend) or list(cfg.blend),
        long_docs=stage.long_docs if stage.long_docs is not None else cfg.long_docs,
        stages=[],
    )
