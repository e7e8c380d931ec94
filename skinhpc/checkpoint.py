"""Atomic, exactly resumable training checkpoints of one fold.

Layout under ``<fold>/checkpoints/``::

    e{epoch:03d}-s{step:06d}/     training resumes at micro-batch ``step`` of ``epoch``
        state.pt                 DDP: model (unwrapped), optimizer, grad scaler, train state (global
                                 step = the LR schedule's input, best metric, early-stop counter, ...)
        deepspeed/...            DeepSpeed: engine.save_checkpoint on every rank (train state inside)
        rank{r}.pt               per rank: RNG states (python, numpy, torch CPU, CUDA) and the rank's
                                 own loop state (e.g. its running loss sum)
        meta.json                written last: tag, position, resume keys, size and sha256 of every file
    best/                        weights of the best epoch (model.pt + meta.json)
    best-kept/                   the best weights the newest checkpoint records, while best/ holds a
                                 newer best that no checkpoint records yet (see save_best)

Every checkpoint is written into ``.tmp-<tag>/`` and renamed when complete, so a killed job never
leaves a half-written folder under a real tag; a folder counts only when its ``meta.json`` parses and
every file it lists has the recorded size. Loading walks from the newest valid checkpoint backwards:
one that cannot be read (truncated, corrupt) or whose bytes no longer have the recorded sha256 (a
flipped bit, which ``torch.load`` reads without complaint) is skipped with a warning. Loads use
``torch.load(weights_only=True)``; DeepSpeed's own files go through ``engine.load_checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from skinhpc import distributed
from skinhpc.config import atomic_write_text, os_error_in, sha256_file
from skinhpc.distributed import DistEnv

META = "meta.json"
STATE = "state.pt"
DS_TAG = "deepspeed"
BEST = "best"
BEST_KEPT = "best-kept"
TAG_RE = re.compile(r"^e(\d{3,})-s(\d{6,})$")


class ResumeMismatch(ValueError):
    """The saved checkpoints were made with settings that cannot be resumed with the current ones."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and its metadata."""

    path: Path
    epoch: int
    step: int
    meta: dict


def tag_of(epoch: int, step: int) -> str:
    """Folder name of the checkpoint that resumes at micro-batch ``step`` of ``epoch``."""
    return f"e{epoch:03d}-s{step:06d}"


def _warn(env: DistEnv | None, message: str) -> None:
    if env is None or env.is_main:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- RNG state

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors, ints and lists (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what ``rng_state`` saved (dropout and anything else drawing from the global RNGs)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- files

def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def _torch_save(obj: Any, path: Path) -> None:
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # torch's writer wraps a full disk's OSError in "unexpected pos ..."
        cause = os_error_in(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from e


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, remove: bool = True) -> Iterator[None]:
    """A checkpoint that failed half-way (a full disk) leaves no temporary folder behind
    (``remove``: on rank 0, which made it)."""
    try:
        yield
    except OSError:
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META]


def _file_record(folder: Path) -> dict[str, dict[str, Any]]:
    """meta.json's "files" (size of each file) and "sha256" (of each file's bytes, read back
    from the page cache just after the write)."""
    files = _files(folder)
    return {"files": {str(p.relative_to(folder)): p.stat().st_size for p in files},
            "sha256": {str(p.relative_to(folder)): sha256_file(p) for p in files}}


def _corrupt_files(folder: Path, meta: dict) -> list[str]:
    """Files of a checkpoint whose bytes differ from the sha256 in its meta.json; none for
    checkpoints of older skinhpc, which recorded sizes only."""
    digests = meta.get("sha256")
    if not isinstance(digests, dict):
        return []
    return [n for n, d in digests.items() if not (folder / n).is_file() or sha256_file(folder / n) != d]


