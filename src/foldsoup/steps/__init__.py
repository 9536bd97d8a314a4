"""The workflow's steps: one plain function per rule (`python -m foldsoup <step>` calls them),
each reading its inputs, calling the library and writing its outputs atomically. Tests and
users can run any step without Snakemake."""

from foldsoup.steps.budget import budget, budget_table
from foldsoup.steps.context import Context, log
from foldsoup.steps.data import folds, prepare
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

__all__ = ["Context", "budget", "budget_table", "figures", "finetune", "folds", "greedy_all", "greedy_per_fold", "gsgs",
           "linear_probe", "log", "methods", "models_table", "prepare", "pretrain", "reliability", "ship", "summary",
           "uniform_all", "uniform_subsets"]
