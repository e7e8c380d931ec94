"""One typed configuration for every stage: OmegaConf structured configs over dataclasses.

Precedence (lowest first): the dataclass defaults, ``configs/default.yaml``, an optional user YAML
file, then ``key=value`` overrides from the command line. Each section is a small dataclass with a
docstring per field and checks in ``__post_init__``; each function receives only its own section.
The resolved config is written into every run directory (``save_config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Mapping

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import skinhpc
from skinhpc import CONFIG_DIR

PAPER_BACKBONES = ["resnet152", "seresnext101_32x4d", "vgg16"]


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and what is allowed."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _non_finite(settings: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the float settings (in lists too) that are inf or nan."""
    keys = []
    for name, value in settings.items():
        key = prefix + str(name)
        if isinstance(value, dict):
            keys += _non_finite(value, key + ".")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            keys.append(key)
    return keys


# The default longest side of stored images: a 4:3 image keeps a short side >= 224 px, the
# paper's input size.
MAX_RESOLUTION = 320


@dataclass
class DataConfig:
    dir: str = ""
    """Converted data (ham10000.beton, index.csv, manifest.json). Empty: ``<run_dir>/data``."""
    images: list[str] = field(default_factory=list)
    """Folders holding the raw JPEGs (the official download splits them over two). Empty together
    with ``metadata``: the bundled HAM10000 sample."""
    metadata: str = ""
    """The raw HAM10000 metadata CSV. Empty together with ``images``: the bundled sample."""
    max_resolution: int = MAX_RESOLUTION
    """Longest side of the images stored in the .beton (never upscaled). 320 stores HAM10000's
    600x450 at 320x240, so a 224 px evaluation square is cut from 240 px, not upscaled (a fold
    says so in a note when this setting makes the stored short side smaller than model.image_size)."""
    write_mode: str = "jpg"
    """How FFCV stores pixels: jpg (small, ~6k img/s/2 cores), raw (large, fastest) or proportion."""
    jpeg_quality: int = 90
    """JPEG quality when write_mode stores JPEG."""
    convert_workers: int = 0
    """Processes for conversion; 0 means every available core."""
    loader: str = "auto"
    """auto (FFCV, else the PIL fallback with a warning), ffcv or pil."""
    num_workers: int = 0
    """Loader decoding threads (FFCV) or processes (PIL); 0 means every available core."""
    quasi_random: bool = False
    """FFCV QUASI_RANDOM order for training: for data larger than RAM (then os_cache=false)."""
    os_cache: bool = True
    """FFCV: memory-map the whole file (true, best when it fits in RAM) or page it in."""

    def __post_init__(self) -> None:
        _check(self.write_mode in ("jpg", "raw", "proportion"),
               f"data.write_mode must be jpg, raw or proportion, not {self.write_mode!r}")
        _check(1 <= self.jpeg_quality <= 100, "data.jpeg_quality must be in 1..100")
        _check(self.max_resolution >= 32, "data.max_resolution must be at least 32")
        _check(self.loader in ("auto", "ffcv", "pil"), f"data.loader must be auto, ffcv or pil, not {self.loader!r}")
        for name in ("convert_workers", "num_workers"):  # 0 means every core; a negative count means nothing
            value = getattr(self, name)
            _check(value >= 0, f"data.{name} must be >= 0 (0: every available core), not {value}")
        _check(bool(self.images) == bool(self.metadata),
               "data.images and data.metadata go together: give both (your download) or neither (the bundled sample)")


@dataclass
class SplitConfig:
    folds: int = 5
    """Number of cross-validation folds (lesion-grouped, class-stratified)."""
    test_fraction: float = 0.15
    """Fraction of lesions held out as the test set, stratified by class; in (0, 0.5]."""
    seed: int = 0
    """Seed of the split; the same seed and metadata always give the same split."""

    def __post_init__(self) -> None:
        _check(self.folds >= 2, f"split.folds must be at least 2, not {self.folds}")
        _check(0 < self.test_fraction <= 0.5, f"split.test_fraction must be in (0, 0.5], not {self.test_fraction}")
        _check(self.seed >= 0, f"split.seed must be >= 0, not {self.seed}")


@dataclass
class ModelConfig:
    backbone: str = "resnet152"
    """timm model name, or vgg16_gap (the paper's improved VGG16: 1x1 conv6 + BN + GAP + one FC)."""
    pretrained: str = "false"
    """true (download from the timm/Hugging Face hub), false, or a path to a local weights file; with
    several backbones, ``{backbone}`` in the path names each one's file (weights/{backbone}.pth)."""
    image_size: int = 224
    """Side of the square crops fed to the network."""
    drop_rate: float = 0.5
    """Dropout before the classifier (the paper uses 0.5)."""
    gap_filters: int = 512
    """vgg16_gap: filters of the 1x1 conv6 (the paper tries 128, 256, 512)."""
    freeze_epochs: int = 0
    """Epochs training only the new head (backbone frozen: weights and BatchNorm statistics) before
    fine-tuning everything. The learning-rate warm-up (train.warmup_epochs) counts from the first
    epoch, so an unfrozen backbone starts at the rate the schedule has reached by then (times
    model.backbone_lr_scale when pretrained), without a warm-up of its own."""
    backbone_lr_scale: float = 0.1
    """Learning rate of pretrained backbone layers relative to the head's (fine-tuning)."""

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone must name a timm model or vgg16_gap")
        _check(self.image_size >= 32, "model.image_size must be at least 32")
        _check(0 <= self.drop_rate < 1, "model.drop_rate must be in [0, 1)")
        _check(self.gap_filters > 0, "model.gap_filters must be positive")
        _check(self.freeze_epochs >= 0, "model.freeze_epochs must be >= 0")
        _check(self.backbone_lr_scale > 0, "model.backbone_lr_scale must be > 0")


ELASTIC_MAX_GRID = 32  # cap on the control grid of the elastic field (cost, and finer is noise)
ELASTIC_FOLD_LIMIT = 0.25
"""Largest aug.elastic_alpha as a share of the spacing of the elastic field's control points.
Neighbouring points move independently, each by up to alpha; past ~0.28 of their spacing the
bicubic field folds the image over itself somewhere (negative Jacobian), which tears the pigment
network a diagnosis reads. Measured on 256 draws: 0.2 keeps every Jacobian above 0.24; the old
default, 0.65, folded 9% of the pixels of every distorted image."""


