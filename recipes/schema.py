"""The top-level config schema: one field per concern, each a plain dataclass from that concern's config module."""

from dataclasses import dataclass, field

from mimo.data.config import DataConfig
from mimo.model.config import ModelConfig, PrecisionConfig
from mimo.parallel.config import ParallelConfig
from mimo.train.config import (
    CheckpointConfig,
    EvalConfig,
    FaultConfig,
    LoggingConfig,
    OptimConfig,
    ProfileConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)


@dataclass
class MimoConfig:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def validate_training(self) -> None:
        """Refuse impossible training, optimizer, checkpoint, fault, validation and profiling settings, naming
        the key."""
        for section in (self.train, self.optim, self.checkpoint, self.fault, self.eval, self.profile):
            section.validate()
