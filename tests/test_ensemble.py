"""The ensemble stage on hand-made run directories whose right answers are known."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skinhpc import CLASSES, REPO_DIR
from skinhpc.config import load_config, save_config
from skinhpc.ensemble import (SCALAR_METRICS, EnsembleError, aggregate_folds, bootstrap_ci, fit_weights,
                              headline_metrics_weighted, mean_probs, metrics_of, paired_difference,
                              resamples_lacking_a_class, run_ensemble)

NV = CLASSES.index("nv")
K = len(CLASSES)


# --------------------------------------------------------------------------- fake runs

def onehot_probs(pred: list[int] | np.ndarray, sure: float = 1.0) -> np.ndarray:
    """Probabilities putting ``sure`` on the predicted class and the rest spread evenly."""
    pred = np.asarray(pred)
    probs = np.full((len(pred), K), (1.0 - sure) / (K - 1))
    probs[np.arange(len(pred)), pred] = sure
    return probs


def noisy_probs(labels: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    """Softmax of ``signal`` on the true class plus unit Gaussian noise: a model of some quality."""
    z = rng.normal(size=(len(labels), K))
    z[np.arange(len(labels)), labels] += signal
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_npz(path: Path, probs: np.ndarray, labels: np.ndarray, rows: np.ndarray, lesions: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, probs=probs.astype(np.float32), logits=np.log(np.clip(probs, 1e-7, 1)).astype(np.float32),
             labels=labels.astype(np.int64), rows=rows.astype(np.int64),
             image_ids=np.array([f"ISIC_{r:07d}" for r in rows]), lesion_ids=lesions.astype(str))


class FakeRun:
    """A run directory like train.py leaves it: N images (two per lesion), a test set and K folds."""

    def __init__(self, root: Path, backbones: tuple[str, ...] = ("resnet18", "vgg16"), folds: int = 3,
                 n_lesions: int = 120, seed: int = 0) -> None:
        self.root, self.backbones, self.folds = root, backbones, folds
        rng = np.random.default_rng(seed)
        lesion_labels = rng.choice(K, size=n_lesions, p=[.04, .05, .11, .02, .11, .62, .05])
        lesion_labels[:K] = np.arange(K)  # every class present
        self.labels = np.repeat(lesion_labels, 2)
        self.lesions = np.repeat(np.array([f"HAM_{i:07d}" for i in range(n_lesions)]), 2)
        self.rows = np.arange(len(self.labels))
        lesion_part = rng.permutation(np.arange(n_lesions) % (folds + 1))  # part `folds` = test
        part = np.repeat(lesion_part, 2)
        self.test_rows = self.rows[part == folds]
        self.val_rows = [self.rows[part == k] for k in range(folds)]
        cfg = load_config([f"run_dir={root}", f"backbones=[{','.join(backbones)}]", f"split.folds={folds}"])
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, root / "config.yaml")
        (root / "split.json").write_text(json.dumps({"seed": 0, "test": [], "folds": [
            {"train": [], "val": []} for _ in range(folds)]}))

    def write_fold(self, backbone: str, fold: int, val_probs: np.ndarray, test_probs: np.ndarray,
                   status: str = "done", epochs: int = 3, planned: int | None = None,
                   stopped: str | None = None, select_metric: str | None = None, **status_extra: Any) -> Path:
        d = self.root / backbone / f"fold{fold}"
        v, t = self.val_rows[fold], self.test_rows
        write_npz(d / "predictions_val.npz", val_probs, self.labels[v], v, self.lesions[v])
        write_npz(d / "predictions_test.npz", test_probs, self.labels[t], t, self.lesions[t])
        (d / "log.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "lr": 1e-3, "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1),
             "val_balanced_accuracy": 0.3 + 0.1 * e, "val_top1": 0.5, "val_top2": 0.7}) + "\n" for e in range(epochs)))
        (d / "metrics.json").write_text(json.dumps({"status": status, "backbone": backbone, "fold": fold,
                                                    "best_epoch": epochs - 1, "epochs_trained": epochs,
                                                    "epochs": planned or epochs, "stopped": stopped,
                                                    **({"select_metric": select_metric} if select_metric else {}),
                                                    **status_extra}))
        return d

    def fill(self, signals: dict[str, float], seed: int = 1, skip: set[tuple[str, int]] = frozenset()) -> None:
        """Every (backbone, fold) not in ``skip`` with noisy predictions of the given signal strength."""
        rng = np.random.default_rng(seed)
        for b in self.backbones:
            for k in range(self.folds):
                val = noisy_probs(self.labels[self.val_rows[k]], signals[b], rng)
                test = noisy_probs(self.labels[self.test_rows], signals[b], rng)
                if (b, k) not in skip:
                    self.write_fold(b, k, val, test)


# --------------------------------------------------------------------------- metrics with known values

@pytest.mark.timeout(60)
def test_metrics_of_perfect_always_nv_uniform_and_hand_computed_predictions():
    labels = np.repeat(np.arange(K), 2)  # 14 images, two per class
    perfect = metrics_of(onehot_probs(labels), labels)
    assert perfect["balanced_accuracy"] == pytest.approx(1) and perfect["top1"] == pytest.approx(1)
    assert perfect["auroc_macro"] == pytest.approx(1) and perfect["f1_macro"] == pytest.approx(1)
    assert perfect["loss"] == pytest.approx(0, abs=1e-6)

    nv_labels = np.array([NV] * 6 + [0, 1, 2, 3])
    always_nv = metrics_of(onehot_probs([NV] * 10), nv_labels)
    assert always_nv["top1"] == pytest.approx(0.6)
    # recall 1 on nv, 0 on the four other classes present (absent classes do not count)
    assert always_nv["balanced_accuracy"] == pytest.approx(1 / 5)
    assert always_nv["sensitivity"]["nv"] == pytest.approx(1) and always_nv["specificity"]["nv"] == pytest.approx(0)

    uniform = metrics_of(np.full((14, K), 1 / K), labels)
    assert uniform["auroc_macro"] == pytest.approx(0.5)
    assert uniform["loss"] == pytest.approx(math.log(K))

    rng = np.random.default_rng(0)  # uniformly random guesses: chance level
    many = rng.integers(0, K, size=20000)
    random = metrics_of(rng.dirichlet(np.ones(K), size=len(many)), many)
    assert random["balanced_accuracy"] == pytest.approx(1 / K, abs=0.01)
    assert random["top2"] == pytest.approx(2 / K, abs=0.01)
    assert random["auroc_macro"] == pytest.approx(0.5, abs=0.01)

    # Hand case: one akiec called bcc and one mel called nv, the true class second each time.
    pred = labels.copy()
    pred[0], pred[8] = 1, NV
    probs = onehot_probs(pred, sure=0.7)
    probs[0, 0], probs[8, 4] = 0.2, 0.2
    probs /= probs.sum(axis=1, keepdims=True)
    m = metrics_of(probs, labels)
    assert m["top1"] == pytest.approx(12 / 14)
    assert m["top2"] == pytest.approx(1)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 5) / 7)
    assert m["sensitivity"]["akiec"] == pytest.approx(0.5) and m["sensitivity"]["bcc"] == pytest.approx(1)
    assert m["specificity"]["bcc"] == pytest.approx(11 / 12)  # one false positive among 12 negatives
    assert m["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(14), labels])), rel=1e-5)


@pytest.mark.timeout(60)
def test_fold_mean_and_std_match_hand_computation(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3)
    rng = np.random.default_rng(0)
    wrong_fraction = [0.0, 0.5, 0.25]
    expected_top1 = []
    for k, frac in enumerate(wrong_fraction):
        y = run.labels[run.val_rows[k]]
        pred = y.copy()
        n_wrong = int(round(frac * len(y)))
        pred[:n_wrong] = (y[:n_wrong] + 1) % K
        expected_top1.append(float(np.mean(pred == y)))
        run.write_fold("resnet18", k, onehot_probs(pred, 0.9), noisy_probs(run.labels[run.test_rows], 2, rng))
    results = run_ensemble(run.root, n_boot=0, plots=False)
    val = results["cv"]["resnet18"]["val"]
    assert val["n_folds"] == 3
    assert val["mean"]["top1"] == pytest.approx(statistics.mean(expected_top1))
    assert val["std"]["top1"] == pytest.approx(statistics.stdev(expected_top1))
    per_fold = [results["per_fold"]["resnet18"][f"fold{k}"]["val"]["balanced_accuracy"] for k in range(3)]
    assert val["mean"]["balanced_accuracy"] == pytest.approx(statistics.mean(per_fold))
    assert val["std"]["balanced_accuracy"] == pytest.approx(statistics.stdev(per_fold))
    # Out-of-fold metrics cover every train+val image once.
    assert results["oof"]["n"]["resnet18"] == sum(len(v) for v in run.val_rows)
    assert results["oof"]["metrics"]["resnet18"]["top1"] == pytest.approx(
        sum(t * len(v) for t, v in zip(expected_top1, run.val_rows)) / sum(len(v) for v in run.val_rows))


@pytest.mark.timeout(30)
def test_aggregate_of_one_fold_has_no_std():
    agg = aggregate_folds([{"top1": 0.5, "sensitivity": {"nv": 1.0}}])
    assert agg["mean"]["top1"] == 0.5 and agg["std"]["top1"] is None
    assert agg["mean"]["sensitivity"]["nv"] == 1.0 and agg["mean"]["sensitivity"]["mel"] is None


# --------------------------------------------------------------------------- ensembles

@pytest.mark.timeout(60)
def test_ensemble_of_identical_models_equals_each_model(tmp_path):
    run = FakeRun(tmp_path / "run", folds=2)
    rng = np.random.default_rng(3)
    test = noisy_probs(run.labels[run.test_rows], 1.5, rng)
    for b in run.backbones:
        for k in range(run.folds):
            run.write_fold(b, k, noisy_probs(run.labels[run.val_rows[k]], 1.5, rng), test)
    results = run_ensemble(run.root, n_boot=0, plots=False)
    single = results["test"]["resnet18/fold0"]
    for name in ("resnet18/ensemble", "vgg16/ensemble", "ensemble_mean", "ensemble_weighted"):
        for key in ("balanced_accuracy", "top1", "top2", "auroc_macro", "f1_macro", "loss"):
            assert results["test"][name][key] == pytest.approx(single[key], rel=1e-5), (name, key)
    assert np.allclose(mean_probs([test, test, test], np.array([0.2, 0.3, 0.5])), test)


@pytest.mark.timeout(60)
def test_weights_favour_the_better_backbone_and_never_read_test_labels(tmp_path):
    run = FakeRun(tmp_path / "run", folds=3)
    run.fill({"resnet18": 3.0, "vgg16": 0.3})
    before = run_ensemble(run.root, n_boot=0, plots=False)
    first = before["weights"]["backbones"]
    assert first["resnet18"] > first["vgg16"] and sum(first.values()) == pytest.approx(1)
    assert all(w >= 0 for w in first.values())
    # Shuffle the test labels of every fold the same way: the weights must not move.
    perm = np.random.default_rng(0).permutation(len(run.test_rows))
    for npz in run.root.glob("*/fold*/predictions_test.npz"):
        data = dict(np.load(npz))
        data["labels"] = data["labels"][perm]
        np.savez(npz, **data)
    second = run_ensemble(run.root, n_boot=0, plots=False)
    assert second["weights"]["backbones"] == first
    # the test metrics did see the shuffled labels
    assert second["test"]["ensemble_weighted"]["top1"] != before["test"]["ensemble_weighted"]["top1"]


@pytest.mark.timeout(30)
def test_fit_weights_is_on_the_simplex_and_picks_the_only_informative_model():
    labels = np.repeat(np.arange(K), 10)
    good, useless = onehot_probs(labels, 0.8), np.full((len(labels), K), 1 / K)
    w = fit_weights([useless, good], labels)
    assert w.sum() == pytest.approx(1) and (w >= 0).all() and w[1] > 0.99


# --------------------------------------------------------------------------- bootstrap

@pytest.mark.timeout(120)
def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_lesions():
    rng = np.random.default_rng(0)
    widths = []
    for n_lesions in (40, 400):
        labels = np.repeat(np.arange(n_lesions) % K, 2)
        lesions = np.repeat(np.arange(n_lesions).astype(str), 2)
        probs = noisy_probs(labels, 1.0, rng)
        point = metrics_of(probs, labels)
        boot = bootstrap_ci(probs, labels, lesions, n_boot=200, seed=0)
        assert boot["n_lesions"] == n_lesions and boot["unit"] == "lesion"
        for key in ("balanced_accuracy", "top1", "auroc_macro", "loss"):
            lo, hi = boot["ci"][key]
            assert lo <= point[key] <= hi, (n_lesions, key)
        widths.append(boot["ci"]["top1"][1] - boot["ci"]["top1"][0])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(10) in theory


@pytest.mark.timeout(30)
def test_bootstrap_draws_whole_lesions():
    lesions = np.array(["a", "a", "a", "b", "c", "c"])
    labels = np.arange(6) % K
    probs = onehot_probs(labels)
    seen = []

    def record(p: np.ndarray, y: np.ndarray) -> dict:
        seen.append(y.copy())
        return {"top1": 1.0}

    bootstrap_ci(probs, labels, lesions, n_boot=50, seed=1, metric_fn=record)
    for y in seen:
        counts = {lab: int(np.sum(y == lab)) for lab in range(6)}
        assert counts[0] == counts[1] == counts[2] and counts[4] == counts[5]  # lesions a and c stay whole


@pytest.mark.timeout(30)
def test_resamples_lacking_a_class_are_counted_on_the_bootstraps_own_draws():
    rng = np.random.default_rng(3)
    probs, labels, lesions = awkward_test_set(rng)  # class 3 on a single lesion; class 6 absent
    seen: list[np.ndarray] = []

    def record(p: np.ndarray, y: np.ndarray) -> dict:
        seen.append(y.copy())
        return {}

    bootstrap_ci(probs, labels, lesions, n_boot=200, seed=4, metric_fn=record)
    by_hand = sum(not set(labels) <= set(y) for y in seen)  # class 6 is absent from the test set: not counted
    assert 40 < by_hand < 110  # the lone lesion is left out of ~(1 - 1/60)^60 = 36% of resamples
    assert resamples_lacking_a_class(labels, lesions, n_boot=200, seed=4) == by_hand
    every_class_often = np.repeat(np.arange(K), 30)
    assert resamples_lacking_a_class(every_class_often, np.arange(len(every_class_often)).astype(str), n_boot=200) == 0


def awkward_test_set(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities rounded to 0.05 (many tied scores), lesions of 1-4 images, one class on a
    single lesion (absent from many resamples) and one class never predicted."""
    n_lesions = 60
    sizes = rng.integers(1, 5, size=n_lesions)
    lesion_labels = rng.choice([0, 1, 2, 4, 5], size=n_lesions)
    lesion_labels[0] = 3  # the only lesion of class 3
    labels = np.repeat(lesion_labels, sizes)
    lesions = np.repeat(np.array([f"L{i}" for i in range(n_lesions)]), sizes)
    probs = np.round(noisy_probs(labels, 1.0, rng) / 0.05) * 0.05
    probs[:, 6] = 0.0  # class 6 never predicted
    probs = np.clip(probs, 0.0, None) + 1e-3
    return probs / probs.sum(1, keepdims=True), labels, lesions


