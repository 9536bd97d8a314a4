import os
import re

from foldsoup.config import methods as method_table
from foldsoup.config.schema import dumps, hp_names
from foldsoup.data.prepared import source_paths
from foldsoup.config.job import job_config, runtime_config

R = config["results"]
K = config["folds"]["k"]
FOLDS = list(range(K))
# The grid points' names, or with models_from the configs of its CSV (models/<config>/fold<i>/).
HPS = hp_names(config)
# An outer holdout (folds.holdout_fraction > 0) adds the methods selected on it.
HOLDOUT = config["folds"]["holdout_fraction"] > 0
# The methods (foldsoup.config.methods) by the job that makes them: the soups of all models (one
# soup_all job per method, running the method's step), GSGS, and the selections the methods job
# links to a model or soup (its logit ensembles have no files).
METHODS = {m.name: m for m in method_table.run_methods(HOLDOUT)}
SOUPS_ALL = [m.name for m in METHODS.values() if m.step in ("uniform-all", "greedy-all", "greedy-holdout")]
SOUPS_BEFORE_METHODS = [m.name for m in METHODS.values() if m.step != "methods"]
SELECTIONS = [m.name for m in METHODS.values() if m.step == "methods" and m.weights]
# Every rule's shell command is `python -m foldsoup <step> ...`, written out in full (the linter
# wants no outside variables in shell commands). Snakemake sets OMP_NUM_THREADS to the rule's
# threads, which torch takes as its thread count.
ENV = "../../envs/foldsoup.yaml"


# Only the configured grid points and folds: a --forcerun or target naming anything else is
# refused by Snakemake ("no rule to produce") instead of failing in the job.
wildcard_constraints:
    hp="|".join(re.escape(hp) for hp in HPS),
    fold="|".join(str(fold) for fold in FOLDS),


def job_params(step):
    """A job's config param: exactly the keys its result depends on (foldsoup.config.job), as
    canonical JSON, so Snakemake reruns it only when one of them changes. Per grid point for
    fine-tunes: adding a learning rate trains only the new points."""
    if step == "finetune":
        return lambda wildcards: dumps(job_config(config, step, wildcards.hp))
    return dumps(job_config(config, step))


# Settings that never change a job's result (device, eval batch size, compile, on_divergence).
# A params function that takes `input` is "derived" for Snakemake, and derived params are no
# rerun trigger: these reach every job without rerunning finished ones when they are edited.
RUNTIME_JSON = dumps(runtime_config(config))


def runtime_params(wildcards, input):
    return RUNTIME_JSON


def pretrained_checkpoint():
    """model.pretrained as an input of `pretrain` when it is a local file: replacing the
    checkpoint reruns it (a tag is fetched by open_clip or timm and stays a param). A path that
    does not exist was refused by the config check already."""
    pretrained = config["model"].get("pretrained") or ""
    if config["model"]["name"] in ("open_clip", "timm") and os.path.isfile(pretrained):
        return [pretrained]
    return []


def runtime(kind):
    return lambda wildcards, attempt: config["resources"][kind]["runtime"] * attempt


def mem_mb(kind):
    return lambda wildcards, attempt: config["resources"][kind]["mem_mb"] * attempt


def model_paths(hps=None, folds=None, name="model.safetensors"):
    return expand(f"{R}/models/{{hp}}/fold{{fold}}/{name}", hp=hps or HPS, fold=FOLDS if folds is None else folds)
