"""timm backbones (`model.name: timm`): names, tags, the pretrained config, and weights files in
timm's own formats loaded through `model.pretrained`, checked against the model they came from.

Real timm test models (timm ships tiny `test_*` architectures) with random weights; nothing is
downloaded (a tag's weights are only asked for with HF_HUB_OFFLINE=1 and an empty cache, to see
the error).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from foldsoup.models.timm_backbone import (  # noqa: E402
    ModelError,
    check_arch,
    check_tag,
    export_pretrained,
    is_checkpoint_path,
    pretrained_cfg,
    state_from_file,
    timm_backbone,
)

ROOT = Path(__file__).resolve().parents[1]


def trained_like(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with a 10-class classifier, random weights and (for BatchNorm models) running
    statistics moved away from their initial values, as after training."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.3)
    return model.eval()


def pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own pooled features of a model with a classifier (what num_classes=0 returns)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def features_via_file(arch: str, path: Path, image_size: int | None = None) -> torch.Tensor:
    state = export_pretrained({"arch": arch, "pretrained": str(path)}, image_size)
    backbone, dim = timm_backbone(arch, image_size)
    backbone.load_state_dict(state)
    backbone.eval()
    return backbone, dim


# ---------------------------------------------------------------- names and tags


def test_unknown_arch_names_key_and_close_names():
    check_arch("resnet18")
    with pytest.raises(ModelError, match=r"model.arch 'resnet181' is not a timm model; did you mean 'resnet18'"):
        check_arch("resnet181")
    with pytest.raises(ModelError, match=r"set model.arch: resnet18 and model.pretrained: a1_in1k"):
        check_arch("resnet18.a1_in1k")


def test_unknown_tag_names_key_and_lists_the_tags():
    check_tag("resnet18", "a1_in1k")
    with pytest.raises(ModelError, match=r"model.pretrained 'a1_in1kk' is neither a weights file nor a timm pretrained "
                                        r"tag of 'resnet18' \(tags of 'resnet18': .*tv_in1k.*did you mean 'a1_in1k'"):
        check_tag("resnet18", "a1_in1kk")


def test_checkpoint_paths_are_told_from_tags(tmp_path):
    assert not is_checkpoint_path("a1_in1k")
    assert is_checkpoint_path("weights/resnet18.safetensors")
    assert is_checkpoint_path("resnet18.pth")
    (tmp_path / "w").write_bytes(b"")
    assert is_checkpoint_path(str(tmp_path / "w"))


def test_pretrained_config_of_tag_and_default():
    cfg = pretrained_cfg("test_vit", "r160_in1k")
    assert cfg == {"image_size": 160, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    # A file (or null) takes the arch's default tag's configuration.
    rn = pretrained_cfg("resnet18", "weights/resnet18.safetensors")
    assert rn["image_size"] == 224 and rn["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pretrained_cfg("resnet18", None) == rn
    assert pretrained_cfg("test_resnet")["interpolation"] == "bilinear"
    with pytest.raises(ModelError, match="model.pretrained 'nope'"):
        pretrained_cfg("resnet18", "nope")


def test_feature_width_is_what_the_backbone_returns():
    for arch, width in (("test_efficientnet", 256), ("test_vit", 64), ("mobilenetv3_small_100", 1024)):
        backbone, dim = timm_backbone(arch)
        with torch.no_grad():
            out = backbone.eval()(torch.zeros(1, 3, 64, 64))
        assert dim == width and out.shape == (1, width)


# ---------------------------------------------------------------- weights files in timm's formats


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "timm_checkpoint"])
def test_weights_file_gives_the_source_models_features(tmp_path, fmt):
    """BatchNorm model (running statistics and counters included): the state dict saved as timm
    saves it, classifier and all, loads through model.pretrained into exactly the source features."""
    source = trained_like("test_efficientnet")
    state = source.state_dict()
    assert "classifier.weight" in state and any(k.endswith("running_mean") for k in state)
    if fmt == "safetensors":
        path = tmp_path / "test_efficientnet.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "torch":
        path = tmp_path / "test_efficientnet.pth"
        torch.save(state, path)
    else:  # timm's train.py checkpoint: the weights under "state_dict" next to plain values
        path = tmp_path / "checkpoint-3.pth.tar"
        torch.save({"epoch": 3, "arch": "test_efficientnet", "state_dict": state}, path)
    backbone, dim = features_via_file("test_efficientnet", path)
    x = torch.randn(5, 3, 64, 64)
    assert dim == 256
    assert torch.equal(backbone(x), pooled(source, x))
    assert torch.equal(backbone.state_dict()["bn1.running_var"], state["bn1.running_var"])


def test_vit_file_at_a_smaller_image_size_matches_timms_own_loading(tmp_path):
    """A ViT's position embedding is resampled to data.image_size as timm itself does it."""
    source = trained_like("test_vit")
    path = tmp_path / "test_vit.safetensors"
    save_file(source.state_dict(), str(path))
    backbone, _ = features_via_file("test_vit", path, image_size=96)
    reference = timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                  num_classes=0, img_size=96).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(backbone(x), reference(x))
    # At its own size nothing is resampled: the source's own features.
    same, _ = features_via_file("test_vit", path)
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(same(x), pooled(source, x))


