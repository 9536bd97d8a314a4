"""open_clip model names, pretrained tags and the activation each tag was trained with: what the
configuration checks before any job runs (model.arch with did-you-mean, model.pretrained as a tag
of it or a checkpoint file, model.quick_gelu) and fills in (model.quick_gelu), beside
foldsoup.config.timm_names for timm models; foldsoup.models.clip builds on it.

`import open_clip` costs ~5 s at every parse: nothing here imports it. The names, tags and model
configs are read from the installed package's files (found with importlib.util.find_spec), and
tests/test_datasets.py checks they equal open_clip's own.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from pathlib import Path

from foldsoup.storage.files import is_checkpoint_path


def _folder() -> Path | None:
    """open_clip's package folder, found without importing it (~5 s); None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def list_models() -> list[str] | None:
    """open_clip's model names from its config files, without importing it (~5 s); None if absent."""
    folder = _folder()
    if folder is None:
        return None
    names = sorted(p.stem for p in (folder / "model_configs").glob("*.json"))
    return names or None


def model_config(arch: str) -> dict | None:
    """open_clip.get_model_config(arch), read from its JSON file; None if absent or unreadable."""
    folder = _folder()
    try:
        return json.loads((folder / "model_configs" / f"{arch}.json").read_text()) if folder else None
    except (OSError, ValueError):
        return None


def activation_matters(arch_config: dict) -> bool:
    """Whether model.quick_gelu changes the image tower open_clip builds from this config: only
    its VisionTransformer takes the activation; the ModifiedResNet of the RN* models uses ReLU and
    timm towers (convnext_*, SigLIP, ...) their own (open_clip.model._build_vision_tower)."""
    vision = arch_config.get("vision_cfg", {})
    return not vision.get("timm_model_name") and not isinstance(vision.get("layers"), (list, tuple))


def pretrained_tags() -> dict[str, list[str]] | None:
    """open_clip.list_pretrained() as {arch: [tags]}; see tag_table."""
    table = tag_table()
    return None if table is None else {arch: list(tags) for arch, tags in table.items()}


@functools.lru_cache(maxsize=1)
def tag_table() -> dict[str, dict[str, bool]] | None:
    """{arch: {tag: trained with QuickGELU}} for every pair of open_clip.list_pretrained(), read
    from open_clip/pretrained.py's source (`import open_clip` costs ~5 s at every parse). The table
    there is literal: top-level `_NAME = dict(tag=_pcfg(..., quick_gelu=True), ...)` (or {...})
    assignments, the dict `_PRETRAINED = {"arch": _NAME or dict(...), ...}` and "<arch>-quickgelu"
    entries for the tags trained with QuickGELU. tests/test_datasets.py checks the result equals
    open_clip's own list and pretrained configs. None (no parse-time check; the `pretrain` job
    still checks) if the source has another shape. Cached: the installed package does not change
    while a process runs."""
    import ast

    folder = _folder()
    if folder is None:
        return None
    try:
        source = (folder / "pretrained.py").read_text()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return None

    def quick_gelu(cfg: ast.expr) -> bool:
        return isinstance(cfg, ast.Call) and any(
            k.arg == "quick_gelu" and isinstance(k.value, ast.Constant) and k.value.value is True for k in cfg.keywords)

    def tags_of(node: ast.expr, named: dict) -> dict[str, bool] | None:
        """{tag: trained with QuickGELU} of `dict(tag=cfg, ...)`, `{"tag": cfg}` or a name."""
        if isinstance(node, ast.Name):
            return named.get(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
            if any(k.arg is None for k in node.keywords):
                return None
            return {k.arg: quick_gelu(k.value) for k in node.keywords}
        if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            return {k.value: quick_gelu(v) for k, v in zip(node.keys, node.values, strict=True)}
        return None

    named: dict[str, dict[str, bool]] = {}
    table: dict[str, dict[str, bool]] | None = None
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            continue
        name = stmt.targets[0].id
        if name == "_PRETRAINED":
            if not isinstance(stmt.value, ast.Dict):
                return None
            table = {}
            for key, value in zip(stmt.value.keys, stmt.value.values, strict=True):
                tags = tags_of(value, named)
                if not (isinstance(key, ast.Constant) and isinstance(key.value, str)) or tags is None:
                    return None
                table[key.value] = tags
        else:
            tags = tags_of(stmt.value, named)
            if tags is not None:
                named[name] = tags
    if not table:
        return None
    out = dict(table)
    for arch, tags in table.items():  # open_clip adds these after the literal table
        quick = {t: q for t, q in tags.items() if q}
        if quick:
            out[f"{arch}-quickgelu"] = quick
    return out


def problems(model: dict) -> list[str]:
    """model.arch (an open_clip name, did you mean), model.pretrained (a tag of it, unless a
    checkpoint file) and model.quick_gelu of an open_clip model section; no disk checks."""
    names = list_models()
    if names is not None and model["arch"] not in names:
        close = difflib.get_close_matches(model["arch"], names, n=3, cutoff=0.6)
        mean = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return [f"model.arch: {model['arch']!r} is not an open_clip model{mean} "
                f"(allowed: one of the {len(names)} names of open_clip.list_models(), e.g. 'ViT-B-32')"]
    if model["pretrained"] is None:
        return []
    return [p for p in (_pretrained_tag_problem(model["arch"], model["pretrained"]), quick_gelu_of(model)[1]) if p]


def file_problem(model: dict) -> str | None:
    """model.pretrained spelled like a checkpoint path that is not a file (on disk)."""
    pretrained = model.get("pretrained") or ""
    if is_checkpoint_path(pretrained) and not os.path.isfile(pretrained):
        return (f"model.pretrained: checkpoint file {pretrained!r} does not exist; allowed: an open_clip "
                f"pretrained tag (e.g. 'openai') or an existing .safetensors/.pt file")
    return None


def _pretrained_tag_problem(arch: str, pretrained: str) -> str | None:
    """model.pretrained that is neither a checkpoint path nor a pretrained tag of `arch`."""
    if is_checkpoint_path(pretrained):
        return None  # a local checkpoint: its existence is checked with the other paths
    table = pretrained_tags()
    if table is None:
        return None
    tags = table.get(arch, [])
    if pretrained in tags:
        return None
    if not tags:
        elsewhere = [a for a, t in table.items() if pretrained in t]
        note = f"; the tag {pretrained!r} exists for {', '.join(elsewhere[:6])}" if elsewhere else ""
        return (f"model.pretrained: {pretrained!r}: open_clip has no pretrained weights for model.arch {arch!r}{note}; "
                f"allowed: the path of a local .safetensors/.pt checkpoint of {arch!r}")
    # A tag's start ('laion2b' for 'laion2b_s32b_b82k') first, else the closest spelling.
    close = [t for t in tags if t.startswith(pretrained)][:3] or difflib.get_close_matches(pretrained, tags, n=1, cutoff=0.6)
    mean = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"model.pretrained: {pretrained!r} is not a pretrained tag of {arch!r}{mean} (allowed: one of "
            f"{', '.join(repr(t) for t in tags)}, or the path of a local .safetensors/.pt checkpoint)")


