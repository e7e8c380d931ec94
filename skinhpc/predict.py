"""The trained fold ensemble on new images: ``predict_images`` and ``run_predict``.

Every finished fold of every backbone of a run (``RUN/<backbone>/fold<k>/model_best.pt``) is loaded.
Each image goes through exactly the evaluation path of training: ``convert.prepare_image`` to the
stored size the model was trained on, then ``augment.eval_transform`` (largest centred square
resized to the model's input size) and ``augment.normalize``. With test-time augmentation the
probabilities are averaged over the identity, a horizontal and a vertical flip; by default each
model uses it when its fold was evaluated with it (``train.tta``), so the answers are those of the
run's report. Probabilities are
averaged over the fold models of each backbone, then over backbones (the report's "ensemble
(mean)"), so a backbone with more finished folds does not outweigh the others.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from skinhpc import CLASSES
from skinhpc.config import atomic_write_text, available_cores, sha256_file
from skinhpc.convert import IMAGE_SUFFIXES  # the images the conversion takes, in any case


class PredictError(ValueError):
    """Nothing can be predicted (no model, no image); the message says what and where."""


@dataclass
class FoldModel:
    """One fold model and the input geometry it was trained with."""

    backbone: str
    fold: int
    model: nn.Module
    stored_size: tuple[int, int]
    image_size: int
    tta: bool = False
    """Whether its fold was evaluated with flip TTA (``train.tta`` of its config.yaml)."""


@dataclass
class PredictResult:
    """Probabilities (N, 7) of the images that could be read, and one message per image that could not."""

    paths: list[str] = field(default_factory=list)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CLASSES)), np.float64))
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- models

def finished_model_files(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> list[tuple[str, int, Path]]:
    """(backbone, fold, model_best.pt) of every finished fold (metrics.json says done) that the
    report averages; a finished fold the report leaves out for its config, or one without its
    model_best.pt (the report counts it, predict cannot), is named to ``warn``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir}: no such run directory")
    from skinhpc.ensemble import EnsembleError, folds_trained_otherwise
    try:
        otherwise = folds_trained_otherwise(run_dir)
    except EnsembleError as e:  # an unreadable RUN/config.yaml or split.json, named
        raise PredictError(str(e)) from None
    found = []
    for status_path in sorted(run_dir.glob("*/fold*/metrics.json")):
        fold_dir = status_path.parent
        if not fold_dir.name[4:].isdigit() or fold_dir.parent.name == "ensemble":
            continue
        try:
            status = json.loads(status_path.read_text())
        except ValueError:
            status = {}
        done = isinstance(status, dict) and status.get("status") == "done"
        key = (fold_dir.parent.name, int(fold_dir.name[4:]))
        if done and (why := otherwise.get(key)):
            if warn is not None:  # the report leaves it out: so do the answers that are "the report's"
                warn(f"{fold_dir}: {why}; predicting without this fold model, as the report does")
        elif done and (fold_dir / "model_best.pt").is_file():
            _check_recorded_digest(fold_dir / "model_best.pt", status.get("model_best_sha256"))
            found.append((*key, fold_dir / "model_best.pt"))
        elif done and warn is not None:
            warn(f"{fold_dir}: finished but has no model_best.pt; predicting without this fold model")
    if not found:
        left_out = f"; left out for their config: {len(otherwise)} fold(s)" if otherwise else ""
        raise PredictError(f"{run_dir}: no finished fold with a model_best.pt "
                           f"(looked for <backbone>/fold<k>/metrics.json with status done{left_out})")
    return sorted(found, key=lambda t: (t[0], t[1]))


def _check_recorded_digest(path: Path, recorded: object) -> None:
    """Refuse a model_best.pt whose bytes differ from those its fold recorded in metrics.json when it
    finished (``recorded``; folds of skinhpc < 0.2.4 recorded none): torch.load notices a file cut
    short, not bytes changed in place, and such a model answers wrongly without an error."""
    if isinstance(recorded, str) and sha256_file(path) != recorded:
        raise PredictError(f"{path}: its bytes differ from those its fold recorded when it finished (sha256 in "
                           f"{path.parent / 'metrics.json'}): damaged or replaced; restore it from a copy of the run, "
                           f"or delete that metrics.json and relaunch: the fold writes it again from its checkpoints "
                           f"if it kept them, else trains again")


