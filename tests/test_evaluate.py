"""Metrics against values computed by hand, predictions gathered over real gloo ranks (deduped,
sorted by row), and the prediction file round trip."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from skinhpc import CLASSES
from skinhpc.evaluate import (
    Predictions,
    compute_metrics,
    format_metrics,
    load_predictions,
    predict,
    save_predictions,
)


# --------------------------------------------------------------------------- metrics

@pytest.mark.timeout(30)
def test_perfect_predictor_scores_one_everywhere():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 5, 5, 4])
    probs = np.full((len(labels), 7), 0.01)
    probs[np.arange(len(labels)), labels] = 0.94
    m = compute_metrics(probs, labels, loss=0.06)
    for key in ("balanced_accuracy", "top1", "top2", "auroc_macro", "f1_macro"):
        assert m[key] == pytest.approx(1.0), key
    for key in ("auroc", "sensitivity", "specificity"):
        assert m[key] == {c: pytest.approx(1.0) for c in CLASSES}, key
    assert m["confusion_matrix"] == np.diag(np.bincount(labels, minlength=7)).tolist()
    assert m["loss"] == pytest.approx(0.06) and m["n"] == 10


@pytest.mark.timeout(30)
def test_always_nv_has_high_top1_but_chance_balanced_accuracy():
    labels = np.array([5] * 7 + [4, 4, 1])  # 70% nv, like HAM10000
    probs = np.tile([0.05, 0.1, 0.05, 0.05, 0.15, 0.55, 0.05], (len(labels), 1))
    m = compute_metrics(probs, labels)
    assert m["top1"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)  # recall 1 (nv), 0 (mel), 0 (bcc)
    assert m["top2"] == pytest.approx(0.9)  # mel is second most probable
    assert m["sensitivity"] == {"akiec": None, "bcc": 0.0, "bkl": None, "df": None, "mel": 0.0, "nv": 1.0,
                                "vasc": None}
    assert m["specificity"]["nv"] == 0.0 and m["specificity"]["mel"] == 1.0 and m["specificity"]["akiec"] == 1.0
    # Constant scores rank nothing: AUC 0.5 for the present classes, undefined for the absent ones.
    assert m["auroc"] == {"akiec": None, "bcc": 0.5, "bkl": None, "df": None, "mel": 0.5, "nv": 0.5, "vasc": None}
    assert m["auroc_macro"] == pytest.approx(0.5)
    assert m["loss"] is None


# Six samples of three classes (akiec, bcc, bkl); predictions 0, 1, 1, 2, 2, nv.
SMALL_LABELS = np.array([0, 0, 1, 1, 2, 2])
SMALL_PROBS = np.array([
    [0.60, 0.30, 0.05, 0.01, 0.01, 0.02, 0.01],  # akiec: right
    [0.30, 0.50, 0.10, 0.02, 0.02, 0.05, 0.01],  # akiec: says bcc, akiec second (top-2 hit)
    [0.10, 0.70, 0.10, 0.02, 0.02, 0.05, 0.01],  # bcc: right
    [0.05, 0.10, 0.50, 0.02, 0.02, 0.30, 0.01],  # bcc: says bkl, then nv (top-2 miss)
    [0.05, 0.10, 0.70, 0.02, 0.02, 0.10, 0.01],  # bkl: right
    [0.05, 0.05, 0.30, 0.02, 0.02, 0.55, 0.01],  # bkl: says nv, bkl second (top-2 hit)
])


@pytest.mark.timeout(30)
def test_three_present_classes_match_hand_computed_values():
    m = compute_metrics(SMALL_PROBS, SMALL_LABELS)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)  # absent classes left out
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top2"] == pytest.approx(5 / 6)
    # One-vs-rest AUC = fraction of (positive, negative) pairs ranked right, ties count 1/2.
    # akiec: positives .6 .3 above every negative (.1 .05 .05 .05) -> 8/8.
    # bcc: positives .7 (beats 4) and .1 (vs .3 .5 .1 .05: 0 + 0 + 1/2 + 1) -> 5.5/8.
    # bkl: positives .7 (beats 4) and .3 (vs .05 .1 .1 .5: 3) -> 7/8.
    assert m["auroc"] == {"akiec": pytest.approx(1.0), "bcc": pytest.approx(5.5 / 8), "bkl": pytest.approx(7 / 8),
                          "df": None, "mel": None, "nv": None, "vasc": None}
    assert m["auroc_macro"] == pytest.approx((1 + 5.5 / 8 + 7 / 8) / 3)
    assert m["sensitivity"] == {"akiec": 0.5, "bcc": 0.5, "bkl": 0.5, "df": None, "mel": None, "nv": None,
                                "vasc": None}
    # Specificity = true negatives / negatives: bcc is wrongly predicted once among the 4 non-bcc
    # samples, bkl once, nv once among 6; the others never.
    assert m["specificity"] == {"akiec": 1.0, "bcc": pytest.approx(3 / 4), "bkl": pytest.approx(3 / 4),
                                "df": 1.0, "mel": 1.0, "nv": pytest.approx(5 / 6), "vasc": 1.0}
    # F1 per class seen or predicted: akiec 2/3 (P 1, R 1/2), bcc 1/2, bkl 1/2, nv 0.
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 0) / 4)
    assert m["confusion_matrix"][:3] == [[1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1, 0]]
    assert m["n"] == 6


@pytest.mark.timeout(30)
def test_metrics_accept_tensors_and_are_strict_json():
    m = compute_metrics(torch.tensor(SMALL_PROBS, dtype=torch.float32), torch.tensor(SMALL_LABELS), loss=1.25)
    assert m == json.loads(json.dumps(m, allow_nan=False))
    assert m["balanced_accuracy"] == pytest.approx(0.5)


@pytest.mark.timeout(30)
def test_format_metrics_puts_balanced_accuracy_first():
    line = format_metrics(compute_metrics(SMALL_PROBS, SMALL_LABELS, loss=0.123456))
    assert line.startswith("bal_acc 0.500 top1 0.500 top2 0.833 auc 0.854")
    assert "loss 0.1235" in line and line.endswith("n 6") and "\n" not in line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("probs, labels, message", [
    (np.ones((3, 5)) / 5, np.zeros(3, int), "shape"),
    (np.ones((3, 7)) / 7, np.zeros(2, int), "labels must have shape"),
    (np.ones((3, 7)) / 7, np.array([0, 7, 1]), "0..6"),
    (np.ones((0, 7)), np.zeros(0, int), "no samples"),
])
def test_bad_metric_inputs_are_rejected(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(probs, labels)


# --------------------------------------------------------------------------- predict

@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Dropout(0.5), nn.Linear(16, 7))


def _dataset(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 7, (n,), generator=g)


def _batches(images: torch.Tensor, labels: torch.Tensor, rows: list[int], size: int) -> list[Batch]:
    idx = torch.tensor(rows)
    return [Batch(images[idx[i:i + size]], labels[idx[i:i + size]], idx[i:i + size]) for i in range(0, len(idx), size)]


@pytest.mark.timeout(30)
def test_predict_dedupes_padded_rows_and_sorts_by_row():
    images, labels = _dataset(10)
    model = _tiny_model()
    model.train()
    # Shuffled order, padded with repeats of rows 7 and 2 (as a distributed sampler pads).
    preds = predict(model, _batches(images, labels, [7, 2, 9, 0, 5, 1, 8, 3, 6, 4, 7, 2], size=5))
    assert model.training  # mode restored
    with torch.no_grad():
        expected = model.eval()(images)
    assert preds.rows.tolist() == list(range(10))
    assert preds.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(preds.logits, expected.numpy(), rtol=1e-5, atol=1e-6)  # eval mode: dropout off
    np.testing.assert_allclose(preds.probs, torch.softmax(expected, 1).numpy(), rtol=1e-5, atol=1e-6)
    assert preds.loss == pytest.approx(float(F.cross_entropy(expected, labels)))
    assert preds.metrics()["n"] == 10 and preds.metrics()["loss"] == pytest.approx(preds.loss)


@pytest.mark.timeout(30)
def test_flip_tta_averages_the_probabilities_of_the_image_and_its_flips():
    images, labels = _dataset(6)
    model = _tiny_model().eval()
    preds = predict(model, _batches(images, labels, list(range(6)), size=4), tta=True)
    with torch.no_grad():
        views = (images, images.flip(3), images.flip(2))
        expected = sum(torch.softmax(model(v), 1) for v in views) / 3
    np.testing.assert_allclose(preds.probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(preds.logits), 1).numpy(), preds.probs, atol=1e-6)
    assert preds.loss == pytest.approx(float(F.nll_loss(expected.log(), labels)), rel=1e-5)


@pytest.mark.timeout(30)
def test_predict_applies_the_autocast_context():
    images, labels = _dataset(4)
    preds = predict(_tiny_model(), _batches(images, labels, [0, 1, 2, 3], size=4),
                    autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    exact = predict(_tiny_model(), _batches(images, labels, [0, 1, 2, 3], size=4))
    assert preds.logits.dtype == np.float32
    assert not np.array_equal(preds.logits, exact.logits)  # bf16 rounding shows
    np.testing.assert_allclose(preds.logits, exact.logits, atol=0.05)


def _rank_predict(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        images, labels = _dataset(7)
        # DistributedSampler-style shards of 7 rows over 2 ranks: 4 each, row 3 repeated as padding.
        shard = [[3, 0, 6, 4], [1, 5, 2, 3]][rank]
        preds = predict(_tiny_model(), _batches(images, labels, shard, size=3), distributed=True)
        torch.save({"rows": preds.rows, "logits": preds.logits, "labels": preds.labels}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch: 20-30 s
@pytest.mark.timeout(120)
def test_predict_gathers_all_ranks_over_gloo(tmp_path):
    out = str(tmp_path / "preds")
    mp.start_processes(_rank_predict, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True,
                       start_method="spawn")
    images, labels = _dataset(7)
    with torch.no_grad():
        expected = _tiny_model().eval()(images).numpy()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["rows"].tolist() == list(range(7))  # every rank holds the whole deduped set
        assert got["labels"].tolist() == labels.tolist()
        np.testing.assert_allclose(got["logits"], expected, rtol=1e-5, atol=1e-6)  # batch sizes differ


@pytest.mark.timeout(30)
def test_predict_on_no_batches_gives_empty_predictions():
    preds = predict(_tiny_model(), [])
    assert preds.probs.shape == (0, 7) and len(preds) == 0 and math.isnan(preds.loss)


# --------------------------------------------------------------------------- files

def _index(n: int) -> pd.DataFrame:
    return pd.DataFrame({"row": np.arange(n), "image_id": [f"ISIC_{i:07d}" for i in range(n)],
                         "lesion_id": [f"HAM_{i // 2:07d}" for i in range(n)], "dx": "nv", "label": 5})


def _predictions(rows: list[int]) -> Predictions:
    logits = np.random.default_rng(0).normal(size=(len(rows), 7)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    return Predictions(probs=probs, logits=logits, labels=np.array(rows, np.int64) % 7,
                       rows=np.array(rows, np.int64))


@pytest.mark.timeout(30)
def test_prediction_file_round_trip_with_ids_from_the_index(tmp_path):
    preds = _predictions([1, 4, 5, 8])
    path = tmp_path / "fold0" / "predictions_val.npz"
    save_predictions(path, preds, _index(10))
    assert [p.name for p in path.parent.iterdir()] == ["predictions_val.npz"]  # no temp file left
    arrays = load_predictions(path)
    assert set(arrays) == {"probs", "logits", "labels", "rows", "image_ids", "lesion_ids"}
    for key in ("probs", "logits", "labels", "rows"):
        np.testing.assert_array_equal(arrays[key], getattr(preds, key))
    assert arrays["image_ids"].tolist() == ["ISIC_0000001", "ISIC_0000004", "ISIC_0000005", "ISIC_0000008"]
    assert arrays["lesion_ids"].tolist() == ["HAM_0000000", "HAM_0000002", "HAM_0000002", "HAM_0000004"]


@pytest.mark.timeout(30)
def test_prediction_file_is_read_by_the_ensemble(tmp_path):
    from skinhpc.ensemble import read_predictions
    preds = _predictions([0, 2, 3])
    save_predictions(tmp_path / "p.npz", preds, _index(5))
    read = read_predictions(tmp_path / "p.npz")
    np.testing.assert_allclose(read.probs, preds.probs, rtol=1e-6)
    assert read.image_ids.tolist() == ["ISIC_0000000", "ISIC_0000002", "ISIC_0000003"]


@pytest.mark.timeout(30)
def test_rows_missing_from_the_index_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"rows \[12\] are not in the index"):
        save_predictions(tmp_path / "p.npz", _predictions([1, 12]), _index(10))
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(30)
def test_missing_prediction_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="predictions_test.npz not found"):
        load_predictions(tmp_path / "predictions_test.npz")
