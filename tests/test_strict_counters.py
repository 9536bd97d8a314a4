"""Issue 23.4: weights files that torch's strict load accepts are accepted, and the `pretrain` log
says which image settings the run takes and where each comes from.

A state dict without BatchNorm's `num_batches_tracked` buffers is what torch's
`load_state_dict(strict=True)` accepts (BatchNorm's `_load_from_state_dict` keeps the module's own
counter, 0 for a fresh module); older torchvision checkpoints and many converted files look like
that. Such files load with the counters 0; any other missing or mis-shaped tensor is still
refused, naming it. Tiny timm models (timm's `test_efficientnet`, BatchNorm) and open_clip's RN50
image tower (BatchNorm), random weights, nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

import foldsoup.models.timm_backbone as tb  # noqa: E402
from foldsoup.models.timm_backbone import ModelError, export_pretrained, state_from_file, timm_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_efficientnet"


def trained_like(arch: str = ARCH, seed: int = 0) -> torch.nn.Module:
    """A timm BatchNorm model with a classifier, running statistics moved by a few training
    forwards (counters 3), as after training."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.3)
    return model.eval()


def without_counters(state: dict) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.fixture
def counterless(tmp_path):
    """(file without any num_batches_tracked, the state dict it was saved from)."""
    state = trained_like().state_dict()
    assert sum(k.endswith("num_batches_tracked") for k in state) > 5
    path = tmp_path / "no_counters.safetensors"
    save_file(without_counters(state), str(path))
    return path, state


def test_torch_strict_load_accepts_such_a_file(counterless):
    path, _ = counterless
    from safetensors.torch import load_file

    model = timm.create_model(ARCH, pretrained=False, num_classes=10)
    model.load_state_dict(load_file(str(path)), strict=True)  # the standard this project now meets
    assert all(int(v) == 0 for k, v in model.state_dict().items() if k.endswith("num_batches_tracked"))


def test_a_file_without_step_counters_loads_with_them_zero(counterless, monkeypatch):
    path, source = counterless
    # In timm's layout but for the counters: no family filter is asked.
    monkeypatch.setattr(tb, "_family_filter", lambda model: pytest.fail("family filter used for a timm-layout file"))
    backbone, _ = timm_backbone(ARCH)
    lines = []
    state = state_from_file(path, backbone, lines.append)
    counters = [k for k in backbone.state_dict() if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == torch.int64 and state[k].shape == () and int(state[k]) == 0
                            for k in counters)
    assert set(state) == set(backbone.state_dict())
    for key, value in state.items():
        if key not in counters:
            assert torch.equal(value, source[key]), key
    assert lines == [f"{path}: filled {len(counters)} missing BatchNorm step counter(s) (num_batches_tracked) with 0, "
                     f"as torch's strict load_state_dict does"]

    exported = export_pretrained({"arch": ARCH, "pretrained": str(path)})
    assert all(torch.equal(exported[k], state[k]) for k in state)
    # What torch's own strict load gives on the same backbone.
    reference, _ = timm_backbone(ARCH)
    reference.load_state_dict({k: v for k, v in without_counters(source).items() if k in state}, strict=True)
    assert all(torch.equal(exported[k], v) for k, v in reference.state_dict().items())


def test_a_file_with_its_counters_is_loaded_as_it_is(tmp_path):
    source = trained_like().state_dict()
    path = tmp_path / "full.pth"
    torch.save(source, path)
    lines = []
    state = export_pretrained({"arch": ARCH, "pretrained": str(path)}, log=lines.append)
    assert int(state["bn1.num_batches_tracked"]) == 3 and lines == []


def test_a_missing_real_tensor_is_refused_naming_it_not_a_counter(tmp_path):
    state = without_counters(trained_like().state_dict())
    del state["blocks.0.0.bn1.running_var"]
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    own = len(timm_backbone(ARCH)[0].state_dict())
    with pytest.raises(ModelError) as info:
        export_pretrained({"arch": ARCH, "pretrained": str(path)})
    assert str(info.value) == (f"{path}: tensor 'blocks.0.0.bn1.running_var' of the backbone of this model.arch is missing "
                               f"(1 of {own} missing; "
                               f"is this a weights file of this model.arch, in timm's key layout?)")
    assert "num_batches_tracked" not in str(info.value)


