"""Training images/s per backbone: the real loop's data path (FFCV + device augmentation) against
synthetic input already on the device, side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py --data DATA_DIR \
        [--backbones resnet152 seresnext101_32x4d vgg16] [--image-size 224] [--batch-size 256] \
        [--steps 40] [--warmup 15] [--modes eager compiled] [--device cuda]

DATA_DIR is converted data (jobs/convert.py). For every backbone both contenders run the same
optimizer step (AdamW, bf16 autocast on CUDA / fp32 on CPU, channels-last, cudnn.benchmark, TF32):
``synthetic`` feeds one random batch that stays on the device; ``real`` draws every batch from one
training FoldLoader over all rows (FFCV decode, seeded random-resized crop and the paper's
augmentations on the device). The last line per backbone is ``ratio real/synthetic: R``; the target
on an H100 is R >= 0.9. CPU smoke run: ``--device cpu --backbones resnet18 --image-size 64
--batch-size 16 --steps 3 --warmup 1``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skinhpc.config import AugmentConfig, DataConfig, ModelConfig
from skinhpc.convert import read_manifest
from skinhpc.load import build_loader
from skinhpc.models import create_model


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="converted data folder (ham10000.beton, index.csv, manifest.json)")
    p.add_argument("--backbones", nargs="+", default=["resnet152", "seresnext101_32x4d", "vgg16"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (cudnn autotune, compile)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager"],
                   help="eager models and/or torch.compile'd ones (compiling takes a minute or more per backbone)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="FFCV decoding threads (0: every core)")
    args = p.parse_args(argv)
    if not (Path(args.data) / "manifest.json").is_file():
        p.error(f"--data {args.data}: no converted data there (manifest.json missing); run jobs/convert.py first")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(loader) -> Iterator:
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def _time_steps(model, opt, batches: Iterator, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of ``steps`` optimizer steps after ``warmup`` untimed ones."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    n_images = 0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start, n_images = time.perf_counter(), 0
        images, labels = next(batches)[:2]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_images += images.shape[0]
    _sync(device)
    return n_images / (time.perf_counter() - start)


def _model(backbone: str, image_size: int, device: torch.device, compiled: bool):
    model = create_model(ModelConfig(backbone=backbone, image_size=image_size)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return (torch.compile(model) if compiled else model), opt


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    data_dir = Path(args.data)
    rows = np.arange(int(read_manifest(data_dir)["n_images"]))
    loader = build_loader(data_dir, rows, train=True, batch_size=args.batch_size, image_size=args.image_size,
                          data_cfg=DataConfig(num_workers=args.workers), aug_cfg=AugmentConfig(), seed=0,
                          device=device, distributed=False, channels_last=True)
    real = _endless(loader)
    gen = torch.Generator().manual_seed(0)
    fake = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
            .contiguous(memory_format=torch.channels_last),
            torch.randint(0, 7, (args.batch_size,), generator=gen).to(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {len(rows)} images, {args.image_size}px, batch {args.batch_size}, loader {loader.kind}")
    for backbone, mode in itertools.product(args.backbones, args.modes):
        compiled = mode == "compiled"
        label = backbone + (" (compiled)" if compiled else "")
        model, opt = _model(backbone, args.image_size, device, compiled)
        synthetic = _time_steps(model, opt, itertools.repeat(fake), args.steps, args.warmup, device)
        with_data = _time_steps(model, opt, real, args.steps, args.warmup, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        print(f"{label:<32} synthetic {synthetic:8.0f} img/s   real data {with_data:8.0f} img/s   "
              f"peak {peak:5.1f} GiB   ratio real/synthetic: {with_data / synthetic:.2f}", flush=True)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    loader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
