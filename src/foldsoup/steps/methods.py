"""Step `methods`: tables/methods.csv, one row per method of `foldsoup.config.methods.METHODS` in
its order. The methods other steps make (the soups) are read from their records; the ones this
step makes (the selections among models and soups, and the logit ensembles of the same
ingredients) are built here, each by the function registered for its name with `@builds`. Then
paired bootstrap intervals. No torch: ensembles and intervals come from saved logits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path

from foldsoup.config.methods import run_methods
from foldsoup.data.folds import HOLDOUT, num_folds, read_folds
from foldsoup.soups import methods as pick
from foldsoup.soups import select
from foldsoup.steps.context import log
from foldsoup.steps.soups import predictions_path, record_val, soup_record
from foldsoup.storage.weights import atomic_write_json


def link_selection(target: Path, link: Path) -> None:
    """`link` -> `target` as a relative symbolic link, replaced atomically. A selection is a
    pointer to weights that already exist (350 MB saved per selection for ViT-B/32); a hard link
    would share the source's modification time, which Snakemake reads as the output's, while a
    symbolic link has its own (Snakemake reads links with lstat)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


class MethodsRun:
    """What the methods' functions read: the models (tables/models.csv, in the tie order), the
    soups' records, the models' logits; and how they write: a selection links to the chosen
    weights, an ensemble scores averaged logits. `test_logits[method]`: every row's, for the
    intervals."""

    def __init__(self, cfg: dict, data_path: str, folds_path: str, models_csv: str, model_dir: str, soups_dir: str):
        import pandas as pd

        from foldsoup.data.prepared import load_prepared

        self.cfg, self.soups, self.models_root = cfg, Path(soups_dir), Path(model_dir)
        self.data = load_prepared(data_path)
        self.fold_of = read_folds(folds_path, self.data.pool_labels)
        self.k = num_folds(self.fold_of)
        table_rows = pd.read_csv(models_csv).to_dict("records")  # grid order, then fold: the tie order
        self.metric = cfg["soups"].get("metric", "accuracy")
        self.models = [pick.ModelResult.from_record(r, metric=self.metric) for r in table_rows]
        self.rows = {m.name: r for m, r in zip(self.models, table_rows)}
        self.has_holdout = "holdout_acc" in table_rows[0] if table_rows else False
        self.test_logits: dict = {}

    def record(self, name: str) -> dict:
        import json

        with open(self.soups / f"{name}.json") as f:
            return json.load(f)

    def model_file(self, name: str, file: str) -> Path:
        hp, fold = name.split("/")
        return self.models_root / hp / fold / file

    def adopt(self, src: Path, method: str, rec: dict) -> dict:
        """A selection: links to the chosen weights and test logits under the method's own name."""
        src_predictions = predictions_path(src) if src.parent == self.soups else src.with_name("predictions.safetensors")
        link_selection(src, self.soups / f"{method}.safetensors")
        link_selection(src_predictions, predictions_path(self.soups / f"{method}.safetensors"))
        rec = {**rec, "method": method, "selected": rec.get("method", rec["ingredients"][0]), "metric": self.metric}
        atomic_write_json(self.soups / f"{method}.json", rec)
        return rec

    def single(self, m: pick.ModelResult, method: str, on_holdout: bool = False) -> dict:
        """A selection of one model, validated on its own fold (or on the outer holdout): its
        scores and counts from tables/models.csv, the val ones those of that fold."""
        row = self.rows[m.name]
        fold = HOLDOUT if on_holdout else m.fold
        counts = select.class_counts_of(row, "holdout" if on_holdout else "val")
        rec = soup_record(method, [m.name], {fold: m.holdout_acc if on_holdout else m.val_acc}, "min",
                          None if counts is None else {fold: counts})
        del rec["method"]  # adopt names it, and the model it selected
        for split in ("test", *(["holdout"] if self.has_holdout else [])):
            split_counts = select.class_counts_of(row, split)
            if split_counts is not None:
                rec.update(select.score_fields(split, split_counts))
            else:  # a table from before the per-class counts
                rec.update({key: value for key, value in row.items() if key.startswith(f"{split}_")})
        return self.adopt(self.model_file(m.name, "model.safetensors"), method, rec)

    def best_soup_per_fold(self, kind: str, method: str) -> dict:
        """Per fold its soup of `kind` (greedy, uniform); the one with the best val score."""
        per_fold = {i: self.record(f"{kind}_fold{i}") for i in range(self.k)}
        chosen = per_fold[select.bgss({i: record_val(r, self.metric) for i, r in per_fold.items()})]
        return self.adopt(self.soups / f"{chosen['method']}.safetensors", method, chosen)

    @cached_property
    def logits(self) -> dict:
        """Every model's saved logits (not the diverged ones)."""
        from safetensors.numpy import load_file

        return {m.name: load_file(self.model_file(m.name, "predictions.safetensors")) for m in self.models if not m.diverged}

    def ensemble(self, method: str, groups: list[list[str]], folds: Iterable[int]) -> dict:
        """The logit ensemble of the models in `groups`: each group's mean, then the mean over
        groups (each group weighs the same; one group: each model does)."""
        from foldsoup.analysis.uncertainty import class_counts, ensemble_of_groups, fold_counts

        members = [m for group in groups for m in group]
        pool = ensemble_of_groups([[self.logits[m]["pool_logits"] for m in group] for group in groups])
        labels, n = self.data.pool_labels, self.data.num_classes
        rec = soup_record(method, members, {}, self.cfg["soups"]["cross_fold_val"], fold_counts(pool, labels, self.fold_of, folds, n))
        if self.has_holdout:
            rec.update(select.score_fields("holdout", fold_counts(pool, labels, self.fold_of, [HOLDOUT], n)[HOLDOUT]))
        self.test_logits[method] = ensemble_of_groups([[self.logits[m]["test_logits"] for m in group] for group in groups])
        rec.update(select.score_fields("test", class_counts(self.test_logits[method], self.data.test_labels, n)))
        return {**rec, "metric": self.metric}


