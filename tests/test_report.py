"""The ensemble's report: markdown tables in the paper's shape and valid PNG figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from skinhpc import CLASSES  # noqa: E402
from skinhpc.ensemble import run_ensemble  # noqa: E402
from skinhpc.report import plot_confusion, plot_curves  # noqa: E402
from skinhpc.rundir import read_log  # noqa: E402

from test_ensemble import FakeRun, noisy_probs, write_npz  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K = len(CLASSES)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = FakeRun(tmp_path_factory.mktemp("report") / "run", folds=3, n_lesions=150)
    run.fill({"resnet18": 2.0, "vgg16": 1.0}, skip={("vgg16", 2)})
    # an unfinished fold with a log (and a line cut by a crash): its curve is still drawn
    d = run.root / "vgg16" / "fold2"
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 2.0, "val_loss": 2.1,
                                             "val_balanced_accuracy": 0.2}) + '\n{"epoch": 1, "tra')
    results = run_ensemble(run.root, n_boot=30, plots=True)
    return run, results


@pytest.mark.timeout(180)
def test_every_plot_is_a_valid_png(finished):
    run, results = finished
    out = run.root / "ensemble"
    names = set(results["plots"])
    assert {"confusion_best_single.png", "confusion_ensemble_mean.png", "confusion_ensemble_weighted.png",
            "roc_ensemble_mean.png", "reliability_ensemble_mean.png", "curves_resnet18.png",
            "curves_vgg16.png"} <= names
    for name in names:
        assert_png(out / name)
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.timeout(180)
def test_report_leads_with_balanced_accuracy_and_shows_the_majority_baseline(finished):
    run, results = finished
    text = (run.root / "ensemble" / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[1].startswith("balanced acc") and cells[2].startswith("top-1") and cells[3].startswith("top-2")
    assert "AUC" in cells[4] and cells[-1] == "loss"
    assert "66.95%" in text
    baseline_row = next(line for line in text.splitlines() if line.startswith('| majority class ("nv")'))
    top1 = results["test"]["majority_nv"]["top1"]
    assert f"{top1 * 100:.1f}" in baseline_row
    # mean ± std rows per backbone, with the number of folds that finished
    assert re.search(r"\| resnet18: fold models \(3\) \| \d+\.\d ± \d+\.\d", text)
    assert "vgg16: fold models (2)" in text and "vgg16 fold 2" in text
    for name in results["plots"]:
        assert f"]({name})" in text
    for cls in CLASSES:
        assert f"| {cls} |" in text


@pytest.mark.timeout(180)
def test_metrics_json_is_strict_json_with_every_section(finished):
    run, _ = finished
    raw = (run.root / "ensemble" / "metrics.json").read_text()
    results = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    for key in ("per_fold", "cv", "oof", "test", "weights", "bootstrap", "calibration", "missing", "finished",
                "fold_digests"):
        assert key in results
    from skinhpc.rundir import metrics_digest
    assert results["fold_digests"] == {f"{f['backbone']}/fold{f['fold']}": metrics_digest(
        run.root / f["backbone"] / f"fold{f['fold']}") for f in results["finished"]}  # vgg16/fold2 has none
    assert results["test"]["majority_nv"]["balanced_accuracy"] == pytest.approx(
        1 / len({int(v) for v in np.nonzero(results["test"]["majority_nv"]["confusion_matrix"])[0]}))


@pytest.mark.timeout(60)
def test_log_reader_skips_a_truncated_line_and_curves_draw(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
                                       "val_balanced_accuracy": 0.1 * e}) + "\n" for e in range(4)) + '{"epo')
    entries = read_log(log)
    assert [e["epoch"] for e in entries] == [0, 1, 2, 3]
    plot_curves("resnet18", {"fold0": entries, "fold1": entries[:2]}, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


@pytest.mark.timeout(60)
def test_curves_count_epochs_from_one_as_the_report_does(tmp_path, monkeypatch):
    import skinhpc.report as report
    drawn: list[list[float]] = []
    save = report.save_figure

    def keep_x(fig, path):  # the x data of every line, read before the figure is saved and closed
        drawn.extend(list(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())
        save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep_x)
    entries = [{"epoch": e, "train_loss": 1.0, "val_loss": 1.1, "val_balanced_accuracy": 0.3} for e in range(3)]
    plot_curves("resnet18", {"fold0": entries}, tmp_path / "curves.png")
    assert drawn and all(x == [1, 2, 3] for x in drawn)
    assert_png(tmp_path / "curves.png")


@pytest.mark.timeout(60)
def test_confusion_plot_of_an_empty_matrix_is_still_drawn(tmp_path):
    plot_confusion(np.zeros((len(CLASSES), len(CLASSES))), "nothing", tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")


@pytest.mark.timeout(180)
def test_one_backbone_report_shows_its_fold_ensemble_once(tmp_path):
    # With one backbone the cross-backbone ensembles equal its fold ensemble: no repeated rows,
    # columns or figures in the report; metrics.json keeps them for scripts.
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3, n_lesions=150)
    run.fill({"resnet18": 2.0})
    results = run_ensemble(run.root, n_boot=0, plots=True)
    text = (run.root / "ensemble" / "report.md").read_text()
    assert text.count("| resnet18: fold ensemble |") == 1
    assert "all backbones" not in text and "ensemble_weighted" not in text
    assert not [line for line in text.splitlines() if line.startswith("| ensemble_mean")]
    assert "Weighted ensemble" not in text
    assert "confusion_ensemble_weighted.png" not in results["plots"]
    assert {"confusion_best_single.png", "confusion_ensemble_mean.png", "roc_ensemble_mean.png"} <= set(results["plots"])
    assert results["test"]["ensemble_weighted"]["top1"] == results["test"]["resnet18/ensemble"]["top1"]


@pytest.mark.timeout(180)
def test_one_backbone_console_summary_and_status_name_its_fold_ensemble_once(tmp_path):
    from skinhpc.ensemble import summary
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3, n_lesions=150)
    run.fill({"resnet18": 2.0})
    results = run_ensemble(run.root, n_boot=20, plots=False)
    text = summary(results)
    assert "resnet18/ensemble " in text and "ensemble_mean" not in text and "ensemble_weighted" not in text
    assert text.count("minus resnet18/fold") == 1  # the fold ensemble minus the best single model
    from skinhpc.launch import ensemble_headline  # what --status shows from metrics.json
    status = "\n".join(ensemble_headline(json.loads((run.root / "ensemble" / "metrics.json").read_text())))
    assert "resnet18/ensemble:" in status and "ensemble_mean" not in status and "ensemble_weighted" not in status


@pytest.mark.timeout(180)
def test_a_one_fold_ensemble_is_not_compared_with_its_own_fold_model(tmp_path):
    from skinhpc.ensemble import summary
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3, n_lesions=150)
    run.fill({"resnet18": 2.0}, skip={("resnet18", 1), ("resnet18", 2)})
    results = run_ensemble(run.root, n_boot=20, plots=False)
    text = (run.root / "ensemble" / "report.md").read_text()
    assert "Paired differences" not in text and " − best single model" not in text
    assert " minus " not in summary(results)


@pytest.mark.timeout(180)
def test_a_temperature_at_the_end_of_its_search_interval_is_marked_and_one_fold_is_singular(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3, n_lesions=150)
    run.fill({"resnet18": 0.0}, skip={("resnet18", 1), ("resnet18", 2)})  # noise: nothing to calibrate
    results = run_ensemble(run.root, n_boot=0, plots=False)
    assert results["calibration"]["resnet18/ensemble"]["temperature"]["resnet18"] == pytest.approx(20.0, rel=1e-3)
    text = (run.root / "ensemble" / "report.md").read_text()
    assert "| 20.000 (bound) |" in text and "(bound): the fit stopped at the end of its search interval" in text
    assert "| resnet18 (1 fold) |" in text


@pytest.mark.timeout(180)
def test_a_later_ensemble_removes_the_figures_it_no_longer_draws(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2, n_lesions=120)
    run.fill({"resnet18": 2.0})
    stale = run.root / "ensemble" / "curves_vgg16.png"  # e.g. from before vgg16 left the run
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE)
    results = run_ensemble(run.root, n_boot=0, plots=True)
    assert not stale.exists()
    assert sorted(p.name for p in (run.root / "ensemble").glob("*.png")) == sorted(results["plots"])
    run_ensemble(run.root, n_boot=0, plots=False)
    assert not list((run.root / "ensemble").glob("*.png"))


@pytest.mark.timeout(120)
def test_fold_table_shows_the_best_epoch_of_those_trained_and_why_a_fold_stopped_early(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3, n_lesions=120)
    rng = np.random.default_rng(0)
    for fold, kwargs in enumerate([{}, {"epochs": 2, "planned": 5, "stopped": "time_limit"},
                                   {"epochs": 4, "planned": 6, "stopped": "early_stop",
                                    "best_lost": "the best checkpoint is damaged; the last epoch's weights are used"}]):
        run.write_fold("resnet18", fold, noisy_probs(run.labels[run.val_rows[fold]], 2.0, rng),
                       noisy_probs(run.labels[run.test_rows], 2.0, rng), **kwargs)
    run_ensemble(run.root, n_boot=0, plots=False)
    text = (run.root / "ensemble" / "report.md").read_text()
    assert "| resnet18 | fold0 | 3 of 3 |" in text
    assert "| resnet18 | fold1 | 2 of 2 (time limit; 5 planned) |" in text
    assert "| resnet18 | fold2 | 4 of 4 (early stop; 6 planned) (its last weights: no best kept) |" in text
    assert "**Stopped by the time limit** (`train.stop_after_min`) before their last epoch: resnet18 fold1 after 2 of 5 epochs." in text


def _sharpen(probs: np.ndarray, power: float) -> np.ndarray:
    p = probs ** power
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.timeout(180)
def test_report_says_what_each_number_rests_on_and_where_it_leans(tmp_path):
    """Class counts beside the per-class numbers, which std, classes a test or validation set lacks,
    that the validation fold also chose each fold's epoch, and a temperature that did not carry over."""
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=3, n_lesions=150)
    df, vasc = CLASSES.index("df"), CLASSES.index("vasc")
    keep_test = run.test_rows[run.labels[run.test_rows] != df]
    rng = np.random.default_rng(0)
    val_absent = {}
    for fold in range(3):
        v = run.val_rows[fold]
        if fold == 0:
            v = v[run.labels[v] != vasc]
        val_absent[f"fold{fold}"] = [c for i, c in enumerate(CLASSES) if i not in set(run.labels[v])]
        d = run.write_fold("resnet18", fold, noisy_probs(run.labels[run.val_rows[fold]], 1.0, rng),
                           noisy_probs(run.labels[run.test_rows], 3.0, rng), select_metric="balanced_accuracy")
        # overconfident on validation, not on test: the out-of-fold temperature flattens the test set
        write_npz(d / "predictions_val.npz", _sharpen(noisy_probs(run.labels[v], 1.0, rng), 4.0), run.labels[v], v,
                  run.lesions[v])
        write_npz(d / "predictions_test.npz", noisy_probs(run.labels[keep_test], 3.0, rng), run.labels[keep_test],
                  keep_test, run.lesions[keep_test])
    results = run_ensemble(run.root, n_boot=0, plots=False)
    text = (run.root / "ensemble" / "report.md").read_text()
    nv = run.labels[keep_test] == CLASSES.index("nv")
    assert results["test_classes"]["nv"] == {"images": int(nv.sum()), "lesions": len(set(run.lesions[keep_test][nv]))}
    assert results["test_classes"]["df"] == {"images": 0, "lesions": 0}
    assert f"| nv | {int(nv.sum())} / {len(set(run.lesions[keep_test][nv]))} |" in text
    assert "the sample standard deviation, n − 1" in text
    absent = [c for i, c in enumerate(CLASSES) if i not in set(run.labels[keep_test])]
    assert "df" in absent
    assert (f"**No test image of class{'es' if len(absent) > 1 else ''} {', '.join(absent)}**: balanced accuracy "
            f"and macro AUC average over the {K - len(absent)} classes") in text
    assert "vasc" in val_absent["fold0"]
    assert results["val_absent_classes"] == {k: v for k, v in val_absent.items() if v}
    assert f"fold0 has no {', '.join(val_absent['fold0'])}" in text
    assert "kept the epoch with the best validation balanced accuracy" in text
    assert "**Worse after scaling on the test set**: resnet18/ensemble (ECE and NLL)." in text

    for fold in range(3):  # the last epoch kept: no choice was made on validation
        status = json.loads((run.root / "resnet18" / f"fold{fold}" / "metrics.json").read_text())
        status["select_metric"] = "last"
        (run.root / "resnet18" / f"fold{fold}" / "metrics.json").write_text(json.dumps(status))
    run_ensemble(run.root, n_boot=0, plots=False)
    assert "kept the epoch with the best" not in (run.root / "ensemble" / "report.md").read_text()
    from skinhpc.config import load_config, save_config
    cfg = load_config([f"run_dir={run.root}", "backbones=[resnet18]", "split.folds=3", "train.select_metric=last"])
    save_config(cfg, run.root / "config.yaml")
    for fold in range(3):  # a fold from before metrics.json recorded it: its config.yaml says
        d = run.root / "resnet18" / f"fold{fold}"
        status = json.loads((d / "metrics.json").read_text())
        del status["select_metric"]
        (d / "metrics.json").write_text(json.dumps(status))
        save_config(cfg, d / "config.yaml")
    assert run_ensemble(run.root, n_boot=0, plots=False)["per_fold"]["resnet18"]["fold0"]["select_metric"] == "last"
    assert "kept the epoch with the best" not in (run.root / "ensemble" / "report.md").read_text()


