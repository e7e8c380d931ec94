"""Run a whole cross-validated experiment with submitit: conversion, split, training, ensemble.

One launch does, on the login node, in this order:

1. **conversion** as a job of its own when the data dir holds no up-to-date ``.beton`` (else skipped);
2. **the split**, computed once from the metadata rows (CSV order = beton row order, so it is the
   same split whether the conversion already ran or not) and saved as ``RUN/split.json``; a later
   launch with another split config on the same run dir is refused;
3. **one job array** over backbone x fold (``executor.batch()``), after the conversion (``afterok``);
   each task is ``cluster.nodes`` nodes x ``cluster.gpus_per_node`` processes, whose rendezvous comes
   from the SLURM environment (``TorchDistributedEnvironment().export()``: first node of the job,
   port derived from the job id);
4. **the ensemble** job, ``afterok`` on the training tasks.

It prints the plan and the job ids and returns. Job ids go to ``RUN/launch/jobs.json``, so
``--status`` and ``--cancel`` find them and a relaunch never submits a pending or running task twice:
finished tasks (``metrics.json`` status done) are skipped, failed/cancelled/unfinished ones are
resubmitted and resume from their newest checkpoint (``train_fold`` does that). A lock file makes two
concurrent launches of one experiment safe. A relaunch whose config would mix incompatible results
(split, data, model, augmentation, training settings) is refused, naming the keys.

Preemption and time limits: SLURM sends USR2 ``cluster.signal_delay_s`` before the end; the training
loop saves a checkpoint at the next step and calls submitit's handler, which requeues the task
(``TrainTask.checkpoint`` only returns the resubmission), at most ``cluster.max_requeues`` times. An
outside ``scontrol requeue`` or a dead node restarts the task from its original pickle; it resumes
from the newest valid checkpoint on disk all the same.

``cluster.kind``: ``slurm``; ``local`` (submitit's LocalExecutor, which has no job dependencies:
conversion, then the tasks, ``cluster.local_parallel`` at a time, then the ensemble, waiting for
each; blocks until done); ``debug`` (everything in this process, sequentially, for a debugger);
``auto`` = slurm when a SLURM controller answers ``sinfo``, else local.

Test hook (documented, honest): a training task whose ``backbone/foldK`` is listed in the
environment variable ``SKINHPC_TEST_FAIL_TASKS`` (comma-separated) raises before training. The tests
use it to check the failure path (ensemble never starts, ``--status`` names the task, a relaunch
without the variable recovers). SLURM passes the launcher's environment to the jobs.

No torch import here (the dinov2 pattern): the training code is imported inside the jobs.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import _make_sbatch_string

from skinhpc import PROFILE_DIR, REPO_DIR, SAMPLE_METADATA
from skinhpc.rundir import (JOBS_PATH, LOG_NAME, METRICS_NAME, Busy, exclusive_lock, finished_metrics,
                            kept_val_balanced_accuracy, lock_holder, metrics_digest, own_jobs, read_json, read_log,
                            run_layout, train_lock)
from skinhpc.config import (
    ClusterConfig,
    FILE_KEYS,
    ConfigError,
    ExperimentConfig,
    absolute_paths,
    atomic_write_text,
    diff_keys,
    fold_config_conflicts,
    run_input_file_changes,
    for_backbone,
    mixed_config_refusal,
    pretrained_source,
    read_deepspeed_file,
    read_saved_config,
    recorded_data,
    result_keys,
    run_data_conflict,
    saved_config_changes,
    from_yaml_file,
    load_config,
    load_yaml,
    save_config,
    uses_sample,
)

FAIL_ENV = "SKINHPC_TEST_FAIL_TASKS"
LAUNCH_DIR = JOBS_PATH.parent.name
JOBS_FILE = JOBS_PATH.name
LOCK_FILE = "lock"
ACTIVE = ("pending", "running", "requeued", "suspended")
# SLURM states (squeue/sacct) → the launcher's words.
_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
_REQUEUED = {"REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PREEMPTED", "RESV_DEL_HOLD"}
_SUSPENDED = {"SUSPENDED", "STOPPED"}  # scontrol suspend, or a preemption by suspension: it resumes in place
_PREVIOUS_RUN = {"REQUEUED", "PREEMPTED", "NODE_FAIL", "TIMEOUT"}


class LaunchError(RuntimeError):
    """The launch cannot go ahead; the message says why and what to do."""


# --------------------------------------------------------------------------- config

def profile_path(name: str) -> Path:
    """``cluster.profile``: a YAML path, or a name under slurm/ (``local`` → slurm/local.yaml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"cluster profile {path} not found")
        return path
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"no cluster profile {name!r} in {PROFILE_DIR}; profiles: {', '.join(names)}; "
                          f"for a profile file of your own, give its path (cluster.profile=slurm/{name}.yaml)")
    return path


def read_profile(path: Path) -> dict[str, Any]:
    """A profile's keys (those of the cluster section), checked by name."""
    data = OmegaConf.to_container(load_yaml(path)) or {}  # invalid YAML: a ConfigError naming the line
    assert isinstance(data, dict)
    valid = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"cluster profile {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    data.pop("profile", None)
    return data


def load_launch_config(overrides: list[str], config_file: str | None = None,
                       folds: int | None = None) -> tuple[ExperimentConfig, list[str]]:
    """The experiment's config and notes to print: defaults < file < cluster profile < command line.

    ``folds`` is the ``--folds K`` shorthand for ``split.folds=K``. No data configured → the sample
    preset (load_config applies it); the notes say so.
    """
    given = [o.split("=", 1)[1].strip() for o in overrides if "=" in o and o.split("=", 1)[0].strip() == "split.folds"]
    if folds is not None and any(value.lstrip("0") != str(folds).lstrip("0") for value in given):
        raise ConfigError(f"--folds {folds} and split.folds={given[-1]} disagree: give one of them")
    overrides = list(overrides) + ([f"split.folds={folds}"] if folds is not None else [])
    cfg = load_config(overrides, config_file)
    notes = []
    if cfg.cluster.profile:
        path = profile_path(cfg.cluster.profile)
        base = OmegaConf.load(config_file) if config_file else OmegaConf.create({})
        merged = OmegaConf.merge(base, {"cluster": read_profile(path)})
        with tempfile.TemporaryDirectory() as tmp:
            # The profile sits between the config file and the command line, so a temporary file
            # holding both is loaded below the overrides.
            layered = Path(tmp) / f"config+profile-{path.stem}.yaml"
            layered.write_text(OmegaConf.to_yaml(merged))
            try:
                cfg = load_config(overrides, layered)
            except ConfigError as e:  # name the files the user wrote, not the temporary one
                raise ConfigError(str(e).replace(str(layered), " + ".join([*([str(config_file)] if config_file
                                                                              else []), f"profile {path}"]))) from None
        notes.append(f"cluster profile: {path}")
    notes += cfg.warnings()
    if uses_sample(cfg) and cfg.preset == "sample":
        notes.append("no data configured: using the sample preset (bundled 426-image HAM10000 sample, "
                     f"{', '.join(cfg.backbones)}, {cfg.model.image_size} px, {cfg.train.epochs} epochs)")
    return absolute_paths(cfg), notes


DATA_PATH_KEYS = ("data.images", "data.metadata")


def check_compatible(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse a launch whose results could not be mixed with those already in ``run_dir``."""
    try:
        # Input files are compared by what they name (a moved weights file is the same input), as
        # for each fold, and the raw download by what the conversion reads; everything else as text.
        saved, changed = saved_config_changes(run_dir / "config.yaml", cfg, [
            k for k in result_keys(cfg) if k not in FILE_KEYS and k not in DATA_PATH_KEYS])
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    if saved is None:
        return
    changed += moved_data_changes(saved, cfg)
    changed += run_input_file_changes(run_dir, saved, cfg)
    procs = [saved.cluster.processes, cfg.cluster.processes]
    if procs[0] != procs[1]:  # train.batch_size is per process: the global batch, and checkpoints, differ
        changed.append(f"processes per task (cluster.nodes x cluster.gpus_per_node): {procs[0]} -> {procs[1]}")
    if changed:
        raise LaunchError(mixed_config_refusal(run_dir, "launched", changed))


def moved_data_changes(saved: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """``data.images``/``data.metadata`` naming other paths than the run's ("key: saved -> now"),
    unless they are the same download moved: the conversion in the data dir is up to date for the
    new paths (the same metadata bytes and image names and sizes, with the same mtimes, which
    ``mv`` keeps, or else the same bytes: a copy). Other files are refused as before (the folds do
    not compare these paths: the run does it for them)."""
    differ = diff_keys(saved, cfg, list(DATA_PATH_KEYS))
    if not differ:
        return []
    from skinhpc.convert import conversion_problem

    there = (Path(cfg.data.metadata).is_file() and bool(cfg.data.images)
             and all(Path(d).is_dir() for d in cfg.data.images))  # else the conversion alone would pass
    if there and saved.data.metadata and saved.data.images:
        if data_up_to_date(cfg):  # (make_plan compares that conversion with the folds' records)
            return []
        from skinhpc.convert import raw_data_record
        if recorded_data(Path(cfg.run_dir)) and (now := raw_data_record(cfg.data, cfg.data_dir)) is not None:
            # The folds know their data by content: the new paths are the same data when it
            # matches, whatever the conversion in data.dir holds now.
            if conflict := run_data_conflict(Path(cfg.run_dir), now):
                raise LaunchError(conflict)
            return []
    if problem := conversion_problem(cfg.data_dir):
        hint = f" (no conversion in {cfg.data_dir} to compare them with: {problem}; give the run's data.dir)"
    elif not there:
        hint = " (a metadata file or image folder named is not there)"
    elif "content_sha256" not in (read_json(cfg.data_dir / "manifest.json") or {}).get("images", {}):
        d = cfg.data
        command = shlex.join(["jobs/convert.py", "--images", *d.images, "--metadata", d.metadata, "--out",
                              str(cfg.data_dir), "--max-resolution", str(d.max_resolution), "--write-mode",
                              d.write_mode, "--jpeg-quality", str(d.jpeg_quality)])
        hint = (f" (the conversion in {cfg.data_dir} was made by skinhpc < 0.2.3, which compares images by their "
                "mtimes only, and these differ: if this is a copy of the run's download, convert it once into "
                f"data.dir ({command}: the same pixels), then relaunch)")
    else:
        hint = (f" (not what the conversion in {cfg.data_dir} was made from: other image names or bytes, or "
                "another metadata file; the same download moved or copied is accepted)")
    return differ[:-1] + [differ[-1] + hint]


def slurm_answers(timeout_s: float = 10.0) -> bool:
    """sbatch is on PATH and the controller answers (SLURM packages without a running cluster do not count)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=timeout_s).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolve_kind(kind: str) -> str:
    """cluster.kind auto → slurm when a SLURM controller answers, else submitit's local executor."""
    asked = kind
    if kind == "auto" and slurm_answers():
        kind = "slurm"
    if kind == "auto":
        if shutil.which("sbatch"):
            print("note: sbatch is installed but no SLURM controller answers; running locally "
                  "(cluster.kind=local). Start one or set cluster.kind=slurm to insist.", flush=True)
        return "local"
    # submitit needs srun as well as sbatch (its executor refuses to start without it).
    missing = [tool for tool in ("sbatch", "srun") if not shutil.which(tool)]
    if kind == "slurm" and missing:
        why = "cluster.kind=slurm" if asked == "slurm" else "a SLURM controller answers (cluster.kind=auto)"
        raise LaunchError(f"{why} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH "
                          "(no SLURM here); use cluster.kind=local or start one with slurm/local/start.sh")
    return kind