BUILDS: dict[str, Callable[[MethodsRun], dict]] = {}


def builds(name: str) -> Callable:
    """Registers the function that makes method `name` (a row of config.methods.METHODS whose
    step is `methods`): it takes the MethodsRun and returns the method's record."""
    def register(function: Callable[[MethodsRun], dict]) -> Callable[[MethodsRun], dict]:
        BUILDS[name] = function
        return function
    return register


def _folds_of(members: Iterable[str]) -> set[int]:
    return {int(name.rsplit("/fold", 1)[1]) for name in members}


@builds("best_on_val")
def _best_on_val(run: MethodsRun) -> dict:
    return run.single(pick.best_on_val(run.models), "best_on_val")


@builds("best_on_holdout")
def _best_on_holdout(run: MethodsRun) -> dict:
    return run.single(pick.best_on_holdout(run.models), "best_on_holdout", on_holdout=True)


@builds("bgss")
def _bgss(run: MethodsRun) -> dict:
    return run.best_soup_per_fold("greedy", "bgss")


@builds("best_uniform_per_split")
def _best_uniform_per_split(run: MethodsRun) -> dict:
    return run.best_soup_per_fold("uniform", "best_uniform_per_split")


@builds("ensemble_all")
def _ensemble_all(run: MethodsRun) -> dict:
    return run.ensemble("ensemble_all", [list(run.logits)], range(run.k))


@builds("ensemble_best_fold")
def _ensemble_best_fold(run: MethodsRun) -> dict:
    """Per fold the logit ensemble of its models; the one with the best val accuracy (an
    ensemble's BGSS)."""
    per_fold = [run.ensemble(f"ensemble_fold{i}", [[n for n in run.logits if _folds_of([n]) == {i}]], [i]) for i in range(run.k)]
    best = per_fold[select.bgss({i: record_val(r, run.metric) for i, r in enumerate(per_fold)})]
    run.test_logits["ensemble_best_fold"] = run.test_logits[best["method"]]
    return {**best, "method": "ensemble_best_fold", "selected": best["method"]}


