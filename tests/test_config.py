"""The one config mechanism: defaults < configs/default.yaml < preset < file < key=value."""

import os
import re
from pathlib import Path

import pytest

from skinhpc import REPO_DIR
from skinhpc.config import ConfigError, ExperimentConfig, diff_keys, from_yaml_file, load_config, save_config


def test_bare_config_uses_the_sample_preset_and_says_so_in_its_preset_key():
    cfg = load_config([])
    assert cfg.preset == "sample" and cfg.model.image_size == 64 and cfg.backbones == ["resnet18"]


def test_configured_data_keeps_the_paper_defaults():
    cfg = load_config(["data.dir=/data/ham"])
    assert cfg.preset == "" and cfg.backbones == ["resnet152", "seresnext101_32x4d", "vgg16"]
    assert cfg.model.drop_rate == 0.5 and str(cfg.data_dir) == "/data/ham"


def test_overrides_beat_file_beat_preset(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epochs: 7\n  batch_size: 16\n")
    cfg = load_config(["train.batch_size=8"], config_file=f)
    assert (cfg.train.epochs, cfg.train.batch_size) == (7, 8)


def test_a_list_key_given_one_value_is_a_list_of_that_value(tmp_path):
    cfg = load_config(["data.images=/data/ham/images", "data.metadata=/data/ham/meta.csv", "backbones=vgg16"])
    assert cfg.data.images == ["/data/ham/images"] and cfg.backbones == ["vgg16"]
    f = tmp_path / "exp.yaml"
    f.write_text("data:\n  images: /data/ham/images\n  metadata: /data/ham/meta.csv\n")
    assert load_config([], config_file=f).data.images == ["/data/ham/images"]
    with pytest.raises(ConfigError, match=r"backbones is a list \(command line\): write it in brackets, "
                                          r"backbones=\[resnet18,resnet34\]"):
        load_config(["backbones=resnet18,resnet34"])


def test_one_shell_line_or_sbatch_option_with_commas_is_one_item():
    cfg = load_config(["cluster.sbatch_extra=--mail-type=END,FAIL", "cluster.setup=export X=a,b"])
    assert cfg.cluster.sbatch_extra == ["--mail-type=END,FAIL"] and cfg.cluster.setup == ["export X=a,b"]


def test_a_backbone_listed_twice_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"backbones names resnet18 more than once"):
        load_config(["backbones=[resnet18,vgg16,resnet18]"])


def test_misspelled_key_is_rejected_with_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "Did you mean train.epochs" in msg and "split.test_fraction" in msg


def test_misspelled_section_is_reported_with_the_key_as_written_and_its_likely_meaning():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian\.epochs' \(command line\)\. Did you mean train\.epochs,"):
        load_config(["trian.epochs=3"])


def test_misspelled_key_in_a_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("modle:\n  backbone: vgg16\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle\.backbone' \(.*exp\.yaml\)\. Did you mean model\.backbone"):
        load_config([], config_file=f)


@pytest.mark.parametrize("text, fragment", [
    ("train:\n  epochs: 3\n  epochs: 4\n", r"line 3 \('  epochs: 4'\): found duplicate key epochs"),
    ("train:\n\tepochs: 3\n", r"line 2 .*YAML indents with spaces, not tabs"),
    ("train: {epochs: 3\n", r"line 2: did not find expected ',' or '}' \(while parsing a flow mapping from line 1\)"),
    ("- a\n", r"expected a mapping of config keys .*not a list"),
])
def test_a_yaml_file_that_cannot_be_read_is_a_config_error_naming_the_file_and_line(tmp_path, text, fragment):
    f = tmp_path / "exp.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"exp\.yaml.*" + fragment):
        load_config([], config_file=f)