def test_a_misshaped_tensor_is_still_refused(tmp_path):
    state = without_counters(trained_like().state_dict())
    state["conv_stem.weight"] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=rf"{path}: tensor 'conv_stem.weight' has shape \[1, 2, 3, 3\]"):
        export_pretrained({"arch": ARCH, "pretrained": str(path)})


def test_a_counter_of_no_batchnorm_is_not_filled(tmp_path):
    """Only counters of BatchNorm modules with running statistics are the model's own to fill."""
    from foldsoup.models.timm_backbone import fill_step_counters

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.BatchNorm2d(4, track_running_stats=False))
    state = without_counters(model.state_dict())
    filled, n = fill_step_counters(model, state)
    assert n == 1 and set(filled) - set(state) == {"1.num_batches_tracked"}
    assert set(filled) == set(model.state_dict())


# ---------------------------------------------------------------- the CLIP route (RN50: BatchNorm)


@pytest.fixture(scope="module")
def rn50_file(tmp_path_factory):
    """open_clip's RN50 image tower (random weights, counters moved) saved without its counters
    as a full CLIP checkpoint (`visual.*` keys)."""
    pytest.importorskip("open_clip")
    from foldsoup.models.clip import open_clip_visual

    torch.manual_seed(3)
    visual, _ = open_clip_visual("RN50")
    with torch.no_grad():
        for m in visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.num_batches_tracked.fill_(7)
    state = {f"visual.{k}": v for k, v in without_counters(visual.state_dict()).items()}
    path = tmp_path_factory.mktemp("rn50") / "rn50.safetensors"
    save_file(state, str(path))
    return path, visual.state_dict()


def _clip_cfg(path) -> dict:
    return {"name": "open_clip", "arch": "RN50", "pretrained": str(path), "quick_gelu": None, "normalize_features": True}


def test_clip_resnet_file_without_counters_loads_with_them_zero(rn50_file):
    from foldsoup.models.clip import export_pretrained_visual

    path, source = rn50_file
    lines = []
    state = export_pretrained_visual(_clip_cfg(path), lines.append)
    counters = [k for k in source if k.endswith("num_batches_tracked")]
    assert len(counters) > 40 and all(int(state[k]) == 0 and state[k].dtype == torch.int64 for k in counters)
    assert all(torch.equal(state[k], source[k]) for k in source if k not in counters)
    assert lines == [f"{path}: filled {len(counters)} missing BatchNorm step counter(s) (num_batches_tracked) with 0, "
                     f"as torch's strict load_state_dict does"]


def test_clip_resnet_file_missing_a_real_tensor_or_misshaped_is_refused(rn50_file, tmp_path):
    from safetensors.torch import load_file

    from foldsoup.errors import ClipError
    from foldsoup.models.clip import export_pretrained_visual

    path, source = rn50_file
    state = load_file(str(path))
    cut = {k: v for k, v in state.items() if k != "visual.layer1.0.bn2.weight"}
    save_file(cut, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ClipError, match=r"tensor 'layer1.0.bn2.weight' of the image tower of this model.arch is missing \(1 of "):
        export_pretrained_visual(_clip_cfg(tmp_path / "cut.safetensors"))
    bad = {**state, "visual.conv1.weight": torch.zeros(2, 3, 3, 3)}
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ClipError, match=r"tensor 'conv1.weight' has shape \[2, 3, 3, 3\]"):
        export_pretrained_visual(_clip_cfg(tmp_path / "shape.safetensors"))


# ---------------------------------------------------------------- image settings in the pretrain log


