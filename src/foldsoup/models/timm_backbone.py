"""timm backbones (`model.name: timm`): any `timm.list_models()` architecture as a feature
extractor, with the project's own linear head on top.

The backbone is `timm.create_model(arch, num_classes=0)`: timm's pooled features (after global
pooling and, for models with a hidden head such as MobileNetV3's `conv_head`, after it), no
classifier. Its output width is `head_hidden_size` where the model has one, else `num_features`.

`model.pretrained` is one of
* a local weights file in timm's own key layout (what `torch.save(model.state_dict())` or
  `safetensors.torch.save_file(model.state_dict())` write for a timm model, and what timm's hub
  repositories hold): `.safetensors`, or a torch file read with `weights_only=True` (no pickled
  objects are ever run). The classifier's keys (`model.pretrained_cfg["classifier"]`, e.g.
  `fc.*`, `head.*`, `head.fc.*`, `classifier.*`) are dropped; every other tensor must fit the
  backbone exactly (missing, unexpected or mis-shaped tensors are refused naming the file and
  the tensor), except BatchNorm's step counters (`num_batches_tracked`), which a file may lack:
  they are filled with 0, as torch's strict `load_state_dict` does (fill_step_counters). Files
  in a family's original layout, or a ViT's position embedding at another image size, go
  through the family's own `checkpoint_filter_fn`, as timm does when it loads;
* a timm pretrained tag of `arch` (`timm.list_pretrained(arch + ".*")`, e.g. `a1_in1k` for
  `resnet18`), fetched on first use through timm from the Hugging Face hub (cached under
  HF_HOME; HF_HUB_OFFLINE=1 uses the cache only);
* null: random weights (seeded), for tests.

`import timm` costs seconds (it imports torch), so it is imported inside the functions. The
names, tags and pretrained image configuration live in foldsoup.config.timm_names, which the
configuration checks at parse time (the config layer must not import models).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from foldsoup.config.timm_names import (  # noqa: F401  (names, tags and image config: checked at parse time too)
    check_arch,
    check_tag,
    pretrained_cfg,
    pretrained_tags,
)
from foldsoup.errors import ModelError
from foldsoup.models.hub import checkpoint_state, fetch_failure, tensors_only
from foldsoup.storage.files import is_checkpoint_path
from foldsoup.storage.weights import state_mismatch


def _timm():
    import timm

    return timm


# ---------------------------------------------------------------- the backbone


def timm_backbone(arch: str, image_size: int | None = None) -> tuple[nn.Module, int]:
    """(timm `arch` with random weights and no classifier, the width of its pooled features).

    `image_size` matters for models whose weights depend on it (a ViT's position embedding):
    they are built for that size; size-agnostic models (CNNs) ignore it."""
    timm = _timm()
    check_arch(arch)
    model = None
    if image_size:
        default = pretrained_cfg(arch)["image_size"]
        if int(image_size) != default:
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=int(image_size))
            except TypeError:  # the constructor has no img_size: the weights do not depend on it
                model = None
    if model is None:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model, dim


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier in timm's layout (pretrained_cfg["classifier"])."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


# ---------------------------------------------------------------- weights files


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """name -> tensor of a .safetensors file or a torch file (weights_only=True), unwrapped from
    "state_dict"/"model"/"state_dict_ema" and a DataParallel "module." prefix."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.pretrained: weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"{path}: unreadable safetensors file ({type(exc).__name__}: {exc})") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError (not weights-only), RuntimeError (TorchScript, truncated)
            first = (str(exc).splitlines() or [""])[0][:200]
            raise ModelError(f"{path}: cannot load as a plain weights file with torch.load(weights_only=True) "
                            f"({type(exc).__name__}: {first}); save the model's state_dict() (or use safetensors)") from exc
    return tensors_only(checkpoint_state(obj, path, ("state_dict", "model", "state_dict_ema")), path)


def _family_filter(model: nn.Module):
    """The checkpoint_filter_fn of the model's timm family module (resamples a ViT's position
    embedding to the model's image size, converts original layouts), or None."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def step_counters(module: nn.Module) -> list[str]:
    """State-dict keys of the BatchNorm step counters of `module`: `<name>.num_batches_tracked` of
    every torch.nn.modules.batchnorm._BatchNorm with track_running_stats (timm's BatchNormAct2d
    included)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and getattr(m, "num_batches_tracked", None) is not None]


