"""The files of a fold's run directory that several stages read (training writes them; the
launcher, the report and the ensemble read them). Torch-free, so the launcher on a login node can
import it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

METRICS_NAME = "metrics.json"
"""Written last by a fold's training: its presence with status done means the fold is finished."""
LOG_NAME = "log.jsonl"
"""One JSON object per finished epoch."""
JOBS_PATH = Path("launch") / "jobs.json"
"""The launcher's record of a run's jobs, relative to the run directory (``launch.read_jobs``)."""
LOCKS_DIR = ".locks"
"""In the run directory: the lock files of the folds being trained (``train_lock``)."""


def train_lock(run_dir: Path, backbone: str, fold: int) -> Path:
    """The lock file of a fold, held by the process training it (``exclusive_lock``). Beside the
    fold folders, not inside: a trainer that fails during set-up leaves no fold folder behind."""
    return Path(run_dir) / LOCKS_DIR / f"{backbone}.fold{fold}.lock"


class Busy(RuntimeError):
    """Another process holds the lock; the message is what it wrote in it ("pid N on host")."""


UNNAMED_HOLDER = "another process"
"""A holder that has not yet written who it is (it took the lock a moment ago)."""


def _holder(f: Any) -> str:
    """What the holder of the lock on open file ``f`` wrote in it ("pid N on host")."""
    f.seek(0)
    return f.read().strip() or UNNAMED_HOLDER


def lock_holder(path: Path) -> str:
    """Who holds the lock on ``path`` now ("pid N on host"), or "" when nobody does."""
    try:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return ""
            except BlockingIOError:
                return _holder(f)
    except OSError:
        return ""


def _flock_soon(f: Any, patience_s: float) -> None:
    """LOCK_EX within ``patience_s``: a ``lock_holder`` look holds the lock for microseconds, and
    must not turn a trainer or launch away. BlockingIOError when it stays held."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@contextmanager
def exclusive_lock(path: Path, required: bool = True, patience_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the block, with "pid N on host" in the file; raise
    ``Busy`` when another process still holds it after ``patience_s``. The kernel releases it when
    the holder dies, however it dies, so a killed holder never blocks the next try (on a network
    filesystem, once the server notices). ``required=False``: where the filesystem refuses locks,
    go on unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            _flock_soon(f, patience_s)
        except BlockingIOError:
            raise Busy(_holder(f)) from None
        except OSError:
            if required:
                raise
            locked = False
        else:
            locked = True
        if not locked:
            yield
            return
        f.seek(0)
        f.truncate()
        try:  # unbuffered: a full disk's error is raised here, not again when the file closes
            os.write(f.fileno(), f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        except OSError as e:  # name the file, as write() does not
            fcntl.flock(f, fcntl.LOCK_UN)
            raise OSError(e.errno, e.strerror, str(path)) from None
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_metrics(fold_dir: Path) -> dict[str, Any] | None:
    """The fold's metrics.json when training finished (status done), else None."""
    metrics = read_json(Path(fold_dir) / METRICS_NAME)
    return metrics if metrics is not None and metrics.get("status") == "done" else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The epoch lines of a log.jsonl; none when it is missing. Unparseable lines (a line cut by a
    crash) are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "epoch" in entry:
            out.append(entry)
    return out


def replaces_best(select_metric: str, value: float, best: float, have_best: bool) -> bool:
    """Does a validation scoring ``value`` on ``select_metric`` (train.select_metric) replace the
    kept weights? ``last``: always; loss: when lower; the others: when higher. NaN (a metric
    undefined on this validation set) never does."""
    if select_metric == "last":
        return True
    if math.isnan(value):
        return False
    if not have_best:
        return True
    return value < best if select_metric == "loss" else value > best


def selected_key(select_metric: str) -> str:
    """The metric a validation is judged by under train.select_metric (``last`` judges none, and
    records balanced accuracy)."""
    return "balanced_accuracy" if select_metric == "last" else select_metric


def metric_value(entry: dict[str, Any], key: str) -> float:
    """``entry[key]`` as a float; NaN when it is missing or not a number (an undefined metric)."""
    try:
        return float(entry.get(key))
    except (TypeError, ValueError):
        return float("nan")


def kept_val_balanced_accuracy(rows: list[dict[str, Any]], metrics: dict[str, Any] | None,
                               select_metric: str) -> float | None:
    """Val balanced accuracy of the weights a fold keeps: metrics.json's once it is done, else
    that of the validated epoch in ``rows`` (log.jsonl) that train.select_metric picks so far."""
    val = (metrics or {}).get("val")
    if isinstance(val, dict) and isinstance(val.get("balanced_accuracy"), (int, float)):
        return float(val["balanced_accuracy"])
    key = f"val_{selected_key(select_metric)}"
    kept, best = None, float("nan")
    for row in rows:
        if not isinstance(row.get("val_balanced_accuracy"), (int, float)):
            continue  # an epoch without validation
        value = metric_value(row, key)
        if replaces_best(select_metric, value, best, have_best=kept is not None):
            kept, best = float(row["val_balanced_accuracy"]), value
    return kept


