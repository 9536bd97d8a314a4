"""One table of methods (foldsoup.config.methods) and one of steps (foldsoup.steps.STEPS): the
command line, the workflow, the methods step, the summary and the budget read them, so a method
is a row and its function, and a step is a row and its function."""

from __future__ import annotations

import inspect
import shutil

import pandas as pd
import pytest

from foldsoup import cli, steps
from foldsoup.analysis import budget
from foldsoup.config import methods as method_table
from foldsoup.steps.methods import BUILDS  # (foldsoup.steps.methods is the step's function)


def _sub_commands() -> set[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_every_step_is_a_sub_command_and_every_method_names_one():
    commands = _sub_commands()
    assert set(steps.STEPS) | {"evaluate", "predict"} == commands
    assert {m.step for m in method_table.METHODS} <= set(steps.STEPS)


@pytest.mark.parametrize("name", sorted(steps.STEPS))
def test_each_step_row_fits_its_function(name):
    """The options of a sub-command bind to its function's parameters, in order."""
    step = steps.STEPS[name]
    values = [object() for _ in step.args]
    inspect.signature(step.run).bind(*values, **{keyword: None for keyword in step.optional.values()})


def test_the_methods_step_builds_exactly_the_methods_it_is_named_for():
    assert set(BUILDS) == {m.name for m in method_table.METHODS if m.step == "methods"}


def test_holdout_methods_only_with_a_holdout_and_ensembles_are_not_shipped():
    without = [m.name for m in method_table.run_methods(holdout=False)]
    assert "best_on_holdout" not in without and "greedy_soup_holdout" not in without
    assert [m.name for m in method_table.run_methods(holdout=True)] == [m.name for m in method_table.METHODS]
    assert "gsgs" in method_table.shippable(False) and "ensemble_all" not in method_table.shippable(True)
    assert method_table.made_by("greedy-holdout", holdout=True) == ["greedy_soup_holdout"]
    assert method_table.made_by("greedy-holdout", holdout=False) == []


def test_budget_methods_are_the_rows_marked_for_it():
    assert budget.METHODS == ("best_on_val", "uniform_soup", "greedy_soup", "bgss", "gsgs", "ensemble_all")


def test_order_is_the_table_order_then_unknown_names_sorted():
    assert method_table.order(["zeta", "gsgs", "alpha", "best_on_val", "gsgs"]) == ["best_on_val", "gsgs", "alpha", "zeta"]


@pytest.mark.slow
def test_a_new_method_is_a_row_and_its_function(smoke_run, tmp_path, monkeypatch):
    """A toy selection, the model with the worst own-fold val accuracy, added as one row and one
    function: the methods step writes its row (in table order) and its link, and summary.md's
    Table 3 shows it by its title."""
    from foldsoup.config.schema import validate
    from foldsoup.soups.methods import candidates

    toy = method_table.Method("worst_on_val", "Worst on val (toy)", "Worst", "methods", "every model, by its val accuracy",
                              paper_tables=())
    rows = list(method_table.METHODS)
    rows.insert(1, toy)
    monkeypatch.setattr(method_table, "METHODS", tuple(rows))
    monkeypatch.setattr(method_table, "BY_NAME", {m.name: m for m in rows})

    def worst_on_val(run):
        by_name = {m.name: m for m in run.models}
        return run.single(by_name[min(candidates(run.models), key=lambda c: c.val_acc).name], "worst_on_val")

    monkeypatch.setitem(BUILDS, "worst_on_val", worst_on_val)

    r = smoke_run.results
    soups = tmp_path / "soups"
    shutil.copytree(r / "soups", soups, symlinks=True)
    cfg = validate({**_run_config(r), "results": str(tmp_path)}, check_paths=False)
    out = tmp_path / "methods.csv"
    steps.methods(cfg, str(r / "prepared" / "dataset.safetensors"), str(r / "folds.csv"), str(r / "tables" / "models.csv"),
                  str(r / "models"), str(soups), str(out))
    table = pd.read_csv(out)
    assert list(table["method"][:3]) == ["best_on_val", "worst_on_val", "uniform_soup"]
    models = pd.read_csv(r / "tables" / "models.csv")
    kept = models[~models["diverged"]]
    worst = table.set_index("method").loc["worst_on_val"]
    assert worst["val_acc"] == pytest.approx(kept["val_acc"].min(), abs=1e-6)
    assert (soups / "worst_on_val.safetensors").is_symlink()
    old = pd.read_csv(r / "tables" / "methods.csv").set_index("method")
    assert table[table.method != "worst_on_val"].set_index("method")[["val_acc", "test_acc"]].equals(old[["val_acc", "test_acc"]])

    from foldsoup.report.summary import table3_section

    assert "| Worst on val (toy) |" in table3_section(table)


def _run_config(results) -> dict:
    """The configuration of the smoke run (presets/smoke.yaml over config.yaml)."""
    from conftest import ROOT, SMOKE

    from foldsoup.config.yaml_files import deep_update, load_yaml_files

    return deep_update(load_yaml_files(ROOT / "config.yaml", SMOKE), {"results": str(results)})