# --------------------------------------------------------------------------- tasks and callables

@dataclass(frozen=True)
class Task:
    """One (backbone, fold) training task of the experiment."""

    backbone: str
    fold: int

    @property
    def key(self) -> str:
        return f"{self.backbone}/fold{self.fold}"

    def dir(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.backbone / f"fold{self.fold}"


def experiment_tasks(cfg: ExperimentConfig) -> list[Task]:
    return [Task(b, k) for b in cfg.backbones for k in range(cfg.split.folds)]


def task_config(cfg: ExperimentConfig, task: Task) -> ExperimentConfig:
    """The config one training task runs with (its backbone, fold and weights file filled in)."""
    model = dataclasses.replace(cfg.model, backbone=task.backbone)
    return for_backbone(dataclasses.replace(cfg, fold=task.fold, model=model))


def _under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


class ConvertTask:
    """Job callable: convert the raw images into the .beton (no-op when up to date)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> str:
        _interruptible()
        from skinhpc.convert import ensure_converted

        warnings = ensure_converted(self.cfg.data, self.cfg.data_dir)
        # Returned, so that a local launch shows them on its console (they are in the job's log too).
        return "\n".join([str(self.cfg.data_dir)] + [f"warning: {w}" for w in warnings])


def _interruptible() -> None:
    """Ctrl-C stops a job callable again: a local launch starts its jobs with SIGINT ignored
    (``_JOB_IGNORES``), so that submitit's controller keeps waiting for its task instead of
    killing it mid-save, and the task itself decides how to stop (the trainer: checkpoint first)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def leave_without_teardown(result_pickle: Path) -> None:
    """At interpreter exit: once submitit has saved this task's result as a success, end the process
    at once (exit status 0), skipping the interpreter's teardown.

    A process that used gloo (or NCCL, or DeepSpeed) can abort while Python shuts down, after the
    fold finished and submitit wrote its result: "terminate called without an active exception",
    a C++ thread still running when its objects are destroyed. Seen once in 20-odd CI runs, on one
    rank of a 2-node task; SLURM then recorded the job FAILED and the ensemble never started.
    Nothing is left to do at that point but flush the output. Anything that failed after the task
    returned (no result, or an error result, or an uncaught exception) keeps its own exit status.
    """
    if getattr(sys, "last_value", None) is not None:  # an uncaught exception was printed: exit 1 as usual
        return
    try:
        from submitit.core.utils import pickle_load

        status = pickle_load(result_pickle)[0]
    except Exception:  # no result written, or unreadable: let the exit say what happened
        return
    if status != "success":
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _leave_without_teardown_after_success() -> None:
    """Arm ``leave_without_teardown`` for this submitit task (atexit runs it first of all handlers,
    being the last registered, and after the non-daemon threads have been joined)."""
    if _under_submitit() and os.environ.get("SUBMITIT_FOLDER"):  # run by submitit's job runner, which saves the result
        atexit.register(leave_without_teardown, submitit.JobEnvironment().paths.result_pickle)


@contextmanager
def _signals_set(handler: Any, *signals: signal.Signals) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block, the previous handlers after it (signals can be
    set from the main thread only: elsewhere, e.g. under a debugger, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM and SIGHUP (``kill PID``, a closed terminal) end a local launch as Ctrl-C does, so
    that it stops its tasks (``stop_local_jobs``) instead of leaving them running without a lock."""
    raise KeyboardInterrupt


# SIGINT and SIGHUP are ignored while a local job starts, and its processes inherit that: a closed
# terminal hangs up the whole process group, and SIGHUP's default would kill the tasks before they
# save. The launcher stops them with SIGINT instead (``_raise_interrupt``, ``stop_local_jobs``),
# which each job callable handles again (``_interruptible``).
_JOB_IGNORES = (signal.SIGINT, signal.SIGHUP)


def _task_pids(controller_pid: int) -> list[int]:
    """The processes a submitit local controller started (its tasks); none once it is gone."""
    try:
        return [int(p) for p in Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def stop_local_jobs(jobs: list[Any], echo: Callable[[str], None], wait_s: float = 120.0) -> None:
    """After Ctrl-C in a local launch: ask each running job's tasks to stop (SIGINT: a training task
    saves a checkpoint at its next step first) and wait for them, asking again every 2 s (a task that
    was still starting had SIGINT ignored). A second Ctrl-C leaves them to it."""
    running = [job for job in jobs if not job.done()]
    if not running:
        return

    def ask_to_stop() -> None:
        for job in running:
            for pid in _task_pids(int(job.job_id)):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGINT)

    ask_to_stop()  # before anything is printed: a hung-up terminal fails the print
    with contextlib.suppress(OSError):
        echo(f"stopping {len(running)} running job(s); a training task saves a checkpoint at its next step "
             "first (Ctrl-C again not to wait)")
    deadline = time.monotonic() + wait_s
    while running and time.monotonic() < deadline:
        ask_to_stop()
        end = time.monotonic() + 2.0
        while running and time.monotonic() < end:
            time.sleep(0.1)
            running = [job for job in running if not job.done()]
    if running:
        with contextlib.suppress(OSError):
            echo(f"still running after {wait_s:.0f} s: local job(s) {', '.join(str(j.job_id) for j in running)}")


KEEP_DEVICES = "<keep>"


def _restore_visible_devices(value: str | None) -> None:
    """Set CUDA_VISIBLE_DEVICES to ``value`` (None: unset it) before anything initialises CUDA."""
    if value == KEEP_DEVICES:
        return
    if value is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = value


# What torch's env:// rendezvous reads. sbatch hands the submitting shell's environment to the job,
# so a launch from a shell that ran torchrun, or from inside an allocation, passes stale values on.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def export_rendezvous() -> None:
    """In a submitit task: MASTER_ADDR = first node of the job, MASTER_PORT from the job id,
    RANK/WORLD_SIZE/LOCAL_RANK from SLURM (or the local executor), replacing inherited values
    (submitit refuses to export over them, and would reuse an inherited MASTER_PORT). All GPUs
    stay visible: the training code picks cuda:LOCAL_RANK."""
    for key in RENDEZVOUS_VARS:
        os.environ.pop(key, None)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _check_gpus_seen(cfg: ExperimentConfig) -> None:
    """A SLURM job that asked for GPUs (cluster.use_gpus) but whose torch sees none would train on
    the CPU with train.device=auto, for its whole time limit; fail at once instead, saying why."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not cfg.cluster.use_gpus or cfg.train.device != "auto":
        return
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this job asked SLURM for GPUs (cluster.use_gpus=true) but torch {torch.__version__} sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; a driver older than "
            "torch's CUDA build, or a site that ignored the request?); to train on CPUs, launch with "
            "cluster.use_gpus=false")


class TrainTask(submitit.helpers.Checkpointable):
    """Job callable: train one (backbone, fold), resuming from its newest checkpoint.

    Each of the task's processes (nodes x processes per node) runs it; the rendezvous is exported
    from the SLURM environment before the training code is imported.
    """

    def __init__(self, cfg: ExperimentConfig, visible_devices: str | None = KEEP_DEVICES) -> None:
        self.cfg = cfg
        self.visible_devices = visible_devices
        """For local runs: the launching shell's CUDA_VISIBLE_DEVICES (None: unset), restored in
        the task, since submitit's LocalExecutor sets it to "" unless GPUs are requested, which
        hid every GPU. KEEP_DEVICES (SLURM): leave the variable as the job has it."""

    @property
    def key(self) -> str:
        return Task(self.cfg.model.backbone, self.cfg.fold).key

    def __call__(self) -> dict:
        _interruptible()
        _restore_visible_devices(getattr(self, "visible_devices", KEEP_DEVICES))
        failing = [k.strip() for k in os.environ.get(FAIL_ENV, "").split(",") if k.strip()]
        if self.key in failing:
            raise RuntimeError(f"injected failure for {self.key} ({FAIL_ENV}={os.environ[FAIL_ENV]}; test hook)")
        if _under_submitit():
            export_rendezvous()
        _check_gpus_seen(self.cfg)
        from skinhpc.train import train_fold

        result = train_fold(self.cfg)
        if result.get("status") == "interrupted":  # Ctrl-C: its checkpoint is saved; stop, as Ctrl-C does
            raise KeyboardInterrupt
        if result.get("status") != "done" and os.environ.get("RANK", "0") == "0":
            # Stopped without finishing (a signal and no submitit handler to requeue): a failed job,
            # so that the ensemble's afterok does not start on missing folds; a relaunch resumes it.
            raise RuntimeError(f"{self.key} stopped before finishing ({result}); relaunch to resume it")
        if result.get("status") == "done":
            _leave_without_teardown_after_success()
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (preemption, time limit): only the resubmission.

        Saving is the training loop's job: it saved at a step boundary on every rank before it
        handed the signal to submitit.
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class EnsembleTask:
    """Job callable: evaluate the fold ensemble of the run directory and write its report."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> dict:
        _interruptible()
        from skinhpc.ensemble import run_ensemble

        run_ensemble(self.run_dir)
        return {"report": str(Path(self.run_dir) / "ensemble" / "report.md")}


# --------------------------------------------------------------------------- run directory state

def launch_dir(run_dir: Path) -> Path:
    return run_dir / LAUNCH_DIR


def read_jobs(run_dir: Path) -> dict[str, Any]:
    """``RUN/launch/jobs.json``: the job ids of every submission (empty when none yet)."""
    path = launch_dir(run_dir) / JOBS_FILE
    if not path.is_file():
        return {"tasks": {}}
    try:
        jobs = json.loads(path.read_text())
    except ValueError as e:
        raise LaunchError(f"{path}: not valid JSON ({e}); move it away to start the bookkeeping afresh") from None
    if not isinstance(jobs, dict):
        raise LaunchError(f"{path}: not a JSON object; move it away to start the bookkeeping afresh")
    jobs.setdefault("tasks", {})
    if problem := _jobs_shape_problem(jobs):
        raise LaunchError(f"{path}: not a launcher's record ({problem}); move it away to start the bookkeeping afresh")
    return own_jobs(jobs, run_dir)


def _jobs_shape_problem(jobs: dict[str, Any]) -> str:
    """What a parsed jobs.json lacks that every reader relies on ("" when nothing)."""
    if not isinstance(jobs["tasks"], dict):
        return "'tasks' is not an object"
    bad = [key for key, entry in jobs["tasks"].items() if not isinstance(entry, dict)]
    bad += [key for key in ("convert", "ensemble") if not isinstance(jobs.get(key, {}), dict)]
    return f"the entry of {', '.join(bad)} is not an object" if bad else ""


def write_jobs(run_dir: Path, jobs: dict[str, Any]) -> None:
    """Written by this run's own launch: what a copy's jobs.json said of its original is dropped."""
    mine = {k: v for k, v in jobs.items() if k != "copied_from"}
    atomic_write_text(launch_dir(run_dir) / JOBS_FILE,
                      json.dumps({**mine, "run_dir": os.path.abspath(run_dir)}, indent=1) + "\n")


def copied_jobs_note(jobs: dict[str, Any]) -> str:
    """A run copied or moved from elsewhere (``own_jobs``): whose jobs its record names."""
    if not jobs.get("copied_from"):
        return ""
    return (f"note: this run was copied or moved from {jobs['copied_from']}: the SLURM jobs its launch/jobs.json "
            f"records write there, so they are not counted, waited on or cancelled here (for them: "
            f"--status/--cancel run_dir={jobs['copied_from']})")


def running_launch(run_dir: Path) -> str:
    """Who holds the run's launch lock now ("pid N on host"), or "" when no launch is running."""
    return lock_holder(launch_dir(run_dir) / LOCK_FILE)


