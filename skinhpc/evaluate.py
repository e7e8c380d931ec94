"""Metrics and predictions of a classifier: torchmetrics over the 7 HAM10000 classes.

``compute_metrics`` turns probabilities and labels into one JSON-ready dict. The headline is
**balanced accuracy** (the ISIC challenge metric): the mean recall over the classes *present in the
labels* — a class with no sample in the set has no defined recall and is left out rather than counted
as 0 (sklearn's ``balanced_accuracy_score`` does the same). HAM10000 is 67% ``nv``, so plain top-1
accuracy rewards always answering ``nv``; balanced accuracy does not.

``predict`` runs a model over a loader's batches, gathers the results of every rank, removes the
duplicates that distributed padding adds (by ``row``) and sorts by row; ``save_predictions`` writes
them with image and lesion ids as an ``.npz`` (format in DESIGN.md).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from skinhpc import CLASSES
from skinhpc.config import atomic_write

NUM = len(CLASSES)


# --------------------------------------------------------------------------- metrics

def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _number(x: float) -> float | None:
    """A plain float, or None where the value is undefined (strict JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def compute_metrics(probs: Any, labels: Any, loss: float | None = None) -> dict[str, Any]:
    """All evaluation metrics of predicted class probabilities ``probs`` (N, 7) against ``labels`` (N,).

    - ``balanced_accuracy``: mean recall over the classes present in ``labels``.
    - ``top1``, ``top2``: fraction of samples whose label is among the 1 / 2 most probable classes.
    - ``auroc``: one-vs-rest ROC AUC per class; ``None`` where undefined (no positive or no negative
      sample of that class). ``auroc_macro``: their mean over the defined classes.
    - ``sensitivity`` (recall) per class, ``None`` for classes absent from ``labels``; ``specificity``
      per class, ``None`` when every sample has that class.
    - ``f1_macro``: torchmetrics' macro F1 (classes never seen nor predicted are left out).
    - ``confusion_matrix``: 7x7 counts, rows = true class, columns = predicted class.
    - ``loss`` as given (or None), ``n`` the number of samples.
    Values are plain Python numbers, lists and dicts keyed by class name (JSON-serialisable).
    """
    p = _as_tensor(probs, torch.float64)
    y = _as_tensor(labels, torch.int64)
    if p.ndim != 2 or p.shape[1] != NUM:
        raise ValueError(f"probs must have shape (N, {NUM}), not {tuple(p.shape)}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"labels must have shape ({len(p)},), not {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    if int(y.min()) < 0 or int(y.max()) >= NUM:
        raise ValueError(f"labels must be in 0..{NUM - 1}")

    cm = multiclass_confusion_matrix(p, y, NUM).to(torch.float64)  # rows true, columns predicted
    tp = cm.diag()
    positives = cm.sum(1)                    # samples of each true class
    predicted = cm.sum(0)
    negatives = len(y) - positives
    tn = negatives - (predicted - tp)
    present = positives > 0
    sensitivity = torch.where(present, tp / positives.clamp(min=1), torch.nan)
    specificity = torch.where(negatives > 0, tn / negatives.clamp(min=1), torch.nan)

    with warnings.catch_warnings():
        # torchmetrics warns for classes without positives; those AUCs are masked out below.
        warnings.simplefilter("ignore", UserWarning)
        auroc = multiclass_auroc(p, y, NUM, average=None, thresholds=None)
        f1_macro = multiclass_f1_score(p, y, NUM, average="macro")
    auroc = torch.where(present & (negatives > 0), auroc.to(torch.float64), torch.nan)
    defined_auc = auroc[~auroc.isnan()]

    def per_class(values: torch.Tensor) -> dict[str, float | None]:
        return {name: _number(v) for name, v in zip(CLASSES, values.tolist())}

    return {
        "balanced_accuracy": _number(sensitivity[present].mean()),
        "top1": _number(multiclass_accuracy(p, y, NUM, average="micro", top_k=1)),
        "top2": _number(multiclass_accuracy(p, y, NUM, average="micro", top_k=2)),
        "auroc_macro": _number(defined_auc.mean()) if len(defined_auc) else None,
        "f1_macro": _number(f1_macro),
        "auroc": per_class(auroc),
        "sensitivity": per_class(sensitivity),
        "specificity": per_class(specificity),
        "confusion_matrix": cm.to(torch.int64).tolist(),
        "loss": None if loss is None else _number(loss),
        "n": int(len(y)),
    }


def format_metrics(m: dict[str, Any]) -> str:
    """One line for logs, balanced accuracy first: ``bal_acc 0.612 top1 0.801 top2 ... auc ...``."""
    def num(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{v:.3f}" if key != "loss" else f"{v:.4f}"
    parts = [f"bal_acc {num('balanced_accuracy')}", f"top1 {num('top1')}", f"top2 {num('top2')}",
             f"auc {num('auroc_macro')}", f"f1 {num('f1_macro')}"]
    if m.get("loss") is not None:
        parts.append(f"loss {num('loss')}")
    parts.append(f"n {m.get('n', 0)}")
    return " ".join(parts)


# --------------------------------------------------------------------------- predictions

@dataclass
class Predictions:
    """A model's outputs on a set of images, one entry per beton row, sorted by row."""

    probs: np.ndarray
    """(N, 7) float32 softmax probabilities."""
    logits: np.ndarray
    """(N, 7) float32 raw outputs."""
    labels: np.ndarray
    """(N,) int64 true labels."""
    rows: np.ndarray
    """(N,) int64 rows of the beton / index.csv."""

    def __len__(self) -> int:
        return len(self.rows)

    def cross_entropy(self, weight: Any = None, label_smoothing: float = 0.0) -> float:
        """Mean cross-entropy of the logits (optionally class-weighted, as in training)."""
        if len(self) == 0:
            return float("nan")
        w = None if weight is None else _as_tensor(weight, torch.float32)
        return float(F.cross_entropy(torch.from_numpy(self.logits).float(), torch.from_numpy(self.labels),
                                     weight=w, label_smoothing=label_smoothing))

    @property
    def loss(self) -> float:
        """Mean (unweighted) cross-entropy over the deduplicated set."""
        return self.cross_entropy()

    def metrics(self) -> dict[str, Any]:
        """``compute_metrics`` of these predictions with their cross-entropy as the loss."""
        return compute_metrics(self.probs, self.labels, loss=self.loss)


def _dedupe_sorted(logits: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> Predictions:
    """One entry per row (the first seen; padding repeats identical samples), ascending rows."""
    _, first = np.unique(rows, return_index=True)  # np.unique sorts, so `first` is in row order
    logits = logits[first].astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return Predictions(probs=probs, logits=logits, labels=labels[first].astype(np.int64),
                       rows=rows[first].astype(np.int64))


def flip_tta_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean softmax probabilities (float32) of ``model`` over the NCHW batch ``x`` and its
    horizontal and vertical flips: the flip TTA of fold evaluation and of ``jobs/predict.py``."""
    return torch.stack([model(v).float().softmax(1) for v in (x, x.flip(3), x.flip(2))]).mean(0)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None,
            autocast: contextlib.AbstractContextManager | None = None,
            distributed: bool = False, tta: bool = False) -> Predictions:
    """Run ``model`` in eval mode over ``batches`` (objects with ``.images``, ``.labels``, ``.rows``).

    ``autocast`` (e.g. ``torch.autocast("cuda", torch.bfloat16)``) is entered around the forward
    passes; logits are kept in float32. With ``distributed`` (and torch.distributed initialised)
    every rank must call this: the results of all ranks are gathered (every rank gets them all),
    deduplicated by row and sorted by row. The model's train/eval mode is restored afterwards.
    With ``tta`` the probabilities are the mean over the image and its horizontal and vertical
    flips (as ``jobs/predict.py --tta``), and the logits kept are their log, whose softmax they are.
    """
    was_training = model.training
    model.eval()
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    logits, labels, rows = [], [], []
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            for batch in batches:
                x = batch.images.to(device, non_blocking=True)
                out = flip_tta_probs(model, x).clamp_min(1e-12).log() if tta else model(x).float()
                logits.append(out.cpu().numpy())
                labels.append(batch.labels.cpu().numpy())
                rows.append(batch.rows.cpu().numpy())
    finally:
        model.train(was_training)
    local = (np.concatenate(logits) if logits else np.zeros((0, NUM), np.float32),
             np.concatenate(labels) if labels else np.zeros(0, np.int64),
             np.concatenate(rows) if rows else np.zeros(0, np.int64))
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        local = tuple(np.concatenate([g[i] for g in gathered]) for i in range(3))
    return _dedupe_sorted(*local)


# --------------------------------------------------------------------------- files

def save_predictions(path: str | Path, preds: Predictions, index_df: pd.DataFrame) -> None:
    """Write ``preds`` with the image and lesion id of each row (from ``index_df``) as an .npz,
    atomically. Keys: probs, logits, labels, rows, image_ids, lesion_ids."""
    path = Path(path)
    index = index_df.set_index("row")
    unknown = np.setdiff1d(preds.rows, index.index.to_numpy())
    if len(unknown):
        raise ValueError(f"{path}: rows {unknown[:10].tolist()} are not in the index ({len(index)} rows)")
    meta = index.loc[preds.rows]
    arrays = dict(probs=preds.probs.astype(np.float32), logits=preds.logits.astype(np.float32),
                  labels=preds.labels.astype(np.int64), rows=preds.rows.astype(np.int64),
                  image_ids=meta["image_id"].to_numpy().astype(str),
                  lesion_ids=meta["lesion_id"].to_numpy().astype(str))
    atomic_write(path, lambda f: np.savez(f, **arrays))  # a file object: np.savez would append ".npz" to a name


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a file written by ``save_predictions`` (no pickles are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file {path} not found")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
            raise ValueError(f"{path}: not a prediction file (an .npz as training writes, e.g. "
                             "predictions_test.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zip/npz errors come in many types; the user needs the file name
        raise ValueError(f"{path}: unreadable prediction file ({e})") from None
