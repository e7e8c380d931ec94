"""Classifier networks: timm backbones, the paper's improved VGG16 (``vgg16_gap``), local weights.

``create_model(model_cfg)`` builds any timm model by name (the paper's ``resnet152``,
``seresnext101_32x4d``, ``vgg16``; small ones such as ``resnet18`` for tests) with dropout
``model_cfg.drop_rate`` before a new ``num_classes``-way classifier. Plain ``vgg16`` keeps timm's
FC6/FC7 (a ConvMlp called ``pre_logits``), the paper's baseline. ``vgg16_gap`` is the paper's improved
VGG16: the 13 conv layers of VGG16, then a 1x1 conv "conv6" with ``model_cfg.gap_filters`` filters +
BatchNorm + ReLU, global average pooling, dropout and one fully connected layer.

Pretrained weights (``model.pretrained``):

- ``false``: random initialisation.
- ``true``: ImageNet weights from the timm / Hugging Face hub. Needs internet, which GPU compute
  nodes often lack (weights already in the hub cache, e.g. ``~/.cache/huggingface`` on a shared
  home, are used without network). Without either, a ``PretrainedWeightsError`` says what to do.
- a path: a local weights file, the way to go on clusters whose compute nodes are offline. Fetch it
  once on a login node (which has internet), e.g.::

      python -c "import timm, torch; m = timm.create_model('resnet152', pretrained=True); torch.save(m.state_dict(), 'resnet152.pth')"

  (for ``vgg16_gap`` save ``vgg16``), or ``huggingface-cli download timm/resnet152.a1h_in1k
  model.safetensors --local-dir weights/``; then pass ``model.pretrained=/path/to/resnet152.pth``.
  Accepted: a plain state dict, a checkpoint dict holding it under ``state_dict_ema``/``model_ema``/
  ``state_dict``/``model`` (timm's train.py, with its saved options, skinhpc's ``model_best.pt``),
  or ``.safetensors``;
  ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped, torchvision's VGG key
  names are mapped to timm's, and so are those of Cadene's ``pretrainedmodels`` SE-ResNeXt files (e.g.
  ``se_resnext101_32x4d-3b2fe3d8.pth``, the usual source of the paper's SE-ResNeXt-101) for timm's
  ``seresnext*``. Files are read with ``torch.load(weights_only=True)`` or safetensors,
  never unpickled (a pickle from elsewhere can run code).

When loading weights, a head layer whose shape differs from this model's (ImageNet's 1000 classes vs 7)
is not loaded and keeps its fresh initialisation; other shape mismatches, backbone tensors the file
lacks, and extra blocks inside the model's layers are an error (a file of a different architecture,
of a smaller or deeper sibling). A ViT-style file's position embeddings, made for its own image size,
are resampled to the model's patch grid, as timm's hub loader does. One log line lists the keys that
were re-initialised, missing or unused.

Trained models are stored by ``save_model_file`` as ``model_best.pt`` and read back by
``load_model_file`` (format in DESIGN.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import socket
import urllib.parse
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import timm
import torch
from torch import nn

from skinhpc import CLASSES
from skinhpc.config import ConfigError, ModelConfig, atomic_write, backbone_weights, pretrained_source

log = logging.getLogger(__name__)

# The layer layout of VGG16's conv part, as in timm (numbers: 3x3 conv + ReLU, "M": 2x2 max pool).
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")
# The timm model whose pretrained weights each custom backbone reuses.
HUB_NAME = {"vgg16_gap": "vgg16"}
# Keys under which training checkpoints keep the state dict, preferred first (EMA weights are
# usually the better starting point).
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit; the message says what to do."""


class ModelFileError(RuntimeError):
    """A saved model file is missing, unreadable or does not match its recorded architecture."""


# --------------------------------------------------------------------------- vgg16_gap