def _local_launch_note(run_dir: Path, jobs: dict[str, Any]) -> str:
    """A running local launch has no SLURM jobs to show or cancel: say who runs the tasks."""
    holder = running_launch(run_dir)
    if not holder or jobs.get("kind") == "slurm":
        return ""
    pid = holder.split()[1] if holder.startswith("pid ") else "its process"
    return (f"a local launch ({holder}) is running this run's tasks itself: stop it with Ctrl-C in its "
            f"terminal or `kill {pid}`; what finished is kept")


@contextmanager
def launch_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock of the run: a second launch stops instead of double-submitting."""
    path = launch_dir(run_dir) / LOCK_FILE
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(path))
        except Busy as e:  # only the taking of the lock: a Busy from the launch itself is its own
            raise LaunchError(f"another launch of {run_dir} is in progress ({e}, lock {path}); "
                              "nothing submitted — check with --status when it is done") from None
        yield


def task_done(run_dir: Path, task: Task) -> bool:
    return finished_metrics(task.dir(run_dir)) is not None


def ensemble_current(run_dir: Path, done: list[Task]) -> bool:
    """RUN/ensemble/metrics.json exists, covers every finished task and was made from what each of
    them holds now: else the ensemble job must run (again), e.g. after an interrupted one."""
    path = run_dir / "ensemble" / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        # A fold the ensemble left out although it had finished (its predictions damaged, trained
        # otherwise) counts as covered until it is trained again: another ensemble would leave it
        # out again. One left out unfinished is covered only by an ensemble run since it finished.
        left_out_done = [f for f in metrics.get("missing", []) if f.get("done")]
        covered = {(f["backbone"], int(f["fold"])) for f in metrics["finished"] + left_out_done}
        return all((t.backbone, t.fold) in covered and _seen_by_ensemble(run_dir, t, metrics, path) for t in done)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _seen_by_ensemble(run_dir: Path, task: Task, ens_metrics: dict[str, Any], ens_path: Path) -> bool:
    """Whether the ensemble read the task's metrics.json as it is now: by content (``fold_digests``,
    recorded since 0.2.2, so a copied run is not ensembled again), else by mtime."""
    recorded = ens_metrics.get("fold_digests")
    if isinstance(recorded, dict):
        now = metrics_digest(task.dir(run_dir))
        return now is not None and recorded.get(task.key) == now
    try:
        return (task.dir(run_dir) / "metrics.json").stat().st_mtime <= ens_path.stat().st_mtime
    except OSError:  # removed meanwhile
        return False


def _finished_elsewhere(run_dir: Path, keys: set[str]) -> list[Task]:
    """The run's finished tasks other than ``keys`` (e.g. of a backbone launched before, not now)."""
    found = (Task(p.parent.parent.name, int(p.parent.name[4:])) for p in run_dir.glob("*/fold*/metrics.json")
             if p.parent.name[4:].isdigit())
    return [t for t in found if t.key not in keys and task_done(run_dir, t)]


def _weights_misfits(configs: list[ExperimentConfig]) -> list[str]:
    """``models.weights_problem`` of each backbone's weights file, once per backbone and file."""
    if not configs:
        return []
    from skinhpc.models import weights_problem  # imports torch and timm, as the backbone check before it

    files = {(c.model.backbone, c.model.pretrained): c.model for c in configs}
    return [why for model_cfg in files.values() if (why := weights_problem(model_cfg))]


PER_BACKBONE_FILES = ("With several backbones, name each one's file with {backbone}, e.g. "
                      "model.pretrained=weights/{backbone}.pth")


def check_task_configs(cfg: ExperimentConfig, tasks: list[Task]) -> None:
    """Refuse a launch that would resume or reuse a fold trained with other settings (e.g. by hand
    with jobs/train.py in a run directory the launcher has no config of)."""
    run_dir = Path(cfg.run_dir)
    if tasks:  # a backbone timm does not know would fail its tasks only after their wait in the queue
        from skinhpc.models import unknown_backbone  # imports torch and timm: only when there is work

        unknown = [why for b in sorted({t.backbone for t in tasks}) if (why := unknown_backbone(b))]
        if unknown:
            raise LaunchError("\n".join(unknown))
    configs = {t: task_config(cfg, t) for t in tasks}
    conflicts = [c for t, c_ in configs.items() if (c := fold_config_conflicts(t.dir(run_dir), c_))]
    if conflicts:
        raise LaunchError("\n".join(conflicts))
    # A missing weights file would fail every task of its backbone on the compute nodes.
    missing = sorted({f"{t.backbone}: {source}" for t, c in configs.items()
                      if (source := pretrained_source(c.model.pretrained)) not in ("", "hub")
                      and not Path(source).is_file()})
    if missing:
        raise LaunchError(f"model.pretrained: weights file(s) not found: {'; '.join(missing)}. {PER_BACKBONE_FILES}")
    if misfits := _weights_misfits(list(configs.values())):
        hint = f"\n{PER_BACKBONE_FILES}" if len(cfg.backbones) > 1 else ""
        raise LaunchError("model.pretrained: weights that do not fit their backbone:\n" + "\n".join(misfits) + hint)
    if tasks and cfg.train.strategy == "deepspeed":  # as the tasks read it (train.deepspeed_config)
        try:
            read_deepspeed_file(cfg.train.deepspeed.config)
        except ConfigError as e:
            raise LaunchError(str(e)) from None


def data_up_to_date(cfg: ExperimentConfig) -> bool:
    """Does the data dir hold an up-to-date conversion of the configured images (or the sample)?"""
    from skinhpc import convert

    d = cfg.data
    if (raw := convert.raw_inputs(d)) is None:  # used as it is, while its files are all there
        return not convert.conversion_problem(cfg.data_dir)
    return convert.is_up_to_date(*raw, cfg.data_dir, **convert.conversion_settings(d))


def data_stale_reason(cfg: ExperimentConfig) -> str:
    """Why the data dir needs a conversion (``convert.stale_reason``), for the plan's line."""
    from skinhpc import convert

    d = cfg.data
    if (raw := convert.raw_inputs(d)) is None:
        return f"no usable conversion: {convert.conversion_problem(cfg.data_dir)}"
    return convert.stale_reason(*raw, cfg.data_dir, **convert.conversion_settings(d))


def check_data_unchanged(cfg: ExperimentConfig, up_to_date: bool) -> None:
    """Refuse a relaunch whose data differ in content from what the run's folds trained on (their
    inputs.json), e.g. images edited under the same paths: the conversion would be made anew and
    new folds mixed with old ones. Image bytes are read only when a fold recorded its data, the
    conversion is not up to date, and its manifest does not know the images by their mtimes."""
    from skinhpc import convert

    if not recorded_data(Path(cfg.run_dir)):
        return
    if up_to_date:
        try:
            now = convert.source_record(convert.read_manifest(cfg.data_dir))
        except (OSError, ValueError):  # InputError is a ValueError
            return
    elif (now := convert.raw_data_record(cfg.data, cfg.data_dir)) is None:
        return
    if conflict := run_data_conflict(Path(cfg.run_dir), now):
        raise LaunchError(conflict)


def index_rows(cfg: ExperimentConfig, converted: bool) -> Any:
    """Metadata rows in beton row order (image_id, lesion_id, dx) for the split.

    Rows of index.csv are those of the metadata CSV in CSV order, so reading the CSV gives the same
    split as the converted index, and the split can be made before the conversion job has run.
    """
    from skinhpc.split import read_metadata

    if converted and (cfg.data_dir / "index.csv").is_file():
        from skinhpc.convert import read_index

        return read_index(cfg.data_dir)
    if cfg.data.metadata:
        return read_metadata(cfg.data.metadata)
    if uses_sample(cfg):
        return read_metadata(SAMPLE_METADATA)
    from skinhpc.convert import conversion_problem
    raise LaunchError(f"data.dir={cfg.data.dir} holds no usable conversion ({conversion_problem(cfg.data_dir)}) "
                      "and no raw data is configured (data.images, data.metadata): if the conversion was moved, "
                      "pass data.dir=<its new folder>; else convert again with jobs/convert.py, or set "
                      "data.images and data.metadata for the launch to convert")


def checked_inputs(cfg: ExperimentConfig, converted: bool) -> Any:
    """``index_rows``, once every image folder of a pending conversion is known to exist: what the
    launch reads on the login node, so that a wrong path fails here, not in the conversion job
    after its wait in the queue."""
    if not converted:
        missing = [d for d in cfg.data.images if not Path(d).is_dir()]
        if missing:
            raise LaunchError(f"data.images: image folder not found: {', '.join(missing)}")
    return index_rows(cfg, converted)


# --------------------------------------------------------------------------- SLURM queries

def _run(cmd: list[str]) -> str:
    return _answer(cmd) or ""


