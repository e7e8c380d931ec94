"""Seeded batched augmentations (skinhpc/augment.py) on small random-content batches, CPU."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from skinhpc.augment import (IMAGENET_MEAN, IMAGENET_STD, _elastic_displacement, apply_params, batch_generator,
                             crop_resize_uint8, draw_params, eval_transform, normalize, sample_crop_boxes,
                             train_transform)
from skinhpc.config import AugmentConfig, max_elastic_alpha

H, W, SIZE, N = 60, 80, 32, 6


def _images(seed: int = 0) -> torch.Tensor:
    """Smooth random images (a blurred texture), uint8 NHWC: flips and blurs visibly change them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((N, 3, H // 10, W // 10), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    img = img + 0.1 * torch.rand((N, 3, H, W), generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _all_off() -> AugmentConfig:
    """Every augmentation off; the crop is the whole image (scale 1, the image's own aspect)."""
    return AugmentConfig(crop_scale=[1.0, 1.0], crop_ratio=[W / H, W / H], hflip=0, vflip=0, rotation=0,
                         translate=0, scale=[1.0, 1.0], affine_p=0, noise_std=0, noise_p=0, brightness=0,
                         contrast=0, blur_p=0, color_shift=0, elastic_p=0)


ONE_AT_A_TIME = {
    "crop": dict(crop_scale=[0.3, 0.6], crop_ratio=[0.75, 1.33]),
    "hflip": dict(hflip=1.0),
    "vflip": dict(vflip=1.0),
    "rotation": dict(affine_p=1.0, rotation=30.0),
    "translate": dict(affine_p=1.0, translate=0.2),
    "zoom": dict(affine_p=1.0, scale=[0.7, 1.3]),
    "noise": dict(noise_p=1.0, noise_std=0.05),
    "brightness": dict(brightness=0.3),
    "contrast": dict(contrast=0.5),
    "blur": dict(blur_p=1.0, blur_sigma=[1.0, 2.0]),
    "color_shift": dict(color_shift=0.1),
    "elastic": dict(elastic_p=1.0, elastic_alpha=0.035, elastic_sigma=0.15),
}


@pytest.mark.timeout(30)
def test_batch_generator_depends_on_each_of_seed_epoch_step_rank() -> None:
    def draw(*key: int) -> torch.Tensor:
        return torch.rand(4, generator=batch_generator(*key))

    assert torch.equal(draw(1, 2, 3, 0), draw(1, 2, 3, 0))
    others = [draw(2, 2, 3, 0), draw(1, 3, 3, 0), draw(1, 2, 4, 0), draw(1, 2, 3, 1)]
    assert all(not torch.equal(draw(1, 2, 3, 0), o) for o in others)
    with pytest.raises(ValueError):
        batch_generator(-1, 0, 0, 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(ONE_AT_A_TIME))
def test_each_augmentation_alone_changes_the_batch_keeps_shape_and_dtype_and_is_reproducible(name: str) -> None:
    images = _images()
    base = train_transform(images, batch_generator(0, 0, 0), SIZE, _all_off())
    cfg = dataclasses.replace(_all_off(), **ONE_AT_A_TIME[name])
    out = train_transform(images, batch_generator(0, 0, 0), SIZE, cfg)
    again = train_transform(images, batch_generator(0, 0, 0), SIZE, cfg)
    assert out.shape == base.shape == (N, 3, SIZE, SIZE)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, again)
    changed = (out - base).abs().flatten(1).amax(1) > 1e-3
    assert bool(changed.all()), f"{name} left samples {(~changed).nonzero().flatten().tolist()} unchanged"


def _smallest_jacobian(cfg: AugmentConfig, size: int = 96, n: int = 64) -> float:
    """The smallest Jacobian determinant of the elastic warp (pixel units) over ``n`` draws."""
    field = draw_params(batch_generator(3, 0, 0), n, H, W, cfg).elastic_field
    px = _elastic_displacement(field, size, cfg.elastic_alpha) * (size / 2)
    dxdx = torch.diff(px[..., 0], dim=2)[:, :-1, :] + 1
    dxdy = torch.diff(px[..., 0], dim=1)[:, :, :-1]
    dydx = torch.diff(px[..., 1], dim=2)[:, :-1, :]
    dydy = torch.diff(px[..., 1], dim=1)[:, :, :-1] + 1
    return float((dxdx * dydy - dxdy * dydx).min())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sigma", [0.04, 0.1, 0.3])
def test_the_largest_allowed_elastic_distortion_never_folds_the_image(sigma: float) -> None:
    allowed = AugmentConfig(elastic_sigma=sigma, elastic_alpha=max_elastic_alpha(sigma))
    assert _smallest_jacobian(allowed) > 0
    assert _smallest_jacobian(AugmentConfig()) > 0.1  # the defaults
    assert not allowed.folding_warning() and not AugmentConfig().folding_warning()
    # What the warning is about: 2.5 times the limit folds (the earlier default was 2.6 times). A
    # warning: a run saved with it must still load, resume and ensemble.
    folding = AugmentConfig(elastic_sigma=sigma, elastic_alpha=2.5 * max_elastic_alpha(sigma))
    assert _smallest_jacobian(folding) < 0
    assert re.match(r"WARNING: aug.elastic_alpha=.* folds the image over itself.*at most", folding.folding_warning())
    assert not dataclasses.replace(folding, elastic_p=0.0).folding_warning()


@pytest.mark.timeout(30)
def test_all_augmentations_off_is_a_plain_resize_of_the_whole_image() -> None:
    images = _images()
    out = train_transform(images, batch_generator(0, 0, 0), SIZE, _all_off())
    # Under 2x shrinking the one grid_sample is plain bilinear interpolation (no antialiasing).
    ref = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(SIZE, SIZE),
                                          mode="bilinear", antialias=False, align_corners=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.timeout(30)
def test_flips_mirror_the_unflipped_crop_exactly() -> None:
    images = _images()
    base = train_transform(images, batch_generator(0, 0, 0), SIZE, _all_off())
    h = train_transform(images, batch_generator(0, 0, 0), SIZE, dataclasses.replace(_all_off(), hflip=1.0))
    v = train_transform(images, batch_generator(0, 0, 0), SIZE, dataclasses.replace(_all_off(), vflip=1.0))
    torch.testing.assert_close(h, base.flip(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(v, base.flip(2), atol=1e-5, rtol=0)


@pytest.mark.timeout(30)
def test_switching_one_augmentation_off_leaves_the_other_parameters_unchanged() -> None:
    full = draw_params(batch_generator(5, 1, 2), N, H, W, AugmentConfig())
    less = draw_params(batch_generator(5, 1, 2), N, H, W, AugmentConfig(hflip=0.0, noise_p=0.0))
    assert torch.equal(full.boxes, less.boxes) and torch.equal(full.angle, less.angle)
    assert torch.equal(full.vflip, less.vflip) and not bool(less.hflip.any()) and not bool(less.noise.any())


@pytest.mark.timeout(30)
def test_crop_boxes_lie_inside_the_image_and_respect_scale_and_ratio() -> None:
    boxes = sample_crop_boxes(torch.Generator().manual_seed(0), 2000, H, W, (0.2, 0.8), (0.75, 1.333))
    top, left, h, w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W) & (h > 0) & (w > 0)).all())
    area = (h * w).double() / (H * W)
    ratio = w.double() / h.double()
    # Rounding to whole pixels moves area and ratio a little past the range on small boxes.
    assert float(area.min()) > 0.17 and float(area.max()) < 0.85
    assert float(ratio.min()) > 0.65 and float(ratio.max()) < 1.5
    assert len({tuple(b) for b in boxes.tolist()}) > 1000  # really random


