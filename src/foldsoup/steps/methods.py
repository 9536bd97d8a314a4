"""Step `methods`: Tables 3/4 (every method's row), logit ensembles of the same ingredients, and
paired bootstrap intervals. No torch: ensembles and intervals come from saved logits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


from foldsoup.data.folds import HOLDOUT, num_folds, read_folds
from foldsoup.storage.weights import atomic_write_json
from foldsoup.steps.context import log
from foldsoup.steps.soups import _soup_record, predictions_path

def methods(cfg: dict, data_path: str, folds_path: str, models_csv: str, model_dir: str, soups_dir: str, out: str) -> None:
    """Tables 3/4 rows, logit ensembles of the same ingredients, and paired bootstrap intervals.

    Selections (best on val, BGSS, best uniform per split) copy an existing soup or model. No
    torch: ensembles and intervals come from saved logits.
    """
    import json

    import pandas as pd
    from safetensors.numpy import load_file

    from foldsoup.data.prepared import load_prepared
    from foldsoup.analysis.uncertainty import ensemble_logits, fold_accuracies, paired_bootstrap
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
        """A selection: the chosen weights and test logits under the method's own name."""
        for src_file, dst in ((src, soups / f"{method}.safetensors"),
                              (predictions_path(src) if src.parent == soups else src.with_name("predictions.safetensors"),
                               predictions_path(soups / f"{method}.safetensors"))):
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src_file, tmp)
            os.replace(tmp, dst)
        rec = {**rec, "method": method, "selected": rec.get("method", rec["ingredients"][0])}
        atomic_write_json(soups / f"{method}.json", rec)
        return rec

    models = pd.read_csv(models_csv)
    usable = models[~models.diverged.astype(bool)]
    best = usable.loc[usable.val_acc.idxmax()]  # idxmax: first of ties, in table order
    best_name = f"{best.hp}/fold{best.fold}"
    has_holdout = "holdout_acc" in usable.columns

    def model_holdout_acc(m) -> dict:
        return {"holdout_acc": float(m.holdout_acc)} if has_holdout else {}

    rows = [adopt(model_file(best_name, "model.safetensors"), "best_on_val",
                  {"ingredients": [best_name], "n_ingredients": 1, "folds": [int(best.fold)], "val_metric": "own",
                   "val_acc": float(best.val_acc), "test_acc": float(best.test_acc), **model_holdout_acc(best)})]
    if has_holdout:
        top = usable.loc[usable.holdout_acc.idxmax()]
        top_name = f"{top.hp}/fold{top.fold}"
        rows.append(adopt(model_file(top_name, "model.safetensors"), "best_on_holdout",
                          {"ingredients": [top_name], "n_ingredients": 1, "folds": [HOLDOUT], "val_metric": "holdout",
                           "val_acc": float(top.holdout_acc), "test_acc": float(top.test_acc), **model_holdout_acc(top)}))
    rows += [record("uniform_soup"), record("greedy_soup")] + ([record("greedy_soup_holdout")] if has_holdout else [])
    per_fold = [record(f"greedy_fold{i}") for i in range(k)]
    rows.append(adopt(soups / f"{max(per_fold, key=lambda r: r['val_acc'])['method']}.safetensors", "bgss",
                      max(per_fold, key=lambda r: r["val_acc"])))  # max(): first of ties, in fold order
    rows.append(record("gsgs"))
    uniform = [record(f"uniform_fold{i}") for i in range(k)]
    pick = max(uniform, key=lambda r: r["val_acc"])
    rows.append(adopt(soups / f"{pick['method']}.safetensors", "best_uniform_per_split", pick))
    test_logits = {r["method"]: load_file(predictions_path(soups / f"{r['method']}.safetensors"))["test_logits"] for r in rows}

    # Logit ensembles of the same ingredients: what choosing a single model costs.
    logits = {name: load_file(model_file(name, "predictions.safetensors")) for name in
              (f"{m.hp}/fold{m.fold}" for m in usable.itertuples())}

    def ensemble(method: str, members: list[str], folds) -> dict:
        pool = ensemble_logits([logits[m]["pool_logits"] for m in members])
        accs = fold_accuracies(pool, data.pool_labels, fold_of, folds)
        rec = _soup_record(method, members, accs, cross_fold)
        if has_holdout:
            rec["holdout_acc"] = fold_accuracies(pool, data.pool_labels, fold_of, [HOLDOUT])[HOLDOUT]
        test_logits[method] = ensemble_logits([logits[m]["test_logits"] for m in members])
        rec["test_acc"] = float((test_logits[method].argmax(1) == data.test_labels).mean())
        return rec

    def folds_of(members: list[str]) -> set[int]:
        return {int(name.rsplit("/fold", 1)[1]) for name in members}

    fold_ensembles = [ensemble(f"ensemble_fold{i}", [n for n in logits if folds_of([n]) == {i}], [i]) for i in range(k)]
    best_fold = max(fold_ensembles, key=lambda r: r["val_acc"])  # an ensemble's BGSS: best fold on its own val
    test_logits["ensemble_best_fold"] = test_logits[best_fold["method"]]
    greedy_members = record("greedy_soup")["ingredients"]
    gsgs_members = [m for soup in record("gsgs")["ingredients"] for m in record(soup)["ingredients"]]
    rows += [
        ensemble("ensemble_all", list(logits), range(k)),
        {**best_fold, "method": "ensemble_best_fold", "selected": best_fold["method"]},
        ensemble("ensemble_greedy_soup", greedy_members, folds_of(greedy_members)),
        ensemble("ensemble_gsgs", gsgs_members, folds_of(gsgs_members)),
    ]
    if has_holdout:
        holdout_members = record("greedy_soup_holdout")["ingredients"]
        rows.append(ensemble("ensemble_greedy_soup_holdout", holdout_members, [HOLDOUT]))

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
