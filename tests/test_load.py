"""The fold loader (skinhpc/load.py) with real FFCV over a converted copy of the bundled sample.

Each FFCV loader spends seconds compiling, so the tests share a few module-scoped loaders.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from skinhpc.config import AugmentConfig, DataConfig
from skinhpc.load import FoldLoader, LoaderError, build_loader, epoch_order

SIZE = 48
BATCH = 16


@pytest.fixture(scope="module")
def data_dir(sample_data_dir: Path) -> Path:
    """The bundled sample converted once per session (tests/conftest.py): 426 images, 150x200."""
    return sample_data_dir


def _fold_rows() -> np.ndarray:
    """A fold-like subset: every third row, not sorted, so 'in order' means the given order."""
    rows = np.arange(1, 426, 3, dtype=np.int64)
    return np.concatenate([rows[40:], rows[:40]])


def _build(data_dir: Path, *, train: bool, loader: str = "ffcv", rows: np.ndarray | None = None,
           seed: int = 7, aug: AugmentConfig | None = None, batch_size: int = BATCH) -> FoldLoader:
    return build_loader(data_dir, _fold_rows() if rows is None else rows, train=train, batch_size=batch_size,
                        image_size=SIZE, data_cfg=DataConfig(loader=loader, num_workers=2),
                        aug_cfg=aug or AugmentConfig(), seed=seed, device="cpu", distributed=False,
                        channels_last=True)


@pytest.fixture(scope="module")
def train_loader(data_dir: Path) -> FoldLoader:
    return _build(data_dir, train=True)


@pytest.fixture(scope="module")
def eval_loader(data_dir: Path) -> FoldLoader:
    return _build(data_dir, train=False)


def _rows(batches: list) -> np.ndarray:
    return torch.cat([b.rows for b in batches]).numpy()


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x.images, y.images) and torch.equal(x.rows, y.rows)
                                    and torch.equal(x.labels, y.labels) for x, y in zip(a, b))


@pytest.mark.timeout(120)
def test_eval_loader_serves_every_requested_row_once_in_the_given_order(eval_loader: FoldLoader,
                                                                          data_dir: Path) -> None:
    from skinhpc.convert import read_index
    batches = list(eval_loader.epoch(0))
    rows = _fold_rows()
    assert len(eval_loader) == len(batches) == -(-len(rows) // BATCH)
    assert _rows(batches).tolist() == rows.tolist()
    labels = torch.cat([b.labels for b in batches]).numpy()
    assert labels.tolist() == read_index(data_dir)["label"].to_numpy()[rows].tolist()
    b = batches[0]
    assert b.images.shape == (BATCH, 3, SIZE, SIZE) and b.images.dtype == torch.float32
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.labels.dtype == b.rows.dtype == torch.int64
    assert _same(batches, list(eval_loader.epoch(3)))  # no randomness in evaluation


@pytest.mark.timeout(120)
def test_train_loader_serves_whole_batches_of_fold_rows_only(train_loader: FoldLoader) -> None:
    batches = list(train_loader.epoch(0))
    rows = _rows(batches)
    assert len(train_loader) == len(batches) == len(_fold_rows()) // BATCH
    assert all(len(b.rows) == BATCH for b in batches)
    assert len(set(rows.tolist())) == len(rows) and set(rows.tolist()) <= set(_fold_rows().tolist())
    images = torch.cat([b.images for b in batches])
    assert images.shape[1:] == (3, SIZE, SIZE) and bool(torch.isfinite(images).all())
    assert abs(float(images.mean())) < 1.5  # normalised, not [0, 255]


@pytest.mark.timeout(180)
def test_same_seed_and_epoch_give_identical_batches_even_from_a_new_loader(train_loader: FoldLoader,
                                                                           data_dir: Path) -> None:
    first = list(train_loader.epoch(2))
    assert _same(first, list(train_loader.epoch(2)))
    other_epoch = list(train_loader.epoch(3))
    assert _rows(first).tolist() != _rows(other_epoch).tolist()
    fresh = _build(data_dir, train=True)  # what a restarted job builds
    try:
        assert _same(first, list(fresh.epoch(2)))
    finally:
        fresh.close()


@pytest.mark.timeout(120)
def test_resumed_epoch_yields_exactly_the_tail_of_the_uninterrupted_epoch(train_loader: FoldLoader) -> None:
    full = list(train_loader.epoch(4))
    for k in (1, 3, len(full) - 1, len(full)):
        assert _same(full[k:], list(train_loader.epoch(4, start_step=k))), f"start_step={k}"


@pytest.mark.timeout(120)
def test_an_epoch_left_mid_way_leaves_no_loader_thread_running(train_loader: FoldLoader) -> None:
    before = threading.active_count()
    it = train_loader.epoch(5)
    next(it)
    it.close()  # what a `break` out of the for loop does
    assert threading.active_count() <= before
    full = list(train_loader.epoch(6))
    old = train_loader.epoch(6)
    next(old)
    new = train_loader.epoch(6)  # a new epoch stops the old one ...
    got = [next(new)]
    old.close()  # ... and the old one, closed late, leaves the new one running
    got += list(new)
    assert _same(full, got)
    assert threading.active_count() <= before


@pytest.mark.timeout(120)
def test_rows_outside_the_converted_data_are_rejected_naming_the_index(data_dir: Path) -> None:
    with pytest.raises(LoaderError, match="index.csv"):
        _build(data_dir, train=False, rows=np.array([0, 5, 426]))
    with pytest.raises(LoaderError, match="fewer than one batch"):
        _build(data_dir, train=True, rows=np.arange(5))


@pytest.mark.timeout(120)
def test_a_beton_deleted_after_conversion_is_a_loader_error_naming_it(data_dir: Path, tmp_path: Path) -> None:
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (copy / "ham10000.beton").unlink()
    with pytest.raises(LoaderError, match=r"ham10000.beton: not found, though .*manifest.json records it"):
        _build(copy, train=False, rows=np.array([0, 1]))


@pytest.mark.timeout(180)
def test_pil_loader_serves_the_same_rows_labels_and_pixels_as_ffcv(eval_loader: FoldLoader,
                                                                   train_loader: FoldLoader,
                                                                   data_dir: Path) -> None:
    pil_eval = _build(data_dir, train=False, loader="pil")
    pil_train = _build(data_dir, train=True, loader="pil")
    assert pil_eval.kind == "pil" and eval_loader.kind == "ffcv"
    assert len(pil_eval) == len(eval_loader) and len(pil_train) == len(train_loader)
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None] * 255  # back to 0..255 units
    for ffcv_batches, pil_batches in ((list(eval_loader.epoch(0)), list(pil_eval.epoch(0))),
                                      (list(train_loader.epoch(1)), list(pil_train.epoch(1)))):
        assert _rows(ffcv_batches).tolist() == _rows(pil_batches).tolist()
        for a, b in zip(ffcv_batches, pil_batches):
            assert torch.equal(a.labels, b.labels)
            diff = ((a.images - b.images) * std).abs()
            assert float(diff.mean()) < 2.0  # the .beton stores JPEG (quality 90) of the same pixels
    # Resume works the same way on the PIL path.
    assert _same(list(pil_train.epoch(1))[2:], list(pil_train.epoch(1, start_step=2)))
    import multiprocessing
    pil_eval.close()
    pil_train.close()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]  # workers stopped


@pytest.mark.timeout(120)
def test_loaders_leave_the_global_torch_rng_alone(data_dir: Path) -> None:
    """Dropout draws from the global RNG: a loader drawing from it too would make a resumed run
    (which starts its loader at another point of that stream) differ from an uninterrupted one."""
    for kind in ("pil", "ffcv"):
        loader = _build(data_dir, train=True, loader=kind)
        try:
            torch.manual_seed(0)
            state = torch.get_rng_state()
            for epoch in (0, 1):
                list(loader.epoch(epoch))
            assert torch.equal(torch.get_rng_state(), state), kind
        finally:
            loader.close()


@pytest.mark.timeout(60)
def test_pil_order_reproduces_ffcv_orders_under_ddp_sharding() -> None:
    rows = np.arange(10, 33, dtype=np.int64)  # 23 rows over 2 ranks: one padded duplicate
    shards = [epoch_order(rows, shuffle=True, seed=1, epoch=2, rank=r, world=2, distributed=True) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(rows.tolist())
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) <= 1


# ------------------------------------------------------------------------------ two processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data_dir: str, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        for train in (True, False):
            loader = build_loader(data_dir, _fold_rows(), train=train, batch_size=BATCH, image_size=SIZE,
                                  data_cfg=DataConfig(num_workers=1), aug_cfg=AugmentConfig(), seed=3,
                                  device="cpu", distributed=True, channels_last=False)
            result["train" if train else "eval"] = _rows(list(loader.epoch(1)))
            result[("train" if train else "eval") + "_len"] = np.array([len(loader)])
            loader.close()
        np.savez(Path(out) / f"rank{rank}.npz", **result)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes, each compiling FFCV's pipeline: 15-50 s
@pytest.mark.timeout(300)
def test_two_ranks_get_disjoint_shards_that_together_cover_the_fold(data_dir: Path, tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(data_dir), str(tmp_path)), nprocs=2)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    rows = set(_fold_rows().tolist())
    n = len(rows)
    # Evaluation: every row on exactly one rank, plus at most one padded duplicate.
    e0, e1 = r0["eval"].tolist(), r1["eval"].tolist()
    assert len(e0) == len(e1) == -(-n // 2)
    assert set(e0) | set(e1) == rows
    assert len(set(e0) & set(e1)) == len(e0) + len(e1) - n
    # Training: whole batches per rank, disjoint but for padding, same number of steps everywhere.
    t0, t1 = r0["train"].tolist(), r1["train"].tolist()
    assert r0["train_len"][0] == r1["train_len"][0] == (-(-n // 2)) // BATCH
    assert set(t0) <= rows and set(t1) <= rows
    assert len(set(t0) & set(t1)) <= len(e0) * 2 - n


@pytest.mark.timeout(180)
def test_quasi_random_order_depends_only_on_seed_and_epoch(data_dir: Path) -> None:
    loader = build_loader(data_dir, _fold_rows(), train=True, batch_size=BATCH, image_size=SIZE,
                          data_cfg=DataConfig(num_workers=2, quasi_random=True, os_cache=False),
                          aug_cfg=AugmentConfig(), seed=7, device="cpu", distributed=False, channels_last=False)
    try:
        first = _rows(list(loader.epoch(1)))
        _rows(list(loader.epoch(2)))  # FFCV's quasi-random order mutates state between epochs
        assert _rows(list(loader.epoch(1))).tolist() == first.tolist()
        assert _rows(list(loader.epoch(1, start_step=2))).tolist() == first[2 * BATCH:].tolist()
        assert set(first.tolist()) <= set(_fold_rows().tolist())
    finally:
        loader.close()


_WITHOUT_FFCV = """
import sys, numpy as np
sys.modules["ffcv"] = None  # as if FFCV were not installed: `import ffcv` raises ImportError
from skinhpc.config import AugmentConfig, DataConfig
from skinhpc.load import build_loader
loader = build_loader(sys.argv[1], np.arange(20), train=False, batch_size=8, image_size=16,
                      data_cfg=DataConfig(num_workers=1), aug_cfg=AugmentConfig(), seed=0, device="cpu",
                      distributed=False, channels_last=False)
