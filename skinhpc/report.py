"""Tables and figures of a run's ensemble: ``markdown(results)`` and ``make_plots(...)``.

The numbers come from ``skinhpc.ensemble``; this module only formats and draws them. Balanced
accuracy leads every table: answering "nv" for every image already scores ~67% top-1 on HAM10000.
Figures are PNGs drawn with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from skinhpc import CLASSES
from skinhpc.config import atomic_write
from skinhpc.ensemble import TEMPERATURE_BOUNDS
from skinhpc.rundir import LOG_NAME, read_log

if TYPE_CHECKING:
    from skinhpc.ensemble import RunScan

HEADLINE = (("balanced_accuracy", "balanced acc. %"), ("top1", "top-1 %"), ("top2", "top-2 %"),
            ("auroc_macro", "AUC (macro)"), ("f1_macro", "F1 (macro) %"), ("loss", "loss"))
PERCENT = {"balanced_accuracy", "top1", "top2", "f1_macro", "sensitivity", "specificity"}
CROSS_BACKBONE = ("ensemble_mean", "ensemble_weighted")
FIGURE_PREFIXES = ("confusion_", "roc_", "reliability_", "curves_")
"""Every figure ``make_plots`` draws starts with one of these: the ensemble's swap of its folder
tells them from a user's own files."""


def cross_backbone_names(results: dict[str, Any]) -> tuple[str, ...]:
    """The cross-backbone ensembles worth showing: none with one backbone, whose fold ensemble they
    equal by construction (metrics.json still has them, for scripts that read them)."""
    return CROSS_BACKBONE if len(results["cv"]) > 1 else ()


def ensemble_names(results: dict[str, Any]) -> list[str]:
    """Every ensemble the report shows: each backbone's fold ensemble, then the cross-backbone ones."""
    return [f"{b}/ensemble" for b in results["cv"]] + list(cross_backbone_names(results))


def shown_test_entries(results: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, test metrics) of every entry worth a summary line: not the single fold models, and
    with one backbone not the cross-backbone copies of its fold ensemble. Reads metrics.json of
    older versions too (without "cv" every entry is shown)."""
    hidden = set(CROSS_BACKBONE) - set(cross_backbone_names(results)) if "cv" in results else set()
    for name, m in (results.get("test") or {}).items():
        if isinstance(m, dict) and m.get("kind") != "fold" and name not in hidden:
            yield name, m


def paired_comparisons(results: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(ensemble, other model, paired difference) of every comparison worth showing: shown
    ensembles only, and none whose predictions equal the other's (every difference exactly 0: a
    one-fold ensemble and its fold model, or weights that put everything on it)."""
    shown = set(ensemble_names(results))
    for other, versus in (results.get("paired") or {}).items():
        for name, d in versus.items():
            same = all(v is None or v == 0 for v in d["diff"].values())
            if name in shown and not same:
                yield name, other, d


# --------------------------------------------------------------------------- markdown

def _scale(key: str) -> tuple[float, int]:
    """Percent with 1 decimal for accuracies, 3 decimals for AUC and loss."""
    return (100.0, 1) if key in PERCENT else (1.0, 3)


def fmt(key: str, value: float | None, std: float | None = None, ci: list[float] | None = None) -> str:
    """A metric as text: percentages for accuracies, 3 decimals for AUC and loss; '—' when absent."""
    if value is None:
        return "—"
    scale, digits = _scale(key)
    text = f"{value * scale:.{digits}f}"
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    if ci is not None:
        text += f" [{ci[0] * scale:.{digits}f}–{ci[1] * scale:.{digits}f}]"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _test_row(label: str, results: dict[str, Any], name: str) -> list[str]:
    m = results["test"][name]
    ci = results.get("bootstrap", {}).get(name, {}).get("ci", {})
    return [label] + [fmt(k, m.get(k), ci=ci.get(k)) for k, _ in HEADLINE]


def _weights_text(results: dict[str, Any]) -> str:
    return ", ".join(f"{b} {w:.2f}" for b, w in results["weights"]["backbones"].items())


