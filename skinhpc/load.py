"""Batches of one fold from the converted data: FFCV (or a PIL fallback) -> seeded device transforms.

``build_loader`` is called once per job and per split (train, val, test): every new FFCV ``Loader``
spends seconds in numba compilation, and loaders re-created or abandoned mid-epoch leak threads
(FFCV #345/#393). The fold is served from the one ``.beton`` with ``indices=rows``.

Exact resume: the order of an epoch depends only on (seed, epoch) — FFCV's own traversal orders,
restarted at ``next_epoch = epoch`` — and every random augmentation parameter is drawn from a
generator seeded by (seed, epoch, step, rank). ``epoch(e, start_step=k)`` therefore yields exactly
batches k.. of ``epoch(e)``; the skipped samples are never read.

The PIL fallback (``data.loader=pil``, or FFCV not importable) decodes the source JPEGs listed in
index.csv with ``convert.prepare_image`` (the pixels conversion stored, before FFCV's JPEG
compression) and reproduces FFCV's orders exactly, so both paths serve the same batches.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

import skinhpc
from skinhpc.augment import (apply_params, batch_generator, centre_square, crop_resize_uint8, draw_params,
                             eval_transform, normalize)
from skinhpc.config import AugmentConfig, DataConfig, available_cores


class Batch(NamedTuple):
    images: torch.Tensor
    """float32 (N, 3, S, S), ImageNet-normalised, on the device."""
    labels: torch.Tensor
    """int64 (N,) class indices (skinhpc.CLASSES)."""
    rows: torch.Tensor
    """int64 (N,) rows of index.csv / samples of the .beton (padded duplicates under DDP)."""


class LoaderError(ValueError):
    """The loader cannot be built as asked (bad rows, batch larger than the fold, no FFCV ...)."""



def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise LoaderError("distributed=True needs torch.distributed initialised (init_process_group) first")
    return dist.get_rank(), dist.get_world_size()


class _Source(Protocol):
    """Uint8 batches of one rank in a (seed, epoch) order: what FFCV or the PIL path provides."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images uint8 NHWC, labels, rows) of batches start_step.. of ``epoch``."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ FFCV

class _SkipOrder:
    """Stands in for an FFCV traversal order for one ``iter()``: the epoch's order, cut as FFCV
    would cut it (whole batches only with drop_last), without its first ``skip`` samples."""

    def __init__(self, base: Any, skip: int, keep: int) -> None:
        self.base, self.skip, self.keep = base, skip, keep

    def sample_order(self, epoch: int) -> Sequence[int]:
        if hasattr(self.base, "prepare_data_structures"):
            # QUASI_RANDOM shuffles its page table in place, so its order would depend on the
            # epochs drawn before; rebuilt from the reader's pages it depends on (seed, epoch) only.
            self.base.prepare_data_structures()
        return self.base.sample_order(epoch)[: self.keep][self.skip:]


def _close_epoch_iterator(it: Any) -> None:
    """Stop FFCV's producer thread of an epoch left early, so no thread or buffer leaks.

    FFCV's own ``close`` only sets a flag; a producer blocked on a full queue at the epoch's end
    would wait forever, so drain the queue until the thread has ended.
    """
    it.terminate_event.set()
    while it.is_alive():
        try:
            while True:
                it.output_queue.get_nowait()
        except Exception:  # queue.Empty
            pass
        it.join(timeout=0.05)
    it.close()


def _ffcv_leaves_torch_threads() -> None:
    """FFCV's ``Compiler.set_num_threads`` sets numba's threads and also torch's process-wide CPU
    threads: to 1 at import, then to the loader's workers from its loader thread at every epoch.
    The thread count changes CPU results, so training depended on ``data.num_workers`` (a neutral
    key). Here it sets numba's only, and torch keeps the cores this process may use (what it got
    from FFCV before with the default workers, so default runs are unchanged)."""
    import numba
    from ffcv.pipeline.compiler import Compiler

    if not getattr(Compiler, "_skinhpc_numba_only", False):
        def set_num_threads(cls: Any, n: int) -> None:
            cls.num_threads = n if n >= 1 else (os.cpu_count() or 1)
            numba.set_num_threads(cls.num_threads)

        Compiler.set_num_threads = classmethod(set_num_threads)
        Compiler._skinhpc_numba_only = True
    torch.set_num_threads(available_cores())


