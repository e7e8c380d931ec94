"""The numbers of a finished (or partly finished) cross-validated run: ``run_ensemble(run_dir)``.

Reads every finished fold (``RUN/<backbone>/fold<k>/metrics.json`` with status ``done`` and its
prediction files), and computes, all with ``evaluate.compute_metrics`` (torchmetrics):

* per (backbone, fold): metrics on its validation fold and on the held-out test set;
* per backbone: mean and sample standard deviation over folds (val and test);
* out-of-fold (OOF) metrics: each backbone's val predictions concatenated over folds cover the
  whole train+val set once;
* on the test set: each fold model, each backbone's fold ensemble (mean of probabilities), the
  all-backbone ensemble (mean of the backbone ensembles) and a weighted ensemble whose per-backbone
  weights are fit on OOF predictions only, plus the majority-class ("nv") baseline;
* bootstrap 95% confidence intervals of the test metrics, resampling lesions (a lesion's images are
  correlated, so resampling images would give intervals that are too narrow). A resample only
  changes how often each image counts, so its headline metrics are weighted sums of per-image
  results (``headline_metrics_weighted``), equal to torchmetrics on the repeated images (tested);
* paired differences on the test set: each ensemble minus the best single model (picked on its
  validation fold) and minus each outside reference model (``references``: e.g. a single-split
  baseline trained on the same split's train+val), with intervals over the same lesion
  resamples for both models;
* temperature scaling (one temperature per backbone) fit on OOF logits, with the expected
  calibration error before and after on the test set.

Writes ``RUN/ensemble/metrics.json`` and, through ``skinhpc.report``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from skinhpc import CLASSES, NUM_CLASSES
from skinhpc.config import atomic_write_text
from skinhpc.rundir import finished_metrics, fold_digests, recorded_task_job, run_layout

MAJORITY_CLASS = "nv"
FULL_HAM10000_MAJORITY_TOP1 = 6705 / 10015
"""Top-1 accuracy of always answering "nv" on all 10,015 HAM10000 images (66.95%)."""
SCALAR_METRICS = ("balanced_accuracy", "top1", "top2", "auroc_macro", "f1_macro", "loss")
"""The headline metrics, in the order tables show them (balanced accuracy leads)."""
PER_CLASS_METRICS = ("sensitivity", "specificity", "auroc")
PROB_FLOOR = 1e-7
"""Probabilities are clipped to this before taking logs (a one-hot baseline has zeros)."""
ECE_BINS = 15


class EnsembleError(ValueError):
    """The run directory cannot be ensembled; the message names the file and the problem."""


# --------------------------------------------------------------------------- reading the run

@dataclass
class Predictions:
    """One prediction file (``predictions_{val,test}.npz``), rows sorted ascending."""

    probs: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    image_ids: np.ndarray
    lesion_ids: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray) -> "Predictions":
        logits = None if self.logits is None else self.logits[idx]
        return Predictions(self.probs[idx], self.labels[idx], self.rows[idx], self.image_ids[idx],
                           self.lesion_ids[idx], logits)


@dataclass
class FoldRun:
    """A finished (backbone, fold) task and its predictions."""

    backbone: str
    fold: int
    dir: Path
    status: dict[str, Any]
    val: Predictions
    test: Predictions

    @property
    def name(self) -> str:
        return f"{self.backbone}/fold{self.fold}"


@dataclass
class RunScan:
    """What the run directory holds: finished folds, and the expected ones that are not."""

    run_dir: Path
    backbones: list[str]
    num_folds: int
    finished: list[FoldRun] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)

    def folds_of(self, backbone: str) -> list[FoldRun]:
        return [f for f in self.finished if f.backbone == backbone]

    @property
    def finished_backbones(self) -> list[str]:
        return [b for b in self.backbones if self.folds_of(b)]


REQUIRED_KEYS = ("probs", "labels", "rows", "image_ids", "lesion_ids")


def read_predictions(path: str | Path) -> Predictions:
    """Load a prediction npz (keys as in DESIGN.md), checked, sorted by row."""
    from skinhpc.evaluate import load_predictions

    path = Path(path)
    try:
        arrays = load_predictions(path)
    except (OSError, ValueError) as e:  # its messages name the file
        raise EnsembleError(str(e)) from None
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise EnsembleError(f"{path}: missing arrays {', '.join(missing)} (has {', '.join(arrays)})")
    probs = np.asarray(arrays["probs"], dtype=np.float64)
    n = len(arrays["rows"])
    if probs.ndim != 2 or probs.shape != (n, NUM_CLASSES):
        raise EnsembleError(f"{path}: probs has shape {probs.shape}, expected ({n}, {NUM_CLASSES})")
    for key in ("labels", "image_ids", "lesion_ids"):
        if len(arrays[key]) != n:
            raise EnsembleError(f"{path}: {key} has {len(arrays[key])} entries, rows has {n}")
    labels = arrays["labels"].astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise EnsembleError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    order = np.argsort(arrays["rows"], kind="stable")
    logits = arrays.get("logits")
    preds = Predictions(probs, labels, arrays["rows"].astype(np.int64), arrays["image_ids"].astype(str),
                        arrays["lesion_ids"].astype(str),
                        None if logits is None else np.asarray(logits, dtype=np.float64))
    return preds.take(order)


def _expected_layout(run_dir: Path) -> tuple[list[str], int, Any]:
    """Backbones and fold count the run was launched with (RUN/config.yaml, RUN/split.json), plus
    any backbone folder found on disk, so nothing finished is ever ignored; and the run's config
    (None when it has none: folds trained by hand)."""
    backbones: list[str] = []
    num_folds = 0
    from skinhpc.config import ConfigError, read_saved_config
    try:  # None without one; an error names the file (and a newer skinhpc that wrote it)
        cfg = read_saved_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise EnsembleError(str(e)) from None
    if cfg is not None:
        backbones, num_folds = list(cfg.backbones), cfg.split.folds
    try:
        backbones, num_folds = run_layout(run_dir, backbones, num_folds)
    except ValueError as e:
        raise EnsembleError(str(e)) from None
    return backbones, num_folds, cfg


def _trained_otherwise(fold_dir: Path, run_cfg: Any, against: str = "the run's config.yaml") -> str:
    """Why a fold's results may not join the run's ("" when they may): its config.yaml differs from
    the run's in a key that changes results (e.g. a fold trained by hand with another lr or other
    weights; paths aside, input files by what they name: ``config.run_config_changes``)."""
    from skinhpc.config import ConfigError, read_saved_config, run_config_changes
    try:
        fold_cfg = read_saved_config(fold_dir / "config.yaml")
    except ConfigError as e:
        return str(e)
    changed = run_config_changes(run_cfg, fold_cfg) if fold_cfg is not None else []
    return (f"trained with another config than {against} (run -> fold: {'; '.join(changed)}); "
            "not mixed into the run's results") if changed else ""


def _first_fold_config(run_dir: Path, backbone: str, num_folds: int) -> tuple[Any, str]:
    """The config.yaml of a backbone's first finished fold and its name: what its other folds
    must match in a run made by hand (no RUN/config.yaml). Per backbone: each names its own
    weights file (``model.pretrained=weights/{backbone}.pth`` filled in)."""
    from skinhpc.config import ConfigError, read_saved_config
    for fold in range(num_folds):
        fold_dir = run_dir / backbone / f"fold{fold}"
        if finished_metrics(fold_dir) is None:
            continue
        try:
            cfg = read_saved_config(fold_dir / "config.yaml")
        except ConfigError:
            continue
        if cfg is not None:
            return cfg, f"{backbone} fold {fold}, its first finished fold (the run has no config.yaml)"
    return None, ""


def _not_started(run_dir: Path, task_key: str) -> str:
    """Why a fold without a folder is missing, from the launcher's record of its job: a local job
    that failed before the fold began (e.g. a wrong weights file) is not merely "not started"."""
    entry = recorded_task_job(run_dir, task_key)
    if entry.get("local_job") and entry.get("state") == "failed":
        return f"its local job {entry['local_job']} failed before training began (see {entry.get('err', 'its log')})"
    if entry.get("local_job") or entry.get("job_id"):
        job = f"local job {entry['local_job']}" if entry.get("local_job") else f"job {entry['job_id']}"
        return f"not started ({job}; see `jobs/launch.py --status run_dir={run_dir}`)"
    return "not started"


def _read_fold(run_dir: Path, backbone: str, fold: int) -> FoldRun | str:
    """The finished fold, or the reason it does not count as finished."""
    fold_dir = run_dir / backbone / f"fold{fold}"
    status_path = fold_dir / "metrics.json"
    if not status_path.is_file():
        return _not_started(run_dir, f"{backbone}/fold{fold}") if not fold_dir.exists() else "not finished (no metrics.json)"
    try:
        status = json.loads(status_path.read_text())
    except ValueError as e:
        return f"unreadable {status_path.name} ({e})"
    if status.get("status") != "done":
        return f"status {status.get('status')!r}"
    val_path, test_path = fold_dir / "predictions_val.npz", fold_dir / "predictions_test.npz"
    for p in (val_path, test_path):
        if not p.is_file():
            return f"metrics.json says done but {p.name} is missing"
    try:  # one damaged file must not cost the report of every other fold
        return FoldRun(backbone, fold, fold_dir, status, read_predictions(val_path), read_predictions(test_path))
    except EnsembleError as e:
        return f"metrics.json says done but its predictions are unreadable: {e}"


def _reference_config(run_dir: Path, backbone: str, num_folds: int, run_cfg: Any) -> tuple[Any, str]:
    """The config a backbone's folds must match to be averaged, and its name: the run's, or in a
    run made by hand (no RUN/config.yaml) that of its first finished fold."""
    if run_cfg is not None:
        return run_cfg, "the run's config.yaml"
    return _first_fold_config(run_dir, backbone, num_folds)


def folds_trained_otherwise(run_dir: str | Path) -> dict[tuple[str, int], str]:
    """{(backbone, fold): why} of the finished folds the report leaves out for their config
    (``_trained_otherwise``), without reading predictions: what predict leaves out too."""
    run_dir = Path(run_dir)
    backbones, num_folds, run_cfg = _expected_layout(run_dir)
    out = {}
    for backbone in backbones:
        ref, against = _reference_config(run_dir, backbone, num_folds, run_cfg)
        for fold in range(num_folds):
            fold_dir = run_dir / backbone / f"fold{fold}"
            if ref is not None and finished_metrics(fold_dir) is not None:
                if why := _trained_otherwise(fold_dir, ref, against):
                    out[(backbone, fold)] = why
    return out


def scan_run(run_dir: str | Path) -> RunScan:
    """Find every finished fold of every backbone and list the expected folds that are missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EnsembleError(f"{run_dir}: no such run directory")
    backbones, num_folds, run_cfg = _expected_layout(run_dir)
    scan = RunScan(run_dir, backbones, num_folds)
    for backbone in backbones:
        # Folds trained by hand (no RUN/config.yaml) must still share one config to be averaged.
        ref, against = _reference_config(run_dir, backbone, num_folds, run_cfg)
        for fold in range(num_folds):
            result = _read_fold(run_dir, backbone, fold)
            otherwise = ""
            if isinstance(result, FoldRun) and ref is not None:
                otherwise = _trained_otherwise(result.dir, ref, against)
                result = otherwise or result
            if isinstance(result, FoldRun):
                scan.finished.append(result)
            else:
                # "done": the fold had finished (its files damaged, or trained otherwise): another
                # ensemble would leave it out again (launch.ensemble_current). "trained_otherwise":
                # its outputs are sound, written again they would be left out again.
                fold_dir = run_dir / backbone / f"fold{fold}"
                scan.missing.append({"backbone": backbone, "fold": fold, "reason": result,
                                     "done": finished_metrics(fold_dir) is not None,
                                     "trained_otherwise": bool(otherwise)})
    if not scan.finished:
        reasons = "".join(f"\n  {m['backbone']} fold {m['fold']}: {m['reason']}" for m in scan.missing[:10])
        raise EnsembleError(f"{run_dir}: no finished fold (looked for <backbone>/fold<k>/metrics.json "
                            f"with status done for backbones {backbones or '(none found)'}, {num_folds} folds)"
                            + reasons)
    _check_same_test_set(scan.finished)
    return scan


