"""Batched, seeded image transforms on the training device.

FFCV (or the PIL fallback) delivers uint8 NHWC batches of the stored size; everything random happens
here, drawn from a CPU ``torch.Generator`` seeded per batch by (seed, epoch, step, rank). Parameters
are drawn on the CPU, in a fixed order and for every sample whether or not an augmentation is on, so
a CPU and a GPU run draw the same crops and flips, and a resumed run the same as an uninterrupted one.

Training: one ``grid_sample`` per batch does the random resized crop, the flips, the paper's affine
augmentation (rotation, translation, zoom) and the elastic distortion; then blur, brightness,
contrast, colour-channel shift and noise as tensor ops. Evaluation: the largest centred square,
resized (antialiased) to the network's input size. ``normalize`` applies the ImageNet statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from skinhpc.config import AugmentConfig, elastic_grid_points

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


def batch_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, epoch, step, rank).

    SeedSequence mixes the four numbers, so neighbouring steps or ranks get unrelated streams.
    """
    if min(seed, epoch, step, rank) < 0:
        raise ValueError(f"seed, epoch, step and rank must be >= 0, got {(seed, epoch, step, rank)}")
    state = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass
class AugmentParams:
    """Per-sample random parameters of one training batch (CPU tensors, first dim = batch)."""

    boxes: torch.Tensor
    """(N, 4) int64 crop boxes ``[top, left, height, width]`` in stored-image pixels."""
    hflip: torch.Tensor
    vflip: torch.Tensor
    affine: torch.Tensor
    """(N,) bool: rotation/translation/zoom applied to this sample."""
    angle: torch.Tensor
    """(N,) radians."""
    shift: torch.Tensor
    """(N, 2) translation (x, y) as a fraction of the side."""
    zoom: torch.Tensor
    elastic: torch.Tensor
    elastic_field: torch.Tensor
    """(N, 2, g, g) control-point displacements in [-1, 1] (scaled by elastic_alpha when applied)."""
    brightness: torch.Tensor
    contrast: torch.Tensor
    color_shift: torch.Tensor
    """(N, 3) additive shift per channel."""
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    noise: torch.Tensor
    noise_seed: int
    """Seed of the device generator that draws the noise pixels (too many to ship from the CPU)."""


