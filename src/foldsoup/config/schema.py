"""Configuration: schema validation with readable errors, defaults, and the hyperparameter grid.

The schema (workflow/schemas/config.schema.yaml) is the one place every key is documented.
This module is imported by the Snakefile at parse time, so it must stay cheap: no torch (nor
what it imports: config.messages renders the errors, config.data_checks checks the data section,
config.open_clip_names and config.timm_names the model names, both importing their package lazily;
config.yaml_files merges YAML files).
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

from foldsoup.config import data_checks, models_from, open_clip_names, results_folder, timm_names
from foldsoup.config import methods as method_table
from foldsoup.config.messages import describe, invalid, resolve, type_of
from foldsoup.errors import ConfigError, DataError

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | os.PathLike | None = None) -> dict:
    """The YAML schema; soups.ship's allowed values are the methods with weights (config.methods)."""
    with open(path or SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    ship = schema.get("properties", {}).get("soups", {}).get("properties", {}).get("ship")
    if ship is not None:
        ship["enum"] = method_table.shippable()
    return schema


def fill_defaults(config: dict, schema: dict) -> dict:
    """Return a copy of `config` with every schema default filled in, recursively. A mapping given
    for a key whose default is a mapping keeps the default's other keys (`augment: {strong:
    {erase: 0.2}}` changes one knob of strong), as a partial section keeps its other defaults."""

    def fill(value: Any, node: dict) -> Any:
        node = resolve(node, schema)
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


def _coerce_integers(value: Any, node: dict, schema: dict) -> Any:
    """2.0 where an integer is expected becomes 2 (YAML and JSON tools write integral floats):
    jsonschema accepts it as an integer, but range(2.0) would fail deep inside a job."""
    node = resolve(node, schema)
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
        raise ConfigError(f"invalid configuration: expected a mapping of keys, got {type_of(config)} ({config!r})")
    filled = fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise invalid(describe(errors, schema))
    filled = _coerce_integers(filled, schema, schema)
    if filled["model"]["name"] == "timm":
        timm_names.fill_image(filled, config)
    _check_semantics(filled, check_paths, config)
    if filled["model"]["name"] == "open_clip":
        # Explicit in every job's config and in the weights' metadata: the activation the tower
        # is built with (null stays null only where open_clip's tables could not be read).
        filled["model"]["quick_gelu"] = open_clip_names.quick_gelu_of(filled["model"])[0]
    return filled


# ---------------------------------------------------------------------------- beyond the schema


def _budget_problems(cfg: dict, n_configs: int | None = None) -> list[str]:
    """budget.grid_points within the grid's T points (or the `n_configs` configs of models_from),
    budget.fold_counts within folds.k."""
    grid, k, problems = cfg["grid"], cfg["folds"]["k"], []
    n_grid = len(grid["lr"]) * len(grid["aug"]) * len(grid["mixup"])
    shape = f"{len(grid['lr'])} lr x {len(grid['aug'])} aug x {len(grid['mixup'])} mixup"
    points = f"the grid's {n_grid} points ({shape})"
    if n_configs is not None:
        n_grid, points = n_configs, f"the {n_configs} configs of models_from"
    for key, limit, what in (("grid_points", n_grid, points),
                             ("fold_counts", k, f"folds.k = {k}")):
        for i, value in enumerate(cfg["budget"][key] or []):
            if value > limit:
                problems.append(f"budget.{key}[{i}]: {value} is larger than {what}; allowed: 1 <= value <= {limit} (or null)")
    return problems


def _ship_problem(cfg: dict) -> str | None:
    """soups.ship naming a method this run does not make: refused before any job, not after
    the fine-tunes."""
    ship = cfg["soups"]["ship"]
    if ship in method_table.BY_NAME and method_table.BY_NAME[ship].holdout and cfg["folds"]["holdout_fraction"] == 0:
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
        problems += timm_names.problems(model, raw or {})
    problems += data_checks.key_problems(data)
    channels = 1 if data["name"] == "digits" else 3  # imagefolder, medmnist and csv are stored as RGB
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
    problem = data_checks.folds_k_problem(data, cfg["folds"])
    if problem:
        problems.append(problem)
    if model["name"] == "open_clip":
        problems += open_clip_names.problems(model)
    problems += models_from.problems(cfg, check_paths)
    if cfg.get("models_from") is None:
        problems += _budget_problems(cfg)
    elif check_paths:  # the budget draws from the imported configs instead of the grid
        try:
            problems += _budget_problems(cfg, len(hp_names(cfg)))
        except DataError:
            pass  # the CSV's own problem is said above, or by the data check
    problem = _ship_problem(cfg)
    if problem:
        problems.append(problem)
    if check_paths:  # on disk
        model_file = {"open_clip": open_clip_names.file_problem, "timm": timm_names.file_problem}.get(model["name"])
        for problem in (results_folder.path_problem(cfg["results"]), data_checks.root_problem(data),
                        data_checks.manifest_problem(data, cfg["folds"]), model_file and model_file(model)):
            if problem:
                problems.append(problem)
    if problems:
        raise invalid(problems)


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


def hp_names(cfg: dict) -> list[str]:
    """The models' `hp` names in grid order: the grid points', or with models_from the configs of
    its CSV in order of first appearance (config.models_from)."""
    if cfg.get("models_from"):
        return models_from.read_models_from(cfg["models_from"], cfg["folds"]["k"]).configs
    return [point.name for point in grid_points(cfg)]


def grid_point(cfg: dict, name: str) -> GridPoint:
    for point in grid_points(cfg):
        if point.name == name:
            return point
    raise ConfigError(f"grid point {name!r} is not in the configured grid")


def dumps(section: Any) -> str:
    """Canonical JSON of a config section (stable key order, so unchanged sections do not rerun jobs)."""
    return json.dumps(section, sort_keys=True, separators=(",", ":"))