@pytest.mark.timeout(60)
def test_weighted_headline_metrics_equal_torchmetrics_on_the_repeated_images():
    rng = np.random.default_rng(5)
    probs, labels, _ = awkward_test_set(rng)
    weights = rng.integers(0, 4, size=(20, len(labels)))  # 0: left out; k: counted k times
    fast = headline_metrics_weighted(probs, labels, weights)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(len(labels)), w)
        slow = metrics_of(probs[idx], labels[idx])
        for key in SCALAR_METRICS:  # torchmetrics returns float32: equal to its rounding
            assert fast[key][b] == pytest.approx(slow[key], abs=1e-6), (b, key)


@pytest.mark.timeout(60)
def test_bootstrap_intervals_equal_those_of_torchmetrics_on_every_resample():
    probs, labels, lesions = awkward_test_set(np.random.default_rng(6))
    fast = bootstrap_ci(probs, labels, lesions, n_boot=100, seed=2)
    slow = bootstrap_ci(probs, labels, lesions, n_boot=100, seed=2, metric_fn=metrics_of)
    for key in SCALAR_METRICS:
        assert fast["ci"][key] == pytest.approx(slow["ci"][key], abs=1e-6), key


@pytest.mark.timeout(60)
def test_paired_difference_equals_torchmetrics_differences_on_the_same_resamples():
    rng = np.random.default_rng(7)
    probs_a, labels, lesions = awkward_test_set(rng)
    probs_b = np.roll(probs_a, 1, axis=1) * 0.3 + probs_a * 0.7  # a weaker model of the same images
    fast = paired_difference(probs_a, probs_b, labels, lesions, n_boot=100, seed=3)
    # the slow way: the same lesion draws, torchmetrics on each resample's repeated images
    uniq, group = np.unique(lesions, return_inverse=True)
    draws_rng = np.random.default_rng(3)
    members = [np.flatnonzero(group == g) for g in range(len(uniq))]
    diffs: dict[str, list[float]] = {k: [] for k in SCALAR_METRICS}
    for _ in range(100):
        idx = np.concatenate([members[g] for g in draws_rng.integers(0, len(uniq), size=len(uniq))])
        ma, mb = metrics_of(probs_a[idx], labels[idx]), metrics_of(probs_b[idx], labels[idx])
        for k in SCALAR_METRICS:
            if ma.get(k) is not None and mb.get(k) is not None:
                diffs[k].append(ma[k] - mb[k])
    point_a, point_b = metrics_of(probs_a, labels), metrics_of(probs_b, labels)
    for k in SCALAR_METRICS:
        lo, hi = np.quantile(diffs[k], [0.025, 0.975])
        assert fast["ci"][k] == pytest.approx([lo, hi], abs=1e-6), k
        assert fast["diff"][k] == pytest.approx(point_a[k] - point_b[k], abs=1e-9), k
        better = np.mean(np.array(diffs[k]) < 0) if k == "loss" else np.mean(np.array(diffs[k]) > 0)
        assert fast["frac_a_better"][k] == pytest.approx(better), k