def elastic_grid_points(sigma: float) -> int:
    """Control points per side of the elastic field: one per ``sigma`` of the side."""
    return max(2, min(ELASTIC_MAX_GRID, math.ceil(1.0 / max(sigma, 1e-6)) + 1))


def max_elastic_alpha(sigma: float) -> float:
    """The largest elastic displacement (fraction of the side) that cannot fold the image."""
    return ELASTIC_FOLD_LIMIT / (elastic_grid_points(sigma) - 1)


@dataclass
class AugmentConfig:
    """Training augmentations, applied per sample as batched tensor ops on the training device.

    Each one has a switch (probability or strength; 0 turns it off). Random draws come from a
    generator seeded by (train.seed, epoch, step, rank), so a resumed run sees the same images.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    """Random resized crop: range of the crop's area relative to the image."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    """Random resized crop: range of the crop's aspect ratio. Each crop is resized to a square, so
    the lesion's shape is stretched by up to this ratio in training, as in torchvision's recipe;
    evaluation and predict take the centred square (no stretch; the 4:3 frame's side margins cut)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    vflip: float = 0.5
    """Probability of a vertical flip (lesions have no 'up')."""
    rotation: float = 30.0
    """Largest rotation in degrees (uniform in [-r, r]). Corners uncovered by rotation or translation
    are filled by reflecting the image at its border (skin, usually: the lesion sits in the centre)."""
    translate: float = 0.1
    """Largest shift as a fraction of the side."""
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    """Range of the zoom factor of the affine transform."""
    affine_p: float = 0.5
    """Probability that rotation/translation/scaling is applied to a sample."""
    noise_std: float = 0.03
    """Standard deviation of additive Gaussian noise (images in [0, 1])."""
    noise_p: float = 0.2
    """Probability of noise injection."""
    brightness: float = 0.2
    """Largest brightness change: added to every channel (images in [0, 1], clipped after)."""
    contrast: float = 0.2
    """Largest relative contrast change."""
    blur_p: float = 0.1
    """Probability of a Gaussian blur."""
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])
    """Range of the blur's sigma in pixels of the network's input (model.image_size): the same
    sigma blurs a smaller share of the image at 224 px than at 64 px."""
    color_shift: float = 0.05
    """Largest per-channel additive shift (colour-channel shift)."""
    elastic_p: float = 0.1
    """Probability of an elastic distortion."""
    elastic_alpha: float = 0.02
    """Largest elastic displacement as a fraction of the side (at most ``max_elastic_alpha``)."""
    elastic_sigma: float = 0.1
    """Smoothness of the elastic field: the spacing of its control points, as a fraction of the side."""

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "scale", "blur_sigma"):
            lo_hi = getattr(self, name)
            _check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"aug.{name} must be [low, high] with 0 < low <= high")
        _check(self.crop_scale[1] <= 1.0, "aug.crop_scale's high end must be <= 1")
        for name in ("hflip", "vflip", "affine_p", "noise_p", "blur_p", "elastic_p"):
            _check(0 <= getattr(self, name) <= 1, f"aug.{name} is a probability: in [0, 1]")
        for name in ("rotation", "translate", "noise_std", "brightness", "contrast", "color_shift",
                     "elastic_alpha", "elastic_sigma"):
            _check(getattr(self, name) >= 0, f"aug.{name} must be >= 0")

    def folding_warning(self) -> str:
        """Why this elastic distortion folds the image over itself ("" when it does not). A warning,
        not an error: runs saved with the earlier defaults (0.05, 0.08: they fold) must still
        resume, relaunch and ensemble as they were trained."""
        limit = max_elastic_alpha(self.elastic_sigma)
        if self.elastic_p == 0 or self.elastic_alpha <= limit + 1e-9:
            return ""
        return (f"WARNING: aug.elastic_alpha={self.elastic_alpha:g} with aug.elastic_sigma={self.elastic_sigma:g} "
                f"folds the image over itself (neighbouring control points, "
                f"{1 / (elastic_grid_points(self.elastic_sigma) - 1):.3g} of the side apart, can cross), tearing "
                f"the structures a diagnosis reads: at most {limit:.4g} with this sigma (or a larger sigma). "
                "Kept as given for this run, whose folds must all train alike.")


@dataclass
class DeepSpeedConfig:
    stage: int = 1
    """ZeRO stage: 0, 1 or 2."""
    config: str = ""
    """Optional YAML/JSON file with further DeepSpeed settings (merged under what skinhpc sets)."""

    def __post_init__(self) -> None:
        _check(self.stage in (0, 1, 2), f"train.deepspeed.stage must be 0, 1 or 2, not {self.stage}")


def read_deepspeed_file(value: str) -> dict[str, Any]:
    """The settings of a train.deepspeed.config file ({} for none), checked: a mapping, and none of
    the keys the train section owns. Torch-free: the launcher checks the file on the login node,
    before the tasks wait in the queue (``train.deepspeed_config`` merges it)."""
    if not value:
        return {}
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed.config: {path} not found")
    try:
        user = OmegaConf.to_container(OmegaConf.load(path)) or {}  # YAML is a superset of JSON
    except Exception as e:
        raise ConfigError(f"train.deepspeed.config: cannot read {path}: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed.config: {path} must hold a mapping")
    owned = sorted(set(user) & {"optimizer", "scheduler", "fp16", "bf16", "train_batch_size",
                                "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"})
    if owned:
        raise ConfigError(f"train.deepspeed.config: {path} sets {', '.join(owned)}, which come from the train "
                          "section (optimizer, lr, precision, batch_size, accum_steps); remove them from the file")
    return user


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Also save every N optimizer steps inside an epoch (0: only at epoch ends and on preemption)."""
    keep_last: int = 2
    """Number of newest checkpoints kept, besides the best one."""
    every_epochs: int = 1
    """Save at the end of every N-th epoch (and of the last). For epochs of seconds, where the
    save would cost as much as the epoch; a preemption signal saves at once whatever N is."""
    keep_when_done: bool = True
    """Keep checkpoints/ once the fold has finished (metrics.json written). Nothing reads them
    then (the ensemble and predict use model_best.pt and the predictions): false frees about 3x
    the weights' size per kept checkpoint, per fold."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "train.checkpoint.every_steps must be >= 0")
        _check(self.every_epochs >= 1, "train.checkpoint.every_epochs must be >= 1")
        _check(self.keep_last >= 1, "train.checkpoint.keep_last must be >= 1")


