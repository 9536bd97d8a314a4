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
model.pretrained at that file, with model.quick_gelu: true).

A second trap: the `openai` weights were trained with QuickGELU, but open_clip's `ViT-B-32`
config uses nn.GELU; `create_model("ViT-B-32", pretrained="openai")` only warns about the
mismatch. The activation has no parameters, so the state dict loads silently into the wrong
network, and a checkpoint file does not say which one its weights need. Here the activation is
a config key, `model.quick_gelu`, the same for every job that builds the tower (export,
fine-tune, soups, `foldsoup evaluate/predict` from the weights' metadata): foldsoup.config.schema
fills it from the tag's pretrained config and refuses a file without it (or a contradicting
value) before any job runs; `export_pretrained_visual` checks it again against the weights.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from foldsoup.errors import ClipError
from foldsoup.models.hub import checkpoint_state, fetch_failure, tensors_only
from foldsoup.storage.files import is_checkpoint_path
from foldsoup.storage.weights import state_mismatch




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


def resolve_quick_gelu(arch: str, pretrained: str | None, quick_gelu: bool | None, cfg: dict) -> bool:
    """The activation the tower is built with: model.quick_gelu when set (a validated config
    always sets it where it matters); else as the tag was trained; else the arch's own config,
    which is how weights saved before model.quick_gelu existed were built, so their metadata
    still rebuilds the network they were trained with."""
    if quick_gelu is not None:
        return bool(quick_gelu)
    if pretrained and not is_checkpoint_path(pretrained):
        return bool(pretrained_tag_cfg(arch, pretrained).get("quick_gelu", False))
    return bool(cfg.get("quick_gelu", False))


def open_clip_visual(arch: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> tuple[nn.Module, int]:
    """(image tower of `arch` with random weights, its output dimension). No download.

    `quick_gelu` (model.quick_gelu) decides the activation; when None, `pretrained` (a tag or a
    checkpoint path, optional) does: a tag trained with QuickGELU (e.g. `openai`) gets QuickGELU,
    as in OpenAI's CLIP (resolve_quick_gelu).
    """
    cfg = check_arch(arch)
    quick_gelu = resolve_quick_gelu(arch, pretrained, quick_gelu, cfg)
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
                    "safetensors.torch.save_file(torch.jit.load(f).state_dict(), 'clip.safetensors'), with "
                    "model.quick_gelu: true.")
        raise ClipError(f"{path}: cannot load as a plain weights file with torch.load(weights_only=True) "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).{hint}") from exc


def visual_state_from_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The image-tower tensors of a checkpoint file: a full CLIP state dict (`visual.*` keys,
    possibly under "state_dict", possibly with a "module." prefix) or an image-tower-only one."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"model.pretrained: checkpoint file {str(path)!r} does not exist")
    state = checkpoint_state(_read_checkpoint(path), path)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return tensors_only(state, path)


def load_visual_state(visual: nn.Module, state: dict[str, torch.Tensor], source: str,
                      log: Callable[[str], None] | None = None) -> None:
    """Copy `state` into `visual` in place; error naming `source` and the first tensor that does
    not fit (missing, wrong shape, non-float into float, unexpected). BatchNorm step counters
    (`num_batches_tracked`, CLIP's ResNets) that `state` lacks are filled with 0, as torch's
    strict load_state_dict does; `log` is told how many."""
    from foldsoup.models.timm_backbone import counters_note, fill_step_counters

    own = visual.state_dict()
    state, counters = fill_step_counters(visual, state)
    # A missing tensor is never a BatchNorm step counter: those are filled.
    problem = state_mismatch(state, own, "the image tower of this model.arch", "is this a checkpoint of this model.arch?",
                             dtypes="kind")
    if problem:
        raise ClipError(f"{source}: {problem}")
    with torch.no_grad():
        for key, ref in own.items():
            ref.copy_(state[key])  # casts fp16/bf16 checkpoints to the module's fp32
    if counters and log is not None:
        log(counters_note(source, counters))


# ---------------------------------------------------------------- export


