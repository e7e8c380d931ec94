"""Models: the paper's backbones build and train, vgg16_gap's structure, pretrained weights from
local files (state dict, checkpoint dict, safetensors) and the hub cache, clear errors offline and
for bad files, fine-tuning parameter groups, and the model file round trip."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from skinhpc.config import ModelConfig
from skinhpc.models import (
    freeze_backbone_norms,
    VGG16GAP,
    ModelFileError,
    PretrainedWeightsError,
    _hub_reachable,
    backbone_and_head_params,
    create_model,
    load_model_file,
    save_model_file,
    set_backbone_trainable,
)

REPO = Path(__file__).resolve().parents[1]


def _forward_backward(model: nn.Module, size: int = 64) -> torch.Tensor:
    model.train()
    out = model(torch.randn(2, 3, size, size))
    out.sum().backward()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backbone", [pytest.param("resnet152", marks=pytest.mark.slow),
                                      pytest.param("seresnext101_32x4d", marks=pytest.mark.slow),
                                      "vgg16", "vgg16_gap"])  # the big ones take ~25-30 s on 2 busy cores
def test_paper_backbone_builds_and_trains_one_step_at_64px(backbone):
    model = create_model(ModelConfig(backbone=backbone, pretrained="false"), num_classes=7)
    out = _forward_backward(model)
    assert out.shape == (2, 7)
    assert model.get_classifier().out_features == 7
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_transformers_take_the_configured_image_size_and_every_head_counts_as_head(backbone):
    model = create_model(ModelConfig(backbone=backbone, image_size=64, pretrained="false"), num_classes=7)
    assert _forward_backward(model).shape == (2, 7)  # built for 64 px, not its native 224
    _, head = backbone_and_head_params(model)
    classifier = model.get_classifier()
    heads = classifier if isinstance(classifier, tuple) else (classifier,)  # distilled: two heads
    assert {id(p) for m in heads for p in m.parameters()} == {id(p) for p in head}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("filters", [128, 256])
def test_vgg16_gap_has_conv6_with_configured_filters_bn_and_global_pooling(filters):
    model = create_model(ModelConfig(backbone="vgg16_gap", gap_filters=filters, drop_rate=0.3))
    assert isinstance(model, VGG16GAP)
    assert model.conv6.kernel_size == (1, 1) and model.conv6.out_channels == filters
    assert isinstance(model.bn6, nn.BatchNorm2d) and model.bn6.num_features == filters
    assert model.fc.in_features == filters and model.drop.p == 0.3
    # FC6/FC7 are gone: no layer with 4096 units, and GAP makes the input size free.
    assert not any(getattr(m, "out_channels", getattr(m, "out_features", 0)) == 4096 for m in model.modules())
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == model(torch.randn(1, 3, 96, 128)).shape == (1, 7)


@pytest.mark.timeout(60)
def test_vgg16_gap_features_have_timm_vgg16_names_and_shapes():
    gap = VGG16GAP().features.state_dict()
    timm_features = timm.create_model("vgg16", pretrained=False).features.state_dict()
    assert {k: v.shape for k, v in gap.items()} == {k: v.shape for k, v in timm_features.items()}


@pytest.mark.timeout(60)
def test_plain_vgg16_keeps_fc6_fc7_as_pre_logits():
    model = create_model(ModelConfig(backbone="vgg16", drop_rate=0.5))
    assert model.pre_logits.fc1.out_channels == 4096 and model.pre_logits.fc2.out_channels == 4096
    assert model.head.drop.p == 0.5


@pytest.mark.timeout(60)
def test_drop_rate_and_class_count_reach_timm_models():
    model = create_model(ModelConfig(backbone="resnet18", drop_rate=0.25), num_classes=3)
    assert model.drop_rate == 0.25 and model.fc.out_features == 3


@pytest.mark.timeout(30)
def test_unknown_backbone_names_close_timm_models():
    with pytest.raises(ValueError, match="resnet18"):
        create_model(ModelConfig(backbone="resnetx18"))


# --------------------------------------------------------------------------- local weights

def _imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return timm.create_model("resnet18", pretrained=False, num_classes=1000).state_dict()


def _assert_backbone_loaded(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for key, value in source.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(own[key], value), key
    assert own["fc.weight"].shape == (7, 512)  # a new 7-class head, not the file's 1000 classes


@pytest.mark.timeout(60)
def test_a_weights_path_with_the_backbone_field_loads_that_backbones_file(tmp_path: Path) -> None:
    source = _imagenet_resnet18()
    torch.save(source, tmp_path / "resnet18.pth")
    model = create_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "{backbone}.pth")))
    _assert_backbone_loaded(model, source)


@pytest.mark.timeout(60)
def test_state_dict_file_loads_backbone_and_reinitialises_head(tmp_path, caplog):
    source = _imagenet_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source, path)
    with caplog.at_level("INFO", logger="skinhpc.models"):
        model = create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))
    _assert_backbone_loaded(model, source)
    assert "head re-initialised: fc.weight, fc.bias" in caplog.text


@pytest.mark.timeout(60)
def test_a_seven_class_file_still_gets_a_fresh_head(tmp_path):
    torch.manual_seed(5)
    other_run = timm.create_model("resnet18", pretrained=False, num_classes=7).state_dict()  # e.g. a model_best.pt
    torch.save(other_run, tmp_path / "r18-7.pth")
    torch.manual_seed(0)
    fresh = create_model(ModelConfig(backbone="resnet18", pretrained="false"))
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "r18-7.pth")))
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], other_run["layer1.0.conv1.weight"])
    assert torch.equal(model.fc.weight, fresh.fc.weight) and not torch.equal(model.fc.weight, other_run["fc.weight"])


@pytest.mark.timeout(60)
def test_timm_checkpoint_dict_with_ddp_prefixes_loads(tmp_path):
    source = _imagenet_resnet18()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in source.items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    model = create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))
    _assert_backbone_loaded(model, source)


@pytest.mark.timeout(60)
def test_safetensors_file_with_compile_prefixes_loads(tmp_path):
    source = _imagenet_resnet18()
    path = tmp_path / "model.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in source.items()}, str(path))
    model = create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))
    _assert_backbone_loaded(model, source)


@pytest.mark.timeout(120)
def test_vgg16_weights_load_into_vgg16_gap_conv_layers(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vgg16", pretrained=False).state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(source, path)
    model = create_model(ModelConfig(backbone="vgg16_gap", gap_filters=256, pretrained=str(path)))
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, source[f"features.{key}"]), key
    assert model.fc.out_features == 7


@pytest.mark.timeout(120)
def test_torchvision_named_vgg16_weights_load_into_timm_vgg16(tmp_path):
    # torchvision (and the hub's vgg16.tv_in1k file) keep FC6/FC7/FC8 as Linear "classifier.0/3/6".
    torch.manual_seed(0)
    source = timm.create_model("vgg16", pretrained=False).state_dict()
    tv = {k: v for k, v in source.items() if k.startswith("features.")}
    tv["classifier.0.weight"] = source["pre_logits.fc1.weight"].reshape(4096, -1)
    tv["classifier.0.bias"] = source["pre_logits.fc1.bias"]
    tv["classifier.3.weight"] = source["pre_logits.fc2.weight"].reshape(4096, -1)
    tv["classifier.3.bias"] = source["pre_logits.fc2.bias"]
    tv["classifier.6.weight"], tv["classifier.6.bias"] = source["head.fc.weight"], source["head.fc.bias"]
    path = tmp_path / "vgg16_tv.pth"
    torch.save(tv, path)
    del source
    model = create_model(ModelConfig(backbone="vgg16", pretrained=str(path)))
    own = model.state_dict()
    assert torch.equal(own["pre_logits.fc1.weight"].reshape(4096, -1), tv["classifier.0.weight"])
    assert torch.equal(own["pre_logits.fc2.bias"], tv["classifier.3.bias"])
    assert torch.equal(own["features.28.weight"], tv["features.28.weight"])
    assert own["head.fc.weight"].shape == (7, 4096)


@pytest.mark.timeout(180)
def test_cadene_se_resnext_file_loads_into_timm_seresnext_as_the_same_network(tmp_path):
    # The paper's SE-ResNeXt usually comes from Cadene's pretrainedmodels (layer0.conv1, se_module,
    # last_linear); timm's legacy_ models keep that layout, so one of them stands in for the file.
    torch.manual_seed(0)
    cadene = timm.create_model("legacy_seresnext50_32x4d", num_classes=7).eval()
    path = tmp_path / "se_resnext50_32x4d-a260b3a4.pth"
    torch.save(cadene.state_dict(), path)
    model = create_model(ModelConfig(backbone="seresnext50_32x4d", pretrained=str(path), drop_rate=0.0)).eval()
    model.fc.load_state_dict(cadene.last_linear.state_dict())  # the head is re-initialised on purpose
    model.maxpool = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # Cadene's stem pool, the one difference
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), cadene(x), atol=1e-6)


@pytest.mark.timeout(60)
def test_cadene_se_resnet_file_is_refused_with_the_timm_legacy_name(tmp_path):
    # Cadene's SE-ResNets stride in the first 1x1 conv, timm's seresnet in the 3x3: same shapes,
    # another network, so no renaming; the error points to timm's legacy_seresnet*.
    path = tmp_path / "se_resnet18.pth"
    torch.save(timm.create_model("legacy_seresnet18").state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"se_resnet18\.pth.*legacy_se"):
        create_model(ModelConfig(backbone="seresnet18", pretrained=str(path)))
    model = create_model(ModelConfig(backbone="legacy_seresnet18", pretrained=str(path)))
    assert model.last_linear.out_features == 7


@pytest.mark.timeout(30)
def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "resnet152.pth"
    with pytest.raises(PretrainedWeightsError, match=str(path)):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))


@pytest.mark.timeout(30)
def test_a_timm_train_checkpoint_with_its_saved_options_loads_its_ema_weights(tmp_path):
    # timm's train.py saves args=argparse.Namespace(...) beside state_dict and state_dict_ema.
    ema = _imagenet_resnet18()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "args": argparse.Namespace(model="resnet18", lr=0.1, device="cuda:0"),
                "state_dict": {k: torch.zeros_like(v) for k, v in ema.items()}, "state_dict_ema": ema}, path)
    _assert_backbone_loaded(create_model(ModelConfig(backbone="resnet18", pretrained=str(path))), ema)


@pytest.mark.timeout(30)
def test_pickled_objects_are_refused_naming_the_object_without_terminal_codes(tmp_path):
    path = tmp_path / "train_checkpoint.pth"
    torch.save({"args": Path("/somewhere"), "state_dict": _imagenet_resnet18()}, path)
    with pytest.raises(PretrainedWeightsError, match=r"cannot read .*Unsupported global.*Path.*weights_only=True") as e:
        create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))
    assert "\x1b" not in str(e.value)


@pytest.mark.timeout(30)
def test_an_empty_weights_or_model_file_is_named_as_empty(tmp_path):
    path = tmp_path / "resnet18.pth"
    path.touch()  # a failed download, or a full quota
    with pytest.raises(PretrainedWeightsError, match=rf"cannot read {path} .*empty or cut short"):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))
    with pytest.raises(ModelFileError, match=rf"cannot read model file {path}: .*empty or cut short"):
        load_model_file(path)


@pytest.mark.timeout(60)
def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(path)))


# resnet18's tensors all fit resnet34 by name and shape, but cover only half of its blocks;
# resnet34's file holds every resnet18 tensor, plus more blocks per stage.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("file_arch, model_arch, message", [
    ("resnet18", "resnet34", r"lacks \d+ of the backbone's .*layer1\.2\."),
    ("resnet34", "resnet18", r"has \d+ tensors inside the model's own layers .*layer1\.2\."),
])
def test_weights_of_a_smaller_or_deeper_sibling_are_refused_not_loaded_in_part(
        tmp_path, file_arch, model_arch, message):
    path = tmp_path / f"{file_arch}.pth"
    torch.save(timm.create_model(file_arch, pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=message):
        create_model(ModelConfig(backbone=model_arch, pretrained=str(path)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_a_transformer_file_made_at_224_px_loads_at_another_size_with_position_embeddings_resampled_as_timm_does(
        tmp_path, backbone):
    from timm.models.vision_transformer import checkpoint_filter_fn
    path = tmp_path / f"{backbone}.pth"
    state = timm.create_model(backbone, pretrained=False).state_dict()  # 224 px: a 14x14 grid
    torch.save(state, path)
    model = create_model(ModelConfig(backbone=backbone, image_size=64, pretrained=str(path)), num_classes=7)
    expected = checkpoint_filter_fn(dict(state), model)["pos_embed"]  # timm's own loader, 4x4 grid
    assert model.pos_embed.shape == expected.shape and torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert _forward_backward(model).shape == (2, 7)


# --------------------------------------------------------------------------- hub

def _run_isolated(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    """Python in a fresh process whose Hugging Face cache is ``hf_home`` (read at import time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(hf_home)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=100)