# Validation results that can pick a fold's kept epoch (train.select_metric); loss is minimised.
SELECT_METRICS = ("balanced_accuracy", "auroc_macro", "top1", "f1_macro", "loss", "last")


@dataclass
class TrainConfig:
    epochs: int = 30
    """Training epochs."""
    batch_size: int = 64
    """Images per device per step."""
    eval_batch_size: int = 0
    """Images per device per evaluation step; 0 means 2 x batch_size."""
    strategy: str = "ddp"
    """ddp (DistributedDataParallel; also one process) or deepspeed."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    channels_last: bool = True
    """Channels-last memory format (faster convolutions on tensor cores)."""
    compile: bool = False
    """torch.compile the model (checkpoints always hold the plain module)."""
    optimizer: str = "adamw"
    """adamw or sgd."""
    lr: float = 1e-3
    """Peak learning rate of the head (the backbone gets model.backbone_lr_scale of it when pretrained)."""
    weight_decay: float = 0.05
    """Weight decay."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs, then cosine decay to min_lr."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 turns it off)."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    loss: str = "ce"
    """ce (cross-entropy) or focal."""
    class_weights: bool = True
    """Weight the loss by inverse class frequency of the training fold (HAM10000 is 67% nv)."""
    class_weight_power: float = 1.0
    """Class weights are the training fold's class frequency to the power -this: 1 inverse frequency
    (every class counts the same), 0.5 its square root (the rare classes count less)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (with class weights, each image weighs as its true class)."""
    focal_gamma: float = 2.0
    """Focal loss gamma."""
    select_metric: str = "balanced_accuracy"
    """The validation result that picks the epoch whose weights the fold keeps (model_best.pt, its
    predictions, the ensemble): balanced_accuracy, auroc_macro, top1 or f1_macro (highest), loss
    (lowest), or last: the final weights, as a plain training script keeps them, while validation
    still runs every eval_every epochs for the curves. On a small validation set, balanced accuracy
    can crown a fluke: with 725 images it picked epoch 16 of 40 (val loss 1.49 against 0.99 at the
    end), which scored 5 points lower on the test set than the final weights (BENCHMARKS.md)."""
    early_stop_patience: int = 0
    """Stop after this many validations without a better select_metric (0: never)."""
    stop_after_min: float = 0.0
    """Time box (0: none): an epoch is not started when, at this job's mean epoch time so far, it
    would end after this many minutes of training; the last epoch is validated and the fold ends with
    its best weights as at a normal end (metrics.json says ``stopped: time_limit``). Leave after it
    the time of one validation and the final val/test predictions. For benchmarks and fixed
    allocations; a job that SLURM stops instead resumes on requeue, with its learning-rate schedule
    whole. Counted per job."""
    eval_every: int = 1
    """Validate (and so pick the best epoch) every N epochs and after the last one."""
    tta: bool = False
    """Validation and test predictions average the image and its two flips (three forward passes)."""
    max_steps_per_epoch: int = 0
    """Cap the steps of each epoch (0: the whole fold); for smoke tests."""
    seed: int = 0
    """Seed of model init, data order and augmentation."""
    log_every: int = 20
    """Print a progress line every N steps when not on a terminal."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest kernels for the fixed input size (VGG16 runs ~4x faster)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.stop_after_min >= 0, "train.stop_after_min must be >= 0 (0: no time limit)")
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.strategy in ("ddp", "deepspeed"), f"train.strategy must be ddp or deepspeed, not {self.strategy!r}")
        _check(self.precision in ("auto", "bf16", "fp16", "fp32"),
               f"train.precision must be auto, bf16, fp16 or fp32, not {self.precision!r}")
        _check(self.optimizer in ("adamw", "sgd"), f"train.optimizer must be adamw or sgd, not {self.optimizer!r}")
        _check(self.loss in ("ce", "focal"), f"train.loss must be ce or focal, not {self.loss!r}")
        _check(self.lr > 0, "train.lr must be > 0")
        # The cosine decays from lr to min_lr: a min_lr above lr would make the "decay" a rise.
        _check(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, train.lr={self.lr}], not {self.min_lr}")
        for name in ("warmup_epochs", "weight_decay", "grad_clip", "focal_gamma", "eval_batch_size",
                     "early_stop_patience", "max_steps_per_epoch", "seed"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, not {getattr(self, name)}")
        _check(self.accum_steps >= 1, "train.accum_steps must be >= 1")
        _check(self.eval_every >= 1, "train.eval_every must be >= 1")
        _check(self.select_metric in SELECT_METRICS,
               f"train.select_metric must be one of {', '.join(SELECT_METRICS)}, not {self.select_metric!r}")
        _check(self.select_metric != "last" or self.early_stop_patience == 0,
               "train.early_stop_patience needs a metric to improve: with train.select_metric=last set it to 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _check(self.loss == "ce" or self.label_smoothing == 0,
               "train.label_smoothing applies to train.loss=ce only (the focal loss has none); set one of them")
        _check(0 <= self.momentum < 1, "train.momentum must be in [0, 1)")
        _check(0 <= self.class_weight_power <= 1, "train.class_weight_power must be in [0, 1]")
        _check(self.device in ("auto", "cuda", "cpu"), f"train.device must be auto, cuda or cpu, not {self.device!r}")


@dataclass
class ClusterConfig:
    kind: str = "auto"
    """auto (slurm when a SLURM controller answers sinfo, else local; --dry-run shows the SLURM
    scripts), slurm, local (submitit LocalExecutor) or debug (in-process, for a debugger)."""
    profile: str = ""
    """Cluster profile: a name under slurm/ (e.g. local) or a YAML path; its keys fill this section."""
    nodes: int = 1
    """Nodes per training task."""
    gpus_per_node: int = 1
    """GPUs per node = processes (tasks) per node; on a CPU-only cluster, processes per node."""
    cpus_per_task: int = 8
    """CPU cores per process (FFCV decoding threads)."""
    mem_gb: int = 0
    """Memory per node in GB (0: SLURM's default)."""
    time_min: int = 720
    """Wall-clock limit of each task in minutes; on timeout the task requeues and resumes."""
    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    account: str = ""
    """SLURM account."""
    qos: str = ""
    """SLURM quality of service."""
    constraint: str = ""
    """SLURM constraint of the training jobs (e.g. a GPU type); the CPU-only jobs get none."""
    cpu_partition: str = ""
    """Partition of the CPU-only jobs (conversion, ensemble); empty: ``partition``."""
    use_gpus: bool = True
    """Request GPUs with --gpus-per-node (false on CPU-only clusters such as the local test one)."""
    sbatch_extra: list[str] = field(default_factory=list)
    """Extra sbatch directives of every job, e.g. ['--mail-type=FAIL'] or ['--reservation=x']."""
    train_sbatch_extra: list[str] = field(default_factory=list)
    """Extra sbatch directives of the training jobs only, e.g. ['--exclusive'] for whole GPU nodes."""
    wckey: str = ""
    """SLURM workload characterization key (--wckey); empty: none, the site's default (submitit
    alone would send 'submitit', which sites that enforce wckeys refuse)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each task (module load ..., export ...). The task runs the Python that
    launched it (its venv) whatever a line activates: install skinhpc there, on a shared disk."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends USR2 so the task can save and requeue."""
    max_requeues: int = 10
    """Requeues at the time limit before a task is given up (submitit counts those only: a
    preempted task always requeues)."""
    ensemble_cpus: int = 4
    """CPU cores of the ensemble job."""
    ensemble_time_min: int = 60
    """Wall-clock limit of the ensemble job, and of the conversion job, in minutes (both CPU-only:
    cpu_partition; they share the other settings, e.g. mem_gb, qos and setup, with training)."""
    local_parallel: int = 1
    """cluster.kind=local: training tasks run at once. Each gets its own gpus_per_node GPUs while
    the machine has enough (CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists); past that they
    share them, which pays for small backbones whose folds leave a GPU mostly idle."""

    def __post_init__(self) -> None:
        _check(self.kind in ("auto", "slurm", "local", "debug"),
               f"cluster.kind must be auto, slurm, local or debug, not {self.kind!r}")
        _check(self.local_parallel >= 1, "cluster.local_parallel must be >= 1")
        _check(self.nodes >= 1 and self.gpus_per_node >= 1, "cluster.nodes and cluster.gpus_per_node must be >= 1")
        _check(self.time_min >= 1, "cluster.time_min must be >= 1")
        for name in ("cpus_per_task", "ensemble_cpus", "ensemble_time_min"):
            _check(getattr(self, name) >= 1, f"cluster.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("mem_gb", "signal_delay_s", "max_requeues"):
            _check(getattr(self, name) >= 0, f"cluster.{name} must be >= 0, not {getattr(self, name)}")

    @property
    def processes(self) -> int:
        """Processes per training task (its world size): train.batch_size is per process."""
        return self.nodes * self.gpus_per_node


@dataclass
class ExperimentConfig:
    run_dir: str = "runs/default"
    """Directory of the experiment: config, split, one folder per backbone and fold, the ensemble."""
    fold: int = 0
    """Fold trained by jobs/train.py (0 .. split.folds-1)."""
    backbones: list[str] = field(default_factory=lambda: list(PAPER_BACKBONES))
    """Backbones the launcher trains on every fold."""
    preset: str = ""
    """Preset the config starts from: ``preset=NAME`` applies configs/NAME.yaml below the other
    overrides (e.g. scratch-gpu); the sample preset is applied by itself when no data is given."""
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        bad = _non_finite(dataclasses.asdict(self))
        _check(not bad, f"{', '.join(bad)} must be a finite number, not inf or nan")
        _check(bool(self.run_dir), "run_dir must not be empty")
        _check(0 <= self.fold < self.split.folds,
               f"fold must be in 0..split.folds-1 = 0..{self.split.folds - 1}, not {self.fold}")
        _check(len(self.backbones) >= 1, "backbones must name at least one model")
        # Tasks write <run_dir>/<backbone>/fold<k>: a repeated name would train each fold twice into one folder.
        repeated = sorted({b for b in self.backbones if self.backbones.count(b) > 1})
        _check(not repeated, f"backbones names {', '.join(repeated)} more than once: list each backbone once")

    def warnings(self) -> list[str]:
        """Settings that train but are likely not what was meant (the launcher and each fold say
        them): a folding elastic distortion, a frozen backbone that is random or never unfrozen."""
        said = [self.aug.folding_warning()]
        frozen, epochs = self.model.freeze_epochs, self.train.epochs
        if frozen and not pretrained_source(self.model.pretrained):
            said.append(f"WARNING: model.freeze_epochs={frozen} with model.pretrained=false: the first {frozen} "
                        "epochs train the head alone on a random, frozen backbone. Give pretrained weights, or "
                        "set model.freeze_epochs=0.")
        if frozen >= epochs > 0:
            said.append(f"note: model.freeze_epochs={frozen} >= train.epochs={epochs}: the backbone stays frozen "
                        "for the whole run; only the head trains.")
        return [w for w in said if w]

    @property
    def data_dir(self) -> Path:
        """Where the converted data lives (data.dir, or <run_dir>/data when unset)."""
        return Path(self.data.dir) if self.data.dir else Path(self.run_dir) / "data"


# --------------------------------------------------------------------------- loading

def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            keys += _valid_keys(value, full + ".")
        else:
            keys.append(full)
    return keys


def _unknown_key_error(schema: DictConfig, key: str, origin: str) -> ConfigError:
    valid = _valid_keys(schema)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({origin}).{hint} Valid keys: {', '.join(valid)}")


def _leaf_written(other: Any, key: str) -> str:
    """The dotted key as written: OmegaConf names only the first unknown part ('trian' of
    'trian.epochs'), which neither says what was set nor is close to any valid key."""
    leaves = _valid_keys(other) if isinstance(other, DictConfig) else []
    return next((leaf for leaf in leaves if leaf.startswith(key + ".")), key)


# Lists of shell lines and sbatch options: one value with commas (--mail-type=END,FAIL) is one item.
FREE_TEXT_LISTS = ("cluster.setup", "cluster.sbatch_extra", "cluster.train_sbatch_extra")


def _one_item_lists(schema: DictConfig, other: Any, origin: str) -> Any:
    """A list key given one value (data.images=/data/ham, backbones=vgg16) means a list of it; one
    value with commas (backbones=resnet18,vgg16) is refused, as it reads as a list without brackets."""
    if not isinstance(other, DictConfig):
        return other
    raw = OmegaConf.to_container(other, resolve=False)  # an escaped \${...} stays escaped in the list
    for key in _valid_keys(other):
        value = functools.reduce(lambda node, part: node[part], key.split("."), raw)
        if not isinstance(OmegaConf.select(schema, key), ListConfig) or isinstance(value, bool) \
                or not isinstance(value, (str, int, float)):
            continue
        if isinstance(value, str) and "," in value and key not in FREE_TEXT_LISTS:
            raise ConfigError(f"{key} is a list ({origin}): write it in brackets, {key}=[{value}] "
                              f"(in YAML: {key.rsplit('.', 1)[-1]}: [{value}])")
        OmegaConf.update(other, key, [value], merge=False)
    return other


def _interpolation_hint(message: str) -> str:
    """Why a ${...} failed: OmegaConf reads it as a reference to another key, not as shell text."""
    if "Interpolation" not in message:
        return ""
    return ": ${...} is an OmegaConf interpolation; for the shell write $VAR, or escape it as \\${VAR}"


def _merge_checked(schema: DictConfig, base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, _one_item_lists(schema, other, origin))
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise _unknown_key_error(schema, _leaf_written(other, key), origin) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(getattr(e, "msg", None) or e).splitlines()[0] + _interpolation_hint(str(e))
        if "Incompatible value 'None'" in msg:  # key= (or key: in YAML) with nothing after it
            leaf = key.rsplit(".", 1)[-1]
            msg += (f" (an empty value is null; for an empty string write {key}='' with the quotes reaching the "
                    f"program: \"{key}=''\" in a shell)" if origin == "command line"
                    else f" (an empty value is null; for an empty string write {leaf}: '')")
        if key:
            raise ConfigError(f"bad config value for {key} ({origin}): {msg}") from None
        raise ConfigError(f"bad config value ({origin}): {msg} (a section such as train is set by its dotted "
                          "keys: train.epochs=5)") from None


def _yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    """A YAML parser error as one line: where (the line, its text) and what."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return str(e).splitlines()[0]
    line = e.problem_mark.line
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    where = f"line {line + 1}" + (f" ({text[line]!r})" if line < len(text) else "")
    start = e.context_mark.line if e.context and e.context_mark else line
    context = f" ({e.context} from line {start + 1})" if start != line else ""  # e.g. where an unclosed { opened
    hint = "; YAML indents with spaces, not tabs" if line < len(text) and "\t" in text[line] else ""
    return f"{where}: {e.problem}{context}{hint}"


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML file of config keys; a file that is no valid YAML, or whose top is not a mapping,
    is a ConfigError naming it (and the line) rather than a parser traceback."""
    path = Path(path)
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(path, e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file (YAML expected)") from None
    except OmegaConfBaseException as e:  # valid YAML that OmegaConf refuses, e.g. a broken ${...}
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):  # a list at the top: OmegaConf.merge would raise a TypeError
        raise ConfigError(f"{path}: expected a mapping of config keys (train: {{epochs: 5}}), not a list")
    return node


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Turn ``["a.b=1", "c=[x,y]"]`` into a config, rejecting items without ``=``."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (yaml.YAMLError, OmegaConfBaseException) as e:  # the value is read as YAML
        bad = next((o for o in overrides if _unparsable(o)), " ".join(overrides))
        hint = "; inside double quotes a backslash starts an escape: use single quotes" if '"' in bad and "\\" in bad else ""
        raise ConfigError(f"override {bad!r}: its value is no valid YAML ({str(e).splitlines()[0]}{hint})") from None


def _unparsable(item: str) -> bool:
    try:
        OmegaConf.from_dotlist([item])
        return False
    except (yaml.YAMLError, OmegaConfBaseException):
        return True


# YAML files under configs/ that are no experiment config, so no preset: applied as one, their keys
# are unknown config keys. The DeepSpeed settings are read by DeepSpeed itself.
NOT_PRESETS = {"deepspeed": "a DeepSpeed config: pass it as train.deepspeed.config=configs/deepspeed.yaml"}


def preset_names() -> list[str]:
    """The presets under configs/: every experiment config there."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in NOT_PRESETS)


def preset_path(name: str) -> Path:
    """The YAML of a named preset under configs/ (e.g. 'sample')."""
    if name in NOT_PRESETS:
        raise ConfigError(f"configs/{name}.yaml is no preset but {NOT_PRESETS[name]}; "
                          f"presets: {', '.join(preset_names())}")
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r} in {CONFIG_DIR}; presets: {', '.join(preset_names())}")
    return path


def uses_sample(cfg: ExperimentConfig) -> bool:
    """No data configured (no raw download, no converted dir): the bundled sample is used."""
    return not cfg.data.images and not cfg.data.dir


def load_config(overrides: list[str] | None = None, config_file: str | Path | None = None,
                preset: str | None = None, sample_preset: bool = True) -> ExperimentConfig:
    """Build the validated config: defaults < configs/default.yaml < preset < file < overrides.

    With ``sample_preset`` and no data configured anywhere, the ``sample`` preset is applied (below
    the file and the overrides), so a bare command runs the small embedded demo.
    """
    if preset is None and overrides:  # preset=NAME on the command line applies configs/NAME.yaml (below them)
        preset = OmegaConf.select(parse_overrides(overrides), "preset") or None
    if preset is None and config_file and Path(config_file).is_file():  # ... or in the config file
        preset = OmegaConf.select(load_yaml(config_file), "preset") or None
    cfg = _load(overrides, config_file, preset)
    if sample_preset and preset is None and uses_sample(cfg):
        cfg = _load(overrides, config_file, "sample")
    return cfg


def _load(overrides: list[str] | None, config_file: str | Path | None, preset: str | None) -> ExperimentConfig:
    schema = OmegaConf.structured(ExperimentConfig)
    cfg = schema
    layers: list[tuple[str, Any]] = [("configs/default.yaml", load_yaml(CONFIG_DIR / "default.yaml"))]
    if preset:
        layers.append((f"preset {preset}", load_yaml(preset_path(preset))))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        layers.append((str(path), load_yaml(path)))
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    for origin, layer in layers:
        cfg = _merge_checked(schema, cfg, layer, origin)
    bad = _non_finite(OmegaConf.to_container(cfg))  # before the sections' checks, which nan passes or misnames
    _check(not bad, f"{', '.join(bad)} must be a finite number, not inf or nan")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"bad config value{' for ' + key if key else ''}: "
                          f"{str(e).splitlines()[0]}{_interpolation_hint(str(e))}") from None
    assert isinstance(obj, ExperimentConfig)
    return obj


def _literal(value: Any) -> Any:
    """Strings with ``${`` escaped, so that a saved config reads back with the same literal text
    (a setup line such as 'cd \\${SLURM_TMPDIR}' given escaped), not as an OmegaConf interpolation."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(_literal(dataclasses.asdict(cfg))))


def from_yaml_file(path: str | Path) -> ExperimentConfig:
    """Load a config saved by ``save_config`` (validated like any other)."""
    schema = OmegaConf.structured(ExperimentConfig)
    cfg = _merge_checked(schema, schema, load_yaml(path), str(path))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ExperimentConfig)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temporary file in the same folder, then rename: readers never see half a
    file, and a failed write leaves the earlier file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # a failed write() names no file: name it
    except RuntimeError as e:  # torch.save wraps a full disk's OSError in "unexpected pos ..."
        cause = os_error_in(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only filesystem: the error that matters is the one raised above
            pass


def os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError among an exception's causes, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def os_error_text(e: OSError) -> str:
    """An OSError as "PATH: reason", as the jobs print it instead of a traceback."""
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename is not None else reason


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def available_cores() -> int:
    """Cores this process may use (SLURM's allocation, not the whole node): what a 0 for workers means."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_WRITTEN_BY = "# written by skinhpc "


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write ``cfg`` with the version that wrote it on its first line (a comment), so that an older
    skinhpc can say that the file is newer than itself. A file that already says this is left as it
    is: a relaunch with nothing new does not rewrite the run's config."""
    text = f"{_WRITTEN_BY}{skinhpc.__version__}\n{to_yaml(cfg)}"
    try:
        if Path(path).read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def _newer_writer(path: Path) -> str:
    """The skinhpc version that wrote a saved config, when it is newer than this one ("" otherwise)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return ""
    if not first.startswith(_WRITTEN_BY):
        return ""
    written = first[len(_WRITTEN_BY):].strip()

    def as_tuple(version: str) -> tuple[int, ...]:
        return tuple(int(part) if part.isdigit() else 0 for part in version.split(".")[:3])

    return written if as_tuple(written) > as_tuple(skinhpc.__version__) else ""


def config_hash(section: Any) -> str:
    """Stable short hash of a config section (for checkpoints and relaunch checks)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_source(value: str) -> str:
    """``model.pretrained`` read once for every user: "hub" (true/yes/1), "" (false/no/0/empty:
    from scratch), else the path of a weights file."""
    v = value.strip()
    if v.lower() in ("true", "yes", "1"):
        return "hub"
    return "" if v.lower() in ("false", "no", "0", "") else v


BACKBONE_FIELD = "{backbone}"


def backbone_weights(pretrained: str, backbone: str) -> str:
    """``model.pretrained`` for one backbone: ``{backbone}`` in it is replaced by the backbone's name,
    so that one setting (weights/{backbone}.pth) names each backbone's own weights file."""
    return pretrained.replace(BACKBONE_FIELD, backbone)


def for_backbone(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config of one training task: its weights file named (``backbone_weights``)."""
    pretrained = backbone_weights(cfg.model.pretrained, cfg.model.backbone)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=pretrained))


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Paths made absolute, so that jobs find them whatever directory they start in."""
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve()) if p else p
    data = dataclasses.replace(cfg.data, dir=absolute(cfg.data.dir), metadata=absolute(cfg.data.metadata),
                               images=[absolute(p) for p in cfg.data.images])
    ds = dataclasses.replace(cfg.train.deepspeed, config=absolute(cfg.train.deepspeed.config))
    train = dataclasses.replace(cfg.train, deepspeed=ds)
    source = pretrained_source(cfg.model.pretrained)
    model = dataclasses.replace(cfg.model, pretrained=absolute(source)) if source not in ("", "hub") else cfg.model
    return dataclasses.replace(cfg, run_dir=absolute(cfg.run_dir), data=data, train=train, model=model)


# Config keys that do not change a task's results: everything else must match the saved run config.
NEUTRAL_KEYS = {
    "run_dir", "fold", "backbones", "preset", "model.backbone",
    "data.dir", "data.convert_workers", "data.num_workers", "data.os_cache",
    "train.log_every", "train.checkpoint.every_steps", "train.checkpoint.every_epochs", "train.checkpoint.keep_last",
    "train.checkpoint.keep_when_done",
    "train.device",
    "train.compile", "train.cudnn_benchmark",
}
# Paths, written relative by hand and absolute by the launcher: a fold does not compare them as
# text. The data is pinned by the split's data_sha256; the input files (FILE_KEYS) are compared by
# what they name (same_input_file).
PATH_KEYS = {"data.images", "data.metadata", "train.deepspeed.config", "model.pretrained"}
FILE_KEYS = ("model.pretrained", "train.deepspeed.config")


def _dotted(cfg: Any, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (weights files and betons are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


INPUTS_NAME = "inputs.json"  # beside a fold's config.yaml: size and sha256 of the input files it used


def _input_source(value: str, key: str) -> str:
    """A FILE_KEYS value read once: "" (none), "hub" (model.pretrained=true) or a file's path."""
    return pretrained_source(value) if key == "model.pretrained" else value.strip()


def input_file_path(value: str, key: str) -> Path | None:
    """The file a FILE_KEYS value names (None for none, the hub or a missing file)."""
    source = _input_source(value, key)
    if not source or (key == "model.pretrained" and source == "hub"):
        return None
    path = Path(source).expanduser().resolve()
    return path if path.is_file() else None


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _cached_sha256(path: Path) -> str:
    """sha256_file, once per file version (a launch checks every task's weights file)."""
    st = path.stat()
    return _sha256_of(path, st.st_size, st.st_mtime_ns)


def input_file_digests(cfg: Any) -> dict[str, dict[str, Any]]:
    """{key: {"path", "size", "sha256"}} of each input file the config names (FILE_KEYS) and uses
    (the DeepSpeed file under train.strategy=deepspeed only)."""
    out = {}
    for key in FILE_KEYS:
        if key == "train.deepspeed.config" and cfg.train.strategy != "deepspeed":
            continue  # not read under DDP
        path = input_file_path(_dotted(cfg, key), key)
        if path is not None:
            out[key] = {"path": str(path), "size": path.stat().st_size, "sha256": _cached_sha256(path)}
    return out


def _inputs_entries(fold_dir: Path) -> dict[str, dict[str, Any]]:
    """The entries of a fold's inputs.json that have a sha256; empty when it has none (folds from
    before it) or a damaged one (no record to compare with)."""
    try:
        recorded = json.loads((Path(fold_dir) / INPUTS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {key: rec for key, rec in recorded.items() if isinstance(rec, dict) and isinstance(rec.get("sha256"), str)}


def recorded_inputs(fold_dir: Path) -> dict[str, dict[str, str]]:
    """{key: {"path", "sha256"}} of the input files a fold trained with, by its inputs.json."""
    return {key: {"path": str(rec.get("path")), "sha256": rec["sha256"]} for key, rec in _inputs_entries(fold_dir).items()}


DATA_INPUT = "data"
"""The key of inputs.json recording what the fold's data came from (``convert.source_record``)."""


def _source_sha256(source: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def data_input_record(data_dir: Path, source: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """inputs.json's entry for the fold's data: the conversion it read, what that came from
    (``convert.source_record``) and one sha256 of it."""
    return {DATA_INPUT: {"path": str(data_dir), "sha256": _source_sha256(source), **source}} if source else {}


def recorded_data_entry(fold_dir: Path) -> dict[str, Any] | None:
    """The data entry of a fold's inputs.json (None: none recorded, e.g. a fold of skinhpc < 0.2.3)."""
    return _inputs_entries(fold_dir).get(DATA_INPUT)


def _source_changes(recorded: dict[str, Any], source: dict[str, Any]) -> str:
    """What differs between a recorded data source and the present one, in words."""
    parts = []
    if recorded.get("settings") != source["settings"] and isinstance(recorded.get("settings"), dict):
        old = recorded["settings"]
        keys = [k for k in sorted({*old, *source["settings"]}) if old.get(k) != source["settings"].get(k)]
        parts.append("the conversion settings (" + ", ".join(f"{k} {old.get(k)} -> {source['settings'].get(k)}"
                                                             for k in keys) + ")")
        if keys == ["format_version"]:
            return (parts[0] + ": this skinhpc stores other pixels for the same images; finish the run with the "
                    "skinhpc version that started it, or use a new run_dir")
    if recorded.get("metadata_sha256", source["metadata_sha256"]) != source["metadata_sha256"]:
        parts.append("the metadata CSV's content")
    if recorded.get("images_sha256", source["images_sha256"]) != source["images_sha256"]:
        parts.append("the images' content (names or bytes)")
    what = " and ".join(parts) or "the images or metadata"
    return f"{what} changed since it trained. Use a new run_dir, or restore the data it trained on"


def data_source_conflict(fold_dir: Path, source: dict[str, Any] | None) -> str:
    """Why a fold may not go on with data from ``source`` (``convert.source_record``; "" when it
    may): its inputs.json records other data (images or metadata changed under the same paths,
    data.dir holding another conversion, or another conversion format). Folds and conversions of
    skinhpc < 0.2.3 record none, so are not compared."""
    recorded = recorded_data_entry(fold_dir)
    if recorded is None or source is None or recorded["sha256"] == _source_sha256(source):
        return ""
    return (f"{fold_dir} was trained on other data (its conversion in {recorded.get('path')}): "
            f"{_source_changes(recorded, source)}.")


def recorded_data(run_dir: Path) -> dict[Path, dict[str, Any]]:
    """{fold dir: its inputs.json's data entry} of the run's folds that recorded one."""
    return {path.parent: rec for path in sorted(Path(run_dir).glob(f"*/fold*/{INPUTS_NAME}"))
            if (rec := recorded_data_entry(path.parent)) is not None}


def run_data_conflict(run_dir: Path, source: dict[str, Any] | None) -> str:
    """``data_source_conflict`` over every fold of a run, in one message ("" when none conflicts):
    a run never mixes folds trained on other data, whichever fold is started, resumed or launched."""
    conflicts = {fold: why for fold in recorded_data(run_dir) if (why := data_source_conflict(fold, source))}
    if not conflicts:
        return ""
    first, *others = conflicts
    also = f" The same holds for {', '.join(f'{f.parent.name}/{f.name}' for f in others)}." if others else ""
    return conflicts[first] + also


def run_recorded_sha256(run_dir: Path, backbone: str) -> dict[str, set[str]]:
    """{key: sha256s} of the input files the folds of one backbone of a run trained with (inputs.json)."""
    out: dict[str, set[str]] = {}
    for inputs in sorted(run_dir.glob(f"{backbone}/fold*/{INPUTS_NAME}")):
        for key, rec in recorded_inputs(inputs.parent).items():
            out.setdefault(key, set()).add(rec["sha256"])
    return out


def _edited_inputs(recorded: dict[str, dict[str, str]], cfg: Any) -> list[str]:
    """Input files that still have the name a fold trained with but not its content (replaced or
    edited in place), by what its inputs.json ``recorded``."""
    now = input_file_digests(cfg)
    return [f"{key}: {now[key]['path']} changed since the fold trained on it (sha256 {rec['sha256'][:12]}... "
            f"-> {now[key]['sha256'][:12]}...)" for key, rec in recorded.items()
            if key in now and now[key]["path"] == rec["path"] and now[key]["sha256"] != rec["sha256"]]


def input_file_changes(saved: Any, cfg: Any, recorded: Mapping[str, Collection[str]] | None = None) -> list[str]:
    """FILE_KEYS whose values in two configs name different inputs ("key: saved -> now");
    ``recorded``: {key: sha256s} the saved runs used (inputs.json), for files moved since."""
    recorded = recorded or {}
    return [f"{k}: {_dotted(saved, k)!r} -> {_dotted(cfg, k)!r}" for k in FILE_KEYS
            if not same_input_file(_dotted(saved, k), _dotted(cfg, k), k, recorded.get(k, ()))]


def task_view(cfg: ExperimentConfig, backbone: str) -> ExperimentConfig:
    """A run config as one backbone's tasks see it: its weights file named (``{backbone}`` filled in)."""
    return for_backbone(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone)))


def run_input_file_changes(run_dir: Path, saved: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """``input_file_changes`` between a run's saved config and a relaunch's, for each backbone that
    trained under it (a ``{backbone}`` template names one file each), with the content its folds
    recorded (inputs.json): renamed copies of the same weights are the same input."""
    return list(dict.fromkeys(change for b in saved.backbones for change in input_file_changes(
        task_view(saved, b), task_view(cfg, b), run_recorded_sha256(run_dir, b))))


def run_config_changes(run_cfg: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """How a task's config differs from its launched run's ("key: run -> task"): result keys as
    text (paths aside), the input files by what they name for the task's backbone."""
    run_task = task_view(run_cfg, cfg.model.backbone)
    return diff_keys(run_task, cfg, fold_result_keys(cfg)) + input_file_changes(run_task, cfg)


def same_input_file(saved: str, now: str, key: str, recorded: Collection[str] = ()) -> bool:
    """Do two values of a FILE_KEYS key give the same input? The same kind (none, hub, file), and
    for files the same path, else the same content. When the saved file is gone (a moved run), the
    content recorded when it was used (``recorded`` sha256s) decides, else the file name."""
    saved, now = _input_source(saved, key), _input_source(now, key)
    if saved == now:
        return True
    if not saved or not now or (key == "model.pretrained" and "hub" in (saved, now)):
        return False
    a, b = Path(saved).expanduser().resolve(), Path(now).expanduser().resolve()
    if a == b:
        return True
    if a.is_file() and b.is_file():
        return a.stat().st_size == b.stat().st_size and _cached_sha256(a) == _cached_sha256(b)
    if a.exists():
        return False
    if recorded and b.is_file():
        return _cached_sha256(b) in recorded
    return a.name == b.name


def result_keys(cfg: Any) -> list[str]:
    """Every dotted config key that changes a task's results (all but NEUTRAL_KEYS and cluster.*)."""
    def walk(obj: Any, prefix: str) -> list[str]:
        keys = []
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                keys += walk(value, key + ".")
            else:
                keys.append(key)
        return keys
    return [k for k in walk(cfg, "") if k not in NEUTRAL_KEYS and not k.startswith("cluster.")]


def fold_result_keys(cfg: Any) -> list[str]:
    """The result keys a fold's config is compared by, as text: paths are left out (a moved run or
    data folder is the same fold; the input files are compared by what they name)."""
    return [k for k in result_keys(cfg) if k not in PATH_KEYS]


def read_saved_config(path: Path) -> ExperimentConfig | None:
    """The config saved at ``path`` (a run's or a fold's config.yaml), None when there is none; an
    unreadable file is a ConfigError naming it."""
    if not path.is_file():
        return None
    try:
        return from_yaml_file(path)
    except Exception as e:  # OmegaConf and validation errors alike: name the file
        newer = _newer_writer(path)
        hint = (f"; it was written by skinhpc {newer}, newer than this one ({skinhpc.__version__}): use that "
                "version or a later one" if newer else "")
        raise ConfigError(f"{path}: cannot read the saved config ({e}){hint}") from None


def saved_config_changes(path: Path, cfg: Any, keys: list[str]) -> tuple[Any, list[str]]:
    """The config saved at ``path`` (``read_saved_config``) and its differences from ``cfg`` over
    ``keys`` ("key: saved -> now")."""
    saved = read_saved_config(path)
    return saved, (diff_keys(saved, cfg, keys) if saved is not None else [])


def mixed_config_refusal(where: str | Path, done: str, changed: list[str]) -> str:
    """Why results made under another config may not be continued or mixed with ``cfg``'s."""
    return (f"{where} was {done} with another config; these keys differ (saved -> now): {'; '.join(changed)}. "
            "Use a new run_dir, or the saved values to continue.")


def fold_config_conflicts(fold_dir: str | Path, cfg: Any) -> str:
    """Why ``cfg`` may not resume or reuse the fold in ``fold_dir`` ("" when it may): the fold's
    saved config.yaml differs in a key that changes results. A fold never mixes two configs.
    Paths may differ (a moved run or data folder is the same fold)."""
    try:
        saved, changed = saved_config_changes(Path(fold_dir) / "config.yaml", cfg, fold_result_keys(cfg))
    except ConfigError as e:
        return str(e)
    if saved is not None:
        recorded = recorded_inputs(Path(fold_dir))
        changed += input_file_changes(saved, cfg, {k: {rec["sha256"]} for k, rec in recorded.items()})
        changed += _edited_inputs(recorded, cfg)
    return mixed_config_refusal(fold_dir, "trained", changed) if changed else ""


def diff_keys(a: Any, b: Any, keys: list[str]) -> list[str]:
    """Which dotted keys differ between two configs (e.g. to refuse an incompatible relaunch)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = []
    for key in keys:
        va, vb = da, db
        for part in key.split("."):
            va, vb = va.get(part), vb.get(part)
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out