def fill_step_counters(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """(`state` with the BatchNorm step counters of `module` it lacks filled with a zero int64
    scalar, how many were filled). What torch's strict load_state_dict accepts: BatchNorm's
    _load_from_state_dict keeps the module's own counter, 0 for a fresh module, when the key is
    missing (older torchvision checkpoints and many converted files have none). Only the
    counter: any other missing tensor stays missing."""
    missing = [key for key in step_counters(module) if key not in state]
    if not missing:
        return state, 0
    filled = dict(state)
    for key in missing:
        filled[key] = torch.tensor(0, dtype=torch.long)
    return filled, len(missing)


def _drop_classifier(state: dict, own: dict, names: tuple[str, ...]) -> dict:
    """Without the classifier's tensors (keys under a classifier name that the backbone lacks)."""
    def is_classifier(key: str) -> bool:
        return key not in own and any(key == n or key.startswith(n + ".") for n in names)

    return {k: v for k, v in state.items() if not is_classifier(k)}


def check_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str,
                log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """`state` fitted to `backbone` (classifier dropped, missing BatchNorm step counters filled
    with 0, family filter where the layout differs); error naming `source` and the first tensor
    that does not fit. `log` is told how many step counters were filled, if any."""
    own = backbone.state_dict()
    names = classifier_names(backbone)
    # Counters first: a file in timm's layout that lacks only them fits as it is (no family filter).
    fitted, counters = fill_step_counters(backbone, _drop_classifier(state, own, names))
    if state_mismatch(fitted, own):
        fn = _family_filter(backbone)
        if fn is not None:
            try:
                filtered = _drop_classifier(dict(fn(dict(state), backbone)), own, names)
            except Exception:  # the filter could not make sense of it: report the tensors as they are
                filtered = None
            if filtered is not None:
                filtered, filtered_counters = fill_step_counters(backbone, filtered)
                if state_mismatch(filtered, own) is None:
                    fitted, counters = filtered, filtered_counters
    # A missing tensor is never a BatchNorm step counter: those are filled.
    problem = state_mismatch(fitted, own, "the backbone of this model.arch",
                             "is this a weights file of this model.arch, in timm's key layout?", dtypes="kind")
    if problem:
        raise ModelError(f"{source}: {problem}")
    if counters and log is not None:
        log(counters_note(source, counters))
    return {k: fitted[k].to(own[k].dtype) for k in own}


def counters_note(source: str, counters: int) -> str:
    """The pretrain log's line for step counters filled in (timm and open_clip alike)."""
    return (f"{source}: filled {counters} missing BatchNorm step counter(s) (num_batches_tracked) with 0, as torch's "
            f"strict load_state_dict does")


def state_from_file(path: str | os.PathLike, backbone: nn.Module,
                    log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The backbone's tensors from a weights file in timm's layout (see check_state)."""
    return check_state(backbone, read_state(path), str(path), log)


def load_into(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        own = backbone.state_dict()
        for key, value in own.items():
            value.copy_(state[key])


# ---------------------------------------------------------------- export (the pretrain job)


def export_pretrained(model_cfg: dict, image_size: int | None = None, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """State dict of the backbone every fine-tune builds (timm_backbone(arch, image_size)) with
    the weights named by model_cfg["pretrained"]: a local file, a timm tag (downloaded through
    timm on first use) or null (random weights drawn with `seed`). `log` gets one line when a
    file's missing BatchNorm step counters were filled."""
    arch = model_cfg["arch"]
    pretrained = model_cfg.get("pretrained")
    check_arch(arch)
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone, _ = timm_backbone(arch, image_size)
        return {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    backbone, _ = timm_backbone(arch, image_size)
    if is_checkpoint_path(str(pretrained)):
        state = state_from_file(pretrained, backbone, log)
    else:
        check_tag(arch, pretrained)  # clear error for unknown tags, before any download
        kwargs = {}
        if image_size and int(image_size) != pretrained_cfg(arch, pretrained)["image_size"]:
            kwargs["img_size"] = int(image_size)
        try:
            try:
                source = _timm().create_model(f"{arch}.{pretrained}", pretrained=True, num_classes=0, **kwargs)
            except TypeError:
                if not kwargs:
                    raise
                source = _timm().create_model(f"{arch}.{pretrained}", pretrained=True, num_classes=0)
        except Exception as exc:
            raise ModelError(_fetch_failure(arch, pretrained, exc)) from exc
        state = check_state(backbone, source.state_dict(), f"timm {arch}.{pretrained}", log)
        del source
    load_into(backbone, state)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def image_settings_lines(data: dict, model_cfg: dict) -> list[str]:
    """The pretrain log's lines on the image settings of a timm run: each of data.image_size,
    mean, std and interpolation with where it comes from (data.image_settings, filled by the
    configuration check), and for a weights file, that its mean and std are the arch's."""
    settings = data.get("image_settings") or {}
    if not settings:  # a step run by hand with a configuration that was not checked
        return [f"image settings: size {data['image_size']} (where each setting comes from is not recorded: "
                f"data.image_settings is empty)"]
    parts, previous = [], None
    for key, name in (("image_size", "size"), ("mean", "mean"), ("std", "std"), ("interpolation", "interpolation")):
        entry = settings.get(key) or {"value": data.get(key), "source": "not recorded"}
        parts.append(f"{name} {entry['value']} ({'same' if entry['source'] == previous else entry['source']})")
        previous = entry["source"]
    lines = ["image settings: " + ", ".join(parts)]
    arch_own = [key for key in ("mean", "std") if key in settings and settings[key]["source"] != "the configuration files"]
    if arch_own and is_checkpoint_path(model_cfg.get("pretrained")):
        lines.append(f"note: a weights file does not say its preprocessing, so data.{' and data.'.join(arch_own)} "
                     f"come from the arch named in model.arch ({model_cfg['arch']}): set data.mean and data.std if "
                     f"the file was trained with others")
    return lines


def _fetch_failure(arch: str, tag: str, exc: Exception) -> str:
    """One line for a tag's weights that timm could not get: without network, the ways out."""

    def where() -> tuple[str, str]:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(f"{arch}.{tag}")
        repo = getattr(cfg, "hf_hub_id", None)
        source = f"the Hugging Face hub ({repo})" if repo else (getattr(cfg, "url", None) or "its URL")
        return source, (f"set model.pretrained to a local weights file of {arch!r} in timm's layout "
                        f"(docs/timm-and-cpu-presets.md, \"timm backbones\"; e.g. saved with safetensors.torch.save_file(timm.create_model('{arch}.{tag}', "
                        f"pretrained=True).state_dict(), '{arch}.safetensors') on a machine with network)")

    return fetch_failure("timm", arch, tag, exc, where)
