"""The training run: recipe -> parallel runtime -> model -> data -> steps -> checkpoints and logs."""

import itertools
import json
import logging
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig
from omegaconf import OmegaConf
from tqdm import tqdm

from mimo.data import build_data_iterators, build_tokenizer, check_vocab
from mimo.data.config import DataConfig
from mimo.data.stages import stage_config
from mimo.model.accounting import flops_per_token, parameter_counts
from mimo.model.builder import build_model
from mimo.model.config import ModelConfig
from mimo.parallel.runtime import Runtime, initialize, shutdown
from mimo.recipes import ConfigError, MimoConfig, to_yaml
from mimo.train.checkpoint import (
    TrainState,
    describe_changes,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from mimo.train.metrics import DatasetTally, MetricsWriter, StepProgress
from mimo.train.preemption import StopRequest
from mimo.train.schedule import Schedule, ScheduledValues
from mimo.train.step import StepResult, train_step

logger = logging.getLogger("mimo")

BYTES_PER_GIB = 1024**3
KIB = 1024


@dataclass
class RunSummary:
    """What a finished (or stopped) run reports back; tests compare these across layouts."""

    state: TrainState
    losses: list[float]
    grad_norms: list[float]
    stopped_by_signal: bool
    resumed_from: str | None


def describe_model(model: ModelConfig, seq_length: int) -> str:
    params = parameter_counts(model)
    flops = flops_per_token(model, seq_length)
    return (
        f"model {model.name}: {params.total / 1e6:,.2f}M parameters ({params.mtp / 1e6:,.2f}M in MTP), "
        f"{params.active / 1e6:,.2f}M active per token (embedding and head included), "
        f"{flops.training / 1e6:,.2f} MFLOP per token per training step at sequence length {seq_length}"
    )


def setup_logging(is_main: bool) -> None:
    """mimo's own lines on the main rank only; megatron-core's INFO chatter (bucket listings, dataset index
    building) is kept to warnings so the per-step lines stay readable."""
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="[mimo %(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("mimo").setLevel(level)


def layout_record(cfg: MimoConfig, runtime: Runtime) -> dict:
    """The layout a checkpoint is saved under, compared on resume to say what changed."""
    return {
        "world_size": runtime.world_size,
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "vpp": cfg.parallel.vpp,
        "ep": cfg.parallel.ep,
        "etp": cfg.parallel.etp,
        "cp": cfg.parallel.cp,
        "dp": runtime.layout.dp,
        "micro_batch_size": cfg.train.micro_batch_size,
        "distributed_optimizer": cfg.parallel.distributed_optimizer,
    }


def wrap_ddp(chunks: Sequence[torch.nn.Module], config: TransformerConfig, distributed_optimizer: bool):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg: MimoConfig, chunks, distributed_optimizer: bool) -> MegatronOptimizer:
    optim = cfg.optim
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=cfg.precision.dtype == "bf16",
            params_dtype=torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32,
            use_distributed_optimizer=distributed_optimizer,
        ),
        list(chunks),
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


def chunk_iterators(iterator: Iterator, num_chunks: int) -> list[Iterator]:
    """Each virtual pipeline stage pulls every micro-batch once, so each gets its own view of one stream."""
    return [iterator] if num_chunks == 1 else list(itertools.tee(iterator, num_chunks))


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


def _resume(
    cfg: MimoConfig, chunks, optimizer, layout: dict, stage: str, stream: str, record: dict
) -> tuple[TrainState, str | None]:
    path = latest_checkpoint(cfg.checkpoint.dir)
    if path is None:
        logger.info("no checkpoint in %s: starting from scratch", cfg.checkpoint.dir)
        return TrainState(stage=stage, data_stream=stream), None
    meta = read_meta(path)
    layout_changes = describe_changes(meta.get("layout", {}), layout)
    state = load_checkpoint(path, chunks, optimizer, cfg.model, layout)
    logger.info(
        "resumed from %s (step %d, %d samples, %d tokens)%s",
        path,
        state.step,
        state.consumed_samples,
        state.consumed_tokens,
        "; layout changed: " + ", ".join(layout_changes) if layout_changes else "",
    )
    if state.stage != stage:
        logger.info(
            "stage %r -> %r: %s",
            state.stage,
            stage,
            "; ".join(describe_changes(meta.get("run", {}), record, separator=" ")) or "same settings",
        )
        state.stage = stage
    if state.data_stream != stream:
        logger.info(
            "the data changed (mixture or sequence length): a new sample stream starts at %d consumed samples",
            state.consumed_samples,
        )
        state.data_stream, state.data_start_samples = stream, state.consumed_samples
    return state, str(path)


def run_record(cfg: MimoConfig, data: DataConfig, layout: dict) -> dict:
    """Settings a stage transition may change, stored with each checkpoint so the next stage can say what did."""
    return {
        "train.seq_length": cfg.train.seq_length,
        "train.global_batch_size": cfg.train.global_batch_size,
        "model.rope_theta": cfg.model.rope_theta,
        "model.swa_rope_theta": cfg.model.swa_rope_theta,
        "data.blend": list(data.blend),
        "data.long_docs": asdict(data.long_docs),
        **{f"parallel.{key}": value for key, value in layout.items()},
    }


def start_runtime(cfg: MimoConfig) -> Runtime:
    """Process groups, seeds and (without CUDA) the CPU layer for the layout a recipe asks for."""
    return initialize(
        cfg.parallel,
        cfg.model,
        seed=cfg.run.seed,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.train.seq_length,
    )


def check_supported(cfg: MimoConfig) -> None:
    """Settings that are valid data-side but that the model cannot honour yet: refused, never silently ignored."""
    if cfg.data.reset_attention_mask:
        raise ConfigError(
            "data.reset_attention_mask=true: MiMo attention does not mask across packed documents yet; set it to "
            "false (data.reset_position_ids=true still restarts RoPE positions at each document)"
        )