def _evaluated_with_tta(fold_dir: Path) -> bool:
    from omegaconf import OmegaConf
    try:
        return bool(OmegaConf.select(OmegaConf.load(fold_dir / "config.yaml"), "train.tta", default=False))
    except (OSError, ValueError):
        return False  # a run of an older skinhpc, or a missing config: no TTA, as then


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_fold_models(run_dir: str | Path, device: torch.device | str | None = None,
                     warn: Callable[[str], None] | None = None) -> list[FoldModel]:
    """Load every finished fold model of the run, in eval mode, on ``device`` (GPU if present)."""
    from skinhpc.models import load_model_file

    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device {device}: no CUDA GPU is available here; use --device cpu")
    models = []
    for backbone, fold, path in finished_model_files(run_dir, warn):
        model, meta = load_model_file(path, map_location="cpu")
        classes = list(meta.get("classes", CLASSES))
        if classes != list(CLASSES):
            raise PredictError(f"{path}: classes {classes} differ from skinhpc's {list(CLASSES)}")
        stored = meta["stored_size"]
        models.append(FoldModel(backbone, fold, model.to(device).eval(), (int(stored[0]), int(stored[1])),
                                int(meta["model_cfg"].image_size), _evaluated_with_tta(path.parent)))
    return models


# --------------------------------------------------------------------------- images

def expand_inputs(inputs: Sequence[str | Path],
                  warn: Callable[[str], None] | None = None) -> tuple[list[Path], list[str]]:
    """Image files named directly or found in folders (*.jpg, *.jpeg, *.png, any case, not recursive),
    and an error message for each input that is neither. What a folder holds besides is counted
    to ``warn``, except hidden files (a file named directly is always tried, hidden or not)."""
    paths: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # Hidden files (macOS's AppleDouble ._x.jpg beside x.jpg) are no images: left out silently.
            entries = sorted(f for f in p.iterdir() if not f.name.startswith("."))
            found = [f for f in entries if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                errors.append(f"{p}: folder holds no {'/'.join(IMAGE_SUFFIXES)} images")
            taken = set(found)  # a set: folders of a whole download hold 10,000 images
            skipped = [f for f in entries if f not in taken]
            if skipped and warn is not None:
                warn(f"{p}: skipped {len(skipped)} entr{'y that is' if len(skipped) == 1 else 'ies that are'} not "
                     f"{'/'.join(IMAGE_SUFFIXES)} files (e.g. {skipped[0].name}; subfolders are not searched); "
                     "name such a file directly to try it")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return paths, errors


def _read(path: Path, stored_size: tuple[int, int]) -> np.ndarray | str:
    """The image's pixels as conversion stores them, or the reason it cannot be read."""
    from skinhpc.convert import prepare_image
    try:
        return prepare_image(path, stored_size)
    except Exception as e:  # PIL raises many types for broken files; the user needs the name
        return f"{path}: cannot read image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _stretched(paths: Sequence[str], stored_size: tuple[int, int]) -> list[str]:
    """The images whose proportions differ from the models' stored [H, W]: conversion's resize
    stretched them (``convert.stretched_images``). A JPEG's size and EXIF orientation are read from its
    headers, without decoding its pixels."""
    from PIL import Image

    from skinhpc.convert import stretched_images, upright_size
    sizes = []
    for p in paths:
        try:
            with Image.open(p) as image:
                sizes.append(upright_size(image))
        except Exception:  # read a moment ago; gone since: nothing to say about its shape
            sizes.append((int(stored_size[1]), int(stored_size[0])))
    return [str(p) for _, p, _ in stretched_images(paths, sizes, (int(stored_size[1]), int(stored_size[0])))]


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- prediction

@torch.inference_mode()
def _model_probs(fm: FoldModel, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """Softmax probabilities of one model on a uint8 NHWC batch (mean over flips with ``tta``)."""
    from skinhpc.augment import eval_transform, normalize
    from skinhpc.evaluate import flip_tta_probs

    x = normalize(eval_transform(images, fm.image_size))
    return flip_tta_probs(fm.model, x) if tta else torch.softmax(fm.model(x).float(), dim=1)


def ensemble_probs(models: Sequence[FoldModel], images_by_size: dict[tuple[int, int], torch.Tensor],
                   tta: bool | None) -> np.ndarray:
    """Mean over each backbone's folds, then over backbones (``tta`` None: as each fold was evaluated)."""
    per_backbone: dict[str, list[torch.Tensor]] = {}
    for fm in models:
        flips = fm.tta if tta is None else tta
        per_backbone.setdefault(fm.backbone, []).append(_model_probs(fm, images_by_size[fm.stored_size], flips))
    means = [torch.stack(p).mean(0) for p in per_backbone.values()]
    return torch.stack(means).mean(0).double().cpu().numpy()


def predict_images(models: Sequence[FoldModel], paths: Sequence[str | Path], *, tta: bool | None = None,
                   batch_size: int = 32, workers: int = 0,
                   on_error: Callable[[str], None] | None = None) -> PredictResult:
    """Ensemble probabilities of every readable image; unreadable ones are reported and skipped.

    Images are decoded in ``workers`` threads (0: every core) and run ``batch_size`` at a time;
    the answers do not depend on the batch size (eval mode, no cross-sample state). ``tta``: flip
    TTA for every model (True), for none (False), or as each fold was evaluated (None).
    """
    if not models:
        raise PredictError("no models to predict with")
    if batch_size < 1:
        raise PredictError(f"batch size must be >= 1, not {batch_size}")
    device = next(models[0].model.parameters()).device
    sizes = sorted({fm.stored_size for fm in models})
    result = PredictResult()
    batches: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers or available_cores()) as pool:
        for chunk in _chunks([Path(p) for p in paths], batch_size):
            decoded = {s: list(pool.map(lambda p, s=s: _read(p, s), chunk)) for s in sizes}
            ok = [i for i in range(len(chunk)) if all(not isinstance(decoded[s][i], str) for s in sizes)]
            for i in sorted(set(range(len(chunk))) - set(ok)):
                message = next(decoded[s][i] for s in sizes if isinstance(decoded[s][i], str))
                result.errors.append(message)
                if on_error is not None:
                    on_error(message)
            if not ok:
                continue
            images = {s: torch.from_numpy(np.stack([decoded[s][i] for i in ok])).to(device) for s in sizes}
            batches.append(ensemble_probs(models, images, tta))
            result.paths += [str(chunk[i]) for i in ok]
    if batches:
        result.probs = np.concatenate(batches)
    return result


def _printable(path: str) -> str:
    """The path as valid UTF-8: a name that is not (bytes of another encoding) keeps them as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_csv(paths: Sequence[str], probs: np.ndarray) -> str:
    """CSV text: image, one probability column per class (named after it), prediction."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *CLASSES, "prediction"])
    for path, p in zip(paths, probs):
        writer.writerow([_printable(path), *(f"{v:.6f}" for v in p), CLASSES[int(np.argmax(p))]])
    return buf.getvalue()


def _tta_said(models: Sequence[FoldModel], tta: bool | None) -> str:
    if tta is not None:
        return ", flip TTA" if tta else ", no TTA"
    with_tta = sum(m.tta for m in models)
    if with_tta in (0, len(models)):
        return f", {'flip TTA' if with_tta else 'no TTA'} (as the run was evaluated)"
    return f", flip TTA for the {with_tta} fold models evaluated with it"


def _check_out(out: str | Path) -> None:
    """Refuse an output path that cannot be written before spending time predicting."""
    out = Path(out)
    if out.is_dir():
        raise PredictError(f"--out {out}: is a folder; give a file name")
    if not out.parent.is_dir():
        raise PredictError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):  # before the models run (a read-only filesystem says so even to root)
        raise PredictError(f"--out {out}: folder {out.parent} cannot be written")