def _read_meta(folder: Path) -> dict | None:
    """The folder's meta.json when it parses and every listed file has its recorded size, else None."""
    try:
        meta = json.loads((folder / META).read_text())
        files = meta["files"]
        for rel, size in files.items():
            if (folder / rel).stat().st_size != size:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder to its final name, replacing an older folder of that name."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_dir: str | Path, env: DistEnv | None = None, warn: bool = False) -> list[CheckpointInfo]:
    """Valid checkpoints (complete meta.json, file sizes as recorded), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    out = []
    if not ckpt_dir.is_dir():
        return out
    for folder in ckpt_dir.iterdir():
        m = TAG_RE.match(folder.name)
        if not m or not folder.is_dir():
            continue
        meta = _read_meta(folder)
        if meta is None:
            if warn:
                _warn(env, f"checkpoint {folder} is incomplete or truncated (meta.json missing or file sizes "
                           "differ); ignoring it")
            continue
        out.append(CheckpointInfo(folder, int(m.group(1)), int(m.group(2)), meta))
    return sorted(out, key=lambda c: (c.epoch, c.step))


# --------------------------------------------------------------------------- save

def save_checkpoint(ckpt_dir: str | Path, epoch: int, step: int, *, env: DistEnv, train_state: dict,
                    resume_keys: dict, rank_state: dict | None = None, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scaler: Any = None,
                    engine: Any = None, keep_last: int = 2, protect: str = "") -> Path:
    """Save a resumable checkpoint; every rank must call this (DeepSpeed saves collectively).

    ``train_state`` (ints, floats, lists, dicts) carries the loop's own state: global step, best
    metric, early-stop counter; it is taken from rank 0. ``rank_state`` is this rank's own part
    (e.g. its running loss sum), saved per rank. ``resume_keys`` are the settings a resume must
    match (see ``check_resume_keys``). With ``engine`` (DeepSpeed) model and optimizer come from it;
    otherwise rank 0 writes the unwrapped ``model``, ``optimizer`` and ``scaler``. ``protect``: the
    tag of the checkpoint the caller resumed from or last wrote, known to be readable: it outlives
    this save, whatever newer-looking checkpoint (bytes damaged, sizes intact) is on disk.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(epoch, step)
    final = ckpt_dir / tag
    tmp = ckpt_dir / f".tmp-{tag}"
    if env.is_main:
        # Room first: with keep_last checkpoints on disk the new one would need a disk with room for
        # keep_last + 1, and a disk sized for keep_last would fail at the same save after every
        # resume. The readable checkpoint the run stands on (protect) stays throughout; those
        # newer than this save belong to a past the run resumed before (it fell back past them).
        if ckpt_dir.is_dir():
            prune(ckpt_dir, max(1, keep_last - 1), protect=protect, before=(epoch, step))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(env)
    with _removed_on_failure(tmp, env.is_main):
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"train_state": train_state},
                                   save_latest=False)
        elif env.is_main:
            assert model is not None and optimizer is not None
            _torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "train_state": train_state}, tmp / STATE)
        _torch_save({"rng": rng_state(env.device), "local": rank_state or {}}, tmp / _rank_file(env.rank))
        distributed.barrier(env)
        if env.is_main:
            meta = {"tag": tag, "epoch": epoch, "step": step, "global_step": train_state.get("global_step"),
                    "world_size": env.world_size, "strategy": "deepspeed" if engine is not None else "ddp",
                    "resume_keys": resume_keys, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                    **_file_record(tmp)}
            atomic_write_text(tmp / META, json.dumps(meta, indent=1) + "\n")
            _swap_in(tmp, final)
    if env.is_main:
        prune(ckpt_dir, keep_last)
    distributed.barrier(env)
    return final


def prune(ckpt_dir: Path, keep_last: int, protect: str = "", before: tuple[int, int] | None = None) -> None:
    """Keep the newest ``keep_last`` valid checkpoints (and best/) and ``protect``; remove older
    ones and leftovers. With ``before`` (epoch, step) only checkpoints up to it count; newer ones go."""
    valid = [c for c in list_checkpoints(ckpt_dir) if before is None or (c.epoch, c.step) <= before]
    keep = {c.path.name for c in valid[-keep_last:]} | {protect}
    for folder in ckpt_dir.iterdir():
        if folder.name == BEST or not folder.is_dir() or folder.name in keep:
            continue
        if TAG_RE.match(folder.name) or folder.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(folder, ignore_errors=True)


def save_best(ckpt_dir: str | Path, state_dict: dict, meta: dict, recorded_epoch: int = -1) -> None:
    """Rank 0: replace ``best/`` with these weights (+ meta.json: epoch, metric), atomically.

    A ``best/`` of ``recorded_epoch`` (the best epoch the newest checkpoint records) is moved to
    ``best-kept/`` instead: a run killed before its next checkpoint resumes from that one and
    replays the epochs since, and where the replay is not bit-identical (GPU kernels) it may not
    find the same new best; it then needs the weights its checkpoint names (``settle_best``).
    """
    ckpt_dir = Path(ckpt_dir)
    if recorded_epoch >= 0 and best_epoch_of(ckpt_dir / BEST) == recorded_epoch:
        shutil.rmtree(ckpt_dir / BEST_KEPT, ignore_errors=True)  # kept for an older checkpoint
        os.replace(ckpt_dir / BEST, ckpt_dir / BEST_KEPT)
    tmp = ckpt_dir / f".tmp-{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _removed_on_failure(tmp):
        _torch_save(state_dict, tmp / "model.pt")
        atomic_write_text(tmp / META, json.dumps({**meta, **_file_record(tmp)}, indent=1) + "\n")
    _swap_in(tmp, ckpt_dir / BEST)


def best_epoch_of(folder: Path) -> int | None:
    """The epoch a best-weights folder holds, or None when it is missing or incomplete."""
    meta = _read_meta(folder)
    epoch = meta.get("epoch") if meta is not None else None
    return epoch if isinstance(epoch, int) else None


