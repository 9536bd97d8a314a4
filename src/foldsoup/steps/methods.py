"""Step `methods`: Tables 3/4 (every method's row), logit ensembles of the same ingredients, and
paired bootstrap intervals. No torch: ensembles and intervals come from saved logits."""

from __future__ import annotations

import os
from pathlib import Path

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


def methods(cfg: dict, data_path: str, folds_path: str, models_csv: str, model_dir: str, soups_dir: str, out: str) -> None:
    """Tables 3/4 rows, logit ensembles of the same ingredients, and paired bootstrap intervals.

    Selections (best on val, best on holdout, BGSS, best uniform per split) are chosen by
    foldsoup.soups.methods / select (one tie rule: grid order, then fold) and written as links to
    the chosen model or soup. No torch: ensembles and intervals come from saved logits.
    """
    import json

    import pandas as pd
    from safetensors.numpy import load_file

    from foldsoup.analysis.uncertainty import (
        correct_count,
        ensemble_of_groups,
        fold_counts,
        paired_bootstrap,
    )
    from foldsoup.data.prepared import load_prepared
    from foldsoup.storage.weights import atomic_write_text

    soups, models_root = Path(soups_dir), Path(model_dir)
    cross_fold = cfg["soups"]["cross_fold_val"]
    data = load_prepared(data_path)
    fold_of = read_folds(folds_path, data.pool_labels)
    k = num_folds(fold_of)

    def record(name: str) -> dict:
        with open(soups / f"{name}.json") as f:
            return json.load(f)

    def model_file(name: str, file: str) -> Path:
        hp, fold = name.split("/")
        return models_root / hp / fold / file

    def adopt(src: Path, method: str, rec: dict) -> dict:
        """A selection: links to the chosen weights and test logits under the method's own name."""
        src_predictions = predictions_path(src) if src.parent == soups else src.with_name("predictions.safetensors")
        link_selection(src, soups / f"{method}.safetensors")
        link_selection(src_predictions, predictions_path(soups / f"{method}.safetensors"))
        rec = {**rec, "method": method, "selected": rec.get("method", rec["ingredients"][0])}
        atomic_write_json(soups / f"{method}.json", rec)
        return rec

    table_rows = pd.read_csv(models_csv).to_dict("records")  # grid order, then fold: the tie order
    models = [pick.ModelResult.from_record(r) for r in table_rows]
    has_holdout = "holdout_acc" in table_rows[0] if table_rows else False

    def single(m: pick.ModelResult, method: str, folds: list[int], metric: str, val_acc) -> dict:
        rec = {"ingredients": [m.name], "n_ingredients": 1, "folds": folds, "val_metric": metric, "val_acc": float(val_acc),
               "test_acc": m.test_acc, **({"holdout_acc": select.as_float(m.holdout_acc)} if has_holdout else {}),
               **m.counts}
        name = "holdout" if metric == "holdout" else "val"  # the counts behind val_acc
        if f"{name}_correct" in m.counts:
            count = [m.counts[f"{name}_correct"], m.counts[f"{name}_total"]]
            rec.update(val_correct=count[0], val_total=count[1], fold_counts={str(folds[0]): count})
        return adopt(model_file(m.name, "model.safetensors"), method, rec)

    best = pick.best_on_val(models)
    rows = [single(best, "best_on_val", [best.fold], "own", best.val_acc)]
    if has_holdout:
        top = pick.best_on_holdout(models)
        rows.append(single(top, "best_on_holdout", [HOLDOUT], "holdout", top.holdout_acc))
    rows += [record("uniform_soup"), record("greedy_soup")] + ([record("greedy_soup_holdout")] if has_holdout else [])
    per_fold = {i: record(f"greedy_fold{i}") for i in range(k)}
    chosen = per_fold[select.bgss({i: record_val(r) for i, r in per_fold.items()})]
    rows.append(adopt(soups / f"{chosen['method']}.safetensors", "bgss", chosen))
    rows.append(record("gsgs"))
    uniform = {i: record(f"uniform_fold{i}") for i in range(k)}
    chosen = uniform[select.best_uniform_per_split({i: record_val(r) for i, r in uniform.items()})]
    rows.append(adopt(soups / f"{chosen['method']}.safetensors", "best_uniform_per_split", chosen))
    test_logits = {r["method"]: load_file(predictions_path(soups / f"{r['method']}.safetensors"))["test_logits"] for r in rows}

    # Logit ensembles of the same ingredients: what choosing a single model costs.
    logits = {m.name: load_file(model_file(m.name, "predictions.safetensors")) for m in models if not m.diverged}

    def ensemble(method: str, groups: list[list[str]], folds) -> dict:
        """The logit ensemble of the models in `groups`: each group's mean, then the mean over
        groups (each group weighs the same; one group: each model does)."""
        members = [m for group in groups for m in group]
        pool = ensemble_of_groups([[logits[m]["pool_logits"] for m in group] for group in groups])
        rec = soup_record(method, members, {}, cross_fold, fold_counts(pool, data.pool_labels, fold_of, folds))
        if has_holdout:
            correct, total = fold_counts(pool, data.pool_labels, fold_of, [HOLDOUT])[HOLDOUT]
            rec.update(holdout_acc=float(select.fold_acc(correct, total)), holdout_correct=correct, holdout_total=total)
        test_logits[method] = ensemble_of_groups([[logits[m]["test_logits"] for m in group] for group in groups])
        correct, total = correct_count(test_logits[method], data.test_labels)
        rec.update(test_acc=float(select.fold_acc(correct, total)), test_correct=correct, test_total=total)
        return rec

    def folds_of(members: list[str]) -> set[int]:
        return {int(name.rsplit("/fold", 1)[1]) for name in members}

    fold_ensembles = [ensemble(f"ensemble_fold{i}", [[n for n in logits if folds_of([n]) == {i}]], [i]) for i in range(k)]
    best_fold = fold_ensembles[select.bgss({i: record_val(r) for i, r in enumerate(fold_ensembles)})]  # an ensemble's BGSS
    test_logits["ensemble_best_fold"] = test_logits[best_fold["method"]]
    greedy_members = record("greedy_soup")["ingredients"]
    # GSGS weighs each per-fold soup the same: so does its ensemble (each soup's models' mean, then
    # the mean over soups), not each model.
    gsgs_soups = [record(soup)["ingredients"] for soup in record("gsgs")["ingredients"]]
    rows += [
        ensemble("ensemble_all", [list(logits)], range(k)),
        {**best_fold, "method": "ensemble_best_fold", "selected": best_fold["method"]},
        ensemble("ensemble_greedy_soup", [greedy_members], folds_of(greedy_members)),
        ensemble("ensemble_gsgs", gsgs_soups, folds_of([m for soup in gsgs_soups for m in soup])),
    ]
    if has_holdout:
        holdout_members = record("greedy_soup_holdout")["ingredients"]
        rows.append(ensemble("ensemble_greedy_soup_holdout", [holdout_members], [HOLDOUT]))

    a = cfg["analysis"]
    correct = {r["method"]: test_logits[r["method"]].argmax(1) == data.test_labels for r in rows}
    intervals = {b["method"]: b for b in paired_bootstrap(correct, "best_on_val", a["bootstrap_resamples"], cfg["seed"], a["ci_level"])}
    table = pd.DataFrame([{
        "method": r["method"], "val_acc": r["val_acc"], "test_acc": r["test_acc"],
        **({"holdout_acc": r["holdout_acc"]} if has_holdout else {}), "n_ingredients": r["n_ingredients"],
        "val_metric": r["val_metric"], "folds": "-".join(map(str, r["folds"])),
        **{key: value for key, value in intervals[r["method"]].items() if key not in ("method", "test_acc")},
    } for r in rows])
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log("\n" + table.to_string(index=False))
