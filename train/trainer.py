"""The training run: a ``Trainer`` owns its state (config, runtime, model chunks, optimizer, schedule, data,
metrics writer, checkpoints, train state); ``run()`` loops over ``step()`` until the stage or ``train.steps``
ends, logging and checkpointing on the way."""

import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.transformer import TransformerConfig
from tqdm import tqdm

from mimo.data import DataRank, build_data_iterators, build_tokenizer, check_vocab
from mimo.data.blend import check_blend_files
from mimo.data.config import DataConfig
from mimo.data.stages import stage_config
from mimo.model.accounting import flops_per_token, parameter_counts
from mimo.model.builder import PARAM_DTYPES, resolve_use_te, run_precision_plan
from mimo.model.config import ModelConfig
from mimo.model.precision import describe_precision_plan
from mimo.recipes.compose import to_container, to_yaml
from mimo.recipes.errors import ConfigError
from mimo.recipes.schema import MimoConfig
from mimo.train.build import (
    build_training_model,
    chunk_iterators,
    run_record,
    start_runtime,
    use_multi_tensor_adam,
)
from mimo.train.checkpoint.manager import CheckpointManager, latest_checkpoint, read_meta
from mimo.train.config import RUN_CONFIG_FILE
from mimo.train.expert_load import ExpertLoad
from mimo.train.fault import FaultStop
from mimo.train.fault.injection import FaultInjector
from mimo.train.fault.monitor import Action, FaultMonitor
from mimo.train.fault.rollback import Rollbacks
from mimo.train.fault.run_lock import lock_run_dir
from mimo.train.fault.spikes import Spike
from mimo.train.fault.watchdog import HangWatchdog
from mimo.train.metrics import DatasetTally, MetricsWriter, StepProgress
from mimo.train.preemption import StopRequest
from mimo.train.profiling import StepProfiler
from mimo.train.records import TrainState, describe_changes
from mimo.train.schedule import Schedule, ScheduledValues
from mimo.train.step import MicroBatching, StepHooks, StepResult, train_step
from mimo.train.throughput import Throughput, device_peak
from mimo.train.validation import Validator, check_validation

logger = logging.getLogger("mimo")

BYTES_PER_GIB = 1024**3
KIB = 1024


@dataclass
class RunSummary:
    """What a finished (or stopped) run reports back; tests compare these across layouts."""

    state: TrainState
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    stopped_by_signal: bool = False
    resumed_from: str | None = None


@dataclass(frozen=True)
class TrainedStep:
    result: StepResult
    values: ScheduledValues
    """The schedule's values the step trained with."""


def describe_model(model: ModelConfig, seq_length: int) -> str:
    params = parameter_counts(model)
    flops = flops_per_token(model, seq_length)
    return (
        f"model {model.name}: {params.total / 1e6:,.2f}M parameters ({params.mtp / 1e6:,.2f}M in MTP), "
        f"{params.active / 1e6:,.2f}M active per token (embedding and head included), "
        f"{flops.training / 1e6:,.2f} MFLOP per token per training step at sequence length {seq_length}"
    )


def apply_scheduled(
    values: ScheduledValues, optimizer: MegatronOptimizer, config: TransformerConfig, wd: float
) -> None:
    """Scheduled values reach the modules through the shared TransformerConfig, read at every forward."""
    for group in optimizer.param_groups:
        group["lr"] = values.lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)
    config.mtp_loss_scaling_factor = values.mtp_loss_weight
    config.moe_router_bias_update_rate = values.moe_router_bias_update_rate
    config.moe_aux_loss_coeff = values.moe_aux_loss_coeff


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / BYTES_PER_GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / BYTES_PER_GIB


def data_stream_signature(cfg: MimoConfig, data: DataConfig) -> str:
    """What defines the sequence of training samples; the same signature continues the same stream."""
    return json.dumps(
        {
            "blend": list(data.blend),
            "long_docs": asdict(data.long_docs),
            "tokenizer": data.tokenizer,
            "seq_length": cfg.train.seq_length,
            "seed": cfg.run.seed,
            "split": data.split,
        },
        sort_keys=True,
    )


def check_supported(cfg: MimoConfig) -> None:
    """Impossible training settings, and settings that are valid data-side but that the model cannot honour yet:
    refused, never silently ignored."""
    cfg.validate_training()
    if cfg.data.reset_attention_mask and cfg.parallel.cp > 1 and resolve_use_te(None):
        raise ConfigError(
            f"data.reset_attention_mask=true with parallel.cp={cfg.parallel.cp} on Transformer Engine: its"
            " context-parallel ring attention (global layers) takes packed documents only in its own per-document"
            " split, which mimo does not produce; set parallel.cp=1, or data.reset_attention_mask=false"
        )
    check_validation(cfg)