rows = [r for b in loader.epoch(0) for r in b.rows.tolist()]
print(loader.kind, rows == list(range(20)))
"""


@pytest.mark.timeout(120)
def test_without_ffcv_the_pil_loader_is_used_after_one_warning_line(data_dir: Path) -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _WITHOUT_FFCV, str(data_dir)], capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pil", "True"]
    warnings = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "FFCV cannot be imported" in warnings[0] and "PIL" in warnings[0]


_TRAIN_WITHOUT_FFCV = """
import runpy, sys
sys.modules["ffcv"] = None  # as if FFCV were not installed
sys.argv = ["jobs/train.py", *sys.argv[1:]]
runpy.run_path("jobs/train.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_ffcv_a_fresh_machine_converts_the_sample_and_trains_on_the_pil_loader(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from skinhpc import REPO_DIR, SAMPLE_IMAGES, SAMPLE_METADATA
    from skinhpc.convert import BETON_NAME, convert, is_up_to_date, read_manifest

    data = tmp_path / "data"
    args = [f"run_dir={tmp_path / 'run'}", f"data.dir={data}", f"data.images=[{SAMPLE_IMAGES}]",
            f"data.metadata={SAMPLE_METADATA}", "model.backbone=resnet18", "model.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=2",
            "train.batch_size=8", "data.num_workers=1", "split.folds=2", "fold=0"]
    done = subprocess.run([sys.executable, "-c", _TRAIN_WITHOUT_FFCV, *args], capture_output=True, text=True,
                          timeout=280, cwd=REPO_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "resnet18" / "fold0" / "metrics.json").read_text())["status"] == "done"
    assert "FFCV is not installed" in done.stderr  # the conversion's line
    assert done.stderr.count("FFCV cannot be imported") == 1, done.stderr  # the loaders' line, once
    assert "Traceback" not in done.stderr
    assert not (data / BETON_NAME).exists() and read_manifest(data)["beton"] is None
    # Where FFCV can be imported, that conversion is not up to date: a rerun writes the .beton.
    settings = dict(max_resolution=256, write_mode="jpg", jpeg_quality=90)
    assert not is_up_to_date([SAMPLE_IMAGES], SAMPLE_METADATA, data, **settings)
    assert convert([SAMPLE_IMAGES], SAMPLE_METADATA, data, workers=2, **settings).status == "converted"
    assert (data / BETON_NAME).is_file() and is_up_to_date([SAMPLE_IMAGES], SAMPLE_METADATA, data, **settings)