def _rand(gen: torch.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform [0, 1) float64 numbers from the batch's torch generator, as numpy.

    The arithmetic on them is done in numpy on purpose: small torch CPU ops (exp, sqrt, cos)
    stall for milliseconds each while FFCV's decoding threads keep the cores busy (measured: 10 ms
    per op, which halved the loader's throughput); numpy's are single-threaded and take microseconds.
    """
    return torch.rand(shape, generator=gen, dtype=torch.float64).numpy()


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
    return _rand(gen, shape) * (high - low) + low


def sample_crop_boxes(gen: torch.Generator, n: int, height: int, width: int,
                      scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision's RandomResizedCrop box choice, vectorised: (N, 4) int64 ``[top, left, h, w]``.

    Ten attempts per sample (area fraction uniform in ``scale``, log-uniform aspect ratio in
    ``ratio``); the first that fits wins, else the whole image clamped to the ratio range, centred.
    """
    area = height * width
    target = area * _uniform(gen, (n, _CROP_ATTEMPTS), scale[0], scale[1])
    aspect = np.exp(_uniform(gen, (n, _CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1])))
    w_all = np.round(np.sqrt(target * aspect))
    h_all = np.round(np.sqrt(target / aspect))
    fits = (w_all > 0) & (w_all <= width) & (h_all > 0) & (h_all <= height)
    first = np.argmax(fits, axis=1)  # the first attempt that fits (0 when none does)
    w = w_all[np.arange(n), first]
    h = h_all[np.arange(n), first]
    any_fit = fits.any(axis=1)
    # Fallback as torchvision: the whole image, clamped to the allowed aspect ratios.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = np.where(any_fit, w, fw)
    h = np.where(any_fit, h, fh)
    u = _rand(gen, (n, 2))
    top = np.where(any_fit, np.floor(u[:, 0] * (height - h + 1)), (height - h) // 2)
    left = np.where(any_fit, np.floor(u[:, 1] * (width - w + 1)), (width - w) // 2)
    return torch.from_numpy(np.stack([top, left, h, w], axis=1).astype(np.int64))


def elastic_grid_size(cfg: AugmentConfig) -> int:
    """Control points per side of the elastic field: one per ``elastic_sigma`` of the side."""
    return elastic_grid_points(cfg.elastic_sigma)


def draw_params(gen: torch.Generator, n: int, height: int, width: int, cfg: AugmentConfig) -> AugmentParams:
    """Draw every random parameter of a batch of ``n`` images of ``height`` x ``width``.

    The order and sizes of the draws never depend on the config's switches, so turning one
    augmentation off leaves the others' parameters unchanged.
    """
    boxes = sample_crop_boxes(gen, n, height, width, tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
    coins = _rand(gen, (n, 6))
    g = elastic_grid_size(cfg)
    t = torch.from_numpy
    return AugmentParams(
        boxes=boxes,
        hflip=t(coins[:, 0] < cfg.hflip),
        vflip=t(coins[:, 1] < cfg.vflip),
        affine=t(coins[:, 2] < cfg.affine_p),
        angle=t(_uniform(gen, (n,), -1.0, 1.0) * math.radians(cfg.rotation)),
        shift=t(_uniform(gen, (n, 2), -1.0, 1.0) * cfg.translate),
        zoom=t(_uniform(gen, (n,), cfg.scale[0], cfg.scale[1])),
        elastic=t(coins[:, 3] < cfg.elastic_p),
        elastic_field=t(_uniform(gen, (n, 2, g, g), -1.0, 1.0).astype(np.float32)),
        brightness=t(_uniform(gen, (n,), -1.0, 1.0) * cfg.brightness),
        contrast=t(1.0 + _uniform(gen, (n,), -1.0, 1.0) * cfg.contrast),
        color_shift=t(_uniform(gen, (n, 3), -1.0, 1.0) * cfg.color_shift),
        blur=t(coins[:, 4] < cfg.blur_p),
        blur_sigma=t(_uniform(gen, (n,), cfg.blur_sigma[0], cfg.blur_sigma[1])),
        noise=t(coins[:, 5] < cfg.noise_p),
        noise_seed=int(torch.randint(0, 2**62, (1,), generator=gen).item()),
    )


# ------------------------------------------------------------------------------ geometry

def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 1]."""
    return x.float().div_(255.0)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 NHWC batch -> float NCHW in [0, 1].

    On the CPU the uint8 channels-last kernel (what torchvision uses) is several times faster than
    converting to float first; on a GPU it is float.
    """
    x = images.permute(0, 3, 1, 2)  # NCHW view, channels-last memory
    if tuple(x.shape[-2:]) == tuple(size):
        return _to_float(x)
    if x.device.type == "cpu":
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return _to_float(x)
    return F.interpolate(_to_float(x), size=size, mode="bilinear", antialias=True, align_corners=False)


def _prescaled_float(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 NHWC -> float NCHW [0, 1], shrunk (antialiased) when over twice the output size.

    grid_sample does not antialias; with at most 2x downsampling left its aliasing is mild.
    Crops are given in normalised coordinates, so scaling the whole image changes nothing else.
    """
    height, width = images.shape[1:3]
    short = min(height, width)
    if short <= 2 * out_size:
        return _to_float(images.permute(0, 3, 1, 2))
    f = 2 * out_size / short
    return _resize(images, (max(1, round(height * f)), max(1, round(width * f))))


def _thetas(params: AugmentParams, height: int, width: int, use_affine: bool) -> torch.Tensor:
    """(N, 2, 3) maps from output to input normalised coordinates: affine, then flip, then crop.

    Computed in numpy (see ``_rand``: small torch CPU ops stall next to FFCV's threads)."""
    top, left, h, w = params.boxes.numpy().astype(np.float64).T
    n = len(top)
    linear = np.tile(np.eye(2), (n, 1, 1))
    offset = np.zeros((n, 2))
    if use_affine:
        on = params.affine.numpy()
        angle, zoom = params.angle.numpy(), params.zoom.numpy()
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom  # zoom > 1 shows a smaller region: magnifies
        rot = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)
        linear = np.where(on[:, None, None], rot, linear)
        offset = np.where(on[:, None], -2.0 * params.shift.numpy(), offset)
    flip = np.stack([np.where(params.hflip.numpy(), -1.0, 1.0), np.where(params.vflip.numpy(), -1.0, 1.0)], 1)
    linear = linear * flip[:, :, None]
    offset = offset * flip
    crop_scale = np.stack([w / width, h / height], 1)
    crop_centre = np.stack([(2 * left + w) / width - 1, (2 * top + h) / height - 1], 1)
    theta = np.concatenate([linear * crop_scale[:, :, None], (offset * crop_scale + crop_centre)[:, :, None]], 2)
    return torch.from_numpy(theta.astype(np.float32))


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, size, size), align_corners=False)`` as two broadcast
    multiply-adds: the same numbers, about 6x faster on the CPU (affine_grid runs a batched matmul)."""
    c = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    row = torch.addcmul(theta[:, None, None, :, 2], theta[:, None, None, :, 0], c[None, None, :, None])
    return torch.addcmul(row, theta[:, None, None, :, 1], c[None, :, None, None])  # (N, S, S, 2)


def _elastic_displacement(field: torch.Tensor, size: int, alpha: float) -> torch.Tensor:
    """(k, S, S, 2) smooth displacement in output normalised coordinates from (k, 2, g, g) control
    points in [-1, 1]: bicubic upsampling of a coarse random field (a cheap smoothed-noise field)."""
    disp = F.interpolate(field * (2.0 * alpha), size=(size, size), mode="bicubic", align_corners=True)
    return disp.permute(0, 2, 3, 1)


def geometric(images: torch.Tensor, params: AugmentParams, size: int, cfg: AugmentConfig) -> torch.Tensor:
    """Crop + flips + affine + elastic of uint8 NHWC ``images`` -> float NCHW (N, C, size, size) in
    [0, 1]: one grid_sample."""
    n, height, width, c = images.shape
    use_affine = cfg.affine_p > 0 and bool(params.affine.any())
    theta = _thetas(params, height, width, use_affine).to(images.device)
    x = _prescaled_float(images, size)
    grid = _affine_grid(theta, size)
    if cfg.elastic_p > 0 and cfg.elastic_alpha > 0 and bool(params.elastic.any()):
        # The displacement lives in output coordinates, so it goes through theta's linear part.
        idx = params.elastic.nonzero()[:, 0].to(x.device)
        disp = _elastic_displacement(params.elastic_field[params.elastic].to(x.device), size, cfg.elastic_alpha)
        lin = theta[idx, :, :2]
        delta = disp[..., 0:1] * lin[:, None, None, :, 0] + disp[..., 1:2] * lin[:, None, None, :, 1]
        grid.index_add_(0, idx, delta)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ------------------------------------------------------------------------------ photometric

def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, C, H, W) with one sigma per sample (grouped convolutions)."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x.device, torch.float32)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*C, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def photometric(x: torch.Tensor, params: AugmentParams, cfg: AugmentConfig) -> torch.Tensor:
    """Blur, contrast, brightness, colour-channel shift and noise on float NCHW in [0, 1]; clamps.

    Returns a new tensor (``x`` is not modified). Contrast, brightness and colour shift form one
    affine map per sample and channel, applied in a single pass (this matters on the CPU).
    """
    dev = x.device
    n = x.shape[0]
    owned = False  # whether x is already our own copy (then later steps may work in place)
    if cfg.blur_p > 0 and bool(params.blur.any()):
        idx = params.blur.nonzero()[:, 0]
        x, owned = x.clone(), True
        x[idx.to(dev)] = _gaussian_blur(x[idx.to(dev)], params.blur_sigma[idx])
    if cfg.contrast > 0 or cfg.brightness > 0 or cfg.color_shift > 0:
        bias = torch.zeros(n, 3, dtype=torch.float64)
        if cfg.brightness > 0:
            bias += params.brightness[:, None]
        if cfg.color_shift > 0:
            bias += params.color_shift
        bias = bias.float().to(dev)[:, :, None, None]
        gain = torch.ones(n, 1, 1, 1, device=dev)
        if cfg.contrast > 0:  # (x - mean) * c + mean; the mean stays on the device (no sync)
            gain = params.contrast.float().to(dev)[:, None, None, None]
            bias = bias + (1.0 - gain) * x.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.addcmul(bias, x, gain)
        owned = True
    if cfg.noise_p > 0 and cfg.noise_std > 0 and bool(params.noise.any()):
        idx = params.noise.nonzero()[:, 0].to(dev)
        dev_gen = torch.Generator(device=dev).manual_seed(params.noise_seed)
        noise = torch.randn((len(idx),) + tuple(x.shape[1:]), generator=dev_gen, device=dev) * cfg.noise_std
        x = x.index_add_(0, idx, noise) if owned else x.index_add(0, idx, noise)
        owned = True
    return x.clamp_(0.0, 1.0) if owned else x.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------ entry points

def normalize(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """ImageNet mean/std normalisation of float NCHW in [0, 1]."""
    # (x - mean) / std as one multiply-add written straight into the wanted memory layout.
    scale = torch.tensor([1.0 / s for s in IMAGENET_STD], device=x.device, dtype=x.dtype)[None, :, None, None]
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=x.device,
                         dtype=x.dtype)[None, :, None, None]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty_like(x, memory_format=memory_format)
    return torch.addcmul(shift, x, scale, out=out)


def train_transform(images: torch.Tensor, gen: torch.Generator, size: int, cfg: AugmentConfig) -> torch.Tensor:
    """uint8 NHWC batch (on the device) -> augmented float NCHW (size x size) in [0, 1].

    ``gen`` is the batch's CPU generator (see ``batch_generator``); normalise afterwards.
    """
    n, height, width, _ = images.shape
    params = draw_params(gen, n, height, width, cfg)
    return apply_params(images, params, size, cfg)


def apply_params(images: torch.Tensor, params: AugmentParams, size: int, cfg: AugmentConfig) -> torch.Tensor:
    """The training transform with parameters already drawn (uint8 NHWC -> float NCHW [0, 1])."""
    return photometric(geometric(images, params, size, cfg), params, cfg)


def centre_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def eval_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]: the largest centred square, resized (antialiased)."""
    _, height, width, _ = images.shape
    top, left, side = centre_square(height, width)
    return _resize(images[:, top:top + side, left:left + side], (size, size))


# ------------------------------------------------------------------------------ fast uint8 crops

def crop_resize_uint8(images: np.ndarray, boxes: np.ndarray, size: int, hflip: np.ndarray | None = None,
                      vflip: np.ndarray | None = None, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Crop boxes ``[top, left, h, w]`` out of uint8 NHWC ``images``, resize to size x size, flip.

    The cheap CPU path (OpenCV releases the GIL, so a thread pool scales): used by the loader
    benchmark and ``FoldLoader.crops``. Area interpolation when shrinking, bilinear otherwise.
    """
    import cv2  # opencv-python comes with FFCV; imported here so the PIL fallback does not need it

    n = images.shape[0]
    out = np.empty((n, size, size, images.shape[3]), dtype=np.uint8)

    def work(indices: Iterable[int]) -> None:
        for i in indices:
            top, left, h, w = (int(v) for v in boxes[i])
            dst = out[i]  # written in place: copying results over costs as much as the resize
            interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
            cv2.resize(images[i, top:top + h, left:left + w], (size, size), dst=dst, interpolation=interp)
            h_flip = hflip is not None and bool(hflip[i])
            v_flip = vflip is not None and bool(vflip[i])
            if h_flip or v_flip:
                cv2.flip(dst, -1 if (h_flip and v_flip) else (1 if h_flip else 0), dst=dst)

    if pool is None or n < 2:
        work(range(n))
    else:  # one contiguous chunk per thread: fewer hand-offs than one task per image
        threads = max(1, min(n, getattr(pool, "_max_workers", 2)))
        list(pool.map(work, (range(k * n // threads, (k + 1) * n // threads) for k in range(threads))))
    return out
