"""Lesion-grouped, class-stratified splits: a held-out test set, then K cross-validation folds.

HAM10000 has several images of one lesion; a split by image puts near-duplicates on both sides and
inflates every metric (the official DermaMNIST split shares 641 lesions between train and test). Here
all images of a lesion always stay on one side:

1. test set: per class, a ``test_fraction`` share of that class's lesions, drawn with ``seed``;
2. folds: scikit-learn's ``StratifiedGroupKFold`` over the remaining images, grouped by lesion.

The same function serves ``jobs/split.py``, the launcher and every training task, and the result is a
pure function of (metadata rows, folds, test_fraction, seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skinhpc import CLASSES
from skinhpc.config import SplitConfig, atomic_write_text

SPLIT_NAME = "split.json"
REQUIRED_COLUMNS = ("image_id", "lesion_id", "dx")


class SplitError(ValueError):
    """The split cannot be made or does not match the one saved in the run directory."""


@dataclass(frozen=True)
class FoldRows:
    """Beton rows (numpy int64, sorted) of one fold's training, validation and test images."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def read_metadata(path: str | Path) -> pd.DataFrame:
    """The metadata CSV's image_id, lesion_id and dx columns, in file order (= beton row order).

    Read by the conversion's own reader (cells stripped, blank records skipped, every bad row named
    with its line), so that a split made from the raw CSV, before the conversion has run, is the
    split of the converted index: a stray space must not make two lesions of one.
    """
    from skinhpc.convert import InputError, read_metadata_rows

    try:
        records, _ = read_metadata_rows(path, REQUIRED_COLUMNS)
    except InputError as e:
        raise SplitError(str(e)) from None
    return pd.DataFrame(records, columns=list(REQUIRED_COLUMNS))


def data_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the sorted (image_id, lesion_id, dx) triples: what a saved split depends on."""
    triples = sorted(zip(df["image_id"].astype(str), df["lesion_id"].astype(str), df["dx"].astype(str)))
    return hashlib.sha256("\n".join("\t".join(t) for t in triples).encode()).hexdigest()


def _lesion_classes(df: pd.DataFrame) -> pd.Series:
    """One class per lesion: its images' most frequent dx, ties to the first in name order, so that
    the row order never matters (HAM10000 lesions have one dx; conversion refuses two)."""
    return df.groupby("lesion_id", sort=True)["dx"].agg(lambda s: s.value_counts().sort_index().idxmax())


def _test_lesions(lesion_dx: pd.Series, fraction: float, seed: int) -> set[str]:
    """Per class, ``fraction`` of its lesions (at least one when the class has two or more)."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for dx in CLASSES:
        lesions = np.array(sorted(lesion_dx.index[lesion_dx == dx]))
        if len(lesions) < 2:
            continue  # a lone lesion is more useful for training than as a one-image test class
        n = max(1, int(round(fraction * len(lesions))))
        chosen.update(rng.permutation(lesions)[:n].tolist())
    return chosen


def _warn_rare_classes(lesion_dx: pd.Series, folds: int) -> list[str]:
    counts = lesion_dx.value_counts()
    rare = [f"{dx} ({counts.get(dx, 0)} lesions)" for dx in CLASSES if counts.get(dx, 0) < folds]
    if rare:
        warnings.warn(f"classes with fewer lesions than folds ({folds}): {', '.join(rare)}; "
                      "some folds will lack them in validation or in training", stacklevel=3)
    return rare


def make_split(df: pd.DataFrame, cfg: SplitConfig) -> dict:
    """Split metadata rows (columns image_id, lesion_id, dx) into test + ``cfg.folds`` folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    lesion_dx = _lesion_classes(df)
    if cfg.folds > len(lesion_dx):
        raise SplitError(f"split.folds={cfg.folds} is more than the {len(lesion_dx)} lesions in the data")
    test_lesions = _test_lesions(lesion_dx, cfg.test_fraction, cfg.seed)
    is_test = df["lesion_id"].isin(test_lesions).to_numpy()
    rest = df[~is_test]
    rest_lesions = rest["lesion_id"].nunique()
    if cfg.folds > rest_lesions:
        raise SplitError(f"split.folds={cfg.folds} is more than the {rest_lesions} lesions left after the test set")
    rare = _warn_rare_classes(lesion_dx[lesion_dx.index.isin(rest["lesion_id"])], cfg.folds)
    strata = rest["dx"].to_numpy()
    if rest["dx"].value_counts().max() < cfg.folds:
        # scikit-learn refuses to stratify when every class has fewer images than folds: the folds
        # stay lesion-grouped (the same greedy assignment, over one stratum).
        warnings.warn(f"every class has fewer images than folds ({cfg.folds}); the folds are lesion-grouped "
                      "but not stratified by class", stacklevel=2)
        strata = np.zeros(len(rest), dtype=np.int64)
    sgkf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    ids = rest["image_id"].to_numpy()
    folds = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")  # warned above, by name
        for train_idx, val_idx in sgkf.split(ids, strata, rest["lesion_id"].to_numpy()):
            folds.append({"train": sorted(ids[train_idx].tolist()), "val": sorted(ids[val_idx].tolist())})
    return {
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "n_images": int(len(df)),
        "data_sha256": data_fingerprint(df),
        "rare_classes": rare,
        "test": sorted(df.loc[is_test, "image_id"].tolist()),
        "folds": folds,
    }


def class_counts(split: dict, df: pd.DataFrame) -> list[dict]:
    """Per part (test, fold k train/val) the number of images of each class, for printing."""
    dx = dict(zip(df["image_id"], df["dx"]))
    parts = [("test", split["test"])]
    for k, fold in enumerate(split["folds"]):
        parts += [(f"fold{k} train", fold["train"]), (f"fold{k} val", fold["val"])]
    out = []
    for name, ids in parts:
        counts = pd.Series([dx[i] for i in ids]).value_counts()
        out.append({"part": name, "n": len(ids), **{c: int(counts.get(c, 0)) for c in CLASSES}})
    return out


def format_class_counts(rows: list[dict]) -> str:
    header = f"{'part':<13}{'n':>6}" + "".join(f"{c:>7}" for c in CLASSES)
    lines = [header] + [f"{r['part']:<13}{r['n']:>6}" + "".join(f"{r[c]:>7}" for c in CLASSES) for r in rows]
    return "\n".join(lines)


def save_split(split: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def load_split(path: str | Path) -> dict:
    """A saved split, checked for the shape every reader relies on; SplitError names a damaged file.
    The split is a pure function of the metadata and ``split.*``: deleting a damaged file lets the
    next launch or training task make the same split again."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SplitError(f"{path}: not a split file ({e}); {_REMAKE_HINT}") from None
    problem = _split_shape_problem(split)
    if problem:
        raise SplitError(f"{path}: not a split file ({problem}); {_REMAKE_HINT}")
    return split