def _check_same_test_set(folds: list[FoldRun]) -> None:
    """Every fold model must have predicted the same test images with the same labels."""
    ref = folds[0]
    for f in folds[1:]:
        if not (np.array_equal(f.test.rows, ref.test.rows) and np.array_equal(f.test.labels, ref.test.labels)):
            raise EnsembleError(f"{f.dir / 'predictions_test.npz'}: its test rows/labels differ from "
                                f"{ref.dir / 'predictions_test.npz'}; the folds do not share one split")


def read_reference(path: str | Path, test: Predictions) -> Predictions:
    """Test predictions of a model trained outside this run (e.g. a single-split baseline),
    aligned to the run's test images by image id so that it can be compared image for image. Its
    file must cover every test image with the same labels (the same split of the same metadata)."""
    path = Path(path)
    ref = read_predictions(path)
    where = {image_id: i for i, image_id in enumerate(ref.image_ids)}
    absent = [image_id for image_id in test.image_ids if image_id not in where]
    if absent:
        raise EnsembleError(f"{path}: lacks {len(absent)} of the run's {len(test)} test images (first: "
                            f"{', '.join(absent[:3])}); a reference must predict the same test set")
    aligned = ref.take(np.array([where[i] for i in test.image_ids], dtype=np.int64))
    wrong = np.flatnonzero(aligned.labels != test.labels)
    if len(wrong):
        raise EnsembleError(f"{path}: image {aligned.image_ids[wrong[0]]} has label {aligned.labels[wrong[0]]}, "
                            f"the run's test set {test.labels[wrong[0]]} ({len(wrong)} images differ)")
    return Predictions(aligned.probs, test.labels, test.rows, test.image_ids, test.lesion_ids, aligned.logits)