def _status_lines(results: dict[str, Any]) -> list[str]:
    exp = results["expected"]
    total = len(exp["backbones"]) * exp["folds"]
    lines = [f"Finished folds: {len(results['finished'])} of {total} "
             f"({', '.join(exp['backbones'])} x {exp['folds']} folds)."]
    if results["missing"]:
        lines.append("**Missing folds** (left out of every number below): " + "; ".join(
            f"{m['backbone']} fold {m['fold']} ({m['reason']})" for m in results["missing"]) + ".")
    short = [f"{b} {fold} after {m.get('epochs_trained')} of {m.get('epochs')} epochs"
             for b, folds in results["per_fold"].items() for fold, m in folds.items()
             if m.get("stopped") == "time_limit"]
    if short:
        lines.append("**Stopped by the time limit** (`train.stop_after_min`) before their last epoch: "
                     + "; ".join(short) + ".")
    return lines


def _test_section(results: dict[str, Any]) -> list[str]:
    test = results["test"]
    base = test["majority_nv"]
    lines = ["## Held-out test set", "",
             f"{results['n_test']} images of {results['n_test_lesions']} lesions. The majority-class baseline "
             f"answers \"{results['majority_class']}\" for every image: {fmt('top1', base['top1'])}% top-1 on this "
             f"test set (on the full HAM10000 it scores {results['majority_top1_full_ham10000'] * 100:.2f}% "
             f"top-1) but only {fmt('balanced_accuracy', base['balanced_accuracy'])}% balanced accuracy — "
             "which is why balanced accuracy leads. Fold models: mean ± std over folds (the sample standard "
             "deviation, n − 1); ensembles: value [bootstrap 95% CI over lesions].", ""]
    absent = [c for c, n in (results.get("test_classes") or {}).items() if n["images"] == 0]
    if absent:
        lines += [f"**No test image of class{'es' if len(absent) > 1 else ''} {', '.join(absent)}**: balanced accuracy and macro AUC average "
                  f"over the {len(CLASSES) - len(absent)} classes present, so they do not compare with a "
                  "test set that has all seven.", ""]
    boot = results.get("bootstrap", {}).get("majority_nv", {})
    if lacking := boot.get("resamples_lacking_a_class"):
        lines += [f"{lacking} of the {boot['n_boot']} lesion resamples hold no image of some class the test set "
                  "has (a class with few test lesions): their balanced accuracy and macro AUC average over the "
                  "classes they hold, as the numbers of a test set without that class would.", ""]
    header = ["model"] + [h for _, h in HEADLINE]
    rows = [_test_row(f"majority class (\"{results['majority_class']}\")", results, "majority_nv")]
    for b, agg in results["cv"].items():
        t = agg["test"]
        rows.append([f"{b}: fold models ({agg['test']['n_folds']})"]
                    + [fmt(k, t["mean"][k], t["std"][k]) for k, _ in HEADLINE])
        rows.append(_test_row(f"{b}: fold ensemble", results, f"{b}/ensemble"))
    if cross_backbone_names(results):
        rows.append(_test_row("all backbones: ensemble (mean)", results, "ensemble_mean"))
        rows.append(_test_row(f"all backbones: OOF-weighted ({_weights_text(results)})", results,
                              "ensemble_weighted"))
    for name, path in results.get("references", {}).items():
        rows.append(_test_row(f"{name} (`{path}`)", results, name))
    return lines + _table(header, rows) + [""]


def fmt_diff(key: str, d: dict[str, Any]) -> str:
    """A paired difference as '+1.2 [-0.4, +2.9]' (percentage points for accuracies)."""
    value, ci = d["diff"].get(key), d["ci"].get(key)
    if value is None or ci is None:
        return "—"
    scale, digits = _scale(key)
    return f"{value * scale:+.{digits}f} [{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]"


PAIRED = (("balanced_accuracy", "Δ balanced acc. (points)"), ("auroc_macro", "Δ AUC"), ("top1", "Δ top-1 (points)"),
          ("loss", "Δ loss"))


