"""Configuration: schema validation with readable errors, defaults, and the hyperparameter grid.

The schema (workflow/schemas/config.schema.yaml) is the one place every key is documented.
This module is imported by the Snakefile at parse time, so it must stay cheap: no torch.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from foldsoup.errors import ConfigError, ModelError

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"



def load_schema(path: str | os.PathLike | None = None) -> dict:
    with open(path or SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _resolve(node: dict, schema: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        assert ref.startswith("#/$defs/"), ref
        return schema["$defs"][ref.split("/")[-1]]
    return node


def fill_defaults(config: dict, schema: dict) -> dict:
    """Return a copy of `config` with every schema default filled in, recursively. A mapping given
    for a key whose default is a mapping keeps the default's other keys (`augment: {strong:
    {erase: 0.2}}` changes one knob of strong), as a partial section keeps its other defaults."""

    def fill(value: Any, node: dict) -> Any:
        node = _resolve(node, schema)
        if not isinstance(value, dict) or "properties" not in node:
            return value
        out = dict(value)
        for key, sub in node["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            elif isinstance(out.get(key), dict) and isinstance(sub.get("default"), dict):
                out[key] = {**copy.deepcopy(sub["default"]), **out[key]}
            if key in out:
                out[key] = fill(out[key], sub)
        return out

    return fill(copy.deepcopy(config), schema)


# ---------------------------------------------------------------------------- readable errors
#
# Every message names the key (dotted path, list items as [i]), the bad value and what is
# allowed, described from the schema node itself, so a new key gets good messages for free.

_TYPE_WORDS = {"number": "a number", "integer": "an integer", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "a mapping (key: value)", "null": "null"}
_BOUND_OPS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
_NUMBER_LIKE = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


# In order: bool before int, since bool is a subclass of int.
_TYPE_NAMES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "a mapping"))


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), f"a {type(value).__name__}")


def _allowed(node: dict, schema: dict) -> str:
    """What a schema node accepts, in words: 'a number > 0', "one of 'a', 'b'", ..."""
    node = _resolve(node, schema)
    if "enum" in node:
        return "one of " + ", ".join(repr(v) for v in node["enum"])
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    main = [t for t in types if t != "null"]
    text = " or ".join(_TYPE_WORDS.get(t, t) for t in main) or "a value"
    bounds = [f"{op} {node[key]}" for key, op in _BOUND_OPS if key in node]
    if bounds:
        text += " " + " and ".join(bounds)
    if "array" in main:
        parts = []
        if "items" in node:
            parts.append(_items_allowed(node["items"], schema))
        lo, hi = node.get("minItems"), node.get("maxItems")
        if lo is not None and lo == hi:
            parts.append(f"exactly {lo} item(s)")
        else:
            if lo:
                parts.append(f"at least {lo} item(s)")
            if hi is not None:
                parts.append(f"at most {hi} item(s)")
        if node.get("uniqueItems"):
            parts.append("no duplicates")
        head = parts.pop(0) if "items" in node else ""
        text += (" " + head if head else "") + (" (" + ", ".join(parts) + ")" if parts else "")
    if "object" in main and node.get("properties"):
        text += " with keys " + ", ".join(node["properties"])
    if node.get("minLength"):
        text += " (non-empty)"
    if "null" in types:
        text += " or null"
    return text


def _items_allowed(node: dict, schema: dict) -> str:
    """'of numbers > 0', "of values from 'a', 'b'", 'of true/false values'."""
    node = _resolve(node, schema)
    if "enum" in node:
        return "of values from " + ", ".join(repr(v) for v in node["enum"])
    if node.get("type") == "boolean":
        return "of true/false values"
    plural = {"number": "numbers", "integer": "integers", "string": "strings", "object": "mappings", "array": "lists"}
    text = "of " + plural.get(node.get("type"), "values")
    bounds = [f"{op} {node[key]}" for key, op in _BOUND_OPS if key in node]
    return text + (" " + " and ".join(bounds) if bounds else "")


def _string_hint(value: Any, node: dict, schema: dict) -> str:
    """Why a number may have arrived as a string, and how to fix it."""
    node = _resolve(node, schema)
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if not (isinstance(value, str) and {"number", "integer"} & set(types) and _NUMBER_LIKE.match(value)):
        return ""
    if re.match(r"^\s*[-+]?\d+[eE]", value):  # YAML 1.1 needs a dot in the mantissa: 1e-3 is a string
        fixed = re.sub(r"^(\s*[-+]?\d+)([eE])", r"\1.0\2", value).strip()
        return f" (YAML reads {value.strip()} as text: write {fixed} or {float(value):g})"
    return (" (write the number without quotes; Snakemake's --config passes values inside {...} or [...] as "
            "strings, so give nested values in a YAML file with --configfile)")


def _all_keys(schema: dict) -> dict[str, list[str]]:
    """Leaf name -> dotted paths of every key the schema knows (for 'did you mean')."""
    found: dict[str, list[str]] = {}

    def walk(node: dict, prefix: str) -> None:
        node = _resolve(node, schema)
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}.{key}" if prefix else key
            found.setdefault(key, []).append(path)
            walk(sub, path)

    walk(schema, "")
    return found


def _suggest(key: str, where: str, allowed: list[str], schema: dict) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    elsewhere = [p for p in _all_keys(schema).get(str(key), []) if p.rpartition(".")[0] != where]
    if elsewhere:
        return f"; it belongs under {' or '.join(p.rpartition('.')[0] or 'the top level' for p in elsewhere)} ({', '.join(elsewhere)})"
    return ""


def _duplicates(items: list) -> list:
    seen, dups = [], []
    for item in items:
        # JSON equality: 1 == 1.0, but true is not 1.
        key = (isinstance(item, bool), item)
        if key in seen and item not in dups:
            dups.append(item)
        seen.append(key)
    return dups


def _describe_error(err, schema: dict) -> list[str]:
    path = _key_path(err.absolute_path)
    value, node, kind = err.instance, err.schema, err.validator
    if kind == "additionalProperties":
        allowed = list(node.get("properties", {}))
        where = ".".join(str(p) for p in err.absolute_path)
        extra = [k for k in value if k not in allowed]
        return [f"{where + '.' if where else ''}{key}: unknown key{_suggest(key, where, allowed, schema)} "
                f"(allowed {'under ' + where if where else 'at the top level'}: {', '.join(allowed)})" for key in extra]
    if kind == "required":
        missing = [k for k in err.validator_value if k not in value]
        where = ".".join(str(p) for p in err.absolute_path)
        return [f"{where + '.' if where else ''}{key}: missing; it is required "
                f"(allowed: {_allowed(node['properties'][key], schema)})" for key in missing]
    if kind == "type":
        return [f"{path}: {value!r} is {_type_of(value)}{_string_hint(value, node, schema)}; allowed: {_allowed(node, schema)}"]
    if kind == "enum":
        close = difflib.get_close_matches(str(value), [str(v) for v in node["enum"]], n=1, cutoff=0.6)
        mean = f"; did you mean {close[0]!r}?" if close else ""
        return [f"{path}: {value!r} is not allowed{mean} (allowed: {_allowed(node, schema)})"]
    if kind in dict(_BOUND_OPS):
        return [f"{path}: {value!r} is out of range; allowed: {_allowed(node, schema)}"]
    if kind == "minItems":
        what = "is empty" if not value else f"has {len(value)} item(s)"
        return [f"{path}: {value!r} {what}; allowed: {_allowed(node, schema)}"]
    if kind == "minLength":
        return [f"{path}: {value!r} is empty; allowed: a non-empty string"]
    if kind == "maxItems":
        return [f"{path}: {value!r} has {len(value)} item(s); allowed: {_allowed(node, schema)}"]
    if kind == "uniqueItems":
        dups = ", ".join(repr(d) for d in _duplicates(value))
        why = " (a repeated grid value would train the same models twice)" if path.startswith("grid.") else ""
        return [f"{path}: {dups} appears more than once in {value!r}; every value may appear only once{why}"]
    return [f"{path}: {err.message}"]


def _coerce_integers(value: Any, node: dict, schema: dict) -> Any:
    """2.0 where an integer is expected becomes 2 (YAML and JSON tools write integral floats):
    jsonschema accepts it as an integer, but range(2.0) would fail deep inside a job."""
    node = _resolve(node, schema)
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, float) and "integer" in types and "number" not in types and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        props = node.get("properties", {})
        return {k: (_coerce_integers(v, props[k], schema) if k in props else v) for k, v in value.items()}
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_coerce_integers(v, node["items"], schema) for v in value]
    return value


def validate(config: dict, schema: dict | None = None, check_paths: bool = True) -> dict:
    """Validate a merged configuration; return it with defaults filled. Raises ConfigError.

    Schema first (types, ranges, allowed names, unknown keys), then what a schema cannot say
    (cross-key rules, grid point names, k against the smallest class, folders on disk). Every
    problem found is listed, one line each, naming the key, the bad value and what is allowed.
    """
    import jsonschema

    schema = schema or load_schema()
    if not isinstance(config, dict):
        raise ConfigError(f"invalid configuration: expected a mapping of keys, got {_type_of(config)} ({config!r})")
    filled = fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        # A value outside an enum also fails the enum's `type`: the enum message says it all.
        enum_paths = {tuple(e.absolute_path) for e in errors if e.validator == "enum"}
        errors = [e for e in errors if not (e.validator == "type" and tuple(e.absolute_path) in enum_paths)]
        # jsonschema reports each missing required key separately, with the same list: dedupe.
        lines = list(dict.fromkeys(line for e in errors for line in _describe_error(e, schema)))
        raise ConfigError(f"invalid configuration ({len(lines)} problem(s)):\n" + "\n".join(f"  - {x}" for x in lines))
    filled = _coerce_integers(filled, schema, schema)
    if filled["model"]["name"] == "timm":
        _fill_timm_image(filled, config)
    _check_semantics(filled, check_paths, config)
    if filled["model"]["name"] == "open_clip":
        # Explicit in every job's config and in the weights' metadata: the activation the tower
        # is built with (null stays null only where open_clip's tables could not be read).
        filled["model"]["quick_gelu"] = quick_gelu_of(filled["model"])[0]
    return filled


# ---------------------------------------------------------------------------- beyond the schema

# Images per class in scikit-learn's digits (1,797 images; fixed since 1998, checked by
# tests/test_config.py against load_digits). Lets folds.k be checked at parse time without
# paying ~2.5 s for importing and loading scikit-learn.
DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
CIFAR10_CLASSES = 10


def smallest_class_bound(data: dict) -> tuple[int, str] | None:
    """An upper bound on the pool images of the smallest class, and what it comes from, or
    None when it is not known before the data is read (the `folds` job checks exactly)."""
    bounds: list[tuple[int, str]] = []
    if data["name"] == "digits":
        tf = data["test_fraction"]
        # A stratified split keeps floor(n * (1 - test_fraction)) or one more image of a class.
        per_class = [(math.floor(DIGITS_CLASS_COUNTS[c] * (1 - tf)) + 1, c) for c in data["classes"]]
        n, c = min(per_class)
        bounds.append((n, f"digits class {c} keeps at most {n} pool image(s) with data.test_fraction = {tf}"))
        num_classes = len(data["classes"])
        classes_text = f"the smallest of {num_classes} classes"
    elif data["name"] == "cifar10":
        num_classes = CIFAR10_CLASSES
        classes_text = f"the smallest of {num_classes} classes"
    elif data.get("class_names"):
        num_classes = len(data["class_names"])
        classes_text = f"the smallest of {num_classes} classes (data.class_names)"
    else:  # imagefolder, medmnist: the classes are known once the data is read; there are at least 2
        num_classes = 2
        classes_text = "the smallest class (of at least 2)"
    if data.get("max_pool") is not None:
        n = data["max_pool"] // num_classes  # the smallest class holds at most the average share
        bounds.append((n, f"data.max_pool = {data['max_pool']} leaves at most {n} pool image(s) in {classes_text}"))
    return min(bounds) if bounds else None


def _results_problem(results: str) -> str | None:
    if not results.strip():
        return "results: '' is empty; allowed: a folder path"
    path = Path(results)
    if path.exists():
        return None if path.is_dir() else f"results: {results!r} exists and is not a folder; allowed: a folder (existing or new)"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"results: {results!r} cannot be created, because {str(parent)!r} is a file; allowed: a folder path"
            return None
    return None


def _open_clip_folder() -> Path | None:
    """open_clip's package folder, found without importing it (~5 s); None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _open_clip_archs() -> list[str] | None:
    """open_clip's model names from its config files, without importing it (~5 s); None if absent."""
    folder = _open_clip_folder()
    if folder is None:
        return None
    names = sorted(p.stem for p in (folder / "model_configs").glob("*.json"))
    return names or None


def _open_clip_arch_config(arch: str) -> dict | None:
    """open_clip.get_model_config(arch), read from its JSON file; None if absent or unreadable."""
    folder = _open_clip_folder()
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


def _open_clip_tags() -> dict[str, list[str]] | None:
    """open_clip.list_pretrained() as {arch: [tags]}; see _open_clip_tag_table."""
    table = _open_clip_tag_table()
    return None if table is None else {arch: list(tags) for arch, tags in table.items()}


@functools.lru_cache(maxsize=1)
def _open_clip_tag_table() -> dict[str, dict[str, bool]] | None:
    """{arch: {tag: trained with QuickGELU}} for every pair of open_clip.list_pretrained(), read
    from open_clip/pretrained.py's source (`import open_clip` costs ~5 s at every parse). The table
    there is literal: top-level `_NAME = dict(tag=_pcfg(..., quick_gelu=True), ...)` (or {...})
    assignments, the dict `_PRETRAINED = {"arch": _NAME or dict(...), ...}` and "<arch>-quickgelu"
    entries for the tags trained with QuickGELU. tests/test_datasets.py checks the result equals
    open_clip's own list and pretrained configs. None (no parse-time check; the `pretrain` job
    still checks) if the source has another shape. Cached: the installed package does not change
    while a process runs."""
    import ast

    folder = _open_clip_folder()
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

    def tag_table(node: ast.expr, named: dict) -> dict[str, bool] | None:
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
                tags = tag_table(value, named)
                if not (isinstance(key, ast.Constant) and isinstance(key.value, str)) or tags is None:
                    return None
                table[key.value] = tags
        else:
            tags = tag_table(stmt.value, named)
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


def _budget_problems(cfg: dict) -> list[str]:
    """budget.grid_points within the grid's T points, budget.fold_counts within folds.k."""
    grid, k, problems = cfg["grid"], cfg["folds"]["k"], []
    n_grid = len(grid["lr"]) * len(grid["aug"]) * len(grid["mixup"])
    shape = f"{len(grid['lr'])} lr x {len(grid['aug'])} aug x {len(grid['mixup'])} mixup"
    for key, limit, what in (("grid_points", n_grid, f"the grid's {n_grid} points ({shape})"),
                             ("fold_counts", k, f"folds.k = {k}")):
        for i, value in enumerate(cfg["budget"][key] or []):
            if value > limit:
                problems.append(f"budget.{key}[{i}]: {value} is larger than {what}; allowed: 1 <= value <= {limit} (or null)")
    return problems


# The methods the workflow makes only with an outer holdout (workflow/rules/common.smk, HOLDOUT).
HOLDOUT_METHODS = ("greedy_soup_holdout", "best_on_holdout")


def _ship_problem(cfg: dict) -> str | None:
    """soups.ship naming a method this run does not make: refused before any job, not after
    the fine-tunes."""
    ship = cfg["soups"]["ship"]
    if ship in HOLDOUT_METHODS and cfg["folds"]["holdout_fraction"] == 0:
        return (f"soups.ship: {ship!r} is selected on the outer holdout, and folds.holdout_fraction is 0 (no holdout); "
                f"allowed: a method without it (e.g. 'gsgs'), or folds.holdout_fraction > 0")
    return None


def _check_semantics(cfg: dict, check_paths: bool, raw: dict | None = None) -> None:
    """`raw`: the configuration as given, before defaults (what a timm model must set itself)."""
    problems = []
    data, model = cfg["data"], cfg["model"]
    if len(data["mean"]) != len(data["std"]):
        problems.append(f"data.mean and data.std need the same length, got {len(data['mean'])} and {len(data['std'])}")
    if data["name"] == "digits":
        overlap = sorted(set(data["classes"]) & set(data["pretrain_classes"]))
        if overlap:
            problems.append(f"data.classes and data.pretrain_classes overlap in {overlap}; pretraining must not see the pool's classes")
        if model["name"] != "digits_cnn":
            problems.append(f"model.name: {model['name']!r} does not fit data.name 'digits' (8x8 grey images); allowed: 'digits_cnn'")
    if data["name"] != "digits" and model["name"] == "digits_cnn":
        problems.append(f"model.name: 'digits_cnn' is pretrained on digits classes; with data.name {data['name']!r} "
                        f"allowed: 'open_clip' or 'timm'")
    if model["name"] == "open_clip" and model["pretrained"] is None:
        problems.append("model.pretrained: null (random weights) is for model.name 'timm'; with 'open_clip' allowed: a "
                        "pretrained tag of model.arch (e.g. 'openai') or the path of a local .safetensors/.pt checkpoint")
    if model["name"] == "timm":
        problems += _timm_problems(model, _timm_missing(raw or {}))
    problems += _own_data_problems(data)
    channels = 1 if data["name"] == "digits" else 3  # imagefolder and medmnist are stored as RGB
    for key in ("mean", "std"):
        if len(data[key]) not in (1, channels):
            allowed = "1 value" if channels == 1 else f"1 value (for every channel) or {channels}"
            problems.append(f"data.{key}: {data[key]} has {len(data[key])} values; {data['name']} images have {channels} "
                            f"channel(s), allowed: {allowed}")
    for name, aug in cfg["augment"].items():
        lo, hi = aug["scale"]
        if lo > hi:
            problems.append(f"augment.{name}.scale: lower bound {lo} is above upper bound {hi}")
    lr_names: dict[str, set[float]] = {}
    for lr in cfg["grid"]["lr"]:
        lr_names.setdefault(GridPoint(float(lr), "", False).name.split("_")[0], set()).add(float(lr))
    for name, lrs in lr_names.items():
        if len(lrs) > 1:
            problems.append(f"grid.lr: {sorted(lrs)} are different values but name the same grid points ({name}_...: "
                            f"names keep 6 significant digits); allowed: learning rates that differ within 6 significant digits")
    k = cfg["folds"]["k"]
    bound = smallest_class_bound(data)
    holdout = cfg["folds"]["holdout_fraction"]
    if bound is not None and holdout > 0:
        # The stratified holdout takes about this share of every class, and at least one image.
        kept = bound[0] - max(1, math.floor(bound[0] * holdout))
        bound = (kept, f"{bound[1]}, {kept} after folds.holdout_fraction = {holdout}")
    if bound is not None and k > bound[0]:
        problems.append(f"folds.k: {k} is larger than the smallest class of the training pool: {bound[1]}; every fold "
                        f"needs at least one image of every class, allowed: 2 <= k <= {bound[0]}" if bound[0] >= 2 else
                        f"folds.k: {k} is larger than the smallest class of the training pool: {bound[1]}; "
                        f"every fold needs at least one image of every class (raise data.max_pool or lower data.test_fraction)")
    if model["name"] == "open_clip":
        archs = _open_clip_archs()
        if archs is not None and model["arch"] not in archs:
            close = difflib.get_close_matches(model["arch"], archs, n=3, cutoff=0.6)
            mean = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"model.arch: {model['arch']!r} is not an open_clip model{mean} "
                            f"(allowed: one of the {len(archs)} names of open_clip.list_models(), e.g. 'ViT-B-32')")
        elif model["pretrained"] is not None:
            for problem in (_pretrained_tag_problem(model["arch"], model["pretrained"]), quick_gelu_of(model)[1]):
                if problem:
                    problems.append(problem)
    problems += _budget_problems(cfg)
    problem = _ship_problem(cfg)
    if problem:
        problems.append(problem)
    if check_paths:
        problem = _results_problem(cfg["results"])
        if problem:
            problems.append(problem)
        root = Path(data["root"])
        if data["name"] == "cifar10" and root.exists() and not root.is_dir():
            problems.append(f"data.root: {str(root)!r} is a file; allowed: a folder holding (or receiving, with "
                            f"data.download: true) cifar-10-batches-py/")
        elif data["name"] == "cifar10" and not data["download"]:
            if not root.is_dir():
                problems.append(f"data.root: folder {str(root)!r} does not exist; allowed: a folder holding "
                                f"cifar-10-batches-py/ (or set data.download: true to fetch CIFAR-10 there)")
            elif not (root / "cifar-10-batches-py").is_dir() and (root / "cifar-10-python.tar.gz").is_file():
                problems.append(f"data.root: folder {str(root)!r} holds cifar-10-python.tar.gz but no cifar-10-batches-py/; "
                                f"allowed: data.download: true (torchvision checks the archive's md5 and extracts it, no "
                                f"network needed), or extract it there yourself (tar xzf)")
            elif not (root / "cifar-10-batches-py").is_dir():
                problems.append(f"data.root: folder {str(root)!r} has no cifar-10-batches-py/ inside; allowed: a folder "
                                f"holding torchvision's CIFAR-10 files (or set data.download: true to fetch them there)")
        elif data["name"] == "imagefolder" and not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            problems.append(f"data.root: {str(root)!r} {what}; with data.name 'imagefolder' allowed: a folder with one "
                            f"sub-folder of images per class, or with train/ and test/ (optionally val/) holding them")
        elif data["name"] == "medmnist" and root.suffix.lower() == ".npz" and not root.is_file():
            what = "is a folder" if root.exists() else "does not exist"
            problems.append(f"data.root: {str(root)!r} {what}; with data.name 'medmnist' allowed: an existing MedMNIST "
                            f".npz file ({MEDMNIST_SOURCE})")
        pretrained = model.get("pretrained") or ""
        if model["name"] == "open_clip" and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            problems.append(f"model.pretrained: checkpoint file {pretrained!r} does not exist; allowed: an open_clip "
                            f"pretrained tag (e.g. 'openai') or an existing .safetensors/.pt file")
        if model["name"] == "timm" and (_looks_like_path(pretrained) or os.path.exists(pretrained)) \
                and not Path(pretrained).is_file():
            what = "is a folder" if Path(pretrained).exists() else "does not exist"
            problems.append(f"model.pretrained: weights file {pretrained!r} {what}; allowed: an existing .safetensors or "
                            f"torch file in timm's key layout, a timm pretrained tag of {model['arch']!r}, or null")
    if problems:
        raise ConfigError(f"invalid configuration ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems))


MEDMNIST_SOURCE = "download e.g. pneumoniamnist.npz or pneumoniamnist_224.npz from https://medmnist.com"


def _own_data_problems(data: dict) -> list[str]:
    """Keys of imagefolder and medmnist that need no disk access."""
    problems, name = [], data["name"]
    if name in ("imagefolder", "medmnist") and data["download"]:
        where = "the .npz file" if name == "medmnist" else "the class folders"
        problems.append(f"data.download: true only fetches CIFAR-10; for data.name {name!r} put {where} at data.root "
                        f"yourself, allowed: false")
    if data.get("class_names") is not None and name != "medmnist":
        whose = "its folder names" if name == "imagefolder" else "the dataset"
        problems.append(f"data.class_names: only for data.name 'medmnist' ({name} takes its class names from {whose}); "
                        f"allowed: null")
    if name == "medmnist" and Path(data["root"]).suffix.lower() != ".npz":
        problems.append(f"data.root: {data['root']!r} is not an .npz file; with data.name 'medmnist' allowed: the path of "
                        f"a MedMNIST .npz file, e.g. data/medmnist/pneumoniamnist_224.npz ({MEDMNIST_SOURCE})")
    return problems


# The image settings a timm model's pretrained configuration gives unless the config sets them.
TIMM_IMAGE_KEYS = ("image_size", "mean", "std", "interpolation")


def _timm_missing(raw: dict) -> list[str]:
    """model.arch and model.pretrained when the configuration files do not set them: their
    schema defaults are open_clip's (ViT-B-32, openai), no timm model's."""
    raw_model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    return [key for key in ("arch", "pretrained") if key not in raw_model]


def _timm_problems(model: dict, missing: list[str]) -> list[str]:
    """model.arch (did you mean) and model.pretrained (a tag of it) of a timm model; imports
    timm, so only for model.name timm."""
    if missing:
        allowed = {"arch": "any name of timm.list_models(), e.g. 'resnet18', 'mobilenetv3_small_100'",
                   "pretrained": "a weights file in timm's key layout, a timm pretrained tag of model.arch, or null "
                                 "(random weights, for tests)"}
        return [f"model.{key}: missing; with model.name 'timm' it is required (allowed: {allowed[key]})" for key in missing]
    from foldsoup.config.timm_names import check_arch, check_tag, is_checkpoint_path

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


def _fill_timm_image(filled: dict, raw: dict) -> None:
    """data.image_size, mean, std and interpolation from the timm weights' pretrained
    configuration, where the configuration files do not set them (schema defaults do not count),
    and data.image_settings: each of the four with where it comes from (the pretrain log says it;
    a runtime key, so it reruns nothing). Missing or unknown archs and tags are left for
    _check_semantics to report."""
    from foldsoup.config.timm_names import pretrained_cfg

    if _timm_missing(raw) or filled["data"]["name"] == "digits":  # digits + timm is refused as it is
        return
    raw_data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    try:
        image = pretrained_cfg(filled["model"]["arch"], filled["model"]["pretrained"])
    except ModelError:
        return
    origin = _timm_image_origin(filled["model"]["arch"], filled["model"]["pretrained"])
    settings = {}
    for key in TIMM_IMAGE_KEYS:
        if key not in raw_data:
            filled["data"][key] = image[key]
        settings[key] = {"value": copy.deepcopy(filled["data"][key]),
                         "source": "the configuration files" if key in raw_data else origin}
    filled["data"]["image_settings"] = settings


def _timm_image_origin(arch: str, pretrained: str | None) -> str:
    """Where timm's image settings of (arch, pretrained) come from, in words: the pretrained
    configuration of the tag, or of the arch's default tag (a weights file, or null)."""
    from timm.models import get_pretrained_cfg

    from foldsoup.config.timm_names import is_checkpoint_path

    tagged = bool(pretrained) and not is_checkpoint_path(pretrained)
    cfg = get_pretrained_cfg(f"{arch}.{pretrained}" if tagged else arch, allow_unregistered=True)
    if cfg is None:
        return f"timm's default data config: model.arch {arch} has no pretrained config"
    name = f"{arch}.{pretrained if tagged else getattr(cfg, 'tag', None) or ''}".rstrip(".")
    return f"timm's pretrained config of {name}" + ("" if tagged else ", the default tag of model.arch")


def _pretrained_tag_problem(arch: str, pretrained: str) -> str | None:
    """model.pretrained that is neither a checkpoint path nor a pretrained tag of `arch`."""
    if _looks_like_path(pretrained) or os.path.isfile(pretrained):
        return None  # a local checkpoint: its existence is checked with the other paths
    table = _open_clip_tags()
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
    arch_config = _open_clip_arch_config(arch)
    if arch_config is None or not activation_matters(arch_config):
        return value, None
    arch_quick = bool(arch_config.get("quick_gelu", False))
    if _looks_like_path(pretrained) or os.path.isfile(pretrained):
        if value is None and not arch_quick:
            return None, file_activation_problem(arch, pretrained, f"{arch}-quickgelu" in (_open_clip_archs() or []))
        if value is False and arch_quick:
            return None, (f"model.quick_gelu: false contradicts model.arch {arch!r}, which is built with QuickGELU; "
                          f"allowed: true or null, or model.arch {arch.removesuffix('-quickgelu')!r} for weights "
                          f"trained with GELU")
        return arch_quick if value is None else value, None
    tag_quick = (_open_clip_tag_table() or {}).get(arch, {}).get(pretrained)
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


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


@dataclass(frozen=True)
class GridPoint:
    """One hyperparameter combination; `name` is its stable id in file paths and tables."""

    lr: float
    aug: str
    mixup: bool

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}_{self.aug}_{'mixup' if self.mixup else 'nomix'}"

    def as_dict(self) -> dict:
        return {"hp": self.name, "lr": self.lr, "aug": self.aug, "mixup": self.mixup}


def grid_points(cfg: dict) -> list[GridPoint]:
    grid = cfg["grid"]
    return [GridPoint(float(lr), aug, bool(m)) for lr, aug, m in itertools.product(grid["lr"], grid["aug"], grid["mixup"])]


def grid_point(cfg: dict, name: str) -> GridPoint:
    for point in grid_points(cfg):
        if point.name == name:
            return point
    raise ConfigError(f"grid point {name!r} is not in the configured grid")


def dumps(section: Any) -> str:
    """Canonical JSON of a config section (stable key order, so unchanged sections do not rerun jobs)."""
    return json.dumps(section, sort_keys=True, separators=(",", ":"))


def load_yaml_files(*paths: str | os.PathLike) -> dict:
    """Merge YAML files in order, later files overriding earlier ones key by key (as snakemake does)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            merged = deep_update(merged, yaml.safe_load(f) or {})
    return merged


def deep_update(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