# --------------------------------------------------------------------------- metrics

def nll_per_image(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each image's true class (probabilities clipped to PROB_FLOOR)."""
    probs = np.asarray(probs)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], PROB_FLOOR, 1.0))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (cross-entropy of the probabilities, unweighted)."""
    return float(np.mean(nll_per_image(probs, labels)))


def metrics_of(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``evaluate.compute_metrics`` with the loss set to the mean NLL of these probabilities, so
    fold models and ensembles (which have no logits) report comparable losses."""
    from skinhpc.evaluate import compute_metrics
    return _plain(compute_metrics(np.asarray(probs, dtype=np.float32), np.asarray(labels, dtype=np.int64),
                                  loss=nll(probs, labels)))


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy/torch scalars to float, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def aggregate_folds(metric_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None for one fold) over folds, for the headline
    metrics and the per-class ones."""
    def stats(values: list[float | None]) -> tuple[float | None, float | None]:
        vals = [v for v in values if v is not None]
        if not vals:
            return None, None
        mean = float(np.mean(vals))
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        return mean, std

    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key in SCALAR_METRICS:
        mean[key], std[key] = stats([m.get(key) for m in metric_dicts])
    for key in PER_CLASS_METRICS:
        mean[key], std[key] = {}, {}
        for cls in CLASSES:
            mean[key][cls], std[key][cls] = stats([m.get(key, {}).get(cls) for m in metric_dicts])
    return {"mean": mean, "std": std, "n_folds": len(metric_dicts)}


def concat_oof(folds: list[FoldRun]) -> Predictions:
    """One backbone's out-of-fold predictions: the val predictions of its folds, sorted by row."""
    parts = [f.val for f in folds]
    preds = Predictions(np.concatenate([p.probs for p in parts]), np.concatenate([p.labels for p in parts]),
                        np.concatenate([p.rows for p in parts]), np.concatenate([p.image_ids for p in parts]),
                        np.concatenate([p.lesion_ids for p in parts]),
                        np.concatenate([log_probs(p) for p in parts]))
    if len(np.unique(preds.rows)) != len(preds.rows):
        names = ", ".join(f.name for f in folds)
        raise EnsembleError(f"val predictions of {names} overlap: the folds of one backbone must be disjoint")
    return preds.take(np.argsort(preds.rows, kind="stable"))