def test_random_weights_are_seeded():
    a = export_pretrained({"arch": "test_efficientnet", "pretrained": None}, seed=3)
    b = export_pretrained({"arch": "test_efficientnet", "pretrained": None}, seed=3)
    c = export_pretrained({"arch": "test_efficientnet", "pretrained": None}, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_stem.weight"], c["conv_stem.weight"])


# ---------------------------------------------------------------- bad files


def test_missing_tensor_is_refused_naming_file_and_tensor(tmp_path):
    state = trained_like("test_efficientnet").state_dict()
    del state["bn1.running_mean"]
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=rf"{path}: tensor 'bn1.running_mean' of the backbone of this model.arch is missing"):
        export_pretrained({"arch": "test_efficientnet", "pretrained": str(path)})


def test_other_archs_file_is_refused_naming_a_tensor(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), path)
    with pytest.raises(ModelError, match=rf"{path}: tensor '.*' of the backbone of this model.arch is missing"):
        export_pretrained({"arch": "test_efficientnet", "pretrained": str(path)})


def test_misshaped_and_unexpected_tensors_are_refused(tmp_path):
    state = trained_like("test_efficientnet").state_dict()
    state["conv_stem.weight"] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=rf"{path}: tensor 'conv_stem.weight' has shape \[1, 2, 3, 3\]"):
        export_pretrained({"arch": "test_efficientnet", "pretrained": str(path)})
    state = trained_like("test_efficientnet").state_dict()
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=rf"{path}: unexpected tensor 'extra.weight'"):
        export_pretrained({"arch": "test_efficientnet", "pretrained": str(path)})


def test_pickled_objects_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(timm.create_model("test_efficientnet"), path)  # a pickled module, not weights
    with pytest.raises(ModelError, match=rf"{path}: cannot load as a plain weights file with torch.load\(weights_only=True\)"):
        export_pretrained({"arch": "test_efficientnet", "pretrained": str(path)})
    with pytest.raises(ModelError, match=r"model.pretrained: weights file '.*nothere.safetensors' does not exist"):
        export_pretrained({"arch": "test_efficientnet", "pretrained": str(tmp_path / "nothere.safetensors")})


