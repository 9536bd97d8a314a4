import json

from foldsoup.config import dumps, grid_points
from foldsoup.data import source_paths

R = config["results"]
K = config["folds"]["k"]
FOLDS = list(range(K))
HPS = [point.name for point in grid_points(config)]
# An outer holdout (folds.holdout_fraction > 0) adds the soups selected on it.
HOLDOUT = config["folds"]["holdout_fraction"] > 0
SOUPS_ALL = ["uniform_soup", "greedy_soup"] + (["greedy_soup_holdout"] if HOLDOUT else [])
# Every rule's shell command is `python -m foldsoup <step> ...`, written out in full (the linter
# wants no outside variables in shell commands). Snakemake sets OMP_NUM_THREADS to the rule's
# threads, which torch takes as its thread count.
ENV = "../../envs/foldsoup.yaml"

wildcard_constraints:
    hp="[^/]+",
    fold=r"\d+",


def cfg_json(*sections):
    """The config sections a step reads, as canonical JSON: a job reruns only when they change."""
    return dumps({s: config[s] for s in sections})


STEP_SECTIONS = ("seed", "device", "data", "model", "folds", "finetune", "augment")


def runtime(kind):
    return lambda wildcards, attempt: config["resources"][kind]["runtime"] * attempt


def mem_mb(kind):
    return lambda wildcards, attempt: config["resources"][kind]["mem_mb"] * attempt


def model_paths(hps=None, folds=None, name="model.safetensors"):
    return expand(f"{R}/models/{{hp}}/fold{{fold}}/{name}", hp=hps or HPS, fold=FOLDS if folds is None else folds)
