"""Conversion: raw JPEG folders + metadata CSV → ham10000.beton, index.csv, manifest.json (real FFCV)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skinhpc
from skinhpc import CLASSES
from skinhpc.config import DataConfig
from skinhpc.convert import (BETON_NAME, INDEX_NAME, MANIFEST_NAME, InputError, convert, ensure_converted,
                             detail_lost_note, is_up_to_date, prepare_image, read_index, read_manifest,
                             stored_size_for)

PER_CLASS = 6  # 6 images of each of the 7 classes: 42, every label present, fast


def _sample_rows() -> tuple[list[str], list[list[str]]]:
    with open(skinhpc.SAMPLE_METADATA, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    dx = header.index("dx")
    picked = []
    for name in CLASSES:
        picked += [r for r in body if r[dx] == name][:PER_CLASS]
    picked.sort(key=lambda r: r[header.index("image_id")])  # CSV order is not class order
    return header, picked


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_raw(tmp_path: Path, two_folders: bool = False) -> tuple[list[Path], Path, list[str]]:
    """A copy of ~40 sample images (in one folder, or split like the official download) + their CSV."""
    header, rows = _sample_rows()
    dirs = [tmp_path / "HAM10000_images_part_1"] + ([tmp_path / "HAM10000_images_part_2"] if two_folders else [])
    for d in dirs:
        d.mkdir(parents=True)
    ids = [r[header.index("image_id")] for r in rows]
    for i, image_id in enumerate(ids):
        shutil.copy(skinhpc.SAMPLE_IMAGES / f"{image_id}.jpg", dirs[i % len(dirs)] / f"{image_id}.jpg")
    return dirs, _write_csv(tmp_path / "HAM10000_metadata.csv", header, rows), ids


def _edit_csv(csv_path: Path, edit) -> None:
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    _write_csv(csv_path, rows[0], rows[1:])


def _find(dirs: list[Path], image_id: str) -> Path:
    return next(d / f"{image_id}.jpg" for d in dirs if (d / f"{image_id}.jpg").exists())


def _decode_beton(beton: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sample in file order through FFCV's deterministic decoder: images (N,H,W,3), labels, rows."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(beton), batch_size=16, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "row": [IntDecoder()]})
    images, labels, rows = [], [], []
    for image, label, row in loader:
        images.append(np.array(image))
        labels.append(np.array(label).reshape(-1))
        rows.append(np.array(row).reshape(-1))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(rows)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- round trip


@pytest.mark.timeout(240)
def test_round_trip_labels_and_pixels_match_the_prepared_sources(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path, two_folders=True)
    # Three sources of another size: stored at the common size anyway, and counted.
    for image_id in ids[:3]:
        path = _find(dirs, image_id)
        Image.open(path).resize((300, 240)).save(path, quality=95)
    out = tmp_path / "data"

    result = convert(dirs, csv_path, out, max_resolution=128, workers=2)

    assert result.status == "converted" and result.n_images == len(ids)
    assert result.stored_size == [96, 128]  # the common 200x150, long side scaled to 128
    assert result.n_resized == 3 and result.images_per_s > 0
    assert result.counts == {name: PER_CLASS for name in CLASSES}
    index = read_index(out)
    assert list(index.columns) == ["row", "image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex",
                                   "localization"]
    assert index["image_id"].tolist() == ids and index["row"].tolist() == list(range(len(ids)))
    assert [CLASSES[label] for label in index["label"]] == index["dx"].tolist()

    images, labels, rows = _decode_beton(out / BETON_NAME)
    assert rows.tolist() == list(range(len(ids)))
    assert labels.tolist() == index["label"].tolist()
    expected = np.stack([prepare_image(_find(dirs, image_id), result.stored_size) for image_id in ids])
    assert images.shape == expected.shape == (len(ids), 96, 128, 3)
    for row, image_id in enumerate(ids):
        error = np.abs(images[row].astype(int) - expected.astype(int)).mean(axis=(1, 2, 3))
        # JPEG q90 of small detailed images: a few levels off on average; any other image: tens.
        assert error[row] < 6.0, f"row {row} ({image_id}): JPEG round trip off by {error[row]:.2f} on average"
        assert error[row] < 0.5 * np.delete(error, row).min(), f"row {row} looks more like another image"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("write_mode", ["raw", "proportion"])
def test_raw_samples_store_exactly_the_prepared_pixels(tmp_path: Path, write_mode: str) -> None:
    dirs, csv_path, ids = make_raw(tmp_path)
    odd = _find(dirs, ids[5])
    Image.open(odd).resize((180, 180)).save(odd, quality=95)  # another size and shape: resized exactly

    result = convert(dirs, csv_path, tmp_path / "data", write_mode=write_mode, workers=2)

    assert result.stored_size == [150, 200] and result.n_resized == 1  # 200x150 sources are never upscaled
    images, _, _ = _decode_beton(tmp_path / "data" / BETON_NAME)
    exact = [np.array_equal(images[row], prepare_image(_find(dirs, image_id), [150, 200]))
             for row, image_id in enumerate(ids)]
    if write_mode == "raw":
        assert all(exact)
    else:  # about half stored raw (exact), the rest as JPEG
        assert 0.2 < np.mean(exact) < 0.8


def test_stored_size_is_the_most_common_source_size_scaled_down_never_up() -> None:
    from collections import Counter

    assert stored_size_for(Counter({(600, 450): 5, (300, 200): 7}), 256) == [171, 256]
    assert stored_size_for(Counter({(600, 450): 9, (300, 200): 7}), 256) == [192, 256]
    assert stored_size_for(Counter({(200, 150): 1}), 256) == [150, 200]


def test_a_note_says_when_max_resolution_made_the_evaluation_square_smaller_than_the_input() -> None:
    originals = {"source_sizes": {"600x450": 10015}}
    old_default = {**originals, "stored_size": [192, 256], "ffcv": {"max_resolution": 256}}
    note = detail_lost_note(old_default, 224)
    assert "stored at 256x192 px" in note and "upscaled from 192 px" in note
    assert "data.max_resolution=299" in note  # 299 x 3/4 -> a 224 px short side
    assert detail_lost_note({**originals, "stored_size": [240, 320]}, 224) == ""  # today's default
    # Sources no larger than what is stored: a higher max_resolution would not help, so no note.
    assert detail_lost_note({"source_sizes": {"200x150": 8514}, "stored_size": [150, 200]}, 192) == ""
    # No larger setting than the sources themselves is proposed.
    small = {"source_sizes": {"300x225": 5}, "stored_size": [96, 128], "ffcv": {"max_resolution": 128}}
    assert "data.max_resolution=300" in detail_lost_note(small, 256)


def test_a_picture_stored_sideways_with_an_exif_orientation_is_read_upright(tmp_path: Path) -> None:
    from PIL import Image

    from skinhpc.convert import EXIF_ORIENTATION, _decode

    rng = np.random.default_rng(0)
    upright = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8), 5, 0), 5, 1))
    assert upright.size == (60, 45)
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "turn 90 degrees clockwise to view": the pixels are stored turned back
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    assert _decode(tmp_path / "sideways.png") == (None, (60, 45))  # the size conversion plans with
    got, want = (prepare_image(tmp_path / name, [45, 60]) for name in ("sideways.png", "upright.png"))
    assert np.array_equal(got, want)


def test_prepare_image_gives_rgb_uint8_of_the_stored_size_from_any_mode(tmp_path: Path) -> None:
    for mode in ("L", "RGBA", "P"):
        image = Image.new(mode, (40, 30))
        array = prepare_image(image, [15, 20])
        assert array.shape == (15, 20, 3) and array.dtype == np.uint8
    path = tmp_path / "x.png"
    Image.new("RGB", (20, 15), (10, 200, 30)).save(path)
    assert prepare_image(path, [15, 20])[7, 9].tolist() == [10, 200, 30]


# --------------------------------------------------------------------------- bad input


def _drop_column(name):
    def edit(rows):
        i = rows[0].index(name)
        return [r[:i] + r[i + 1:] for r in rows]
    return edit


def _set_cell(line: int, column: str, value: str):
    def edit(rows):
        rows[line - 1][rows[0].index(column)] = value
        return rows
    return edit


def _copy_id(line: int, from_line: int, column: str = "image_id"):
    def edit(rows):
        i = rows[0].index(column)
        rows[line - 1][i] = rows[from_line - 1][i]
        return rows
    return edit


@pytest.mark.timeout(60)
@pytest.mark.parametrize("edit, expected", [
    (_drop_column("dx"), [":1:", "missing column(s) dx"]),
    (_set_cell(4, "dx", "melanoma"), [":4:", "unknown dx 'melanoma'", "akiec"]),
    (_copy_id(6, 2), [":6:", "duplicates line 2"]),
    (_set_cell(9, "lesion_id", ""), [":9:", "empty lesion_id"]),
    (_copy_id(3, 2, "lesion_id"), [":3:", "lesion 'HAM_0003577' has dx 'bcc' here but 'nv' at line 2"]),
    (lambda rows: [rows[0] + ["dx"]] + [r + [r[rows[0].index("dx")]] for r in rows[1:]],
     [":1:", "column(s) dx appear more than once"]),
], ids=["missing-column", "unknown-dx", "duplicate-image-id", "empty-lesion-id", "lesion-with-two-dx",
        "column-twice"])
def test_bad_csv_is_reported_with_file_and_line_and_nothing_is_written(tmp_path: Path, edit, expected) -> None:
    dirs, csv_path, _ = make_raw(tmp_path)
    _edit_csv(csv_path, edit)
    out = tmp_path / "data"
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, out, workers=2)
    message = str(info.value)
    assert str(csv_path) in message
    for part in expected:
        assert part in message
    assert not out.exists()


def _plain_csv(path: Path, n_rows: int, edit) -> Path:
    """A metadata CSV of n_rows nv rows (row i on line i + 2), ``edit``ed as a list of lines."""
    rows = [f"HAM_{i:07d},ISIC_{i:07d},nv,histo,40.0,male,back\n" for i in range(n_rows)]
    path.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + "".join(edit(rows)))
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_rows", [4000, 30], ids=["rest-over-csv-field-limit", "rest-under-it"])
def test_an_unmatched_quote_is_reported_at_its_line(tmp_path: Path, n_rows: int) -> None:
    from skinhpc.convert import read_metadata_rows

    def quote_line_4(rows):  # its quote swallows the rest of the file
        rows[2] = rows[2].replace(",histo", ',"histo')
        return rows
    path = _plain_csv(tmp_path / "meta.csv", n_rows, quote_line_4)
    with pytest.raises(InputError, match=rf"{path}:4: .*unmatched double quote"):
        read_metadata_rows(path)


@pytest.mark.timeout(60)
def test_two_stray_quotes_that_join_lines_into_one_record_are_refused_naming_the_lines(tmp_path: Path) -> None:
    # The lenient reader closes the first quote at the second, and the joined record can even have
    # the header's number of fields: the lines between would vanish without a word.
    from skinhpc.convert import read_metadata_rows

    def quote_lines_4_and_11(rows):
        rows[2], rows[9] = '"' + rows[2], '"' + rows[9]
        return rows
    path = _plain_csv(tmp_path / "meta.csv", 12, quote_lines_4_and_11)
    with pytest.raises(InputError, match=rf"{path}:4: a quoted field runs over the next 7 line\(s\), to line 11"):
        read_metadata_rows(path)


@pytest.mark.timeout(120)
def test_ids_that_pandas_would_read_as_missing_stay_ids_in_the_index(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path)
    _edit_csv(csv_path, _set_cell(2, "lesion_id", "NA"))
    _edit_csv(csv_path, _set_cell(3, "lesion_id", "null"))
    convert(dirs, csv_path, tmp_path / "data", workers=2)
    index = read_index(tmp_path / "data")
    assert list(index["lesion_id"][:2]) == ["NA", "null"] and index["lesion_id"].notna().all()


@pytest.mark.timeout(60)
def test_an_image_folder_that_cannot_be_listed_is_named_as_such(tmp_path: Path, monkeypatch) -> None:
    dirs, csv_path, _ = make_raw(tmp_path)
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == dirs[0]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=rf"{dirs[0]}: cannot list the image folder \(Permission denied\)"):
        convert(dirs, csv_path, tmp_path / "data", workers=2)
    assert not (tmp_path / "data").exists()


@pytest.mark.timeout(60)
def test_an_image_whose_size_cannot_be_read_is_named_not_the_output_folder(tmp_path: Path, monkeypatch) -> None:
    # A folder that can be listed but not entered (mode r without x) lists its images, whose
    # stat then fails: it was reported as "cannot write the conversion there".
    dirs, csv_path, ids = make_raw(tmp_path)
    real_stat, denied = Path.stat, dirs[0] / f"{ids[0]}.jpg"

    def stat(self, *args, **kwargs):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)
    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(InputError, match=rf"{denied}: cannot read the image file's size \(Permission denied\)"):
        convert(dirs, csv_path, tmp_path / "data", workers=2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("encoding, line", [("latin-1", 14), ("utf-16", 1)])
def test_a_csv_that_is_not_utf8_is_named_with_its_line_and_asked_for_in_utf8(tmp_path: Path, encoding: str,
                                                                            line: int) -> None:
    from skinhpc.convert import read_metadata_rows
    text = skinhpc.SAMPLE_METADATA.read_text(encoding="utf-8").splitlines(keepends=True)
    text[13] = text[13].rstrip("\n").rsplit(",", 1)[0] + ",tête\n"  # line 14: a non-ASCII localization
    path = tmp_path / "meta.csv"
    path.write_bytes("".join(text).encode(encoding))
    with pytest.raises(InputError, match=rf"{path}:{line}: not UTF-8 .*must be UTF-8: re-save it as UTF-8"):
        read_metadata_rows(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sep, said", [(";", "';'"), ("\t", "a tab")], ids=["semicolon", "tab"])
def test_a_csv_with_another_separator_is_told_to_be_comma_separated(tmp_path: Path, sep: str, said: str) -> None:
    from skinhpc.convert import read_metadata_rows
    path = tmp_path / "meta.csv"
    path.write_text(skinhpc.SAMPLE_METADATA.read_text().replace(",", sep))  # as a comma-decimal locale saves it
    with pytest.raises(InputError, match=rf"{path}:1: missing column.*seems to use {said} as separator: "
                                         "it must be comma-separated"):
        read_metadata_rows(path)


@pytest.mark.timeout(60)
def test_missing_image_names_the_file_the_csv_line_and_the_folders(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path, two_folders=True)
    _find(dirs, ids[10]).unlink()
    out = tmp_path / "data"
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, out, workers=2)
    message = str(info.value)
    assert f"{csv_path}:12:" in message and f"{ids[10]}.jpg not found" in message
    assert all(str(d) in message for d in dirs)
    assert not out.exists()


@pytest.mark.timeout(120)
def test_a_csv_with_only_lesion_image_and_dx_columns_converts_with_the_others_left_empty(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path)
    for column in ("dx_type", "age", "sex", "localization"):
        _edit_csv(csv_path, _drop_column(column))
    convert(dirs, csv_path, tmp_path / "data", workers=2)
    index = read_index(tmp_path / "data")
    assert list(index["image_id"]) == ids and index["sex"].isna().all()


@pytest.mark.timeout(60)
def test_an_image_id_written_with_its_suffix_is_told_to_drop_it(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path)
    _edit_csv(csv_path, _set_cell(4, "image_id", f"{ids[2]}.jpg"))
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, tmp_path / "data", workers=2)
    assert (f"{csv_path}:4: image_id {ids[2]}.jpg ends with its file's suffix; write it without "
            f"(image_id {ids[2]}, as in HAM10000's CSV)") in str(info.value)
    assert ".jpg.jpg" not in str(info.value)
    _find(dirs, ids[2]).unlink()  # no file of that name either: no advice to drop the suffix
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, tmp_path / "data", workers=2)
    assert f"{csv_path}:4: image {ids[2]}.jpg not found in" in str(info.value)


@pytest.mark.timeout(120)
def test_missing_and_corrupt_images_are_reported_in_one_run_each_with_its_row(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path)
    _find(dirs, ids[10]).unlink()
    corrupt = _find(dirs, ids[20])
    corrupt.write_bytes(b"not a jpeg")
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, tmp_path / "data", workers=2)
    message = str(info.value)
    assert f"{csv_path}:12: image {ids[10]}.jpg not found" in message
    assert f"{corrupt}: unreadable or corrupt image" in message and f"[{csv_path}:22]" in message
    assert not (tmp_path / "data").exists()


@pytest.mark.timeout(120)
def test_images_are_found_whatever_the_case_of_their_suffix(tmp_path: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path, two_folders=True)
    for image_id in ids[:3]:
        path = _find(dirs, image_id)
        path.rename(path.with_suffix(".JPG" if image_id != ids[2] else ".jpeg"))
    result = convert(dirs, csv_path, tmp_path / "data", workers=2)
    assert result.n_images == len(ids) and not result.warnings
    assert read_index(tmp_path / "data")["image_id"].tolist() == ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_jpeg_is_found_by_decoding_and_reported_with_its_row(tmp_path: Path, damage: str) -> None:
    dirs, csv_path, ids = make_raw(tmp_path)
    bad = _find(dirs, ids[7])
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2],
                     "garbage": np.random.default_rng(0).bytes(len(data)),
                     "empty": b""}[damage])
    out = tmp_path / "data"
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, out, workers=2)
    message = str(info.value)
    assert str(bad) in message and f"{csv_path}:9" in message and "corrupt" in message
    assert not out.exists()


@pytest.mark.timeout(60)
def test_many_problems_list_the_first_20_and_count_the_rest(tmp_path: Path) -> None:
    dirs, csv_path, _ = make_raw(tmp_path)

    def edit(rows):
        for row in rows[1:26]:
            row[rows[0].index("dx")] = "??"
        return rows
    _edit_csv(csv_path, edit)
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, tmp_path / "data", workers=2)
    message = str(info.value)
    assert message.startswith("25 input problems:")
    assert f"{csv_path}:21:" in message and f"{csv_path}:22:" not in message
    assert message.endswith("... and 5 more")


@pytest.mark.timeout(60)
def test_missing_metadata_file_and_image_folder_are_reported(tmp_path: Path) -> None:
    dirs, csv_path, _ = make_raw(tmp_path)
    with pytest.raises(InputError, match="metadata CSV not found"):
        convert(dirs, tmp_path / "nope.csv", tmp_path / "data")
    with pytest.raises(InputError, match="nowhere: image folder not found"):
        convert([tmp_path / "nowhere"], csv_path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- re-runs and atomicity


def converted_raw(tmp_path: Path) -> tuple[list[Path], Path, list[str], Path, dict[str, bytes]]:
    """make_raw's data converted into tmp_path/data: (dirs, csv, ids, out, its files' bytes)."""
    dirs, csv_path, ids = make_raw(tmp_path)
    out = tmp_path / "data"
    convert(dirs, csv_path, out, workers=2)
    return dirs, csv_path, ids, out, _files(out)


@pytest.mark.timeout(240)
def test_an_image_of_another_shape_is_converted_with_a_warning_naming_it_and_its_row(tmp_path: Path, capsys) -> None:
    from PIL import Image
    dirs, csv_path, ids = make_raw(tmp_path)
    portrait = _find(dirs, ids[5])
    with Image.open(portrait) as image:
        image.transpose(Image.Transpose.ROTATE_90).save(portrait)  # 150x200: a phone photo held upright
    result = convert(dirs, csv_path, tmp_path / "data", workers=2)
    (warning,) = [w for w in result.warnings if "stretched" in w]
    assert warning.startswith("1 image(s) have another shape than the usual 200x150 and are stretched to it")
    assert f"{portrait} (150x200) [{csv_path}:7]" in warning  # line 7: the header, then the 6th row
    assert "stretched" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_rerun_is_a_no_op_and_a_failed_rerun_keeps_the_good_output(tmp_path: Path, capsys) -> None:
    dirs, csv_path, ids, out, good = converted_raw(tmp_path)
    manifest = read_manifest(out)
    assert set(good) == {BETON_NAME, INDEX_NAME, MANIFEST_NAME}
    assert manifest["n_images"] == len(ids) and manifest["stored_size"] == [150, 200]
    assert manifest["ffcv"]["write_mode"] == "jpg" and manifest["ffcv"]["page_size"] == 2 << 20
    capsys.readouterr()

    (out / f".{BETON_NAME}.tmp-99999").write_bytes(b"half")  # left by a conversion killed with -9
    again = convert(dirs, csv_path, out, workers=2)
    assert again.status == "up-to-date"
    assert "up to date" in capsys.readouterr().out
    assert _files(out) == good and not list(out.glob(".*tmp*"))
    assert is_up_to_date(dirs, csv_path, out)
    assert not is_up_to_date(dirs, csv_path, out, jpeg_quality=80)  # other settings: not this conversion

    bad = _find(dirs, ids[3])
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(InputError, match="corrupt"):
        convert(dirs, csv_path, out, workers=2)
    assert _files(out) == good  # no temp file left, the earlier conversion untouched


@pytest.mark.timeout(240)
def test_a_conversion_whose_images_were_deleted_since_is_used_as_it_is(tmp_path: Path, capsys) -> None:
    dirs, csv_path, ids, out, good = converted_raw(tmp_path)
    for d in dirs:
        shutil.rmtree(d)  # the raw download, deleted once converted
    capsys.readouterr()
    assert is_up_to_date(dirs, csv_path, out)  # a relaunch plans no conversion
    again = convert(dirs, csv_path, out, workers=2)  # what a requeued training job runs
    assert again.status == "up-to-date" and _files(out) == good
    assert "image folder(s) not found" in capsys.readouterr().err
    assert not is_up_to_date(dirs, csv_path, out, jpeg_quality=80)  # other settings would need the images
    csv_path.write_text(csv_path.read_text().replace(ids[0], ids[0] + "x"))  # another metadata CSV
    assert not is_up_to_date(dirs, csv_path, out)
    with pytest.raises(InputError, match="image folder not found"):
        convert(dirs, csv_path, out, workers=2)
    assert _files(out) == good


@pytest.mark.timeout(240)
def test_a_download_copied_without_its_mtimes_is_compared_by_bytes_once_and_not_converted_again(
        tmp_path: Path, capsys) -> None:
    dirs, csv_path, ids, out, good = converted_raw(tmp_path)
    copy = tmp_path / "copy"
    for d in dirs:
        shutil.copytree(d, copy / d.name, copy_function=shutil.copyfile)  # cp -r, scp: new mtimes
    copied, copied_csv = [copy / d.name for d in dirs], Path(shutil.copyfile(csv_path, copy / csv_path.name))
    capsys.readouterr()
    assert is_up_to_date(copied, copied_csv, out)
    assert "same names and bytes (a copy)" in capsys.readouterr().out
    assert len(read_manifest(out)["images"]["copies_sha256"]) == 1
    assert {k: v for k, v in _files(out).items() if k != MANIFEST_NAME} == {k: v for k, v in good.items()
                                                                          if k != MANIFEST_NAME}
    assert convert(copied, copied_csv, out, workers=2).status == "up-to-date"
    assert is_up_to_date(dirs, csv_path, out)  # and the original, by turns
    assert "a copy" not in capsys.readouterr().out  # both mtime hashes are recorded now: no bytes read

    image = _find(copied, ids[4])
    flipped = bytearray(image.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # other bytes, same name and size
    image.write_bytes(bytes(flipped))
    assert not is_up_to_date(copied, copied_csv, out)
    # What the launcher's plan says of a conversion it submits.
    from skinhpc.convert import stale_reason
    assert stale_reason(copied, copied_csv, out) == ("made from other images (the same names and sizes, other "
                                                     "bytes), or its files are damaged")
    image.write_bytes(bytes(flipped[:100]))
    assert stale_reason(copied, copied_csv, out) == "made from other images (names or sizes differ)"
    assert stale_reason(dirs, csv_path, out, jpeg_quality=80) == "made with other settings (jpeg_quality 90 -> 80)"
    _edit_csv(copied_csv, lambda rows: rows[:-1])
    assert stale_reason(copied, copied_csv, out) == f"made from another metadata CSV than {copied_csv}"
    assert stale_reason(dirs, csv_path, tmp_path / "nowhere") == "no conversion yet"


@pytest.mark.timeout(240)
def test_an_image_changed_while_the_beton_is_written_is_not_taken_for_a_copy_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import skinhpc.convert as convert_mod
    dirs, csv_path, ids = make_raw(tmp_path)
    image, write_beton = _find(dirs, ids[2]), convert_mod._beton_if_ffcv

    def rewritten_meanwhile(*args, **kwargs):  # e.g. an rsync in place: same name and size, other bytes
        flipped = bytearray(image.read_bytes())
        flipped[len(flipped) // 2] ^= 0xFF
        image.write_bytes(bytes(flipped))
        return write_beton(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "_beton_if_ffcv", rewritten_meanwhile)
    convert(dirs, csv_path, tmp_path / "data", workers=2)
    assert not is_up_to_date(dirs, csv_path, tmp_path / "data")


@pytest.mark.timeout(240)
def test_a_copy_is_recorded_on_a_filesystem_without_locks_and_compared_at_each_check_in_a_read_only_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import errno
    import fcntl

    import skinhpc.convert as convert_mod
    dirs, csv_path, ids, out, good = converted_raw(tmp_path)
    copies = []
    for name in ("copy1", "copy2"):
        for d in dirs:
            shutil.copytree(d, tmp_path / name / d.name, copy_function=shutil.copyfile)
        copies.append([tmp_path / name / d.name for d in dirs])

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    capsys.readouterr()
    assert is_up_to_date(copies[0], csv_path, out) and "(a copy)" in capsys.readouterr().out
    assert len(read_manifest(out)["images"]["copies_sha256"]) == 1  # written all the same

    def read_only(path, text):  # chmod would not stop root, who runs CI
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(convert_mod, "atomic_write_text", read_only)
    for _ in range(2):
        assert is_up_to_date(copies[1], csv_path, out) and "(a copy)" in capsys.readouterr().out
    assert len(read_manifest(out)["images"]["copies_sha256"]) == 1


@pytest.mark.timeout(240)
def test_image_failing_inside_the_ffcv_writer_stops_it_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """A file that breaks between the check and the write must not hang FFCV's writer."""
    import skinhpc.convert as conversion

    dirs, csv_path, ids = make_raw(tmp_path)
    victim = _find(dirs, ids[20])
    checked = conversion._check_images

    def check_then_break_one(plan, workers):
        sizes = checked(plan, workers)
        victim.write_bytes(b"not a jpeg any more")
        return sizes

    monkeypatch.setattr(conversion, "_check_images", check_then_break_one)
    out = tmp_path / "data"
    with pytest.raises(InputError) as info:
        convert(dirs, csv_path, out, workers=2)
    assert str(victim) in str(info.value) and f"[{csv_path}:22]" in str(info.value)  # the file and its row
    assert not out.exists()