class _FFCVSource:
    def __init__(self, beton: Path, rows: np.ndarray, *, train: bool, batch_size: int, data_cfg: DataConfig,
                 seed: int, distributed: bool, device: torch.device) -> None:
        _ffcv_leaves_torch_threads()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor

        if train:
            order = OrderOption.QUASI_RANDOM if data_cfg.quasi_random else OrderOption.RANDOM
        else:
            order = OrderOption.SEQUENTIAL
        if order == OrderOption.QUASI_RANDOM and distributed:
            raise LoaderError("data.quasi_random is not supported by FFCV with several processes;"
                              " set data.quasi_random=false")
        image_ops: list[Any] = [SimpleRGBImageDecoder(), ToTensor()]
        if device.type == "cuda":  # copied on FFCV's own CUDA stream, overlapping with compute
            image_ops.append(ToDevice(device, non_blocking=True))
        # numba (FFCV's threads) refuses more threads than it has; a config written for a bigger
        # node then still runs here.
        import numba
        workers = min(data_cfg.num_workers or available_cores(), numba.config.NUMBA_NUM_THREADS)
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=workers,
            os_cache=data_cfg.os_cache, order=order, distributed=distributed, seed=seed,
            indices=rows, drop_last=train,
            pipelines={"image": image_ops, "label": [IntDecoder(), ToTensor()], "row": [IntDecoder(), ToTensor()]},
        )
        self.batch_size = batch_size
        self.n_batches = len(self.loader)
        self._live: Any = None

    def __len__(self) -> int:
        return self.n_batches

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if start_step >= self.n_batches:
            return
        self.close()  # an earlier epoch left mid-way
        loader = self.loader
        base = loader.traversal_order
        loader.traversal_order = _SkipOrder(base, start_step * self.batch_size, self.n_batches * self.batch_size)
        loader.next_epoch = epoch
        try:
            it = iter(loader)
        finally:
            loader.traversal_order = base
        self._live = it
        try:
            for images, labels, rows in it:
                yield images, labels.reshape(-1), rows.reshape(-1)
        finally:
            if self._live is it:  # else a newer epoch already stopped this one
                self.close()

    def close(self) -> None:
        if self._live is not None:
            it, self._live = self._live, None
            _close_epoch_iterator(it)


# ------------------------------------------------------------------------------ PIL fallback

def epoch_order(rows: np.ndarray, *, shuffle: bool, seed: int, epoch: int, rank: int, world: int,
                distributed: bool) -> np.ndarray:
    """This rank's sample order for an epoch, exactly as FFCV's RANDOM/SEQUENTIAL orders make it."""
    if not distributed:
        return np.random.default_rng(seed + epoch).permutation(rows) if shuffle else rows
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return rows[np.array(list(sampler), dtype=np.int64)]


class _PILDataset(torch.utils.data.Dataset):
    """Beton row -> (uint8 HWC tensor of the stored size, label, row), decoded with PIL."""

    def __init__(self, paths: dict[int, Path], labels: dict[int, int], stored_size: list[int]) -> None:
        self.paths, self.labels, self.stored_size = paths, labels, stored_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int]:
        from skinhpc.convert import prepare_image
        return torch.from_numpy(prepare_image(self.paths[row], self.stored_size)), self.labels[row], row


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of beton rows for the epoch set by ``set_epoch`` (a mutable batch sampler lets the
    DataLoader keep its worker processes between epochs)."""

    def __init__(self, order_for: Any, batch_size: int, n_batches: int) -> None:
        self.order_for, self.batch_size, self.n_batches = order_for, batch_size, n_batches
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.n_batches - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order_for(self.epoch)
        for step in range(self.start_step, self.n_batches):
            yield [int(r) for r in order[step * self.batch_size:(step + 1) * self.batch_size]]


def _image_paths(data_dir: Path, manifest: dict[str, Any], data_cfg: DataConfig, index: Any,
                 rows: np.ndarray) -> dict[int, Path]:
    """Source JPEG of every requested row: the config's folders (those ensure_converted just
    checked against the conversion, e.g. a copy of the download), else the ones the manifest
    records (a data.dir given alone), else the sample's."""
    dirs = [Path(d) for d in data_cfg.images] + [Path(d) for d in manifest.get("images", {}).get("dirs", [])]
    dirs += [skinhpc.SAMPLE_IMAGES]
    from skinhpc.convert import image_files

    dirs = [d for d in dirs if d.is_dir()]
    files = image_files(dirs)  # the conversion's own lookup: any image suffix, in any case
    paths, missing = {}, []
    for row in rows:
        image_id = index.at[int(row), "image_id"]
        if image_id in files:
            paths[int(row)] = files[image_id][0]
        else:
            missing.append(f"{image_id} (row {row} of {data_dir / 'index.csv'})")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoaderError(f"PIL loader: source image(s) not found in {', '.join(map(str, dirs)) or 'any folder'}:"
                          f" {shown}; set data.images to the folders of the raw JPEGs")
    return paths