def _answer(cmd: list[str]) -> str | None:
    """The command's stdout, or None when it failed or did not answer in time."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass
class JobInfo:
    """What SLURM says about one job id (array elements as ``<array>_<index>``)."""

    slurm_state: str = ""
    reason: str = ""
    previous_runs: int = 0
    live: bool = False


def query_jobs(job_ids: list[str], waits: Mapping[str, Sequence[str]] | None = None) -> dict[str, JobInfo]:
    """squeue (live jobs, arrays expanded) + sacct (finished jobs, requeue history) for the job ids
    recorded for one run; ``waits`` (``recorded_waits``) for ``mark_stalled``."""
    info: dict[str, JobInfo] = {}
    ids = sorted({j for j in job_ids if j})
    if not ids or not shutil.which("squeue"):
        return info
    live = _answer(["squeue", "-h", "-r", "-o", "%i|%T|%r", "--me"])
    if live is None:  # every recorded job would look gone, and running tasks would be submitted twice
        raise LaunchError(f"squeue did not answer (jobs {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} "
                          "are recorded for this run); without their states nothing was submitted, cancelled or "
                          "shown: try again when SLURM answers")
    for line in live.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in ids:
            info[parts[0]] = JobInfo(slurm_state=parts[1], reason=parts[2], live=True)
    bases = sorted({j.split("_")[0] for j in ids})
    # sacct may fail where accounting is off: jobs squeue lacks are then simply not running.
    out = _run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State", "-j", ",".join(bases)])
    rows = [(parts[0], parts[1].split()[0]) for line in out.splitlines()
            if len(parts := line.strip().split("|")) == 2 and parts[1].split()]
    for row_id, state in rows:
        for job_id in sacct_row_ids(row_id, ids):
            entry = info.setdefault(job_id, JobInfo())
            if state in _PREVIOUS_RUN:
                entry.previous_runs += 1
            if not entry.live:
                entry.slurm_state = state
    # An array none of whose tasks ever started can read as one row under the array's own id.
    whole = {row_id: state for row_id, state in rows if row_id.isdigit()}
    for job_id in ids:
        base, _, index = job_id.partition("_")
        if index and base in whole and job_id not in info:
            info[job_id] = JobInfo(slurm_state=whole[base])
    return mark_stalled(info, waits or {})


def mark_stalled(info: dict[str, JobInfo], waits: Mapping[str, Sequence[str]]) -> dict[str, JobInfo]:
    """``info`` with each job that is pending on a Dependency marked DependencyNeverSatisfied when a
    job of its afterok list (``waits``: job id -> the ids it waits for, as recorded) can never
    succeed. SLURM says so only of a job whose own dependency ended unfinished: after a failed
    conversion its training tasks read DependencyNeverSatisfied, but the ensemble, which waits for
    those still-pending tasks, reads Dependency for ever."""
    for job_id, deps in waits.items():
        i = info.get(job_id)
        if (i is not None and i.live and i.slurm_state == "PENDING" and i.reason.strip() == "Dependency"
                and any(never_succeeds(info.get(d)) for d in deps)):
            info[job_id] = dataclasses.replace(i, reason="DependencyNeverSatisfied")
    return info


def recorded_waits(jobs: dict[str, Any]) -> dict[str, list[str]]:
    """Job id -> the job ids its afterok waits for, of the run's jobs that record them (the ensemble)."""
    ens = jobs.get("ensemble") or {}
    return {ens["job_id"]: list(ens.get("depends_on") or [])} if ens.get("job_id") else {}


def recorded_states(jobs: dict[str, Any]) -> dict[str, JobInfo]:
    """``query_jobs`` for every job recorded in the run's jobs.json, its ensemble's afterok list included."""
    return query_jobs(recorded_job_ids(jobs), recorded_waits(jobs))


_ARRAY_ROW = re.compile(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]")


def sacct_row_ids(row_id: str, ids: Iterable[str]) -> list[str]:
    """Which of ``ids`` one sacct row is about. Array tasks that never started share one row,
    ``132_[0-3,5%2]`` (e.g. an array cancelled while it waited for its conversion), or ``132`` when
    none of them did (``query_jobs``): each of them is in that row's state."""
    m = _ARRAY_ROW.fullmatch(row_id)
    if m is None:
        return [row_id] if row_id in ids else []
    spans = [(int(lo), int(hi or lo)) for lo, _, hi in (part.partition("-") for part in m.group(2).split(",") if part)]
    base, covered = m.group(1), []
    for job_id in ids:
        head, _, index = job_id.partition("_")
        if head == base and index.isdigit() and any(lo <= int(index) <= hi for lo, hi in spans):
            covered.append(job_id)
    return covered


def settled_jobs(job_ids: list[str], waits: Mapping[str, Sequence[str]] | None = None, wait_s: float = 60.0,
                 poll_s: float = 2.0) -> dict[str, JobInfo]:
    """``query_jobs``, once no job is COMPLETING (up to ``wait_s``): a job that was just cancelled
    and one being requeued both read COMPLETING for a few seconds, and only what follows tells
    whether its task must be submitted again. Still COMPLETING after the wait counts as running
    (never a second copy of a task)."""
    deadline = time.monotonic() + wait_s
    while True:
        infos = query_jobs(job_ids, waits)
        if not any(i.live and i.slurm_state == "COMPLETING" for i in infos.values()) or time.monotonic() >= deadline:
            return infos
        time.sleep(poll_s)


def job_state(info: JobInfo | None) -> str:
    """pending / running / requeued / suspended / failed / cancelled / completed / unknown."""
    if info is None or not info.slurm_state:
        return "unknown"
    s = info.slurm_state
    if info.live:
        if s in _RUNNING:
            return "running"
        if s in _SUSPENDED:
            return "suspended"
        if s in _REQUEUED or (s == "PENDING" and info.previous_runs):
            return "requeued"
        return "pending"
    if s == "COMPLETED":
        return "completed"
    if s.startswith("CANCELLED"):
        return "cancelled"
    return "failed"


def pending_reason(info: JobInfo | None) -> str:
    """SLURM's reason for a pending job, when it says more than "waiting for its turn": a limit
    the job can never fit (PartitionTimeLimit), a quota (AssocGrpGRES, QOSMax...), a drained node."""
    reason = info.reason.strip() if info is not None else ""
    return "" if reason in ("", "None", "Priority", "Resources", "Dependency", "BeginTime") else reason


def _held_reason(info: JobInfo | None) -> str:
    """Why a kept job may not run on its own (the plan says so): SLURM's reason for a pending job
    held or over a limit (``pending_reason``), or that it is suspended."""
    state = job_state(info)
    if state == "suspended":
        return "suspended"
    reason = pending_reason(info) if state == "pending" else ""
    return f"pending ({reason})" if reason else ""


def dependency_never_satisfied(info: JobInfo | None) -> bool:
    return bool(info and info.live and "DependencyNeverSatisfied" in info.reason)


def never_succeeds(info: JobInfo | None) -> bool:
    """Ended unfinished (failed, cancelled), or waits for a job that did (afterok never satisfied)."""
    return dependency_never_satisfied(info) or job_state(info) in ("failed", "cancelled")


# --------------------------------------------------------------------------- executors

def slurm_parameters(cluster: ClusterConfig, *, name: str, nodes: int, tasks_per_node: int, cpus: int,
                     time_min: int, gpus: bool, dependency: str = "") -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its own names) for one kind of job: the training jobs
    (``gpus``) or the CPU-only ones, which take no constraint nor train_sbatch_extra and run in
    cpu_partition when it is set."""
    params: dict[str, Any] = {
        "job_name": name, "time": time_min, "nodes": nodes, "ntasks_per_node": tasks_per_node,
        "cpus_per_task": cpus, "signal_delay_s": cluster.signal_delay_s,
        "wckey": cluster.wckey or None,  # None: no --wckey line (submitit's default is 'submitit')
    }
    if gpus and cluster.use_gpus:
        params["gpus_per_node"] = cluster.gpus_per_node
    values = {"partition": cluster.partition if gpus else (cluster.cpu_partition or cluster.partition),
              "account": cluster.account, "qos": cluster.qos, "constraint": cluster.constraint if gpus else ""}
    params.update({key: value for key, value in values.items() if value})
    if cluster.mem_gb:
        params["mem"] = f"{cluster.mem_gb}GB"
    if dependency:
        params["dependency"] = dependency
    # srun of SLURM 22.05-23.02 does not inherit the job's --cpus-per-task: without this each rank
    # could be bound to one core and its FFCV decoding threads starved.
    params["srun_args"] = [f"--cpus-per-task={cpus}"]
    extra = {"requeue": True} if gpus else {}  # training requeues itself, also where JobRequeue=0
    extra.update(sbatch_extra(cluster.sbatch_extra))
    if gpus:
        extra.update(sbatch_extra(cluster.train_sbatch_extra, "cluster.train_sbatch_extra"))
    if extra:
        params["additional_parameters"] = extra
    # The package must be importable on the nodes; the job runs this very interpreter (the venv's).
    params["setup"] = [*cluster.setup, f"export PYTHONPATH={shlex.quote(str(REPO_DIR))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    return params


# sbatch options the launcher sets for every job and relies on: given again in sbatch_extra they
# would silently win (a --time that submitit's requeue logic does not know, a task count that is
# not the process count, a second array or dependency). Others (--mem, --qos, --partition, ...)
# may be given for one kind of job, e.g. in train_sbatch_extra.
SBATCH_MANAGED = {
    "time": "cluster.time_min (training) or cluster.ensemble_time_min", "nodes": "cluster.nodes",
    "ntasks-per-node": "cluster.gpus_per_node", "ntasks": "cluster.nodes x cluster.gpus_per_node",
    "cpus-per-task": "cluster.cpus_per_task (training) or cluster.ensemble_cpus", "signal": "cluster.signal_delay_s",
    "array": None, "dependency": None, "job-name": None, "output": None, "error": None, "open-mode": None,
}


def sbatch_extra(lines: list[str], setting: str = "cluster.sbatch_extra") -> dict[str, Any]:
    """``['--exclusive', '--mail-type=FAIL']`` → submitit's additional_parameters."""
    extra: dict[str, Any] = {}
    for line in lines:
        opt = line.strip()
        if opt.startswith("#SBATCH"):
            opt = opt[len("#SBATCH"):].strip()
        if not opt.startswith("--"):
            raise ConfigError(f"{setting}: {line!r} must be a long sbatch option such as --exclusive or --key=value"
                              " (an option whose value has commas is one item: "
                              f"{setting}=['--mail-type=END,FAIL'])")
        key, sep, value = opt[2:].partition("=")
        if key in SBATCH_MANAGED:
            use = SBATCH_MANAGED[key]
            raise ConfigError(f"{setting}: {line!r} is set by the launcher" + (f": use {use}" if use else
                                                                                " itself and cannot be changed"))
        extra[key] = value if sep else True
    return extra


def task_parameters(cfg: ExperimentConfig, dependency: str = "") -> dict[str, Any]:
    c = cfg.cluster
    return slurm_parameters(c, name=f"skinhpc-train-{Path(cfg.run_dir).name}", nodes=c.nodes,
                            tasks_per_node=c.gpus_per_node, cpus=c.cpus_per_task, time_min=c.time_min,
                            gpus=True, dependency=dependency)


