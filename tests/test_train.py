"""train_fold on one process: learning, the fold's files, idempotence, exact resume after preemption
and after a hard kill, and refusing a resume with a changed batch size.

Runs on a tiny fold of the converted bundled sample: the test writes the run's split.json itself
(2-3 images per class), which ``ensure_split`` accepts because its config and image count match.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from skinhpc import CLASSES, REPO_DIR, checkpoint
from skinhpc.checkpoint import ResumeMismatch, list_checkpoints
from skinhpc.config import ConfigError, ExperimentConfig, SplitConfig, TrainConfig, load_config, save_config
from skinhpc.convert import read_index
from skinhpc.split import SPLIT_NAME
from skinhpc.models import backbone_and_head_params, create_model
from skinhpc.rundir import exclusive_lock, lock_holder, read_log, replaces_best, train_lock
from skinhpc.train import (KILL_ENV, PREEMPT_ENV, PREEMPT_SIGNAL_ENV, FoldTrainer, PreemptionFlag, class_weights, fold_dir, lr_at, make_criterion,
                           time_box_reached, train_accuracies, train_fold, upgrade_loop_state)

PYTHON = sys.executable
TIMING_KEYS = {"images_per_s", "data_wait_frac", "peak_mem_gb", "time_s"}
# No augmentation: a few images can then be learned by heart within a few steps.
NO_AUG = ["aug.hflip=0", "aug.vflip=0", "aug.affine_p=0", "aug.noise_p=0", "aug.brightness=0", "aug.contrast=0",
          "aug.blur_p=0", "aug.color_shift=0", "aug.elastic_p=0", "aug.crop_scale=[1.0,1.0]",
          "aug.crop_ratio=[1.3333,1.3333]"]


def write_tiny_split(run_dir: Path, data_dir: Path, per_class: tuple[int, int, int] = (3, 1, 1)) -> dict:
    """RUN/split.json with (train, val, test) images per class from distinct lesions, fold 0 only used."""
    index = read_index(data_dir)
    first = index.drop_duplicates("lesion_id").sort_values("row")
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for dx in CLASSES:
        ids = first.loc[first["dx"] == dx, "image_id"].tolist()
        n_tr, n_va, n_te = per_class
        parts["train"] += ids[:n_tr]
        parts["val"] += ids[n_tr:n_tr + n_va]
        parts["test"] += ids[n_tr + n_va:n_tr + n_va + n_te]
    cfg = SplitConfig()
    split = {"seed": cfg.seed, "config": dataclasses.asdict(cfg), "n_images": int(len(index)), "rare_classes": [],
             "test": sorted(parts["test"]),
             "folds": [{"train": sorted(parts["train"]), "val": sorted(parts["val"])}] * cfg.folds}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPLIT_NAME).write_text(json.dumps(split))
    return split


def overrides(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """A small, fast training config on the tiny split (resnet18, 64 px, few steps)."""
    return [f"run_dir={run_dir}", f"data.dir={data_dir}", "model.backbone=resnet18", "model.image_size=64",
            "train.batch_size=7", "train.epochs=3", "train.warmup_epochs=0", "train.lr=0.002",
            "train.log_every=1", "data.num_workers=2", "fold=0", *extra]


def run_job(args: list[str], env_extra: dict[str, str] | None = None, nproc: int = 1,
            timeout: float = 240) -> subprocess.CompletedProcess:
    """jobs/train.py in a subprocess (under torchrun when nproc > 1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc > 1:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(REPO_DIR / "jobs" / "train.py"), *args]
    else:
        cmd = [PYTHON, str(REPO_DIR / "jobs" / "train.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_DIR)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epoch_log(out: Path) -> list[dict]:
    """log.jsonl without the timing keys (these differ between any two runs)."""
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def best_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_best.pt", weights_only=True)["state_dict"]


def last_checkpoint_model(out: Path) -> dict[str, torch.Tensor]:
    """The model weights in the newest checkpoint (DDP's state.pt or DeepSpeed's module file)."""
    newest = list_checkpoints(out / "checkpoints")[-1].path
    if (newest / "state.pt").is_file():
        return torch.load(newest / "state.pt", weights_only=True)["model"]
    # DeepSpeed's own file pickles config objects: not loadable with weights_only.
    return torch.load(newest / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights (best and last) and the same per-epoch metrics."""
    assert epoch_log(a) == epoch_log(b)
    assert_same_weights(best_weights(a), best_weights(b))
    assert_same_weights(last_checkpoint_model(a), last_checkpoint_model(b))
    va, vb = np.load(a / "predictions_val.npz"), np.load(b / "predictions_val.npz")
    assert np.array_equal(va["logits"], vb["logits"])


@pytest.fixture(scope="module")
def data_dir(sample_data_dir: Path) -> Path:
    return Path(sample_data_dir)


# Exactness is tested with augmentation and dropout on: both draw random numbers that a resume must
# reproduce (the loader's seeded generator, and the global torch RNG for dropout).
EXACT = ["train.epochs=3", "train.max_steps_per_epoch=3", "train.batch_size=5", "model.drop_rate=0.3"]


def stopped_at_step(step: int | str, run_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                    signal_name: str = "USR2") -> tuple[ExperimentConfig, dict]:
    """The EXACT config trained until this process sends itself a real signal after optimizer step
    ``step`` (SIGUSR2: SLURM's warning); its config and what train_fold returned."""
    write_tiny_split(run_dir, data_dir)
    cfg = load_config(overrides(run_dir, data_dir, *EXACT))
    with monkeypatch.context() as m:
        m.setenv(PREEMPT_ENV, str(step))
        m.setenv(PREEMPT_SIGNAL_ENV, signal_name)
        return cfg, train_fold(cfg)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The reference: the EXACT config trained without interruption (in this process)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    write_tiny_split(run, data_dir)
    cfg = load_config(overrides(run, data_dir, *EXACT))
    assert train_fold(cfg)["status"] == "done"
    return fold_dir(cfg)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_process_fold_learns_and_writes_the_fold_layout(tmp_path: Path, data_dir: Path) -> None:
    write_tiny_split(tmp_path, data_dir, per_class=(2, 1, 1))
    cfg = load_config(overrides(tmp_path, data_dir, "train.epochs=10", "model.drop_rate=0", "train.lr=0.003",
                                "train.class_weights=false", *NO_AUG))
    result = train_fold(cfg)
    out = fold_dir(cfg)
    assert out == tmp_path / "resnet18" / "fold0"
    assert result["status"] == "done" and result["fold"] == 0 and result["backbone"] == "resnet18"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(10))
    for key in ("epoch", "lr", "train_loss", "val_loss", "val_balanced_accuracy", "val_top1", "val_top2",
                "val_auroc_macro", "val_f1_macro", "images_per_s", "data_wait_frac", "peak_mem_gb", "time_s"):
        assert key in log[0], key
    for key in ("val_auroc", "val_sensitivity", "val_specificity"):  # per class, every validated epoch
        assert list(log[0][key]) == list(CLASSES), key
    assert len(log[0]["val_confusion_matrix"]) == len(CLASSES) and sum(map(sum, log[0]["val_confusion_matrix"])) == 7
    # 14 images, no augmentation: learned by heart.
    assert log[-1]["train_acc"] == 1.0 and log[-1]["train_balanced_accuracy"] == 1.0, log[-1]
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    # Unweighted, unsmoothed criterion: the logged cross-entropy is the same loss.
    assert [r["train_ce"] for r in log] == pytest.approx([r["train_loss"] for r in log], rel=1e-5)
    for name in ("config.yaml", "model_best.pt", "predictions_val.npz", "predictions_test.npz", "metrics.json"):
        assert (out / name).is_file(), name
    assert list(json.loads((out / "inputs.json").read_text())) == ["data"]  # from scratch: no weights file
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "best" / "meta.json").is_file()
    assert len(list_checkpoints(out / "checkpoints")) == cfg.train.checkpoint.keep_last
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "done" and saved["val"]["n"] == 7 and saved["test"]["n"] == 7
    preds = np.load(out / "predictions_val.npz")
    assert preds["probs"].shape == (7, 7) and len(preds["image_ids"]) == 7
    blob = torch.load(out / "model_best.pt", weights_only=True)
    assert blob["model"]["backbone"] == "resnet18" and blob["epoch"] == saved["best_epoch"]
    assert len(blob["stored_size"]) == 2

    # A finished fold is not trained again.
    before = (out / "log.jsonl").read_text()
    start = time.monotonic()
    assert train_fold(cfg) == result
    assert time.monotonic() - start < 5
    assert (out / "log.jsonl").read_text() == before


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_preempted_mid_epoch_run_resumes_bit_identical(tmp_path: Path, data_dir: Path, uninterrupted: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    cfg, result = stopped_at_step(4, tmp_path, data_dir, monkeypatch)  # step 4 = epoch 1, step 1 of 3
    assert result["status"] == "preempted" and (result["epoch"], result["step"]) == (1, 1)
    out = fold_dir(cfg)
    assert not (out / "metrics.json").exists()
    assert (out / "checkpoints" / "e001-s000001" / "meta.json").is_file()

    # Resuming with another batch size or learning rate is refused, naming the key: by the fold's
    # saved config, and by the checkpoint's own record of what a resume needs.
    for change, said in (("train.batch_size=4", r"train\.batch_size: 5 -> 4"), ("train.lr=0.5", r"train\.lr: .* -> 0\.5")):
        with pytest.raises(ConfigError, match=said):
            train_fold(load_config(overrides(tmp_path, data_dir, *EXACT, change)))
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").unlink()
    with pytest.raises(ResumeMismatch, match=r"train\.batch_size: 5 \(checkpoint\) vs 4 \(now\)"):
        train_fold(load_config(overrides(tmp_path, data_dir, *EXACT, "train.batch_size=4")))
    assert not (out / "config.yaml").exists()  # a refused resume leaves no config of its own behind
    (out / "config.yaml").write_text(saved)
    # The fold records what its data came from; images changed under the same paths are refused.
    from skinhpc.config import data_input_record
    from skinhpc.convert import read_manifest, source_record
    inputs = json.loads((out / "inputs.json").read_text())
    assert inputs["data"] == data_input_record(data_dir, source_record(read_manifest(data_dir)))["data"]
    other = {**inputs["data"], "sha256": "0" * 64, "metadata_sha256": "0" * 64}
    (out / "inputs.json").write_text(json.dumps({**inputs, "data": other}))
    with pytest.raises(ConfigError, match=r"was trained on other data .*: the metadata CSV's content changed since it trained"):
        train_fold(cfg)
    (out / "inputs.json").write_text(json.dumps(inputs))

    capsys.readouterr()
    assert train_fold(cfg)["status"] == "done"
    assert "resuming from epoch 1 step 1" in capsys.readouterr().out
    assert_same_run(uninterrupted, out)


@pytest.mark.timeout(180)
def test_a_second_process_training_the_same_fold_is_refused_naming_the_first(tmp_path: Path, data_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two trainers of one fold would interleave their checkpoints and log lines (a local launch's
    task goes on training after its launch is killed; a relaunch would start a second)."""
    import skinhpc.train as train_module
    from skinhpc.train import FoldBusy
    write_tiny_split(tmp_path, data_dir)
    lock = train_lock(tmp_path, "resnet18", 0)
    with exclusive_lock(lock):  # what the first trainer holds while it trains
        with pytest.raises(FoldBusy, match=rf"fold0 is being trained by another process \(pid {os.getpid()} on "):
            train_fold(load_config(overrides(tmp_path, data_dir, "train.epochs=1")))
        assert lock_holder(lock).startswith(f"pid {os.getpid()} on ")
        # Every rank stops, not only rank 0, which holds the answer (DDP, two processes).
        res = run_job(overrides(tmp_path, data_dir, "train.epochs=1"), nproc=2, timeout=150)
        assert res.returncode != 0 and "is being trained by another process (pid" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "resnet18").exists()  # a refused trainer leaves no fold folder
    assert lock_holder(lock) == ""  # released with its holder; the fold then trains as usual

    # A lock another host holds is waited for (a dead node's lasts until its lease ends), then refused:
    # whether that trainer still runs cannot be told from here.
    monkeypatch.setattr(train_module, "FOREIGN_LOCK_WAIT_S", 0.0)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid 4242 on another-node\n")
        f.flush()
        with pytest.raises(FoldBusy, match=r"\(pid 4242 on another-node, lock .*If that node is down.*delete"):
            train_fold(load_config(overrides(tmp_path, data_dir, "train.epochs=1")))
    train_fold(load_config(overrides(tmp_path, data_dir, "train.epochs=1", "train.max_steps_per_epoch=1")))
    assert (tmp_path / "resnet18" / "fold0" / "metrics.json").is_file() and lock_holder(lock) == ""

    # Finished by the lock's holder between this trainer's first look and its lock: nothing to do.
    done = (tmp_path / "resnet18" / "fold0" / "metrics.json").read_text()
    looks = iter([None])
    monkeypatch.setattr(train_module, "finished_metrics", lambda out: next(looks, json.loads(done)))
    assert train_fold(load_config(overrides(tmp_path, data_dir, "train.epochs=1", "train.max_steps_per_epoch=1"))) \
        == json.loads(done)


@pytest.mark.timeout(180)
def test_every_rank_stops_when_rank_0_fails_to_take_the_folds_lock(tmp_path: Path, data_dir: Path) -> None:
    """Rank 0 failing before it tells the others (here: RUN/.locks is a file) must not leave them
    waiting in a collective until the process group's timeout."""
    write_tiny_split(tmp_path, data_dir)
    (tmp_path / ".locks").write_text("not a folder")
    start = time.monotonic()
    res = run_job(overrides(tmp_path, data_dir, "train.epochs=1"), nproc=2, timeout=150)
    assert res.returncode != 0 and time.monotonic() - start < 120
    assert ".locks: File exists" in res.stderr and "rank 0 failed before training" in res.stderr, res.stderr[-2000:]


@pytest.mark.timeout(60)
def test_a_fold_of_a_launched_run_trained_by_hand_with_other_settings_is_refused(tmp_path: Path,
                                                                                data_dir: Path) -> None:
    write_tiny_split(tmp_path, data_dir)
    save_config(load_config(overrides(tmp_path, data_dir, "train.lr=0.01")), tmp_path / "config.yaml")  # the launch's
    with pytest.raises(ConfigError, match=r"was launched with another config.*train\.lr: 0\.01 -> 0\.002"):
        train_fold(load_config(overrides(tmp_path, data_dir)))
    save_config(load_config(overrides(tmp_path, data_dir, "model.pretrained=true")), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"was launched with another config.*model\.pretrained"):
        train_fold(load_config(overrides(tmp_path, data_dir)))  # from scratch, in a run of pretrained folds
    # Launched as 2 processes per task (train.batch_size is per process): one process is another batch.
    save_config(load_config(overrides(tmp_path, data_dir, "cluster.gpus_per_node=2")), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"was launched with another config.*processes .*: 2 -> 1"):
        train_fold(load_config(overrides(tmp_path, data_dir, "cluster.gpus_per_node=2")))
    assert not (tmp_path / "resnet18").exists()


@pytest.mark.timeout(300)
def test_sigterm_during_the_final_predictions_waits_for_them_and_the_fold_finishes(
        tmp_path: Path, data_dir: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    # Our handlers stay on through the last step: without them SIGTERM killed the process silently.
    cfg, result = stopped_at_step("finish", tmp_path, data_dir, monkeypatch, "TERM")
    assert result["status"] == "done"
    assert "SIGTERM during the final predictions: finished them first" in capsys.readouterr().out
    for name in ("predictions_val.npz", "predictions_test.npz"):
        assert (fold_dir(cfg) / name).read_bytes() == (uninterrupted / name).read_bytes(), name


@pytest.mark.timeout(300)
def test_ctrl_c_during_the_final_predictions_finishes_the_fold_then_stops(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Finished first (nothing is left half-done), then KeyboardInterrupt: a loop over folds stops.
    with pytest.raises(KeyboardInterrupt):
        stopped_at_step("finish", tmp_path, data_dir, monkeypatch, "INT")
    assert json.loads((tmp_path / "resnet18" / "fold0" / "metrics.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_mid_epoch_stops_at_a_saved_checkpoint_and_the_rerun_is_bit_identical(
        tmp_path: Path, data_dir: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, result = stopped_at_step(4, tmp_path, data_dir, monkeypatch, "INT")  # a real SIGINT, as Ctrl-C sends
    assert result == {"status": "interrupted", "epoch": 1, "step": 1}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as usual again
    assert train_fold(cfg)["status"] == "done"
    assert_same_run(uninterrupted, fold_dir(cfg))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_start_over_after_the_checkpoints_were_deleted_logs_each_epoch_once(
        tmp_path: Path, data_dir: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, result = stopped_at_step(7, tmp_path, data_dir, monkeypatch)  # epoch 2, step 1: two epochs logged
    assert result["status"] == "preempted"
    out = fold_dir(cfg)
    shutil.rmtree(out / "checkpoints")  # what ResumeMismatch's message suggests to start over
    assert train_fold(cfg)["status"] == "done"
    assert [entry["epoch"] for entry in read_log(out / "log.jsonl")] == [0, 1, 2]
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_requeue_signal_during_the_last_validation_is_handed_on_and_the_rerun_only_finishes(
        tmp_path: Path, data_dir: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_split(tmp_path, data_dir)
    cfg = load_config(overrides(tmp_path, data_dir, *EXACT))
    validate = FoldTrainer._predict

    def signal_during_last_validation(self: FoldTrainer, loader: object) -> object:
        if self.state["epoch"] + 1 == self.tcfg.epochs and loader is self.val_loader:
            os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's warning, while the last epoch validates
        return validate(self, loader)

    calls: list[int] = []
    monkeypatch.setattr(FoldTrainer, "_predict", signal_during_last_validation)
    saved = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # submitit's place
    try:
        result = train_fold(cfg)
    finally:
        signal.signal(signal.SIGUSR2, saved)
    assert result == {"status": "preempted", "epoch": 3, "step": 0}
    assert calls == [signal.SIGUSR2]  # submitit would requeue the task here
    out = fold_dir(cfg)
    assert not (out / "metrics.json").exists()

    monkeypatch.setattr(FoldTrainer, "_predict", validate)
    assert train_fold(cfg)["status"] == "done"
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_damaged_best_checkpoint_ends_the_fold_on_its_last_weights_and_says_so(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    write_tiny_split(tmp_path, data_dir)
    cfg = load_config(overrides(tmp_path, data_dir, *EXACT))
    validate = FoldTrainer._predict

    def signal_during_last_validation(self: FoldTrainer, loader: object) -> object:
        if self.state["epoch"] + 1 == self.tcfg.epochs and loader is self.val_loader:
            os.kill(os.getpid(), signal.SIGUSR2)
        return validate(self, loader)

    monkeypatch.setattr(FoldTrainer, "_predict", signal_during_last_validation)
    saved_handler = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        assert train_fold(cfg)["status"] == "preempted"  # every epoch trained; the final files not yet written
    finally:
        signal.signal(signal.SIGUSR2, saved_handler)
    monkeypatch.setattr(FoldTrainer, "_predict", validate)
    best = fold_dir(cfg) / "checkpoints" / "best" / "model.pt"
    best.write_bytes(b"\0" * best.stat().st_size)  # unreadable at its recorded size (a disk error)
    capsys.readouterr()
    result = train_fold(cfg)
    assert result["status"] == "done" and result["best_epoch"] == 2  # the weights used: the last epoch's
    assert "the best checkpoint is damaged; using the last weights (epoch 3)" in capsys.readouterr().out
    assert result["best_lost"] == "the best checkpoint is damaged; the last epoch's weights are used"  # in metrics.json
    saved = torch.load(fold_dir(cfg) / "model_best.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["val_balanced_accuracy"] == result["val"]["balanced_accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_select_metric_keeps_the_epoch_that_metric_picks_and_last_keeps_the_final_weights(
        tmp_path: Path, data_dir: Path, uninterrupted: Path) -> None:
    reference = epoch_log(uninterrupted)
    picks = {}
    for metric in ("loss", "last"):
        write_tiny_split(tmp_path / metric, data_dir)
        cfg = load_config(overrides(tmp_path / metric, data_dir, *EXACT, f"train.select_metric={metric}"))
        result = train_fold(cfg)
        out = fold_dir(cfg)
        assert epoch_log(out) == reference  # the choice of the kept epoch changes no training step
        picks[metric] = result["best_epoch"]
        saved = torch.load(out / "model_best.pt", weights_only=True)
        assert saved["epoch"] == result["best_epoch"]
        assert saved["val_balanced_accuracy"] == result["val"]["balanced_accuracy"]
    losses = [r["val_loss"] for r in reference]
    assert picks["loss"] == losses.index(min(losses))
    assert picks["last"] == len(reference) - 1
    assert_same_weights(best_weights(tmp_path / "last" / "resnet18" / "fold0"), last_checkpoint_model(uninterrupted))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hard_killed_run_resumes_from_last_checkpoint_bit_identical(tmp_path: Path, data_dir: Path,
                                                                   uninterrupted: Path) -> None:
    write_tiny_split(tmp_path, data_dir)
    args = overrides(tmp_path, data_dir, *EXACT, "train.checkpoint.every_steps=2")
    # SIGKILL after optimizer step 5 (epoch 1, step 2); the newest checkpoint is then step 4.
    killed = run_job(args, {KILL_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = tmp_path / "resnet18" / "fold0"
    assert list_checkpoints(out / "checkpoints")[-1].path.name == "e001-s000001"
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')  # a line torn by the kill: dropped on resume
    resumed = run_job(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from epoch 1 step 1" in resumed.stdout
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sparse_validation_and_checkpoints_skip_epochs_and_a_killed_run_resumes_from_the_last_saved(
        tmp_path: Path, data_dir: Path, uninterrupted: Path) -> None:
    write_tiny_split(tmp_path, data_dir)
    args = overrides(tmp_path, data_dir, *EXACT, "train.eval_every=2", "train.checkpoint.every_epochs=2")
    # SIGKILL at optimizer step 8 (epoch 2 of 3): the only epoch-end checkpoint so far is after epoch 2.
    killed = run_job(args, {KILL_ENV: "8"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = tmp_path / "resnet18" / "fold0"
    assert [c.path.name for c in list_checkpoints(out / "checkpoints")] == ["e002-s000000"]
    resumed = run_job(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from epoch 2 step 0" in resumed.stdout
    log, reference = epoch_log(out), epoch_log(uninterrupted)
    assert [r["val_balanced_accuracy"] is None for r in log] == [True, False, False]  # epoch 2 and the last
    assert [r["train_loss"] for r in log] == [r["train_loss"] for r in reference]  # validation changes no training
    assert_same_weights(last_checkpoint_model(out), last_checkpoint_model(uninterrupted))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_best_found_after_the_newest_checkpoint_is_not_what_a_killed_run_resumes_with(
        tmp_path: Path, data_dir: Path) -> None:
    write_tiny_split(tmp_path, data_dir)
    args = overrides(tmp_path, data_dir, *EXACT, "train.epochs=4", "train.eval_every=1",
                     "train.checkpoint.every_epochs=2", "train.select_metric=last")
    # Validation every epoch, checkpoints every second: epoch 3's best (index 2) is found after the
    # checkpoint of epoch 2, which records index 1. SIGKILL in epoch 4 (optimizer step 10).
    killed = run_job(args, {KILL_ENV: "10"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = tmp_path / "resnet18" / "fold0" / "checkpoints"
    assert [c.path.name for c in list_checkpoints(ckpt)] == ["e002-s000000"]
    assert checkpoint.best_epoch_of(ckpt / "best") == 2 and checkpoint.best_epoch_of(ckpt / "best-kept") == 1
    # A replay that is not bit-identical (GPU) may not find epoch 3 the best again: the resumed run
    # starts from the weights its checkpoint records, and nothing of the killed run's is left over.
    resumed = run_job(args, {PREEMPT_ENV: "7"})  # preempted at once: its checkpoint records index 1
    assert resumed.returncode == 0 and "resuming from epoch 2 step 0" in resumed.stdout, resumed.stderr[-3000:]
    assert checkpoint.best_epoch_of(ckpt / "best") == 1 and not (ckpt / "best-kept").exists()
    resumed = run_job(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "resnet18" / "fold0" / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["best_epoch"] == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_limit_ends_the_fold_after_the_last_epoch_that_fits_validated_with_its_files(
        tmp_path: Path, data_dir: Path, uninterrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_split(tmp_path, data_dir)
    # A limit of 6 ms is over during the first epoch; eval_every=3 would not validate epoch 1 otherwise.
    cfg = load_config(overrides(tmp_path, data_dir, *EXACT, "train.eval_every=3", "train.stop_after_min=0.0001"))
    result = train_fold(cfg)
    out = fold_dir(cfg)
    assert result["status"] == "done" and result["stopped"] == "time_limit"
    assert result["epochs_trained"] == 1 and result["epochs"] == 3 and result["best_epoch"] == 0
    assert ("time limit: another epoch would end past train.stop_after_min=0.0001; stopping after epoch 1 of 3"
            in capsys.readouterr().out)
    log = epoch_log(out)
    assert len(log) == 1 and log[0]["val_balanced_accuracy"] is not None
    assert log[0]["train_loss"] == epoch_log(uninterrupted)[0]["train_loss"]  # the limit changes no step before it
    for name in ("model_best.pt", "predictions_val.npz", "predictions_test.npz"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["stopped"] == "time_limit"
    assert train_fold(cfg) == result  # stopped is finished: a rerun does not train on


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keep_when_done_false_deletes_the_checkpoints_once_the_fold_is_done_and_changes_nothing_else(
        tmp_path: Path, data_dir: Path, uninterrupted: Path) -> None:
    write_tiny_split(tmp_path, data_dir)
    cfg = load_config(overrides(tmp_path, data_dir, *EXACT, "train.checkpoint.keep_when_done=false"))
    result = train_fold(cfg)
    out = fold_dir(cfg)
    assert result["status"] == "done" and not (out / "checkpoints").exists()
    assert epoch_log(out) == epoch_log(uninterrupted)  # a neutral key: the same training
    assert_same_weights(best_weights(out), best_weights(uninterrupted))
    assert train_fold(cfg) == result  # still done: a rerun reads metrics.json, not the checkpoints


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_preempted_run_with_gradient_accumulation_resumes_bit_identical(tmp_path: Path, data_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 micro-batches of 4 = 2 optimizer steps per epoch; stop after step 3 (epoch 1, micro-batch 2).
    extra = [*EXACT, "train.accum_steps=2", "train.max_steps_per_epoch=4", "train.batch_size=4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        write_tiny_split(d, data_dir)
    assert train_fold(load_config(overrides(ref, data_dir, *extra)))["status"] == "done"
    monkeypatch.setenv(PREEMPT_ENV, "3")
    result = train_fold(load_config(overrides(run, data_dir, *extra)))
    assert (result["status"], result["epoch"], result["step"]) == ("preempted", 1, 2)
    monkeypatch.delenv(PREEMPT_ENV)
    assert train_fold(load_config(overrides(run, data_dir, *extra)))["status"] == "done"
    assert_same_run(ref / "resnet18" / "fold0", run / "resnet18" / "fold0")


@pytest.mark.timeout(120)
def test_train_job_reports_a_config_error_without_traceback(tmp_path: Path) -> None:
    res = run_job([f"run_dir={tmp_path}", "train.strategy=deepspeed", "train.precision=fp16"], timeout=100)
    assert res.returncode == 2
    assert "error: train.precision=fp16 is not supported" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_job([f"run_dir={tmp_path / 'typo'}", "model.backbone=resnet1888"], timeout=100)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: model.backbone='resnet1888' is neither a timm model nor vgg16_gap. Similar timm names:" in res.stderr
    assert not (tmp_path / "typo").exists()  # nothing written for it (split.json, fold folder)


@pytest.mark.timeout(30)
def test_a_validation_replaces_the_kept_weights_when_its_select_metric_is_better() -> None:
    assert replaces_best("balanced_accuracy", 0.5, 0.4, have_best=True)
    assert not replaces_best("balanced_accuracy", 0.4, 0.4, have_best=True)  # a tie keeps the earlier epoch
    assert replaces_best("loss", 0.9, 1.0, have_best=True) and not replaces_best("loss", 1.1, 1.0, have_best=True)
    assert replaces_best("auroc_macro", 0.1, -1.0, have_best=False)  # the first validation always counts
    assert not replaces_best("auroc_macro", float("nan"), -1.0, have_best=False)  # undefined never counts
    assert replaces_best("last", 0.1, 0.9, have_best=True) and replaces_best("last", float("nan"), 0.9, have_best=True)


@pytest.mark.timeout(30)
def test_select_metric_is_checked_when_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match="train.select_metric must be one of balanced_accuracy, .*, last, not 'auc'"):
        TrainConfig(select_metric="auc")
    with pytest.raises(ConfigError, match="early_stop_patience needs a metric to improve"):
        TrainConfig(select_metric="last", early_stop_patience=3)


@pytest.mark.timeout(30)
def test_time_box_starts_no_epoch_that_would_end_past_the_limit_at_the_mean_epoch_time() -> None:
    # 10-minute box, 80 s epochs: after 6 epochs (480 s) a seventh would end at 560 s, after 7 at 640 s.
    assert not time_box_reached(480.0, 6, 10.0)
    assert time_box_reached(560.0, 7, 10.0)
    # The mean counts every epoch of this job: 3 epochs in 500 s (a slow first one) -> 667 s.
    assert time_box_reached(500.0, 3, 10.0) and not time_box_reached(400.0, 3, 10.0)


@pytest.mark.timeout(30)
def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr() -> None:
    tc = load_config(["train.lr=0.1", "train.min_lr=0.001", "train.warmup_epochs=1", "train.epochs=5"]).train
    lrs = [lr_at(step, tc, steps_per_epoch=10) for step in range(50)]
    assert lrs[:3] == pytest.approx([0.01, 0.02, 0.03]) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.001, abs=2e-4)


@pytest.mark.timeout(30)
def test_class_weights_are_inverse_training_frequency() -> None:
    labels = np.array([5, 5, 5, 0, 1, 1])  # nv x3, akiec x1, bcc x2
    w = class_weights(labels)
    assert w[5] * 3 == pytest.approx(w[0]) and w[1] * 2 == pytest.approx(w[0])
    assert w[2] == 0 and w[6] == 0  # classes absent from the fold
    assert (w * torch.bincount(torch.from_numpy(labels), minlength=7)).sum() == pytest.approx(6)


@pytest.mark.timeout(30)
def test_class_weight_power_half_weighs_by_inverse_square_root_frequency() -> None:
    labels = np.array([5] * 16 + [0] * 4 + [1])  # nv x16, akiec x4, bcc x1
    w = class_weights(labels, power=0.5)
    assert w[0] == pytest.approx(2 * w[5]) and w[1] == pytest.approx(4 * w[5])
    assert (w * torch.bincount(torch.from_numpy(labels), minlength=7)).sum() == pytest.approx(len(labels))
    assert torch.all(class_weights(labels, power=0.0)[[0, 1, 5]] == 1)


@pytest.mark.timeout(30)
def test_label_smoothing_with_class_weights_weighs_each_image_by_its_class_only() -> None:
    labels = np.array([5] * 20 + [3] * 2)  # nv x20, df x2: df weighs 10x
    weight = class_weights(labels)
    target = torch.from_numpy(labels)
    smoothed = make_criterion(TrainConfig(label_smoothing=0.1), weight)
    # Without smoothing it is exactly the weighted cross-entropy.
    logits = torch.randn(len(labels), 7, generator=torch.Generator().manual_seed(0))
    plain = make_criterion(TrainConfig(label_smoothing=0.0), weight)(logits, target)
    assert make_criterion(TrainConfig(label_smoothing=1e-9), weight)(logits, target) == pytest.approx(float(plain), rel=1e-6)
    # By hand: each image's smoothed cross-entropy, weighted by its own class.
    logp = torch.log_softmax(logits, 1)
    soft = torch.full((len(labels), 7), 0.1 / 7)
    soft[torch.arange(len(labels)), target] += 0.9
    per_image = -(soft * logp).sum(1)
    expected = (weight[target] * per_image).sum() / weight[target].sum()
    assert smoothed(logits, target) == pytest.approx(float(expected), rel=1e-6)
    # The smoothing term does not pull toward the heavily weighted class: confident right answers
    # cost less than spreading probability onto df.
    right = torch.zeros(len(labels), 7)
    right[torch.arange(len(labels)), target] = 5.0
    leaning = right.clone()
    leaning[:, 3] += 2.0
    assert smoothed(right, target) < smoothed(leaning, target)


@pytest.mark.timeout(30)
def test_preemption_handlers_only_record_the_signal_and_hand_it_to_the_previous_handler() -> None:
    calls: list[int] = []
    submitit_like = lambda signum, frame: calls.append(signum)  # noqa: E731
    saved = signal.signal(signal.SIGUSR2, submitit_like), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        flag = PreemptionFlag()
        flag.install()
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process with the default handler
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.code == 2 and calls == []  # recorded only; USR2 outranks TERM
        assert flag.call_previous(signal.SIGUSR2) and calls == [signal.SIGUSR2]
        assert not flag.call_previous(signal.SIGTERM)  # SIG_DFL: nothing to call, the task stops itself
        flag.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is submitit_like
    finally:
        signal.signal(signal.SIGUSR2, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_frozen_backbone_epochs_train_only_the_head(tmp_path: Path, data_dir: Path) -> None:
    write_tiny_split(tmp_path, data_dir, per_class=(2, 1, 1))
    cfg = load_config(overrides(tmp_path, data_dir, "train.epochs=1", "model.freeze_epochs=1",
                                "train.max_steps_per_epoch=2"))
    assert train_fold(cfg)["status"] == "done"
    torch.manual_seed(cfg.train.seed)
    initial = create_model(cfg.model)
    backbone, head = backbone_and_head_params(initial)
    name_of = {id(p): n for n, p in initial.named_parameters()}
    trained = best_weights(fold_dir(cfg))
    assert all(torch.equal(trained[name_of[id(p)]], p.detach()) for p in backbone)
    assert not any(torch.equal(trained[name_of[id(p)]], p.detach()) for p in head)


@pytest.mark.timeout(30)
def test_checkpoint_with_the_old_stopped_flag_resumes_as_an_early_stop() -> None:
    old = {"epoch": 7, "stopped": True, "best_metric": 0.5, "ce_sum": 0.0}
    assert upgrade_loop_state(old) == {"epoch": 7, "stop_reason": "early_stop", "best_metric": 0.5, "ce_sum": 0.0}
    assert "stopped" in old  # the loaded state is not changed in place
    assert upgrade_loop_state({"epoch": 3, "stopped": False, "ce_sum": 0.0}) == {"epoch": 3, "ce_sum": 0.0}
    # A state that already has a reason keeps it.
    assert upgrade_loop_state({"stop_reason": "time_limit", "ce_sum": 0.0}) == {"stop_reason": "time_limit",
                                                                              "ce_sum": 0.0}
    # One count of right predictions (before the per-class tallies): the tallies restart at zero.
    assert upgrade_loop_state({"epoch": 2, "correct": 40, "seen": 64, "ce_sum": 0.0}) == {
        "epoch": 2, "class_correct": [0] * len(CLASSES), "class_seen": [0] * len(CLASSES), "ce_sum": 0.0}


@pytest.mark.timeout(30)
def test_checkpoint_older_than_train_ce_resumes_with_no_train_ce_for_the_epoch_it_cut() -> None:
    # Saved at an epoch's end: the next epoch's sum starts at zero, as in a fresh epoch.
    assert upgrade_loop_state({"epoch": 2, "step": 0, "loss_sum": 0.0})["ce_sum"] == 0.0
    # Saved inside an epoch: the steps before it have no cross-entropy summed, so none is logged.
    assert math.isnan(upgrade_loop_state({"epoch": 2, "step": 5, "loss_sum": 3.0})["ce_sum"])


@pytest.mark.timeout(30)
def test_training_balanced_accuracy_is_the_mean_recall_over_the_classes_seen() -> None:
    # class 0: 8/10 right, class 1: 1/2, class 2 not seen in the epoch.
    accuracy, balanced = train_accuracies([8, 1, 0], [10, 2, 0])
    assert accuracy == pytest.approx(9 / 12) and balanced == pytest.approx((0.8 + 0.5) / 2)
    assert train_accuracies([0, 0], [0, 0]) == (0.0, 0.0)


@pytest.mark.timeout(120)
def test_a_fold_job_prints_which_pretrained_tensors_it_loaded(tmp_path: Path) -> None:
    """The weights summary is a log line; training routes skinhpc's log to stdout (rank 0), where a
    SLURM job's output goes, as Python's default would print nothing below a warning."""
    import timm
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    code = ("from skinhpc.train import _log_to_stdout; from skinhpc.config import ModelConfig; "
            "from skinhpc.models import create_model; _log_to_stdout(); "
            f"create_model(ModelConfig(backbone='resnet18', pretrained={str(path)!r}))")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "loaded 120/122 tensors from weights file" in proc.stdout and "head re-initialised: fc.weight" in proc.stdout


@pytest.mark.timeout(120)
def test_a_fold_of_a_run_whose_images_were_edited_is_refused_before_the_shared_conversion_is_redone(
        tmp_path: Path) -> None:
    import shutil

    from skinhpc import SAMPLE_IMAGES, SAMPLE_METADATA
    from skinhpc.config import INPUTS_NAME, data_input_record
    from skinhpc.convert import convert, read_manifest, source_record
    from skinhpc.train import _converted_unless_other_data
    raw, data = tmp_path / "raw", tmp_path / "data"
    shutil.copytree(SAMPLE_IMAGES, raw / "images")
    shutil.copy2(SAMPLE_METADATA, raw / "meta.csv")
    convert([raw / "images"], raw / "meta.csv", data, workers=1)
    cfg = load_config([f"run_dir={tmp_path / 'exp'}", f"data.dir={data}", f"data.images=[{raw / 'images'}]",
                       f"data.metadata={raw / 'meta.csv'}", "fold=1"])
    trained = tmp_path / "exp" / "resnet18" / "fold0"
    trained.mkdir(parents=True)
    (trained / INPUTS_NAME).write_text(json.dumps(data_input_record(data, source_record(read_manifest(data)))))
    _converted_unless_other_data(cfg)  # the same data: up to date, nothing converted
    image = sorted((raw / "images").iterdir())[5]
    edited = bytearray(image.read_bytes())
    edited[len(edited) // 2] ^= 0xFF
    image.write_bytes(bytes(edited))
    manifest = (data / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=rf"{trained} was trained on other data .*images' content"):
        _converted_unless_other_data(cfg)  # fold 1 would join fold 0 on other pixels
    assert (data / "manifest.json").read_bytes() == manifest  # the shared conversion is left alone