@pytest.mark.timeout(60)
def test_paired_difference_is_zero_for_one_model_and_above_zero_for_a_better_one():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(300) % K, 2)
    lesions = np.repeat(np.arange(300).astype(str), 2)
    weak = noisy_probs(labels, 0.8, rng)
    same = paired_difference(weak, weak, labels, lesions, n_boot=200)
    assert all(same["diff"][k] == 0 and same["ci"][k] == [0.0, 0.0] for k in SCALAR_METRICS)
    strong = noisy_probs(labels, 3.0, rng)
    d = paired_difference(strong, weak, labels, lesions, n_boot=200)
    assert d["ci"]["balanced_accuracy"][0] > 0 and d["ci"]["auroc_macro"][0] > 0 and d["ci"]["loss"][1] < 0
    assert d["frac_a_better"]["balanced_accuracy"] == 1.0
    # Paired is narrower than the two models' own intervals side by side would suggest.
    own = [bootstrap_ci(p, labels, lesions, n_boot=200)["ci"]["top1"] for p in (strong, weak)]
    assert d["ci"]["top1"][1] - d["ci"]["top1"][0] < (own[0][1] - own[0][0]) + (own[1][1] - own[1][0])


# --------------------------------------------------------------------------- run directory handling

@pytest.mark.timeout(120)
def test_missing_folds_are_reported_and_the_rest_aggregated(tmp_path):
    run = FakeRun(tmp_path / "run", folds=3)
    run.fill({"resnet18": 2.0, "vgg16": 1.0}, skip={("vgg16", 2)})
    running = run.write_fold("resnet18", 1, *(onehot_probs(run.labels[r]) for r in (run.val_rows[1], run.test_rows)),
                             status="running")
    assert running.exists()
    proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "ensemble.py"), str(run.root), "--n-boot", "20"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "missing: resnet18 fold 1" in proc.stdout and "missing: vgg16 fold 2" in proc.stdout
    results = json.loads((run.root / "ensemble" / "metrics.json").read_text())
    missing = {(m["backbone"], m["fold"]): m["reason"] for m in results["missing"]}
    assert set(missing) == {("resnet18", 1), ("vgg16", 2)}
    assert "running" in missing[("resnet18", 1)]
    assert results["cv"]["resnet18"]["val"]["n_folds"] == 2 and results["cv"]["vgg16"]["folds"] == [0, 1]
    assert results["oof"]["n"]["vgg16"] == len(run.val_rows[0]) + len(run.val_rows[1])
    assert "Missing folds" in (run.root / "ensemble" / "report.md").read_text()
    # bootstrap intervals exist for every ensemble and the baseline
    assert set(results["bootstrap"]) >= {"majority_nv", "resnet18/ensemble", "ensemble_mean", "ensemble_weighted"}