def test_tag_without_network_says_how_to_fill_the_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: one line naming model.pretrained, the cache and the
    ways out (a subprocess, since huggingface_hub reads the variables when imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    code = ("from foldsoup.models.timm_backbone import export_pretrained, ModelError\n"
            "try:\n    export_pretrained({'arch': 'test_vit', 'pretrained': 'r160_in1k'})\n"
            "except ModelError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT).stdout
    assert out.startswith("ERR model.pretrained: the 'r160_in1k' weights of 'test_vit' are not in the Hugging Face "
                          f"cache {tmp_path / 'hf' / 'hub'} and HF_HUB_OFFLINE=1 forbids downloading them from the "
                          "Hugging Face hub (timm/test_vit.r160_in1k)"), out
    assert "local weights file" in out and "fill that cache (HF_HOME)" in out
    assert out.count("\n") == 1


# ---------------------------------------------------------------- the configuration (parse time)


def _validate(over: dict) -> dict:
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files

    return validate(deep_update(load_yaml_files(ROOT / "config.yaml"), over), check_paths=False)


def _problems(over: dict) -> list[str]:
    from foldsoup.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _validate(over)
    return [line.removeprefix("  - ") for line in str(info.value).splitlines()[1:]]


OWN = {"data": {"name": "imagefolder", "root": "images"}}


def test_config_checks_arch_and_tag_before_any_job():
    assert _problems({**OWN, "model": {"name": "timm", "arch": "mobilenetv3_smal_100", "pretrained": None}})[0].startswith(
        "model.arch: 'mobilenetv3_smal_100' is not a timm model; did you mean 'mobilenetv3_small_100'")
    assert _problems({**OWN, "model": {"name": "timm", "arch": "resnet18", "pretrained": "a1"}})[0].startswith(
        "model.pretrained: 'a1' is neither a weights file nor a timm pretrained tag of 'resnet18' (tags of 'resnet18': ")
    # open_clip's defaults (ViT-B-32, openai) are no timm model's: both keys must be set.
    assert _problems({**OWN, "model": {"name": "timm"}}) == [
        "model.arch: missing; with model.name 'timm' it is required (allowed: any name of timm.list_models(), e.g. "
        "'resnet18', 'mobilenetv3_small_100')",
        "model.pretrained: missing; with model.name 'timm' it is required (allowed: a weights file in timm's key "
        "layout, a timm pretrained tag of model.arch, or null (random weights, for tests))"]
    assert _problems({"model": {"name": "timm", "arch": "resnet18", "pretrained": None}}) == [
        "model.name: 'timm' does not fit data.name 'digits' (8x8 grey images); allowed: 'digits_cnn'"]


def test_config_takes_image_settings_from_the_weights_unless_set():
    cfg = _validate({**OWN, "model": {"name": "timm", "arch": "test_vit", "pretrained": "r160_in1k"}})
    assert {k: cfg["data"][k] for k in ("image_size", "mean", "std", "interpolation")} == {
        "image_size": 160, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    cfg = _validate({"data": {**OWN["data"], "image_size": 64, "mean": [0.4], "std": [0.2], "interpolation": "bilinear"},
                     "model": {"name": "timm", "arch": "resnet18", "pretrained": "weights/resnet18.safetensors"}})
    assert {k: cfg["data"][k] for k in ("image_size", "mean", "std", "interpolation")} == {
        "image_size": 64, "mean": [0.4], "std": [0.2], "interpolation": "bilinear"}


def test_job_configs_of_a_timm_run():
    from foldsoup.config.job import job_config

    cfg = _validate({**OWN, "model": {"name": "timm", "arch": "resnet18", "pretrained": None}})
    model = {"name": "timm", "arch": "resnet18", "pretrained": None, "normalize_features": False}
    assert job_config(cfg, "pretrain") == {"model": model, "data": {"image_size": 224}, "seed": 0}
    ft = job_config(cfg, "finetune", "lr0.002_minimal_nomix")
    assert ft["model"] == model and ft["data"]["interpolation"] == "bicubic" and ft["data"]["mean"] == [0.485, 0.456, 0.406]
    # A file or tag: the seed draws nothing in pretrain.
    tagged = _validate({**OWN, "model": {"name": "timm", "arch": "resnet18", "pretrained": "a1_in1k"}})
    assert "seed" not in job_config(tagged, "pretrain")
    # Runs of the other models keep their job configs (no data.interpolation: nothing reruns).
    assert "interpolation" not in job_config(_validate({}), "finetune", "lr0.002_minimal_nomix")["data"]


@pytest.mark.parametrize("preset", ["imagefolder-timm-cpu", "medmnist-timm-cpu"])
def test_cpu_presets(preset):
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import load_yaml_files

    cfg = validate(load_yaml_files(ROOT / "config.yaml", ROOT / "presets" / f"{preset}.yaml"), check_paths=False)
    assert cfg["device"] == "cpu" and cfg["folds"]["k"] == 5
    assert len(cfg["grid"]["lr"]) * len(cfg["grid"]["aug"]) * len(cfg["grid"]["mixup"]) == 18
    assert {k: cfg["model"][k] for k in ("name", "arch", "pretrained")} == {
        "name": "timm", "arch": "mobilenetv3_small_100", "pretrained": "lamb_in1k"}
    # 96 px set by the preset; normalisation and interpolation the weights' own.
    assert {k: cfg["data"][k] for k in ("image_size", "mean", "std", "interpolation")} == {
        "image_size": 96, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}
