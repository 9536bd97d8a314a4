"""open_clip image towers: the architecture for every job, the pretrained weights once.

Fine-tuning needs only the image tower (`model.visual`); the text tower is never built here
(the zero-shot head, if ever wanted, would need it). `import open_clip` costs ~5 s, so it is
imported inside the functions, and only by jobs that use an open_clip model.

How open_clip 3.x loads the `openai` tag (read in open_clip/factory.py and pretrained.py):
`create_model(arch, pretrained="openai")` does NOT call `openai.load_openai_model` (the old
path that `torch.jit.load`s OpenAI's TorchScript archive); it resolves the tag with
`get_pretrained_cfg`, downloads via `download_pretrained(cfg, prefer_hf_hub=True)` and loads
with `load_checkpoint(..., weights_only=True)`. With `huggingface_hub` installed (a dependency
here) the file comes from the Hugging Face hub (`timm/vit_base_patch32_clip_224.openai`,
`open_clip_model.safetensors` preferred, else `open_clip_pytorch_model.bin`, a plain state
dict): no TorchScript code is deserialised or run. Only without huggingface_hub does it fall
back to OpenAI's URL, whose `ViT-B-32.pt` is a TorchScript archive; `torch.load(...,
weights_only=True)` then refuses it with a RuntimeError instead of running it. The same holds
for our local-file route: OpenAI's original .pt files are refused (convert them once with
`torch.jit.load(f).state_dict()` in a trusted session, save with safetensors, point
model.pretrained at that file).

A second trap: the `openai` weights were trained with QuickGELU, but open_clip's `ViT-B-32`
config uses nn.GELU; `create_model("ViT-B-32", pretrained="openai")` only warns about the
mismatch. The activation has no parameters, so the state dict loads silently into the wrong
network. Here the activation follows the weights: `open_clip_visual(arch, pretrained)` uses
QuickGELU when the tag was trained with it (equivalently, use arch `ViT-B-32-quickgelu`), and
`export_pretrained_visual` refuses to export when the backbone that fine-tuning builds from the
same config would not use the activation the weights need.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ClipError(ValueError):
    """An open_clip configuration or checkpoint problem, naming the arch, tag or file."""


def _open_clip():
    import open_clip

    return open_clip


def check_arch(arch: str) -> dict:
    """open_clip's config of `arch`; error listing close names when it is unknown."""
    oc = _open_clip()
    names = oc.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=6, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"{len(names)} names in open_clip.list_models()"
        raise ClipError(f"model.arch {arch!r} is not an open_clip model ({hint})")
    return oc.get_model_config(arch)


def is_checkpoint_path(pretrained: str) -> bool:
    """A local file (existing, or spelled like a path) rather than a pretrained tag."""
    return bool(pretrained) and (os.path.isfile(pretrained) or os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))


def pretrained_tag_cfg(arch: str, tag: str) -> dict:
    """open_clip's pretrained config of (arch, tag); error listing the arch's tags if unknown.
    Needs no network: open_clip.list_pretrained() is a table in the package."""
    oc = _open_clip()
    tags = [t for a, t in oc.list_pretrained() if a == arch]
    if tag not in tags:
        if tags:
            hint = f"tags for {arch!r}: {', '.join(tags)}"
        else:
            archs = sorted({a for a, t in oc.list_pretrained() if t == tag})
            hint = f"{arch!r} has no pretrained tags" + (f"; {tag!r} exists for {', '.join(archs[:8])}" if archs else "")
        close = difflib.get_close_matches(tag, tags, n=1, cutoff=0.6)
        mean = f"; did you mean {close[0]!r}?" if close else ""
        raise ClipError(f"model.pretrained {tag!r} is neither a checkpoint file nor a pretrained tag of {arch!r} ({hint}){mean}")
    return oc.pretrained.get_pretrained_cfg(arch, tag)


def _wants_quick_gelu(arch: str, pretrained: str | None, cfg: dict) -> bool:
    """QuickGELU when the pretrained tag was trained with it, else as the arch's config says."""
    if pretrained and not is_checkpoint_path(pretrained):
        return bool(pretrained_tag_cfg(arch, pretrained).get("quick_gelu", False))
    return bool(cfg.get("quick_gelu", False))


def open_clip_visual(arch: str, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """(image tower of `arch` with random weights, its output dimension). No download.

    `pretrained` (a tag or a checkpoint path, optional) only decides the activation: a tag
    trained with QuickGELU (e.g. `openai`) gets QuickGELU, as in OpenAI's CLIP.
    """
    cfg = check_arch(arch)
    quick_gelu = _wants_quick_gelu(arch, pretrained, cfg)
    oc = _open_clip()
    build_tower = getattr(getattr(oc, "model", None), "_build_vision_tower", None)
    if build_tower is not None and "vision_cfg" in cfg and "embed_dim" in cfg:
        # The image tower alone, built by the function open_clip's CLIP classes call for
        # `self.visual`: 3x faster than create_model, which also builds the text tower.
        visual = build_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu, None)
        dim = cfg["embed_dim"]
    else:  # pragma: no cover - other open_clip versions
        model = oc.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
        visual, dim = model.visual, cfg.get("embed_dim")
        del model  # the text tower is not needed for fine-tuning
    dim = int(getattr(visual, "output_dim", None) or dim)
    return visual, dim