@pytest.mark.timeout(60)
def test_folds_trained_by_hand_with_other_settings_than_the_first_are_left_out_without_a_run_config(tmp_path):
    from skinhpc.ensemble import scan_run
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3)
    run.fill({"resnet18": 2.0})
    same = [f"run_dir={run.root}", "backbones=[resnet18]", "split.folds=3"]
    for fold, extra in ((0, []), (1, ["model.image_size=32"]), (2, [])):  # jobs/train.py by hand, no launcher
        save_config(load_config([*same, f"fold={fold}", *extra]), run.root / "resnet18" / f"fold{fold}" / "config.yaml")
    (run.root / "config.yaml").unlink()  # what the launcher writes
    scan = scan_run(run.root)
    assert [f.fold for f in scan.finished] == [0, 2]
    (missing,) = scan.missing
    assert missing["fold"] == 1 and "than resnet18 fold 0, its first finished fold" in missing["reason"]
    assert "model.image_size: 64 -> 32" in missing["reason"]


@pytest.mark.timeout(60)
def test_a_run_made_by_hand_keeps_every_backbone_trained_from_its_own_weights_file(tmp_path):
    from skinhpc.ensemble import scan_run
    from skinhpc.config import for_backbone
    run = FakeRun(tmp_path / "run", backbones=("resnet18", "vgg16"), folds=2)
    run.fill({"resnet18": 2.0, "vgg16": 1.0})
    (run.root / "config.yaml").unlink()
    for backbone in ("resnet18", "vgg16"):
        (tmp_path / f"{backbone}.pth").write_bytes(backbone.encode())  # two different files
        for fold in (0, 1):  # as jobs/train.py saves it: the weights path filled in for its backbone
            cfg = for_backbone(load_config([f"run_dir={run.root}", "split.folds=2", f"fold={fold}",
                                            f"model.backbone={backbone}", f"model.pretrained={tmp_path}/{{backbone}}.pth"]))
            save_config(cfg, run.root / backbone / f"fold{fold}" / "config.yaml")
    scan = scan_run(run.root)
    assert len(scan.finished) == 4 and not scan.missing