class VGG16GAP(nn.Module):
    """The paper's improved VGG16: VGG16 convs → 1x1 conv6 + BN + ReLU → GAP → dropout → FC.

    ``features`` has exactly timm's ``vgg16`` layout (``features.0`` .. ``features.30``), so a
    vgg16 state dict loads into it; FC6/FC7 (timm's ``pre_logits``) are gone, which removes ~120 M
    parameters and makes the network independent of the input size.
    """

    def __init__(self, num_classes: int = 7, gap_filters: int = 512, drop_rate: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.conv6 = nn.Conv2d(channels, gap_filters, kernel_size=1, bias=False)  # BN supplies the bias
        self.bn6 = nn.BatchNorm2d(gap_filters)
        self.act6 = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.num_features = gap_filters
        self.num_classes = num_classes
        self.fc = nn.Linear(gap_filters, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as timm's VGG, so a random vgg16_gap starts like a random vgg16.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act6(self.bn6(self.conv6(x)))
        x = self.drop(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------- creation

def create_model(model_cfg: ModelConfig, num_classes: int = len(CLASSES)) -> nn.Module:
    """Build ``model_cfg.backbone`` with a fresh ``num_classes``-way head and the configured weights."""
    source = pretrained_source(backbone_weights(model_cfg.pretrained, model_cfg.backbone))
    if source == "hub":
        return _create_from_hub(model_cfg, num_classes)
    model = _build(model_cfg, num_classes)
    if source:
        load_pretrained_file(model, source)
    return model


def unknown_backbone(name: str) -> str:
    """Why ``name`` names no model ("" when it does: vgg16_gap or a timm model), with close names."""
    if name == "vgg16_gap" or timm.is_model(name):
        return ""
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Similar timm names: {', '.join(close)}." if close else ""
    return f"model.backbone={name!r} is neither a timm model nor vgg16_gap.{hint}"


def _build(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The randomly initialised network."""
    if model_cfg.backbone == "vgg16_gap":
        return VGG16GAP(num_classes, model_cfg.gap_filters, model_cfg.drop_rate)
    why = unknown_backbone(model_cfg.backbone)
    if why:
        raise ConfigError(why)
    return timm.create_model(model_cfg.backbone, pretrained=False, num_classes=num_classes,
                             drop_rate=model_cfg.drop_rate, **_size_kwargs(model_cfg))


def _size_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """Transformers (ViT, Swin, DeiT, LeViT, ...) are built for one input size: give them ours."""
    try:
        fixed = timm.models.get_pretrained_cfg_value(model_cfg.backbone, "fixed_input_size")
    except Exception:  # a name without a pretrained config
        fixed = False
    return {"img_size": model_cfg.image_size} if fixed else {}


def _download_hint(name: str) -> str:
    hub = HUB_NAME.get(name, name)
    return (f"On a login node with internet, save the weights once:\n"
            f"  python -c \"import timm, torch; m = timm.create_model('{hub}', pretrained=True); "
            f"torch.save(m.state_dict(), '{hub}.pth')\"\n"
            f"then pass model.pretrained=/path/to/{hub}.pth")


def _create_from_hub(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """pretrained=true: timm downloads (or finds in its cache) the ImageNet weights."""
    name = model_cfg.backbone
    hub = HUB_NAME.get(name, name)
    if not timm.is_model(hub):
        raise ConfigError(unknown_backbone(hub) or f"model.backbone={name!r} is neither a timm model nor vgg16_gap")
    if not timm.models.is_model_pretrained(hub):
        raise PretrainedWeightsError(f"timm has no pretrained weights for {hub!r}; use model.pretrained=false "
                                     f"or a local weights file")
    # Without network, the hub client retries for ~45 s before failing; a quick probe lets us go
    # straight to the cache (weights fetched earlier on a shared home still work) or to the error.
    offline = not _hub_reachable()
    try:
        with _hub_offline(offline):
            if hub == name:
                model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                          drop_rate=model_cfg.drop_rate, **_size_kwargs(model_cfg))
                log.info("loaded the timm hub weights of %s; head re-initialised for %d classes", name, num_classes)
                return model
            source = timm.create_model(hub, pretrained=True)
    except _network_errors() as e:
        reason = "no network to the Hugging Face hub from this node" if offline else f"download failed: {e}"
        raise PretrainedWeightsError(
            f"model.pretrained=true: could not get the ImageNet weights of {hub!r} ({reason}).\n"
            f"{_download_hint(name)}") from None
    model = _build(model_cfg, num_classes)
    load_state_dict_into(model, source.state_dict(), f"timm hub weights of {hub}")
    return model


def _hub_endpoint() -> tuple[str, int]:
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """Can this node open a connection to the hub? (Assumed yes behind a proxy: we cannot tell.)"""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection(_hub_endpoint(), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode (cache only, no retries) for the duration."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hf_constants
    previous = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = previous


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a failed download (hub client versions use requests or httpx)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        import requests
        errors.append(requests.RequestException)
    except ImportError:
        pass
    try:
        import httpx
        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


# --------------------------------------------------------------------------- weights files

def read_weights_file(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file (see the module docstring for the accepted forms);
    ``mmap``: tensors paged in on use, where the file's format allows (torch's zip files)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PretrainedWeightsError(f"model.pretrained: {path} is a folder; give the weights file in it "
                                     f"(.pth/.pt/.bin/.safetensors)")
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained: weights file {path} not found. Pass true, false or the "
                                     f"path of a weights file (.pth/.pt/.bin/.safetensors).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        else:
            # timm's train.py saves its argparse options beside the weights: a Namespace is a bag
            # of attributes, safe to rebuild (its values still pass weights_only's checks).
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # pickle/zip/safetensors errors have many types; name the file
        reason = load_error_text(e)
        advice = (" If you trust the file, keep its weights only: sd = torch.load(path, weights_only=False); "
                  "torch.save(sd.get('state_dict', sd), 'weights.pth') (for a checkpoint dict, the key holding "
                  "the model's tensors)." if "Unsupported global" in reason else " Fetch or save it again.")
        raise PretrainedWeightsError(
            f"model.pretrained: cannot read {path} as a weights file ({reason}). It must load with "
            f"torch.load(weights_only=True) (tensors, no pickled objects) or be .safetensors.{advice}") from None
    state = _find_state_dict(obj)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, dict) else type(obj).__name__
        raise PretrainedWeightsError(f"model.pretrained: {path} holds no state dict (found: {keys}); expected "
                                     f"tensors by name, or a dict with one of {', '.join(CHECKPOINT_KEYS)}")
    return {_strip_prefixes(k): v for k, v in state.items()}


def load_error_text(e: BaseException, limit: int = 300) -> str:
    """One readable line for a failed torch.load/safetensors read: torch's weights_only refusal is a
    paragraph with terminal colour codes whose reason ("Unsupported global: ...") is on a later line;
    an empty file raises an EOFError with no message."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
    if isinstance(e, EOFError) and not reason:
        reason = "the file is empty or cut short"
    return f"{type(e).__name__}: {reason}"[:limit] if reason else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _torchvision_vgg_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision names VGG's FC layers classifier.0/3/6; timm has them as convs pre_logits.fc1/fc2
    and head.fc (as timm's own vgg loader does)."""
    out = {}
    for key, value in state.items():
        if key.startswith("classifier.0."):
            key = "pre_logits.fc1." + key.split(".", 2)[2]
            value = value.reshape(-1, 512, 7, 7) if key.endswith("weight") else value
        elif key.startswith("classifier.3."):
            key = "pre_logits.fc2." + key.split(".", 2)[2]
            value = value.reshape(-1, 4096, 1, 1) if key.endswith("weight") else value
        elif key.startswith("classifier.6."):
            key = "head.fc." + key.split(".", 2)[2]
        out[key] = value
    return out


# Cadene's pretrainedmodels SENet names (timm's legacy_se* models keep them) -> timm's ResNet names.
SENET_PREFIXES = (("layer0.conv1.", "conv1."), ("layer0.bn1.", "bn1."), ("last_linear.", "fc."))


def _is_senet_file_for_resnext(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """A Cadene SENet file (``layer0.conv1``) for a timm ResNeXt. Only the ResNeXt blocks are the
    same network in both (stride in the 3x3 conv); Cadene's SE-ResNets stride in the first 1x1
    conv, timm's seresnet in the 3x3, so those files would load and compute something else."""
    if not isinstance(model, timm.models.resnet.ResNet) or "layer0.conv1.weight" not in state:
        return False
    return getattr(getattr(model.layer1[0], "conv2", None), "groups", 1) > 1


def _senet_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cadene's SE-ResNeXt keys as timm's seresnext has them: the stem's ``layer0.`` dropped,
    ``se_module`` -> ``se``, ``last_linear`` -> ``fc``. The one difference left is the stem's max
    pool (Cadene's rounds up, timm's pads by one: the same output size at even input sizes, windows
    shifted by a pixel), harmless to fine-tuning."""
    def renamed(key: str) -> str:
        for old, new in SENET_PREFIXES:
            if key.startswith(old):
                return new + key[len(old):]
        return key.replace(".se_module.", ".se.")
    return {renamed(k): v for k, v in state.items()}


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Dotted-name prefixes of the head modules (see ``head_modules``), e.g. ``("fc.",)``."""
    heads = {id(m) for m in head_modules(model)}
    return tuple(name + "." for name, module in unwrap(model).named_modules() if id(module) in heads)


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load pretrained tensors into ``model``: head layers (``head_modules``) always keep their fresh
    initialisation (even a 7-class file's); a shape mismatch or a backbone tensor the file lacks is an
    error (weights of a neighbouring architecture or another layout would otherwise leave part of
    the backbone random without a word); one log line lists what was loaded and what was not."""
    fit = _fitted(model, state, source)
    model.load_state_dict(fit.loadable, strict=False)
    log.info("loaded %d/%d tensors from %s; head re-initialised: %s; fresh (not in the file): %s; "
             "unused: %s", len(fit.loadable), fit.n_model, source, _short(fit.reinit), _short(fit.missing),
             _short(fit.unused))


@dataclasses.dataclass
class _Fit:
    loadable: dict[str, torch.Tensor]
    reinit: list[str]
    missing: list[str]
    unused: list[str]
    n_model: int


def _fitted(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> _Fit:
    """What of ``state`` goes into ``model`` (see ``load_state_dict_into``); PretrainedWeightsError
    when it does not fit. Shapes and names only: ``model`` may live on the meta device."""
    if isinstance(model, (VGG16GAP, timm.models.vgg.VGG)) and any(k.startswith("classifier.") for k in state):
        state = _torchvision_vgg_to_timm(state)
    if _is_senet_file_for_resnext(model, state):
        state = _senet_to_timm(state)
    state = _resampled_pos_embed(model, state, source)
    own = model.state_dict()
    head = head_prefixes(model)
    reinit, mismatched, loadable = [], [], {}
    for key, value in state.items():
        if key not in own:
            continue
        if key.startswith(head):  # the classifier is the new task's: never carried over
            reinit.append(key)
        elif own[key].shape == value.shape:
            loadable[key] = value
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    if mismatched:
        raise PretrainedWeightsError(f"{source} does not fit {type(model).__name__}: shape mismatch in "
                                     f"{len(mismatched)} tensors, e.g. {'; '.join(mismatched[:3])} "
                                     f"(weights of another architecture?)")
    if not any(not k.startswith(head) for k in loadable):
        raise PretrainedWeightsError(f"{source}: none of its {len(state)} tensors match the model's names "
                                     f"(e.g. file {next(iter(state), '-')!r} vs model {next(iter(own))!r}); "
                                     f"weights of another architecture?")
    unused = sorted(set(state) - set(own))
    missing = [k for k in own if k not in loadable and k not in reinit]
    lacking = [k for k in missing if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if lacking:
        hint = ("Cadene's pretrainedmodels SENet layout: timm's legacy_se* backbones, e.g. legacy_seresnet50, "
                "take it as it is" if "layer0.conv1.weight" in state else "weights of another architecture or "
                "layout? README, 'Running on a real cluster', shows how to save timm's")
        raise PretrainedWeightsError(f"{source} does not fit {type(model).__name__}: it lacks {len(lacking)} of the "
                                     f"backbone's {len(own)} tensors ({_short(lacking, 4)}); tensors it has that the "
                                     f"model does not: {_short(unused, 4)} ({hint})")
    # Extra tensors inside the model's own modules (resnet34's layer1.2.* for resnet18's layer1)
    # are a deeper sibling's blocks: loading the rest would give a network that was never trained
    # as such. Extra tensors elsewhere are layers the model replaces (vgg16's FC6/FC7 for
    # vgg16_gap's 1x1 conv) or has no use for.
    own_modules = {k.split(".", 1)[0] for k in own if not k.startswith(head)}
    deeper = [k for k in unused if k.split(".", 1)[0] in own_modules and not k.endswith("num_batches_tracked")]
    if deeper:
        raise PretrainedWeightsError(f"{source} does not fit {type(model).__name__}: it has {len(deeper)} tensors "
                                     f"inside the model's own layers that the model lacks ({_short(deeper, 4)}): "
                                     f"weights of a deeper variant of the architecture?")
    return _Fit(loadable, reinit, missing, unused, len(own))


def _resampled_pos_embed(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A ViT-style file's absolute position embeddings (``pos_embed``, made for its own image size,
    e.g. 224 px) resampled to the model's patch grid (e.g. 12x12 at 192 px), bicubic as timm's hub
    loader does; prefix tokens (class, distillation) are kept as they are. Other files unchanged."""
    own, theirs = getattr(model, "pos_embed", None), state.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if (not isinstance(own, torch.Tensor) or theirs is None or grid is None or theirs.shape == own.shape
            or theirs.ndim != 3 or own.ndim != 3 or theirs.shape[-1] != own.shape[-1]):
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = math.isqrt(theirs.shape[1] - prefix)
    if side * side != theirs.shape[1] - prefix or own.shape[1] != prefix + grid[0] * grid[1]:
        return state  # not a square grid of patches plus the model's prefix: the shape check names it
    from timm.layers import resample_abs_pos_embed

    log.info("%s: position embeddings resampled from a %dx%d to a %dx%d patch grid", source, side, side, *grid)
    resampled = resample_abs_pos_embed(theirs.float(), new_size=list(grid), num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled.to(theirs.dtype)}


def _short(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained_file(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model`` (see ``load_state_dict_into``)."""
    load_state_dict_into(model, read_weights_file(path), f"weights file {path}")


def weights_problem(model_cfg: ModelConfig) -> str:
    """Why ``model_cfg.pretrained``'s weights file does not fit its backbone ("" when it does, or
    when no file is named): the launcher's check on the login node, so that a wrong file fails
    there, not in every task of the backbone after its wait in the queue. The network is built on
    the meta device (no memory for its weights) and torch's zip files are memory-mapped (read as
    needed; other formats are read whole). A network that cannot be built on the meta device (some
    older timm models compute on tensors as they build) is left to its task's own check."""
    source = pretrained_source(backbone_weights(model_cfg.pretrained, model_cfg.backbone))
    if source in ("", "hub"):
        return ""
    try:
        with torch.device("meta"):
            model = _build(model_cfg, len(CLASSES))
    except ConfigError:
        raise
    except Exception as e:  # e.g. "Tensor.item() cannot be called on meta tensors"
        log.info("%s: not checked before launch (%s)", source, load_error_text(e))
        return ""
    try:
        _fitted(model, read_weights_file(source, mmap=True), f"weights file {source}")
    except PretrainedWeightsError as e:
        return f"{model_cfg.backbone}: {str(e).removeprefix('model.pretrained: ')}"
    return ""


# --------------------------------------------------------------------------- fine-tuning

def head_modules(model: nn.Module) -> list[nn.Module]:
    """The layers no pretrained file provides: the classifier, plus vgg16_gap's conv6 and its BN.

    (Plain vgg16's FC6/FC7 come with the ImageNet weights, so they count as backbone.)
    """
    model = unwrap(model)
    classifier = model.get_classifier()
    # Distilled models (DeiT, LeViT) have two heads: the class token's and the distillation token's.
    modules = list(classifier) if isinstance(classifier, tuple) else [classifier]
    if isinstance(model, VGG16GAP):
        modules += [model.conv6, model.bn6]
    return modules


def backbone_and_head_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the parameters into (backbone, head) for separate learning rates when fine-tuning."""
    head_ids = {id(p) for m in head_modules(model) for p in m.parameters()}
    backbone, head = [], []
    for p in unwrap(model).parameters():
        (head if id(p) in head_ids else backbone).append(p)
    return backbone, head


def set_backbone_trainable(model: nn.Module, flag: bool) -> None:
    """Freeze (``False``) or unfreeze the backbone's parameters; the head always trains.

    Only ``requires_grad`` changes; ``freeze_backbone_norms`` after each ``.train()`` keeps the
    frozen backbone's BatchNorm statistics fixed too. Wrap the model in DistributedDataParallel
    after freezing (DDP registers the trainable parameters when built).
    """
    backbone, _ = backbone_and_head_params(model)
    for p in backbone:
        p.requires_grad_(flag)


def freeze_backbone_norms(model: nn.Module) -> None:
    """Put the backbone's BatchNorm layers in eval mode: while the backbone is frozen they
    normalise with, and keep, their pretrained running statistics (the head's BN still trains)."""
    head = {id(m) for h in head_modules(model) for m in h.modules()}
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head:
            m.eval()


# --------------------------------------------------------------------------- model files

def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DeepSpeed (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _plain_value(value: Any) -> Any:
    """numpy scalars/arrays to Python values: torch.load(weights_only=True) refuses numpy objects."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return value


def save_model_file(path: str | Path, model: nn.Module, model_cfg: ModelConfig,
                    stored_size: list[int] | tuple[int, int], **extra: Any) -> None:
    """Write ``{"state_dict", "model", "stored_size", "classes", **extra}`` atomically (temp + rename)."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    blob = {"state_dict": state, "model": dataclasses.asdict(model_cfg),
            "stored_size": [int(s) for s in stored_size], "classes": list(CLASSES),
            **{k: _plain_value(v) for k, v in extra.items()}}
    atomic_write(path, lambda f: torch.save(blob, f))


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by ``save_model_file`` (strict load), in eval mode.

    Returns ``(model, meta)``: ``meta`` is the file's dict without ``state_dict``, plus
    ``meta["model_cfg"]``, the ``ModelConfig`` (``meta["model"]`` stays the plain dict).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} not found")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors have many types; the user needs the file name
        raise ModelFileError(f"cannot read model file {path}: {load_error_text(e)}") from None
    if not isinstance(blob, dict) or not _is_state_dict(blob.get("state_dict")) or not isinstance(blob.get("model"), dict):
        raise ModelFileError(f"{path} is not a skinhpc model file (needs 'state_dict' and 'model' entries)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg_dict = {k: v for k, v in blob["model"].items() if k in fields}
    model_cfg = ModelConfig(**{**cfg_dict, "pretrained": "false"})
    num_classes = len(blob.get("classes", CLASSES))
    model = _build(model_cfg, num_classes)
    state = {_strip_prefixes(k): v for k, v in blob["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not match {model_cfg.backbone}: {str(e)[:500]}") from None
    model.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["model_cfg"] = ModelConfig(**cfg_dict)
    return model, meta