def convert_parameters(cfg: ExperimentConfig) -> dict[str, Any]:
    c = cfg.cluster
    return slurm_parameters(c, name=f"skinhpc-convert-{Path(cfg.run_dir).name}", nodes=1, tasks_per_node=1,
                            cpus=c.cpus_per_task, time_min=c.ensemble_time_min, gpus=False)


def ensemble_parameters(cfg: ExperimentConfig, dependency: str = "") -> dict[str, Any]:
    c = cfg.cluster
    return slurm_parameters(c, name=f"skinhpc-ensemble-{Path(cfg.run_dir).name}", nodes=1, tasks_per_node=1,
                            cpus=c.ensemble_cpus, time_min=c.ensemble_time_min, gpus=False, dependency=dependency)


def submitit_folder(run_dir: Path) -> Path:
    return launch_dir(run_dir) / "submitit"


def submitit_command(folder: Path) -> str:
    """The command submitit's SlurmExecutor puts in every script (this interpreter, i.e. the venv)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(folder: Path, params: dict[str, Any], array_size: int | None = None) -> str:
    """The sbatch script submitit would submit with these parameters (an array when array_size)."""
    extra = {"map_count": array_size} if array_size and array_size > 1 else {}
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **params, **extra)


def slurm_executor(cfg: ExperimentConfig, params: dict[str, Any]) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=submitit_folder(Path(cfg.run_dir)), max_num_timeout=cfg.cluster.max_requeues)
    ex.update_parameters(**params)
    return ex


# --------------------------------------------------------------------------- plan

@dataclass
class Plan:
    """What a launch will do, computed from the run directory and SLURM's view of recorded jobs."""

    kind: str
    run_dir: Path
    convert: str                     # "skip" (up to date) | "submit" | "wait:<job id>"
    submit: list[Task] = field(default_factory=list)
    active: dict[str, str] = field(default_factory=dict)     # task key → job id, pending/running
    others: dict[str, str] = field(default_factory=dict)     # the same, of backbones not in this launch
    done: list[Task] = field(default_factory=list)
    ensemble: str = "submit"         # "submit" | "skip" (done) | "wait:<job id>"
    cancel_ensemble: str = ""        # stale ensemble job to cancel before submitting a new one
    stale: list[str] = field(default_factory=list)  # pending jobs that can never start: cancelled
    tasks: list[Task] = field(default_factory=list)
    convert_reason: str = ""         # why the data need a conversion ("submit")
    held: dict[str, str] = field(default_factory=dict)  # task key → why SLURM holds its kept job (JobHeldAdmin...)

    def lines(self) -> list[str]:
        out = [f"run dir: {self.run_dir} ({self.kind})"]
        conv = {"skip": "data up to date, no conversion job",
                "submit": "conversion job (" + "; ".join(
                    [*([self.convert_reason] if self.convert_reason else []),
                     *(["the training array waits for it"] if self.submit else [])]) + ")"}.get(
            self.convert, f"conversion job {self.convert[5:]} still queued/running: training waits for it")
        out.append(f"convert: {conv}")
        out.append(f"train: {len(self.tasks)} task(s) = {len({t.backbone for t in self.tasks})} backbone(s) x "
                   f"{len({t.fold for t in self.tasks})} fold(s): {len(self.submit)} to submit, "
                   f"{len(self.active)} queued/running, {len(self.done)} done")
        for t in self.submit:
            resumes = any((t.dir(self.run_dir) / "checkpoints").glob("e*-s*"))
            out.append(f"  submit {t.key}" + (" (resumes from its checkpoint)" if resumes else ""))
        for key, job in self.active.items():
            out.append(f"  keep   {key} (job {job}" + (f"; {self.held[key]}" if key in self.held else "") + ")")
        for key, job in self.others.items():
            out.append(f"  keep   {key} (job {job}; a backbone of the run not in this launch's backbones)")
        after = "(afterok)" if self.kind == "slurm" else "(once they all finished)"
        ens = {"submit": f"ensemble job after all training tasks {after}",
               "skip": "ensemble done, nothing to do"}.get(self.ensemble, f"ensemble job {self.ensemble[5:]} already waiting")
        out.append(f"ensemble: {ens}")
        return out


def make_plan(cfg: ExperimentConfig, kind: str, jobs: dict[str, Any], infos: dict[str, JobInfo]) -> Plan:
    run_dir = Path(cfg.run_dir)
    tasks = experiment_tasks(cfg)
    check_task_configs(cfg, tasks)
    plan = Plan(kind=kind, run_dir=run_dir, convert="skip", tasks=tasks)

    def alive(job: str) -> bool:
        """Pending or running, and able to start (a job whose afterok failed never will)."""
        if kind != "slurm" or not job or job_state(infos.get(job)) not in ACTIVE:
            return False
        if dependency_never_satisfied(infos.get(job)):
            plan.stale.append(job)
            return False
        return True

    up_to_date = data_up_to_date(cfg)
    check_data_unchanged(cfg, up_to_date)
    if not up_to_date:
        conv = jobs.get("convert", {}).get("job_id", "")
        plan.convert = f"wait:{conv}" if alive(conv) else "submit"
        plan.convert_reason = data_stale_reason(cfg) if plan.convert == "submit" else ""
    for t in tasks:
        job = jobs["tasks"].get(t.key, {}).get("job_id", "")
        if task_done(run_dir, t):
            plan.done.append(t)
        elif alive(job):
            plan.active[t.key] = job
            if held := _held_reason(infos.get(job)):
                plan.held[t.key] = held
        elif holder := lock_holder(lock := train_lock(run_dir, t.backbone, t.fold)):
            # Not one of this launch's queued jobs: e.g. the task of a local launch that was killed.
            raise LaunchError(f"{t.backbone} fold {t.fold} is being trained by {holder} ({t.dir(run_dir)}); wait "
                              f"for it to end or stop it, then launch again (if its node is down, delete {lock})")
        else:
            plan.submit.append(t)
    # Backbones launched into the run before but not in this launch: not planned, but the ensemble
    # waits for their running tasks and covers their finished ones.
    keys = {t.key for t in tasks}
    plan.others = {key: e.get("job_id", "") for key, e in jobs["tasks"].items()
                   if key not in keys and alive(e.get("job_id", ""))}
    ens_job = jobs.get("ensemble", {}).get("job_id", "")
    ens_active = kind == "slurm" and job_state(infos.get(ens_job)) in ACTIVE
    ens_done = ensemble_current(run_dir, plan.done + _finished_elsewhere(run_dir, keys))
    if plan.submit:  # (a conversion alone changes no prediction the ensemble reads)
        plan.ensemble = "submit"
        plan.cancel_ensemble = ens_job if ens_active else ""
    elif ens_active and not dependency_never_satisfied(infos.get(ens_job)):
        plan.ensemble = f"wait:{ens_job}"
    elif ens_done and not plan.active and not plan.others and not ens_active:
        plan.ensemble = "skip"
    else:
        plan.ensemble = "submit"
        plan.cancel_ensemble = ens_job if ens_active else ""
    return plan


# --------------------------------------------------------------------------- launch

def recorded_job_ids(jobs: dict[str, Any]) -> list[str]:
    ids = [v.get("job_id", "") for v in jobs["tasks"].values()]
    ids += [jobs.get(k, {}).get("job_id", "") for k in ("convert", "ensemble")]
    return [i for i in ids if i]