@pytest.mark.timeout(60)
def test_a_missing_fold_whose_local_job_failed_before_it_began_names_the_job_and_its_log(tmp_path):
    from skinhpc.ensemble import scan_run
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3)
    run.fill({"resnet18": 2.0}, skip={("resnet18", 1), ("resnet18", 2)})
    jobs = {"kind": "local", "tasks": {  # what a local launch records (launch._record_local)
        "resnet18/fold1": {"local_job": "4711", "state": "failed", "log": "/x/4711.out", "err": "/x/4711.err"},
        "resnet18/fold2": {"job_id": "88_2", "log": "/x/88_2.out"}}}
    (run.root / "launch").mkdir()
    (run.root / "launch" / "jobs.json").write_text(json.dumps(jobs))
    reasons = {m["fold"]: m["reason"] for m in scan_run(run.root).missing}
    assert reasons[1] == "its local job 4711 failed before training began (see /x/4711.err)"
    assert reasons[2].startswith("not started (job 88_2; see `jobs/launch.py --status")
    (run.root / "launch" / "jobs.json").write_text("{not json")  # bookkeeping is help, never a failure
    assert {m["reason"] for m in scan_run(run.root).missing} == {"not started"}


@pytest.mark.timeout(60)
def test_a_fold_trained_with_another_config_than_the_runs_is_left_out_and_named(tmp_path):
    from skinhpc.ensemble import scan_run
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3)
    run.fill({"resnet18": 2.0})
    same = [f"run_dir={run.root}", "backbones=[resnet18]", "split.folds=3"]
    save_config(load_config([*same, "fold=0"]), run.root / "resnet18" / "fold0" / "config.yaml")
    save_config(load_config([*same, "fold=1", "train.lr=0.01"]),  # trained by hand with another lr
                run.root / "resnet18" / "fold1" / "config.yaml")
    scan = scan_run(run.root)
    assert [f.fold for f in scan.finished] == [0, 2]  # fold 2 has no config.yaml: an older fold, kept
    (missing,) = scan.missing
    assert missing["fold"] == 1 and "train.lr: 0.002 -> 0.01" in missing["reason"]
    save_config(load_config([*same, "fold=1", "model.pretrained=true"]),  # from other (hub) weights
                run.root / "resnet18" / "fold1" / "config.yaml")
    assert "model.pretrained: 'false' -> 'True'" in scan_run(run.root).missing[0]["reason"]


