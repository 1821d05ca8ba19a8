"""Where a run's checkpoints go, which one is ``latest`` and which are kept.

A save is written into ``<dir>/step_NNNNNNN.partial`` and renamed to ``step_NNNNNNN`` only once every rank has
finished (with ``checkpoint.async_save``, when the background write completes); the ``latest`` file is then
replaced atomically. A kill at any moment therefore leaves the previous checkpoint as the latest one, complete.
A state holding a NaN or an infinity on any rank is never written (``health``), so ``latest`` always names a
healthy checkpoint, and ``checkpoint.keep`` deletes neither the newest one nor a stage's final one.
"""

import os
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer

from mimo.model.config import ModelConfig
from mimo.train.checkpoint import CheckpointError
from mimo.train.checkpoint.background import BackgroundWriter
from mimo.train.checkpoint.health import state_is_finite
from mimo.train.checkpoint.storage import load_tensors, save_tensors, verify_files
from mimo.train.config import CheckpointConfig
from mimo.train.records import FORMAT_VERSION, CheckpointMeta, LayoutRecord, RunRecord, TrainState

LATEST_FILE = "latest"
META_FILE = "mimo_checkpoint.json"
PARTIAL_SUFFIX = ".partial"
TMP_SUFFIX = ".tmp"
KEEP_MARKER = "KEEP"
"""A checkpoint holding this file (the last one of a schedule stage) is never removed by checkpoint.keep."""

# Model settings a checkpoint's tensors do not depend on: a later stage may change them (RoPE theta, the
# scheduled loss weights and rates, the dispatcher); everything else must match the checkpoint.
RESHAPE_FREE_MODEL_FIELDS = frozenset(
    {
        "name",
        "rope_theta",
        "swa_rope_theta",
        "mtp_loss_weight",
        "moe_aux_loss_coeff",
        "moe_router_bias_update_rate",
        "moe_token_dispatcher",
        "moe_grouped_gemm",
        "max_position_embeddings",
        "init_method_std",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
        "recompute_modules",
    }
)