def launch(cfg: ExperimentConfig, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> Plan:
    """Launch (or relaunch) the experiment ``cfg``; see the module docstring. Returns the plan."""
    kind = resolve_kind(cfg.cluster.kind) if not dry_run else ("slurm" if cfg.cluster.kind == "auto" else cfg.cluster.kind)
    if kind == "slurm":
        check_signal_delay(cfg.cluster)
    run_dir = Path(cfg.run_dir)
    if dry_run:
        _check_or_remake(run_dir, cfg, echo)
        return _dry_run(cfg, kind, echo)
    with launch_lock(run_dir):
        remake = _check_or_remake(run_dir, cfg, echo)  # under the lock: another launch may just have saved
        if kind == "slurm":
            if pretrained_source(cfg.model.pretrained) == "hub":
                echo("note: model.pretrained=true downloads the ImageNet weights on the compute nodes, which "
                     "fails where they are offline (after the wait in the queue): fetch the files on this node "
                     "and pass model.pretrained=weights/{backbone}.pth (README, 'Running on a real cluster')")
            return _launch_slurm(cfg, echo, remake)
        return _launch_inline(cfg, kind, echo, remake)


def check_signal_delay(cluster: ClusterConfig) -> None:
    """Every SLURM job gets USR2 cluster.signal_delay_s before its limit: past half of it, a task
    would spend more of each allocation told to stop than training, and requeue until max_requeues.
    (A local launch does not use it: submitit's local executor warns its tasks by itself.)"""
    for key in ("time_min", "ensemble_time_min"):
        limit = getattr(cluster, key)
        if cluster.signal_delay_s > limit * 30:
            raise LaunchError(f"cluster.signal_delay_s={cluster.signal_delay_s} must be at most half of cluster.{key}="
                              f"{limit} minutes ({limit * 30} s): SLURM sends USR2 that long before the limit")


def _check_or_remake(run_dir: Path, cfg: ExperimentConfig, echo: Callable[[str], None]) -> bool:
    """``check_compatible``, unless no task of the run has started (``nothing_started``, returned):
    then another config, or other data, makes the run's config and split anew, said in a note."""
    remake = nothing_started(run_dir)
    try:
        check_compatible(run_dir, cfg)
    except LaunchError as e:
        if not remake:
            raise
        echo(f"note: no task of {run_dir} has started, so its config is made anew ({e})")
    return remake


def nothing_started(run_dir: Path) -> bool:
    """No task of the run has trained (no fold folder holds a config.yaml) and no job of it is
    queued or running: its split and config pin no result yet, so a launch may make them anew
    (e.g. after a conversion failed on a bad CSV, the CSV mended). Jobs that ended or that SLURM
    says can never start (their conversion failed) do not count; a SLURM that does not answer,
    or a job it does not know, does."""
    if not (run_dir / "config.yaml").is_file() or any(run_dir.glob("*/fold*/config.yaml")):
        return False
    jobs = read_jobs(run_dir)
    ids = recorded_job_ids(jobs)  # SLURM's, also for a local launch after a SLURM one
    try:
        infos = recorded_states(jobs)
    except LaunchError:  # squeue does not answer: its jobs may still run
        return False
    # A completed job of a run whose folds hold no config.yaml is its conversion: the data it wrote
    # are checked like any other. (An ensemble waiting for tasks that can never start: mark_stalled.)
    return all(never_succeeds(infos.get(j)) or job_state(infos.get(j)) == "completed" for j in ids)


def _prepare_run(cfg: ExperimentConfig, converted: bool, remake: bool = False, running: Iterable[str] = ()) -> None:
    """Split (once; anew with ``remake``, see ``nothing_started``) and the run's config, both saved
    in the run directory before any job starts."""
    from skinhpc.split import ensure_split

    ensure_split(cfg.run_dir, checked_inputs(cfg, converted), cfg.split, remake=remake)
    save_config(cfg if remake else _with_saved_backbones(cfg, set(running)), Path(cfg.run_dir) / "config.yaml")


def _with_saved_backbones(cfg: ExperimentConfig, running: set[str]) -> ExperimentConfig:
    """``cfg`` with the backbones of the run's config.yaml that have work in the run (a fold
    folder, or a job queued or running): a relaunch with fewer (to resubmit one backbone's folds)
    plans only those, but must not hide the others from --status and the ensemble. A backbone
    without any is dropped, as before; one with folds is dropped by moving its folder away."""
    path = Path(cfg.run_dir) / "config.yaml"
    if not path.is_file():
        return cfg
    saved = from_yaml_file(path).backbones
    has_work = {b for b in saved if b in running or any((Path(cfg.run_dir) / b).glob("fold[0-9]*"))}
    merged = [*(b for b in saved if b in cfg.backbones or b in has_work), *(b for b in cfg.backbones if b not in saved)]
    return cfg if merged == list(cfg.backbones) else dataclasses.replace(cfg, backbones=merged)


def _launch_slurm(cfg: ExperimentConfig, echo: Callable[[str], None], remake: bool = False) -> Plan:
    run_dir = Path(cfg.run_dir)
    jobs = read_jobs(run_dir)
    plan = make_plan(cfg, "slurm", jobs, settled_jobs(recorded_job_ids(jobs), recorded_waits(jobs)))
    _prepare_run(cfg, converted=plan.convert == "skip", remake=remake, running={k.split("/")[0] for k in plan.others})
    if note := copied_jobs_note(jobs):
        echo(note)
    for line in plan.lines():
        echo(line)
    jobs["kind"] = "slurm"  # write_jobs records the run_dir
    convert_job = plan.convert[5:] if plan.convert.startswith("wait:") else ""
    if plan.stale:
        _run(["scancel", *plan.stale])
        echo(f"cancelled job(s) that could never start (a job they wait for failed): {' '.join(plan.stale)}")
    if plan.cancel_ensemble and plan.cancel_ensemble not in plan.stale:
        _run(["scancel", plan.cancel_ensemble])
        echo(f"cancelled stale ensemble job {plan.cancel_ensemble}")
    if plan.convert == "submit":
        with _sbatch("the conversion job", run_dir):
            job = slurm_executor(cfg, convert_parameters(cfg)).submit(ConvertTask(cfg))
        convert_job = job.job_id
        jobs["convert"] = {"job_id": job.job_id, "log": str(job.paths.stderr), "submitted": time.time()}
        write_jobs(run_dir, jobs)
        echo(f"submitted conversion job {job.job_id}")
    if plan.submit:
        dep = f"afterok:{convert_job}" if convert_job else ""
        ex = slurm_executor(cfg, task_parameters(cfg, dep))
        with _sbatch("the training array", run_dir), ex.batch():
            submitted = [ex.submit(TrainTask(task_config(cfg, t))) for t in plan.submit]
        for t, job in zip(plan.submit, submitted):
            jobs["tasks"][t.key] = {"job_id": job.job_id, "log": str(job.paths.stdout),
                                    "err": str(job.paths.stderr), "submitted": time.time()}
            plan.active[t.key] = job.job_id
        write_jobs(run_dir, jobs)
        what = "array" if len(submitted) > 1 or "_" in submitted[0].job_id else "job"  # submitit submits one task plainly
        echo(f"submitted training {what} {submitted[0].job_id.split('_')[0]}: "
             + ", ".join(f"{t.key}={j.job_id}" for t, j in zip(plan.submit, submitted)))
    if plan.ensemble == "submit":
        waits = set(plan.active.values()) | set(plan.others.values())
        deps = sorted(waits | ({convert_job} if convert_job and not waits else set()))
        dep = "afterok:" + ":".join(deps) if deps else ""
        with _sbatch("the ensemble job", run_dir):
            job = slurm_executor(cfg, ensemble_parameters(cfg, dep)).submit(EnsembleTask(str(run_dir)))
        jobs["ensemble"] = {"job_id": job.job_id, "log": str(job.paths.stdout), "err": str(job.paths.stderr),
                            "depends_on": deps, "submitted": time.time()}
        write_jobs(run_dir, jobs)
        echo(f"submitted ensemble job {job.job_id}" + (f" ({dep})" if dep else ""))
    if not plan.submit and plan.ensemble != "submit" and plan.convert != "submit":
        echo("nothing to submit")
    echo(f"follow with: python jobs/launch.py --status run_dir={run_dir}")
    return plan


@contextmanager
def _sbatch(what: str, run_dir: Path) -> Iterator[None]:
    """sbatch's refusal (a wrong account or partition, a controller down) as a LaunchError that
    quotes it; what was submitted before is recorded, so a rerun goes on from there."""
    try:
        yield
    except (FailedJobError, subprocess.CalledProcessError, OSError) as e:
        said = str(getattr(e, "stderr", None) or e).strip()
        raise LaunchError(f"sbatch refused {what}: {said}\nJobs submitted before it are recorded in "
                          f"{launch_dir(run_dir) / JOBS_FILE}; fix the cause (e.g. the cluster profile's account "
                          "or partition) and rerun the same command.") from None


def local_gpus() -> list[str]:
    """The GPUs local tasks may use: CUDA_VISIBLE_DEVICES's entries when set, else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    n = sum(line.startswith("GPU ") for line in proc.stdout.splitlines()) if proc.returncode == 0 else 0
    return [str(i) for i in range(n)]


def slot_devices(slot: int, per_task: int, gpus: list[str]) -> str | None:
    """CUDA_VISIBLE_DEVICES of the local task in parallel slot ``slot``: its own ``per_task`` GPUs
    while there are enough, else shared round-robin; None (unset) on a machine without GPUs."""
    if not gpus:
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    if per_task >= len(gpus):
        return ",".join(gpus)
    return ",".join(gpus[(slot * per_task + j) % len(gpus)] for j in range(per_task))


def _launch_inline(cfg: ExperimentConfig, kind: str, echo: Callable[[str], None], remake: bool = False) -> Plan:
    """local / debug: conversion, then the tasks (cluster.local_parallel at once), then the ensemble."""
    run_dir = Path(cfg.run_dir)
    plan = make_plan(cfg, kind, {"tasks": {}}, {})
    if cfg.cluster.nodes > 1 and kind == "local":
        raise LaunchError("cluster.kind=local runs on this machine only: cluster.nodes must be 1")
    if cfg.cluster.processes > 1 and kind == "debug":
        raise LaunchError("cluster.kind=debug trains in this one process: cluster.nodes and cluster.gpus_per_node "
                          "must be 1 (cluster.kind=local runs several processes per task)")
    _prepare_run(cfg, converted=plan.convert == "skip", remake=remake)
    if kind == "local":
        _record_queued(run_dir, [t.key for t in plan.submit] + (["ensemble"] if plan.ensemble == "submit" else []))
    for line in plan.lines():
        echo(line)
    folder = submitit_folder(run_dir)

    started: list[Any] = []

    def submit(name: str, fn: Callable[[], Any], tasks_per_node: int = 1) -> Any:
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeues)
        ex.update_parameters(timeout_min=cfg.cluster.time_min, tasks_per_node=tasks_per_node, nodes=1)
        with _signals_set(signal.SIG_IGN, *_JOB_IGNORES):
            job = ex.submit(fn)
        started.append(job)
        echo(f"{name}: local job {job.job_id}, log {job.paths.stdout}")
        return job

    def result(name: str, job: Any) -> Any:
        try:
            return job.results()[0]
        except Exception as e:  # the task's traceback is in its log
            reason = _failure_reason(e)
            if reason.startswith("KeyboardInterrupt"):
                # The job was stopped by SIGINT (its checkpoint saved), e.g. a Ctrl-C the launcher
                # itself ignores (started with SIGINT ignored, as `&` in a script does): the launch
                # stops as after its own Ctrl-C, not as after a failure.
                with contextlib.suppress(OSError):
                    echo(f"{name}: stopped by an interrupt")
                raise KeyboardInterrupt from None
            raise LaunchError(f"{name} failed: {reason} (log {job.paths.stderr})") from None

    def run(name: str, where: str, fn: Callable[[], Any]) -> Any:
        if kind == "debug":
            return fn()
        job = submit(name, fn)
        _record_local(run_dir, where, job, "running")
        try:
            out = result(name, job)
        except LaunchError:
            _record_local(run_dir, where, job, "failed")
            raise
        _record_local(run_dir, where, job, "done")
        return out

    try:
        with _signals_set(_raise_interrupt, signal.SIGTERM, signal.SIGHUP):
            if plan.convert == "submit":
                echo(f"conversion: {run('conversion', 'convert', ConvertTask(cfg))}")
            if kind == "debug":
                for t in plan.submit:
                    TrainTask(task_config(cfg, t))()
            else:
                _run_local_tasks(cfg, plan.submit, submit, result, echo)
            if plan.ensemble == "submit":
                run("ensemble", "ensemble", EnsembleTask(str(run_dir)))
    except KeyboardInterrupt:
        stop_local_jobs(started, echo)
        raise
    finally:
        if kind == "local":
            _unqueue(run_dir)  # what it did not get to
    echo(f"report: {run_dir / 'ensemble' / 'report.md'}")
    return plan


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)(?::|$)")


def _failure_reason(error: Exception) -> str:
    """The exception of a failed submitit job, all its lines (an InputError lists every bad row):
    the job's message holds the task's traceback between two dashed lines, then the log paths."""
    lines = str(error).strip().splitlines()
    dashes = [i for i, line in enumerate(lines) if line.strip().startswith("-----")]
    if len(dashes) >= 2:
        inside = lines[dashes[0] + 1:dashes[1]]
        # The last exception raised starts at the last unindented "module.SomeError: ..." line.
        starts = [i for i, line in enumerate(inside) if _EXCEPTION_LINE.match(line)]
        reason = [line.rstrip() for line in inside[starts[-1] if starts else -1:] if line.strip()]
        if reason:
            return "\n".join(reason)
    lines = [line.strip() for line in lines]
    return lines[-1] if lines and lines[-1] else repr(error)


def _run_local_tasks(cfg: ExperimentConfig, tasks: list[Task], submit: Callable[..., Any],
                     result: Callable[[str, Any], Any], echo: Callable[[str], None]) -> None:
    """Training tasks as local jobs, cluster.local_parallel at a time, each slot with its GPUs.

    After a failure no new task starts; the running ones finish (their checkpoints stay useful to
    a relaunch), then the first failure is raised."""
    per_task, parallel = cfg.cluster.gpus_per_node, cfg.cluster.local_parallel
    # One task at a time keeps the shell's GPUs as they are (cuda:LOCAL_RANK picks them): no GPU
    # list, so slot_devices hands on the shell's CUDA_VISIBLE_DEVICES.
    gpus = local_gpus() if parallel > 1 else []
    pending, running, failures = list(tasks), {}, []
    while running or (pending and not failures):  # after a failure nothing pending starts
        while pending and not failures and len(running) < parallel:
            slot = min(set(range(parallel)) - running.keys())
            t = pending.pop(0)
            task = TrainTask(task_config(cfg, t), visible_devices=slot_devices(slot, per_task, gpus))
            running[slot] = (t, submit(f"train {t.key}", task, per_task))
            _record_local(Path(cfg.run_dir), t.key, running[slot][1], "running")
        finished = [slot for slot, (_, job) in running.items() if job.done()]
        if not finished:
            time.sleep(0.5 if parallel > 1 else 0.1)
            continue
        for slot in finished:
            t, job = running.pop(slot)
            try:
                result(f"train {t.key}", job)
                _record_local(Path(cfg.run_dir), t.key, job, "done")
                if parallel > 1:
                    echo(f"train {t.key}: done")
            except LaunchError as e:
                _record_local(Path(cfg.run_dir), t.key, job, "failed")
                failures.append(e)
                # Nothing pending starts now, nor the ensemble: not "queued" while the others finish.
                _unqueue(Path(cfg.run_dir), [p.key for p in pending] + ["ensemble"])
    if failures:
        if pending:
            echo(f"not started after the failure: {', '.join(t.key for t in pending)}")
        raise failures[0]


def _record_local(run_dir: Path, where: str, job: Any, state: str) -> None:
    """A local job and its state in jobs.json ("local_job": no SLURM id to query), for --status and
    the ensemble's list of missing folds: without it a failed local task looked never submitted.
    ``where``: a task's key, "convert" or "ensemble"."""
    jobs = read_jobs(run_dir)
    _entries_of(jobs, where)[where] = {"local_job": str(job.job_id), "state": state, "log": str(job.paths.stdout),
                                       "err": str(job.paths.stderr), "time": time.time()}
    jobs["kind"] = "local"
    write_jobs(run_dir, jobs)


def _entries_of(jobs: dict[str, Any], where: str) -> dict[str, Any]:
    """The part of jobs.json that holds the entry of ``where``: a task's key, "convert" or "ensemble"."""
    return jobs if where in ("convert", "ensemble") else jobs["tasks"]


def _record_queued(run_dir: Path, where: list[str]) -> None:
    """The tasks (keys) and ensemble a local launch will run once a slot is free, for --status: it
    shows them "queued" while the launch runs, not "not submitted" as if nothing would run them."""
    jobs = read_jobs(run_dir)
    for key in where:
        entries = _entries_of(jobs, key)
        # What an earlier launch recorded (e.g. a job that failed before its fold began) comes back
        # should this launch end without running it (_unqueue).
        entries[key] = {"state": "queued", "time": time.time(), "before": entries.get(key, {})}
    jobs["kind"] = "local"
    write_jobs(run_dir, jobs)


def _unqueue(run_dir: Path, keys: Sequence[str] | None = None) -> None:
    """Entries a local launch recorded queued (of ``keys``, or all) back to what they were: the
    launch will not run them (a task failed, or it is ending)."""
    jobs = read_jobs(run_dir)
    changed = False
    for key in [*jobs["tasks"], "ensemble"]:
        entries = _entries_of(jobs, key)
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("state") == "queued" and (keys is None or key in keys):
            before = entry.get("before")
            if isinstance(before, dict) and before:
                entries[key] = before
            else:
                del entries[key]
            changed = True
    if changed:
        write_jobs(run_dir, jobs)


def _written_since(output: Path, entry: dict[str, Any]) -> bool:
    """Whether a local job's output exists and is its own or newer: a stopped or failed job whose
    work was then done by hand (jobs/ensemble.py, jobs/convert.py) reads done. A running job's
    older output does not count."""
    try:
        written = output.stat().st_mtime
    except OSError:
        return False
    return entry.get("state") == "done" or (entry.get("state") != "running" and written >= entry.get("time", math.inf))


def _local_state(entry: dict[str, Any], finished: bool, launch_running: bool) -> str:
    """The state of a local launch's job (``_record_local``) as --status shows it."""
    if finished:
        return "done"
    state = entry.get("state", "")
    if state == "done":
        return "failed"  # it ended well but its output is gone (deleted, or moved by hand)
    if state == "running" and not launch_running:
        return "stopped"  # its launch ended before the job did (Ctrl-C, kill)
    return state


def _dry_run(cfg: ExperimentConfig, kind: str, echo: Callable[[str], None]) -> Plan:
    """The plan and the sbatch scripts submitit would submit; nothing is submitted, and nothing
    written but what any check of the data writes: a conversion's manifest noting a copy of the
    download whose bytes it compared (``convert._refresh_images``)."""
    run_dir = Path(cfg.run_dir)
    jobs = read_jobs(run_dir)
    plan = make_plan(cfg, kind, jobs, recorded_states(jobs) if kind == "slurm" else {})
    checked_inputs(cfg, converted=plan.convert == "skip")  # the real launch's first reads
    echo("DRY RUN: nothing is submitted")
    if note := copied_jobs_note(jobs):
        echo(note)
    for line in plan.lines():
        echo(line)
    if kind != "slurm":
        return plan
    folder = submitit_folder(run_dir)
    convert_dep = "afterok:<conversion job>" if plan.convert == "submit" else (
        f"afterok:{plan.convert[5:]}" if plan.convert.startswith("wait:") else "")
    scripts = []
    if plan.convert == "submit":
        scripts.append(("conversion job", sbatch_script(folder, convert_parameters(cfg))))
    if plan.submit:
        scripts.append((f"training array ({len(plan.submit)} tasks)",
                        sbatch_script(folder, task_parameters(cfg, convert_dep), len(plan.submit))))
    if plan.ensemble == "submit":
        deps = sorted({*plan.active.values(), *plan.others.values()}) + (["<training array>"] if plan.submit else [])
        scripts.append(("ensemble job", sbatch_script(folder, ensemble_parameters(cfg, "afterok:" + ":".join(deps) if deps else ""))))
    for title, script in scripts:
        echo(f"----- sbatch script: {title}")
        echo(script.rstrip("\n"))
    return plan


# --------------------------------------------------------------------------- status and cancel

@dataclass
class TaskStatus:
    task: Task
    job_id: str
    state: str
    epoch: str
    best_val_bacc: str
    log: str
    reason: str = ""  # SLURM's reason for a pending job (PartitionTimeLimit, ...), or why a fold reads unfinished

    @property
    def shown_state(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason else self.state


def _task_row(cfg: ExperimentConfig, t: Task, entry: dict[str, Any], infos: dict[str, JobInfo],
              local_launch_running: bool) -> TaskStatus:
    run_dir = Path(cfg.run_dir)
    job = entry.get("job_id", "")
    reason = ""
    rows = read_log(t.dir(run_dir) / LOG_NAME)
    metrics = finished_metrics(t.dir(run_dir))
    if entry.get("local_job"):  # a local launch's task (_record_local)
        job = f"local {entry['local_job']}"
    if metrics is not None:
        state = "done"
    elif entry.get("local_job"):
        state = _local_state(entry, False, local_launch_running)
    elif entry.get("state") == "queued" and local_launch_running:
        state = "queued"  # waits for a slot of the running local launch (_record_queued)
    elif not job:
        state = "started" if rows else "not submitted"
    else:
        info = infos.get(job)
        state = job_state(info)
        state = "failed" if state == "completed" else state  # ended without metrics.json
        # Cancelled, ended or being requeued: SLURM tells which once it is no longer COMPLETING.
        state = "completing" if info is not None and info.live and info.slurm_state == "COMPLETING" else state
        state = "blocked" if dependency_never_satisfied(info) else state  # its conversion failed
        reason = pending_reason(info) if state == "pending" else ""
        if state == "failed" and info is not None and info.slurm_state not in ("FAILED", "COMPLETED"):
            reason = info.slurm_state  # TIMEOUT (out of requeues), OUT_OF_MEMORY, NODE_FAIL...
    if metrics is None and not entry.get("job_id") and lock_holder(train_lock(run_dir, t.backbone, t.fold)):
        state = "running"  # a local or hand-run trainer, e.g. the task of a local launch that was killed
    if metrics is None and state != "running" and not reason and (t.dir(run_dir) / METRICS_NAME).is_file() \
            and read_json(t.dir(run_dir) / METRICS_NAME) is None:
        reason = f"its {METRICS_NAME} is unreadable"  # damaged after the fold finished: a relaunch redoes its end
    if metrics is not None and isinstance(metrics.get("epochs_trained"), int):
        epoch = f"{metrics['epochs_trained']}/{cfg.train.epochs}"  # also when log.jsonl lost its last line
    else:
        epoch = f"{max(int(r.get('epoch', 0)) for r in rows) + 1}/{cfg.train.epochs}" if rows else f"0/{cfg.train.epochs}"
    kept = kept_val_balanced_accuracy(rows, metrics, cfg.train.select_metric)
    best = f"{kept:.4f}" if kept is not None else "-"
    log = entry.get("err", "") if state in ("failed", "cancelled", "stopped") else entry.get("log", "")
    own_log = t.dir(run_dir) / LOG_NAME  # a fold never started has none yet: no path to look in
    return TaskStatus(t, job or "-", state, epoch, best, log or (str(own_log) if own_log.is_file() else "-"), reason)


def _shown_log(log: str, state: str) -> str:
    """A log path as --status shows it, marked when there is no such file: SLURM creates a job's log
    only when the job starts (a pending one's is "not written yet"; a job cancelled before it
    started never wrote one)."""
    if log == "-" or Path(log).exists():
        return log
    return f"{log} (not written yet)" if state in ACTIVE or state == "blocked" else f"{log} (no such file)"


def _ensemble_state(run_dir: Path, entry: dict[str, Any], info: JobInfo | None, has_metrics: bool,
                    local_running: bool) -> str:
    """The ensemble's state as --status shows it, from its jobs.json entry, SLURM and its output."""
    if entry.get("state") == "queued" and local_running:
        return "queued"  # the running local launch runs it after the tasks (_record_queued)
    if entry.get("local_job"):  # a local launch's ensemble (_record_local)
        return _local_state(entry, _written_since(run_dir / "ensemble" / "metrics.json", entry), local_running)
    if has_metrics and not (info and info.live):
        return "done"
    if dependency_never_satisfied(info):
        return "blocked"  # status's lines below say which task it waits for
    return job_state(info) if entry.get("job_id") else "not submitted"


def _conversion_line(entry: dict[str, Any], data_dir: Path, infos: dict[str, JobInfo], local_running: bool) -> str:
    """--status's line for the run's conversion job ("" when the launch submitted none)."""
    if entry.get("local_job"):
        state = _local_state(entry, _written_since(data_dir / "manifest.json", entry), local_running)
        return (f"conversion: job local {entry['local_job']} {state}"
                + (f", log {entry.get('err', '')}" if state in ("failed", "stopped") else ""))
    if entry.get("job_id"):
        state = job_state(infos.get(entry["job_id"]))
        state = "done" if state == "completed" else state
        return (f"conversion: job {entry['job_id']} {state}"
                + (f", log {entry.get('log', '')}" if state in ("failed", "cancelled") else ""))
    return ""


def status(cfg: ExperimentConfig) -> tuple[str, dict[str, Any]]:
    """A table per task merged from SLURM (squeue, sacct) and the run directory, plus the ensemble."""
    run_dir = Path(cfg.run_dir)
    jobs = read_jobs(run_dir)
    # The run's own backbones and folds (the command line may not repeat them); a ConfigError names
    # the file, and a newer skinhpc that wrote it.
    saved_cfg = read_saved_config(run_dir / "config.yaml")
    if saved_cfg is not None:
        cfg = dataclasses.replace(cfg, backbones=saved_cfg.backbones, split=saved_cfg.split, train=saved_cfg.train)
    else:
        cfg = _hand_made_layout(cfg)
    infos = recorded_states(jobs)
    local_running = jobs.get("kind") != "slurm" and bool(running_launch(run_dir))
    rows = [_task_row(cfg, t, jobs["tasks"].get(t.key, {}), infos, local_running) for t in experiment_tasks(cfg)]
    head = ("backbone", "fold", "job", "state", "epoch", "kept val bacc", "log")
    table = [head] + [(r.task.backbone, str(r.task.fold), r.job_id, r.shown_state, r.epoch, r.best_val_bacc,
                       _shown_log(r.log, r.state)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = [f"run dir: {run_dir}" + ("" if run_dir.is_dir() else " (does not exist: nothing launched there yet)")]
    if note := copied_jobs_note(jobs):
        lines.append(note)
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    ens_entry = jobs.get("ensemble", {})
    ens_job = ens_entry.get("job_id", "")
    ens_metrics = read_json(run_dir / "ensemble" / "metrics.json")
    ens_info = infos.get(ens_job)
    ens_state = _ensemble_state(run_dir, ens_entry, ens_info, ens_metrics is not None, local_running)
    if ens_entry.get("local_job"):  # a local launch's ensemble (_record_local)
        ens_job = f"local {ens_entry['local_job']}"
    failed = [r for r in rows if r.state in ("failed", "cancelled")]
    data_dir = saved_cfg.data_dir if saved_cfg is not None else cfg.data_dir
    if conv_line := _conversion_line(jobs.get("convert", {}), data_dir, infos, local_running):
        lines.append(conv_line)
    ens_reason = pending_reason(ens_info) if ens_state == "pending" else ""
    lines.append(f"ensemble: job {ens_job or '-'} {ens_state}" + (f" ({ens_reason})" if ens_reason else "")
                 + (f", log {_shown_log(ens_entry['err'], ens_state)}" if ens_state in ("failed", "stopped", "cancelled")
                    and ens_entry.get("err") else ""))
    if note := _local_launch_note(run_dir, jobs):
        lines.append(note)
    conv_state = job_state(infos.get(jobs.get("convert", {}).get("job_id", "")))
    if conv_state in ("failed", "cancelled") and any(r.state == "blocked" for r in rows):
        what = "failed; mend what its log names and" if conv_state == "failed" else "was cancelled;"
        lines.append(f"  the training tasks and the ensemble can never start: the conversion job they wait for "
                     f"{what} relaunch (the same jobs/launch.py command)")
    elif dependency_never_satisfied(ens_info) and all(r.state == "done" for r in rows):
        # SLURM recorded a training job as failed although its fold finished (e.g. a signal that
        # came after the fold had written its metrics.json): afterok never fires.
        lines.append("  the ensemble job can never start (DependencyNeverSatisfied): SLURM recorded a training "
                     "job as failed although its fold finished; relaunch (the same jobs/launch.py command) "
                     "to submit a new ensemble job")
    elif dependency_never_satisfied(ens_info) or (failed and ens_state in ACTIVE):
        lines.append("  the ensemble job can never start (DependencyNeverSatisfied): a training task it waits "
                     "for did not finish:")
    for r in failed:
        lines.append(f"  {r.shown_state}: {r.task.key} (job {r.job_id}), log {_shown_log(r.log, r.state)}")
    if failed:
        lines.append(f"  relaunch (jobs/launch.py with backbones including {', '.join(sorted({r.task.backbone for r in failed}))}) "
                     "to resubmit them and a new ensemble job")
    if any(r.reason == "TIMEOUT" for r in failed):
        c = (saved_cfg or cfg).cluster  # what the newest launch used
        lines.append(f"  TIMEOUT: the time limit (cluster.time_min={c.time_min}) came without a requeue: the task had used "
                     f"cluster.max_requeues={c.max_requeues}, or saving took longer than cluster.signal_delay_s="
                     f"{c.signal_delay_s}; the relaunch resumes it from its newest checkpoint (a larger "
                     "cluster.time_min needs fewer requeues)")
    if ens_state in ("failed", "cancelled") and not failed:
        lines.append("  relaunch (the same jobs/launch.py command) to submit a new ensemble job")
    if ens_state == "completed":  # not "done": its outputs were deleted or damaged since
        lines.append(f"  its outputs ({run_dir / 'ensemble' / 'metrics.json'}) are missing or unreadable: relaunch "
                     "(the same jobs/launch.py command) to submit a new ensemble job")
    if ens_state == "done" and ens_metrics:
        lines += ["  " + line for line in ensemble_headline(ens_metrics)]
        lines += _left_out_lines(cfg, ens_metrics)
        lines.append(f"  report: {run_dir / 'ensemble' / 'report.md'}")
    summary = {"tasks": {r.task.key: dataclasses.asdict(r) | {"task": r.task.key} for r in rows},
               "ensemble": {"job_id": ens_job, "state": ens_state}, "failed": [r.task.key for r in failed]}
    return "\n".join(lines), summary


def _left_out_lines(cfg: ExperimentConfig, ens_metrics: dict[str, Any]) -> list[str]:
    """The folds the ensemble left out, with its reasons: a finished fold left out (its predictions
    damaged) reads "done" in the table above, and the headline numbers lack it."""
    run_dir, lines = Path(cfg.run_dir), []
    ens_path = run_dir / "ensemble" / "metrics.json"
    if not ens_path.is_file():  # deleted since status read it
        return []
    for m in ens_metrics.get("missing", []):
        t = Task(str(m.get("backbone")), int(m.get("fold", -1)))
        line = f"  left out of the ensemble: {t.key}: {m.get('reason')}"
        if task_done(run_dir, t) and m.get("done") and _seen_by_ensemble(run_dir, t, ens_metrics, ens_path):
            line += _redo_advice(t.dir(run_dir), m.get("trained_otherwise", True))
        elif task_done(run_dir, t):
            line += "; it has finished since: relaunch to ensemble it too"
        lines.append(line)
    return lines


def _redo_advice(fold_dir: Path, trained_otherwise: bool) -> str:
    """How to have a finished fold whose outputs are damaged write them again: from its newest
    checkpoint when it kept one (a fold without metrics.json resumes, then writes its outputs),
    else by training it anew, as a fold trained with other settings must be (an ensemble of
    skinhpc < 0.2.4 does not say which it was: trained anew)."""
    from skinhpc.checkpoint import list_checkpoints
    kept = list_checkpoints(fold_dir / "checkpoints") if (fold_dir / "checkpoints").is_dir() else []
    if kept and not trained_otherwise:
        return (f"; to write its outputs again, delete {fold_dir / METRICS_NAME} and relaunch: it resumes from its "
                f"newest readable checkpoint ({kept[-1].path.name} is the newest)")
    return f"; to train it again, move {fold_dir} away and relaunch"


def _hand_made_layout(cfg: ExperimentConfig) -> ExperimentConfig:
    """A run without config.yaml (its folds trained by hand with jobs/train.py): the folds of its
    split.json and the backbones of its fold folders, not the command line's defaults."""
    run_dir = Path(cfg.run_dir)
    try:
        found, folds = run_layout(run_dir)
    except ValueError:  # an unreadable split.json: the ensemble names it
        return cfg
    if not folds and not found:
        return cfg
    backbones = [*(b for b in cfg.backbones if b in found), *(b for b in found if b not in cfg.backbones)] or cfg.backbones
    split_cfg = dataclasses.replace(cfg.split, folds=folds) if folds >= 2 else cfg.split  # split.folds >= 2
    train = cfg.train  # epochs and select_metric as the folds were trained, not the defaults
    for path in sorted(run_dir.glob("*/fold[0-9]*/config.yaml")):
        with contextlib.suppress(ConfigError):
            if (fold_cfg := read_saved_config(path)) is not None:
                train = fold_cfg.train
                break
    return dataclasses.replace(cfg, backbones=backbones, split=split_cfg, train=train)


def ensemble_headline(metrics: dict[str, Any]) -> list[str]:
    """One line per ensemble entry of RUN/ensemble/metrics.json (``report.shown_test_entries``):
    test balanced accuracy first."""
    from skinhpc.report import shown_test_entries
    lines = []
    for name, m in shown_test_entries(metrics):
        nums = "  ".join(f"{k} {m[k]:.4f}" for k in ("balanced_accuracy", "top1", "auroc_macro")
                         if isinstance(m.get(k), (int, float)))
        lines.append(f"{name}: {nums}")
    return lines


def cancel(cfg: ExperimentConfig, echo: Callable[[str], None] = print) -> list[str]:
    """scancel the experiment's pending and running jobs (training, conversion, ensemble)."""
    run_dir = Path(cfg.run_dir)
    jobs = read_jobs(run_dir)
    if note := copied_jobs_note(jobs):
        echo(note)
    infos = recorded_states(jobs)
    active = [j for j in recorded_job_ids(jobs) if job_state(infos.get(j)) in ACTIVE]
    if active:
        subprocess.run(["scancel", *active], check=False)
        echo(f"cancelled {len(active)} job(s): {' '.join(active)}")
    elif note := _local_launch_note(run_dir, jobs):
        # Nothing was cancelled and the run goes on: not a success for a script that asked to stop it.
        raise LaunchError(f"no SLURM jobs to cancel; {note}")
    else:
        echo("no pending or running jobs")
    return active