class _PILSource:
    def __init__(self, data_dir: Path, rows: np.ndarray, *, train: bool, batch_size: int, data_cfg: DataConfig,
                 seed: int, distributed: bool, device: torch.device, manifest: dict[str, Any], index: Any) -> None:
        rank, world = _rank_world(distributed)
        labels = {int(r): int(index.at[int(r), "label"]) for r in rows}
        dataset = _PILDataset(_image_paths(data_dir, manifest, data_cfg, index, rows), labels,
                              list(manifest["stored_size"]))
        per_rank = math.ceil(len(rows) / world) if distributed else len(rows)
        n_batches = per_rank // batch_size if train else math.ceil(per_rank / batch_size)

        def order_for(epoch: int) -> np.ndarray:
            return epoch_order(rows, shuffle=train, seed=seed, epoch=epoch, rank=rank, world=world,
                               distributed=distributed)

        self.sampler = _EpochBatches(order_for, batch_size, n_batches)
        workers = data_cfg.num_workers or available_cores()
        # Forking a process in which FFCV's numba thread pool runs is unsafe (numba warns): then the
        # workers come from a fresh forkserver (which, like spawn, needs the usual __main__ guard).
        context = "forkserver" if "numba" in sys.modules else None
        # Its own generator: a DataLoader iterator otherwise draws its workers' seed from the global
        # torch RNG, which dropout uses too, so a resumed run (one iterator fewer) would drift.
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                                  persistent_workers=True, multiprocessing_context=context,
                                                  pin_memory=device.type == "cuda",
                                                  generator=torch.Generator().manual_seed(seed))
        self.n_batches = n_batches

    def __len__(self) -> int:
        return self.n_batches

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if start_step >= self.n_batches:
            return
        self.sampler.set_epoch(epoch, start_step)
        for images, labels, rows in self.loader:
            yield images, labels, rows

    def close(self) -> None:
        # The persistent worker processes otherwise live as long as the DataLoader object.
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            self.loader._iterator = None


# ------------------------------------------------------------------------------ the loader

class FoldLoader:
    """Batches of one fold split (train, val or test) for one rank; see ``build_loader``."""

    def __init__(self, source: _Source, *, train: bool, image_size: int, aug_cfg: AugmentConfig, seed: int,
                 rank: int, device: torch.device, channels_last: bool, kind: str) -> None:
        self.source, self.train, self.image_size, self.aug_cfg = source, train, image_size, aug_cfg
        self.seed, self.rank, self.device, self.channels_last = seed, rank, device, channels_last
        self.kind = kind
        """ffcv or pil."""
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.source)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches ``start_step``.. of ``epoch``: normalised float NCHW images, labels, rows on the device."""
        self._check(epoch, start_step)
        for step, (images, labels, rows) in enumerate(self.source.batches(epoch, start_step), start_step):
            images = images.to(self.device, non_blocking=True)
            if self.train:
                gen = batch_generator(self.seed, epoch, step, self.rank)
                params = draw_params(gen, images.shape[0], images.shape[1], images.shape[2], self.aug_cfg)
                x = apply_params(images, params, self.image_size, self.aug_cfg)
            else:
                x = eval_transform(images, self.image_size)
            yield Batch(normalize(x, self.channels_last), self._ints(labels), self._ints(rows))

    def crops(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The cheap CPU variant of ``epoch``: uint8 NHWC crops (training: the same random crops and
        flips as ``epoch``, no other augmentation; eval: the centre square), on the CPU."""
        self._check(epoch, start_step)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, available_cores()), thread_name_prefix="skinhpc-crop")
        for step, (images, labels, rows) in enumerate(self.source.batches(epoch, start_step), start_step):
            arr = images.cpu().numpy()
            n, height, width, _ = arr.shape
            if self.train:
                params = draw_params(batch_generator(self.seed, epoch, step, self.rank), n, height, width, self.aug_cfg)
                out = crop_resize_uint8(arr, params.boxes.numpy(), self.image_size, params.hflip.numpy(),
                                        params.vflip.numpy(), pool=self._pool)
            else:
                top, left, side = centre_square(height, width)
                boxes = np.tile(np.array([[top, left, side, side]]), (n, 1))
                out = crop_resize_uint8(arr, boxes, self.image_size, pool=self._pool)
            yield Batch(torch.from_numpy(out), labels.to(torch.int64, copy=True), rows.to(torch.int64, copy=True))

    def _check(self, epoch: int, start_step: int) -> None:
        if epoch < 0 or start_step < 0:
            raise ValueError(f"epoch and start_step must be >= 0, got {epoch}, {start_step}")

    def _ints(self, t: torch.Tensor) -> torch.Tensor:
        # A copy always: FFCV reuses its output buffers a few batches later.
        return t.reshape(-1).to(self.device, torch.int64, copy=True)

    def close(self) -> None:
        """Stop any epoch left mid-way and the crop threads."""
        self.source.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _use_ffcv(data_cfg: DataConfig, data_dir: Path, manifest: dict[str, Any]) -> bool:
    """FFCV unless data.loader=pil, FFCV cannot be imported, or the data was converted without it
    (no .beton); data.loader=ffcv insists (an error instead of the one-line warning)."""
    from skinhpc.convert import ffcv_import_error
    if data_cfg.loader == "pil":
        return False
    why = ffcv_import_error()
    if why:
        why = f"FFCV cannot be imported ({why})"
    elif manifest.get("beton", {}) is None:
        why = f"{data_dir} was converted without FFCV (no .beton; rerun jobs/convert.py to write it)"
    if not why:
        return True
    if data_cfg.loader == "ffcv":
        raise LoaderError(f"data.loader=ffcv but {why}")
    if why not in _WARNED:  # once per job, not once per loader (train, val, test)
        _WARNED.add(why)
        print(f"warning: {why}; using the slower PIL loader", file=sys.stderr, flush=True)
    return False


