"""Convert raw HAM10000 JPEG folders + metadata CSV into DATA/{ham10000.beton, index.csv, manifest.json}.

The trip: parse and check the CSV (columns, classes, unique ids, every image found) → decode every
image once, in parallel, to prove it readable and learn its size → pick one stored size for all (the
most common source size, scaled so its long side is <= max_resolution, never upscaled) → write the
.beton with FFCV in a *spawned* child process under a watchdog → rename into place, manifest last.

Why the child process: FFCV's DatasetWriter hangs forever when a sample raises inside one of its
workers, and it can deadlock when forked from a process in which FFCV loaders ran (numba's compile
lock). A fresh spawned process avoids the second; validating first plus the watchdog handles the first.
So ``convert()`` is safe to call from tests, the launcher or a training job.

Why one stored size: FFCV then decodes every sample with the deterministic ``SimpleRGBImageDecoder``
and all randomness happens later on the device with our own seeded generator (exact resume).
``prepare_image`` is that one resize; the PIL loader and predict reuse it.
"""

from __future__ import annotations

import csv
import datetime
import errno
import fcntl
import functools
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

import skinhpc
from skinhpc import CLASS_TO_LABEL, CLASSES
from skinhpc.config import MAX_RESOLUTION, DataConfig, atomic_write_text, available_cores, sha256_file

BETON_NAME = "ham10000.beton"
INDEX_NAME = "index.csv"
MANIFEST_NAME = "manifest.json"

REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
OPTIONAL_COLUMNS: tuple[str, ...] = ("dx_type", "age", "sex", "localization")
"""HAM10000's other columns: kept in index.csv when the CSV has them (empty otherwise); nothing
in training reads them, so a CSV of one's own needs only the three required ones."""
INDEX_COLUMNS: tuple[str, ...] = ("row", "image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex",
                                  "localization")
WRITE_MODES: tuple[str, ...] = ("jpg", "raw", "proportion")
# Files in an image folder that count as images (to report the ones the CSV does not list).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
PAGE_SIZE = 2 << 20
"""FFCV page size: the smallest allowed (2 MiB); the 8 MiB default pads small datasets."""
MAX_COPIES = 8
"""How many copies of the download (their mtime hashes) a manifest remembers (``_refresh_images``)."""
FORMAT_VERSION = 2
"""Bumped when the stored pixels would change for the same inputs (e.g. a new resize filter).
2: pictures with an EXIF orientation are stored upright. A bump changes ``source_record`` too:
folds that recorded the older one are then refused, as trained on other pixels."""
MAX_LISTED = 20
"""Problems listed in full in an error message; the rest are counted."""
STALL_TIMEOUT_S = 300.0
"""The writer is stopped when no sample has been finished for this long (FFCV hangs on errors)."""
PROGRESS_EVERY_S = 10.0
"""Interval of the plain progress lines printed when stderr is not a terminal (SLURM logs)."""


