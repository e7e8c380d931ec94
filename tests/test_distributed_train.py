"""Two-process training under torchrun on CPU (gloo): DDP and DeepSpeed ZeRO-1/2 learn a tiny fold,
and a preempted 2-process run resumes bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skinhpc import REPO_DIR
from skinhpc.config import load_config
from skinhpc.models import create_model
from skinhpc.distributed import read_ranks
from test_train import EXACT, NO_AUG, PREEMPT_ENV, assert_same_run, overrides, run_job, write_tiny_split

# 21 training images, 5 per process per step: 2 steps per epoch on each of the 2 processes;
# 16 steps lift the training accuracy from chance to most of the (unaugmented) images.
LEARN = ["train.epochs=8", "train.batch_size=5", "model.drop_rate=0", "train.lr=0.003", "train.class_weights=false",
         *NO_AUG]
STRATEGIES = {"ddp": ["train.strategy=ddp"],
              "zero1": ["train.strategy=deepspeed", "train.deepspeed.stage=1"],
              "zero2": ["train.strategy=deepspeed", "train.deepspeed.stage=2"]}


@pytest.fixture(scope="module")
def data_dir(sample_data_dir: Path) -> Path:
    return Path(sample_data_dir)


@pytest.mark.timeout(30)
def test_ranks_come_from_torchrun_variables_else_from_a_slurm_job_step(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert read_ranks() == (0, 1, 0)
    # A batch script (no job step) is one process although it sees the job's task count.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert read_ranks() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert read_ranks() == (3, 4, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert read_ranks() == (2, 8, 0)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_process_run_learns_a_tiny_fold(strategy: str, tmp_path: Path, data_dir: Path) -> None:
    write_tiny_split(tmp_path, data_dir)
    res = run_job(overrides(tmp_path, data_dir, *LEARN, *STRATEGIES[strategy]), nproc=2, timeout=380)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = tmp_path / "resnet18" / "fold0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["world_size"] == 2
    assert metrics["strategy"] == STRATEGIES[strategy][0].split("=")[1]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log]
    assert losses[-1] < 0.5 * losses[0], losses
    accs = [r["train_acc"] for r in log]
    assert accs[-1] >= 0.75 and accs[-1] >= accs[0] + 0.4, accs
    # Rank 0 alone prints the epoch lines.
    assert res.stdout.count("epoch 8/8 val bal_acc") == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_process_preempted_run_resumes_bit_identical(strategy: str, tmp_path: Path, data_dir: Path) -> None:
    exact = [*EXACT, "train.epochs=2", *STRATEGIES[strategy]]
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        write_tiny_split(d, data_dir)
    res = run_job(overrides(ref, data_dir, *exact), nproc=2, timeout=200)
    assert res.returncode == 0, res.stderr[-4000:]
    # Rank 0 alone receives SIGUSR2 after optimizer step 3 (epoch 1, step 1): both ranks must save.
    res = run_job(overrides(run, data_dir, *exact), {PREEMPT_ENV: "3"}, nproc=2, timeout=200)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stderr.count("preempted at epoch 1 step 1") == 1  # one line, from rank 0
    ckpt = run / "resnet18" / "fold0" / "checkpoints" / "e001-s000001"
    assert (ckpt / "rank0.pt").is_file() and (ckpt / "rank1.pt").is_file()
    rng = [torch.load(ckpt / f"rank{r}.pt", weights_only=False)["rng"]["torch"] for r in (0, 1)]
    assert not torch.equal(*rng)  # each rank draws its own dropout masks
    res = run_job(overrides(run, data_dir, *exact), nproc=2, timeout=200)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from epoch 1 step 1" in res.stdout
    assert_same_run(ref / "resnet18" / "fold0", run / "resnet18" / "fold0")


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_frozen_then_unfrozen_backbone_under_deepspeed_takes_the_same_steps_as_plain_training(
        tmp_path: Path, data_dir: Path) -> None:
    # Under DeepSpeed the frozen backbone keeps requires_grad (lr 0). Epoch 0 (frozen), with tight
    # clipping: its gradients must not count in the norm, or the head's steps come out smaller.
    # Epoch 1 (unfrozen): the frozen steps must not have advanced AdamW's step counter for the
    # backbone, or its bias correction makes the first steps after the unfreeze too large.
    frozen = ["train.epochs=2", "model.freeze_epochs=1", "train.max_steps_per_epoch=2", "train.grad_clip=0.05",
              "model.drop_rate=0", "train.select_metric=last", *NO_AUG]
    final = {}
    # ZeRO-1 and ZeRO-2 hold the optimizer state and clip the gradients in code paths of their own.
    for name, strategy in (("plain", STRATEGIES["ddp"]), ("zero1", STRATEGIES["zero1"]), ("zero2", STRATEGIES["zero2"])):
        write_tiny_split(tmp_path / name, data_dir)
        res = run_job(overrides(tmp_path / name, data_dir, *frozen, *strategy), timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        final[name] = torch.load(tmp_path / name / "resnet18" / "fold0" / "model_best.pt", weights_only=True)["state_dict"]
    cfg = load_config(overrides(tmp_path, data_dir))
    torch.manual_seed(cfg.train.seed)
    initial = create_model(cfg.model).state_dict()
    for zero in ("zero1", "zero2"):
        assert final["plain"].keys() == final[zero].keys()
        for key, value in final["plain"].items():
            if key in ("fc.weight", "conv1.weight", "layer4.1.conv2.weight"):
                assert not torch.allclose(value, initial[key])  # the head and the unfrozen backbone did learn
            torch.testing.assert_close(final[zero][key], value, rtol=1e-4, atol=1e-6, msg=f"{zero}: {key}")


def _no_slurm() -> str:
    if not shutil.which("srun"):
        return "srun is not on PATH"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed") for s in out.stdout.split()):
        return f"no idle SLURM node ({out.stdout.strip() or out.stderr.strip()})"
    return ""


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_srun_tasks_train_together_from_the_slurm_environment_alone(tmp_path: Path, data_dir: Path) -> None:
    """The SLURM payload path: ranks from SLURM_PROCID/SLURM_STEP_NUM_TASKS, rendezvous on the first
    host of the allocation, no torchrun and no MASTER_ADDR."""
    problem = _no_slurm()
    if problem:
        if os.environ.get("SKINHPC_REQUIRE_SLURM") == "1":
            pytest.fail(f"SKINHPC_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(f"{problem}; start the local cluster with: bash slurm/local/start.sh")
    write_tiny_split(tmp_path, data_dir)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    cmd = ["srun", "--ntasks=2", "--cpus-per-task=1", "--time=10", sys.executable, str(REPO_DIR / "jobs" / "train.py"),
           *overrides(tmp_path, data_dir, "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=5")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=380, cwd=REPO_DIR)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    metrics = json.loads((tmp_path / "resnet18" / "fold0" / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["world_size"] == 2