@pytest.mark.timeout(120)
def test_pretrained_true_without_network_says_how_to_get_a_local_file(tmp_path):
    if _hub_reachable():
        pytest.skip("this machine reaches the Hugging Face hub")
    result = _run_isolated("""
        from skinhpc.config import ModelConfig
        from skinhpc.models import create_model, PretrainedWeightsError
        try:
            create_model(ModelConfig(backbone="resnet152", pretrained="TRUE"))
        except PretrainedWeightsError as e:
            print("MESSAGE", e)
        """, tmp_path / "empty_cache")
    assert result.returncode == 0, result.stderr
    assert "MESSAGE" in result.stdout
    assert "no network" in result.stdout
    assert "timm.create_model('resnet152', pretrained=True)" in result.stdout
    assert "model.pretrained=/path/to/resnet152.pth" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_pretrained_true_uses_weights_in_the_hub_cache_without_network(tmp_path):
    if _hub_reachable():
        pytest.skip("this machine reaches the Hugging Face hub (it would download instead)")
    # The layout huggingface_hub gives a downloaded file (e.g. fetched earlier on a shared home).
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / f"models--timm--{timm.models.get_pretrained_cfg('resnet18').hf_hub_id.split('/')[1]}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = _imagenet_resnet18()
    save_file(source, str(repo / "snapshots" / commit / "model.safetensors"))
    torch.save(source, tmp_path / "expected.pth")
    result = _run_isolated(f"""
        import torch
        from skinhpc.config import ModelConfig
        from skinhpc.models import create_model
        model = create_model(ModelConfig(backbone="resnet18", pretrained="true"))
        expected = torch.load({str(tmp_path / "expected.pth")!r}, weights_only=True)
        same = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items() if not k.startswith("fc."))
        print("SAME", same, model.fc.out_features)
        """, tmp_path / "hf")
    assert "SAME True 7" in result.stdout, result.stderr