@pytest.mark.parametrize("override, fragment", [
    ("train.strategy=horovod", "train.strategy"),
    ("split.folds=1", "split.folds"),
    ("split.test_fraction=0.9", "split.test_fraction"),
    ("train.deepspeed.stage=3", "train.deepspeed.stage"),
    ("train.epochs=many", "train.epochs"),
    ("nonsense", "key=value"),
    ("train=5", "train.epochs=5"),
    ("train.momentum=1.5", "train.momentum"),
    ("train.loss=focal train.label_smoothing=0.1", "train.label_smoothing applies to train.loss=ce only"),
    ("train.min_lr=1", "train.min_lr must be in [0, train.lr=0.001], not 1"),
    ("train.min_lr=-1e-6", "train.min_lr must be in [0, train.lr=0.001]"),
    ("train.warmup_epochs=-1", "train.warmup_epochs must be >= 0, not -1"),
    ("train.early_stop_patience=-1", "train.early_stop_patience must be >= 0"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.convert_workers=-2", "data.convert_workers must be >= 0"),
    ("cluster.cpus_per_task=0", "cluster.cpus_per_task must be >= 1"),
    ("cluster.max_requeues=-1", "cluster.max_requeues must be >= 0"),
    ("fold=5", "fold must be in 0..split.folds-1 = 0..4, not 5"),
    ("train.lr=inf", "train.lr must be a finite number, not inf or nan"),
    ("train.weight_decay=inf", "train.weight_decay must be a finite number"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("aug.crop_scale=[0.5,nan]", "aug.crop_scale must be a finite number"),
    ("cluster.partition=", "for an empty string write cluster.partition='' with the quotes reaching the program"),
    ("cluster.setup=['${HOME}/x']", "for the shell write $VAR, or escape it as \\${VAR}"),
    ('cluster.setup=["a\\qb"]', "its value is no valid YAML (while parsing a quoted scalar; inside double quotes"),
])
def test_bad_values_give_clear_errors(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(override.split())


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["train.lr=0.01", "backbones=[a,b]", "data.dir=/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_yaml_file(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, ExperimentConfig)


def test_a_literal_interpolation_in_a_value_survives_saving_and_reading_back(tmp_path):
    # A setup line for the job's shell, escaped on the command line as OmegaConf asks: the saved
    # config.yaml must read back (a requeued fold and every relaunch read it), with the same text.
    cfg = load_config(["cluster.setup=['cd \\${SLURM_TMPDIR}','echo a']"])
    assert cfg.cluster.setup == ["cd ${SLURM_TMPDIR}", "echo a"]
    save_config(cfg, tmp_path / "config.yaml")
    assert from_yaml_file(tmp_path / "config.yaml") == cfg
    # One value for a list key (a list of it) stays escaped too, on the command line and in a file.
    assert load_config(["cluster.setup=cd \\${SLURM_TMPDIR}"]).cluster.setup == ["cd ${SLURM_TMPDIR}"]
    (tmp_path / "exp.yaml").write_text("cluster:\n  setup: cd \\${SLURM_TMPDIR}\n")
    assert load_config([], config_file=tmp_path / "exp.yaml").cluster.setup == ["cd ${SLURM_TMPDIR}"]
    with pytest.raises(ConfigError, match=r"run_dir .*Interpolation key 'HOME' not found: .*escape it as"):
        load_config(["run_dir=${HOME}/x"])


def test_a_preset_named_in_a_config_file_is_applied_below_the_file(tmp_path):
    (tmp_path / "exp.yaml").write_text("preset: scratch-gpu\ntrain:\n  epochs: 3\n")
    cfg = load_config([], config_file=tmp_path / "exp.yaml")
    assert cfg.preset == "scratch-gpu" and cfg.model.image_size == 192 and cfg.train.epochs == 3
    assert load_config(["preset=sample"], config_file=tmp_path / "exp.yaml").model.image_size == 64  # command line wins


def test_diff_keys_names_what_changed():
    a, b = load_config(["data.dir=/x"]), load_config(["data.dir=/x", "split.seed=3"])
    assert diff_keys(a, b, ["split.seed", "split.folds"]) == ["split.seed: 0 -> 3"]


@pytest.mark.timeout(30)
def test_default_yaml_lists_every_config_key() -> None:
    import dataclasses

    from omegaconf import OmegaConf

    from skinhpc import CONFIG_DIR

    listed = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "default.yaml"))

    def keys(obj: object, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out += keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
        return out

    def present(key: str) -> bool:
        node = listed
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert [k for k in keys(ExperimentConfig()) if not present(k)] == []


@pytest.mark.timeout(30)
def test_preset_on_the_command_line_applies_its_file_below_the_other_overrides() -> None:
    cfg = load_config(["preset=scratch-gpu", "train.epochs=3"])
    assert cfg.preset == "scratch-gpu" and cfg.model.image_size == 192 and cfg.train.tta is True
    assert cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        load_config(["preset=nope"])


def test_the_deepspeed_config_is_no_preset_and_says_where_it_goes() -> None:
    with pytest.raises(ConfigError, match=r"no preset 'nope'.*presets: default, sample, scratch-gpu$"):
        load_config(["preset=nope"])
    with pytest.raises(ConfigError, match=r"configs/deepspeed\.yaml is no preset but a DeepSpeed config: pass it "
                                          r"as train\.deepspeed\.config=configs/deepspeed\.yaml"):
        load_config(["preset=deepspeed"])


@pytest.mark.timeout(300)
def test_an_installed_wheel_finds_its_presets_and_cluster_profiles_without_the_clone(tmp_path: Path) -> None:
    """jobs/ run with a pip-installed skinhpc (not editable) read configs/ and slurm/ from the wheel."""
    import subprocess
    import sys
    import zipfile

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(REPO_DIR)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "wheel").glob("skinhpc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"skinhpc/configs/default.yaml", "skinhpc/configs/sample.yaml", "skinhpc/slurm/local.yaml"} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # what pip install puts in site-packages
    probe = ("import skinhpc\n"
             "from skinhpc.config import load_config, preset_names\n"
             "from skinhpc.launch import profile_path\n"
             "print(skinhpc.__file__)\n"
             "print(load_config(['preset=sample']).model.image_size, preset_names())\n"
             "print(profile_path('local'))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(tmp_path / "site"))  # the installed copy, not the clone
    assert "sample" in lines[1] and lines[2] == str(tmp_path / "site" / "skinhpc" / "slurm" / "local.yaml")


def test_a_failed_atomic_write_names_its_file_and_leaves_the_earlier_one(tmp_path: Path) -> None:
    from skinhpc.config import atomic_write, atomic_write_text, os_error_text
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "earlier")

    def full_disk(f) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")  # as write() raises it: no file name

    with pytest.raises(OSError) as caught:
        atomic_write(target, full_disk)
    assert os_error_text(caught.value) == f"{target}: No space left on device"
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_model_file_that_fills_the_disk_is_said_as_a_full_disk_naming_it_not_a_torch_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from skinhpc.config import ModelConfig, os_error_text
    from skinhpc.models import save_model_file
    target = tmp_path / "model_best.pt"
    target.write_bytes(b"earlier")

    def full_disk(obj, f) -> None:  # as torch's zip writer reports ENOSPC: wrapped in its own error
        f.write(b"x" * 100)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as caught:
        save_model_file(target, torch.nn.Linear(2, 7), ModelConfig(), [150, 200])
    assert os_error_text(caught.value) == f"{target}: No space left on device"
    assert target.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pt"]


def test_a_frozen_random_or_never_unfrozen_backbone_is_warned_about() -> None:
    def said(*overrides: str) -> list[str]:
        return load_config(list(overrides)).warnings()

    assert said() == [] and said("model.freeze_epochs=2", "model.pretrained=w.pth") == []
    assert any("random, frozen backbone" in w for w in said("model.freeze_epochs=2", "model.pretrained=false"))
    stays = said("model.freeze_epochs=5", "train.epochs=5", "model.pretrained=true")
    assert len(stays) == 1 and "stays frozen for the whole run" in stays[0]
    assert len(said("model.freeze_epochs=5", "train.epochs=5", "model.pretrained=false")) == 2  # both said


def test_a_saved_config_names_its_writer_is_not_rewritten_unchanged_and_a_newer_ones_file_says_so(
        tmp_path: Path) -> None:
    import skinhpc
    from skinhpc.config import read_saved_config, save_config
    path = tmp_path / "config.yaml"
    cfg = load_config(["train.epochs=3"])
    save_config(cfg, path)
    assert path.read_text().startswith(f"# written by skinhpc {skinhpc.__version__}\n")
    assert read_saved_config(path) == cfg
    os.utime(path, (1, 1))
    save_config(cfg, path)  # a relaunch with nothing new
    assert path.stat().st_mtime == 1
    save_config(load_config(["train.epochs=4"]), path)
    assert path.stat().st_mtime > 1
    # A key some later version adds: this version cannot read it, and says why.
    path.write_text("# written by skinhpc 9.0.0\n" + path.read_text().split("\n", 1)[1] + "future_key: 1\n")
    with pytest.raises(ConfigError, match=r"written by skinhpc 9\.0\.0, newer than this one"):
        read_saved_config(path)
    path.write_text(path.read_text().replace("9.0.0", "0.0.1"))  # an older writer: no such hint
    with pytest.raises(ConfigError) as refused:
        read_saved_config(path)
    assert "newer than this one" not in str(refused.value)
