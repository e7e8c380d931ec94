"""Split invariants on the full 10,015-row HAM10000 metadata (shipped in tests/data)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinhpc import CLASSES, SAMPLE_METADATA
from skinhpc.config import ConfigError, SplitConfig
from skinhpc.split import SplitError, ensure_split, fold_rows, make_split, read_metadata

FULL_CSV = Path(__file__).parent / "data" / "HAM10000_metadata.full.csv"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full() -> pd.DataFrame:
    return read_metadata(FULL_CSV)


@pytest.fixture(scope="module")
def split5(full) -> dict:
    return make_split(full, SplitConfig(folds=5, test_fraction=0.15, seed=0))


def _lesions(df: pd.DataFrame, ids) -> set:
    return set(df.set_index("image_id").loc[list(ids), "lesion_id"])


def test_full_metadata_has_the_published_shape(full):
    assert len(full) == 10015 and full["lesion_id"].nunique() == 7470


def test_no_lesion_is_on_two_sides_of_any_split(full, split5):
    test_lesions = _lesions(full, split5["test"])
    for fold in split5["folds"]:
        train, val = _lesions(full, fold["train"]), _lesions(full, fold["val"])
        assert not train & val
        assert not (train | val) & test_lesions


def test_every_non_test_image_is_in_exactly_one_val_fold(full, split5):
    vals = [i for fold in split5["folds"] for i in fold["val"]]
    assert len(vals) == len(set(vals))
    assert set(vals) == set(full["image_id"]) - set(split5["test"])
    for fold in split5["folds"]:
        assert set(fold["train"]) | set(fold["val"]) == set(vals)


def test_test_fraction_and_class_proportions_are_close_to_the_whole(full, split5):
    assert abs(len(split5["test"]) / len(full) - 0.15) < 0.02
    whole = full["dx"].value_counts(normalize=True)
    dx = full.set_index("image_id")["dx"]
    parts = [split5["test"]] + [f["val"] for f in split5["folds"]]
    for ids in parts:
        share = dx.loc[ids].value_counts(normalize=True)
        for c in CLASSES:
            assert abs(share.get(c, 0) - whole[c]) < 0.02, (c, share.get(c, 0), whole[c])


def test_split_is_deterministic_for_a_seed_and_changes_with_it(full, split5):
    again = make_split(full, SplitConfig(folds=5, test_fraction=0.15, seed=0))
    assert again == split5
    other = make_split(full, SplitConfig(folds=5, test_fraction=0.15, seed=1))
    assert other["test"] != split5["test"]


def test_image_level_split_would_leak_but_lesion_split_does_not(full, split5):
    # the reason for grouping: random image-level folds share many lesions between sides
    rng = np.random.default_rng(0)
    ids = rng.permutation(full["image_id"].to_numpy())
    a, b = ids[: len(ids) // 5], ids[len(ids) // 5:]
    assert len(_lesions(full, a) & _lesions(full, b)) > 500


def test_rare_class_gets_a_warning_naming_it_not_a_crash():
    df = read_metadata(SAMPLE_METADATA)
    # keep only 3 lesions of df, so it has fewer lesions than folds
    df_lesions = sorted(df.loc[df["dx"] == "df", "lesion_id"].unique())[:3]
    small = df[(df["dx"] != "df") | df["lesion_id"].isin(df_lesions)]
    with pytest.warns(UserWarning, match=r"df \("):
        split = make_split(small, SplitConfig(folds=5, test_fraction=0.1))
    assert len(split["folds"]) == 5


def test_more_folds_than_any_class_has_images_still_gives_lesion_grouped_folds():
    df = read_metadata(SAMPLE_METADATA)
    small = df.groupby("dx").head(8)  # at most 8 images of each class; 10 folds
    with pytest.warns(UserWarning, match="not stratified"):
        split = make_split(small, SplitConfig(folds=10, test_fraction=0.1))
    lesion = dict(zip(small["image_id"], small["lesion_id"]))
    test = {lesion[i] for i in split["test"]}
    assert len(split["folds"]) == 10
    for fold in split["folds"]:
        train, val = {lesion[i] for i in fold["train"]}, {lesion[i] for i in fold["val"]}
        assert val and not (train & val) and not (val & test) and not (train & test)
    assert sorted(i for f in split["folds"] for i in f["val"]) == sorted(set(small["image_id"]) - set(split["test"]))


def test_bad_split_settings_give_clear_errors():
    df = read_metadata(SAMPLE_METADATA)
    with pytest.raises(ConfigError, match="at least 2"):
        SplitConfig(folds=1)
    for f in (0.0, 0.6, -0.1):
        with pytest.raises(ConfigError, match=r"\(0, 0.5\]"):
            SplitConfig(test_fraction=f)
    with pytest.raises(SplitError, match="more than the"):
        make_split(df, SplitConfig(folds=10_000))


def test_ensure_split_saves_once_and_refuses_another_config(tmp_path, full):
    cfg = SplitConfig(folds=3, seed=4)
    first = ensure_split(tmp_path, full, cfg)
    assert (tmp_path / "split.json").is_file()
    assert ensure_split(tmp_path, full, cfg) == first
    with pytest.raises(SplitError, match=r"split.folds: 3 \(saved\) vs 4"):
        ensure_split(tmp_path, full, SplitConfig(folds=4, seed=4))


def test_fold_rows_map_image_ids_to_beton_rows(full, split5):
    index = full.assign(row=np.arange(len(full)))
    rows = fold_rows(split5, index, 2)
    ids = index.set_index("row").loc[rows.val, "image_id"]
    assert set(ids) == set(split5["folds"][2]["val"])
    assert len(rows.train) + len(rows.val) + len(rows.test) == len(full)
    with pytest.raises(SplitError, match="fold 7 does not exist"):
        fold_rows(split5, index, 7)


def test_split_cli_writes_json_and_rejects_bad_metadata(tmp_path):
    out = tmp_path / "split.json"
    res = subprocess.run([sys.executable, "jobs/split.py", "--metadata", str(SAMPLE_METADATA), "--folds", "3",
                          "--out", str(out), "--seed", "2"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    split = json.loads(out.read_text())
    assert split["seed"] == 2 and len(split["folds"]) == 3 and split["test"]
    assert "fold2 val" in res.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,lesion_id,dx\nA,L1,nv\nB,L2,melanoma\n")
    res = subprocess.run([sys.executable, "jobs/split.py", "--metadata", str(bad), "--folds", "2",
                          "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "bad.csv:3: image_id 'B': unknown dx 'melanoma'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.json").exists()
    bad.write_text("image_id,lesion_id,dx\nA,L1,nv\nB,L2,nv,extra\n")  # pandas would raise a ParserError
    res = subprocess.run([sys.executable, "jobs/split.py", "--metadata", str(bad), "--folds", "2",
                          "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "bad.csv:3: 4 fields, the header has 3" in res.stderr
    assert "Traceback" not in res.stderr
    for args, said in ((["--seed", "-1"], "split.seed must be >= 0"),
                       (["--out", str(tmp_path / "bad.csv" / "x.json")], "cannot write")):  # under a file
        res = subprocess.run([sys.executable, "jobs/split.py", "--metadata", str(SAMPLE_METADATA), "--folds", "2",
                              "--out", str(tmp_path / "y.json"), *args], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_metadata_is_read_as_the_conversion_reads_it_so_stray_spaces_do_not_split_a_lesion(tmp_path):
    rows = [("I1", "L1", "nv"), ("I2", "L1", "nv"), ("I3", "L2", "mel")]
    messy = tmp_path / "messy.csv"
    messy.write_text("image_id, lesion_id ,dx\r\n" + "".join(f"{i} ,{lesion}{' ' * k}, {dx}\r\n"
                                                               for k, (i, lesion, dx) in enumerate(rows))
                     + ",,\r\n")
    df = read_metadata(messy)
    assert list(map(tuple, df[["image_id", "lesion_id", "dx"]].to_numpy())) == rows
    assert df["lesion_id"].nunique() == 2


def test_ensure_split_refuses_other_data_with_the_same_number_of_images(tmp_path, full):
    cfg = SplitConfig(folds=3)
    first, second = full.iloc[:300].reset_index(drop=True), full.iloc[300:600].reset_index(drop=True)
    split = ensure_split(tmp_path, first, cfg)
    with pytest.raises(SplitError, match="made from other data"):
        ensure_split(tmp_path, second, cfg)
    relabelled = first.assign(lesion_id=first["lesion_id"].where(first.index != 0, "HAM_new"))
    with pytest.raises(SplitError, match="made from other data"):
        ensure_split(tmp_path, relabelled, cfg)
    with pytest.raises(SplitError, match=r"the data lacks \("):
        fold_rows(split, second.assign(row=np.arange(300)), 0)


def test_a_lesion_whose_images_disagree_gets_the_same_class_whatever_the_row_order(full):
    # Conversion refuses such a lesion; a hand-made index can still hold one (one image each way).
    df = full.copy()
    two = df.groupby("lesion_id").filter(lambda g: len(g) == 2 and g["dx"].iloc[0] == "df")
    first_images = two.drop_duplicates("lesion_id")["image_id"]
    df.loc[df["image_id"].isin(first_images), "dx"] = "nv"
    assert make_split(df, SplitConfig(folds=5)) == make_split(df.iloc[::-1], SplitConfig(folds=5))


@pytest.mark.parametrize("damage", ['{"test": [], "folds": [{"train": [', '{"test": [], "seed": 7}', '[1, 2]',
                                    '{"test": [], "folds": [[1]], "config": {}}'])
def test_a_damaged_saved_split_is_refused_naming_the_file_and_deleting_it_makes_the_same_split(
        tmp_path, full, damage):
    cfg = SplitConfig(folds=3, seed=5)
    first = ensure_split(tmp_path, full, cfg)
    path = tmp_path / "split.json"
    path.write_text(damage)  # e.g. cut off by a full disk, or edited by hand
    with pytest.raises(SplitError, match=rf"{path}: not a split file \(.*\); delete it and run the command again"):
        ensure_split(tmp_path, full, cfg)
    path.unlink()
    assert ensure_split(tmp_path, full, cfg) == first