_REMAKE_HINT = ("delete it and run the command again: the split is made anew from the metadata and the split.* "
                "settings (the same split, if the data are unchanged)")


def _split_shape_problem(split: object) -> str:
    """What a parsed split.json lacks ("" when it has every part make_split writes)."""
    if not isinstance(split, dict):
        return f"a JSON {type(split).__name__}, not an object"
    if not isinstance(split.get("test"), list) or not isinstance(split.get("folds"), list) or not split["folds"]:
        return "no 'test' list or 'folds' list"
    for k, part in enumerate(split["folds"]):
        if not (isinstance(part, dict) and isinstance(part.get("train"), list) and isinstance(part.get("val"), list)):
            return f"fold {k} has no 'train' and 'val' lists"
    if not isinstance(split.get("config"), dict):
        return "no 'config' object"
    return ""


def ensure_split(run_dir: str | Path, df: pd.DataFrame, cfg: SplitConfig, remake: bool = False) -> dict:
    """The run's split: computed and saved once in ``RUN/split.json``, then always read back.

    A different split config or different images on the same run directory is refused: results of
    two splits must never be mixed in one experiment. With ``remake`` (no task of the run has
    started yet) such a split is made anew instead.
    """
    path = Path(run_dir) / SPLIT_NAME
    if path.is_file() and remake:
        try:
            return ensure_split(run_dir, df, cfg)
        except SplitError as e:
            print(f"note: no task of the run has started: its split is made anew ({str(e).removesuffix('; ' + _REMAKE_HINT)})",
                  flush=True)
    elif path.is_file():
        split = load_split(path)
        saved = split.get("config", {})
        wanted = dataclasses.asdict(cfg)
        changed = [f"split.{k}: {saved.get(k)!r} (saved) vs {v!r} (now)" for k, v in wanted.items() if saved.get(k) != v]
        if changed:
            raise SplitError(f"{path} was made with another split config ({'; '.join(changed)}); "
                             "use a new run_dir for a new split, or the saved settings to continue")
        if split.get("n_images") != len(df):
            raise SplitError(f"{path} covers {split.get('n_images')} images but the data has {len(df)}: "
                             "the data changed since the split was made; use a new run_dir")
        fingerprint = data_fingerprint(df)
        if split.get("data_sha256", fingerprint) != fingerprint:  # absent: an older split
            raise SplitError(f"{path} was made from other data (image ids, lesion ids or classes differ, same "
                             f"number of images): the data changed since the split was made; use a new run_dir")
        return split
    split = make_split(df, cfg)
    save_split(split, path)
    return split


def fold_rows(split: dict, df: pd.DataFrame, fold: int) -> FoldRows:
    """Beton rows of ``fold``: ``df`` must have a ``row`` column (index.csv) or rows = positions."""
    if not 0 <= fold < len(split["folds"]):
        raise SplitError(f"fold {fold} does not exist: the split has folds 0..{len(split['folds']) - 1}")
    rows = df["row"].to_numpy() if "row" in df.columns else np.arange(len(df))
    row_of = dict(zip(df["image_id"], rows.astype(np.int64)))

    def to_rows(ids: list[str]) -> np.ndarray:
        unknown = [i for i in ids if i not in row_of]
        if unknown:
            raise SplitError(f"the split has {len(unknown)} image(s) that the data lacks ({', '.join(unknown[:5])}"
                             f"{', ...' if len(unknown) > 5 else ''}): it was made from other data")
        return np.sort(np.fromiter((row_of[i] for i in ids), dtype=np.int64, count=len(ids)))

    part = split["folds"][fold]
    return FoldRows(train=to_rows(part["train"]), val=to_rows(part["val"]), test=to_rows(split["test"]))