# --------------------------------------------------------------------------- fine-tuning

@pytest.mark.timeout(60)
@pytest.mark.parametrize("backbone, head_count", [("resnet18", 2), ("vgg16_gap", 5)])
def test_backbone_and_head_params_split_all_parameters(backbone, head_count):
    model = create_model(ModelConfig(backbone=backbone, gap_filters=128))
    backbone_params, head_params = backbone_and_head_params(model)
    assert len(head_params) == head_count  # fc weight+bias; vgg16_gap also conv6 + bn6 weight/bias
    assert {id(p) for p in model.get_classifier().parameters()} <= {id(p) for p in head_params}
    assert len(backbone_params) + len(head_params) == len(list(model.parameters()))
    assert not {id(p) for p in backbone_params} & {id(p) for p in head_params}


@pytest.mark.timeout(60)
def test_frozen_backbone_trains_only_the_head():
    model = create_model(ModelConfig(backbone="resnet18"))
    set_backbone_trainable(model, False)
    _forward_backward(model)
    backbone_params, head_params = backbone_and_head_params(model)
    assert all(p.grad is None and not p.requires_grad for p in backbone_params)
    assert all(p.grad is not None for p in head_params)
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backbone", ["resnet18", "vgg16_gap"])
def test_frozen_backbone_keeps_its_batchnorm_statistics_while_the_head_s_train(backbone):
    model = create_model(ModelConfig(backbone=backbone, gap_filters=32))
    set_backbone_trainable(model, False)
    model.train()
    freeze_backbone_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model(torch.rand(2, 3, 32, 32) * 3)
    after = model.state_dict()
    changed = sorted(k for k, v in before.items() if not torch.equal(v, after[k]))
    assert changed == (["bn6.running_mean", "bn6.running_var"] if backbone == "vgg16_gap" else [])


