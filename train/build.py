"""The parts of a run that the training loop and the tools (conversion, evaluation, the planner's measured
checks) set up alike: the parallel runtime, the data-parallel wrappers and the optimizer, and the records of
the layout a checkpoint is written under."""

import itertools
from collections.abc import Iterator, Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from mimo.data.config import DataConfig
from mimo.model.builder import PARAM_DTYPES, build_model
from mimo.parallel.runtime import Runtime, initialize
from mimo.recipes.schema import MimoConfig
from mimo.train.records import LayoutRecord, RunRecord


def start_runtime(cfg: MimoConfig) -> Runtime:
    """Process groups, seeds and (without CUDA) the CPU patches for the layout a recipe asks for."""
    return initialize(
        cfg.parallel,
        cfg.model,
        seed=cfg.run.seed,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.train.seq_length,
    )


def layout_record(cfg: MimoConfig, runtime: Runtime) -> LayoutRecord:
    """The layout this process runs under, as checkpoints record it."""
    return LayoutRecord(
        world_size=runtime.world_size,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        vpp=cfg.parallel.vpp,
        ep=cfg.parallel.ep,
        etp=cfg.parallel.etp,
        cp=cfg.parallel.cp,
        dp=runtime.layout.dp,
        micro_batch_size=cfg.train.micro_batch_size,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def run_record(cfg: MimoConfig, runtime: Runtime, data: DataConfig | None = None) -> RunRecord:
    """The stage settings of ``cfg`` under this runtime; ``data`` is the stage's resolved data section (default:
    ``cfg.data``)."""
    data = cfg.data if data is None else data
    return RunRecord.of(cfg.train.seq_length, cfg.train.global_batch_size, cfg.model, data, layout_record(cfg, runtime))


def wrap_ddp(
    chunks: Sequence[torch.nn.Module], config: TransformerConfig, distributed_optimizer: bool
) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg: MimoConfig, chunks: Sequence[torch.nn.Module]) -> MegatronOptimizer:
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
            params_dtype=PARAM_DTYPES[cfg.precision.dtype],
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        list(chunks),
    )


def use_multi_tensor_adam(optimizer: MegatronOptimizer) -> None:
    """Let torch's Adam (megatron's optimizer without TE/Apex) update each param group with one multi-tensor op per
    step of the algorithm (``foreach``) instead of a Python loop of about eight ops per tensor, the default on CPU;
    the arithmetic is the same, bit for bit. Called before every step: loading a checkpoint replaces the param
    groups with the saved ones."""
    for inner in getattr(optimizer, "chained_optimizers", (optimizer,)):
        if isinstance(getattr(inner, "optimizer", None), torch.optim.Adam):  # AdamW is an Adam
            for group in inner.optimizer.param_groups:
                group["foreach"] = True


def build_training_model(cfg: MimoConfig, seed: int | None) -> tuple[list[DistributedDataParallel], MegatronOptimizer]:
    """This rank's model chunks wrapped for data parallelism and their optimizer, with the hooks megatron's
    schedules call through the chunks' shared TransformerConfig (gradient finalisation, loss scaling, no-sync).
    With a ``seed`` the initial weights depend on it alone (``mimo.model.init``)."""
    chunks = build_model(cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, seed=seed)
    config: TransformerConfig = chunks[0].config
    wrapped = wrap_ddp(chunks, config, cfg.parallel.distributed_optimizer)
    optimizer = build_optimizer(cfg, wrapped)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    return wrapped, optimizer


def chunk_iterators(iterator: Iterator, num_chunks: int) -> list[Iterator]:
    """Each virtual pipeline stage pulls every micro-batch once, so each gets its own view of one stream."""
    return [iterator] if num_chunks == 1 else list(itertools.tee(iterator, num_chunks))