def _paired_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, other, d in paired_comparisons(results):
        label = f"best single model ({other})" if other == results["best_single"] else other
        rows.append([f"{name} − {label}"] + [fmt_diff(k, d) for k, _ in PAIRED]
                    + [f"{d['frac_a_better']['balanced_accuracy'] * 100:.0f}%"
                       if d["frac_a_better"].get("balanced_accuracy") is not None else "—"])
    if not rows:
        return []
    return (["## Is the ensemble better? Paired differences on the test set", "",
             "Ensemble minus another model on the same test images, with a 95% interval over the same "
             "lesion resamples for both (paired: the share of the test set's noise the two models have in "
             "common cancels). An interval above 0 (below 0 for the loss) means better beyond the "
             "resampling noise; the last column is the share of resamples on which the ensemble's balanced "
             "accuracy is higher.", ""]
            + _table(["comparison"] + [h for _, h in PAIRED] + ["resamples better"], rows) + [""])


def _selection_note(results: dict[str, Any]) -> list[str]:
    """Why these validation numbers lean optimistic: the same fold picked each model's epoch."""
    # Unknown (a fold from before select_metric was recorded, its config gone): the default. One
    # epoch trained: nothing to choose from.
    chosen = sorted({m.get("select_metric") or "balanced_accuracy" for folds in results["per_fold"].values()
                     for m in folds.values() if (m.get("epochs_trained") or 2) > 1} - {"last"})
    if not chosen:
        return []
    return [f"Each fold model kept the epoch with the best validation {' / '.join(c.replace('_', ' ') for c in chosen)} "
            "(`train.select_metric`) on this same validation fold, so the numbers of this section lean "
            "optimistic, and so, slightly, do the weights and temperatures fit on them; the test set above "
            "played no part in any choice. `train.select_metric=last` keeps the last epoch instead.", ""]


def _absent_val_note(results: dict[str, Any]) -> list[str]:
    absent = results.get("val_absent_classes") or {}
    if not absent:
        return []
    return ["**Validation folds without every class** (their balanced accuracy and macro AUC average over "
            "the classes present): " + "; ".join(f"{fold} has no {', '.join(cls)}" for fold, cls in absent.items())
            + ".", ""]


def _cv_section(results: dict[str, Any]) -> list[str]:
    whole = ("the whole train+val set (every image predicted once, by the fold model that did not train on it)"
             if not results["missing"] else
             "the validation folds of the finished fold models (each image predicted once, by the fold model "
             "that did not train on it; the missing folds' images are not covered)")
    lines = ["## Cross-validation (each fold's validation set)", "",
             f"Per backbone: mean ± std over folds, and out-of-fold (OOF) metrics over {whole}."
             + (" The ensembles' OOF rows cover the images every backbone predicted; the weighted ensemble's "
                "is scored on the images its weights were fit on, so it flatters it."
                if cross_backbone_names(results) else ""), ""]
    lines += _selection_note(results) + _absent_val_note(results)
    header = ["backbone"] + [h for _, h in HEADLINE]
    rows = []
    oof = results["oof"]["metrics"]
    for b, agg in results["cv"].items():
        v = agg["val"]
        rows.append([f"{b} ({v['n_folds']} fold{'s' if v['n_folds'] != 1 else ''})"] + [fmt(k, v["mean"][k], v["std"][k]) for k, _ in HEADLINE])
        rows.append([f"{b} OOF (n={results['oof']['n'][b]})"] + [fmt(k, oof[b].get(k)) for k, _ in HEADLINE])
    for name in cross_backbone_names(results):
        if name in oof:
            label = f"{name} OOF (n={results['oof']['n_common']})"
            rows.append([label] + [fmt(k, oof[name].get(k)) for k, _ in HEADLINE])
    return lines + _table(header, rows) + [""]