def run_layout(run_dir: Path, backbones: Sequence[str] = (), num_folds: int = 0) -> tuple[list[str], int]:
    """The backbones and fold count of a run directory: those given (its config.yaml's), the fold
    count raised to its split.json's, and every backbone folder with fold folders on disk added,
    so that nothing trained is ever ignored. ValueError names an unreadable split.json."""
    run_dir, backbones = Path(run_dir), list(backbones)
    split_path = run_dir / "split.json"
    if split_path.is_file():
        try:
            num_folds = max(num_folds, len(json.loads(split_path.read_text())["folds"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{split_path}: not a split file ({e})") from None
    for sub in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        fold_dirs = list(sub.glob("fold[0-9]*")) if sub.is_dir() else []
        if fold_dirs and sub.name not in backbones and sub.name != "ensemble":
            backbones.append(sub.name)
        for d in fold_dirs:
            if d.name[4:].isdigit():
                num_folds = max(num_folds, int(d.name[4:]) + 1)
    return backbones, num_folds


def is_other_dir(recorded: Path, run_dir: Path) -> bool:
    """Whether ``recorded`` is certainly another folder than ``run_dir``, i.e. ``run_dir`` is a copy.
    Unsure counts as the same folder: taking the run for a copy of itself would set its own live
    jobs aside and submit them twice. So a recorded folder that is absent here (moved, or not
    mounted on this node), relative, or not a directory is the same one; one that exists is
    compared by identity (``samefile``: symlinks, bind mounts), then by a probe file made in
    ``run_dir`` and looked for through ``recorded``, which also sees one folder reached through
    two NFS mounts whose device numbers differ."""
    if not recorded.is_absolute() or not recorded.is_dir():
        return False
    try:
        if os.path.samefile(recorded, run_dir):
            return False
    except OSError:
        return False
    probe = Path(run_dir) / f".same-dir-probe-{os.uname().nodename}-{os.getpid()}"
    try:
        probe.touch()
    except OSError:  # a read-only copy: no way to tell, so not set apart
        return False
    try:
        return not (recorded / probe.name).exists()
    finally:
        probe.unlink(missing_ok=True)


def _rebased(path: str, old: Path, new: Path) -> str:
    try:
        return str(new / Path(path).relative_to(old))
    except ValueError:
        return path


def own_jobs(jobs: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``jobs.json`` as it applies to ``run_dir``. A copy of a run whose original is still there
    (``is_other_dir``) keeps its log paths, rebased into the copy, but not its SLURM job ids: those
    jobs write into the original, so the copy must neither wait on them, count them as its own,
    nor cancel them. They are kept as ``copied_job_id`` and the original is named in
    ``copied_from``. A run moved away from its recorded folder keeps its ids (its jobs, if any
    still run, are the run's own to cancel); a jobs.json without ``run_dir`` is taken as it is."""
    recorded = jobs.get("run_dir")
    if not isinstance(recorded, str) or not recorded or not is_other_dir(Path(recorded), Path(run_dir)):
        return jobs
    tasks = jobs.get("tasks")
    entries = [e for e in tasks.values() if isinstance(e, dict)] if isinstance(tasks, dict) else []
    entries += [jobs[k] for k in ("convert", "ensemble") if isinstance(jobs.get(k), dict)]
    set_aside = False
    for entry in entries:
        for key in ("log", "err"):
            if isinstance(entry.get(key), str):
                entry[key] = _rebased(entry[key], Path(recorded), Path(run_dir).absolute())
        if entry.get("job_id"):
            entry["copied_job_id"] = entry.pop("job_id")
            set_aside = True
    # copied_from: for the note that the original's SLURM jobs are left to it (a local run has none)
    return {**jobs, "run_dir": os.path.abspath(run_dir), **({"copied_from": recorded} if set_aside else {})}


def fold_digests(run_dir: Path) -> dict[str, str]:
    """{"backbone/fold<k>": sha256 of its metrics.json} for every fold that has one: what an
    ensemble was made from, compared by content rather than mtime, since a copy of the run
    (``cp -r``) gives every file a new mtime but changes nothing."""
    found = {f"{p.parent.parent.name}/{p.parent.name}": metrics_digest(p.parent)
             for p in sorted(Path(run_dir).glob(f"*/fold*/{METRICS_NAME}"))}
    return {k: v for k, v in found.items() if v is not None}  # one removed meanwhile is not an input


def metrics_digest(fold_dir: Path) -> str | None:
    """sha256 of a fold's metrics.json (None without one)."""
    try:
        return hashlib.sha256((Path(fold_dir) / METRICS_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


def recorded_task_job(run_dir: Path, task_key: str) -> dict[str, Any]:
    """What the launcher recorded of a task's job in ``RUN/launch/jobs.json`` ({} when nothing):
    SLURM's ``job_id`` or a local launch's ``local_job`` and ``state``, with its ``log`` and ``err``
    (``own_jobs``: a copied run's job ids are not its own)."""
    jobs = read_json(Path(run_dir) / JOBS_PATH)
    tasks = own_jobs(jobs, Path(run_dir)).get("tasks") if isinstance(jobs, dict) else None
    entry = tasks.get(task_key) if isinstance(tasks, dict) else None
    return entry if isinstance(entry, dict) else {}