# --------------------------------------------------------------------------- model files

@pytest.mark.timeout(60)
@pytest.mark.parametrize("backbone", ["resnet18", "vgg16_gap"])
def test_model_file_round_trip_gives_identical_outputs(tmp_path, backbone):
    cfg = ModelConfig(backbone=backbone, gap_filters=128, image_size=64, pretrained="false")
    model = create_model(cfg)
    _forward_backward(model)  # moves BatchNorm running stats away from their initial values
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    path = tmp_path / "fold0" / "model_best.pt"
    save_model_file(path, model, cfg, stored_size=(150, 200), epoch=4, val_balanced_accuracy=0.5)
    assert [p.name for p in path.parent.iterdir()] == ["model_best.pt"]  # no temp file left
    loaded, meta = load_model_file(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["model_cfg"] == cfg and meta["model"]["backbone"] == backbone
    assert meta["stored_size"] == [150, 200] and meta["epoch"] == 4 and meta["val_balanced_accuracy"] == 0.5
    assert meta["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.mark.timeout(60)
def test_model_file_of_a_wrapped_model_holds_the_plain_module(tmp_path):
    cfg = ModelConfig(backbone="resnet18")
    model = create_model(cfg)

    class Wrapper(nn.Module):  # like DDP: the real model under .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module
    save_model_file(tmp_path / "m.pt", Wrapper(model), cfg, stored_size=[64, 64])
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in blob["state_dict"])
    load_model_file(tmp_path / "m.pt")


@pytest.mark.timeout(30)
def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="model_best.pt not found"):
        load_model_file(tmp_path / "model_best.pt")