@pytest.mark.timeout(30)
def test_crop_box_falls_back_to_the_centred_image_when_no_attempt_fits() -> None:
    # Aspect ratios 3..4 cannot fit an area of 90% of a 60x80 image: the fallback is centred.
    boxes = sample_crop_boxes(torch.Generator().manual_seed(0), 10, H, W, (0.9, 1.0), (3.0, 4.0))
    assert boxes.tolist() == [[(H - round(W / 3.0)) // 2, 0, round(W / 3.0), W]] * 10


@pytest.mark.timeout(30)
def test_eval_transform_is_the_deterministic_centre_square() -> None:
    images = _images()
    out = eval_transform(images, SIZE)
    assert out.shape == (N, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.equal(out, eval_transform(images, SIZE))
    left = (W - H) // 2
    square = eval_transform(images[:, :, left:left + H].contiguous(), SIZE)
    assert torch.equal(out, square)
    same_size = eval_transform(images[:, :, left:left + H].contiguous(), H)
    torch.testing.assert_close(same_size, images[:, :, left:left + H].permute(0, 3, 1, 2).float() / 255)


@pytest.mark.timeout(30)
def test_normalize_uses_imagenet_statistics_and_honours_channels_last() -> None:
    x = torch.rand(2, 3, 8, 8)
    y = normalize(x, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    torch.testing.assert_close(y, (x - mean) / std)


@pytest.mark.timeout(30)
def test_uint8_crops_match_the_float_path_with_the_same_parameters() -> None:
    images = _images()
    cfg = dataclasses.replace(_all_off(), crop_scale=[0.4, 0.9], crop_ratio=[0.75, 1.33], hflip=0.5, vflip=0.5)
    params = draw_params(batch_generator(3, 0, 0), N, H, W, cfg)
    fast = crop_resize_uint8(images.numpy(), params.boxes.numpy(), SIZE, params.hflip.numpy(), params.vflip.numpy())
    exact = apply_params(images, params, SIZE, cfg)
    assert fast.shape == (N, SIZE, SIZE, 3) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(np.float32) / 255 - exact.permute(0, 2, 3, 1).numpy())
    assert diff.mean() < 0.01  # same crops and flips; interpolation details differ slightly
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        threaded = crop_resize_uint8(images.numpy(), params.boxes.numpy(), SIZE, params.hflip.numpy(),
                                     params.vflip.numpy(), pool=pool)
    assert np.array_equal(fast, threaded)


@pytest.mark.timeout(30)
def test_generator_parameters_do_not_depend_on_the_device_of_the_images() -> None:
    # Parameters are drawn on the CPU generator before anything touches the device: this is what
    # makes a GPU run draw the same crops as a CPU run. Here: the draw ignores the pixels entirely.
    a = draw_params(batch_generator(0, 0, 0), N, H, W, AugmentConfig())
    b = draw_params(batch_generator(0, 0, 0), N, H, W, AugmentConfig())
    for field in dataclasses.fields(a):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_draws_the_same_parameters_and_makes_the_same_images_as_the_cpu() -> None:
    images = _images()
    cfg = dataclasses.replace(AugmentConfig(), noise_p=0.0, affine_p=1.0, elastic_p=1.0, blur_p=1.0)
    cpu = train_transform(images, batch_generator(1, 2, 3), SIZE, cfg)
    gpu = train_transform(images.cuda(), batch_generator(1, 2, 3), SIZE, cfg).cpu()
    torch.testing.assert_close(gpu, cpu, atol=5e-3, rtol=0)  # kernels (TF32 blur) differ, parameters do not
    torch.testing.assert_close(eval_transform(images.cuda(), SIZE).cpu(), eval_transform(images, SIZE),
                               atol=1 / 255 + 1e-4, rtol=0)  # the CPU kernel resizes in uint8