def _per_class_section(results: dict[str, Any]) -> list[str]:
    names = ensemble_names(results)
    counts = results.get("test_classes") or {}
    header = (["class"] + (["test images / lesions"] if counts else []) + [f"{n} sens. / spec. %" for n in names]
              + [f"{b} folds: sens. / spec. % (mean ± std)" for b in results["cv"]])
    rows = []
    for cls in CLASSES:
        row = [cls] + ([f"{counts[cls]['images']} / {counts[cls]['lesions']}"] if counts else [])
        for n in names:
            m = results["test"][n]
            sens, spec = m["sensitivity"].get(cls), m["specificity"].get(cls)
            row.append(f"{fmt('sensitivity', sens)} / {fmt('specificity', spec)}")
        for agg in results["cv"].values():
            mean, std = agg["test"]["mean"], agg["test"]["std"]
            row.append(f"{fmt('sensitivity', mean['sensitivity'][cls], std['sensitivity'][cls])} / "
                       f"{fmt('specificity', mean['specificity'][cls], std['specificity'][cls])}")
        rows.append(row)
    return (["## Per class on the test set", "",
             "Sensitivity (recall) and specificity of each class. A rare class's numbers rest on few lesions "
             "(second column): one lesion more or less moves them by many points.", ""]
            + _table(header, rows) + [""])


def _temp(t: float) -> str:
    """A temperature, marked when the fit stopped at its search interval's end (0.05 or 20)."""
    return f"{t:.3f}" + (" (bound)" if t <= TEMPERATURE_BOUNDS[0] * 1.001 or t >= TEMPERATURE_BOUNDS[1] * 0.999 else "")


def _temps(calibration: dict[str, Any]) -> str:
    temps = calibration["temperature"]
    if len(temps) == 1:
        return _temp(next(iter(temps.values())))
    return ", ".join(f"{b} {_temp(t)}" for b, t in temps.items())


def _calibration_section(results: dict[str, Any]) -> list[str]:
    calibration = results["calibration"]
    rows = [[name, _temps(c), fmt("ece", c["ece_before"]), fmt("ece", c["ece_after"]),
             fmt("loss", c["nll_before"]), fmt("loss", c["nll_after"])]
            for name in ensemble_names(results) if (c := calibration.get(name)) is not None]
    return (["## Calibration (temperature scaling)", "",
             "One temperature per backbone, fit on its out-of-fold logits and applied to each of its "
             "fold models before averaging; expected calibration error (15 bins, top label) and "
             "log-loss on the test set before / after.", ""]
            + _table(["model", "T", "ECE before", "ECE after", "NLL before", "NLL after"], rows) + [""]
            + (["(bound): the fit stopped at the end of its search interval "
                f"({TEMPERATURE_BOUNDS[0]}-{TEMPERATURE_BOUNDS[1]:g}): the out-of-fold predictions are nearly "
                "uninformative (e.g. a model barely trained), and that temperature mostly flattens them.", ""]
               if any("(bound)" in row[1] for row in rows) else [])
            + _worse_after_scaling(results))


def _worse_after_scaling(results: dict[str, Any]) -> list[str]:
    """Name the ensembles whose test calibration the temperature made worse: it was fit on the
    out-of-fold predictions, and did not carry over to the test set."""
    worse = []
    for name in ensemble_names(results):
        c = results["calibration"].get(name) or {}
        what = [label for label, before, after in (("ECE", "ece_before", "ece_after"), ("NLL", "nll_before", "nll_after"))
                if c.get(after) is not None and c.get(before) is not None and c[after] > c[before]]
        if what:
            worse.append(f"{name} ({' and '.join(what)})")
    if not worse:
        return []
    return [f"**Worse after scaling on the test set**: {'; '.join(worse)}. The temperature fit on the out-of-fold "
            "predictions did not carry over; with few out-of-fold images, or models that behave differently "
            "on their validation folds than on the test set, use the unscaled probabilities.", ""]