def run_training(cfg: MimoConfig) -> RunSummary:
    check_supported(cfg)
    runtime = start_runtime(cfg)
    writer = None
    stop = StopRequest().install()
    try:
        setup_logging(runtime.is_main)
        run_dir = Path(cfg.run.dir)
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            logger.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", to_yaml(cfg))
            logger.info("%s", describe_model(cfg.model, cfg.train.seq_length))
        tokenizer = build_tokenizer(cfg.data)
        check_vocab(tokenizer, cfg.model.vocab_size)

        chunks = build_model(cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, seed=cfg.run.seed)
        config: TransformerConfig = chunks[0].config
        chunks = wrap_ddp(chunks, config, cfg.parallel.distributed_optimizer)
        optimizer = build_optimizer(cfg, chunks, cfg.parallel.distributed_optimizer)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync

        samples_per_microbatch = cfg.train.micro_batch_size * runtime.layout.dp
        schedule = Schedule(
            cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model, batch_unit=samples_per_microbatch
        )
        data_cfg = stage_config(cfg.data, schedule.stage)
        layout = layout_record(cfg, runtime)
        record = run_record(cfg, data_cfg, layout)
        state, resumed_from = _resume(
            cfg, chunks, optimizer, layout, schedule.stage, data_stream_signature(cfg, data_cfg), record
        )
        data = build_data_iterators(
            data_cfg,
            run_dir=cfg.run.dir,
            seq_length=cfg.train.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            train_samples=cfg.train.steps * cfg.train.global_batch_size,
            consumed_samples=state.consumed_samples - state.data_start_samples,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=runtime.layout.dp,
            seed=cfg.run.seed,
        )
        tally = DatasetTally(data.train, data.dataset_names)
        iterators = chunk_iterators(tally, len(chunks))
        writer = MetricsWriter(
            cfg.run.dir, cfg.logging, OmegaConf.to_container(OmegaConf.structured(cfg)), runtime.is_main
        )
        return _loop(
            cfg,
            runtime,
            chunks,
            optimizer,
            config,
            iterators,
            tally,
            schedule,
            state,
            writer,
            stop,
            layout,
            record,
            resumed_from,
        )
    finally:
        stop.uninstall()
        if writer is not None:
            writer.close()
        shutdown()


def _loop(
    cfg,
    runtime,
    chunks,
    optimizer,
    config,
    iterators,
    tally,
    schedule,
    state,
    writer,
    stop,
    layout,
    record,
    resumed_from,
):
    losses: list[float] = []
    grad_norms: list[float] = []
    samples_per_microbatch = cfg.train.micro_batch_size * runtime.layout.dp
    interval_tokens, interval_start = 0, time.perf_counter()
    bar = tqdm(
        total=cfg.train.steps,
        initial=state.step,
        disable=not (runtime.is_main and sys.stderr.isatty()),
        desc="training",
        unit="step",
        dynamic_ncols=True,
    )
    stopped = False
    progress = StepProgress(runtime.is_main, cfg.logging.progress_seconds)

    def save(stage_end: bool) -> None:
        save_checkpoint(
            cfg.checkpoint.dir,
            state,
            chunks,
            optimizer,
            cfg.model,
            layout,
            record,
            cfg.checkpoint.keep,
            permanent=stage_end,
        )
        logger.info(
            "saved checkpoint at step %d to %s%s",
            state.step,
            cfg.checkpoint.dir,
            f" (end of stage {state.stage!r}, kept)" if stage_end else "",
        )

    while state.step < cfg.train.steps and not schedule.finished(state.consumed_tokens):
        values = schedule.at(state.consumed_tokens)
        apply_scheduled(values, optimizer, config, cfg.optim.weight_decay)
        num_microbatches = values.global_batch_size // samples_per_microbatch
        progress.start(state.step + 1, num_microbatches * len(chunks))
        result: StepResult = train_step(
            chunks,
            optimizer,
            iterators,
            config,
            num_microbatches=num_microbatches,
            micro_batch_size=cfg.train.micro_batch_size,
            seq_length=cfg.train.seq_length,
            device=runtime.device,
            on_micro_batch=progress.micro_batch,
        )
        state.step += 1
        state.consumed_samples += values.global_batch_size
        state.consumed_tokens += values.global_batch_size * cfg.train.seq_length
        interval_tokens += values.global_batch_size * cfg.train.seq_length
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.3f}")

        if state.step % cfg.logging.interval == 0 or state.step == cfg.train.steps or state.step == 1:
            elapsed = time.perf_counter() - interval_start
            writer.log(
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
                    **{key: value for key, value in asdict(values).items()},
                    "tokens_per_s": interval_tokens / max(elapsed, 1e-9),
                    "peak_memory_gib": peak_memory_gib(runtime.device),
                    "samples_per_dataset": tally.take(parallel_state.get_data_parallel_group(), runtime.device),
                },
            )
            interval_tokens, interval_start = 0, time.perf_counter()

        stopped = stop.agreed(runtime.device)
        paused = state.step == cfg.train.stop_after_steps
        stage_end = schedule.finished(state.consumed_tokens)
        if stopped or paused or stage_end or state.step == cfg.train.steps or state.step % cfg.checkpoint.interval == 0:
            save(stage_end)
        if stopped or paused:
            logger.warning(
                "stopped at step %d (%s); rerun the same command to resume",
                state.step,
                "signal" if stopped else "train.stop_after_steps",
            )
            break
    bar.close()
    return RunSummary(state, losses, grad_norms, stopped, resumed_from)