def export_pretrained_visual(model_cfg: dict, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """State dict of the image tower with the pretrained weights named by model_cfg["pretrained"]:
    a local checkpoint file (loaded here, never unpickling objects) or an open_clip tag (open_clip
    downloads it; see the module docstring). The weights are loaded into exactly the backbone that
    every fine-tune builds (foldsoup.models.classifier.build_backbone, with model_cfg["quick_gelu"]), so keys,
    shapes and the activation are checked against the real consumer. `log` gets one line when a
    file's missing BatchNorm step counters were filled."""
    from foldsoup.config.open_clip_names import activation_matters, file_activation_problem

    arch = model_cfg["arch"]
    pretrained = str(model_cfg.get("pretrained") or "")
    cfg = check_arch(arch)
    if not pretrained:
        raise ClipError("model.pretrained is empty: give an open_clip pretrained tag (e.g. openai) or a checkpoint file")
    if is_checkpoint_path(pretrained):
        if model_cfg.get("quick_gelu") is None and activation_matters(cfg) and not cfg.get("quick_gelu"):
            # As foldsoup.config.schema refuses it: exporting would fix an unknown activation for every job.
            raise ClipError(file_activation_problem(arch, pretrained, f"{arch}-quickgelu" in _open_clip().list_models()))
        visual, _ = open_clip_visual(arch, pretrained, model_cfg.get("quick_gelu"))
        load_visual_state(visual, visual_state_from_checkpoint(pretrained), pretrained, log)
        return {k: v.detach() for k, v in visual.state_dict().items()}
    tag_cfg = pretrained_tag_cfg(arch, pretrained)  # clear error for unknown tags, before any download
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    with torch.device("meta"):  # the activation only: no memory, no init, before any download
        probe, _ = open_clip_visual(arch, pretrained, model_cfg.get("quick_gelu"))
    if (_uses(probe, "gelu") or _uses(probe, "quick_gelu")) and quick_gelu != _uses(probe, "quick_gelu"):
        want, have = ("QuickGELU", "GELU") if quick_gelu else ("GELU", "QuickGELU")
        raise ClipError(f"model.quick_gelu: the {pretrained!r} weights of {arch!r} were trained with {want}, but "
                        f"the backbone built for fine-tuning uses {have}; set model.quick_gelu: "
                        f"{str(quick_gelu).lower()} (or null: the tag's own)")
    oc = _open_clip()
    drop = _OwnErrorsOnly(Path(oc.__file__).parent)
    logging.getLogger().addFilter(drop)
    try:
        # Downloads on first use (Hugging Face hub preferred; weights_only loading).
        model = oc.create_model(arch, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except Exception as exc:
        raise ClipError(_fetch_failure(arch, pretrained, tag_cfg, exc)) from exc
    finally:
        logging.getLogger().removeFilter(drop)
    visual, _ = open_clip_visual(arch, pretrained, model_cfg.get("quick_gelu"))
    load_visual_state(visual, model.visual.state_dict(), f"open_clip {arch} pretrained={pretrained}", log)
    del model
    return {k: v.detach() for k, v in visual.state_dict().items()}


class _OwnErrorsOnly(logging.Filter):
    """Drops open_clip's own ERROR log of a failed download: the ClipError raised from the same
    exception says it, with the way out, in one line."""

    def __init__(self, package: Path):
        super().__init__()
        self.package = str(package)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.pathname.startswith(self.package))


def _fetch_failure(arch: str, tag: str, tag_cfg: dict, exc: Exception) -> str:
    """One line for a tag's weights that open_clip could not get: without network, the ways out."""

    def where() -> tuple[str, str]:
        quick = str(bool(tag_cfg.get("quick_gelu", False))).lower()
        repo = os.path.split(tag_cfg.get("hf_hub", ""))[0]  # "org/name/" or "org/name/file", as open_clip splits it
        source = f"the Hugging Face hub ({repo})" if repo else tag_cfg.get("url", "its URL")
        return source, (f"set model.pretrained to a local checkpoint file of {arch!r} with model.quick_gelu: {quick} "
                        f"(docs/gpus-and-clusters.md, \"Offline cluster\")")

    return fetch_failure("open_clip", arch, tag, exc, where)
