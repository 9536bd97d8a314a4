"""What each workflow job is given of the configuration: exactly the keys its result depends on.

Snakemake reruns a job when its params change. A param holding a whole config section would
rerun every fine-tune after adding one learning rate, or every linear probe after editing an
augmentation: GPU-hours on the paper preset. So each rule's params are `job_config(config,
step, ...)`: the keys that change that job's output, no more. Settings that change how a job
runs but never what it writes (`RUNTIME_KEYS`) reach it separately (`runtime_config`) and are
no rerun trigger. The command line merges both back into one configuration tree, so the step
functions read `cfg["finetune"]["eval_batch_size"]` wherever the key lives in the schema.

No torch here: the Snakefile imports this at parse time.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

from foldsoup.config.schema import grid_point
from foldsoup.config.yaml_files import deep_update

# Never change a job's result: where it runs, whether a missing CIFAR-10 may be downloaded,
# how many images per forward pass when evaluating, whether the training forward is compiled,
# whether a NaN loss stops the job or marks the model diverged (it only decides what happens to
# a job that fails), how often resume state is saved (a resumed run ends with the same
# weights), and where each image setting comes from (data.image_settings: the pretrain log's;
# the settings themselves are data.image_size etc.).
RUNTIME_KEYS = ("device", "data.download", "finetune.eval_batch_size", "finetune.compile", "finetune.on_divergence",
                "finetune.resume_every_s", "data.image_settings")

# Runtime keys kept out of a job config that takes their whole section (summary's `data`).
_NOT_IN_SECTIONS = ("data.image_settings",)

# What the images look like to the model (train.ImageSpec) and how `predict` reads new ones
# (the weights' metadata): every torch job.
DATA_SPEC = ("data.name", "data.image_size", "data.mean", "data.std", "data.hflip", "data.resize")

# The data keys `prepare` reads, per dataset (data.py's loaders).
PREPARE_KEYS = {
    "digits": ("data.classes", "data.pretrain_classes", "data.test_fraction"),
    "cifar10": ("data.root",),
    "imagefolder": ("data.root", "data.image_size", "data.resize", "data.test_fraction"),
    "medmnist": ("data.root", "data.class_names"),
    # The manifest file is the rule's input (its content reruns it); its images are read where it points.
    "csv": ("data.manifest", "data.columns", "data.image_size", "data.resize", "data.test_fraction", "data.class_names"),
}

# The model keys of each model.name (the schema fills every key, also those of the other
# model): a digits_cnn job is not given open_clip's arch, nor its weights' metadata.
MODEL_KEYS = {
    "digits_cnn": ("model.name", "model.width", "model.norm", "model.normalize_features"),
    "open_clip": ("model.name", "model.arch", "model.pretrained", "model.quick_gelu", "model.normalize_features"),
    "timm": ("model.name", "model.arch", "model.pretrained", "model.normalize_features"),
}

# The fine-tune recipe: everything of `finetune` except the runtime keys and mixup_alpha, which
# only matters to grid points with mixup on.
FINETUNE_RECIPE = tuple(f"finetune.{k}" for k in ("epochs", "batch_size", "weight_decay", "warmup_steps", "grad_clip",
                                                     "label_smoothing", "precision", "save_dtype", "batchnorm"))

# Soup jobs build the model, evaluate in the fine-tunes' precision and write the metadata.
SOUP_MODEL = ("seed", *DATA_SPEC, "model", "finetune.precision")

# How soups are made: every key of `soups` but ship, which chooses among the finished ones.
SOUP_SETTINGS = ("soups.greedy_accept", "soups.cross_fold_val", "soups.early_exit")

STEP_KEYS: dict[str, tuple[str, ...]] = {
    "folds": ("seed", "folds.k", "folds.holdout_fraction"),
    "lp": ("seed", *DATA_SPEC, "model", "lp", "finetune.precision"),
    "uniform_subsets": (*SOUP_MODEL, "analysis.max_subsets_per_n"),
    "greedy_fold": (*SOUP_MODEL, *SOUP_SETTINGS),
    "soup_all": (*SOUP_MODEL, *SOUP_SETTINGS),
    "gsgs": (*SOUP_MODEL, *SOUP_SETTINGS),
    "methods": ("seed", "soups.cross_fold_val", "analysis.bootstrap_resamples", "analysis.ci_level"),
    # Budget draws grid points and folds from the configured grid; the rest as a soup job. It
    # writes no greedy steps, so soups.early_exit (the same decisions either way) is not its.
    "budget": (*SOUP_MODEL, "soups.greedy_accept", "soups.cross_fold_val", "grid", "folds.k", "budget"),
    "ship": ("soups.ship",),
    # models_from: a checkpoint (the job's input file) scored and saved as a fine-tune is, in its
    # precision and save dtype. Its config label and fold are the job's wildcards.
    "import_model": (*DATA_SPEC, "model", "finetune.precision", "finetune.save_dtype"),
    "summary": ("data", "model", "folds", "grid", "analysis"),
}


# Steps whose result depends on soups.metric (uniform_subsets records every metric's columns).
METRIC_STEPS = ("greedy_fold", "soup_all", "gsgs", "methods", "budget", "summary")


def _get(cfg: dict, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def select(cfg: dict, paths: Iterable[str]) -> dict:
    """The sub-tree of `cfg` holding exactly `paths` (dotted keys), deep-copied."""
    out: dict = {}
    for path in paths:
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(_get(cfg, path))
    return out


def step_keys(cfg: dict, step: str, hp: str | None = None) -> tuple[str, ...]:
    """The dotted keys the result of `step` depends on (of grid point `hp`, for finetune)."""
    model = MODEL_KEYS[cfg["model"]["name"]]
    keys = tuple(key for entry in _step_keys(cfg, step, hp) for key in (model if entry == "model" else (entry,)))
    if "data.image_size" in keys and "data.hflip" in keys and cfg["data"].get("interpolation", "bilinear") != "bilinear":
        # Every job with the image spec; only when not the default, so the jobs of runs made
        # before data.interpolation existed keep their configuration (and are not rerun).
        keys += ("data.interpolation",)
    if step == "prepare" and "data.resize" in keys and cfg["data"].get("background", "white") != "white":
        # Image files (the datasets whose prepare reads data.resize): how transparent pixels are
        # read; only when not the schema's default, so runs made before the key existed keep
        # their prepare job (and all that follows it) as it was. Later jobs learn it from the
        # prepared file, which changes with it.
        keys += ("data.background",)
    if step in METRIC_STEPS and cfg.get("soups", {}).get("metric", "accuracy") != "accuracy":
        # The score the selections compare; only when not the default, so the jobs of runs made
        # before soups.metric existed keep their configuration.
        keys += ("soups.metric",)
    if step == "prepare" and cfg["data"].get("image_glob") is not None:
        # Where a manifest's images are found; only when set, so runs made before the key existed
        # keep their prepare job.
        keys += ("data.image_glob",)
    if step == "prepare" and cfg["data"].get("group_pattern") is not None:
        # imagefolder's groups (stored in the prepared file: the test split and, through it, the
        # `folds` job depend on them); only when set, so runs made before the key existed keep
        # their prepare job.
        keys += ("data.group_pattern",)
    return keys


def _step_keys(cfg: dict, step: str, hp: str | None) -> tuple[str, ...]:
    if step == "prepare":
        return ("seed", "data.name", "data.max_pool", "data.max_test", *PREPARE_KEYS[cfg["data"]["name"]])
    if step == "pretrain":
        if cfg["model"]["name"] == "open_clip":
            return ("model",)  # exported, not trained
        if cfg["model"]["name"] == "timm":
            # Exported, not trained: the image size shapes a ViT's position embedding; the seed
            # draws the weights of model.pretrained: null.
            return ("model", "data.image_size", *(("seed",) if cfg["model"]["pretrained"] is None else ()))
        return ("seed", *DATA_SPEC, "model", "pretrain", "augment.medium")
    if step == "finetune":
        point = grid_point(cfg, hp)
        return ("seed", *DATA_SPEC, "model", *FINETUNE_RECIPE, f"augment.{point.aug}",
                *(("finetune.mixup_alpha",) if point.mixup else ()))
    if cfg.get("models_from") and step in ("budget", "summary"):
        # Imported models: the budget draws from the configs of the CSV (their order is the
        # tie order), not the grid; the summary says where the models come from. Only then, so
        # the jobs of a run that trains keep their configuration.
        return tuple(key for key in STEP_KEYS[step] if key != "grid") + ("models_from",)
    return STEP_KEYS[step]


def job_config(cfg: dict, step: str, hp: str | None = None) -> dict:
    """The configuration a job of `step` is given: its result depends on exactly these values.
    A fine-tune gets its own grid point as a one-point grid, so `grid_point(cfg, hp)` still
    finds it and editing another grid point changes nothing here."""
    out = select(cfg, step_keys(cfg, step, hp))
    for path in _NOT_IN_SECTIONS:
        section, key = path.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    if step == "finetune":
        point = grid_point(cfg, hp)
        out["grid"] = {"lr": [point.lr], "aug": [point.aug], "mixup": [point.mixup]}
    return out


def runtime_config(cfg: dict) -> dict:
    """The settings that never change a job's result (RUNTIME_KEYS), as a config sub-tree."""
    return select(cfg, RUNTIME_KEYS)


def default_runtime() -> dict:
    """The schema's defaults of the runtime keys (a step run by hand without --runtime-json)."""
    from foldsoup.config.schema import fill_defaults, load_schema

    return runtime_config(fill_defaults({"data": {}, "model": {}}, load_schema()))


def merge(job_cfg: dict | None, runtime: dict | None) -> dict | None:
    """One configuration tree for the step functions: the job's keys plus the runtime ones.
    The schema's runtime defaults lie under both, for a step run by hand without
    --runtime-json (a full configuration given as --config-json keeps its own values)."""
    if job_cfg is None:
        return None
    return deep_update(deep_update(default_runtime(), job_cfg), runtime or {})
