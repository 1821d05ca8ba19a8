"""The training job itself: it learns, writes what it promises, resumes exactly, and survives kills."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mimo.recipes import load_config
from mimo.train.checkpoint import CheckpointError, storage
from mimo.train.checkpoint.manager import latest_checkpoint
from mimo.train.trainer import run_training

RESUME_TOLERANCE = 1e-6
STEPS = 6


def tiny(run_dir: Path, data_cache: Path, *overrides: str):
    return load_config(
        [f"run.dir={run_dir}", f"data.cache_dir={data_cache}", "logging.interval=1", f"train.steps={STEPS}", *overrides]
    )


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(run_dir: Path, data_cache: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimo.train", f"run.dir={run_dir}", f"data.cache_dir={data_cache}", *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_training(tiny(run_dir, data_cache, "checkpoint.interval=100"))


@pytest.mark.system
def test_main_job_learns_and_writes_its_outputs(tmp_path, data_cache):
    steps = 40
    job = launch(
        tmp_path,
        data_cache,
        f"train.steps={steps}",
        "logging.interval=5",
        "checkpoint.interval=20",
        "logging.wandb=offline",
    )
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, *range(5, steps + 1, 5)]
    for field in ("step", "tokens", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(field in r for r in records), field
    assert records[0]["lm_loss"] == pytest.approx(torch.log(torch.tensor(4096.0)).item(), abs=0.05)
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 1.0, "the loss did not fall"
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert records[-1]["tokens"] == steps * saved.train.global_batch_size * saved.train.seq_length
    assert saved.train.steps == steps and saved.run.dir == str(tmp_path)
    assert set(saved) >= {"run", "train", "parallel", "model", "optim", "checkpoint", "logging", "data", "schedule"}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000040"
    assert "step 40 |" in output and "saved checkpoint at step 40" in output
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@pytest.mark.system
def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_cache, uninterrupted):
    first = run_training(tiny(tmp_path, data_cache, "train.stop_after_steps=3"))
    second = run_training(tiny(tmp_path, data_cache))
    assert first.state.step == 3 and second.resumed_from.endswith("step_0000003")
    resumed = first.losses + second.losses
    assert resumed == pytest.approx(uninterrupted.losses, rel=RESUME_TOLERANCE, abs=0)
    assert first.grad_norms + second.grad_norms == pytest.approx(uninterrupted.grad_norms, rel=RESUME_TOLERANCE)
    assert second.state.consumed_samples == uninterrupted.state.consumed_samples


@pytest.mark.system
def test_a_kill_during_save_leaves_the_previous_checkpoint_usable(tmp_path, data_cache, uninterrupted, monkeypatch):
    real_save = storage.dist_checkpointing.save
    saves = []

    def dies_in_second_save(*args, **kwargs):
        saves.append(args[1])
        real_save(*args, **kwargs)  # the shard files are written ...
        if len(saves) == 2:
            raise KeyboardInterrupt("killed mid-save")  # ... but the process dies before the save completes

    monkeypatch.setattr(storage.dist_checkpointing, "save", dies_in_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny(tmp_path, data_cache, "checkpoint.interval=2"))
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000002"
    assert (checkpoints / "step_0000004.partial").exists() and not (checkpoints / "step_0000004").exists()

    monkeypatch.setattr(storage.dist_checkpointing, "save", real_save)
    resumed = run_training(tiny(tmp_path, data_cache, "checkpoint.interval=2"))
    assert resumed.resumed_from.endswith("step_0000002")
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], rel=RESUME_TOLERANCE, abs=0)
    assert not (checkpoints / "step_0000004.partial").exists()


@pytest.mark.system
def test_damaged_checkpoint_is_refused_before_loading(tmp_path, data_cache):
    run_training(tiny(tmp_path, data_cache, "train.stop_after_steps=1"))
    latest = latest_checkpoint(str(tmp_path / "checkpoints"))
    shard = sorted(latest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        run_training(tiny(tmp_path, data_cache))


@pytest.mark.system
def test_checkpoint_of_another_architecture_is_refused_with_the_keys(tmp_path, data_cache):
    run_training(tiny(tmp_path, data_cache, "train.stop_after_steps=1"))
    with pytest.raises(CheckpointError, match=r"model\.num_experts: checkpoint 8, config 4"):
        run_training(tiny(tmp_path, data_cache, "model.num_experts=4"))


def test_dangling_latest_pointer_is_reported(tmp_path):
    (tmp_path / "latest").write_text("step_0000009")
    with pytest.raises(CheckpointError, match="step_0000009"):
        latest_checkpoint(str(tmp_path))


@pytest.mark.system
def test_the_log_says_which_datasets_fed_each_interval(tmp_path, data_cache):
    from mimo.data.config import PreprocessConfig
    from mimo.data.preprocess import preprocess

    corpus = tmp_path / "reversed.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"{i} " + "elpmas desrever a si siht " * 40}) + "\n" for i in range(300))
    )
    preprocess(PreprocessConfig(inputs=[str(corpus)], output=str(tmp_path / "reversed"), workers=1))
    steps, interval = 4, 2
    run_training(
        tiny(
            tmp_path / "run",
            data_cache,
            f"train.steps={steps}",
            f"logging.interval={interval}",
            f'data.blend=["0.5 mimo:jargon", "0.5 {tmp_path / "reversed"}"]',
        )
    )
    logged = read_metrics(tmp_path / "run")
    global_batch = load_config().train.global_batch_size
    # Each logged line counts the samples since the previous one: together, every sample of the run once.
    assert sum(sum(r["samples_per_dataset"].values()) for r in logged) == steps * global_batch
    assert all(set(r["samples_per_dataset"]) == {"mimo:jargon", "reversed"} for r in logged)
    assert min(logged[-1]["samples_per_dataset"].values()) > 0