def _uses(module: nn.Module, kind: str) -> bool:
    from open_clip.transformer import QuickGELU

    cls = QuickGELU if kind == "quick_gelu" else nn.GELU
    return any(isinstance(m, cls) for m in module.modules())


# ---------------------------------------------------------------- checkpoint files


def _read_checkpoint(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ClipError(f"{path}: unreadable safetensors file ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (not weights-only), RuntimeError (TorchScript, truncated)
        hint = ""
        if "TorchScript" in str(exc):
            hint = (" It is a TorchScript archive (like OpenAI's original ViT-B-32.pt); foldsoup does not run "
                    "TorchScript. Use model.pretrained: openai, or convert it once in a trusted session: "
                    "safetensors.torch.save_file(torch.jit.load(f).state_dict(), 'clip.safetensors').")
        raise ClipError(f"{path}: cannot load as a plain weights file with torch.load(weights_only=True) "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).{hint}") from exc


def visual_state_from_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The image-tower tensors of a checkpoint file: a full CLIP state dict (`visual.*` keys,
    possibly under "state_dict", possibly with a "module." prefix) or an image-tower-only one."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"model.pretrained: checkpoint file {str(path)!r} does not exist")
    obj = _read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ClipError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ClipError(f"{path}: state dict key {key!r} is not a string")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ClipError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def load_visual_state(visual: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `visual` in place; error naming `source` and the first tensor that does
    not fit (missing, wrong shape, non-float into float, unexpected)."""
    own = visual.state_dict()
    missing = [k for k in own if k not in state]
    for key, ref in own.items():
        if key not in state:
            raise ClipError(f"{source}: image-tower tensor {key!r} is missing ({len(missing)} of {len(own)} missing; "
                            f"is this a checkpoint of this model.arch?)")
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise ClipError(f"{source}: tensor {key!r} has shape {list(value.shape)}, the image tower of this "
                            f"model.arch expects {list(ref.shape)}")
        if ref.is_floating_point() != value.is_floating_point():
            raise ClipError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected {ref.dtype}")
    extra = [k for k in state if k not in own]
    if extra:
        raise ClipError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} not in the image tower of this "
                        f"model.arch, e.g. {extra[:3]})")
    with torch.no_grad():
        for key, ref in own.items():
            ref.copy_(state[key])  # casts fp16/bf16 checkpoints to the module's fp32


# ---------------------------------------------------------------- export


def export_pretrained_visual(model_cfg: dict) -> dict[str, torch.Tensor]:
    """State dict of the image tower with the pretrained weights named by model_cfg["pretrained"]:
    a local checkpoint file (loaded here, never unpickling objects) or an open_clip tag (open_clip
    downloads it; see the module docstring). The weights are loaded into exactly the backbone that
    every fine-tune builds (foldsoup.models.build_backbone), so keys and shapes are checked
    against the real consumer."""
    from .models import build_backbone

    arch = model_cfg["arch"]
    pretrained = str(model_cfg.get("pretrained") or "")
    check_arch(arch)
    if not pretrained:
        raise ClipError("model.pretrained is empty: give an open_clip pretrained tag (e.g. openai) or a checkpoint file")
    if not is_checkpoint_path(pretrained):
        pretrained_tag_cfg(arch, pretrained)  # clear error for unknown tags, before any download
    visual, _ = build_backbone(model_cfg)
    if is_checkpoint_path(pretrained):
        load_visual_state(visual, visual_state_from_checkpoint(pretrained), pretrained)
    else:
        quick_gelu = bool(pretrained_tag_cfg(arch, pretrained).get("quick_gelu", False))
        if _uses(visual, "gelu") or _uses(visual, "quick_gelu"):
            if quick_gelu != _uses(visual, "quick_gelu"):
                raise ClipError(
                    f"the {pretrained!r} weights of {arch!r} were trained with {'QuickGELU' if quick_gelu else 'GELU'}, but the "
                    f"backbone built for fine-tuning uses {'GELU' if quick_gelu else 'QuickGELU'}; "
                    + (f"set model.arch: {arch}-quickgelu" if quick_gelu and f"{arch}-quickgelu" in _open_clip().list_models()
                       else "choose a matching model.arch")
                )
        oc = _open_clip()
        try:
            # Downloads on first use (Hugging Face hub preferred; weights_only loading).
            model = oc.create_model(arch, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except Exception as exc:
            raise ClipError(f"open_clip could not load pretrained {pretrained!r} for {arch!r} (needs the network or a "
                            f"filled cache on first use): {type(exc).__name__}: {exc}") from exc
        load_visual_state(visual, model.visual.state_dict(), f"open_clip {arch} pretrained={pretrained}")
        del model
    return {k: v.detach() for k, v in visual.state_dict().items()}
