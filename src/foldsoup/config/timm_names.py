"""timm names, pretrained tags and the image settings of a timm model's weights: what the
configuration checks before any job runs (model.arch with did-you-mean, model.pretrained as a
tag of it) and fills in (data.image_size, mean, std, interpolation), and what
foldsoup.models.timm_backbone builds on.

`import timm` imports torch (seconds): every function imports it inside, and the configuration
calls them only for model.name timm. No network: timm's model names and pretrained
configurations are tables in its code.
"""

from __future__ import annotations

import difflib
import os

from foldsoup.errors import ModelError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


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


def is_checkpoint_path(pretrained: str | None) -> bool:
    """A local file (existing, or spelled like a path) rather than a pretrained tag."""
    return bool(pretrained) and (os.path.isfile(pretrained) or os.sep in pretrained
                                 or str(pretrained).endswith(CHECKPOINT_SUFFIXES))


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