def _validate(data: dict, pretrained) -> dict:
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files

    over = {"data": {"name": "imagefolder", "root": "images", **data},
            "model": {"name": "timm", "arch": ARCH, "pretrained": pretrained}}
    return validate(deep_update(load_yaml_files(ROOT / "config.yaml"), over), check_paths=False)


def _pretrain_log(cfg: dict, tmp_path, capsys) -> list[str]:
    """The pretrain step as its job runs it: its job config merged with the runtime settings."""
    from foldsoup import steps
    from foldsoup.config.job import job_config, merge, runtime_config

    capsys.readouterr()
    steps.pretrain(merge(job_config(cfg, "pretrain"), runtime_config(cfg)), "unused", str(tmp_path / "backbone.safetensors"))
    return [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]


TIMM_OWN = "timm's pretrained config of test_efficientnet.r160_in1k, the default tag of model.arch"


def test_pretrain_logs_each_image_setting_and_its_source(counterless, tmp_path, capsys):
    path, _ = counterless
    lines = _pretrain_log(_validate({}, str(path)), tmp_path, capsys)
    assert lines[0] == (f"image settings: size 160 ({TIMM_OWN}), mean [0.485, 0.456, 0.406] (same), "
                        f"std [0.229, 0.224, 0.225] (same), interpolation bicubic (same)")
    assert lines[1] == ("note: a weights file does not say its preprocessing, so data.mean and data.std come from the "
                        "arch named in model.arch (test_efficientnet): set data.mean and data.std if the file was "
                        "trained with others")
    assert lines[2].startswith(f"{path}: filled ") and lines[3].startswith("saved backbone")

    lines = _pretrain_log(_validate({"image_size": 64, "mean": [0.5, 0.5, 0.5]}, str(path)), tmp_path, capsys)
    assert lines[0] == (f"image settings: size 64 (the configuration files), mean [0.5, 0.5, 0.5] (same), "
                        f"std [0.229, 0.224, 0.225] ({TIMM_OWN}), interpolation bicubic (same)")
    assert lines[1].startswith("note: a weights file does not say its preprocessing, so data.std come from")

    both = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    lines = _pretrain_log(_validate(both, str(path)), tmp_path, capsys)
    assert lines[0] == (f"image settings: size 160 ({TIMM_OWN}), mean [0.5, 0.5, 0.5] (the configuration files), "
                        f"std [0.5, 0.5, 0.5] (same), interpolation bilinear (same)")
    assert not lines[1].startswith("note")  # mean and std are the user's

    lines = _pretrain_log(_validate({}, None), tmp_path, capsys)  # random weights: no file, no note
    assert lines[0].startswith(f"image settings: size 160 ({TIMM_OWN})") and lines[1].startswith("saved backbone")


def test_a_tag_names_its_own_pretrained_config():
    from foldsoup.models.timm_backbone import image_settings_lines

    cfg = _validate({}, "r160_in1k")
    assert image_settings_lines(cfg["data"], cfg["model"]) == [
        "image settings: size 160 (timm's pretrained config of test_efficientnet.r160_in1k), mean [0.485, 0.456, 0.406] "
        "(same), std [0.229, 0.224, 0.225] (same), interpolation bicubic (same)"]


def test_where_a_setting_comes_from_reruns_nothing():
    """The same values, once from timm and once from the configuration files: every job's config
    (a rerun trigger) is the same; only the runtime settings differ."""
    from foldsoup.config.job import STEP_KEYS, job_config, runtime_config

    filled = _validate({}, None)
    given = _validate({"image_size": 160, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "interpolation": "bicubic"}, None)
    assert filled["data"]["image_settings"] != given["data"]["image_settings"]
    steps = [(s, None) for s in (*STEP_KEYS, "prepare", "pretrain")] + [("finetune", "lr0.002_medium_nomix")]
    for step, hp in steps:
        assert job_config(filled, step, hp) == job_config(given, step, hp), step
        assert "image_settings" not in job_config(filled, step, hp).get("data", {}), step
    assert runtime_config(filled)["data"]["image_settings"] == filled["data"]["image_settings"]