MOE_PATTERN_FIELDS = ("num_dense_layers", "moe_layer_pattern")
"""Two spellings of one architecture (a count of leading dense layers, or a per-layer list; checkpoints older
than the list have only the count): compared through the per-layer pattern they resolve to."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir``, or None for a fresh run."""
    pointer = Path(ckpt_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / META_FILE).exists():
        raise CheckpointError(
            f"{pointer} names {path.name}, which is missing or incomplete (no {META_FILE}); "
            f"point checkpoint.dir at a directory with a valid checkpoint or delete {pointer} to start fresh"
        )
    return path


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Every complete checkpoint under ``ckpt_dir``, oldest step first."""
    return sorted(
        path
        for path in Path(ckpt_dir).glob("step_*")
        if not path.name.endswith(PARTIAL_SUFFIX) and (path / META_FILE).exists()
    )


def read_meta(path: Path) -> CheckpointMeta:
    try:
        meta = CheckpointMeta.from_json((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / META_FILE}: {err}") from err
    if meta.format != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.format!r}; this mimo reads format {FORMAT_VERSION}")
    return meta


def check_model_compatible(meta: CheckpointMeta, model: ModelConfig, path: Path) -> None:
    """Refuse a checkpoint whose tensors cannot fit the configured model, naming every differing key."""
    differences = [
        f"model.{key}: checkpoint {meta.model.get(key)!r}, config {value!r}"
        for key, value in asdict(model).items()
        if key not in RESHAPE_FREE_MODEL_FIELDS | set(MOE_PATTERN_FIELDS)
        and key in meta.model
        and meta.model[key] != value
    ]
    saved_spelling = {key: meta.model[key] for key in ("num_layers", *MOE_PATTERN_FIELDS) if key in meta.model}
    saved_pattern = ModelConfig(**saved_spelling).moe_pattern()
    if saved_pattern != model.moe_pattern():
        differences.append(
            f"model.moe_layer_pattern (1 = MoE, resolved from {saved_spelling}): checkpoint {saved_pattern},"
            f" config {model.moe_pattern()}"
        )
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written for another model architecture:\n  "
            + "\n  ".join(differences)
            + "\nset these keys to the checkpoint's values or start from a matching checkpoint"
        )


def load_checkpoint(
    path: Path,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    model: ModelConfig,
    layout: LayoutRecord | None = None,
) -> TrainState:
    """Load everything a resume needs, or raise CheckpointError having changed nothing.

    A checkpoint without optimizer state (a converted one) initialises the optimizer fresh. RNG streams are
    restored only under the ``layout`` that saved them: they are per rank and have no meaning in another one.
    Without a layout (evaluation, export) they are left alone.
    """
    meta = read_meta(path)
    check_model_compatible(meta, model, path)
    verify_files(path)
    same_layout = layout is not None and meta.layout == layout.settings() and meta.world_size == dist.get_world_size()
    load_tensors(path, model_chunks, optimizer if meta.has_optimizer else None, restore_rng=same_layout)
    return meta.state


class CheckpointManager:
    """The checkpoints of one run directory: saving (atomically, then pruning to ``checkpoint.keep``), finding
    the latest and loading it. Saving and waiting are collective: every rank calls them together."""

    def __init__(self, cfg: CheckpointConfig, model: ModelConfig, device: torch.device) -> None:
        if cfg.dir is None:
            raise CheckpointError("checkpoint.dir is unset; compose the config with mimo.recipes.load_config")
        self.root = Path(cfg.dir)
        self.keep = cfg.keep
        self.model = model
        self.device = device
        self._background = BackgroundWriter() if cfg.async_save else None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def load(
        self, path: Path, model_chunks: list[torch.nn.Module], optimizer: MegatronOptimizer | None, layout: LayoutRecord
    ) -> TrainState:
        self.wait()
        return load_checkpoint(path, model_chunks, optimizer, self.model, layout)

    def save(
        self,
        state: TrainState,
        model_chunks: list[torch.nn.Module],
        optimizer: MegatronOptimizer | None,
        run: RunRecord,
        permanent: bool = False,
        losses: list[tuple[int, float]] | None = None,
    ) -> Path:
        """Write a complete checkpoint, then make it the latest; older ones beyond ``keep`` are removed.
        ``permanent`` marks it to be kept whatever ``keep`` says (a stage's last checkpoint); ``losses`` is the
        spike detector's window (``CheckpointMeta.losses``). With ``checkpoint.async_save`` this returns once the
        write has started; it completes during later steps (``poll``) or at ``wait``."""
        self.wait()
        if not state_is_finite(model_chunks, optimizer, self.device):
            raise CheckpointError(
                f"refusing to save step {state.step}: the model or optimizer state holds NaN or infinite values on"
                f" some rank; {LATEST_FILE} still names {self.latest()}. Resume from it (lower optim.lr or enable"
                " optim.clip_grad)"
            )
        final = self.root / step_dir_name(state.step)
        partial_dir = self.root / (final.name + PARTIAL_SUFFIX)
        meta = CheckpointMeta.of(state, optimizer is not None, run, self.model, losses)
        if dist.get_rank() == 0:
            shutil.rmtree(partial_dir, ignore_errors=True)  # debris of a save that was killed
            partial_dir.mkdir(parents=True)
        dist.barrier()
        publish = partial(self._publish, partial_dir, final, meta.to_json(), permanent)
        if self._background is None:
            save_tensors(partial_dir, model_chunks, optimizer)
            publish()
        else:
            request = save_tensors(partial_dir, model_chunks, optimizer, async_save=True)
            request.add_finalize_fn(publish)
            self._background.schedule(request, str(final))
        return final

    def _publish(self, partial_dir: Path, final: Path, meta_json: str, permanent: bool) -> None:
        """Once every rank's shards are written: complete the directory, rename it and make it the latest."""
        dist.barrier()
        if dist.get_rank() == 0:
            (partial_dir / META_FILE).write_text(meta_json)
            if permanent:
                (partial_dir / KEEP_MARKER).touch()
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial_dir, final)
            _atomic_write(self.root / LATEST_FILE, final.name)
            self._remove_old(final.name)
        dist.barrier()

    def point_latest(self, path: Path) -> None:
        """Make ``path`` (a complete checkpoint of this directory) the latest again, as a rollback does."""
        self.wait()
        if dist.get_rank() == 0:
            _atomic_write(self.root / LATEST_FILE, path.name)
        dist.barrier()

    def poll(self) -> None:
        """Complete a background write that every rank has finished (after each step; collective)."""
        if self._background is not None:
            self._background.poll()

    def wait(self) -> None:
        """Block until a background write in flight is complete (collective)."""
        if self._background is not None:
            self._background.wait()

    def close(self) -> None:
        """Finish any background write and stop its worker."""
        if self._background is not None:
            background, self._background = self._background, None
            background.close()

    def _remove_old(self, newest: str) -> None:
        removable = [path for path in complete_checkpoints(self.root) if not (path / KEEP_MARKER).exists()]
        for old in removable[: max(0, len(removable) - self.keep)]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, path)
