"""Checkpoints: exact round trip (model, optimizer, RNG), atomicity, fallback from a damaged newest
checkpoint, pruning, and refusing a resume whose settings changed."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from skinhpc import checkpoint
from skinhpc.checkpoint import ResumeMismatch, list_checkpoints, load_latest, save_checkpoint
from skinhpc.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
KEYS = {"train.batch_size": 32, "train.seed": 0, "world_size": 1}


def make_objects(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(5, 4)).square().mean()  # draws from the global RNG (data + dropout)
        loss.backward()
        opt.step()
        opt.zero_grad()


def save(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, keep_last: int = 5,
         keys: dict | None = None) -> Path:
    return save_checkpoint(ckpt, epoch, step, env=ENV, train_state={"global_step": epoch * 10 + step, "best": 0.5},
                           resume_keys=keys or KEYS, model=model, optimizer=opt, keep_last=keep_last)


def random_draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.timeout(60)
def test_resumed_objects_continue_exactly_like_the_uninterrupted_ones(tmp_path: Path) -> None:
    model, opt = make_objects()
    train_steps(model, opt, 3)
    save(tmp_path, model, opt, 0, 3)
    train_steps(model, opt, 2)
    expected_draws = random_draws()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = make_objects(seed=123)  # different weights and RNG: all must come from the file
    info, state = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model2, optimizer=opt2)
    assert (info.epoch, info.step, state["global_step"]) == (0, 3, 3)
    train_steps(model2, opt2, 2)
    assert random_draws() == expected_draws
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


@pytest.mark.timeout(60)
def test_folders_without_valid_meta_are_not_checkpoints(tmp_path: Path) -> None:
    model, opt = make_objects()
    good = save(tmp_path, model, opt, 1, 0)
    assert json.loads((good / "meta.json").read_text())["files"]["state.pt"] > 0
    (tmp_path / "e002-s000000").mkdir()  # killed before meta.json: never renamed in practice, but ignored
    (tmp_path / ".tmp-e003-s000000").mkdir()  # a save in progress
    assert [c.path.name for c in list_checkpoints(tmp_path)] == ["e001-s000000"]


def two_checkpoints(ckpt: Path) -> tuple[nn.Module, torch.optim.Optimizer, dict, Path]:
    """Checkpoints at steps 2 and 3 of epoch 0: (model, optimizer, the older's weights, the newest's folder)."""
    model, opt = make_objects()
    save(ckpt, model, opt, 0, 2)
    older = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, 1)
    return model, opt, older, save(ckpt, model, opt, 0, 3)


@pytest.mark.timeout(60)
def test_truncated_newest_checkpoint_falls_back_to_the_previous_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, older, newest = two_checkpoints(tmp_path)
    state_file = newest / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # a partial copy / full disk

    model2, opt2 = make_objects(seed=5)
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model2, optimizer=opt2)
    assert info.path.name == "e000-s000002"
    err = capsys.readouterr().err
    assert "WARNING" in err and "e000-s000003 is incomplete or truncated" in err
    for k, v in model2.state_dict().items():
        assert torch.equal(v, older[k]), k


@pytest.mark.timeout(60)
def test_corrupt_newest_checkpoint_of_the_right_size_falls_back_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, opt = make_objects()
    save(tmp_path, model, opt, 0, 2)
    newest = save(tmp_path, model, opt, 0, 3)
    rng_file = newest / "rank0.pt"
    rng_file.write_bytes(b"\0" * rng_file.stat().st_size)  # same size, unreadable content

    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model, optimizer=opt)
    assert info.path.name == "e000-s000002"
    err = capsys.readouterr().err
    assert "WARNING" in err and "e000-s000003 is unreadable; falling back" in err


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data: torch.load reads it without complaint
    path.write_bytes(bytes(data))


@pytest.mark.timeout(60)
def test_a_flipped_bit_in_a_checkpoint_is_caught_by_its_sha256_and_an_older_one_is_used(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, _, older, newest = two_checkpoints(tmp_path)
    checkpoint.save_best(tmp_path, model.state_dict(), {"epoch": 0})
    flip_a_bit(newest / "state.pt")
    flip_a_bit(tmp_path / "best" / "model.pt")
    torch.load(newest / "state.pt", weights_only=True)  # the damage this guards against is silent

    model2, opt2 = make_objects(seed=5)
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model2, optimizer=opt2)
    assert info.path.name == "e000-s000002"
    assert all(torch.equal(v, older[k]) for k, v in model2.state_dict().items())
    err = capsys.readouterr().err
    assert "state.pt changed since saved (sha256 differs)" in err and "e000-s000003 is unreadable" in err
    assert checkpoint.load_best(tmp_path) is None  # the caller says so and keeps the last weights


@pytest.mark.timeout(60)
def test_a_checkpoint_of_an_older_skinhpc_without_sha256_still_resumes(tmp_path: Path) -> None:
    model, opt = make_objects()
    newest = save(tmp_path, model, opt, 0, 3)
    meta = json.loads((newest / "meta.json").read_text())
    del meta["sha256"]
    (newest / "meta.json").write_text(json.dumps(meta))
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model, optimizer=opt)
    assert info.path.name == "e000-s000003"


@pytest.mark.timeout(60)
def test_only_the_newest_checkpoints_and_best_are_kept(tmp_path: Path) -> None:
    model, opt = make_objects()
    checkpoint.save_best(tmp_path, model.state_dict(), {"epoch": 0, "val_balanced_accuracy": 0.4})
    for step in range(1, 5):
        save(tmp_path, model, opt, 0, step, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "e000-s000003", "e000-s000004"]
    state, meta = checkpoint.load_best(tmp_path)
    assert meta["epoch"] == 0 and state.keys() == model.state_dict().keys()


@pytest.mark.timeout(60)
def test_resume_with_a_changed_batch_size_is_refused_naming_the_key(tmp_path: Path) -> None:
    model, opt = make_objects()
    save(tmp_path, model, opt, 0, 2)
    with pytest.raises(ResumeMismatch, match=r"train\.batch_size: 32 \(checkpoint\) vs 64 \(now\)"):
        load_latest(tmp_path, env=ENV, resume_keys={**KEYS, "train.batch_size": 64}, model=model, optimizer=opt)


@pytest.mark.timeout(60)
def test_resume_on_a_device_that_gives_other_arithmetic_is_refused_and_older_checkpoints_still_resume(
        tmp_path: Path) -> None:
    model, opt = make_objects()
    save(tmp_path / "gpu", model, opt, 0, 2, keys={**KEYS, "precision": "bfloat16"})  # precision=auto on a GPU
    with pytest.raises(ResumeMismatch, match=r"precision: 'bfloat16' \(checkpoint\) vs 'float32' \(now\).*auto means"):
        load_latest(tmp_path / "gpu", env=ENV, resume_keys={**KEYS, "precision": "float32"}, model=model, optimizer=opt)
    save(tmp_path / "old", model, opt, 0, 2)  # skinhpc < 0.2.1 recorded no precision
    info, _ = load_latest(tmp_path / "old", env=ENV, resume_keys={**KEYS, "precision": "float32"}, model=model,
                          optimizer=opt)
    assert info.step == 2


@pytest.mark.timeout(60)
def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    model, opt = make_objects()
    assert load_latest(tmp_path / "none", env=ENV, resume_keys=KEYS, model=model, optimizer=opt) is None


@pytest.mark.timeout(60)
def test_saving_the_same_position_twice_replaces_the_folder(tmp_path: Path) -> None:
    model, opt = make_objects()
    save(tmp_path, model, opt, 1, 0)
    train_steps(model, opt, 1)
    save(tmp_path, model, opt, 1, 0)
    model2, opt2 = make_objects()
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model2, optimizer=opt2)
    assert info.path.name == "e001-s000000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e001-s000000"]


@pytest.mark.timeout(60)
def test_a_checkpoint_that_fills_the_disk_leaves_no_half_folder_and_the_earlier_one_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make_objects()
    save(tmp_path, model, opt, 0, 3)

    def full_disk(obj, f) -> None:  # as torch's zip writer reports ENOSPC: wrapped in its own error
        f.write(b"x" * 100)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device") as caught:
        save(tmp_path, model, opt, 1, 0)
    assert caught.value.errno == errno.ENOSPC and ".tmp-e001-s000000" in caught.value.filename
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save_best(tmp_path, model.state_dict(), {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e000-s000003"]  # nothing half-written
    monkeypatch.undo()
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model, optimizer=opt)
    assert (info.epoch, info.step) == (0, 3)


def _weights(value: float) -> dict:
    return {"w": torch.full((3,), value)}


def test_a_best_no_checkpoint_records_yet_keeps_the_recorded_best_until_one_does(tmp_path: Path) -> None:
    # Checkpoints record best epoch 3; validations at epochs 7 and 11 improve before the next
    # checkpoint. A hard kill then resumes from the checkpoint of epoch 3 and, on a GPU, may
    # replay to another result: it must find epoch 3's weights, not a best of the dead run.
    checkpoint.save_best(tmp_path, _weights(3), {"epoch": 3})
    assert checkpoint.settle_best(tmp_path, 3) == ""
    checkpoint.save_best(tmp_path, _weights(7), {"epoch": 7}, recorded_epoch=3)
    checkpoint.save_best(tmp_path, _weights(11), {"epoch": 11}, recorded_epoch=3)
    assert checkpoint.best_epoch_of(tmp_path / "best-kept") == 3
    assert checkpoint.settle_best(tmp_path, 3) == ""  # the resume
    weights, meta = checkpoint.load_best(tmp_path)
    assert meta["epoch"] == 3 and torch.equal(weights["w"], _weights(3)["w"])
    assert not (tmp_path / "best-kept").exists()


def test_a_checkpoint_that_records_the_newer_best_drops_the_kept_one(tmp_path: Path) -> None:
    checkpoint.save_best(tmp_path, _weights(3), {"epoch": 3})
    checkpoint.save_best(tmp_path, _weights(7), {"epoch": 7}, recorded_epoch=3)
    assert checkpoint.settle_best(tmp_path, 7) == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    # A kill between that checkpoint and its settling left best-kept of epoch 3 behind: the next
    # improvement keeps epoch 7 (what the checkpoint records) in its place.
    checkpoint.save_best(tmp_path / "elsewhere", _weights(3), {"epoch": 3})
    (tmp_path / "elsewhere" / "best").rename(tmp_path / "best-kept")
    checkpoint.save_best(tmp_path, _weights(9), {"epoch": 9}, recorded_epoch=7)
    assert checkpoint.best_epoch_of(tmp_path / "best-kept") == 7
    assert checkpoint.settle_best(tmp_path, 7) == "" and checkpoint.load_best(tmp_path)[1]["epoch"] == 7


def test_best_weights_of_a_run_no_checkpoint_knows_are_dropped_and_lost_ones_are_named(tmp_path: Path) -> None:
    checkpoint.save_best(tmp_path, _weights(2), {"epoch": 2})
    assert checkpoint.settle_best(tmp_path, -1) == ""  # a start over: no checkpoint records a best
    assert checkpoint.load_best(tmp_path) is None and not (tmp_path / "best").exists()
    checkpoint.save_best(tmp_path, _weights(9), {"epoch": 9})
    warning = checkpoint.settle_best(tmp_path, 5)  # e.g. the newest checkpoint was damaged
    assert "records epoch 6 as the best, but these weights are of epoch 10" in warning


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_a_save_needs_room_for_no_more_checkpoints_than_are_kept_and_one_valid_stays_throughout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_last: int) -> None:
    """A disk with room for keep_last checkpoints must not fail at the same save after every resume."""
    model, opt = make_objects()
    seen: list[list[str]] = []
    real_save = checkpoint._torch_save

    def watched(obj, path) -> None:  # what is on disk while the new checkpoint is written
        seen.append(sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")))
        real_save(obj, path)

    for epoch in range(keep_last):
        save(tmp_path, model, opt, epoch, 0, keep_last=keep_last)
    monkeypatch.setattr(checkpoint, "_torch_save", watched)
    save(tmp_path, model, opt, keep_last, 0, keep_last=keep_last)
    newest = checkpoint.tag_of(keep_last - 1, 0)
    assert all(len(names) == max(1, keep_last - 1) and newest in names for names in seen)  # peak: max(2, keep_last)
    assert [c.path.name for c in list_checkpoints(tmp_path)] == [checkpoint.tag_of(e, 0) for e in range(1, keep_last + 1)]


@pytest.mark.timeout(60)
def test_a_save_never_removes_the_checkpoint_the_run_fell_back_to_past_a_damaged_newer_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make_objects()
    save(tmp_path, model, opt, 5, 0, keep_last=2)
    damaged = save(tmp_path, model, opt, 5, 400, keep_last=2) / checkpoint.STATE
    with open(damaged, "r+b") as f:  # bytes changed, size kept: only its sha256 tells
        f.seek(damaged.stat().st_size // 2)
        f.write(bytes(64))
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model, optimizer=opt)
    assert info.path.name == "e005-s000000"  # the fall-back

    def full_disk(obj, path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as m:  # the next save fails: what the run stands on must still be there
        m.setattr(checkpoint, "_torch_save", full_disk)
        with pytest.raises(OSError):
            save_checkpoint(tmp_path, 6, 0, env=ENV, train_state={"global_step": 60}, resume_keys=KEYS, model=model,
                            optimizer=opt, keep_last=2, protect="e005-s000000")
    info, _ = load_latest(tmp_path, env=ENV, resume_keys=KEYS, model=model, optimizer=opt)
    assert info.path.name == "e005-s000000"
    # Saving mid-epoch again (older than the damaged one): the damaged one, from a past the run
    # left, goes; the run's own checkpoints are what stays.
    for step, standing_on in ((200, "e005-s000000"), (300, "e005-s000200")):
        save_checkpoint(tmp_path, 5, step, env=ENV, train_state={"global_step": 50 + step}, resume_keys=KEYS,
                        model=model, optimizer=opt, keep_last=2, protect=standing_on)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e005-s000200", "e005-s000300"]
