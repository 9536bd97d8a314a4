"""timm names, pretrained tags and the image settings of a timm model's weights: what the
configuration checks before any job runs (model.arch with did-you-mean, model.pretrained as a
tag of it) and fills in (data.image_size, mean, std, interpolation), and what
foldsoup.models.timm_backbone builds on.

`import timm` imports torch (seconds): every function imports it inside, and the configuration
calls them only for model.name timm. No network: timm's model names and pretrained
configurations are tables in its code.
"""

from __future__ import annotations

import copy
import difflib
import os

from foldsoup.errors import ModelError
from foldsoup.storage.files import is_checkpoint_path


def _timm():
    import timm

    return timm


# ---------------------------------------------------------------- names, tags, pretrained config


def check_arch(arch: str) -> None:
    """Refuse a name that is not in timm.list_models(), with close names (did you mean)."""
    timm = _timm()
    names = timm.list_models()
    if arch in names:
        return
    if "." in arch:
        base, tag = arch.split(".", 1)
        if base in names:
            raise ModelError(f"model.arch {arch!r} includes a pretrained tag; set model.arch: {base} and "
                            f"model.pretrained: {tag}")
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    mean = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(f"model.arch {arch!r} is not a timm model{mean} (allowed: one of the {len(names)} names of "
                    f"timm.list_models(), e.g. 'resnet18', 'mobilenetv3_small_100', 'vit_small_patch16_224')")


def pretrained_tags(arch: str) -> list[str]:
    """The pretrained tags timm knows for `arch` (a table in timm's code, no network)."""
    return [name.split(".", 1)[1] for name in _timm().list_pretrained(f"{arch}.*") if name.split(".", 1)[0] == arch]


def check_tag(arch: str, tag: str) -> None:
    """Refuse a tag timm does not know for `arch`, listing the arch's tags."""
    tags = pretrained_tags(arch)
    if tag in tags:
        return
    close = difflib.get_close_matches(tag, tags, n=1, cutoff=0.6)
    mean = f"; did you mean {close[0]!r}?" if close else ""
    hint = f"tags of {arch!r}: {', '.join(tags)}" if tags else f"{arch!r} has no pretrained tags in timm"
    raise ModelError(f"model.pretrained {tag!r} is neither a weights file nor a timm pretrained tag of {arch!r} "
                    f"({hint}){mean}")


def pretrained_cfg(arch: str, pretrained: str | None = None) -> dict:
    """Input image size, mean, std and interpolation the weights were trained with: the tag's
    pretrained config, else (a file, or null) the arch's default tag's (timm's own defaults
    where the arch has none). No network: these are tables in timm's code."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    check_arch(arch)
    name = arch
    if pretrained and not is_checkpoint_path(pretrained):
        check_tag(arch, pretrained)
        name = f"{arch}.{pretrained}"
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    resolved = resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    return {
        "image_size": int(resolved["input_size"][-1]),
        "mean": [float(v) for v in resolved["mean"]],
        "std": [float(v) for v in resolved["std"]],
        "interpolation": str(resolved.get("interpolation") or "bicubic"),
    }


# ---------------------------------------------------------------- the configuration's checks
#
# Called by foldsoup.config.schema.validate for model.name timm only (they import timm).

# The image settings a timm model's pretrained configuration gives unless the config sets them.
IMAGE_KEYS = ("image_size", "mean", "std", "interpolation")


def _missing_keys(raw: dict) -> list[str]:
    """model.arch and model.pretrained when the configuration files do not set them: their
    schema defaults are open_clip's (ViT-B-32, openai), no timm model's."""
    raw_model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    return [key for key in ("arch", "pretrained") if key not in raw_model]


def problems(model: dict, raw: dict) -> list[str]:
    """model.arch (did you mean) and model.pretrained (a tag of it) of a timm model section;
    `raw`: the configuration as given, before defaults (a timm model must set both itself)."""
    missing = _missing_keys(raw)
    if missing:
        allowed = {"arch": "any name of timm.list_models(), e.g. 'resnet18', 'mobilenetv3_small_100'",
                   "pretrained": "a weights file in timm's key layout, a timm pretrained tag of model.arch, or null "
                                 "(random weights, for tests)"}
        return [f"model.{key}: missing; with model.name 'timm' it is required (allowed: {allowed[key]})" for key in missing]
    try:
        check_arch(model["arch"])
        if model["pretrained"] is not None and not is_checkpoint_path(model["pretrained"]):
            check_tag(model["arch"], model["pretrained"])
    except ModelError as err:
        message = str(err)
        for key in ("model.arch", "model.pretrained"):  # "model.arch 'x' is ..." -> "model.arch: 'x' is ..."
            if message.startswith(key + " "):
                message = f"{key}: {message[len(key) + 1:]}"
        return [message]
    return []


def file_problem(model: dict) -> str | None:
    """model.pretrained spelled like a weights file, or naming a folder, that is not a file (on disk)."""
    pretrained = model.get("pretrained") or ""
    if (is_checkpoint_path(pretrained) or os.path.exists(pretrained)) and not os.path.isfile(pretrained):
        what = "is a folder" if os.path.exists(pretrained) else "does not exist"
        return (f"model.pretrained: weights file {pretrained!r} {what}; allowed: an existing .safetensors or "
                f"torch file in timm's key layout, a timm pretrained tag of {model['arch']!r}, or null")
    return None


def fill_image(filled: dict, raw: dict) -> None:
    """data.image_size, mean, std and interpolation from the timm weights' pretrained
    configuration, where the configuration files do not set them (schema defaults do not count),
    and data.image_settings: each of the four with where it comes from (the pretrain log says it;
    a runtime key, so it reruns nothing). Missing or unknown archs and tags are left for
    problems() to report."""
    if _missing_keys(raw) or filled["data"]["name"] == "digits":  # digits + timm is refused as it is
        return
    raw_data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    try:
        image = pretrained_cfg(filled["model"]["arch"], filled["model"]["pretrained"])
    except ModelError:
        return
    origin = _image_origin(filled["model"]["arch"], filled["model"]["pretrained"])
    settings = {}
    for key in IMAGE_KEYS:
        if key not in raw_data:
            filled["data"][key] = image[key]
        settings[key] = {"value": copy.deepcopy(filled["data"][key]),
                         "source": "the configuration files" if key in raw_data else origin}
    filled["data"]["image_settings"] = settings


def _image_origin(arch: str, pretrained: str | None) -> str:
    """Where timm's image settings of (arch, pretrained) come from, in words: the pretrained
    configuration of the tag, or of the arch's default tag (a weights file, or null)."""
    from timm.models import get_pretrained_cfg

    tagged = bool(pretrained) and not is_checkpoint_path(pretrained)
    cfg = get_pretrained_cfg(f"{arch}.{pretrained}" if tagged else arch, allow_unregistered=True)
    if cfg is None:
        return f"timm's default data config: model.arch {arch} has no pretrained config"
    name = f"{arch}.{pretrained if tagged else getattr(cfg, 'tag', None) or ''}".rstrip(".")
    return f"timm's pretrained config of {name}" + ("" if tagged else ", the default tag of model.arch")