@pytest.mark.timeout(120)
def test_a_reference_model_is_aligned_by_image_and_compared_with_the_ensembles(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2)
    run.fill({"resnet18": 2.0})
    t = run.test_rows
    ref_probs = noisy_probs(run.labels[t], 0.5, np.random.default_rng(4))
    # Another run: other row numbers (another conversion) and another order; the image ids match.
    order = np.random.default_rng(5).permutation(len(t))
    ref = tmp_path / "ref" / "resnet18" / "fold0" / "predictions_test.npz"
    write_npz(ref, ref_probs[order], run.labels[t][order], t[order] + 1000, run.lesions[t][order])
    data = dict(np.load(ref))
    data["image_ids"] = np.array([f"ISIC_{r:07d}" for r in t[order]])
    np.savez(ref, **data)
    proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "ensemble.py"), str(run.root), "--n-boot", "50",
                           "--no-plots", "--reference", f"one_split={ref}"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "resnet18/ensemble minus reference/one_split: balanced_accuracy +" in proc.stdout
    results = json.loads((run.root / "ensemble" / "metrics.json").read_text())
    expected = metrics_of(ref_probs, run.labels[t])
    got = results["test"]["reference/one_split"]
    assert got["kind"] == "reference"
    assert got["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert got["auroc_macro"] == pytest.approx(expected["auroc_macro"])
    assert results["references"] == {"reference/one_split": str(ref)}
    versus = results["paired"]["reference/one_split"]["resnet18/ensemble"]
    assert versus["ci"]["balanced_accuracy"][0] > 0  # signal 2.0 against 0.5
    assert set(results["paired"]) == {results["best_single"], "reference/one_split"}
    report = (run.root / "ensemble" / "report.md").read_text()
    assert "Paired differences" in report and "resnet18/ensemble − reference/one_split" in report


@pytest.mark.timeout(60)
def test_a_reference_of_another_test_set_is_refused_with_its_file_named(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2)
    run.fill({"resnet18": 1.0})
    t = run.test_rows
    short = tmp_path / "short.npz"
    write_npz(short, onehot_probs(run.labels[t[1:]]), run.labels[t[1:]], t[1:], run.lesions[t[1:]])
    with pytest.raises(EnsembleError, match=r"short.npz: lacks 1 of the run's .* test images \(first: ISIC_"):
        run_ensemble(run.root, n_boot=0, plots=False, references={"x": short})
    relabelled = tmp_path / "relabelled.npz"
    labels = run.labels[t].copy()
    labels[3] = (labels[3] + 1) % K
    write_npz(relabelled, onehot_probs(labels), labels, t, run.lesions[t])
    with pytest.raises(EnsembleError, match=rf"relabelled.npz: image ISIC_{t[3]:07d} has label"):
        run_ensemble(run.root, n_boot=0, plots=False, references={"x": relabelled})
    proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "ensemble.py"), str(run.root), "--reference",
                           str(short)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and "expected NAME=FILE" in proc.stderr
    table = tmp_path / "reference.csv"  # e.g. predict's CSV instead of a training's .npz
    table.write_text("image,akiec\nx.jpg,0.1\n")
    with pytest.raises(EnsembleError, match=r"reference.csv: not a prediction file \(an .npz as training writes"):
        run_ensemble(run.root, n_boot=0, plots=False, references={"x": table})


