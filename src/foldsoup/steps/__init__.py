"""The workflow's steps: one plain function per rule (`python -m foldsoup <step>` calls them),
each reading its inputs, calling the library and writing its outputs atomically. Tests and
users can run any step without Snakemake.

STEPS is the command line: each step's function, its help and its options, in the function's
argument order (`foldsoup.cli` builds the sub-commands from it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from foldsoup.steps.budget import budget, budget_table
from foldsoup.steps.context import Context, log
from foldsoup.steps.data import folds, prepare
from foldsoup.steps.imports import import_model
from foldsoup.steps.methods import methods
from foldsoup.steps.report import figures, reliability, summary
from foldsoup.steps.ship import ship
from foldsoup.steps.soups import (
           greedy_all,
           greedy_per_fold,
           gsgs,
           models_table,
           uniform_all,
           uniform_subsets,
)
from foldsoup.steps.train import finetune, linear_probe, pretrain


@dataclass(frozen=True)
class Step:
    """One sub-command. `args`: its required options, passed to `run` in this order after the
    configuration ("config": the function's first argument is the job's configuration, from
    --config-json and --runtime-json); "name*" takes one or more values; `optional`: options
    that may be left out (or given without a value), passed as keyword arguments."""

    run: Callable
    help: str
    args: tuple[str, ...]
    optional: dict[str, str] = field(default_factory=dict)  # option -> the function's keyword

    @property
    def takes_config(self) -> bool:
        return "config" in self.args


INTEGER_OPTIONS = ("fold", "n_folds")

STEPS: dict[str, Step] = {
    "prepare": Step(prepare, "load the dataset and write the prepared file", ("config", "out")),
    "folds": Step(folds, "stratified k-fold split of the pool", ("config", "data", "out")),
    "pretrain": Step(pretrain, "the shared pretrained backbone", ("config", "data", "out")),
    "lp": Step(linear_probe, "linear probe of one fold", ("config", "data", "folds", "backbone", "fold", "out")),
    "finetune": Step(finetune, "fine-tune one (grid point, fold)",
                     ("config", "data", "folds", "backbone", "head", "hp", "fold", "out_dir", "resume_dir")),
    "import-model": Step(import_model, "import one checkpoint of models_from (a model trained outside foldsoup)",
                         ("config", "data", "folds", "checkpoint", "hp", "fold", "out_dir")),
    "models-table": Step(models_table, "gather metrics into tables/models.csv", ("metrics*", "out")),
    "uniform-subsets": Step(uniform_subsets, "section 3.1 soups of one grid point",
                            ("config", "data", "folds", "hp", "models*", "metrics*", "out")),
    "greedy-fold": Step(greedy_per_fold, "greedy and uniform soup of one fold",
                        ("config", "data", "folds", "fold", "models*", "metrics*", "out_greedy", "out_uniform")),
    "uniform-all": Step(uniform_all, "uniform soup of all models", ("config", "data", "folds", "models*", "metrics*", "out")),
    "greedy-all": Step(greedy_all, "greedy soup of all models (MinAcc)",
                       ("config", "data", "folds", "models*", "metrics*", "out")),
    "greedy-holdout": Step(partial(greedy_all, on_holdout=True), "greedy soup of all models scored on the outer holdout",
                           ("config", "data", "folds", "models*", "metrics*", "out")),
    "gsgs": Step(gsgs, "greedy soup of the per-fold greedy soups", ("config", "data", "folds", "fold_soups*", "out")),
    "methods": Step(methods, "tables/methods.csv and per_class.csv, the selected soups, ensembles and intervals",
                    ("config", "data", "folds", "models_csv", "model_dir", "soups_dir", "out"),
                    {"out_per_class": "out_per_class"}),
    "ship": Step(ship, "results/ship/: a copy of the soups.ship method's weights and ship.json",
                 ("config", "weights", "out", "out_record")),
    "reliability": Step(reliability, "tables/uniform_subsets.csv and tables/reliability.csv",
                        ("subsets*", "models_csv", "out_subsets", "out")),
    "figures": Step(figures, "figures 2-4, the methods figure and the confusion matrices",
                    ("models_csv", "subsets", "reliability", "methods", "out*"), {"per_class": "per_class_csv"}),
    "summary": Step(summary, "summary.md: tables 1-4 beside the paper",
                    ("config", "models_csv", "subsets", "reliability", "methods", "out"),
                    {"budget": "budget_csv", "ship": "ship_json", "per_class": "per_class_csv", "folds": "folds_csv"}),
    "budget": Step(budget, "budget cells of one fold count: methods on subsets of grid points and folds",
                   ("config", "data", "folds", "model_dir", "n_folds", "out")),
    "budget-table": Step(budget_table, "tables/budget.csv and figures/budget.png", ("parts*", "out_table", "out_figure")),
}

__all__ = ["STEPS", "Context", "Step", "budget", "budget_table", "figures", "finetune", "folds", "greedy_all",
           "greedy_per_fold", "gsgs", "import_model", "linear_probe", "log", "methods", "models_table", "prepare", "pretrain", "reliability",
           "ship", "summary", "uniform_all", "uniform_subsets"]