def _epochs_text(m: dict[str, Any]) -> str:
    """'16 of 24' (1-based best epoch of the epochs trained), with why a fold stopped before its last."""
    best, trained, planned = m.get("best_epoch"), m.get("epochs_trained"), m.get("epochs")
    if best is None or best < 0:
        return "-"
    text = f"{best + 1} of {trained}" if trained is not None else str(best + 1)
    stopped = {"time_limit": "time limit", "early_stop": "early stop"}.get(m.get("stopped") or "")
    if stopped and planned is not None and trained is not None and trained < planned:
        text += f" ({stopped}; {planned} planned)"
    if m.get("best_lost"):  # the best epoch's weights were lost: the fold's model is its last epoch's
        text += " (its last weights: no best kept)"
    return text


def _fold_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for b, folds in results["per_fold"].items():
        for fold, m in folds.items():
            rows.append([b, fold, _epochs_text(m), fmt("balanced_accuracy", m["val"]["balanced_accuracy"]),
                         fmt("balanced_accuracy", m["test"]["balanced_accuracy"]), fmt("top1", m["test"]["top1"]),
                         fmt("auroc_macro", m["test"]["auroc_macro"])])
    header = ["backbone", "fold", "best epoch", "val balanced acc. %", "test balanced acc. %", "test top-1 %",
              "test AUC"]
    return (["## Every fold model", "", f"Best single model (chosen on its validation fold): "
             f"{results['best_single']}.", ""] + _table(header, rows) + [""])


def markdown(results: dict[str, Any]) -> str:
    """The report: status, test table (with the majority baseline), CV table, per class,
    calibration, every fold, and the figures."""
    w = results["weights"]
    lines = [f"# Ensemble report: {results['run_dir']}", ""] + _status_lines(results) + [""]
    lines += _test_section(results)
    if cross_backbone_names(results) and w["n"]:
        lines += [f"Weighted ensemble: per-backbone weights {_weights_text(results)}, fit by minimising the "
                  f"log-loss of {w['n']} out-of-fold predictions (never the test set).", ""]
    elif cross_backbone_names(results):
        lines += [f"Weighted ensemble: equal weights ({_weights_text(results)}): no out-of-fold image was "
                  "predicted by every backbone (their finished folds differ), so there was nothing to fit on.", ""]
    lines += _paired_section(results)
    lines += _cv_section(results) + _per_class_section(results) + _calibration_section(results)
    lines += _fold_section(results)
    if results.get("plots"):
        lines += ["## Figures", ""] + [f"![{Path(p).stem}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures

def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 5.0)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def save_figure(fig: Any, path: Path) -> None:
    """Save as PNG via a temporary file and rename (readers never see half an image)."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_confusion(cm: np.ndarray, title: str, path: Path) -> None:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, axes = _figure(2, 1, (5.5, 5.0))
    for ax, mat, sub, fmt_ in ((axes[0, 0], cm, "counts", "{:.0f}"), (axes[0, 1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45)
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {sub}")
        for i in range(len(CLASSES)):
            for j in range(len(CLASSES)):
                ax.text(j, i, fmt_.format(mat[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if mat[i, j] > 0.6 * mat.max() else "black")
    save_figure(fig, path)


def plot_roc(probs: np.ndarray, labels: np.ndarray, aucs: dict[str, float | None], title: str, path: Path) -> None:
    """One-vs-rest ROC curve of every class, labelled with its AUC."""
    from sklearn.metrics import roc_curve
    fig, axes = _figure(1, 1, (6.0, 5.5))
    ax = axes[0, 0]
    for i, cls in enumerate(CLASSES):
        positives = labels == i
        if positives.all() or not positives.any():
            continue  # a ROC curve needs both positives and negatives
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        auc = aucs.get(cls)
        ax.plot(fpr, tpr, label=f"{cls} (AUC {auc:.3f})" if auc is not None else cls)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_reliability(calibration: dict[str, Any], title: str, path: Path) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    fig, axes = _figure(1, 1, (5.5, 5.0))
    ax = axes[0, 0]
    edges = np.asarray(calibration["reliability_before"]["edges"])
    width = edges[1] - edges[0]
    centres = (edges[:-1] + edges[1:]) / 2
    for key, label, offset, ece in (("reliability_before", "before", -width / 4, calibration["ece_before"]),
                                    ("reliability_after", f"after (T: {_temps(calibration)})",
                                     width / 4, calibration["ece_after"])):
        acc = np.array([a if a is not None else 0.0 for a in calibration[key]["accuracy"]])
        ax.bar(centres + offset, acc, width=width / 2, alpha=0.7, label=f"{label}, ECE {ece:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_curves(backbone: str, logs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Loss (train solid, val dashed) and balanced accuracy against epoch, one colour per fold.
    The training loss drawn is the plain cross-entropy (``train_ce``), the validation loss's
    measure; logs written before it have the training criterion only (class-weighted by default,
    so higher than the cross-entropy of the same predictions), labelled as such."""
    fig, axes = _figure(2, 1, (6.0, 4.5))
    loss_ax, acc_ax = axes[0, 0], axes[0, 1]
    for i, (fold, entries) in enumerate(sorted(logs.items())):
        color = f"C{i % 10}"
        epochs = [e["epoch"] + 1 for e in entries]  # log.jsonl counts from 0, the report from 1
        plain = any(e.get("train_ce") is not None for e in entries)
        train_key, train_what = ("train_ce", "train") if plain else ("train_loss", "train (criterion)")
        for key, ax, style, what in ((train_key, loss_ax, "-", train_what), ("val_loss", loss_ax, "--", "val"),
                                     ("train_balanced_accuracy", acc_ax, "-", "train"),
                                     ("val_balanced_accuracy", acc_ax, "--", "val")):
            pts = [(ep, e[key]) for ep, e in zip(epochs, entries) if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker=".", label=f"{fold} {what}")
    loss_ax.set_title(f"{backbone}: cross-entropy loss")
    acc_ax.set_title(f"{backbone}: balanced accuracy")
    from matplotlib.ticker import MaxNLocator
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _fold_logs(scan: "RunScan", backbone: str) -> dict[str, list[dict[str, Any]]]:
    logs = {}
    for fold in range(scan.num_folds):
        entries = read_log(scan.run_dir / backbone / f"fold{fold}" / LOG_NAME)
        if entries:
            done = any(f.backbone == backbone and f.fold == fold for f in scan.finished)
            logs[f"fold{fold}" + ("" if done else " (unfinished)")] = entries
    return logs