@pytest.mark.timeout(60)
def test_no_finished_fold_is_a_clear_error(tmp_path):
    run = FakeRun(tmp_path / "run", folds=2)
    with pytest.raises(EnsembleError, match="no finished fold"):
        run_ensemble(run.root, n_boot=0, plots=False)
    proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "ensemble.py"), str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_corrupt_prediction_file_is_named_and_the_other_folds_still_reported(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2)
    run.fill({"resnet18": 1.0})
    bad = run.root / "resnet18" / "fold1" / "predictions_val.npz"
    bad.write_bytes(b"not a zip")
    results = run_ensemble(run.root, n_boot=0, plots=False)
    assert results["finished"] == [{"backbone": "resnet18", "fold": 0}]
    assert [m["fold"] for m in results["missing"]] == [1] and "fold1/predictions_val.npz" in results["missing"][0]["reason"]
    (run.root / "resnet18" / "fold0" / "predictions_test.npz").write_bytes(b"")
    with pytest.raises(EnsembleError, match="fold0/predictions_test.npz"):  # nothing left: the reasons are the error
        run_ensemble(run.root, n_boot=0, plots=False)


@pytest.mark.timeout(60)
def test_temperature_scaling_fit_out_of_fold_fixes_overconfidence(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2, n_lesions=300)
    rng = np.random.default_rng(5)
    test = noisy_probs(run.labels[run.test_rows], 1.0, rng) ** 3
    for k in range(2):  # logits three times too large: overconfident
        val = noisy_probs(run.labels[run.val_rows[k]], 1.0, rng) ** 3
        run.write_fold("resnet18", k, val / val.sum(1, keepdims=True), test / test.sum(1, keepdims=True))
    cal = run_ensemble(run.root, n_boot=0, plots=False)["calibration"]["resnet18/ensemble"]
    assert cal["temperature"]["resnet18"] == pytest.approx(3, rel=0.25)
    assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] < cal["nll_before"]