@pytest.mark.timeout(120)
def test_report_says_how_many_resamples_lack_a_class_the_test_set_has(tmp_path):
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2, n_lesions=60)
    run.fill({"resnet18": 1.0})
    results = run_ensemble(run.root, n_boot=100, plots=False)
    lacking = results["bootstrap"]["resnet18/ensemble"]["resamples_lacking_a_class"]
    assert 0 < lacking < 100  # ~20 test lesions, some classes on one or two of them
    text = (run.root / "ensemble" / "report.md").read_text()
    assert f"{lacking} of the 100 lesion resamples hold no image of some class the test set has" in text
    many = FakeRun(tmp_path / "many", backbones=("resnet18",), folds=2, n_lesions=2400)
    many.fill({"resnet18": 1.0})
    assert run_ensemble(many.root, n_boot=100, plots=False)["bootstrap"]["majority_nv"]["resamples_lacking_a_class"] == 0
    assert "lesion resamples hold no image" not in (many.root / "ensemble" / "report.md").read_text()


@pytest.mark.timeout(180)
def test_an_ensemble_that_fails_half_way_leaves_the_earlier_outputs_whole(tmp_path, monkeypatch):
    """Figures, report.md and metrics.json are replaced together, or not at all."""
    import os
    import time

    from skinhpc import report
    run = FakeRun(tmp_path / "run", backbones=("resnet18",), folds=2, n_lesions=120)
    run.fill({"resnet18": 2.0})
    run_ensemble(run.root, n_boot=10, plots=True)
    out = run.root / "ensemble"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(results):  # fails after the figures were drawn, before report.md and metrics.json
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "markdown", killed)
    with pytest.raises(OSError):
        run_ensemble(run.root, n_boot=20, plots=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith(".ensemble")) == []
    monkeypatch.undo()

    # Killed between the two renames: the earlier outputs come back with a user's files, but only
    # once the folder is older than a minute (a younger one may be another ensemble's, mid-swap).
    from skinhpc.ensemble import _recover
    (out / "notes.txt").write_text("mine")
    (out / "my_figure.png").write_bytes(PNG_SIGNATURE)
    os.replace(out, run.root / ".ensemble.old-node1-4242")
    tmp = run.root / ".ensemble.tmp-node2-4244"
    tmp.mkdir()
    _recover(out)
    assert not out.exists() and tmp.exists()  # too young to touch
    _recover(out, now=time.time() + 120)
    assert (out / "notes.txt").exists() and tmp.exists()  # restored; a temporary folder waits an hour
    _recover(out, now=time.time() + 3700)
    assert not tmp.exists()
    assert run_ensemble(run.root, n_boot=10, plots=False)["plots"] == []
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "my_figure.png", "notes.txt", "report.md"]
    assert not [p for p in run.root.iterdir() if p.name.startswith(".ensemble")]