def settle_best(ckpt_dir: str | Path, recorded_epoch: int) -> str:
    """Rank 0, after a checkpoint is written or resumed from: make ``best/`` the weights of the best
    epoch that checkpoint records (-1: none yet) and drop what no checkpoint will ask for. Returns
    a warning when those weights are gone (e.g. the newest checkpoint was damaged and an older one
    was resumed), else ""."""
    ckpt_dir = Path(ckpt_dir)
    best, kept = ckpt_dir / BEST, ckpt_dir / BEST_KEPT
    if recorded_epoch < 0:  # weights of a run that is no more: checkpoints deleted, or killed before one
        for folder in (best, kept):
            shutil.rmtree(folder, ignore_errors=True)
        return ""
    if best_epoch_of(best) == recorded_epoch:
        shutil.rmtree(kept, ignore_errors=True)
        return ""
    if best_epoch_of(kept) == recorded_epoch:
        _swap_in(kept, best)
        return ""
    held = best_epoch_of(best)
    return (f"{best}: the checkpoint records epoch {recorded_epoch + 1} as the best, but "
            + (f"these weights are of epoch {held + 1}" if held is not None else "they are missing or damaged")
            + ". A better epoch found later replaces them; else model_best.pt names the epoch it holds. (A fold "
            "killed under skinhpc < 0.2.1 between its best weights and its checkpoint is left so; nothing to do.)")


def load_best(ckpt_dir: str | Path) -> tuple[dict, dict] | None:
    """(state_dict, meta) of ``best/``, or None when there is none or it is damaged (truncated,
    other bytes than recorded, or unreadable): the caller then says so and uses the last weights."""
    folder = Path(ckpt_dir) / BEST
    meta = _read_meta(folder)
    if meta is None or _corrupt_files(folder, meta):
        return None
    try:
        return _torch_load(folder / "model.pt"), meta
    except Exception:  # torch/zip errors of a damaged file have many types
        return None


# --------------------------------------------------------------------------- resume

# Keys recorded since skinhpc 0.2.1: checkpoints of older versions, which lack them, still resume.
LATER_RESUME_KEYS = ("precision",)


def check_resume_keys(saved: dict, current: dict, where: Path) -> None:
    """Refuse to resume when a setting that shapes the training trajectory changed."""
    changed = [f"{k}: {saved.get(k)!r} (checkpoint) vs {v!r} (now)" for k, v in current.items()
               if saved.get(k) != v and not (k in LATER_RESUME_KEYS and k not in saved)]
    if "world_size" in current and saved.get("world_size") != current["world_size"]:
        changed.append("(world_size is the process count: torchrun's --nproc_per_node x --nnodes, or "
                       "cluster.nodes x cluster.gpus_per_node for a launched task)")
    if "precision" in saved and saved.get("precision") != current.get("precision"):
        changed.append("(precision is the arithmetic train.precision gives on this device: auto means "
                       "bfloat16 on a GPU, float32 on a CPU; resume on the kind of device it started on)")
    if changed:
        raise ResumeMismatch(
            f"cannot resume from {where}: {'; '.join(changed)}. These settings must match the checkpoint; "
            "set them back, or use a new run_dir (or delete the fold's checkpoints/) to start over")


def _preload(info: CheckpointInfo, env: DistEnv, deepspeed: bool) -> dict | None:
    """Read this rank's files of a checkpoint into memory; None when any is unreadable or, checked by
    rank 0 for every file (DeepSpeed's included), has other bytes than it had when saved."""
    corrupt = _corrupt_files(info.path, info.meta) if env.is_main else []
    if corrupt:
        print(f"rank {env.rank}: {info.path}: {', '.join(corrupt)} changed since saved (sha256 differs)",
              file=sys.stderr, flush=True)
        return None
    try:
        loaded = {"rank": _torch_load(info.path / _rank_file(env.rank))}
        if not deepspeed:
            loaded["state"] = _torch_load(info.path / STATE)
        return loaded
    except Exception as e:  # truncated zip, pickle error, missing file: fall back to an older one
        print(f"rank {env.rank}: cannot read {info.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def load_latest(ckpt_dir: str | Path, *, env: DistEnv, resume_keys: dict, model: torch.nn.Module | None = None,
                optimizer: torch.optim.Optimizer | None = None, scaler: Any = None,
                engine: Any = None) -> tuple[CheckpointInfo, dict] | None:
    """Restore the newest readable checkpoint into the given objects; (info, train_state) or None.

    The returned train state is rank 0's, updated with this rank's own ``rank_state``.

    All ranks agree on the checkpoint: one that any rank cannot read is skipped, with a warning,
    for the previous one. RNG states are restored last, so the caller should call this right
    before its training loop.
    """
    candidates = list_checkpoints(ckpt_dir, env, warn=True)
    for info in reversed(candidates):
        check_resume_keys(info.meta.get("resume_keys", {}), resume_keys, info.path)
        loaded = _preload(info, env, deepspeed=engine is not None)
        if distributed.any_rank(env, loaded is None):
            _warn(env, f"checkpoint {info.path} is unreadable; falling back to the previous one")
            continue
        assert loaded is not None
        if engine is not None:
            path, client = engine.load_checkpoint(str(info.path), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {info.path / DS_TAG}")
            train_state = client["train_state"]
        else:
            assert model is not None and optimizer is not None
            state = loaded["state"]
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            train_state = state["train_state"]
        set_rng_state(loaded["rank"]["rng"], env.device)
        return info, {**train_state, **loaded["rank"]["local"]}
    if candidates:
        _warn(env, f"no readable checkpoint in {ckpt_dir}: starting from scratch")
    return None
