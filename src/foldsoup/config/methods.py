"""Every method a run makes, in one table: its name, how tables, figures and the summary call it,
the step that makes it and what it chooses from. The order of METHODS is the order of every table
and figure. The CLI, the workflow's rules, the methods step, the summary, the figures, the budget
analysis and the `soups.ship` check read this table, so adding a method is a row here and its
function (`foldsoup.steps.methods.builds` for the ones the methods step makes).

No imports beyond the standard library: the Snakefile reads it when it parses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # as in tables/methods.csv and soups/<name>.*
    title: str  # summary.md and prose
    label: str  # a figure's tick label (short lines)
    step: str  # the `python -m foldsoup` step that writes its record: soups/<name>.json, or a methods.csv row
    reads: str  # what it chooses from or averages
    weights: bool = True  # soups/<name>.safetensors exists (a soup or a link to a model); False: a logit ensemble
    holdout: bool = False  # selected on the outer holdout: made only with folds.holdout_fraction > 0
    paper_tables: tuple[int, ...] = (3,)  # the paper's tables that report it (summary.md's Tables 3 and 4)
    budget: bool = False  # computed again on subsets of grid points and folds (tables/budget.csv)


METHODS: tuple[Method, ...] = (
    Method("best_on_val", "Best on val", "Best on val", "methods", "every model, by its own fold's val accuracy",
           paper_tables=(3, 4), budget=True),
    Method("uniform_soup", "Uniform soup", "Uniform soup", "uniform-all", "every model (not diverged), averaged",
           paper_tables=(3, 4), budget=True),
    Method("greedy_soup", "Greedy soup (all subsets)", "Greedy soup", "greedy-all",
           "every model, greedily by MinAcc over the soup's folds (Alg. 1, Eq. 3)", budget=True),
    Method("bgss", "BGSS", "BGSS", "methods", "the per-fold greedy soups, by val accuracy", budget=True),
    Method("gsgs", "GSGS", "GSGS", "gsgs", "the per-fold greedy soups, greedily by MinAcc", budget=True),
    Method("best_uniform_per_split", "Best uniform soup per split on val", "Best uniform\nper split", "methods",
           "the per-fold uniform soups, by val accuracy", paper_tables=(4,)),
    Method("best_on_holdout", "Best on holdout", "Best on\nholdout", "methods",
           "every model, by its outer-holdout accuracy", holdout=True, paper_tables=()),
    Method("greedy_soup_holdout", "Greedy soup (all, on holdout)", "Greedy soup\non holdout", "greedy-holdout",
           "every model, greedily by outer-holdout accuracy", holdout=True, paper_tables=()),
    Method("ensemble_all", "Ensemble of all models (logits)", "Ensemble:\nall models", "methods",
           "every model's logits, averaged", weights=False, paper_tables=(), budget=True),
    Method("ensemble_best_fold", "Ensemble of the best fold (logits)", "Ensemble:\nbest fold", "methods",
           "the per-fold logit ensembles, by val accuracy", weights=False, paper_tables=()),
    Method("ensemble_greedy_soup", "Ensemble of the greedy soup's models", "Ensemble: greedy\nsoup's models", "methods",
           "greedy_soup's ingredients' logits", weights=False, paper_tables=()),
    Method("ensemble_greedy_soup_holdout", "Ensemble of the holdout greedy soup's models",
           "Ensemble: greedy\non holdout", "methods", "greedy_soup_holdout's ingredients' logits", weights=False,
           holdout=True, paper_tables=()),
    Method("ensemble_gsgs", "Ensemble of GSGS's models", "Ensemble:\nGSGS's models", "methods",
           "GSGS's per-fold soups' logits (each soup's models, then the soups equally)", weights=False, paper_tables=()),
)

BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}


def run_methods(holdout: bool) -> list[Method]:
    """The methods a run makes, in table order: those selected on the outer holdout only with one."""
    return [m for m in METHODS if holdout or not m.holdout]


def made_by(step: str, holdout: bool) -> list[str]:
    """The names of the run's methods whose record `step` writes."""
    return [m.name for m in run_methods(holdout) if m.step == step]


def shippable(holdout: bool = True) -> list[str]:
    """The methods whose weights a run can ship (not the logit ensembles: they are k models)."""
    return [m.name for m in run_methods(holdout) if m.weights]


def title(name: str) -> str:
    return BY_NAME[name].title if name in BY_NAME else name


def label(name: str) -> str:
    return BY_NAME[name].label if name in BY_NAME else name


def order(names: Iterable[str]) -> list[str]:
    """Unique names in table order, then any others alphabetically."""
    unique = set(names)
    return [m.name for m in METHODS if m.name in unique] + sorted(unique - BY_NAME.keys())