def quick_gelu_of(model: dict) -> tuple[bool | None, str | None]:
    """(model.quick_gelu resolved, or a problem) for an open_clip model section. OpenAI's weights
    were trained with QuickGELU, but open_clip's `ViT-B-32` config says GELU, and the activation
    has no parameters: the wrong one loads silently. A tag knows its activation (null takes it,
    a contradicting value is refused); a checkpoint file does not, so null is refused unless the
    arch itself says QuickGELU (`*-quickgelu`) or its image tower has no such activation (RN*,
    timm towers). Unknown archs and tags pass unresolved: they are reported elsewhere."""
    arch, pretrained, value = model["arch"], model["pretrained"], model.get("quick_gelu")
    arch_config = model_config(arch)
    if arch_config is None or not activation_matters(arch_config):
        return value, None
    arch_quick = bool(arch_config.get("quick_gelu", False))
    if is_checkpoint_path(pretrained):
        if value is None and not arch_quick:
            return None, file_activation_problem(arch, pretrained, f"{arch}-quickgelu" in (list_models() or []))
        if value is False and arch_quick:
            return None, (f"model.quick_gelu: false contradicts model.arch {arch!r}, which is built with QuickGELU; "
                          f"allowed: true or null, or model.arch {arch.removesuffix('-quickgelu')!r} for weights "
                          f"trained with GELU")
        return arch_quick if value is None else value, None
    tag_quick = (tag_table() or {}).get(arch, {}).get(pretrained)
    if tag_quick is None:
        return value, None
    if value is not None and value != tag_quick:
        return None, (f"model.quick_gelu: {str(value).lower()} contradicts model.pretrained {pretrained!r}: open_clip's "
                      f"{pretrained!r} weights of {arch!r} were trained with {'QuickGELU' if tag_quick else 'GELU'}; "
                      f"allowed: {str(tag_quick).lower()} or null (null takes the tag's activation)")
    return tag_quick, None


def file_activation_problem(arch: str, pretrained: str, quick_arch_exists: bool) -> str:
    """model.quick_gelu left null for a checkpoint file (parse-time check and pretrain export)."""
    quick_arch = f" (or model.arch: {arch}-quickgelu)" if quick_arch_exists else ""
    return (f"model.quick_gelu: null, but model.pretrained {pretrained!r} is a checkpoint file, which does not say "
            f"which activation its weights were trained with; allowed: true for OpenAI's CLIP weights{quick_arch}, "
            f"false for weights trained with GELU (e.g. most LAION ones)")