def mean_probs(prob_list: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """(Weighted) mean of probability arrays: the ensemble's prediction."""
    stack = np.stack(prob_list)
    w = np.full(len(prob_list), 1.0 / len(prob_list)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.tensordot(w, stack, axes=1)


def common_rows(preds: list[Predictions]) -> list[Predictions]:
    """Restrict predictions of the same images to the rows all of them have (in row order)."""
    rows = preds[0].rows
    for p in preds[1:]:
        rows = np.intersect1d(rows, p.rows)
    return [p.take(np.searchsorted(p.rows, rows)) for p in preds]


def fit_weights(prob_list: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log-loss of the weighted mean.

    Call it with out-of-fold predictions only: fitting on the test set would leak it.
    """
    k = len(prob_list)
    if k == 1:
        return np.ones(1)
    from scipy.optimize import minimize

    picked = np.stack([p[np.arange(len(labels)), labels] for p in prob_list], axis=1)  # (N, k)

    def loss(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.clip(picked @ w, PROB_FLOOR, None))))

    def grad(w: np.ndarray) -> np.ndarray:
        return -np.mean(picked / np.clip(picked @ w, PROB_FLOOR, None)[:, None], axis=0)

    res = minimize(loss, np.full(k, 1.0 / k), jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum()
    # SLSQP can stop early on flat losses; never return something worse than the plain mean.
    uniform = np.full(k, 1.0 / k)
    return w if loss(w) <= loss(uniform) + 1e-12 else uniform


TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The interval fit_temperature searches; a fit at its end means the predictions carry little signal."""


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (log-probabilities work as logits).

    Fit on one backbone's out-of-fold logits only (every row predicted by one fold model)."""
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        return nll(apply_temperature(logits, math.exp(log_t)), labels)

    res = minimize_scalar(loss, bounds=(math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_probs(preds: Predictions) -> np.ndarray:
    """The model's logits if stored, else log-probabilities (equal up to a per-row constant)."""
    if preds.logits is not None and preds.logits.shape == preds.probs.shape:
        return preds.logits
    return np.log(np.clip(preds.probs, PROB_FLOOR, 1.0))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (L1, equal-width confidence bins) from torchmetrics."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(torch.as_tensor(probs, dtype=torch.float32),
                                              torch.as_tensor(labels, dtype=torch.int64),
                                              num_classes=NUM_CLASSES, n_bins=n_bins, norm="l1"))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    out: dict[str, list] = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[sel].mean()) if n else None)
        out["accuracy"].append(float(correct[sel].mean()) if n else None)
    return out


def _auc_weighted(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of ``scores`` (N,) for every row of sample weights ``weights`` (B, N):
    the weighted Mann-Whitney statistic, ties counted half, which is what the trapezoidal ROC over
    every distinct threshold (torchmetrics' ``thresholds=None``) computes. NaN where a row has no
    positive or no negative weight."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each run of equal scores
    w = weights[:, order]
    pos = positive[order]

    def group_sums(x: np.ndarray) -> np.ndarray:
        at_ends = np.cumsum(x, axis=1)[:, ends]
        return np.diff(at_ends, axis=1, prepend=0.0)

    gp = group_sums(w * pos)
    gn = group_sums(w * ~pos)
    below = np.cumsum(gn, axis=1) - gn  # negative weight strictly below each group's score
    n_pos, n_neg = gp.sum(1), gn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gp * (below + 0.5 * gn)).sum(1) / (n_pos * n_neg)


def _row_nanmean(x: np.ndarray) -> np.ndarray:
    """Mean of each row over its defined entries; NaN, without numpy's warning, for a row with none
    (a resample holding one class has no AUC at all: left out of the interval, not worth a warning)."""
    defined = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, x, 0.0).sum(1) / defined.sum(1)


def headline_metrics_weighted(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """``metrics_of``'s SCALAR_METRICS for many weightings of one prediction set at once: row b of
    ``weights`` (B, N) says how often each image is counted (a bootstrap resample), and entry b of
    each returned (B,) array equals ``metrics_of`` on the images repeated that often (NaN where
    undefined). Why: an image's prediction, top-2 hit and log-loss do not change between
    resamples, only the sums over them do, so 1,000 resamples cost a few vectorised sums instead of
    1,000 torchmetrics calls (minutes of the ensemble job, for 15-30 models)."""
    import torch
    from torchmetrics.utilities.data import select_topk

    # The same inputs compute_metrics sees: float32 probabilities (ties as torchmetrics sees them).
    p32 = np.asarray(probs, dtype=np.float32).astype(np.float64)
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    n = np.arange(len(y))
    pred = p32.argmax(1)  # first maximum, as torch's argmax
    top2 = select_topk(torch.from_numpy(p32), 2).numpy()[n, y].astype(bool)  # torchmetrics' own top-k
    log_loss = nll_per_image(probs, y)
    total = w.sum(1)

    onehot_y = np.eye(NUM_CLASSES, dtype=bool)[y]
    onehot_p = np.eye(NUM_CLASSES, dtype=bool)[pred]
    tp = w @ (onehot_y & onehot_p)            # (B, C) weighted counts
    positives = w @ onehot_y
    predicted = w @ onehot_p
    fp, fn = predicted - tp, positives - tp
    present = positives > 0
    has_negatives = (total[:, None] - positives) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / positives, np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        counted = (tp + fp + fn) > 0  # torchmetrics' macro F1 leaves out classes never seen nor predicted
        auc = np.stack([_auc_weighted(p32[:, c], y == c, w) for c in range(NUM_CLASSES)], axis=1)
        auc = np.where(present & has_negatives, auc, np.nan)
        return {
            "balanced_accuracy": _row_nanmean(recall),
            "top1": (w @ (pred == y)) / total,
            "top2": (w @ top2) / total,
            "auroc_macro": _row_nanmean(auc),
            "f1_macro": np.where(counted.any(1), (f1 * counted).sum(1) / counted.sum(1), 0.0),
            "loss": (w @ log_loss) / total,
        }


def _lesion_draws(lesion_ids: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """The lesion of each image (an index), the number of lesions, and ``n_boot`` draws of lesion
    indices with replacement. The same seed and test set give the same draws for every model."""
    uniq, group = np.unique(lesion_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    return group, len(uniq), [rng.integers(0, len(uniq), size=len(uniq)) for _ in range(n_boot)]


def _resample_weights(group: np.ndarray, n_lesions: int, draws: list[np.ndarray]):
    """(resamples, images) counts of how often each image is drawn, in chunks that bound memory."""
    chunk = max(1, 2_000_000 // max(1, len(group)))
    for i in range(0, len(draws), chunk):
        counts = np.stack([np.bincount(d, minlength=n_lesions) for d in draws[i:i + chunk]])
        yield counts[:, group]


def resamples_lacking_a_class(labels: np.ndarray, lesion_ids: np.ndarray, *, n_boot: int = 1000,
                              seed: int = 0) -> int:
    """How many of the lesion resamples (the same draws as ``resampled_metrics``) hold no image of
    a class the test set has. Such a resample averages balanced accuracy and macro AUC over the
    classes it holds, as the point estimate does for a test set without a class; with few test
    lesions of a rare class this happens often enough to say so next to the intervals."""
    group, n_lesions, draws = _lesion_draws(lesion_ids, n_boot, seed)
    onehot = np.eye(NUM_CLASSES, dtype=bool)[np.asarray(labels, dtype=np.int64)]
    present = onehot.any(0)
    return int(sum(((w @ onehot)[:, present] == 0).any(1).sum() for w in _resample_weights(group, n_lesions, draws)))


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))] if len(values) else None


def resampled_metrics(probs: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """The headline metrics of ``n_boot`` lesion resamples (all images of a drawn lesion come
    along), as (n_boot,) arrays, NaN where a resample leaves a metric undefined. Computed at once by
    ``headline_metrics_weighted`` (equal to ``metrics_of`` on each resample's images). The same
    seed and test set draw the same lesions for every model, so two models' arrays are paired."""
    group, n_lesions, draws = _lesion_draws(lesion_ids, n_boot, seed)
    parts = [headline_metrics_weighted(probs, labels, w) for w in _resample_weights(group, n_lesions, draws)]
    return {k: np.concatenate([m[k] for m in parts]) if parts else np.zeros(0) for k in SCALAR_METRICS}


def _intervals(samples: dict[str, np.ndarray], n_lesions: int, level: float = 0.95) -> dict[str, Any]:
    """Percentile intervals of resampled metrics (undefined resamples left out)."""
    ci = {k: _interval(v[~np.isnan(v)], level) for k, v in samples.items()}
    n_boot = len(next(iter(samples.values()), ()))
    return {"ci": ci, "level": level, "n_boot": n_boot, "n_lesions": n_lesions, "unit": "lesion"}


def _paired(samples_a: dict[str, np.ndarray], samples_b: dict[str, np.ndarray], point_a: dict[str, Any],
            point_b: dict[str, Any], n_lesions: int, level: float = 0.95) -> dict[str, Any]:
    """A minus B from their metrics and their resampled metrics on the same resamples."""
    deltas = {k: samples_a[k] - samples_b[k] for k in SCALAR_METRICS}
    kept = {k: v[~np.isnan(v)] for k, v in deltas.items()}
    return {**_intervals(deltas, n_lesions, level),
            "diff": {k: (None if point_a.get(k) is None or point_b.get(k) is None
                         else float(point_a[k]) - float(point_b[k])) for k in SCALAR_METRICS},
            "frac_a_better": {k: (float(np.mean(v < 0 if k == "loss" else v > 0)) if len(v) else None)
                              for k, v in kept.items()}}


def bootstrap_ci(probs: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, *, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95,
                 metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Percentile bootstrap intervals of the headline metrics over lesion resamples
    (``resampled_metrics``). With ``metric_fn``, it is called on each resample's images instead
    (the same draws), e.g. ``metrics_of`` to check the vectorised sums against torchmetrics."""
    if metric_fn is None:
        return _intervals(resampled_metrics(probs, labels, lesion_ids, n_boot=n_boot, seed=seed),
                          len(np.unique(lesion_ids)), level)
    group, n_lesions, draws = _lesion_draws(lesion_ids, n_boot, seed)
    members = [np.flatnonzero(group == g) for g in range(n_lesions)]
    samples = {k: np.full(n_boot, np.nan) for k in SCALAR_METRICS}
    for b, drawn in enumerate(draws):
        idx = np.concatenate([members[g] for g in drawn])
        m = metric_fn(probs[idx], labels[idx])
        for k in SCALAR_METRICS:
            if m.get(k) is not None:
                samples[k][b] = float(m[k])
    return _intervals(samples, n_lesions, level)


def paired_difference(probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, *,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Model A minus model B on the same test images: the difference of each headline metric and
    its percentile interval over lesion resamples drawn once for both (paired). Why paired: the two
    models' own intervals overlap even when A is better on nearly every resample, because most of
    their width is which lesions the test set happens to hold, shared by both. An interval above 0
    (below 0 for the loss) says A is better beyond that noise; ``frac_a_better`` is the share of
    resamples on which it is."""
    a, b = (resampled_metrics(p, labels, lesion_ids, n_boot=n_boot, seed=seed) for p in (probs_a, probs_b))
    return _paired(a, b, metrics_of(probs_a, labels), metrics_of(probs_b, labels), len(np.unique(lesion_ids)), level)


# --------------------------------------------------------------------------- the whole run

@dataclass
class TestEntry:
    """One model or ensemble evaluated on the held-out test set."""

    name: str
    kind: str  # baseline | fold | backbone_ensemble | ensemble
    probs: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)


def _calibration(temperatures: dict[str, float], before: np.ndarray, after: np.ndarray,
                 labels: np.ndarray, oof_n: int) -> dict[str, Any]:
    return {
        "temperature": temperatures, "fit_on": "out-of-fold", "oof_n": oof_n,
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": nll(before, labels), "nll_after": nll(after, labels),
        "reliability_before": reliability_bins(before, labels),
        "reliability_after": reliability_bins(after, labels),
    }


def calibrate(scan: RunScan, oof_preds: dict[str, Predictions], weights: np.ndarray,
              test_labels: np.ndarray) -> dict[str, Any]:
    """Temperature scaling: one temperature per backbone, fit on its out-of-fold logits, applied
    to each of its fold models before they are averaged (scaling the averaged ensemble with a
    temperature fit on single models would be a mismatch: averaging already softens)."""
    backbones = list(oof_preds)
    temps = {b: fit_temperature(log_probs(p), p.labels) for b, p in oof_preds.items()}
    before = {b: mean_probs([f.test.probs for f in scan.folds_of(b)]) for b in backbones}
    after = {b: mean_probs([apply_temperature(log_probs(f.test), temps[b]) for f in scan.folds_of(b)])
             for b in backbones}
    out = {f"{b}/ensemble": _calibration({b: temps[b]}, before[b], after[b], test_labels, len(oof_preds[b]))
           for b in backbones}
    oof_n = sum(len(p) for p in oof_preds.values())
    for name, w in (("ensemble_mean", None), ("ensemble_weighted", weights)):
        out[name] = _calibration(temps, mean_probs([before[b] for b in backbones], w),
                                 mean_probs([after[b] for b in backbones], w), test_labels, oof_n)
    return out


def _majority_probs(n: int) -> np.ndarray:
    probs = np.zeros((n, NUM_CLASSES))
    probs[:, CLASSES.index(MAJORITY_CLASS)] = 1.0
    return probs


# What the report's fold table shows of each fold's metrics.json besides its metrics.
_FOLD_STATUS_KEYS = ("best_epoch", "epochs_trained", "epochs", "stopped", "best_lost")


def _backbone_numbers(folds: list[FoldRun], test_labels: np.ndarray) -> tuple[dict, dict, list[TestEntry]]:
    """One backbone: metrics of each fold (val and test), their mean ± std, and its test entries
    (every fold model, then the fold ensemble)."""
    per_fold = {f"fold{f.fold}": {"val": metrics_of(f.val.probs, f.val.labels),
                                  "test": metrics_of(f.test.probs, f.test.labels),
                                  **{k: f.status.get(k) for k in _FOLD_STATUS_KEYS},
                                  "select_metric": _select_metric(f)}
                for f in folds}
    cv = {"val": aggregate_folds([m["val"] for m in per_fold.values()]),
          "test": aggregate_folds([m["test"] for m in per_fold.values()]),
          "folds": [f.fold for f in folds]}
    entries = [TestEntry(f.name, "fold", f.test.probs, per_fold[f"fold{f.fold}"]["test"]) for f in folds]
    ens_probs = mean_probs([f.test.probs for f in folds])
    entries.append(TestEntry(f"{folds[0].backbone}/ensemble", "backbone_ensemble", ens_probs,
                             metrics_of(ens_probs, test_labels)))
    return per_fold, cv, entries


def _select_metric(fold: FoldRun) -> str | None:
    """How the fold chose the epoch it kept: its metrics.json says (since it records it), else its
    config.yaml; None when neither can be read."""
    if fold.status.get("select_metric"):
        return fold.status["select_metric"]
    from skinhpc.config import ConfigError, read_saved_config
    try:
        cfg = read_saved_config(fold.dir / "config.yaml")
    except ConfigError:
        return None
    return cfg.train.select_metric if cfg is not None else None


def class_counts(preds: Predictions) -> dict[str, dict[str, int]]:
    """Images and lesions of each class: how much a per-class number rests on."""
    return {cls: {"images": int(np.sum(preds.labels == i)),
                  "lesions": len(np.unique(preds.lesion_ids[preds.labels == i]))} for i, cls in enumerate(CLASSES)}


def _absent_classes(folds: list[FoldRun]) -> dict[str, list[str]]:
    """The classes each fold's validation set lacks (its balanced accuracy and macro AUC average
    over the others). Every backbone's fold k validates on the same images: one entry per fold."""
    absent = {f"fold{f.fold}": [c for i, c in enumerate(CLASSES) if not np.any(f.val.labels == i)] for f in folds}
    return {k: v for k, v in sorted(absent.items()) if v}


def _oof_ensembles(oof_preds: dict[str, Predictions]) -> tuple[np.ndarray, dict[str, Predictions]]:
    """Backbone weights fit on the out-of-fold rows every backbone predicted, and the mean and
    weighted OOF ensembles on those rows. No common rows (e.g. disjoint missing folds): uniform."""
    aligned = common_rows(list(oof_preds.values()))
    ref = aligned[0]
    k = len(aligned)
    weights = fit_weights([p.probs for p in aligned], ref.labels) if len(ref) else np.full(k, 1.0 / k)
    ensembles = {name: Predictions(mean_probs([p.probs for p in aligned], w), ref.labels, ref.rows,
                                   ref.image_ids, ref.lesion_ids)
                 for name, w in (("ensemble_mean", None), ("ensemble_weighted", weights))}
    return weights, ensembles


def _test_intervals(entries: list[TestEntry], best: TestEntry, labels: np.ndarray, lesions: np.ndarray,
                    n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bootstrap intervals of every test entry, and every ensemble minus the best single model
    (picked on validation) and minus each reference, paired. Each entry's metrics are resampled
    once and serve both."""
    if n_boot <= 0:
        return {}, {}
    n_lesions = len(np.unique(lesions))
    resampled = {e.name: resampled_metrics(e.probs, labels, lesions, n_boot=n_boot, seed=seed) for e in entries}
    bootstrap = {name: _intervals(samples, n_lesions) for name, samples in resampled.items()}
    lacking = resamples_lacking_a_class(labels, lesions, n_boot=n_boot, seed=seed)
    for e in entries:  # no interval around a number left undefined (the baseline's loss and top-2)
        bootstrap[e.name]["ci"].update({k: None for k in SCALAR_METRICS if e.metrics.get(k, 0) is None})
        bootstrap[e.name]["resamples_lacking_a_class"] = lacking
    ensembles = [e for e in entries if e.kind in ("backbone_ensemble", "ensemble")]
    others = [best] + [e for e in entries if e.kind == "reference"]
    paired = {o.name: {e.name: _paired(resampled[e.name], resampled[o.name], e.metrics, o.metrics, n_lesions)
                       for e in ensembles} for o in others}
    return bootstrap, paired


def evaluate_run(scan: RunScan, *, n_boot: int = 1000, seed: int = 0,
                 references: dict[str, Predictions] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """All the numbers of ``run_ensemble`` (JSON-ready) and the arrays the plots need.
    ``references``: name -> test predictions of outside models (``read_reference``), shown beside
    the ensembles and compared with them."""
    test_labels = scan.finished[0].test.labels
    test_lesions = scan.finished[0].test.lesion_ids
    backbones = scan.finished_backbones

    baseline = TestEntry("majority_nv", "baseline", _majority_probs(len(test_labels)))
    # One-hot: no meaningful log-loss, and its second guess would be a tie among the other classes.
    baseline.metrics = {**metrics_of(baseline.probs, test_labels), "loss": None, "top2": None}
    entries = [baseline]
    per_fold: dict[str, Any] = {}
    cv: dict[str, Any] = {}
    for b in backbones:
        per_fold[b], cv[b], backbone_entries = _backbone_numbers(scan.folds_of(b), test_labels)
        entries += backbone_entries

    oof_preds = {b: concat_oof(scan.folds_of(b)) for b in backbones}
    weights, oof_ens = _oof_ensembles(oof_preds)  # fit on out-of-fold predictions only, never on test
    backbone_test = [e.probs for e in entries if e.kind == "backbone_ensemble"]
    for name, w in (("ensemble_mean", None), ("ensemble_weighted", weights)):
        probs = mean_probs(backbone_test, w)
        entries.append(TestEntry(name, "ensemble", probs, metrics_of(probs, test_labels)))
    oof_metrics = {b: metrics_of(p.probs, p.labels) for b, p in oof_preds.items()}
    oof_metrics.update({k: metrics_of(p.probs, p.labels) for k, p in oof_ens.items() if len(p)})

    entries += [TestEntry(f"reference/{name}", "reference", p.probs, metrics_of(p.probs, test_labels))
                for name, p in (references or {}).items()]
    # The best single model is chosen on its own validation fold, never on the test set.
    best = max(scan.finished, key=lambda f: per_fold[f.backbone][f"fold{f.fold}"]["val"]["balanced_accuracy"] or 0)
    best_entry = next(e for e in entries if e.name == best.name)
    bootstrap, paired = _test_intervals(entries, best_entry, test_labels, test_lesions, n_boot, seed)
    n_common = len(oof_ens["ensemble_mean"])
    results = _plain({
        "run_dir": str(Path(scan.run_dir).absolute()),  # the report is read from elsewhere than the shell
        "classes": list(CLASSES),
        "expected": {"backbones": scan.backbones, "folds": scan.num_folds},
        "finished": [{"backbone": f.backbone, "fold": f.fold} for f in scan.finished],
        "missing": scan.missing,
        "n_test": len(test_labels), "n_test_lesions": len(np.unique(test_lesions)),
        "test_classes": class_counts(scan.finished[0].test),
        "val_absent_classes": _absent_classes(scan.finished),
        "majority_class": MAJORITY_CLASS,
        "majority_top1_full_ham10000": FULL_HAM10000_MAJORITY_TOP1,
        "per_fold": per_fold,
        "cv": cv,
        "oof": {"metrics": oof_metrics, "n": {b: len(p) for b, p in oof_preds.items()}, "n_common": n_common},
        "test": {e.name: {"kind": e.kind, **e.metrics} for e in entries},
        "weights": {"backbones": dict(zip(backbones, weights.tolist())), "fit_on": "out-of-fold",
                    "objective": "log-loss", "n": n_common},
        "bootstrap": bootstrap,
        "paired": paired,
        "calibration": calibrate(scan, oof_preds, weights, test_labels),
        "best_single": best.name,
    })
    arrays = {"test_labels": test_labels, "entries": {e.name: e.probs for e in entries}}
    return results, arrays


def run_ensemble(run_dir: str | Path, *, n_boot: int = 1000, seed: int = 0, plots: bool = True,
                 references: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Evaluate every finished fold of ``run_dir`` and write ``RUN/ensemble/{metrics.json,
    report.md, *.png}``. Works with any subset of finished folds; the missing ones are listed.
    ``references``: name -> ``predictions_test.npz`` of a model trained outside the run on the
    same test set, reported beside the ensembles with paired differences."""
    from skinhpc import report

    digests = fold_digests(Path(run_dir))  # before reading: a fold finishing meanwhile is not counted as read
    scan = scan_run(run_dir)
    test = scan.finished[0].test
    refs = {name: read_reference(path, test) for name, path in (references or {}).items()}
    results, arrays = evaluate_run(scan, n_boot=n_boot, seed=seed, references=refs)
    results["references"] = {f"reference/{name}": str(Path(path).absolute()) for name, path in (references or {}).items()}
    results["fold_digests"] = digests  # what the launcher compares to tell whether this ensemble is current
    out_dir = Path(run_dir) / "ensemble"
    _recover(out_dir)
    new_dir = out_dir.with_name(f".ensemble.tmp-{_me()}")
    shutil.rmtree(new_dir, ignore_errors=True)
    new_dir.mkdir()
    try:
        results["plots"] = report.make_plots(results, arrays, scan, new_dir) if plots else []
        atomic_write_text(new_dir / "report.md", report.markdown(results))
        atomic_write_text(new_dir / "metrics.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
        _swap_in_dir(new_dir, out_dir)
    finally:
        shutil.rmtree(new_dir, ignore_errors=True)
    return results


def _me() -> str:
    """This process, in temporary names: host and pid (ensembles may run on several nodes)."""
    return f"{os.uname().nodename}-{os.getpid()}"


def _is_output(path: Path) -> bool:
    """One of the files an ensemble writes (report.make_plots' figures among them)."""
    from skinhpc.report import FIGURE_PREFIXES
    return path.name in ("metrics.json", "report.md") or (path.suffix == ".png" and path.name.startswith(FIGURE_PREFIXES))


def _swap_in_dir(new_dir: Path, out_dir: Path) -> None:
    """Replace the ensemble's outputs in ``out_dir`` with those in ``new_dir`` as a whole: the
    figures, report.md and metrics.json of one ensemble never sit beside another's (an earlier
    run's figures of a backbone since dropped, or the new figures of a run killed before its
    metrics.json). Anything else a user put in ``out_dir`` moves along."""
    old = out_dir.with_name(f".ensemble.old-{_me()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(new_dir, out_dir)
    _carry_over(old, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _carry_over(old: Path, out_dir: Path) -> None:
    """Move what is not an ensemble output (a user's notes) from ``old`` into ``out_dir``."""
    for other in old.iterdir() if old.is_dir() else []:
        if not _is_output(other) and not (out_dir / other.name).exists():
            os.replace(other, out_dir / other.name)


def _recover(out_dir: Path, now: float | None = None) -> None:
    """After an ensemble killed between the two renames of ``_swap_in_dir``: its earlier outputs
    back in place. Only folders older than a minute count as left by a killed ensemble (a younger
    one may be another ensemble's between its renames); temporary folders older than an hour go.
    Ages are from st_ctime: a rename leaves a folder's mtime as it was, and changes its ctime."""
    now = time.time() if now is None else now

    def aged(pattern: str, older_than: float) -> list[Path]:
        """The folders matching ``pattern`` older than ``older_than`` s, youngest first."""
        found = []
        for p in out_dir.parent.glob(pattern):
            try:
                found.append((now - p.stat().st_ctime, p))
            except OSError:  # removed meanwhile by the ensemble it belongs to
                continue
        return [p for age, p in sorted(found) if age > older_than]

    olds = aged(".ensemble.old-*", 60)
    if olds and not out_dir.exists():
        try:
            os.replace(olds.pop(0), out_dir)  # the youngest: the outputs of the last ensemble
        except OSError:  # another ensemble got there first
            pass
    for stale in olds:
        _carry_over(stale, out_dir)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in aged(".ensemble.tmp-*", 3600):
        shutil.rmtree(stale, ignore_errors=True)


def summary(results: dict[str, Any]) -> str:
    """A few console lines: finished and missing folds, then the test metrics (balanced accuracy first)."""
    exp = results["expected"]
    lines = [f"finished folds: {len(results['finished'])} of {len(exp['backbones']) * exp['folds']}"]
    for m in results["missing"]:
        lines.append(f"missing: {m['backbone']} fold {m['fold']} ({m['reason']})")
    from skinhpc.report import paired_comparisons, shown_test_entries

    lines.append(f"test set: {results['n_test']} images, {results['n_test_lesions']} lesions")
    for name, m in shown_test_entries(results):
        ci = results.get("bootstrap", {}).get(name, {}).get("ci", {}).get("balanced_accuracy")
        ci_text = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        nums = "  ".join(f"{k} {_num(m.get(k))}" for k in ("top1", "top2", "auroc_macro"))
        lines.append(f"{name:<32} balanced_accuracy {_num(m.get('balanced_accuracy'))}{ci_text}  {nums}")
    for name, other, d in paired_comparisons(results):
        parts = [f"{k} {d['diff'][k]:+.4f} [{d['ci'][k][0]:+.4f}, {d['ci'][k][1]:+.4f}]"
                 for k in ("balanced_accuracy", "auroc_macro") if d["diff"][k] is not None and d["ci"][k]]
        lines.append(f"{name} minus {other}: " + "  ".join(parts))
    weights = ", ".join(f"{b}={w:.3f}" for b, w in results["weights"]["backbones"].items())
    lines.append(f"OOF weights: {weights}")
    out = Path(results["run_dir"]) / "ensemble"
    lines.append(f"wrote {out}/metrics.json, report.md, {len(results.get('plots', []))} plots")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
