"""Two-process training under torchrun on CPU (gloo): DDP and DeepSpeed ZeRO-1/2 learn a tiny fold,
and a preempted 2-process run resumes bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    assert "preempted at epoch 1 step 1" in res.stderr
    ckpt = run / "resnet18" / "fold0" / "checkpoints" / "e001-s000001"
    assert (ckpt / "rank0.pt").is_file() and (ckpt / "rank1.pt").is_file()
    res = run_job(overrides(run, data_dir, *exact), nproc=2, timeout=200)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from epoch 1 step 1" in res.stdout
    assert_same_run(ref / "resnet18" / "fold0", run / "resnet18" / "fold0")