@pytest.mark.timeout(240)
def test_a_broken_ffcv_install_converts_without_the_beton_as_a_missing_one(tmp_path: Path, repo_dir: Path) -> None:
    dirs, csv_path, _ = make_raw(tmp_path)
    fake = tmp_path / "site" / "ffcv"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libturbojpeg.so.0: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{repo_dir}"}
    out = tmp_path / "data"
    cmd = [sys.executable, str(repo_dir / "jobs" / "convert.py"), "--images", *map(str, dirs),
           "--metadata", str(csv_path), "--out", str(out), "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FFCV cannot be imported (ImportError: libturbojpeg" in proc.stderr
    assert read_manifest(out)["beton"] is None and not (out / BETON_NAME).exists() and (out / INDEX_NAME).is_file()


@pytest.mark.timeout(240)
def test_cli_converts_the_two_folder_layout_and_warns_about_unlisted_images(tmp_path: Path, repo_dir: Path) -> None:
    dirs, csv_path, ids = make_raw(tmp_path, two_folders=True)
    shutil.copy(_find(dirs, ids[0]), dirs[1] / "ISIC_9999999.jpg")  # in a folder, not in the CSV
    out = tmp_path / "data"
    cmd = [sys.executable, str(repo_dir / "jobs" / "convert.py"), "--images", *map(str, dirs),
           "--metadata", str(csv_path), "--out", str(out), "--workers", "2", "--max-resolution", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr
    assert "warning: 1 image(s)" in proc.stderr and "ISIC_9999999.jpg" in proc.stderr
    assert f"converted {len(ids)} images to 100x75 px" in proc.stdout
    assert read_index(out)["image_id"].tolist() == ids
    assert read_manifest(out)["stored_size"] == [75, 100]


@pytest.mark.timeout(60)
def test_cli_bad_input_exits_non_zero_with_a_clean_message(tmp_path: Path, repo_dir: Path) -> None:
    dirs, csv_path, _ = make_raw(tmp_path)
    _edit_csv(csv_path, _set_cell(3, "dx", "nevus"))
    cmd = [sys.executable, str(repo_dir / "jobs" / "convert.py"), "--images", *map(str, dirs),
           "--metadata", str(csv_path), "--out", str(tmp_path / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2  # an input error, as in every job
    assert proc.stderr.startswith(f"error: {csv_path}:3: image_id")
    assert "unknown dx 'nevus'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()
    _edit_csv(csv_path, _set_cell(3, "dx", "nv"))
    (tmp_path / "afile").write_text("mine")
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "afile")], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and "afile: exists and is not a folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "afile").read_text() == "mine"


# --------------------------------------------------------------------------- the session's converted sample


@pytest.mark.timeout(120)
def test_sample_conversion_has_every_row_and_is_what_ensure_converted_expects(sample_data_dir: Path,
                                                                              capsys) -> None:
    index = read_index(sample_data_dir)
    manifest = read_manifest(sample_data_dir)
    assert len(index) == manifest["n_images"] == 426
    assert index["row"].tolist() == list(range(426))
    assert manifest["stored_size"] == [150, 200]
    assert manifest["counts"] == {name: int((index["dx"] == name).sum()) for name in CLASSES}

    assert ensure_converted(DataConfig(), sample_data_dir) == []
    out = capsys.readouterr().out
    assert "bundled HAM10000 sample" in out and "up to date" in out


@pytest.mark.timeout(30)
def test_ensure_converted_refuses_a_data_dir_without_a_conversion(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no converted data"):
        ensure_converted(DataConfig(dir=str(tmp_path)), tmp_path)


@pytest.mark.timeout(60)
def test_a_data_dir_given_alone_whose_beton_was_changed_or_cut_short_is_refused_naming_it(tmp_path: Path,
                                                                               sample_data_dir: Path) -> None:
    import shutil
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    assert ensure_converted(DataConfig(dir=str(data)), data) == []  # intact: used as it is
    beton = data / "ham10000.beton"
    with open(beton, "r+b") as f:  # bytes changed in place, the size kept (a bad disk or copy)
        f.seek(beton.stat().st_size // 2)
        f.write(bytes(4096))
    with pytest.raises(InputError, match=rf"{data} holds no usable conversion \({beton} has other bytes than "
                                         r"manifest.json records .*convert again with jobs/convert.py"):
        ensure_converted(DataConfig(dir=str(data)), data)
    with open(beton, "r+b") as f:  # e.g. a copy cut short by a full disk
        f.truncate(100_000)
    with pytest.raises(InputError, match=rf"{data} holds no usable conversion \({beton} has "
                                         r"100000 bytes.*convert again with jobs/convert.py"):
        ensure_converted(DataConfig(dir=str(data)), data)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_conversion_stopped_while_writing_leaves_no_files(tmp_path: Path, repo_dir: Path, sig: int) -> None:
    """What scancel, a SLURM time limit or Ctrl-C do mid-write: the temp .beton must go too."""
    header, _ = _sample_rows()
    with open(skinhpc.SAMPLE_METADATA, newline="") as f:
        rows = list(csv.reader(f))[1:]
    folder = tmp_path / "images"
    folder.mkdir()
    many = []
    for copy in range(8):  # ~3,400 images: writing lasts seconds even on a fast machine
        for row in rows:
            image_id = f"{row[1]}_{copy}"
            (folder / f"{image_id}.jpg").symlink_to(skinhpc.SAMPLE_IMAGES / f"{row[1]}.jpg")
            many.append([row[0], image_id, *row[2:]])
    csv_path = _write_csv(tmp_path / "meta.csv", header, many)
    out = tmp_path / "data"
    cmd = [sys.executable, str(repo_dir / "jobs" / "convert.py"), "--images", str(folder), "--metadata",
           str(csv_path), "--out", str(out), "--workers", "2"]
    # Non-interactive shells start jobs with SIGINT ignored; a terminal's Ctrl-C is not ignored.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 150
    while not list(out.glob(".ham10000.beton.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the workers are running now
    assert proc.poll() is None, "finished before it could be stopped"
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=40)
    assert proc.returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130), output
    assert "Traceback" not in output
    time.sleep(1.5)  # the writer's group is killed at once; give the kernel a moment to reap it
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_input_error_survives_pickling_as_a_job_result_does() -> None:
    import pickle

    error = InputError([f"a.csv:{line}: bad" for line in range(2, 30)])
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.problems == error.problems


@pytest.mark.timeout(120)
def test_a_writer_worker_dying_of_a_full_disk_stops_the_conversion_at_once(tmp_path: Path) -> None:
    """A write past RLIMIT_FSIZE fails with EFBIG as one on a full disk fails with ENOSPC: FFCV's
    worker dies and its writer would wait for it forever; the conversion must end within seconds."""
    out = tmp_path / "out"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "import runpy\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, str(skinhpc.REPO_DIR / "jobs" / "convert.py"), "--images", str(skinhpc.SAMPLE_IMAGES),
                           "--metadata", str(skinhpc.SAMPLE_METADATA), "--out", str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1, proc.stderr
    assert "error: an FFCV writer worker died" in proc.stderr and "stopped the writer" in proc.stderr
    assert time.monotonic() - start < 60  # not the 300 s stall timeout
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]


@pytest.mark.timeout(30)
def test_only_a_writer_worker_that_failed_counts_as_dead_not_one_that_finished_its_share() -> None:
    """FFCV never joins its workers: one that finished cleanly stays a zombie until the end, and a
    slow final flush must not read as a crash."""
    from skinhpc.convert import _failed_children
    clean = os.fork()
    if clean == 0:
        os._exit(0)
    failed = os.fork()
    if failed == 0:
        os._exit(3)
    try:
        deadline = time.monotonic() + 10
        while _failed_children(os.getpid()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the clean one has surely ended too
        assert _failed_children(os.getpid()) == 1
    finally:
        os.waitpid(clean, 0)
        os.waitpid(failed, 0)
    assert _failed_children(os.getpid()) == 0


def test_an_image_gone_before_its_bytes_are_hashed_is_named(tmp_path: Path) -> None:
    from skinhpc.convert import _images_content_hash
    gone = tmp_path / "ISIC_0000001.jpg"
    with pytest.raises(InputError, match=rf"{gone}: cannot read the image file \(No such file or directory\)"):
        _images_content_hash([gone], 2)