class InputError(ValueError):
    """The raw data is unusable; ``problems`` lists each one with its file (and CSV line)."""

    def __init__(self, problems: Sequence[str], what: str = "input problem") -> None:
        self.problems, self.what = list(problems), what
        n = len(self.problems)
        if n == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__("\n".join([f"{n} {what}s:"] + _listed(self.problems)))

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its problems when pickled (submitit returns a job's exception that way).
        return (type(self), (self.problems, self.what))


class ConversionError(RuntimeError):
    """Writing the .beton failed for a reason other than the input (crash, hang); nothing was kept."""


@dataclass
class ConvertResult:
    status: str
    """converted | up-to-date"""
    out_dir: Path
    n_images: int
    counts: dict[str, int]
    """Images per class name, every class listed."""
    stored_size: list[int]
    """[H, W] of every stored image."""
    n_resized: int
    """Images whose source size differed from the most common one (resized to stored_size anyway)."""
    seconds: float
    """Wall time of this call."""
    images_per_s: float
    """Images converted per second over the whole call (checks and start-up included); 0 when up to date."""
    write_images_per_s: float = 0.0
    """Images per second of the FFCV writer once started (excludes the checks and its ~4 s start-up)."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """The checked CSV rows and where each image is: everything but the pixels."""

    metadata: Path
    records: list[dict[str, str]]
    lines: list[int]
    paths: list[Path]
    image_dirs: list[Path]
    warnings: list[str]
    row_problems: list[str] = field(default_factory=list)
    """Rows whose image was not found (``paths``/``lines`` hold the images that were): reported
    with the pixel check of those, so that one run lists every image problem."""


# --------------------------------------------------------------------------- messages and progress

def _listed(items: Sequence[str]) -> list[str]:
    shown = [f"  {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        shown.append(f"  ... and {len(items) - MAX_LISTED} more")
    return shown


def _say(message: str) -> None:
    print(message, flush=True)


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain line every PROGRESS_EVERY_S (SLURM logs)."""

    def __init__(self, total: int, verb: str) -> None:
        self.total, self.verb = total, verb
        self.start = self.last_line = time.monotonic()
        self.done = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=verb, unit="img", file=sys.stderr)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        elif time.monotonic() - self.last_line >= PROGRESS_EVERY_S and done < self.total:
            self.last_line = time.monotonic()
            self._line(done)
        self.done = done

    def _line(self, done: int) -> None:
        rate = done / max(time.monotonic() - self.start, 1e-9)
        _say(f"{self.verb} {done}/{self.total} ({rate:.0f} img/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(self.done)


# --------------------------------------------------------------------------- the CSV and the folders

class _RecordError(ValueError):
    """The CSV cannot be parsed from the record starting at ``line`` on."""

    def __init__(self, line: int, error: Exception) -> None:
        super().__init__(f"line {line}: {error}")
        self.line, self.error = line, error


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _ends_inside_quotes(lines: list[str]) -> bool:
    """Whether these lines end inside a quoted field (the lenient reader takes it to the end of the
    file without an error; the strict one says so)."""
    try:
        for _ in csv.reader(lines, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def _read_csv(metadata: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line as shown in an editor, cells) of each non-blank record."""
    # Decoded whole, so a decoding error's offset is in the file (a text file's is in a chunk of it);
    # split as the reader splits lines, so a record's lines can be read again.
    data = metadata.read_bytes()
    if b"\0" in data:  # UTF-16 without a byte order mark: ASCII decodes as UTF-8 with NULs between
        raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte, as in UTF-16")
    lines = io.StringIO(data.decode("utf-8-sig"), newline="").readlines()
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader, [])]
    records = []
    previous_end, last_start = reader.line_num, 1
    while True:
        line = previous_end + 1  # a record may span lines (quoted newlines): name its first
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise _RecordError(line, e) from None
        previous_end, last_start = reader.line_num, line
        if cells and any(c.strip() for c in cells):
            records.append((line, cells))
    if _ends_inside_quotes(lines[last_start - 1:]):  # a quote opened there was never closed
        raise _RecordError(last_start, csv.Error("the file ends inside a quoted field"))
    return header, records


def _separator_hint(header: list[str]) -> str:
    """Why a header may be one cell: the CSV was saved with ';' (a comma-decimal locale) or tabs."""
    for sep, name in ((";", "';'"), ("\t", "a tab")):
        if len(header) == 1 and sep in header[0]:
            return f"; the file seems to use {name} as separator: it must be comma-separated"
    return ""


def _check_records(metadata: Path, header: list[str], raw: list[tuple[int, list[str]]],
                   columns: Sequence[str] = REQUIRED_COLUMNS, optional: Sequence[str] = ()
                   ) -> tuple[list[dict[str, str]], list[int], list[str]]:
    name = str(metadata)
    missing = [c for c in columns if c not in header]
    if missing:
        return [], [], [f"{name}:1: missing column(s) {', '.join(missing)} (the header has: {', '.join(header)};"
                        f" required: {', '.join(columns)}){_separator_hint(header)}"]
    if not raw:
        return [], [], [f"{name}: no data rows"]
    problems: list[str] = []
    if twice := sorted({c for c in header if c and header.count(c) > 1}):
        problems.append(f"{name}:1: column(s) {', '.join(twice)} appear more than once in the header")
    records, lines = [], []
    first_line: dict[str, int] = {}
    lesion_dx: dict[str, tuple[str, int]] = {}
    for line, cells in raw:
        if breaks := sum(len(_LINE_BREAK.findall(c)) for c in cells):
            # Legal CSV, but never in a metadata table: a stray double quote joins the lines up
            # to the next quote into one record, which can even have the right number of fields.
            problems.append(f"{name}:{line}: a quoted field runs over the next {breaks} line(s), to line "
                            f"{line + breaks}: an unmatched double quote (\") there joins them into one record")
            continue
        if len(cells) != len(header):
            problems.append(f"{name}:{line}: {len(cells)} fields, the header has {len(header)}")
            continue
        rec = {col: cells[header.index(col)].strip() if col in header else "" for col in (*columns, *optional)}
        image_id = rec["image_id"]
        where = f"{name}:{line}: image_id {image_id!r}"
        if not image_id:
            problems.append(f"{name}:{line}: empty image_id")
        elif image_id in first_line:
            problems.append(f"{where} duplicates line {first_line[image_id]}")
        else:
            first_line[image_id] = line
        if not rec["lesion_id"]:
            problems.append(f"{where}: empty lesion_id")
        if rec["dx"] not in CLASS_TO_LABEL:
            problems.append(f"{where}: unknown dx {rec['dx']!r} (known: {', '.join(CLASSES)})")
        elif rec["lesion_id"]:
            dx, seen_at = lesion_dx.setdefault(rec["lesion_id"], (rec["dx"], line))
            if dx != rec["dx"]:  # one lesion, one diagnosis: the split stratifies lesions by it
                problems.append(f"{where}: lesion {rec['lesion_id']!r} has dx {rec['dx']!r} here but {dx!r} "
                                f"at line {seen_at}")
        records.append(rec)
        lines.append(line)
    return records, lines, problems


def _checked_csv(metadata: Path, columns: Sequence[str], optional: Sequence[str] = ()
                 ) -> tuple[list[dict[str, str]], list[int], list[str]]:
    """The CSV's records (``columns``, and ``optional`` ones as "" where absent; cells stripped),
    their lines, and every problem found."""
    if not metadata.is_file():
        return [], [], [f"{metadata}: metadata CSV not found"]
    try:
        header, raw = _read_csv(metadata)
    except _RecordError as e:
        return [], [], [f"{metadata}:{e.line}: cannot read the CSV from this record on ({e.error}); an unmatched "
                        'double quote (") there makes the rest of the file one field']
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        return [], [], [f"{metadata}:{line}: not UTF-8 (byte 0x{e.object[e.start]:02x}, {e.reason}); the CSV must "
                        "be UTF-8: re-save it as UTF-8 (in Excel: 'CSV UTF-8')"]
    except (OSError, csv.Error) as e:
        return [], [], [f"{metadata}: cannot read the CSV ({e})"]
    return _check_records(metadata, header, raw, columns, optional)


def read_metadata_rows(metadata: str | Path,
                       columns: Sequence[str] = REQUIRED_COLUMNS) -> tuple[list[dict[str, str]], list[int]]:
    """The checked rows of a metadata CSV and their editor lines, read exactly as the conversion
    reads them (so the split made from the CSV is the split of the converted index); InputError
    listing every bad row otherwise."""
    records, lines, problems = _checked_csv(Path(metadata), columns)
    if problems:
        raise InputError(problems)
    return records, lines


def _list_images(image_dirs: Sequence[Path]) -> tuple[dict[str, list[Path]], list[str]]:
    """Image id (file name without its suffix, whose case does not matter) → paths over all
    folders (in folder order, then name order), and problems with the folders."""
    found: dict[str, list[Path]] = {}
    problems = []
    for folder in image_dirs:
        if not folder.is_dir():
            problems.append(f"{folder}: image folder not found")
            continue
        try:
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        except OSError as e:
            problems.append(f"{folder}: cannot list the image folder ({e.strerror or e})")
            continue
        for name in names:
            found.setdefault(os.path.splitext(name)[0], []).append(folder / name)
    return found, problems


def image_files(image_dirs: Sequence[str | Path]) -> dict[str, list[Path]]:
    """Image id → its files in the existing folders of ``image_dirs`` (see ``_list_images``)."""
    return _list_images([Path(d) for d in image_dirs if Path(d).is_dir()])[0]


def _plan(image_dirs: Sequence[str | Path], metadata: str | Path) -> _Plan:
    """Check everything but the pixels; raise InputError listing every problem found, but return
    rows whose image is missing with the plan (``_Plan.row_problems``) when the CSV itself is good."""
    metadata = Path(metadata)
    dirs = [Path(d) for d in image_dirs]
    if not dirs:
        raise InputError(["no image folder given"])
    records, lines, problems = _checked_csv(metadata, REQUIRED_COLUMNS, OPTIONAL_COLUMNS)
    csv_problems = bool(problems)
    found, dir_problems = _list_images(dirs)
    problems += dir_problems
    if dir_problems or not records:
        raise InputError(problems)
    paths: list[Path] = []
    path_lines: list[int] = []
    listed, duplicated = set(), []
    folders = ", ".join(str(d) for d in dirs)
    for rec, line in zip(records, lines):
        image_id = rec["image_id"]
        listed.add(image_id)
        where = found.get(image_id, [])
        with_suffix = Path(image_id).suffix.lower() in IMAGE_SUFFIXES
        if not where and with_suffix and found.get(Path(image_id).stem):
            problems.append(f"{metadata}:{line}: image_id {image_id} ends with its file's suffix; write it without "
                            f"(image_id {Path(image_id).stem}, as in HAM10000's CSV)")
            continue
        if not where:
            problems.append(f"{metadata}:{line}: image {image_id if with_suffix else image_id + '.jpg'} not found in "
                            f"{folders} (the name as in the CSV; its suffix may be any of {'/'.join(IMAGE_SUFFIXES)}, "
                            "in any case)")
            continue
        if len(where) > 1:
            duplicated.append(f"{image_id}: using {where[0]}, not {', '.join(map(str, where[1:]))}")
        paths.append(where[0])
        path_lines.append(line)
    if csv_problems or not paths:  # the CSV's own problems come at once, before any pixel is read
        raise InputError(problems)
    warnings = []
    if duplicated:
        warnings.append("\n".join([f"{len(duplicated)} image(s) have more than one file:"] + _listed(duplicated)))
    extra = sorted(str(p[0]) for n, p in found.items() if n not in listed)
    if extra:
        warnings.append("\n".join([f"{len(extra)} image(s) in the folders are not in {metadata} and are skipped:"]
                                  + _listed(extra)))
    return _Plan(metadata, records, path_lines, paths, dirs, warnings, problems)


# --------------------------------------------------------------------------- fingerprint, up to date

def _images_hashes(paths: Sequence[Path]) -> tuple[str, str]:
    """Hashes of the sorted list of used image files with their sizes and mtimes, and with their
    sizes only (the layout); no pixels read."""
    digest, layout = hashlib.sha256(), hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        try:
            st = path.stat()
        except OSError as e:  # e.g. a folder that can be listed but not entered (mode r without x)
            raise InputError([f"{path}: cannot read the image file's size ({e.strerror or e}); check its "
                              "folder's permissions"]) from None
        digest.update(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        layout.update(f"{path.name}\t{st.st_size}\n".encode())
    return digest.hexdigest(), layout.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # releases the GIL: threads hash in parallel


def _images_content_hash(paths: Sequence[Path], workers: int) -> str:
    """Hash of the sorted used image files' names and bytes: what a copy keeps when it loses the
    mtimes (``cp -r``, ``scp``), read only when names and sizes match a conversion's."""
    ordered = sorted(paths, key=lambda p: p.name)
    digest = hashlib.sha256()
    # A few threads fill a disk or a network filesystem; a login node's every core would not help.
    with ThreadPoolExecutor(max_workers=min(max(1, workers), 8), thread_name_prefix="skinhpc-hash") as pool:
        try:
            for path, file_hash in zip(ordered, pool.map(_file_sha256, ordered)):
                digest.update(f"{path.name}\t{file_hash}\n".encode())
        except OSError as e:  # removed or made unreadable since it was checked
            raise InputError([f"{e.filename}: cannot read the image file ({e.strerror or e})"]) from None
    return digest.hexdigest()


def _settings(max_resolution: int, write_mode: str, jpeg_quality: int) -> dict[str, Any]:
    return {"write_mode": write_mode, "max_resolution": int(max_resolution), "jpeg_quality": int(jpeg_quality),
            "page_size": PAGE_SIZE, "format_version": FORMAT_VERSION}


def _fingerprint(plan: _Plan, settings: dict[str, Any]) -> dict[str, Any]:
    images_sha256, layout_sha256 = _images_hashes(plan.paths)
    return {"metadata_sha256": sha256_file(plan.metadata), "images_sha256": images_sha256,
            "layout_sha256": layout_sha256, "settings": settings}


def ffcv_installed() -> bool:
    """Is FFCV installed? Without it the conversion writes no .beton and the loaders read the source
    images with PIL. (Only looked up, not imported: importing takes seconds, and the writer process
    imports it anyway; when a broken install fails there, the conversion goes on as without it.)"""
    import importlib.util
    try:
        return importlib.util.find_spec("ffcv") is not None
    except ValueError:  # in sys.modules without a spec: not a usable install
        return False


@functools.cache
def ffcv_import_error() -> str:
    """Why FFCV cannot be imported here ("" when it can): the loaders then fall back to PIL."""
    if not ffcv_installed():
        return "ModuleNotFoundError: No module named 'ffcv'"
    try:
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
        return ""
    except Exception as e:  # ImportError, or a broken native library (OSError)
        return f"{type(e).__name__}: {e}"


def _matches(out_dir: Path, fingerprint: dict[str, Any], plan: _Plan | None = None,
             workers: int = 0) -> dict[str, Any] | None:
    """The manifest when out_dir holds a complete conversion of exactly these inputs and settings
    (one made without FFCV counts only while FFCV is still missing: it has no .beton).

    Images are compared by name, size and mtime (those of the conversion's images, or of a copy
    already compared). With ``plan``, images of the same names and sizes but other mtimes (a copy
    that did not keep them) are compared by their bytes; when those match, the manifest records the
    copy's mtimes too (``_refresh_images``), so the bytes are read once per copy."""
    try:
        manifest = read_manifest(out_dir)
        same_rest = (manifest["metadata"]["sha256"] == fingerprint["metadata_sha256"]
                     and manifest["ffcv"] == fingerprint["settings"])
        if not same_rest or (manifest["beton"] is None and not ffcv_import_error()):
            return None
        recorded = manifest["images"]
        if not _known_by_mtimes(recorded, fingerprint):
            if (plan is None or "content_sha256" not in recorded
                    or recorded.get("layout_sha256") != fingerprint["layout_sha256"]
                    or not _files_intact(out_dir, manifest)
                    or _images_content_hash(plan.paths, _workers(workers)) != recorded["content_sha256"]):
                return None
            return _refresh_images(out_dir, manifest, plan, fingerprint)
        return manifest if _files_intact(out_dir, manifest) else None
    except (OSError, KeyError, TypeError, ValueError, InputError):
        return None


def _known_by_mtimes(images: dict[str, Any], fingerprint: dict[str, Any]) -> bool:
    """Does a manifest's images record know these images by names, sizes and mtimes: those of the
    conversion's own images, or of a copy whose bytes were compared (``copies_sha256``)?"""
    return fingerprint["images_sha256"] in [images["sha256"], *images.get("copies_sha256", [])]


def _refresh_images(out_dir: Path, manifest: dict[str, Any], plan: _Plan, fingerprint: dict[str, Any]
                    ) -> dict[str, Any]:
    """The manifest with the mtime hash of a copy whose bytes matched added to ``copies_sha256``
    (the last MAX_COPIES: two folders used by turns are not read by turns), written in place unless
    another process holds the folder's lock (a conversion may be replacing the manifest) or the
    manifest changed since it was checked. A read-only folder keeps it unwritten: the bytes are then
    compared at each check."""
    images = manifest["images"]
    copies = [fingerprint["images_sha256"], *(h for h in images.get("copies_sha256", [])
                                              if h != fingerprint["images_sha256"])][:MAX_COPIES]
    refreshed = {**manifest, "images": {**images, "copies_sha256": copies}}
    _say(f"{out_dir}: the images in {', '.join(str(d) for d in plan.image_dirs)} have other mtimes than when "
         "converted but the same names and bytes (a copy): the conversion is up to date")
    try:
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError:
        return refreshed
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return refreshed  # a conversion holds it: next time
            # a filesystem without locks (as _dir_lock): the check below and the rename still hold
        if read_manifest(out_dir) == manifest:
            atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(refreshed, indent=2) + "\n")
    except (OSError, InputError):
        pass  # read-only: the bytes were compared, good for now
    finally:
        os.close(fd)
    return refreshed


def source_record(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What a conversion's pixels and labels come from: the metadata CSV's sha256, the hash of the
    used images' names and bytes, and the settings (format version included). A fold records it
    (inputs.json), so that data changed under the same paths is not mixed into its run. None for a
    conversion of skinhpc < 0.2.3, which has no hash of the images' bytes."""
    try:
        content = manifest["images"].get("content_sha256")
        return ({"metadata_sha256": manifest["metadata"]["sha256"], "images_sha256": content,
                 "settings": dict(manifest["ffcv"])} if content else None)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def raw_source_record(image_dirs: Sequence[str | Path], metadata: str | Path, out_dir: str | Path | None = None, *,
                      max_resolution: int = MAX_RESOLUTION, write_mode: str = "jpg", jpeg_quality: int = 90,
                      workers: int = 0) -> dict[str, Any] | None:
    """``source_record`` of the conversion these raw inputs would make, without converting. No image
    is read when ``out_dir``'s manifest knows them by their names, sizes and mtimes; else their
    bytes are read, with a line saying so. None when they cannot be read as a download (the
    conversion will say why)."""
    try:
        plan = _plan(image_dirs, metadata)
        if plan.row_problems:
            return None
        settings = _settings(max_resolution, write_mode, jpeg_quality)
        fingerprint = _fingerprint(plan, settings)
        known = None
        if out_dir is not None:
            try:  # the images' half alone: a metadata CSV edited in one cell lists the same images
                images = read_manifest(out_dir)["images"]
                if _known_by_mtimes(images, fingerprint):
                    known = images.get("content_sha256")
            except (InputError, OSError, KeyError, TypeError, AttributeError):
                pass
        if known is None:
            _say(f"reading the {len(plan.paths)} images to compare their bytes with the data the run's folds "
                 "trained on")
            known = _images_content_hash(plan.paths, _workers(workers))
        return {"metadata_sha256": fingerprint["metadata_sha256"], "images_sha256": known, "settings": settings}
    except (InputError, OSError):
        return None


def _recorded_files(manifest: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(file name, manifest key) of what a conversion wrote: the .beton (when there is one) and index.csv."""
    return ((BETON_NAME, "beton"), (INDEX_NAME, "index")) if manifest["beton"] is not None else ((INDEX_NAME, "index"),)


def _size_problem(out_dir: Path, manifest: dict[str, Any]) -> str:
    """A recorded file missing or not of the size the manifest records ("" when none is)."""
    for name, key in _recorded_files(manifest):
        path = out_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != manifest[key]["size"]:
            return (f"{path} has {path.stat().st_size} bytes but {MANIFEST_NAME} records {manifest[key]['size']} "
                    "(cut short or replaced)")
    return ""


def _files_intact(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """The .beton (when there is one) and index.csv have the size and sha256 the manifest records."""
    return not _content_problem(out_dir, manifest)


def _content_problem(out_dir: Path, manifest: dict[str, Any]) -> str:
    """A recorded file missing, or not of the size or sha256 the manifest records ("" when none is)."""
    if problem := _size_problem(out_dir, manifest):
        return problem
    for name, key in _recorded_files(manifest):
        if sha256_file(out_dir / name) != manifest[key]["sha256"]:
            return f"{out_dir / name} has other bytes than {MANIFEST_NAME} records (its sha256 differs: damaged or replaced)"
    return ""


def conversion_problem(out_dir: str | Path, compare_bytes: bool = False) -> str:
    """Why ``out_dir`` holds no usable conversion ("" when it does): no manifest, or its .beton or
    index.csv missing or not of the size the manifest records. Sizes only by default: the sha256 of
    a full .beton is too slow for every launch, and a file cut short or deleted is what happens;
    ``compare_bytes`` also compares their sha256 with the manifest's (bytes changed in place)."""
    try:
        manifest = read_manifest(out_dir)
        return _content_problem(Path(out_dir), manifest) if compare_bytes else _size_problem(Path(out_dir), manifest)
    except InputError as e:
        return str(e)
    except (OSError, KeyError, TypeError) as e:
        return f"{Path(out_dir) / MANIFEST_NAME}: not a conversion manifest ({e!r})"


def kept_without_sources(image_dirs: Sequence[str | Path], metadata: str | Path, out_dir: str | Path, *,
                         max_resolution: int = MAX_RESOLUTION, write_mode: str = "jpg", jpeg_quality: int = 90
                         ) -> dict[str, Any] | None:
    """The manifest of ``out_dir``'s conversion when none of the image folders exists any more but
    the conversion was made with these settings, from this metadata CSV (when it is still there),
    and holds an intact .beton: a download deleted once converted must not stop a relaunch or a
    requeued job. None otherwise (without a .beton the loaders read the source images)."""
    if not image_dirs or any(Path(d).exists() for d in image_dirs):
        return None
    try:
        manifest = read_manifest(out_dir)
        if manifest["beton"] is None or manifest["ffcv"] != _settings(max_resolution, write_mode, jpeg_quality):
            return None
        if Path(metadata).is_file() and sha256_file(Path(metadata)) != manifest["metadata"]["sha256"]:
            return None
        return manifest if _files_intact(Path(out_dir), manifest) else None
    except (OSError, KeyError, TypeError, ValueError, InputError):
        return None


def is_up_to_date(image_dirs: Sequence[str | Path], metadata: str | Path, out_dir: str | Path, *,
                  max_resolution: int = MAX_RESOLUTION, write_mode: str = "jpg", jpeg_quality: int = 90) -> bool:
    """Whether ``out_dir`` already holds the conversion of these inputs with these settings (or,
    their images deleted since, ``kept_without_sources``)."""
    settings = {"max_resolution": max_resolution, "write_mode": write_mode, "jpeg_quality": jpeg_quality}
    if kept_without_sources(image_dirs, metadata, out_dir, **settings) is not None:
        return True
    try:
        plan = _plan(image_dirs, metadata)
    except InputError:
        return False
    if plan.row_problems:
        return False
    fingerprint = _fingerprint(plan, _settings(max_resolution, write_mode, jpeg_quality))
    return _matches(Path(out_dir), fingerprint, plan) is not None


def stale_reason(image_dirs: Sequence[str | Path], metadata: str | Path, out_dir: str | Path, *,
                 max_resolution: int = MAX_RESOLUTION, write_mode: str = "jpg", jpeg_quality: int = 90) -> str:
    """Why ``out_dir`` is not up to date for these inputs, in a few words, for the launcher's plan
    (call it when ``is_up_to_date`` said no; the bytes of the images are not read)."""
    out_dir = Path(out_dir)
    if problem := conversion_problem(out_dir):
        return "no conversion yet" if not (out_dir / MANIFEST_NAME).exists() else f"no usable conversion: {problem}"
    try:
        manifest = read_manifest(out_dir)
        settings = _settings(max_resolution, write_mode, jpeg_quality)
        if manifest["ffcv"] != settings:
            differ = [f"{k} {manifest['ffcv'].get(k)} -> {v}" for k, v in settings.items() if manifest["ffcv"].get(k) != v]
            return f"made with other settings ({', '.join(differ)})"
        if manifest["beton"] is None and not ffcv_import_error():
            return "made without FFCV, which imports now: the .beton is written"
        plan = _plan(image_dirs, metadata)
        fingerprint = _fingerprint(plan, settings)
        recorded = manifest["images"]
        if fingerprint["metadata_sha256"] != manifest["metadata"]["sha256"]:
            return f"made from another metadata CSV than {plan.metadata}"
        if "layout_sha256" in recorded and recorded["layout_sha256"] != fingerprint["layout_sha256"]:
            return "made from other images (names or sizes differ)"
        if "content_sha256" not in recorded:
            return "made by skinhpc < 0.2.3, which compares the images by their mtimes, and these differ"
        return "made from other images (the same names and sizes, other bytes), or its files are damaged"
    except InputError as e:
        return f"the raw data cannot be read: {str(e).splitlines()[0]}"
    except (OSError, KeyError, TypeError, ValueError) as e:
        return f"its manifest cannot be compared ({e!r})"


# --------------------------------------------------------------------------- pixels

def prepare_image(image: Image.Image | str | Path, stored_size: Sequence[int]) -> np.ndarray:
    """The exact pixels conversion stores: RGB, resized to ``stored_size`` [H, W]; uint8 HxWx3.

    The PIL loader and predict call this too, so every path into the network sees the same pixels.
    """
    height, width = int(stored_size[0]), int(stored_size[1])
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return _resized_rgb(opened, width, height)
    return _resized_rgb(image, width, height)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greys as 8-bit ones: Pillow's convert("RGB") clips them at 255 (white)."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a camera held the picture
_QUARTER_TURNS = (5, 6, 7, 8)  # orientations whose upright picture swaps width and height


def _orientation(image: Image.Image) -> int:
    """The picture's EXIF orientation, 1 (as stored) when it has none."""
    return image.getexif().get(EXIF_ORIENTATION) or 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is shown, after its EXIF orientation (headers only)."""
    return (image.size[1], image.size[0]) if _orientation(image) in _QUARTER_TURNS else image.size


def _upright(image: Image.Image) -> Image.Image:
    """The picture as viewers show it: a phone's portrait shot is stored sideways with a tag.
    Untagged pictures are returned as they are (exif_transpose would copy them)."""
    return image if _orientation(image) == 1 else ImageOps.exif_transpose(image)


def _resized_rgb(image: Image.Image, width: int, height: int) -> np.ndarray:
    rgb = _eight_bit(_upright(image)).convert("RGB")  # decodes fully; grey, palette, CMYK or RGBA sources become RGB
    if rgb.size != (width, height):
        # Pillow's BILINEAR widens its kernel when shrinking (antialiased, like torchvision's
        # antialias=True) at a quarter of LANCZOS's cost; reducing_gap box-reduces huge sources first.
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(rgb, dtype=np.uint8)


def _most_common_size(sizes: Counter[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) seen most often; ties go to the larger, so the choice never depends on order."""
    return max(sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1], kv[0]))[0]


ASPECT_TOLERANCE = 0.02
"""Relative difference of width/height beyond which resizing visibly stretches an image."""


def stretched_images(paths: Sequence[Path], sizes: Sequence[tuple[int, int]], target: tuple[int, int]
                     ) -> list[tuple[int, Path, tuple[int, int]]]:
    """(position, path, (width, height)) of the images whose proportions differ from ``target``'s
    (width, height): resizing them to it distorts the lesion (a portrait or square photo)."""
    aspect = target[0] / target[1]
    return [(i, Path(p), (w, h)) for i, (p, (w, h)) in enumerate(zip(paths, sizes))
            if abs((w / h) / aspect - 1.0) > ASPECT_TOLERANCE]


def stored_size_for(sizes: Counter[tuple[int, int]], max_resolution: int) -> list[int]:
    """[H, W]: the most common (width, height) scaled so its long side is <= max_resolution."""
    width, height = _most_common_size(sizes)
    scale = min(1.0, max_resolution / max(width, height))  # never upscale
    return [max(1, round(height * scale)), max(1, round(width * scale))]


def detail_lost_note(manifest: dict[str, Any], image_size: int) -> str:
    """A note when data.max_resolution, not the source images, made the stored short side smaller
    than the network's input: the evaluation square (the stored short side) is then upscaled to
    ``image_size`` px and the conversion threw away detail the sources had. "" otherwise."""
    height, width = (int(v) for v in manifest["stored_size"])
    short = min(height, width)
    sources = [tuple(int(v) for v in size.split("x")) for size in manifest.get("source_sizes") or {}]
    if short >= image_size or not sources or max(sources[0]) <= max(height, width):
        return ""  # big enough, or the sources are that small themselves
    wanted = min(math.ceil(image_size * max(height, width) / short), max(sources[0]))
    limit = (manifest.get("ffcv") or {}).get("max_resolution", "?")
    return (f"note: the images are stored at {width}x{height} px (data.max_resolution={limit}, sources "
            f"{sources[0][0]}x{sources[0][1]}), so the {image_size} px evaluation square is upscaled from "
            f"{short} px; data.max_resolution={wanted} keeps the detail (one more conversion)")


def _decode(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(problem, None) or (None, (width, height)) after decoding every byte of the image."""
    try:
        with Image.open(path) as image:
            size = image.size
            upright = upright_size(image)
            # JPEG: decode at 1/8 scale. libjpeg still reads every byte of the entropy-coded data,
            # so truncated or corrupt files fail just as in a full decode, at a fraction of the cost.
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()  # a truncated or corrupt JPEG only fails here, not at open
            return None, upright
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb)
        return f"{type(e).__name__}: {e}", None


def _decode_all(paths: Sequence[Path], workers: int) -> Iterator[tuple[str | None, tuple[int, int] | None]]:
    """Decode in threads: PIL releases the GIL while decoding, and threads need neither a process
    start (seconds) nor a fork (unsafe after FFCV loaders or torch threads ran in this process)."""
    # Someone in this process may have set LOAD_TRUNCATED_IMAGES; the check must not be lenient.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skinhpc-check") as pool:
            yield from pool.map(_decode, paths)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _check_images(plan: _Plan, workers: int) -> list[tuple[int, int]]:
    """Decode every image found; (width, height) of each, or InputError naming each bad file and
    its row, after the rows' own problems."""
    sizes, problems = [], list(plan.row_problems)
    progress = _Progress(len(plan.paths), "checked")
    for i, (problem, size) in enumerate(_decode_all(plan.paths, workers)):
        if problem:
            problems.append(f"{plan.paths[i]}: unreadable or corrupt image ({problem})"
                            f" [{plan.metadata}:{plan.lines[i]}]")
        else:
            assert size is not None
            sizes.append(size)
        progress.update(i + 1)
    progress.close()
    if problems:
        raise InputError(problems)
    return sizes


# --------------------------------------------------------------------------- the FFCV writer (child process)

class _BetonSource:
    """The indexed dataset handed to FFCV's DatasetWriter: (image, label, row) per CSV row.

    It never raises: a failure (a file changed since it was checked) is reported on ``errors`` and
    a black image returned, because an exception inside a writer worker hangs FFCV forever.
    """

    def __init__(self, paths: list[Path], labels: list[int], stored_size: list[int],
                 counter: Any, errors: Any, rows_where: list[str]) -> None:
        self.paths, self.labels, self.stored_size = paths, labels, stored_size
        self.counter, self.errors, self.rows_where = counter, errors, rows_where

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        try:
            image = prepare_image(self.paths[i], self.stored_size)
        except Exception as e:
            self.errors.put(f"{self.paths[i]}: unreadable or corrupt image ({type(e).__name__}: {e})"
                            f" [{self.rows_where[i]}]")
            image = np.zeros((*self.stored_size, 3), dtype=np.uint8)
        # write_mode=proportion draws np.random.rand() while encoding this sample, in whichever
        # worker got it: seeding by row makes that choice, and so every decoded image, reproducible
        # (the file's bytes may still differ between runs: workers fill pages in their own order).
        np.random.seed(i)
        with self.counter.get_lock():
            self.counter.value += 1
        return image, int(self.labels[i]), i


def _end_with_parent(parent_pid: int) -> None:
    """Runs in the writer child: if the converting process dies, end the writer and its workers."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)


def _writer_main(paths: list[Path], labels: list[int], stored_size: list[int], dest: str,
                 settings: dict[str, Any], workers: int, counter: Any, errors: Any, rows_where: list[str]) -> None:
    """Entry point of the spawned writer process."""
    # Own process group: the parent can end us with FFCV's forked workers in one call, and a
    # Ctrl-C at the terminal reaches only the parent, which then cleans up.
    os.setpgid(0, 0)
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), daemon=True).start()
    # A spawned child inherits "spawn" as its default start method, and FFCV's workers would each
    # re-import torch and ffcv (seconds). This fresh process ran no loader: forking it is safe.
    mp.set_start_method("fork", force=True)
    from functools import partial

    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from tqdm import tqdm
    ffcv.writer.tqdm = partial(tqdm, disable=True)  # the parent shows progress from `counter`
    fields = {
        "image": RGBImageField(write_mode=settings["write_mode"], max_resolution=settings["max_resolution"],
                               jpeg_quality=settings["jpeg_quality"]),
        "label": IntField(),
        "row": IntField(),
    }
    writer = ffcv.writer.DatasetWriter(dest, fields, page_size=settings["page_size"], num_workers=workers)
    chunk = max(1, min(100, len(paths) // (workers * 8)))  # small chunks keep the workers balanced
    writer.from_indexed_dataset(_BetonSource(paths, labels, stored_size, counter, errors, rows_where), chunksize=chunk)


def _failed_children(pid: int) -> int:
    """How many children of ``pid`` have ended unreaped (zombies) with a failure. FFCV's writer
    never joins its workers: one that died of an exception (a full disk) stays a zombie while the
    writer waits for its samples forever, and so does one that finished its share, which is why
    the exit code (field 52 of /proc/PID/stat, in waitpid's form: 0 for a clean exit) is read.
    Linux /proc; 0 where it cannot be read."""
    dead = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command name)"
        except (OSError, IndexError):
            continue
        # fields[0] is field 3 of stat (the state), fields[1] field 4 (the parent), fields[49] field 52.
        if len(fields) > 49 and fields[0] == "Z" and fields[1] == str(pid) and fields[49] != "0":
            dead += 1
    return dead


def _writer_failure(dest: Path, page_size: int) -> str:
    """Why a writer worker may have died: a full disk, said with the numbers, or its own message."""
    try:
        free = shutil.disk_usage(dest.parent).free
    except OSError:
        free = None
    if free is not None and free < 2 * page_size:
        return f"no space left on device writing {dest.name} in {dest.parent} ({free / 2**20:.1f} MiB free)"
    return "see the worker's error above"


def _stop(proc: mp.process.BaseProcess) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer and FFCV's workers
    except (ProcessLookupError, PermissionError, TypeError):
        proc.kill()  # not yet in its own group
    proc.join()


def _write_beton(plan: _Plan, stored_size: list[int], dest: Path, settings: dict[str, Any], workers: int,
                 stall_timeout_s: float = STALL_TIMEOUT_S) -> float:
    """Write the .beton to ``dest`` in a spawned process; raise (leaving ``dest`` to the caller) on failure.

    Returns the writing speed in images/s, counted from the first finished sample (after start-up).
    """
    ctx = mp.get_context("spawn")
    counter = ctx.Value("Q", 0)
    errors = ctx.SimpleQueue()
    labels = [CLASS_TO_LABEL[r["dx"]] for r in plan.records]
    proc = ctx.Process(target=_writer_main, name="skinhpc-convert-writer",
                       args=(plan.paths, labels, stored_size, str(dest), settings, workers, counter, errors,
                             [f"{plan.metadata}:{line}" for line in plan.lines]))
    progress = _Progress(len(plan.paths), "converted")
    proc.start()
    try:
        last_done, last_change = -1, time.monotonic()
        first: tuple[int, float] | None = None
        while proc.exitcode is None:
            proc.join(0.2)
            done = counter.value
            progress.update(done)
            if first is None and done > 0:
                first = (done, time.monotonic())
            if not errors.empty():
                break
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 2.0 and _failed_children(proc.pid):
                raise ConversionError(f"an FFCV writer worker died ({done}/{len(plan.paths)} images): "
                                      f"{_writer_failure(dest, settings['page_size'])}; stopped the writer")
            elif time.monotonic() - last_change > stall_timeout_s:
                raise ConversionError(f"the FFCV writer made no progress for {stall_timeout_s:.0f} s"
                                      f" ({done}/{len(plan.paths)} images); stopped it")
        if not errors.empty():
            problems = []
            while not errors.empty() and len(problems) <= MAX_LISTED:
                problems.append(errors.get())
            raise InputError(problems, what="image failed while writing")
        if proc.exitcode != 0:
            raise ConversionError(f"the FFCV writer process failed (exit code {proc.exitcode})")
        if first is None or first[0] >= len(plan.paths):
            return 0.0  # too small or too fast to measure
        return (len(plan.paths) - first[0]) / max(time.monotonic() - first[1], 1e-9)
    finally:
        if proc.exitcode is None:
            _stop(proc)
        progress.close()


# --------------------------------------------------------------------------- convert

def _workers(workers: int) -> int:
    return workers if workers > 0 else available_cores()


@contextmanager
def _dir_lock(out_dir: Path) -> Iterator[bool]:
    """Exclusive lock on the output folder (several jobs may convert into it at once)."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # some network filesystems refuse: go on unlocked
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _temp(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.tmp-{os.getpid()}"


def _remove_stale_temps(out_dir: Path) -> None:
    """Temp files of a killed conversion; only called while holding the folder's lock."""
    for name in (BETON_NAME, INDEX_NAME, MANIFEST_NAME):
        for stale in out_dir.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)


def _remove_stale_temps_if_idle(out_dir: Path) -> None:
    """An up-to-date folder may still hold a killed conversion's temp files: removed unless another
    conversion holds the folder's lock now (its temps are live)."""
    try:
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove_stale_temps(out_dir)
    except OSError:
        pass  # busy, or a filesystem without locks: leave them
    finally:
        os.close(fd)


def _index_frame(plan: _Plan) -> Any:
    import pandas as pd
    frame = pd.DataFrame(plan.records, columns=list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS))
    frame.insert(0, "row", np.arange(len(frame), dtype=np.int64))
    frame["label"] = [CLASS_TO_LABEL[dx] for dx in frame["dx"]]
    return frame[list(INDEX_COLUMNS)]


def _counts(plan: _Plan) -> dict[str, int]:
    found = Counter(r["dx"] for r in plan.records)
    return {name: found.get(name, 0) for name in CLASSES}


def _manifest(plan: _Plan, fingerprint: dict[str, Any], content_sha256: str, stored_size: list[int],
              sizes: Counter[tuple[int, int]], n_resized: int, beton: Path | None, index: Path, seconds: float,
              write_rate: float, workers: int) -> dict[str, Any]:
    n = len(plan.records)
    return {
        "n_images": n,
        "counts": _counts(plan),
        "classes": list(CLASSES),
        "stored_size": stored_size,
        "n_resized": n_resized,
        "source_sizes": {f"{w}x{h}": c for (w, h), c in sizes.most_common(10)},
        "metadata": {"path": str(plan.metadata.resolve()), "sha256": fingerprint["metadata_sha256"]},
        "images": {"dirs": [str(d.resolve()) for d in plan.image_dirs], "n_files": n,
                   "sha256": fingerprint["images_sha256"], "layout_sha256": fingerprint["layout_sha256"],
                   "content_sha256": content_sha256},
        "ffcv": fingerprint["settings"],
        "fields": {"image": "RGBImageField", "label": "IntField", "row": "IntField"},
        "beton": ({"name": BETON_NAME, "size": beton.stat().st_size, "sha256": sha256_file(beton)}
                  if beton is not None else None),  # None: converted without FFCV (PIL reads the sources)
        "index": {"name": INDEX_NAME, "size": index.stat().st_size, "sha256": sha256_file(index)},
        "skinhpc_version": skinhpc.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "conversion": {"seconds": round(seconds, 2), "images_per_s": round(n / max(seconds, 1e-9), 1),
                       "write_images_per_s": round(write_rate, 1),
                       "workers": workers},
    }


def _result_from(manifest: dict[str, Any], status: str, out_dir: Path, seconds: float,
                 warnings: list[str]) -> ConvertResult:
    n = int(manifest["n_images"])
    rate = n / max(seconds, 1e-9) if status == "converted" else 0.0
    return ConvertResult(status=status, out_dir=out_dir, n_images=n, counts=dict(manifest["counts"]),
                         stored_size=list(manifest["stored_size"]), n_resized=int(manifest["n_resized"]),
                         seconds=seconds, images_per_s=rate, warnings=warnings,
                         write_images_per_s=float(manifest.get("conversion", {}).get("write_images_per_s", 0.0))
                         if status == "converted" else 0.0)


def _up_to_date_result(manifest: dict[str, Any], out_dir: Path, start: float, warnings: list[str]) -> ConvertResult:
    h, w = manifest["stored_size"]
    _say(f"{out_dir}: up to date ({manifest['n_images']} images, {w}x{h} px); nothing to do")
    return _result_from(manifest, "up-to-date", out_dir, time.monotonic() - start, warnings)


def convert(image_dirs: Sequence[str | Path], metadata: str | Path, out_dir: str | Path, *,
            max_resolution: int = MAX_RESOLUTION, write_mode: str = "jpg", jpeg_quality: int = 90,
            workers: int = 0) -> ConvertResult:
    """Check the raw data, then write ``out_dir/{ham10000.beton, index.csv, manifest.json}``.

    Nothing is written until every check passed (InputError lists the problems with file and CSV
    line). Files appear atomically, manifest last; a failure leaves an earlier good conversion as it
    was. When ``out_dir`` already holds this conversion, nothing is done (status "up-to-date").
    """
    start = time.monotonic()
    if write_mode not in WRITE_MODES:
        raise InputError([f"write_mode must be one of {', '.join(WRITE_MODES)}, not {write_mode!r}"])
    if not 1 <= jpeg_quality <= 100 or max_resolution < 32:  # 32: as data.max_resolution
        raise InputError([f"need 1 <= jpeg_quality <= 100 and max_resolution >= 32"
                          f" (got {jpeg_quality}, {max_resolution})"])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError([f"{out_dir}: exists and is not a folder; the output must be a folder"])
    workers = _workers(workers)
    kept = kept_without_sources(image_dirs, metadata, out_dir, max_resolution=max_resolution,
                                write_mode=write_mode, jpeg_quality=jpeg_quality)
    if kept is not None:
        warning = (f"image folder(s) not found: {', '.join(str(d) for d in image_dirs)}; {out_dir} holds their "
                   "conversion (same settings and metadata), used as it is")
        print(f"warning: {warning}", file=sys.stderr, flush=True)
        return _up_to_date_result(kept, out_dir, start, [warning])
    plan = _plan(image_dirs, metadata)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    settings = _settings(max_resolution, write_mode, jpeg_quality)
    fingerprint = _fingerprint(plan, settings)
    manifest = _matches(out_dir, fingerprint, plan, workers) if not plan.row_problems else None
    if manifest is not None:
        _remove_stale_temps_if_idle(out_dir)
        return _up_to_date_result(manifest, out_dir, start, plan.warnings)

    image_sizes = _check_images(plan, workers)
    # The bytes before the .beton reads them: a file changed while converting then differs next time.
    content_sha256 = _images_content_hash(plan.paths, workers)
    sizes = Counter(image_sizes)
    usual = _most_common_size(sizes)
    if stretched := stretched_images(plan.paths, image_sizes, usual):
        w, h = usual
        rows = [f"{path} ({iw}x{ih}) [{plan.metadata}:{plan.lines[i]}]" for i, path, (iw, ih) in stretched]
        warning = "\n".join([f"{len(rows)} image(s) have another shape than the usual {w}x{h} and are stretched "
                             "to it (crop or pad them to that shape first to keep their proportions):"] + _listed(rows))
        plan.warnings.append(warning)
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    with _termination_as_exception():
        manifest = _write_outputs(plan, fingerprint, content_sha256, sizes, out_dir, workers, start)
    seconds = time.monotonic() - start
    if manifest is None:  # another job converted the same inputs while we checked them
        return _up_to_date_result(read_manifest(out_dir), out_dir, start, plan.warnings)
    result = _result_from(manifest, "converted", out_dir, seconds, plan.warnings)
    h, w = result.stored_size
    if manifest["beton"] is None:
        _say(f"{out_dir}: indexed {result.n_images} images (no .beton without FFCV) in {seconds:.1f} s")
        return result
    _say(f"{out_dir}: converted {result.n_images} images to {w}x{h} px {write_mode} in {seconds:.1f} s"
         f" ({result.images_per_s:.0f} img/s overall, writing {result.write_images_per_s:.0f} img/s;"
         f" {workers} workers; {result.n_resized} resized from other sizes)")
    return result


def _write_outputs(plan: _Plan, fingerprint: dict[str, Any], content_sha256: str, sizes: Counter[tuple[int, int]],
                   out_dir: Path, workers: int, start: float) -> dict[str, Any] | None:
    """Write the three files under temporary names, then rename them in, manifest last.

    Returns the new manifest, or None when out_dir turned out up to date once locked.
    """
    settings = fingerprint["settings"]
    stored_size = stored_size_for(sizes, settings["max_resolution"])
    n_resized = sum(c for size, c in sizes.items() if size != _most_common_size(sizes))
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out_dir) as locked:
        if _matches(out_dir, fingerprint) is not None:
            return None
        if locked:
            _remove_stale_temps(out_dir)
        beton_tmp, index_tmp = _temp(out_dir, BETON_NAME), _temp(out_dir, INDEX_NAME)
        try:
            write_rate = _beton_if_ffcv(plan, stored_size, beton_tmp, settings, workers)
            with_beton = write_rate is not None
            _index_frame(plan).to_csv(index_tmp, index=False)
            manifest = _manifest(plan, fingerprint, content_sha256, stored_size, sizes, n_resized,
                                 beton_tmp if with_beton else None, index_tmp, time.monotonic() - start,
                                 write_rate or 0.0, workers)
            # Manifest gone first: between the renames the folder reads as "not converted", never
            # as a new .beton described by an old manifest.
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
            if with_beton:
                os.replace(beton_tmp, out_dir / BETON_NAME)
            else:
                (out_dir / BETON_NAME).unlink(missing_ok=True)  # an older one would not match this index
            os.replace(index_tmp, out_dir / INDEX_NAME)
            atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        finally:
            beton_tmp.unlink(missing_ok=True)
            index_tmp.unlink(missing_ok=True)
            if created_dir and not (out_dir / MANIFEST_NAME).exists():
                _remove_empty_dir(out_dir)
    return manifest


def _beton_if_ffcv(plan: _Plan, stored_size: list[int], dest: Path, settings: dict[str, Any],
                   workers: int) -> float | None:
    """Write the .beton and return its writing speed, or None where FFCV is missing or broken (say,
    a missing libturbojpeg): the conversion then writes the index and manifest only, and the
    loaders read the source images with PIL."""
    if ffcv_installed():
        try:
            return _write_beton(plan, stored_size, dest, settings, workers)
        except ConversionError:
            if not ffcv_import_error():
                raise
            why = f"FFCV cannot be imported ({ffcv_import_error()})"
    else:
        why = "FFCV is not installed"
    print(f"warning: {why}; writing {INDEX_NAME} and {MANIFEST_NAME} only, and the PIL loader will read the "
          "source images (install a working FFCV and rerun for the .beton)", file=sys.stderr, flush=True)
    return None


class _Terminated(BaseException):
    """SIGTERM arrived while writing (BaseException: no ``except Exception`` may swallow it)."""


@contextmanager
def _termination_as_exception() -> Iterator[None]:
    """Turn SIGTERM (scancel, a SLURM time limit, kill) into an exception while writing, so the
    writer process is stopped and the temp files removed; then deliver it to the previous handler
    (by default: exit as killed by SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield  # handlers can only be set from the main thread; an ignored SIGTERM stays ignored
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action ends the process right here
        raise ConversionError("stopped by SIGTERM; nothing was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: someone else's files are there


# --------------------------------------------------------------------------- entry points for the other stages

def raw_inputs(data_cfg: DataConfig) -> tuple[list[str], str] | None:
    """(image folders, metadata CSV) a conversion is made from: the configured download, or the
    bundled sample when neither is given; None for a data.dir given alone (a conversion made
    elsewhere, used as it is)."""
    if not data_cfg.images and not data_cfg.metadata:
        return None if data_cfg.dir else ([str(skinhpc.SAMPLE_IMAGES)], str(skinhpc.SAMPLE_METADATA))
    return list(data_cfg.images), data_cfg.metadata


def conversion_settings(data_cfg: DataConfig) -> dict[str, Any]:
    """The keyword arguments of ``convert``/``is_up_to_date``/... that a data config sets."""
    return {"max_resolution": data_cfg.max_resolution, "write_mode": data_cfg.write_mode,
            "jpeg_quality": data_cfg.jpeg_quality}


def raw_data_record(data_cfg: DataConfig, data_dir: Path) -> dict[str, Any] | None:
    """``raw_source_record`` of a data config's raw data (None for a data.dir given alone)."""
    if (raw := raw_inputs(data_cfg)) is None:
        return None
    return raw_source_record(*raw, data_dir, workers=data_cfg.convert_workers, **conversion_settings(data_cfg))


def ensure_converted(data_cfg: DataConfig, data_dir: Path) -> list[str]:
    """Converted data in ``data_dir`` for this data config; converts only when not up to date.
    Returns the conversion's warnings (images skipped, duplicated, ...), for a launcher to show.

    ``data.images``/``data.metadata`` name the raw download; both empty means the bundled sample,
    unless ``data.dir`` points at an existing conversion, which is then used as it is.
    """
    data_dir = Path(data_dir)
    raw = raw_inputs(data_cfg)
    if raw is None:
        if (data_dir / MANIFEST_NAME).is_file():
            # A conversion made elsewhere; nothing here says how to redo it, so a damaged one is
            # refused here, by name, rather than by the loader's reader of the .beton.
            # Every byte, not only the sizes: nothing else here would notice bytes changed in
            # place, and a training task reads the whole file anyway.
            if problem := conversion_problem(data_dir, compare_bytes=True):
                raise InputError([f"{data_dir} holds no usable conversion ({problem}) and no raw data is configured "
                                  "(data.images, data.metadata): convert again with jobs/convert.py, or set "
                                  "data.images and data.metadata to have it converted"])
            return []
        raise InputError([f"{data_dir}: no converted data ({MANIFEST_NAME} missing); give data.images and"
                          " data.metadata to convert your download, or run jobs/convert.py"])
    if not data_cfg.images:
        _say(f"no data.images/data.metadata given: using the bundled HAM10000 sample ({skinhpc.SAMPLE_METADATA})")
    result = convert(*raw, data_dir, workers=data_cfg.convert_workers, **conversion_settings(data_cfg))
    return list(result.warnings)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a conversion (InputError when the folder holds none)."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError([f"{path}: not found; convert the data first (jobs/convert.py)"]) from None
    except (OSError, ValueError) as e:
        raise InputError([f"{path}: unreadable ({e})"]) from None


def read_index(data_dir: str | Path) -> Any:
    """index.csv as a DataFrame: row i describes sample i of the .beton (pandas.DataFrame)."""
    import pandas as pd
    path = Path(data_dir) / INDEX_NAME
    if not path.is_file():
        raise InputError([f"{path}: not found; convert the data first (jobs/convert.py)"])
    text_columns = {c: str for c in ("image_id", "lesion_id", "dx", "dx_type", "sex", "localization")}
    # Only the optional columns may be missing (empty): an id such as "NA" or "null" is an id,
    # which pandas would otherwise read as NaN.
    missing = {c: [""] for c in OPTIONAL_COLUMNS} | {"age": ["", "nan", "NaN"]}
    frame = pd.read_csv(path, dtype={**text_columns, "row": np.int64, "label": np.int64}, keep_default_na=False,
                        na_values=missing)
    return frame


__all__ = ["BETON_NAME", "INDEX_NAME", "MANIFEST_NAME", "ConversionError", "ConvertResult", "InputError",
           "convert", "ensure_converted", "image_files", "is_up_to_date", "kept_without_sources", "prepare_image",
           "conversion_settings", "raw_data_record", "raw_inputs", "raw_source_record", "read_index",
           "source_record", "stale_reason",
           "read_manifest", "read_metadata_rows", "stored_size_for"]