def check_resumable(cfg: MimoConfig, latest: Path | None) -> None:
    """What a resume from ``latest`` cannot honour, refused before the model is built."""
    if latest is None:
        return
    meta = read_meta(latest)
    saved = meta.layout.get("distributed_optimizer")
    if meta.has_optimizer and saved is not None and saved != cfg.parallel.distributed_optimizer:
        raise ConfigError(
            f"parallel.distributed_optimizer={str(cfg.parallel.distributed_optimizer).lower()}, but {latest} was"
            f" saved with parallel.distributed_optimizer={str(saved).lower()}: the two optimizers keep their state"
            f" in different forms; set parallel.distributed_optimizer={str(saved).lower()} to resume this run"
        )
    stop = cfg.train.stop_after_steps
    if stop is not None and stop <= meta.state.step:
        raise ConfigError(
            f"train.stop_after_steps={stop} is at or below step {meta.state.step}, where this run resumes from"
            f" {latest}: there is nothing to train; raise it above {meta.state.step} or remove it"
        )


class Trainer:
    """One training run. Construction sets everything up (process groups, model, optimizer, resume from the
    latest checkpoint, data); ``run()`` trains; ``close()`` (or leaving the ``with`` block) tears down."""

    def __init__(self, cfg: MimoConfig) -> None:
        check_supported(cfg)
        self.cfg = cfg
        self.runtime = start_runtime(cfg)
        self.stop = StopRequest().install()
        self.writer: MetricsWriter | None = None
        self.run_lock = self.checkpoints = self.watchdog = self.profiler = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        self.run_lock = lock_run_dir(cfg.run.dir, cfg.fault.lock_stale_minutes, runtime.is_main, runtime.device)
        check_resumable(cfg, latest_checkpoint(cfg.checkpoint.dir))
        if runtime.is_main:
            run_dir = Path(cfg.run.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_CONFIG_FILE).write_text(to_yaml(cfg))
            logger.info("resolved config (saved to %s):\n%s", run_dir / RUN_CONFIG_FILE, to_yaml(cfg))
            logger.info("%s", describe_model(cfg.model, cfg.train.seq_length))
            logger.info("%s", describe_precision_plan(run_precision_plan(cfg.precision)))
        check_vocab(build_tokenizer(cfg.data), cfg.model.vocab_size)
        self.samples_per_microbatch = cfg.train.micro_batch_size * runtime.layout.dp
        self.schedule = Schedule(
            cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model, batch_unit=self.samples_per_microbatch
        )
        self.data_cfg = stage_config(cfg.data, self.schedule.stage)
        check_blend_files(self.data_cfg)
        self.record = run_record(cfg, runtime, self.data_cfg)

        self.chunks, self.optimizer = build_training_model(cfg, seed=cfg.run.seed)
        self.model_config: TransformerConfig = self.chunks[0].config
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.model, runtime.device)
        self.state, self.resumed_from, losses = self._resume()
        self._build_data()
        self.writer = MetricsWriter(
            cfg.run.dir, cfg.logging, to_container(cfg), runtime.is_main, moe_layers=cfg.model.moe_layers()
        )
        self.progress = StepProgress(runtime.is_main, cfg.logging.progress_seconds)
        self._setup_observers()
        self._setup_fault_handling(losses)

    def _setup_observers(self) -> None:
        """What watches the run without changing it: validation, MoE load, throughput against the peak, profiler."""
        cfg, runtime = self.cfg, self.runtime
        self.expert_load = ExpertLoad(self.chunks, cfg.model, runtime.device)
        peak = device_peak(runtime.device, PARAM_DTYPES[cfg.precision.dtype])
        self.throughput = Throughput(cfg.model, cfg.train.seq_length, runtime.world_size, peak)
        self.profiler = StepProfiler(cfg.profile, cfg.run.dir, runtime.rank, runtime.device)

    def _setup_fault_handling(self, losses: list[tuple[int, float]]) -> None:
        """The numerical guard and spike policies (fed the resumed checkpoint's recent ``losses``), the test hook
        that injects faults, and the hang watchdog."""
        cfg, runtime = self.cfg, self.runtime
        self.faults = FaultMonitor(cfg.fault, runtime.is_main, losses)
        self.rollbacks = Rollbacks(self.checkpoints.root, cfg.fault.rollback_skip_batches)
        self.injector = FaultInjector.from_environment(runtime.rank, cfg.model.vocab_size)
        self.watchdog = HangWatchdog(cfg.fault, cfg.run.dir, runtime.rank, runtime.world_size)
        self.hooks = StepHooks(
            on_micro_batch=self.progress.micro_batch,
            approve=self.faults.approve,
            corrupt_batch=self.injector.corrupt_batch,
            corrupt_gradients=self.injector.corrupt_gradients,
        )

    def _resume(self) -> tuple[TrainState, str | None, list[tuple[int, float]]]:
        """The state to start from, the checkpoint it came from, and its recent losses (the spike detector's
        window; empty when the data stream changed)."""
        stage, stream = self.schedule.stage, data_stream_signature(self.cfg, self.data_cfg)
        path = self.checkpoints.latest()
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.checkpoints.root)
            return TrainState(stage=stage, data_stream=stream), None, []
        meta = read_meta(path)
        layout = self.record.layout
        layout_changes = describe_changes(meta.layout, layout.settings())
        state = self.checkpoints.load(path, self.chunks, self.optimizer, layout)
        logger.info(
            "resumed from %s (step %d, %d samples, %d tokens)%s",
            path,
            state.step,
            state.consumed_samples,
            state.consumed_tokens,
            "; layout changed: " + ", ".join(layout_changes) if layout_changes else "",
        )
        if state.stage != stage:
            changes = describe_changes(meta.run, self.record.settings(), separator=" ")
            logger.info("stage %r -> %r: %s", state.stage, stage, "; ".join(changes) or "same settings")
            state.stage = stage
        losses = meta.losses
        if state.data_stream != stream:
            logger.info(
                "the data changed (mixture or sequence length): a new sample stream starts at %d consumed samples",
                state.consumed_samples,
            )
            state.data_stream, state.data_start_samples, losses = stream, state.consumed_samples, []
        return state, str(path), losses

    def _build_data(self) -> None:
        """This rank's iterators from the current data position; the samples a run can still read (the position
        plus the remaining steps' batches) decide how many epochs are built, never the order."""
        cfg, state = self.cfg, self.state
        position = state.consumed_samples - state.data_start_samples
        data = build_data_iterators(
            self.data_cfg,
            run_dir=cfg.run.dir,
            seq_length=cfg.train.seq_length,
            seed=cfg.run.seed,
            train_samples=position + max(1, cfg.train.steps - state.step) * cfg.train.global_batch_size,
            consumed_samples=position,
            rank=DataRank(parallel_state.get_data_parallel_rank(), self.runtime.layout.dp, cfg.train.micro_batch_size),
        )
        self.tally = DatasetTally(data.train, data.dataset_names)
        self.iterators = chunk_iterators(self.tally, len(self.chunks))
        self.validator = Validator(cfg, self.chunks, data.valid, self.runtime.layout.dp)

    # ------------------------------------------------------------------------------------------------ training

    def step(self) -> TrainedStep:
        """One optimizer step at the schedule's values for the tokens consumed so far; advances the train state.
        A step the fault monitor refuses consumes its batch but changes neither the model nor the schedule."""
        cfg, state = self.cfg, self.state
        number = state.step + 1
        self.watchdog.arm_step(number)
        self.injector.begin_step(number)
        self.faults.begin(number)
        values = self.schedule.at(state.consumed_tokens)
        apply_scheduled(values, self.optimizer, self.model_config, cfg.optim.weight_decay)
        use_multi_tensor_adam(self.optimizer)
        batching = MicroBatching(
            values.global_batch_size // self.samples_per_microbatch, cfg.train.micro_batch_size, cfg.train.seq_length
        )
        self.progress.start(number, batching.num_microbatches * len(self.chunks))
        with self.profiler.step(number):
            result = train_step(self.chunks, self.optimizer, self.iterators, batching, self.runtime.device, self.hooks)
        state.step = number
        state.consumed_samples += values.global_batch_size
        if result.update_skipped:
            state.skipped_steps += 1
        else:
            state.consumed_tokens += values.global_batch_size * cfg.train.seq_length
        return TrainedStep(result, values)

    def run(self) -> RunSummary:
        cfg = self.cfg
        summary = RunSummary(self.state, resumed_from=self.resumed_from)
        interval_tokens, interval_start = 0, time.perf_counter()
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.state.step,
            disable=not (self.runtime.is_main and sys.stderr.isatty()),
            desc="training",
            unit="step",
            dynamic_ncols=True,
        )
        while self.state.step < cfg.train.steps and not self.schedule.finished(self.state.consumed_tokens):
            trained = self.step()
            state = self.state
            interval_tokens += trained.values.global_batch_size * cfg.train.seq_length
            summary.losses.append(trained.result.loss)
            summary.grad_norms.append(trained.result.grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{trained.result.loss:.3f}")
            stage_end = self.schedule.finished(state.consumed_tokens)
            elapsed = time.perf_counter() - interval_start  # validation time is not training time
            validation = self.validator.run(self.runtime.device) if self.validator.due(state.step, stage_end) else {}
            if validation or state.step % cfg.logging.interval == 0 or state.step in (1, cfg.train.steps):
                self._log(trained, interval_tokens / max(elapsed, 1e-9), validation)
                interval_tokens, interval_start = 0, time.perf_counter()
            self.checkpoints.poll()
            if self._handle_fault(trained):
                continue

            summary.stopped_by_signal = self.stop.agreed(self.runtime.device)
            paused = state.step == cfg.train.stop_after_steps
            periodic = state.step == cfg.train.steps or state.step % cfg.checkpoint.interval == 0
            if summary.stopped_by_signal or paused or stage_end or periodic:
                self.save(stage_end)
            if summary.stopped_by_signal or paused:
                reason = "signal" if summary.stopped_by_signal else "train.stop_after_steps"
                logger.warning("stopped at step %d (%s); rerun the same command to resume", state.step, reason)
                break
        bar.close()
        summary.state = self.state
        return summary

    def _handle_fault(self, trained: TrainedStep) -> bool:
        """Carry out the fault monitor's decision on the step just taken; True when the run rolled back."""
        decision = self.faults.decision
        if decision.action is Action.ROLLBACK:
            return self._roll_back(decision.spike, trained.values.global_batch_size)
        if decision.action is Action.STOP:
            path = self.save(stage_end=False)
            raise FaultStop(f"{decision.reason}. Saved {path}")
        return False

    def _roll_back(self, spike: Spike, global_batch_size: int) -> bool:
        """Reload the newest good checkpoint before ``spike`` and continue with the data after it; False when
        there is none (the spike's update was skipped all the same)."""
        self.checkpoints.wait()
        target = self.rollbacks.plan(spike)
        if target is None:
            logger.warning("no checkpoint before step %d to roll back to: its update was skipped", spike.step)
            return False
        path, meta = target
        self.watchdog.arm_checkpoint(spike.step, "rollback")
        position = self.rollbacks.data_position(self.state.consumed_samples, global_batch_size)
        skipped = self.state.skipped_steps
        self.state = self.checkpoints.load(path, self.chunks, self.optimizer, self.record.layout)
        self.state.consumed_samples, self.state.skipped_steps = position, skipped
        self.checkpoints.point_latest(path)
        self.faults.restart(meta.losses)
        self._build_data()
        logger.warning(
            "rolled back to %s (step %d) after the spike at step %d; the data continues at sample %d, skipping the"
            " batches from the checkpoint through the spike and %d more (fault.rollback_skip_batches)",
            path,
            self.state.step,
            spike.step,
            position,
            self.rollbacks.skip_batches,
        )
        return True

    def _log(self, trained: TrainedStep, tokens_per_s: float, validation: dict[str, float]) -> None:
        result, state = trained.result, self.state
        self.writer.log(
            state.step,
            {
                "tokens": state.consumed_tokens,
                "samples": state.consumed_samples,
                "loss": result.loss,
                "lm_loss": result.lm_loss,
                "mtp_loss": result.mtp_loss,
                "aux_loss": result.aux_loss,
                "grad_norm": result.grad_norm,
                "update_skipped": result.update_skipped,
                "skipped_steps": state.skipped_steps,
                **asdict(trained.values),
                "tokens_per_s": tokens_per_s,
                **self.throughput.of(tokens_per_s),
                "peak_memory_gib": peak_memory_gib(self.runtime.device),
                "samples_per_dataset": self.tally.take(parallel_state.get_data_parallel_group(), self.runtime.device),
                **self.expert_load.take(),
                **validation,
            },
        )

    def save(self, stage_end: bool) -> Path:
        """Checkpoint the current state; the last checkpoint of a stage is kept whatever checkpoint.keep says."""
        self.watchdog.arm_checkpoint(self.state.step, "checkpoint save")
        path = self.checkpoints.save(
            self.state, self.chunks, self.optimizer, self.record, permanent=stage_end, losses=self.faults.history()
        )
        logger.info(
            "%s checkpoint at step %d to %s%s",
            "writing" if self.cfg.checkpoint.async_save else "saved",
            self.state.step,
            self.checkpoints.root,
            f" (end of stage {self.state.stage!r}, kept)" if stage_end else "",
        )
        return path

    # -------------------------------------------------------------------------------------------------- teardown

    def close(self) -> None:
        from mimo.parallel.runtime import shutdown

        self.stop.uninstall()
        try:
            if self.profiler is not None:
                self.profiler.close(self.state.step)
            if self.checkpoints is not None:
                self.checkpoints.close()  # the end of the run waits for a background write
        finally:
            if self.watchdog is not None:
                self.watchdog.close()
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.run_lock is not None:
                self.run_lock.release()
                self.run_lock = None
            shutdown()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_training(cfg: MimoConfig) -> RunSummary:
    with Trainer(cfg) as trainer:
        return trainer.run()