def run_predict(run_dir: str | Path, inputs: Sequence[str | Path], *, tta: bool | None = None,
                out: str | Path | None = None, batch_size: int = 32, device: str | None = None) -> int:
    """The command: predict every image, write the CSV to ``out`` (atomically) or stdout, print
    problems on stderr. Returns the exit status: 0, or 1 when any input could not be read (when
    none could, nothing is written). No image at all to try is a ``PredictError``."""
    def warn(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    def note(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    if out is not None:
        _check_out(out)
    paths, input_errors = expand_inputs(inputs, note)
    for message in input_errors:
        warn(message)
    if not paths:  # before loading models: nothing to spend that time on
        raise PredictError("no image to predict (see above)")
    models = load_fold_models(run_dir, device, note)
    print(f"predicting {len(paths)} images with {len(models)} fold models "
          f"({', '.join(sorted({m.backbone for m in models}))}) on {next(models[0].model.parameters()).device}"
          f"{_tta_said(models, tta)}", file=sys.stderr)
    result = predict_images(models, paths, tta=tta, batch_size=batch_size, on_error=warn)
    failed = len(input_errors) + len(result.errors)
    if stretched := _stretched(result.paths, models[0].stored_size):
        h, w = models[0].stored_size
        ratio = f"{w // math.gcd(w, h)}:{h // math.gcd(w, h)}"
        note(f"{len(stretched)} image(s) have another shape than the {ratio} of the images the models were trained "
             f"on and were stretched to it (crop or pad them to {ratio} first to keep their proportions): "
             + ", ".join(stretched[:5]) + (f" and {len(stretched) - 5} more" if len(stretched) > 5 else ""))
    if not result.paths:
        # A header-only CSV would replace an earlier --out that still holds answers.
        print(f"error: none of the {failed} input(s) could be read (see above); nothing written", file=sys.stderr)
        return 1
    text = to_csv(result.paths, result.probs)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        print(f"wrote {len(result.paths)} rows to {out}", file=sys.stderr)
    if failed:
        print(f"error: {failed} input(s) could not be read (see above); the others were predicted", file=sys.stderr)
    return 1 if failed else 0