def _ensemble_of(run: MethodsRun, soup: str, on_holdout: bool = False) -> dict:
    """The logit ensemble of a soup's ingredients, validated as the soup is."""
    members = run.record(soup)["ingredients"]
    return run.ensemble(f"ensemble_{soup}", [members], [HOLDOUT] if on_holdout else _folds_of(members))


@builds("ensemble_greedy_soup")
def _ensemble_greedy_soup(run: MethodsRun) -> dict:
    return _ensemble_of(run, "greedy_soup")


@builds("ensemble_greedy_soup_holdout")
def _ensemble_greedy_soup_holdout(run: MethodsRun) -> dict:
    return _ensemble_of(run, "greedy_soup_holdout", on_holdout=True)


@builds("ensemble_gsgs")
def _ensemble_gsgs(run: MethodsRun) -> dict:
    """GSGS weighs each per-fold soup the same: so does its ensemble (each soup's models' mean,
    then the mean over soups), not each model."""
    groups = [run.record(soup)["ingredients"] for soup in run.record("gsgs")["ingredients"]]
    return run.ensemble("ensemble_gsgs", groups, _folds_of([m for group in groups for m in group]))


def methods(cfg: dict, data_path: str, folds_path: str, models_csv: str, model_dir: str, soups_dir: str, out: str,
            out_per_class: str | None = None) -> None:
    """tables/methods.csv: every method's row, the selected soups, ensembles and intervals; and
    `out_per_class` (tables/per_class.csv): each method's test recall and confusion per class.

    Selections (best on val, best on holdout, BGSS, best uniform per split) are chosen by
    foldsoup.soups.methods / select (one tie rule: grid order, then fold) and written as links to
    the chosen model or soup.
    """
    import pandas as pd
    from safetensors.numpy import load_file

    from foldsoup.analysis.uncertainty import confusion_matrix, paired_bootstrap, per_class_rows
    from foldsoup.storage.weights import atomic_write_text

    run = MethodsRun(cfg, data_path, folds_path, models_csv, model_dir, soups_dir)
    rows = []
    for method in run_methods(run.has_holdout):
        rec = BUILDS[method.name](run) if method.step == "methods" else run.record(method.name)
        if method.weights:
            run.test_logits[method.name] = load_file(predictions_path(run.soups / f"{method.name}.safetensors"))["test_logits"]
        rows.append(rec)

    a = cfg["analysis"]
    correct = {r["method"]: run.test_logits[r["method"]].argmax(1) == run.data.test_labels for r in rows}
    labels = None if run.metric == "accuracy" else run.data.test_labels  # intervals on the run's metric
    intervals = {b["method"]: b for b in paired_bootstrap(correct, "best_on_val", a["bootstrap_resamples"], cfg["seed"],
                                                          a["ci_level"], labels=labels)}
    # The run's metric first (val, test, holdout), accuracy kept as extra columns.
    suffixes = list(dict.fromkeys([select.METRICS[run.metric], *select.METRICS.values()]))
    splits = ["val", "test", *(["holdout"] if run.has_holdout else [])]
    table = pd.DataFrame([{
        "method": r["method"], **{f"{split}_{suffix}": r.get(f"{split}_{suffix}") for suffix in suffixes for split in splits},
        "n_ingredients": r["n_ingredients"],
        "val_metric": r["val_metric"], "folds": "-".join(map(str, r["folds"])),
        **{key: value for key, value in intervals[r["method"]].items() if key not in ("method", "test_score")},
    } for r in rows])
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log("\n" + table.to_string(index=False))
    if out_per_class:
        classes, labels = run.data.classes, run.data.test_labels
        per_class = pd.DataFrame([row for r in rows for row in per_class_rows(
            r["method"], confusion_matrix(run.test_logits[r["method"]], labels, len(classes)), classes)])
        atomic_write_text(out_per_class, per_class.to_csv(index=False, float_format="%.6g"))
