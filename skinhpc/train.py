"""Train one (backbone, fold): the stage behind ``jobs/train.py`` and every training task of the launcher.

``train_fold(cfg)`` runs alone (one process), under ``torchrun`` or as a SLURM task (ranks from the
environment, see ``skinhpc.distributed``), with ``train.strategy`` ddp (DistributedDataParallel) or
deepspeed (ZeRO stage 0/1/2). The fold's folder ``RUN/<backbone>/fold<k>/`` is laid out as DESIGN.md
says; ``metrics.json`` is written last, and a fold that has it is not trained again.

Resume is automatic and exact: checkpoints (``skinhpc.checkpoint``) hold the unwrapped model,
optimizer, grad scaler, the loop's position (epoch, micro-batch within the epoch, optimizer step),
running loss sums, best metric, early-stop counter and every rank's RNG states. The loader yields the
same batches for (seed, epoch, step, rank) and the learning rate is a pure function of the optimizer
step, so a run interrupted anywhere and resumed ends bit-identical (on CPU) to one that never stopped.

A fold never mixes two configs: resuming (or reusing a finished fold) under settings that change
results is refused, naming the keys (``config.fold_config_conflicts``: every result key, and the
pretrained weights and DeepSpeed config files by what they name); the checkpoint also records what a
resume needs (``resume_keys``: backbone, batch size, accumulation, strategy, ZeRO stage, seed, world
size, image size). Neutral keys may change: ``log_every``, checkpoint frequency, ``num_workers``,
``data.dir``, ``train.compile`` and the like (``config.NEUTRAL_KEYS``).

Preemption: SIGUSR2 and SIGTERM only raise a flag. At the next optimizer-step boundary all ranks agree
(all-reduce MAX), save a checkpoint on every rank, and then (a signal during the last epoch's
validation is acted on after it, with the loop's last checkpoint, before the final predictions):

- SIGUSR2 (SLURM's warning signal, sent by submitit): the previously installed handler is called when
  it is a Python callable (submitit's requeues the job and exits on rank 0); then ``train_fold``
  returns ``{"status": "preempted"}`` and ``jobs/train.py`` exits with code 0 after saying how to resume.
- SIGTERM: when a callable handler was installed before (submitit's, which ignores SIGTERM because
  USR2 follows), it is called and training goes on; otherwise the task returns "preempted" as above.
- SIGINT (Ctrl-C, also forwarded by a local launch to its tasks): no handler is called; ``train_fold``
  returns ``{"status": "interrupted"}`` and ``jobs/train.py`` exits with code 130 after saying how to
  resume. Before the loop starts (set-up) Ctrl-C stops at once, as usual.
- During the last step (the best model's predictions, metrics.json; seconds) any of them is recorded
  and acted on once the fold is finished: SIGINT then raises KeyboardInterrupt (exit 130), the others
  return the finished fold.

DeepSpeed specifics: precision stays skinhpc's (torch.autocast around the forward, fp32 master weights,
DeepSpeed's fp16/bf16 modes off; ``train.precision=fp16`` is refused); weights stay contiguous (inputs
are channels-last); ``train.deepspeed.config`` may not set what the train section owns (optimizer,
scheduler, batch sizes, precision); BatchNorm buffers are broadcast from rank 0 before every forward,
as DDP does, so every rank evaluates with the same statistics and a resume is exact.

For tests, ``SKINHPC_TEST_PREEMPT_AT_STEP=N`` makes rank 0 send itself SIGUSR2 (or the signal named
by ``SKINHPC_TEST_PREEMPT_SIGNAL``, e.g. INT) after optimizer step N (N=finish: before the last step)
and ``SKINHPC_TEST_KILL_AT_STEP=N`` makes every rank SIGKILL itself there (a hard kill);
``SKINHPC_TEST_STEP_SLEEP=S`` sleeps S seconds after every optimizer step, so that a test's task
cannot finish inside SLURM's kill window after an ``scontrol requeue``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skinhpc import CLASSES, checkpoint, distributed
from skinhpc.config import (DATA_INPUT, INPUTS_NAME, ConfigError, ExperimentConfig, TrainConfig, absolute_paths,
                            atomic_write_text, data_input_record, fold_config_conflicts,
                            for_backbone, input_file_digests, mixed_config_refusal, pretrained_source,
                            read_deepspeed_file, read_saved_config, recorded_data, recorded_data_entry,
                            run_config_changes, run_data_conflict, save_config, sha256_file)
from skinhpc.distributed import DistEnv
from skinhpc.rundir import (LOG_NAME, METRICS_NAME, UNNAMED_HOLDER, Busy, exclusive_lock, finished_metrics,
                             metric_value, read_log, replaces_best, selected_key, train_lock)

PREEMPT_ENV = "SKINHPC_TEST_PREEMPT_AT_STEP"
PREEMPT_SIGNAL_ENV = "SKINHPC_TEST_PREEMPT_SIGNAL"
KILL_ENV = "SKINHPC_TEST_KILL_AT_STEP"
STEP_SLEEP_ENV = "SKINHPC_TEST_STEP_SLEEP"
# Settings whose change makes a checkpoint unusable or the resumed trajectory different.
RESUME_KEYS = ("model.backbone", "model.image_size", "train.batch_size", "train.accum_steps", "train.strategy",
               "train.seed")
_SIGNAL_CODES = {signal.SIGTERM: 1, signal.SIGUSR2: 2, signal.SIGINT: 3}
_CODE_SIGNALS = {code: signum for signum, code in _SIGNAL_CODES.items()}
# What every validated epoch logs (log.jsonl, TensorBoard), each as val_<key>: the headline numbers,
# then per class (dicts by class name) and the confusion matrix (rows true, columns predicted).
EPOCH_METRICS = ("loss", "balanced_accuracy", "top1", "top2", "auroc_macro", "f1_macro",
                 "auroc", "sensitivity", "specificity", "confusion_matrix")


def fold_dir(cfg: ExperimentConfig) -> Path:
    """``RUN/<backbone>/fold<k>``."""
    return Path(cfg.run_dir) / cfg.model.backbone / f"fold{cfg.fold}"



def train_fold(cfg: ExperimentConfig) -> dict:
    """Train, validate and test one fold; returns metrics.json's content, or ``{"status": "preempted"}``
    (or ``"interrupted"``, by Ctrl-C) with the epoch and step its checkpoint resumes at.

    Idempotent: a fold whose metrics.json says done returns it at once; an unfinished one resumes
    from its newest valid checkpoint.
    """
    _log_to_stdout()
    cfg = absolute_paths(for_backbone(cfg))  # the fold's config.yaml names its own weights file, absolute
    out = fold_dir(cfg)
    from skinhpc.models import unknown_backbone
    if why := unknown_backbone(cfg.model.backbone):  # before anything is written for it
        raise ConfigError(why)
    conflicts = fold_config_conflicts(out, cfg)
    if conflicts:
        raise ConfigError(conflicts)
    # A launched run's folds share its config: one trained by hand with other settings would be
    # left out of the run's ensemble (or mix two experiments in it), so it is refused here.
    run_config = Path(cfg.run_dir) / "config.yaml"
    launched = read_saved_config(run_config)  # None: not a launched run
    changed = run_config_changes(launched, cfg) if launched is not None else []
    world = distributed.read_ranks()[1]
    if launched is not None and world != launched.cluster.processes:
        # train.batch_size is per process: another process count is another global batch, as
        # the launcher refuses on relaunch (launch.check_compatible).
        changed.append(f"processes (cluster.nodes x cluster.gpus_per_node; here torchrun's or srun's count): "
                       f"{launched.cluster.processes} -> {world}")
    if changed:
        raise ConfigError(mixed_config_refusal(run_config.parent, "launched", changed))
    done = finished_metrics(out)
    if done is not None and world == 1:  # several ranks: rank 0 decides, below
        _say(f"{out}: already finished (metrics.json); nothing to do")
        return done
    if cfg.train.strategy == "deepspeed" and cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 is not supported with train.strategy=deepspeed; use bf16 or fp32")
    env = distributed.setup(cfg.train.device, cfg.train.strategy)
    clean = False
    try:
        with contextlib.ExitStack() as held:
            if _agree_on_fold(held, cfg, out, env) == _DONE:
                _say(f"{out}: already finished (metrics.json); nothing to do", env)
                clean = True
                return finished_metrics(out) or {"status": "done"}
            result = FoldTrainer(cfg, env, out).run()
        clean = True
        return result
    except SystemExit:
        clean = True  # submitit's handler exits after requeueing; the other ranks still meet us
        raise
    finally:
        if clean:
            distributed.cleanup(env)
        elif env.distributed:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- small pieces

class FoldBusy(Busy):
    """Another process is training this fold now."""


_GO, _DONE, _BUSY, _FAILED = 0, 1, 2, 3  # what rank 0 found when it took the fold's lock (the largest wins)
FOREIGN_LOCK_WAIT_S = 120.0
"""How long a lock held from another host is waited for before giving up. A node that died keeps
its locks on a network filesystem until the server notices (NFSv4: a 90 s lease)."""


def _agree_on_fold(held: contextlib.ExitStack, cfg: ExperimentConfig, out: Path, env: DistEnv) -> int:
    """Rank 0 takes the fold's lock and every rank learns what follows, so none is left waiting
    for a rank 0 that has gone: train (_GO) or return the finished fold's metrics (_DONE), or
    all raise (another process trains the fold; rank 0 failed)."""
    code, why, error = _GO, "", None
    if env.is_main:
        try:
            code, why = _take_fold_lock(held, cfg, out)
        except Exception as e:  # e.g. the run directory cannot be written: the others must hear
            code, error = _FAILED, e
    code = distributed.max_int(env, code)
    if code == _FAILED:
        if error is not None:
            raise error
        raise distributed.DistributedError(f"{out}: rank 0 failed before training; its error says why")
    if code == _BUSY:
        raise FoldBusy(why or f"{out} is being trained by another process (rank 0 names it)")
    return code


def _take_fold_lock(held: contextlib.ExitStack, cfg: ExperimentConfig, out: Path) -> tuple[int, str]:
    """Rank 0: lock the fold for this process (two trainers of one fold would write the same
    checkpoints and log lines) and say what follows: (_GO, ""), (_DONE, "") when the process that
    held the lock before finished the fold, or (_BUSY, why). A holder on this host is alive (the
    kernel releases a dead one's lock); one on another host is waited for ``FOREIGN_LOCK_WAIT_S``
    (a dead node's lock on a network filesystem lasts until its lease ends), then refused too:
    whether it still trains cannot be told from here, and two trainers must never share a fold."""
    lock = train_lock(Path(cfg.run_dir), cfg.model.backbone, cfg.fold)
    host, deadline = os.uname().nodename, time.monotonic() + FOREIGN_LOCK_WAIT_S
    while True:
        try:
            held.enter_context(exclusive_lock(lock, required=False))
            return (_DONE, "") if finished_metrics(out) is not None else (_GO, "")
        except Busy as e:
            holder = str(e)
            here = holder.endswith(f" on {host}") or holder == UNNAMED_HOLDER
            if here or time.monotonic() >= deadline:
                dead_node = "" if here else (" If that node is down, its lock outlived it on the network "
                                             f"filesystem: delete {lock} and run again.")
                return _BUSY, (f"{out} is being trained by another process ({holder}, lock {lock}): wait for it "
                               f"to end or stop it, then run again.{dead_node}")
            time.sleep(5.0)


def _log_to_stdout() -> None:
    """skinhpc's log lines (e.g. which pretrained tensors were loaded) into the job's output, as
    the rest of training's messages: INFO on rank 0, warnings only on the other ranks. Python's
    default would show none of them."""
    logger = logging.getLogger("skinhpc")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    logger.propagate = False


def _say(message: str, env: DistEnv | None = None) -> None:
    if env is None or env.is_main:
        print(message, flush=True)


def resume_keys(cfg: ExperimentConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The settings a checkpoint must have been made with to be resumed now."""
    flat = {"model": asdict(cfg.model), "train": asdict(cfg.train)}
    keys = {k: flat[k.split(".")[0]][k.split(".")[1]] for k in RESUME_KEYS}
    if cfg.train.strategy == "deepspeed":
        keys["train.deepspeed.stage"] = cfg.train.deepspeed.stage
    keys["world_size"] = world_size
    # train.precision=auto is bf16 on a GPU and fp32 on a CPU: the same setting, other arithmetic.
    dtype = autocast_dtype(cfg.train.precision, device)
    keys["precision"] = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return keys


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16 for auto on GPU (fp32 on CPU, where bf16 autocast is slow)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def class_weights(labels: np.ndarray, num_classes: int = len(CLASSES), power: float = 1.0) -> torch.Tensor:
    """Class frequency of the training fold to the power -``power`` (1: inverse frequency, every
    class weighs the same in the loss; 0.5: milder), scaled to mean 1 over the training images;
    0 for classes absent from the fold."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    raw = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return torch.tensor(raw * counts.sum() / max(float((raw * counts).sum()), 1e-12), dtype=torch.float32)


def class_weighted_mean(per_image: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-image losses, each image weighing as its true class (plain mean without weights);
    the normalisation of ``nn.CrossEntropyLoss(weight)``."""
    if weight is None:
        return per_image.mean()
    w = weight[target]
    return (w * per_image).sum() / w.sum().clamp_min(1e-12)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al.): cross-entropy down-weighted by (1 - p_true)^gamma, optional class weights."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return class_weighted_mean(-((1 - logp.exp()) ** self.gamma) * logp, target, self.weight)


class SmoothedWeightedCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy where each image weighs as its true class (as in FocalLoss).

    Why not ``nn.CrossEntropyLoss(weight, label_smoothing)``: that weights the smoothing term of
    every class c by ``weight[c]``, for every image, so the rare classes (inverse-frequency weights
    of ~10 for df and vasc on HAM10000, ~0.2 for nv) pull every prediction toward themselves: on
    fold 0 at 64 px, smoothing 0.1 that way ended at 0.32 training accuracy and 0.53 balanced
    accuracy (BENCHMARKS.md)."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_image = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=self.label_smoothing)
        return class_weighted_mean(per_image, target, self.weight)


def make_criterion(train_cfg: TrainConfig, weight: torch.Tensor | None) -> nn.Module:
    if train_cfg.loss == "focal":
        return FocalLoss(train_cfg.focal_gamma, weight)
    if weight is not None and train_cfg.label_smoothing > 0:
        return SmoothedWeightedCrossEntropy(weight, train_cfg.label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=train_cfg.label_smoothing)


def _zero_tally() -> dict[str, list[int]]:
    """Per-class training tallies of the epoch so far: predictions right, and images seen."""
    return {"class_correct": [0] * len(CLASSES), "class_seen": [0] * len(CLASSES)}


def upgrade_loop_state(state: dict[str, Any]) -> dict[str, Any]:
    """A saved loop state in today's keys: checkpoints written before ``stop_reason`` carry a
    ``stopped`` flag instead, and early stop was then the only way to stop; those written before
    the per-class tallies carry one ``correct`` count (the resumed epoch's training accuracies then
    cover the steps after the checkpoint only); those written before ``ce_sum`` lack it, and the
    resumed epoch logs no train_ce when the checkpoint was taken inside it (NaN until it ends)."""
    state = dict(state)
    if "ce_sum" not in state:
        state["ce_sum"] = float("nan") if state.get("step") else 0.0
    if state.pop("stopped", False) and not state.get("stop_reason"):
        state["stop_reason"] = "early_stop"
    if "correct" in state:
        state.pop("correct")
        state.pop("seen", None)
        state.update({k: v for k, v in _zero_tally().items() if k not in state})
    return state


def train_accuracies(class_correct: Sequence[float], class_seen: Sequence[float]) -> tuple[float, float]:
    """Training accuracy and balanced accuracy (mean recall over the classes seen) of an epoch."""
    seen = [(c, n) for c, n in zip(class_correct, class_seen) if n > 0]
    accuracy = sum(class_correct) / max(1.0, float(sum(class_seen)))
    balanced = sum(c / n for c, n in seen) / len(seen) if seen else 0.0
    return accuracy, balanced


def time_box_reached(elapsed_s: float, epochs_done: int, limit_min: float) -> bool:
    """Whether a job that has trained ``epochs_done`` epochs (the first may have been a resumed
    part) in ``elapsed_s`` seconds must stop rather than start another: one more epoch of its mean
    length so far would end past ``limit_min`` minutes. Stopping when the limit is already passed
    instead would overrun it by up to an epoch, which with slow epochs is most of a margin."""
    return elapsed_s + elapsed_s / max(1, epochs_done) > 60 * limit_min


def lr_at(step: int, train_cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Head learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    total = max(1, train_cfg.epochs * steps_per_epoch)
    warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return train_cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return train_cfg.min_lr + (train_cfg.lr - train_cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, train_cfg: TrainConfig, backbone_scale: float) -> torch.optim.Optimizer:
    """SGD or AdamW over (backbone, head) x (decay, no decay) groups; biases and norms get no decay.

    Each group carries ``lr_scale`` (the backbone's is ``backbone_scale``) and ``is_backbone``;
    ``set_lr`` sets ``lr = lr_at(step) * lr_scale``.
    """
    from skinhpc.models import backbone_and_head_params
    backbone, head = backbone_and_head_params(model)
    groups = []
    for params, scale, is_backbone in ((backbone, backbone_scale, True), (head, 1.0, False)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd in ((decay, train_cfg.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": train_cfg.lr * scale, "lr_scale": scale,
                               "is_backbone": is_backbone})
    if train_cfg.optimizer == "sgd":
        # Nesterov needs momentum; train.momentum=0 is plain SGD.
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum, nesterov=train_cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=train_cfg.lr)


def deepspeed_config(train_cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config: the YAML/JSON file of train.deepspeed.config, overridden by what skinhpc sets.

    Precision stays with skinhpc (torch.autocast around the forward, fp32 weights), so DeepSpeed's
    own fp16/bf16 modes are off and the checkpoints hold fp32 weights like DDP's.
    """
    user = read_deepspeed_file(train_cfg.deepspeed.config)
    zero = {**user.get("zero_optimization", {}), "stage": train_cfg.deepspeed.stage}
    ours = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.accum_steps,
        "train_batch_size": train_cfg.batch_size * train_cfg.accum_steps * world_size,
        "gradient_clipping": train_cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }
    return {"steps_per_print": 10 ** 9, **user, **ours}


def sync_buffers(env: DistEnv, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward."""
    if not env.distributed or env.world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for b in bufs:
            n = b.numel()
            b.data.copy_(flat[offset:offset + n].view_as(b))
            offset += n


class PreemptionFlag:
    """SIGUSR2/SIGTERM/SIGINT handlers that only record the signal (saving inside a handler can hang)."""

    def __init__(self) -> None:
        self.code = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in _SIGNAL_CODES:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass  # not the main thread (e.g. a debugger): no preemption handling

    def _handle(self, signum: int, frame: Any) -> None:
        self.code = max(self.code, _SIGNAL_CODES.get(signum, 0))

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def call_previous(self, signum: int) -> bool:
        """Call the handler installed before ours; False when there was none to call."""
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)
            return True
        return False


# --------------------------------------------------------------------------- the trainer

class FoldTrainer:
    """One fold's data, model, optimizer and loop state on this rank."""

    def __init__(self, cfg: ExperimentConfig, env: DistEnv, out: Path) -> None:
        self.cfg, self.env, self.out = cfg, env, out
        self.tcfg = cfg.train
        self.ckpt_dir = out / "checkpoints"
        self.flag = PreemptionFlag()
        self.stop_status = "preempted"  # what a stop on a signal returns ("interrupted" for Ctrl-C)
        self.standing_on = ""  # the tag of the checkpoint resumed from or last written (save_checkpoint's protect)
        self.writer: Any = None
        self.engine: Any = None
        self.ddp: nn.Module | None = None
        self.scaler: Any = None
        self.backbone_trainable = True
        self._zero_grad_hooks: list[Any] = []
        self._recorded_best = -1  # the best epoch the newest checkpoint records (see _settle_best)
        self._prepare_data()
        self._prepare_model()
        # Loop state: everything here goes into checkpoints.
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0, "best_metric": -1.0,
                                      "best_epoch": -1, "bad_epochs": 0, "stop_reason": "",
                                      "loss_sum": 0.0, "ce_sum": 0.0, **_zero_tally()}

    # ---------------------------------------------------------------- setup
    def _prepare_data(self) -> None:
        from skinhpc.convert import read_index, read_manifest, source_record
        from skinhpc.load import build_loader
        from skinhpc.split import ensure_split, fold_rows
        cfg, env = self.cfg, self.env
        # One converter and one split writer; the other ranks read their results.
        _main_rank_first(env, lambda: _converted_unless_other_data(cfg))
        self.index = read_index(cfg.data_dir)
        self.manifest = read_manifest(cfg.data_dir)
        # Images edited under the same paths are converted anew: no fold of the run trained on the
        # old ones may be continued, or joined by one, on the new (every rank reads the same
        # files, so all refuse alike).
        self.data_source = source_record(self.manifest)
        if conflict := run_data_conflict(Path(cfg.run_dir), self.data_source):
            raise ConfigError(conflict)
        made: list[dict] = []  # rank 0's split; the other ranks read (and check) the saved one
        _main_rank_first(env, lambda: made.append(ensure_split(cfg.run_dir, self.index, cfg.split)))
        split = made[0] if made else ensure_split(cfg.run_dir, self.index, cfg.split)
        self.rows = fold_rows(split, self.index, cfg.fold)
        label_of = dict(zip(self.index["row"].to_numpy(), self.index["label"].to_numpy()))
        self.train_labels = np.array([label_of[r] for r in self.rows.train], dtype=np.int64)
        tc = self.tcfg
        self.device = env.device
        common = dict(image_size=cfg.model.image_size, data_cfg=cfg.data, aug_cfg=cfg.aug, seed=tc.seed,
                      device=env.device, distributed=env.world_size > 1, channels_last=tc.channels_last)
        eval_bs = tc.eval_batch_size or 2 * tc.batch_size
        self.train_loader = build_loader(cfg.data_dir, self.rows.train, train=True, batch_size=tc.batch_size, **common)
        self.val_loader = build_loader(cfg.data_dir, self.rows.val, train=False, batch_size=eval_bs, **common)
        self.test_loader = (build_loader(cfg.data_dir, self.rows.test, train=False, batch_size=eval_bs, **common)
                            if len(self.rows.test) else None)
        steps = len(self.train_loader)
        if tc.max_steps_per_epoch:
            steps = min(steps, tc.max_steps_per_epoch)
        # Whole accumulation cycles only: a partial one at the epoch's end would desynchronise
        # DeepSpeed's micro-step counter and complicate exact resume; at most accum-1 batches are skipped.
        self.steps_per_epoch = steps // tc.accum_steps * tc.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"fold {cfg.fold} has {len(self.rows.train)} training images: too few for "
                              f"train.batch_size={tc.batch_size} x accum_steps={tc.accum_steps} on "
                              f"{env.world_size} process(es)")
        self.opt_steps_per_epoch = self.steps_per_epoch // tc.accum_steps

    def _prepare_model(self) -> None:
        from skinhpc.models import create_model
        cfg, tc, env = self.cfg, self.tcfg, self.env
        torch.backends.cudnn.benchmark = tc.cudnn_benchmark
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        _seed_everything(tc.seed)  # the same initial weights on every rank
        model = create_model(cfg.model)
        model.to(env.device)
        if tc.channels_last and tc.strategy != "deepspeed":
            # DeepSpeed broadcasts parameters as bytes and needs them contiguous; there the
            # channels-last inputs alone select the channels-last convolution kernels.
            model.to(memory_format=torch.channels_last)
        self.raw = model
        pretrained = pretrained_source(cfg.model.pretrained) != ""
        scale = cfg.model.backbone_lr_scale if pretrained else 1.0
        weight = class_weights(self.train_labels, power=tc.class_weight_power).to(env.device) if tc.class_weights else None
        self.criterion = make_criterion(tc, weight).to(env.device)
        self.optimizer = make_optimizer(model, tc, scale)
        self.amp_dtype = autocast_dtype(tc.precision, env.device)
        if tc.strategy == "deepspeed":
            import deepspeed
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=self.optimizer, config=deepspeed_config(tc, env.world_size))
        elif self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(env.device.type)
        self._set_backbone_trainable(cfg.model.freeze_epochs == 0)
        if env.rank > 0:
            # Seeded alike for the same initial weights, the ranks would now draw the same dropout
            # (and drop-path) masks for the same positions of their batches: a global batch would
            # get one rank's worth of independent masks. Rank 0 keeps its stream (one-process runs
            # are unchanged); each rank's stream is saved with its checkpoints, so resume stays exact.
            torch.manual_seed(tc.seed + RANK_SEED_STRIDE * env.rank)

    def _set_backbone_trainable(self, flag: bool) -> None:
        """Freeze/unfreeze the backbone; DDP is rebuilt because it registers trainable params when built.

        DeepSpeed's partitioned optimizer cannot take parameters in later, so there the backbone
        keeps requires_grad and gets learning rate 0 while frozen (its weights do not move), and its
        gradients are zeroed as they are computed: they would otherwise count in the global-norm
        clipping (shrinking the head's steps) and fill the optimizer's moments before the unfreeze.
        """
        from skinhpc.models import backbone_and_head_params, set_backbone_trainable
        self.backbone_trainable = flag
        for hook in self._zero_grad_hooks:
            hook.remove()
        self._zero_grad_hooks = []
        if self.engine is not None and not flag:
            # A tensor hook runs before the gradient is accumulated, so before DeepSpeed's own hooks.
            self._zero_grad_hooks = [p.register_hook(torch.zeros_like) for p in backbone_and_head_params(self.raw)[0]]
        if self.engine is None:
            set_backbone_trainable(self.raw, flag)
            if self.env.world_size > 1:
                dev = [self.env.device.index] if self.env.device.type == "cuda" else None
                self.ddp = nn.parallel.DistributedDataParallel(self.raw, device_ids=dev)
            forward = self.ddp if self.ddp is not None else self.raw
        else:
            forward = self.engine
        self.forward = torch.compile(forward) if self.tcfg.compile else forward

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        out, env = self.out, self.env
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier(env)
        self._resume()
        if env.is_main:  # only once a checkpoint, if any, is known to suit these settings
            save_config(self.cfg, out / "config.yaml")
            # The content of the weights and DeepSpeed files, and what the data came from, for a
            # relaunch to compare with (config.yaml holds names only; files change under them).
            # A conversion of skinhpc < 0.2.3 tells nothing of its source: the fold's record stays.
            kept = recorded_data_entry(out)
            data = data_input_record(self.cfg.data_dir, self.data_source) or ({DATA_INPUT: kept} if kept else {})
            inputs = {**input_file_digests(self.cfg), **data}
            atomic_write_text(out / INPUTS_NAME, json.dumps(inputs, indent=1) + "\n")
        self._open_logs()
        for warning in self.cfg.warnings():
            _say(warning, env)
        from skinhpc.convert import detail_lost_note
        if note := detail_lost_note(self.manifest, self.cfg.model.image_size):
            _say(note, env)
        self._t0 = time.monotonic()  # train.stop_after_min counts this job's training, not its set-up
        self._first_epoch = self.state["epoch"]
        self.flag.install()
        try:
            while self.state["epoch"] < self.tcfg.epochs and not self.state["stop_reason"]:
                if not self._train_epoch():
                    return self._preempted()
                self._end_epoch()
            # A signal during the last validation found no step boundary to act on; the checkpoint
            # of the loop's end is saved, so it is acted on here, before our handlers are removed.
            if self._act_on_signal():
                return self._preempted()
            # The last step (best model's predictions, metrics.json) takes seconds: a signal now
            # is recorded and waits for it, since a fold finished beats a requeue that redoes it
            # (without our handlers, SIGTERM would kill the process without a word).
            self._test_hooks(at_finish=True)
            result = self._finish()
            if code := distributed.max_int(self.env, self.flag.code):
                signum = _CODE_SIGNALS[code]
                _say(f"{signal.Signals(signum).name} during the final predictions: finished them first", self.env)
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt  # Ctrl-C still stops what runs folds one after another
            return result
        finally:
            self.flag.uninstall()
            if self.writer is not None:
                self.writer.close()

    def _resume(self) -> None:
        keys = resume_keys(self.cfg, self.env.world_size, self.env.device)
        self.resume_keys = keys
        found = checkpoint.load_latest(self.ckpt_dir, env=self.env, resume_keys=keys, model=self.raw,
                                       optimizer=self.optimizer, scaler=self.scaler, engine=self.engine)
        if found is None:
            _say(f"{self.out}: fresh start ({self.steps_per_epoch} steps/epoch, {self.env.world_size} process(es), "
                 f"strategy {self.tcfg.strategy}, device {self.env.device.type})", self.env)
            if self.env.is_main:
                self._truncate_log(0)  # a start over (checkpoints deleted or unreadable) logs afresh
                self._settle_best(self.state["best_epoch"])
            return
        info, state = found
        self.standing_on = info.path.name  # readable: kept until a newer checkpoint is written
        self.state.update(upgrade_loop_state(state))
        _say(f"resuming from epoch {self.state['epoch']} step {self.state['step']} (checkpoint {info.path}; "
             f"device {self.env.device.type})", self.env)
        if self.env.is_main:
            self._truncate_log(self.state["epoch"])
            self._settle_best(self.state["best_epoch"])
        # RNG was restored by load_latest; nothing below may draw from it before the loop.
        if self.cfg.model.freeze_epochs and self.state["epoch"] >= self.cfg.model.freeze_epochs:
            self._set_backbone_trainable(True)

    def _truncate_log(self, epoch: int) -> None:
        """Drop log lines of epochs the resumed run will train again (a kill after logging them)."""
        path = self.out / LOG_NAME
        if not path.is_file():
            return
        keep = [json.dumps(entry) for entry in read_log(path) if entry["epoch"] < epoch]  # a torn line is dropped
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def _open_logs(self) -> None:
        if self.env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            # Events at or after the step training resumes at (0: a start over) are dropped, as the
            # log's lines are: they will be written again.
            self.writer = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=self.state["global_step"])

    # ---------------------------------------------------------------- one epoch
    def _restart_backbone_optimizer_state(self) -> None:
        """Under DeepSpeed the frozen backbone took optimizer steps with zero gradients and lr 0:
        its moments stayed zero but AdamW's step counter ran on, so its bias correction would treat
        the first moments after the unfreeze as long averages and make those steps up to ~3x too
        large. Dropping that state makes the backbone start afresh at the unfreeze, as under DDP,
        where frozen parameters have no gradient and get no state. Runs at the unfreezing epoch's
        first step only: a checkpoint taken later holds the state built after it."""
        # Stage 0 (skinhpc keeps DeepSpeed's fp16/bf16 off): the torch optimizer itself; ZeRO 1-2 keep it
        # inside, with our param groups (flat partitions as params). ZeRO's links to its state for
        # safe_get_full_optimizer_state go stale until the next step; skinhpc does not read them.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for group in inner.param_groups:
            if group.get("is_backbone"):
                for p in group["params"]:
                    inner.state.pop(p, None)

    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, self.tcfg, self.opt_steps_per_epoch)
        frozen = not self.backbone_trainable
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if (frozen and group.get("is_backbone")) else lr * group.get("lr_scale", 1.0)
        return lr

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[int, Any, float]]:
        """(step, batch, seconds waited for it) for steps start .. steps_per_epoch-1. On CUDA the wait
        also holds the GPU's queue: the loader's blocking copies of small tensors to the device
        return only once the previous step's kernels are done (see DESIGN.md, data_wait_frac)."""
        if start >= self.steps_per_epoch:
            return
        it = self.train_loader.epoch(epoch, start_step=start)
        try:
            for step in range(start, self.steps_per_epoch):
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    raise RuntimeError(f"loader ended after {step} of {self.steps_per_epoch} steps in epoch {epoch}") from None
                yield step, batch, time.perf_counter() - t0
        finally:
            it.close()  # an epoch left early (step cap, preemption) must release the loader's workers

    def _micro_step(self, batch: Any, boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of one micro-batch; returns the training criterion and the plain
        cross-entropy (2,) and the per-class tally (2, C: predictions right, images) as device tensors."""
        images, labels = batch.images, batch.labels
        if self.engine is not None and self.env.world_size > 1:
            sync_buffers(self.env, self.raw)
        no_sync = self.ddp is not None and not boundary and self.engine is None
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with (self.ddp.no_sync() if no_sync else contextlib.nullcontext()):  # type: ignore[union-attr]
            with amp:
                logits = self.forward(images)
                loss = self.criterion(logits.float(), labels)
            if self.engine is not None:
                self.engine.backward(loss)
            else:
                scaled = loss / self.tcfg.accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        labels = labels.long()
        tally = torch.zeros(2, len(CLASSES), dtype=torch.int64, device=labels.device)
        tally[0].index_add_(0, labels, (logits.detach().argmax(1) == labels).long())  # index_add_: no host sync
        tally[1].index_add_(0, labels, torch.ones_like(labels))
        # The plain cross-entropy, unweighted like the validation loss, so the two curves compare
        # (the class-weighted criterion of a prior-only prediction is ~2.9 on HAM10000, its CE 1.1).
        ce = F.cross_entropy(logits.detach().float(), labels)
        return torch.stack([loss.detach().float(), ce]), tally

    def _optimizer_step(self) -> float:
        lr = self._set_lr(self.state["global_step"])
        if self.engine is not None:
            self.engine.step()
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.tcfg.grad_clip > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state["global_step"] += 1
        return lr

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when stopped by a preemption signal."""
        st, tc = self.state, self.tcfg
        epoch = st["epoch"]
        want_trainable = epoch >= self.cfg.model.freeze_epochs
        if want_trainable != self.backbone_trainable:
            self._set_backbone_trainable(want_trainable)
        if self.engine is not None and epoch == self.cfg.model.freeze_epochs > 0 and st["step"] == 0:
            self._restart_backbone_optimizer_state()
        (self.engine if self.engine is not None else self.raw).train()
        if not self.backbone_trainable:
            from skinhpc.models import freeze_backbone_norms
            freeze_backbone_norms(self.raw)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loss_sums = torch.tensor([st["loss_sum"], st["ce_sum"]], dtype=torch.float64, device=self.device)
        tally = torch.tensor([st["class_correct"], st["class_seen"]], dtype=torch.int64, device=self.device)
        t_start, waited, images, lr = time.perf_counter(), 0.0, 0, 0.0
        bar = self._progress_bar(epoch, st["step"])
        try:
            for step, batch, wait in self._batches(epoch, st["step"]):
                waited += wait
                boundary = (step + 1) % tc.accum_steps == 0
                losses, step_tally = self._micro_step(batch, boundary)
                loss_sums += losses.double()
                tally += step_tally
                images += len(batch.labels)
                if self.engine is not None and not boundary:
                    self.engine.step()  # DeepSpeed counts micro-steps itself; it only updates at the boundary
                if not boundary:
                    continue
                lr = self._optimizer_step()
                st["step"] = step + 1
                self._report_step(bar, step, losses[0], lr)
                self._test_hooks()
                if self._maybe_checkpoint(loss_sums, tally):
                    return False
        finally:
            if bar is not None:
                bar.close()
        st.update(self._loop_state(loss_sums, tally))
        seconds = time.perf_counter() - t_start
        self._epoch_stats = {"lr": lr or self.optimizer.param_groups[-1]["lr"],
                             "images_per_s": images * self.env.world_size / max(seconds, 1e-9),
                             "data_wait_frac": waited / max(seconds, 1e-9),
                             "peak_mem_gb": (torch.cuda.max_memory_allocated(self.device) / 1e9
                                             if self.device.type == "cuda" else 0.0),
                             "time_s": seconds}
        return True

    def _progress_bar(self, epoch: int, start: int) -> Any:
        if not (self.env.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{self.tcfg.epochs}",
                    leave=False, dynamic_ncols=True)

    def _report_step(self, bar: Any, step: int, loss: torch.Tensor, lr: float) -> None:
        if not self.env.is_main:
            return
        g = self.state["global_step"]
        if bar is not None:
            bar.update(self.tcfg.accum_steps)
        every = max(1, self.tcfg.log_every)
        if g % every == 0 or (bar is not None and g % 10 == 0):
            value = float(loss.item())
            self.writer.add_scalar("train/loss", value, g)
            self.writer.add_scalar("train/lr", lr, g)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            elif g % every == 0:
                # Counted from 1, as the per-epoch lines ("epoch 2/2 val ...") it comes before.
                print(f"epoch {self.state['epoch'] + 1}/{self.tcfg.epochs} step {step + 1}/{self.steps_per_epoch} "
                      f"loss {value:.4f} lr {lr:.3g}", flush=True)

    def _test_hooks(self, at_finish: bool = False) -> None:
        g = "finish" if at_finish else str(self.state["global_step"])  # "finish": before the last step
        if os.environ.get(PREEMPT_ENV) == g and self.env.is_main:
            os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get(PREEMPT_SIGNAL_ENV, "USR2")])
        if os.environ.get(KILL_ENV) == g:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(STEP_SLEEP_ENV) and not at_finish:
            time.sleep(float(os.environ[STEP_SLEEP_ENV]))

    def _loop_state(self, loss_sums: torch.Tensor, tally: torch.Tensor) -> dict:
        class_correct, class_seen = tally.tolist()
        loss_sum, ce_sum = loss_sums.tolist()
        return {**self.state, "loss_sum": loss_sum, "ce_sum": ce_sum, "class_correct": class_correct,
                "class_seen": class_seen}

    # This rank's own running sums: each rank saves and restores its own (summed over ranks only at
    # the epoch's end, in the same order as an uninterrupted run).
    RANK_KEYS = ("loss_sum", "ce_sum", "class_correct", "class_seen")

    def _maybe_checkpoint(self, loss_sums: torch.Tensor, tally: torch.Tensor) -> bool:
        """Save on a preemption signal or every train.checkpoint.every_steps; True = stop now."""
        st = self.state
        code = distributed.max_int(self.env, self.flag.code)
        every = self.tcfg.checkpoint.every_steps
        periodic = every > 0 and st["global_step"] % every == 0 and st["step"] < self.steps_per_epoch
        if not code and not periodic:
            return False
        self._save(st["epoch"], st["step"], self._loop_state(loss_sums, tally))
        return bool(code) and self._act_on_signal(code)

    def _act_on_signal(self, code: int | None = None) -> bool:
        """Once a checkpoint of the current state is saved: hand a recorded signal (any rank's) to the
        handler installed before ours; True = stop now. ``code`` is the agreed one when known."""
        code = distributed.max_int(self.env, self.flag.code) if code is None else code
        if not code:
            return False
        self.flag.code = 0
        st = self.state
        signum = _CODE_SIGNALS[code]
        _say(f"{signal.Signals(signum).name}: checkpoint saved at epoch {st['epoch']} step {st['step']}", self.env)
        if signum == signal.SIGINT:
            self.stop_status = "interrupted"  # Ctrl-C: stop here, not the requeue of a preemption
            return True
        called = self.flag.call_previous(signum)
        if signum == signal.SIGTERM and called:
            return False  # submitit ignores SIGTERM: USR2 (requeue) or the kill follows
        return True

    def _preempted(self) -> dict:
        return {"status": self.stop_status, "epoch": self.state["epoch"], "step": self.state["step"]}

    def _save(self, epoch: int, step: int, state: dict) -> None:
        rank_state = {k: state[k] for k in self.RANK_KEYS}
        checkpoint.save_checkpoint(self.ckpt_dir, epoch, step, env=self.env, train_state=state,
                                   resume_keys=self.resume_keys, rank_state=rank_state, model=self.raw, optimizer=self.optimizer,
                                   scaler=self.scaler, engine=self.engine, keep_last=self.tcfg.checkpoint.keep_last,
                                   protect=self.standing_on)
        self.standing_on = checkpoint.tag_of(epoch, step)
        if self.env.is_main:
            self._settle_best(state["best_epoch"])

    def _settle_best(self, recorded_epoch: int) -> None:
        """Rank 0: best/ = the weights of the best epoch the newest checkpoint records (written, or
        resumed from); save_best keeps those until a checkpoint records a newer best."""
        self._recorded_best = recorded_epoch
        if warning := checkpoint.settle_best(self.ckpt_dir, self._recorded_best):
            _say(f"WARNING: {warning}", self.env)

    # ---------------------------------------------------------------- epoch end
    def _predict(self, loader: Any) -> Any:
        from skinhpc.evaluate import predict
        sync_buffers(self.env, self.raw)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else None
        return predict(self.raw, loader.epoch(0), device=self.device, autocast=amp,
                       distributed=self.env.world_size > 1, tta=self.tcfg.tta)

    def _metrics(self, preds: Any) -> dict:
        """Metrics of gathered predictions; the loss is the unweighted cross-entropy."""
        return preds.metrics()

    def _end_epoch(self) -> None:
        st, env = self.state, self.env
        epoch = st["epoch"]
        k = len(CLASSES)
        sums = distributed.all_sum(env, [st["loss_sum"], st["ce_sum"], *map(float, st["class_correct"]),
                                         *map(float, st["class_seen"])])
        steps = max(1.0, self.steps_per_epoch * env.world_size)
        train_loss, train_ce = sums[0] / steps, sums[1] / steps
        train_acc, train_bal_acc = train_accuracies(sums[2:2 + k], sums[2 + k:])
        last = epoch + 1 == self.tcfg.epochs
        out_of_time = not last and self._out_of_time()
        metrics, improved = None, False
        if last or out_of_time or (epoch + 1) % self.tcfg.eval_every == 0:
            metrics = self._metrics(self._predict(self.val_loader))
            improved = self._track_best(epoch, metrics)
        if out_of_time:
            st["stop_reason"] = "time_limit"
        record = {"epoch": epoch, "lr": self._epoch_stats["lr"], "train_loss": train_loss,
                  "train_ce": None if math.isnan(train_ce) else train_ce,
                  "train_acc": train_acc, "train_balanced_accuracy": train_bal_acc,
                  **{f"val_{k}": (metrics or {}).get(k) for k in EPOCH_METRICS},
                  **{k: v for k, v in self._epoch_stats.items() if k != "lr"}}
        if env.is_main:
            self._log_epoch(record, metrics, improved)
        st.update(epoch=epoch + 1, step=0, loss_sum=0.0, ce_sum=0.0, **_zero_tally())
        if last or st["stop_reason"] or st["epoch"] % self.tcfg.checkpoint.every_epochs == 0:
            self._save(st["epoch"], 0, dict(st))
        if st["stop_reason"] == "time_limit":
            _say(f"time limit: another epoch would end past train.stop_after_min={self.tcfg.stop_after_min:g}; "
                 f"stopping after epoch {st['epoch']} of {self.tcfg.epochs} ({self._best_text()})", env)
        elif st["stop_reason"] == "early_stop":
            _say(f"early stop: no better val {self.tcfg.select_metric.replace('_', ' ')} in "
                 f"{self.tcfg.early_stop_patience} validations ({self._best_text()})", env)

    def _out_of_time(self) -> bool:
        """Another epoch would end past train.stop_after_min on some rank (every rank then stops here)."""
        limit = self.tcfg.stop_after_min
        if not limit:
            return False
        over = time_box_reached(time.monotonic() - self._t0, self.state["epoch"] + 1 - self._first_epoch, limit)
        return distributed.any_rank(self.env, over)

    def _track_best(self, epoch: int, metrics: dict) -> bool:
        """Keep the weights of the best validation by train.select_metric; count validations without progress."""
        st, name = self.state, self.tcfg.select_metric
        value = metric_value(metrics, selected_key(name))
        improved = replaces_best(name, value, st["best_metric"], have_best=st["best_epoch"] >= 0)
        if improved:
            st["best_metric"], st["best_epoch"], st["bad_epochs"] = value, epoch, 0
            if self.env.is_main:
                checkpoint.save_best(self.ckpt_dir, {k: v.detach().cpu() for k, v in self.raw.state_dict().items()},
                                     {"epoch": epoch, "select_metric": name, "value": value,
                                      "val_balanced_accuracy": metric_value(metrics, "balanced_accuracy")},
                                     recorded_epoch=self._recorded_best)
        else:
            st["bad_epochs"] += 1
        patience = self.tcfg.early_stop_patience
        st["stop_reason"] = "early_stop" if patience and st["bad_epochs"] >= patience else ""
        return improved

    def _best_text(self) -> str:
        """The kept epoch, for messages: 'best val loss 0.9928 at epoch 40'."""
        st, name = self.state, self.tcfg.select_metric
        if name == "last":
            return f"keeping the last validated weights, epoch {st['best_epoch'] + 1}"
        return f"best val {name.replace('_', ' ')} {st['best_metric']:.4f} at epoch {st['best_epoch'] + 1}"

    def _log_epoch(self, record: dict, metrics: dict | None, improved: bool) -> None:
        from skinhpc.evaluate import format_metrics
        with open(self.out / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        g = self.state["global_step"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(f"epoch/{key}", value, g)
            elif isinstance(value, dict):  # per class: epoch/val_auroc/mel, ...
                for name, v in value.items():
                    if isinstance(v, (int, float)) and not math.isnan(v):
                        self.writer.add_scalar(f"epoch/{key}/{name}", v, g)
        self.writer.flush()
        mark = " *best*" if improved else ""
        val = f"val {format_metrics(metrics)}" if metrics is not None else "(no validation)"
        speed = (f"{record['images_per_s']:.0f} img/s, data wait {100 * record['data_wait_frac']:.0f}%"
                 if record["images_per_s"] > 0 else "no step left to this job (resumed at the epoch's end)")
        print(f"epoch {record['epoch'] + 1}/{self.tcfg.epochs} {val} | train loss "
              f"{record['train_loss']:.4f} acc {record['train_acc']:.3f} bal_acc {record['train_balanced_accuracy']:.3f}"
              f" | {speed}{mark}", flush=True)

    # ---------------------------------------------------------------- after training
    def _finish(self) -> dict:
        from skinhpc.evaluate import save_predictions
        from skinhpc.models import save_model_file
        env, out, st = self.env, self.out, self.state
        distributed.barrier(env)
        best = checkpoint.load_best(self.ckpt_dir)
        best_epoch, best_metric = st["best_epoch"], st["best_metric"]
        best_lost = ""  # recorded in metrics.json and shown by the report: not only a warning in a log
        if best is not None:
            self.raw.load_state_dict(best[0])
            if best[1].get("epoch") != best_epoch:  # settle_best warned on resume: name what is kept
                best_epoch, best_metric = best[1].get("epoch", best_epoch), best[1].get("value", best_metric)
        else:
            why = ("is damaged" if (self.ckpt_dir / checkpoint.BEST).exists()
                   else f"of epoch {best_epoch + 1} is missing" if best_epoch >= 0  # settle_best said so on resume
                   else f"was never saved (val {self.tcfg.select_metric.replace('_', ' ')} never defined)")
            best_epoch = st["epoch"] - 1  # what the files below then hold: the last epoch's weights
            _say(f"WARNING: the best checkpoint {why}; using the last weights (epoch {best_epoch + 1})", env)
            best_lost = f"the best checkpoint {why}; the last epoch's weights are used"
        val = self._predict(self.val_loader)
        test = self._predict(self.test_loader) if self.test_loader is not None else None
        val_metrics = self._metrics(val)
        test_metrics = self._metrics(test) if test is not None else None
        if best is None or self.tcfg.select_metric != "balanced_accuracy":
            best_metric = val_metrics.get("balanced_accuracy")  # what model_best.pt records
        result = {"status": "done", "backbone": self.cfg.model.backbone, "fold": self.cfg.fold,
                  "best_epoch": best_epoch, "select_metric": self.tcfg.select_metric,
                  "epochs_trained": st["epoch"], "epochs": self.tcfg.epochs,
                  "stopped": st["stop_reason"] or None, "world_size": env.world_size,
                  "strategy": self.tcfg.strategy, "val": val_metrics, "test": test_metrics}
        if best_lost:
            result["best_lost"] = best_lost
        if env.is_main:
            save_predictions(out / "predictions_val.npz", val, self.index)
            if test is not None:
                save_predictions(out / "predictions_test.npz", test, self.index)
            save_model_file(out / "model_best.pt", self.raw, self.cfg.model, self.manifest["stored_size"],
                            epoch=best_epoch, val_balanced_accuracy=best_metric)
            # torch.load checks no checksum: predict compares this, so bytes changed on disk are noticed.
            result["model_best_sha256"] = sha256_file(out / "model_best.pt")
            atomic_write_text(out / METRICS_NAME, json.dumps(_jsonable(result), indent=1) + "\n")
            from skinhpc.evaluate import format_metrics
            print(f"fold {self.cfg.fold} {self.cfg.model.backbone} done: best epoch {best_epoch + 1}; "
                  f"val {format_metrics(val_metrics)}", flush=True)
            if test_metrics is not None:
                print(f"  test {format_metrics(test_metrics)}", flush=True)
        distributed.barrier(env)
        if env.is_main and not self.tcfg.checkpoint.keep_when_done:
            # Only now: a job killed before metrics.json resumes from them, straight into _finish.
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return _jsonable(result)


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and NaN-free floats for metrics.json."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


def _converted_unless_other_data(cfg: ExperimentConfig) -> None:
    """``ensure_converted``, once the raw data are known to be what the run's folds trained on:
    edited images must not replace a shared conversion only for the fold to be refused after."""
    from skinhpc.convert import ensure_converted, raw_data_record
    run_dir = Path(cfg.run_dir)
    if recorded_data(run_dir) and (conflict := run_data_conflict(run_dir, raw_data_record(cfg.data, cfg.data_dir))):
        raise ConfigError(conflict)
    ensure_converted(cfg.data, cfg.data_dir)


def _main_rank_first(env: DistEnv, work: Any) -> None:
    """Run ``work`` on rank 0 while the others wait; its error stops every rank (none waits forever)."""
    error: BaseException | None = None
    if env.is_main:
        try:
            work()
        except Exception as e:
            error = e
    failed = distributed.any_rank(env, error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("rank 0 failed while preparing the data or the split (its error is in its log)")


RANK_SEED_STRIDE = 1_000_003  # a large prime: the ranks of nearby seeds (seed, seed + 1, ...) get distinct streams


def _seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
