"""Configuration: schema validation with readable errors, defaults, and the hyperparameter grid.

The schema (workflow/schemas/config.schema.yaml) is the one place every key is documented.
This module is imported by the Snakefile at parse time, so it must stay cheap: no torch.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and what is allowed."""


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
    """Return a copy of `config` with every schema default filled in, recursively."""

    def fill(value: Any, node: dict) -> Any:
        node = _resolve(node, schema)
        if not isinstance(value, dict) or "properties" not in node:
            return value
        out = dict(value)
        for key, sub in node["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = fill(out[key], sub)
        return out

    return fill(copy.deepcopy(config), schema)


def _describe_error(err) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        return f"unknown key(s) {', '.join(repr(e) for e in extra)} under {path}; allowed: {', '.join(allowed)}"
    if err.validator == "enum":
        return f"{path}: {err.instance!r} is not allowed; choose one of {err.validator_value}"
    if err.validator == "type":
        return f"{path}: {err.instance!r} has the wrong type; expected {err.validator_value}"
    if err.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[err.validator]
        return f"{path}: {err.instance!r} is out of range; must be {op} {err.validator_value}"
    if err.validator == "minItems":
        return f"{path}: needs at least {err.validator_value} item(s), got {len(err.instance)}"
    if err.validator == "maxItems":
        return f"{path}: allows at most {err.validator_value} item(s), got {len(err.instance)}"
    if err.validator == "uniqueItems":
        return f"{path}: items must be unique, got {err.instance!r}"
    if err.validator == "required":
        return f"{path}: {err.message}"
    return f"{path}: {err.message}"


def validate(config: dict, schema: dict | None = None, check_paths: bool = True) -> dict:
    """Validate a merged configuration; return it with defaults filled. Raises ConfigError."""
    import jsonschema

    schema = schema or load_schema()
    filled = fill_defaults(config or {}, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n".join(f"  - {_describe_error(e)}" for e in errors)
        raise ConfigError(f"invalid configuration ({len(errors)} problem(s)):\n{lines}")
    _check_semantics(filled, check_paths)
    return filled


def _check_semantics(cfg: dict, check_paths: bool) -> None:
    problems = []
    data, model = cfg["data"], cfg["model"]
    if len(data["mean"]) != len(data["std"]):
        problems.append(f"data.mean and data.std need the same length, got {len(data['mean'])} and {len(data['std'])}")
    if data["name"] == "digits":
        overlap = sorted(set(data["classes"]) & set(data["pretrain_classes"]))
        if overlap:
            problems.append(f"data.classes and data.pretrain_classes overlap in {overlap}; pretraining must not see the pool's classes")
        if model["name"] != "digits_cnn":
            problems.append(f"data.name 'digits' (8x8 grey images) needs model.name 'digits_cnn', got {model['name']!r}")
    if data["name"] == "cifar10" and model["name"] == "digits_cnn":
        problems.append("model.name 'digits_cnn' is pretrained on digits classes; use it with data.name 'digits'")
    channels = {"digits": 1, "cifar10": 3}[data["name"]]
    if len(data["mean"]) not in (1, channels):
        problems.append(f"data.mean has {len(data['mean'])} values; {data['name']} images have {channels} channel(s)")
    for name, aug in cfg["augment"].items():
        lo, hi = aug["scale"]
        if lo > hi:
            problems.append(f"augment.{name}.scale: lower bound {lo} is above upper bound {hi}")
    if check_paths:
        results = Path(cfg["results"])
        if results.exists() and not results.is_dir():
            problems.append(f"results: {str(results)!r} exists and is not a folder")
        if data["name"] == "cifar10" and not data["download"]:
            root = Path(data["root"])
            if not root.is_dir():
                problems.append(f"data.root: folder {str(root)!r} does not exist (set data.download: true to fetch CIFAR-10)")
        pretrained = model.get("pretrained", "")
        if model["name"] == "open_clip" and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            problems.append(f"model.pretrained: checkpoint file {pretrained!r} does not exist")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".safetensors", ".pt", ".pth", ".bin"))


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
