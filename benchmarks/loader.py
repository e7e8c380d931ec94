"""Images/s of skinhpc's FFCV loader against PIL/torchvision baselines, all in one run.

    .venv/bin/python benchmarks/loader.py [--images DIR ... --metadata CSV] [--epochs N] [--batch-size 64]

Without --images/--metadata it uses the bundled 200x150 sample. The images are listed several times
(--min-images) so that an epoch has enough batches for stable timings, then converted into a temp
folder (conversion img/s is reported). Every contender yields the same thing: batches of 224x224
uint8 random-resized crops (+ random flips), batch 64:

  (a) FFCV jpg .beton (max res 256) through FoldLoader.crops: FFCV decodes the stored images, the
      crop boxes and flips come from the seeded generator and OpenCV crops (no float conversion,
      normalisation or other augmentations; the full float path is reported separately)
  (b) the same with a raw .beton
  (c) PIL + torchvision on the original JPEGs (DataLoader, RandomResizedCrop + flip, one worker per core)
  (d) the strongest simple baseline: JPEGs pre-resized to 256 px, decoded with torchvision.io.decode_jpeg
      in a DataLoader, RandomResizedCrop + flip on the uint8 tensor
  (e), (f) FFCV jpg / raw, decoding only: uint8 batches at the stored size, no crop. This is all the
      CPU does for a GPU training task (crops and augmentations run on the GPU); run with
      --workers 1 for the one FFCV thread each of several tasks sharing a GPU gets

A warm-up epoch each (FFCV's numba compilation, worker start-up), then --epochs epochs; the median is
reported. The last line is ``ratio ffcv/baseline: R`` = (a) / (c); the ratio against (d) comes before.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

import skinhpc


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=[], help="folders of the raw JPEGs (default: the bundled sample)")
    p.add_argument("--metadata", default="", help="HAM10000 metadata CSV listing the images")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs after the warm-up (median reported)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="side of the crops")
    p.add_argument("--max-resolution", type=int, default=256, help="long side of the stored images")
    p.add_argument("--min-images", type=int, default=2048, help="list the images again until an epoch has this many")
    p.add_argument("--workers", type=int, default=0, help="decoding threads/processes (0: every core)")
    p.add_argument("--skip-full", action="store_true", help="skip the full float training path measurement")
    args = p.parse_args(argv)
    if bool(args.images) != bool(args.metadata):
        p.error("--images and --metadata go together")
    missing = [x for x in args.images if not Path(x).is_dir()] + ([args.metadata] if args.metadata and
                                                                  not Path(args.metadata).is_file() else [])
    if missing:
        p.error(f"not found: {', '.join(missing)}")
    return args


def _repeated_inputs(images: list[str], metadata: str, min_images: int, tmp: Path) -> tuple[Path, Path, list[Path]]:
    """A folder of symlinks and a metadata CSV listing every image ``k`` times under new ids."""
    with open(metadata, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        records = list(reader)
    sources = {}
    for folder in images:
        for path in Path(folder).glob("*.jpg"):
            sources[path.stem] = path.resolve()
    records = [r for r in records if r["image_id"] in sources]
    if not records:
        sys.exit(f"no image of {metadata} found in {', '.join(images)}")
    repeat = max(1, -(-min_images // len(records)))
    folder, csv_path = tmp / "images", tmp / "metadata.csv"
    folder.mkdir()
    links: list[Path] = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for k in range(repeat):
            for r in records:
                new_id = f"{r['image_id']}_r{k}"
                link = folder / f"{new_id}.jpg"
                link.symlink_to(sources[r["image_id"]])
                links.append(link)
                writer.writerow({**r, "image_id": new_id, "lesion_id": f"{r['lesion_id']}_r{k}"})
    return folder, csv_path, links


def _timed(name: str, epoch: Callable[[int], Iterable], n_epochs: int, batch: int) -> float:
    """Median images/s over ``n_epochs`` timed epochs after one warm-up epoch."""
    t0 = time.perf_counter()
    n = sum(len(b[0]) for b in epoch(0))
    print(f"  {name}: warm-up epoch {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
    rates = []
    for e in range(1, n_epochs + 1):
        t0 = time.perf_counter()
        n = sum(len(b[0]) for b in epoch(e))
        rates.append(n / (time.perf_counter() - t0))
    med = statistics.median(rates)
    print(f"  {name}: {med:,.0f} img/s (epochs: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    return med


# ------------------------------------------------------------------------------ baselines

class _PILOriginals(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        from torchvision.transforms import v2
        self.paths = paths
        self.transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                                     v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


class _DecodeJpeg(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        from torchvision.transforms import v2
        self.paths = paths
        self.transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import decode_jpeg, read_file
        return self.transform(decode_jpeg(read_file(str(self.paths[i])))), 0


def _pre_resized(links: list[Path], max_res: int, tmp: Path) -> list[Path]:
    """Each distinct source resized once to ``max_res`` long side (JPEG quality 90); list repeated."""
    from PIL import Image
    folder = tmp / "resized"
    folder.mkdir()
    done: dict[Path, Path] = {}
    out = []
    for link in links:
        src = link.resolve()
        if src not in done:
            with Image.open(src) as im:
                im = im.convert("RGB")
                s = min(1.0, max_res / max(im.size))
                im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR)
                done[src] = folder / src.name
                im.save(done[src], quality=90)
        out.append(done[src])
    return out


def _dataloader_epochs(dataset: torch.utils.data.Dataset, batch: int, workers: int) -> Callable[[int], Iterable]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=True)
    return lambda epoch: loader


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import cv2
    cv2.setNumThreads(1)  # our crop threads already use every core; OpenCV's own pool would oversubscribe

    from skinhpc.config import AugmentConfig, DataConfig
    from skinhpc.convert import convert
    from skinhpc.config import available_cores
    from skinhpc.load import build_loader

    workers = args.workers or available_cores()
    images = args.images or [str(skinhpc.SAMPLE_IMAGES)]
    metadata = args.metadata or str(skinhpc.SAMPLE_METADATA)
    print(f"machine: {available_cores()} cores ({os.cpu_count()} CPUs), torch {torch.__version__};"
          f" batch {args.batch_size}, {args.size}x{args.size} crops, {workers} workers;"
          f" load average {os.getloadavg()[0]:.1f} (other processes distort timings)", flush=True)
    with tempfile.TemporaryDirectory(prefix="skinhpc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        folder, csv_path, links = _repeated_inputs(images, metadata, args.min_images, tmp)
        print(f"inputs: {len(links)} images ({len(set(p.resolve() for p in links))} distinct files)", flush=True)
        results = {}
        for mode in ("jpg", "raw"):
            res = convert([folder], csv_path, tmp / mode, max_resolution=args.max_resolution, write_mode=mode,
                          workers=workers)
            size_mb = (tmp / mode / "ham10000.beton").stat().st_size / 1e6
            print(f"conversion ({mode}): {res.n_images} images to {res.stored_size[0]}x{res.stored_size[1]}"
                  f" in {res.seconds:.1f} s = {res.images_per_s:,.0f} img/s; .beton {size_mb:.0f} MB", flush=True)

        print("(c) PIL + torchvision on the original JPEGs", flush=True)
        results["c"] = _timed("PIL originals", _dataloader_epochs(_PILOriginals(links, args.size), args.batch_size,
                                                                  workers), args.epochs, args.batch_size)
        print("(d) pre-resized 256 px JPEGs + torchvision.io.decode_jpeg", flush=True)
        resized = _pre_resized(links, args.max_resolution, tmp)
        results["d"] = _timed("decode_jpeg pre-resized", _dataloader_epochs(_DecodeJpeg(resized, args.size),
                                                                            args.batch_size, workers),
                              args.epochs, args.batch_size)

        rows = np.arange(len(links))
        data_cfg = DataConfig(loader="ffcv", num_workers=workers)
        loaders = {}
        for key, mode in (("a", "jpg"), ("b", "raw")):
            print(f"({key}) FFCV {mode} .beton, FoldLoader.crops (uint8 crop + flips)", flush=True)
            loader = build_loader(tmp / mode, rows, train=True, batch_size=args.batch_size, image_size=args.size,
                                  data_cfg=data_cfg, aug_cfg=AugmentConfig(), seed=0, device="cpu",
                                  distributed=False, channels_last=True)
            results[key] = _timed(f"FFCV {mode}", loader.crops, args.epochs, args.batch_size)
            loaders[mode] = loader
        for key, mode in (("e", "jpg"), ("f", "raw")):
            # What a GPU training task asks of its CPU: the crops and augmentations run on the GPU.
            print(f"({key}) FFCV {mode} .beton, decoding only (uint8 batches at the stored size)", flush=True)
            source = loaders[mode].source
            results[key] = _timed(f"FFCV {mode} decode", lambda e, s=source: s.batches(e, 0), args.epochs,
                                  args.batch_size)
        if not args.skip_full:
            print("(a+) FFCV jpg, full FoldLoader.epoch: float, all augmentations, normalised, on the CPU", flush=True)
            results["a+"] = _timed("FFCV jpg full path", loaders["jpg"].epoch, min(args.epochs, 2), args.batch_size)
        for loader in loaders.values():
            loader.close()

    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")
    print("summary (images/s):", ", ".join(f"({k}) {v:,.0f}" for k, v in results.items()))
    print(f"ratio ffcv raw/baseline: {results['b'] / results['c']:.1f}")
    print(f"ratio ffcv/pre-resized-baseline: {results['a'] / results['d']:.2f}")
    print(f"ratio ffcv/baseline: {results['a'] / results['c']:.1f}")


if __name__ == "__main__":
    main()