def make_plots(results: dict[str, Any], arrays: dict[str, Any], scan: "RunScan", out_dir: Path) -> list[str]:
    """Draw every figure into ``out_dir``; returns their file names (relative to it)."""
    labels = arrays["test_labels"]
    written = []

    def out(name: str) -> Path:
        assert name.startswith(FIGURE_PREFIXES), name  # else a later ensemble would keep it as a user's file
        written.append(name)
        return out_dir / name

    confusions = [(results["best_single"], f"best single model ({results['best_single']})"),
                  ("ensemble_mean", "ensemble (mean)")]
    if cross_backbone_names(results):
        confusions.append(("ensemble_weighted", "ensemble (OOF-weighted)"))
    for key, title in confusions:
        fname = "confusion_best_single.png" if key == results["best_single"] else f"confusion_{key}.png"
        plot_confusion(np.asarray(results["test"][key]["confusion_matrix"]), title, out(fname))
    plot_roc(arrays["entries"]["ensemble_mean"], labels, results["test"]["ensemble_mean"]["auroc"],
             "ensemble (mean): one-vs-rest ROC, test set", out("roc_ensemble_mean.png"))
    if "ensemble_mean" in results["calibration"]:
        plot_reliability(results["calibration"]["ensemble_mean"], "ensemble (mean): reliability, test set",
                         out("reliability_ensemble_mean.png"))
    for backbone in scan.backbones:
        logs = _fold_logs(scan, backbone)
        if logs:
            plot_curves(backbone, logs, out(f"curves_{backbone}.png"))
    return written
