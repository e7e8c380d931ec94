"""Predicting new images with a run's fold ensemble (small fresh timm models, bundled sample images)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skinhpc import CLASSES, REPO_DIR, SAMPLE_IMAGES
from skinhpc.augment import eval_transform, normalize
from skinhpc.config import ModelConfig
from skinhpc.convert import prepare_image
from skinhpc.models import create_model, save_model_file
from skinhpc.predict import PredictError, expand_inputs, load_fold_models, predict_images, run_predict

# Two resnet18 folds and one fold of a second, smaller backbone stored at another size, so the
# mean over folds-then-backbones and the per-model stored sizes are both exercised.
MODELS = (("resnet18", 0, [75, 100], 64), ("resnet18", 1, [75, 100], 64),
          ("mobilenetv3_small_050", 0, [90, 120], 48))
SAMPLE = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:7]


def _write_fold(run: Path, backbone: str, fold: int, stored_size: list[int], image_size: int,
                status: str = "done") -> None:
    torch.manual_seed(100 * fold + len(backbone))
    cfg = ModelConfig(backbone=backbone, image_size=image_size, pretrained="false", drop_rate=0.0)
    model = create_model(cfg)
    # Fresh BatchNorm statistics make every output near-uniform: give them some spread.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    d = run / backbone / f"fold{fold}"
    save_model_file(d / "model_best.pt", model, cfg, stored_size, epoch=1, val_balanced_accuracy=0.5)
    (d / "metrics.json").write_text(json.dumps({"status": status, "backbone": backbone, "fold": fold}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "run"
    for spec in MODELS:
        _write_fold(run, *spec)
    _write_fold(run, "resnet18", 2, [75, 100], 64, status="running")  # unfinished: never used
    return run


def _manual_probs(run: Path, paths: list[Path], tta: bool = False) -> np.ndarray:
    """The training eval path written out by hand: mean over folds, then over backbones."""
    per_backbone: dict[str, list[np.ndarray]] = {}
    for backbone, fold, stored, size in MODELS:
        from skinhpc.models import load_model_file
        model, _ = load_model_file(run / backbone / f"fold{fold}" / "model_best.pt")
        images = torch.from_numpy(np.stack([prepare_image(p, stored) for p in paths]))
        x = normalize(eval_transform(images, size))
        with torch.no_grad():
            views = [x, torch.flip(x, [3]), torch.flip(x, [2])] if tta else [x]
            probs = np.mean([torch.softmax(model(v), 1).numpy() for v in views], axis=0)
        per_backbone.setdefault(backbone, []).append(probs)
    return np.mean([np.mean(v, axis=0) for v in per_backbone.values()], axis=0)


@pytest.mark.timeout(120)
def test_only_finished_folds_are_loaded(run_dir):
    models = load_fold_models(run_dir, "cpu")
    assert [(m.backbone, m.fold) for m in models] == [("mobilenetv3_small_050", 0), ("resnet18", 0), ("resnet18", 1)]
    assert {m.stored_size for m in models} == {(75, 100), (90, 120)}


@pytest.mark.timeout(120)
def test_a_fold_the_report_leaves_out_for_its_config_is_left_out_of_predict_too(tmp_path):
    from skinhpc.config import load_config, save_config

    run = tmp_path / "run"
    launched = load_config([f"run_dir={run}", "backbones=[resnet18]", "model.backbone=resnet18", "split.folds=3"])
    save_config(launched, run / "config.yaml")
    for fold, lr in ((0, launched.train.lr), (1, launched.train.lr * 10)):  # fold 1: by hand, another lr
        _write_fold(run, "resnet18", fold, [75, 100], 64)
        save_config(load_config([f"run_dir={run}", "backbones=[resnet18]", "model.backbone=resnet18",
                                 "split.folds=3", f"fold={fold}", f"train.lr={lr}"]),
                    run / "resnet18" / f"fold{fold}" / "config.yaml")
    warnings: list[str] = []
    models = load_fold_models(run, "cpu", warn=warnings.append)
    assert [(m.backbone, m.fold) for m in models] == [("resnet18", 0)]
    assert len(warnings) == 1 and "fold1" in warnings[0] and "train.lr" in warnings[0], warnings
    assert "as the report does" in warnings[0]


@pytest.mark.timeout(180)
def test_rows_sum_to_one_and_batch_size_does_not_change_answers(run_dir):
    models = load_fold_models(run_dir, "cpu")
    results = [predict_images(models, SAMPLE, batch_size=bs, workers=1) for bs in (1, 3, 16)]
    for r in results:
        assert r.errors == [] and r.paths == [str(p) for p in SAMPLE]
        assert np.allclose(r.probs.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(r.probs, results[0].probs, atol=1e-5)


@pytest.mark.timeout(180)
def test_ensemble_is_the_eval_path_averaged_over_folds_then_backbones(run_dir):
    models = load_fold_models(run_dir, "cpu")
    paths = SAMPLE[:4]
    for tta in (False, True):
        got = predict_images(models, paths, tta=tta, batch_size=4, workers=1).probs
        np.testing.assert_allclose(got, _manual_probs(run_dir, paths, tta=tta), atol=1e-5)
    plain = predict_images(models, paths, batch_size=4, workers=1).probs
    assert not np.allclose(plain, got, atol=1e-6)  # flips do change the answer


@pytest.mark.timeout(180)
def test_by_default_each_fold_predicts_with_the_tta_it_was_evaluated_with(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for backbone, fold, _, _ in MODELS:
        (run / backbone / f"fold{fold}" / "config.yaml").write_text("train:\n  tta: true\n")
    models = load_fold_models(run, "cpu")
    assert all(m.tta for m in models)
    paths = SAMPLE[:3]
    np.testing.assert_allclose(predict_images(models, paths, workers=1).probs,
                               _manual_probs(run, paths, tta=True), atol=1e-5)
    np.testing.assert_allclose(predict_images(models, paths, tta=False, workers=1).probs,
                               _manual_probs(run, paths, tta=False), atol=1e-5)


@pytest.mark.timeout(60)
def test_sixteen_bit_grey_image_gives_the_pixels_of_its_eight_bit_version(tmp_path):
    from PIL import Image
    grey = np.asarray(Image.open(SAMPLE[0]).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # opens as I;16
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    eight, sixteen = (prepare_image(tmp_path / f"grey{b}.png", [75, 100]) for b in (8, 16))
    assert sixteen.min() < 200  # not clipped to white
    np.testing.assert_array_equal(sixteen, eight)


@pytest.mark.timeout(180)
def test_output_path_is_checked_first_and_any_file_name_reaches_the_csv(run_dir, tmp_path, capsys):
    with pytest.raises(PredictError, match="is a folder"):
        run_predict(run_dir, [SAMPLE[0]], out=tmp_path, device="cpu")
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(SAMPLE[0], folder / "ok.jpg")
    shutil.copy(SAMPLE[1], folder / "caf\udce9.jpg")  # a Latin-1 name on a UTF-8 system
    out = tmp_path / "pred.csv"
    assert run_predict(run_dir, [folder], out=out, device="cpu") == 0
    names = [Path(r["image"]).name for r in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))]
    assert names == ["caf\\xe9.jpg", "ok.jpg"]


@pytest.mark.timeout(120)
def test_an_image_of_another_shape_is_predicted_with_a_warning_naming_it(run_dir, tmp_path, capsys):
    from PIL import Image
    portrait = tmp_path / "portrait.jpg"
    with Image.open(SAMPLE[0]) as image:
        image.transpose(Image.Transpose.ROTATE_90).save(portrait)
    assert run_predict(run_dir, [SAMPLE[1], portrait], device="cpu") == 0
    err = capsys.readouterr().err
    assert (f"warning: 1 image(s) have another shape than the 4:3 of the images the models were trained on and "
            f"were stretched to it (crop or pad them to 4:3 first to keep their proportions): {portrait}") in err


@pytest.mark.timeout(240)
def test_unreadable_image_is_named_others_processed_and_exit_nonzero(run_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in SAMPLE[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "predict.py"), "--run", str(run_dir),
                           str(folder), str(tmp_path / "missing.png"), "--out", str(out), "--batch-size", "2"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stderr and "missing.png" in proc.stderr and "Traceback" not in proc.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in SAMPLE[:3])
    assert list(rows[0]) == ["image", *CLASSES, "prediction"]
    for r in rows:
        probs = [float(r[c]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["prediction"] == CLASSES[int(np.argmax(probs))]


@pytest.mark.timeout(60)
def test_run_without_finished_folds_is_a_clear_error(tmp_path):
    with pytest.raises(PredictError, match="no finished fold"):
        load_fold_models(tmp_path, "cpu")
    proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "predict.py"), "--run", str(tmp_path),
                           str(SAMPLE[0])], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and "no finished fold" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(30)
def test_folders_contribute_their_images_and_empty_ones_are_reported(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.PNG").write_bytes(b"")
    (tmp_path / "a" / "y.jpeg").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "z.tif").write_bytes(b"")
    (tmp_path / "a" / "sub").mkdir()
    warnings: list[str] = []
    paths, errors = expand_inputs([tmp_path / "a", tmp_path / "empty"], warnings.append)
    assert [p.name for p in paths] == ["x.PNG", "y.jpeg"]
    assert len(errors) == 1 and "empty" in errors[0]
    # What a folder holds besides its images is not predicted, and the user is told so.
    assert len(warnings) == 1 and "skipped 2 entries" in warnings[0] and str(tmp_path / "a") in warnings[0]


@pytest.mark.timeout(120)
def test_a_finished_fold_without_its_model_file_is_named_not_silently_dropped(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "resnet18" / "fold1" / "model_best.pt").unlink()
    warnings: list[str] = []
    models = load_fold_models(run, "cpu", warnings.append)
    assert [(m.backbone, m.fold) for m in models] == [("mobilenetv3_small_050", 0), ("resnet18", 0)]
    assert len(warnings) == 1 and "resnet18/fold1" in warnings[0] and "model_best.pt" in warnings[0]


@pytest.mark.timeout(120)
def test_a_model_file_whose_bytes_changed_since_its_fold_finished_is_refused_naming_it(run_dir, tmp_path):
    from skinhpc.config import sha256_file
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / "resnet18" / "fold1" / "model_best.pt"
    status = path.parent / "metrics.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "model_best_sha256": sha256_file(path)}))
    assert len(load_fold_models(run, "cpu")) == 3  # as recorded
    with open(path, "r+b") as f:  # bytes changed in place (a bad disk, a partial overwrite): torch.load reads it
        f.seek(path.stat().st_size // 2)
        f.write(bytes(4096))
    with pytest.raises(PredictError, match=rf"{path}: its bytes differ from those its fold recorded when it "
                                           r"finished .*delete that metrics.json and relaunch"):
        load_fold_models(run, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.timeout(60)
def test_asking_for_a_gpu_where_there_is_none_is_a_clear_error(run_dir):
    with pytest.raises(PredictError, match="no CUDA GPU"):
        load_fold_models(run_dir, "cuda")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_trained_run_ensembles_and_predicts_like_the_training_eval_path(tmp_path):
    """End to end on the bundled sample: train two tiny folds, ensemble them, predict the test
    images: predict must give the probabilities training's own eval path saved (PIL loader, so
    the pixels are the same; FFCV re-encodes JPEGs)."""
    from skinhpc.ensemble import read_predictions, run_ensemble

    run = tmp_path / "run"
    for fold in (0, 1):
        proc = subprocess.run([sys.executable, str(REPO_DIR / "jobs" / "train.py"), f"run_dir={run}", f"fold={fold}",
                               "split.folds=2", "train.epochs=1", "train.max_steps_per_epoch=2", "data.loader=pil",
                               "data.num_workers=1"], capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from skinhpc.config import sha256_file
    for fold in (0, 1):  # what predict checks the model file against
        fold_dir = run / "resnet18" / f"fold{fold}"
        assert json.loads((fold_dir / "metrics.json").read_text())["model_best_sha256"] == sha256_file(fold_dir / "model_best.pt")
    results = run_ensemble(run, n_boot=20)
    assert results["missing"] == [] and len(results["finished"]) == 2
    assert (run / "ensemble" / "report.md").is_file() and results["plots"]

    tests = [read_predictions(run / "resnet18" / f"fold{k}" / "predictions_test.npz") for k in (0, 1)]
    paths = [SAMPLE_IMAGES / f"{image_id}.jpg" for image_id in tests[0].image_ids[:12]]
    got = predict_images(load_fold_models(run, "cpu"), paths, batch_size=5, workers=1)
    expected = (tests[0].probs[:12] + tests[1].probs[:12]) / 2
    np.testing.assert_allclose(got.probs, expected, atol=1e-5)


@pytest.mark.timeout(120)
def test_when_no_image_can_be_read_an_existing_output_is_left_as_it_is(run_dir, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    out.write_text("earlier answers\n")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    assert run_predict(run_dir, [broken], out=out, device="cpu") == 1
    assert out.read_text() == "earlier answers\n"
    err = capsys.readouterr().err
    assert "none of the 1 input(s) could be read" in err and "the others were predicted" not in err


@pytest.mark.timeout(60)
def test_no_image_found_is_an_error_before_any_model_is_loaded(tmp_path):
    (tmp_path / "empty").mkdir()
    # There is no run directory: loading models would fail with "no such run directory" instead.
    with pytest.raises(PredictError, match="no image to predict"):
        run_predict(tmp_path / "no-run", [tmp_path / "empty"], device="cpu")


@pytest.mark.timeout(30)
def test_hidden_files_in_a_folder_are_skipped_silently_but_tried_when_named(tmp_path):
    shutil.copy(SAMPLE[0], tmp_path / SAMPLE[0].name)
    (tmp_path / f"._{SAMPLE[0].name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (tmp_path / ".DS_Store").write_bytes(b"")
    warnings: list[str] = []
    paths, errors = expand_inputs([tmp_path], warnings.append)
    assert paths == [tmp_path / SAMPLE[0].name] and errors == [] and warnings == []
    named, _ = expand_inputs([tmp_path / f"._{SAMPLE[0].name}"])
    assert named == [tmp_path / f"._{SAMPLE[0].name}"]