def test_more_decoding_threads_than_this_machine_has_still_loads(data_dir: Path) -> None:
    # A config written for a 64-core node; numba alone would refuse it with "between 1 and N".
    loader = build_loader(data_dir, np.arange(32), train=False, batch_size=BATCH, image_size=SIZE,
                          data_cfg=DataConfig(num_workers=512), aug_cfg=AugmentConfig(), seed=0, device="cpu",
                          distributed=False, channels_last=False)
    try:
        assert _rows(list(loader.epoch(0))).tolist() == list(range(32))
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_the_loaders_worker_count_leaves_torchs_cpu_threads_alone(data_dir: Path, workers: int) -> None:
    # FFCV set torch's process-wide threads to its workers (from its loader thread, every epoch),
    # and the thread count changes CPU training results: data.num_workers is a neutral key.
    from skinhpc.config import available_cores
    loader = build_loader(data_dir, np.arange(32), train=True, batch_size=BATCH, image_size=SIZE,
                          data_cfg=DataConfig(num_workers=workers), aug_cfg=AugmentConfig(), seed=0, device="cpu",
                          distributed=False, channels_last=False)
    try:
        for _ in loader.epoch(0):
            assert torch.get_num_threads() == available_cores()
    finally:
        loader.close()


def test_the_pil_loader_reads_the_configured_copy_of_the_download_before_the_folder_the_manifest_names(
        tmp_path: Path) -> None:
    import pandas as pd

    from skinhpc.load import _image_paths
    original, copy = tmp_path / "original", tmp_path / "copy"
    for d in (original, copy):
        d.mkdir()
        (d / "ISIC_0000001.jpg").write_bytes(b"")
    index = pd.DataFrame({"image_id": ["ISIC_0000001"]})
    manifest = {"images": {"dirs": [str(original)]}}
    # The config's folders are the ones the conversion check compared (a copy, by its bytes).
    assert _image_paths(tmp_path, manifest, DataConfig(images=[str(copy)], metadata=str(tmp_path / "m.csv")), index, np.array([0])) == {
        0: copy / "ISIC_0000001.jpg"}
    assert _image_paths(tmp_path, manifest, DataConfig(), index, np.array([0])) == {0: original / "ISIC_0000001.jpg"}