_WARNED: set[str] = set()


def _checked_rows(rows: Sequence[int] | np.ndarray, n_samples: int, data_dir: Path) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise LoaderError(f"rows must be a non-empty 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= n_samples)]
    if bad.size:
        raise LoaderError(f"rows {bad[:5].tolist()} are outside 0..{n_samples - 1} of {data_dir / 'index.csv'}")
    if np.unique(arr).size != arr.size:
        raise LoaderError("rows must not repeat")
    return arr.astype(np.int64)


def build_loader(data_dir: str | Path, rows: Sequence[int] | np.ndarray, *, train: bool, batch_size: int,
                 image_size: int, data_cfg: DataConfig, aug_cfg: AugmentConfig, seed: int,
                 device: str | torch.device, distributed: bool, channels_last: bool) -> FoldLoader:
    """A loader of ``rows`` of the converted data in ``data_dir``; build it once per job.

    ``train``: a (seed, epoch) random order, whole batches only, random augmentation; otherwise
    every row once in the given order (padded by wrapping under ``distributed``), centre crops.
    """
    from skinhpc.convert import BETON_NAME, read_index, read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    rows = _checked_rows(rows, int(manifest["n_images"]), data_dir)
    if batch_size < 1 or seed < 0:
        raise LoaderError(f"batch_size must be >= 1 and seed >= 0, got {batch_size}, {seed}")
    device = torch.device(device)
    rank, world = _rank_world(distributed)
    per_rank = math.ceil(len(rows) / world)
    if train and per_rank < batch_size:
        raise LoaderError(f"{len(rows)} training images ({per_rank} per process) are fewer than one batch of"
                          f" {batch_size}; lower train.batch_size")
    common = dict(train=train, batch_size=batch_size, data_cfg=data_cfg, seed=seed, distributed=distributed)
    if _use_ffcv(data_cfg, data_dir, manifest):
        if not (data_dir / BETON_NAME).is_file():  # FFCV's own error is a traceback deep in its reader
            raise LoaderError(f"{data_dir / BETON_NAME}: not found, though {data_dir / 'manifest.json'} records "
                              "it; convert the data again (jobs/convert.py), or relaunch with data.images set")
        source: _Source = _FFCVSource(data_dir / BETON_NAME, rows, device=device, **common)
        kind = "ffcv"
    else:
        source = _PILSource(data_dir, rows, device=device, manifest=manifest, index=read_index(data_dir), **common)
        kind = "pil"
    return FoldLoader(source, train=train, image_size=image_size, aug_cfg=aug_cfg, seed=seed, rank=rank,
                      device=device, channels_last=channels_last, kind=kind)
