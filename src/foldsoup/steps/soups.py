"""Gathering the fine-tunes (`models-table`) and the soup steps: uniform soups over fold subsets
(Section 3.1), per-fold greedy and uniform soups, the soups over all models, GSGS."""

from __future__ import annotations

from pathlib import Path

from foldsoup.data.folds import HOLDOUT
from foldsoup.errors import DataError, SoupError
from foldsoup.soups import methods, select
from foldsoup.soups.evaluation import greedy_scorer
from foldsoup.steps.context import Context, log
from foldsoup.storage.weights import atomic_write_json, save_weights


COUNT_COLUMNS = ("val_correct", "val_total", "holdout_correct", "holdout_total", "test_correct", "test_total")


def models_table(metrics_paths: list[str], out: str) -> None:
    """tables/models.csv: one row per fine-tune, in the order of `metrics_paths` (the workflow's:
    grid order, then fold), which is the tie order of every selection (soups.methods)."""
    import json

    import pandas as pd

    from foldsoup.storage.weights import atomic_write_text

    rows = []
    for path in metrics_paths:
        with open(path) as f:
            m = json.load(f)
        row = {key: m[key] for key in ("hp", "lr", "aug", "mixup", "fold", "val_acc", "test_acc", "diverged")}
        # Empty for metrics written before the chance test existed.
        row.update(at_chance=m.get("at_chance"), chance_ceiling=m.get("chance_ceiling"))
        # The first-step guard (training.loop.started_far) and the LP the fine-tune started from.
        row.update({key: m.get(key) for key in ("lp_val_acc", "lp_step_loss", "first_step_loss", "first_epoch_loss", "started_far")})
        row.update({f"acc_fold{i}": a for i, a in m["fold_accs"].items()})
        if m.get("holdout_acc") is not None:
            row["holdout_acc"] = m["holdout_acc"]
        # The counts every selection compares (select.accuracy_of); absent in metrics from before them.
        row.update({key: m[key] for key in COUNT_COLUMNS if key in m})
        rows.append(row)  # no timings: two identical runs give the same file (they are in metrics.json)
    table = pd.DataFrame(rows)
    for key in COUNT_COLUMNS:
        if key in table:
            table[key] = table[key].astype("Int64")  # integers, never rounded by the float format
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{len(table)} models, val acc {table.val_acc.min():.4f}..{table.val_acc.max():.4f}")
    from foldsoup.report.console import warning_lines

    for line in warning_lines(out):  # what the end of the run says too
        log(line)


# ---------------------------------------------------------------- soups


def _model_metrics(paths: list[str]) -> list[dict]:
    import json

    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out


def soup_record(method: str, ingredients: list[str], fold_accs: dict[int, float], cross_fold: str,
                counts: dict[int, tuple[int, int]] | None = None, **extra) -> dict:
    """A soup's (or an ensemble's) record. With `counts` (fold -> (correct, total)) every accuracy
    is derived from them (select.fold_acc) and they are kept (`fold_counts`, `val_correct` and
    `val_total` where the score is one fold's), so readers compare exact values."""
    from foldsoup.soups.select import as_float, cross_fold_score, fold_acc

    if counts is not None:
        fold_accs = {int(i): fold_acc(*c) for i, c in counts.items()}
    val = cross_fold_score(fold_accs, cross_fold)
    metric = "holdout" if set(fold_accs) == {HOLDOUT} else cross_fold if len(fold_accs) > 1 else "own"
    record = {"method": method, "ingredients": ingredients, "n_ingredients": len(ingredients),
              "folds": sorted(int(i) for i in fold_accs), "fold_accs": {str(i): float(a) for i, a in fold_accs.items()},
              "val_metric": metric, "val_acc": as_float(val)}
    if counts is not None:
        record["fold_counts"] = {str(i): [int(c), int(t)] for i, (c, t) in counts.items()}
        if len(counts) == 1:
            ((correct, total),) = counts.values()
            record.update(val_correct=int(correct), val_total=int(total))
    return {**record, **extra}


def record_val(rec: dict):
    """A soup record's val score, exact from its `fold_counts` (MinAcc or AvgAcc as recorded);
    records from before counts: their float."""
    from foldsoup.soups.select import cross_fold_score, fold_acc

    if "fold_counts" not in rec:
        return float(rec["val_acc"])
    accs = {int(i): fold_acc(*c) for i, c in rec["fold_counts"].items()}
    return cross_fold_score(accs, "avg" if rec["val_metric"] == "avg" else "min")


def predictions_path(weights_path: str | Path) -> Path:
    """soups/gsgs.safetensors -> soups/gsgs.predictions.safetensors (test logits, for bootstraps)."""
    return Path(weights_path).with_suffix(".predictions.safetensors")


def _save_soup(ctx: Context, ev, out_weights: str, state, record: dict) -> None:
    """Weights, test logits and the record; test (and holdout) accuracy is measured here, after
    every decision."""
    from foldsoup.soups.select import fold_acc

    test_logits = ev.test_logits(state)
    correct, total = int((test_logits.argmax(1) == ev.test_labels).sum()), len(ev.test_labels)
    record.update(test_acc=float(fold_acc(correct, total)), test_correct=correct, test_total=total)
    holdout = ev.holdout_count(state)
    record["holdout_acc"] = None if holdout is None else float(fold_acc(*holdout))
    if holdout is not None:
        record.update(holdout_correct=holdout[0], holdout_total=holdout[1])
    save_weights(out_weights, state, ctx.metadata(kind="soup", method=record["method"], ingredients=record["ingredients"]))
    save_weights(predictions_path(out_weights), {"test_logits": test_logits}, {"method": record["method"]})
    atomic_write_json(Path(out_weights).with_suffix(".json"), record)
    log(f"{record['method']}: {record['n_ingredients']} ingredient(s), val ({record['val_metric']}) "
        f"{record['val_acc']:.4f}, test {record['test_acc']:.4f}")


def uniform_subsets(cfg: dict, data_path: str, folds_path: str, hp: str, model_paths: list[str], metrics_paths: list[str],
                    out: str) -> dict:
    """Section 3.1: uniform soups of one grid point's models over every (sampled) fold subset."""
    import pandas as pd

    from foldsoup.analysis.reliability import (
        fold_subsets,
        format_folds,
        subsets_sampled,
    )
    from foldsoup.soups.average import average
    from foldsoup.soups.select import as_float, avg_acc, min_acc
    from foldsoup.storage.weights import atomic_write_text

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    metrics = _model_metrics(metrics_paths)
    usable = {m["fold"]: p for m, p in zip(metrics, model_paths) if not m["diverged"]}
    store = ctx.ingredients(usable.values())
    states = {fold: store.get(p) for fold, p in usable.items()}
    k, cap = ctx.k, cfg["analysis"]["max_subsets_per_n"]
    rows = []
    for subset in fold_subsets(k, cap, cfg["seed"]):
        if not set(subset) <= set(states):
            continue  # a diverged model is never averaged in
        soup = average(states[i] for i in subset)
        accs = ev.fold_accs(soup, subset)
        holdout_acc = as_float(ev.holdout_acc(soup))  # None (an empty cell) without an outer holdout
        rows.append({"hp": hp, "folds": format_folds(subset), "n": len(subset), "avg_acc": float(avg_acc(accs)),
                     "min_acc": float(min_acc(accs)), "holdout_acc": holdout_acc, "test_acc": ev.test_acc(soup), "sampled": subsets_sampled(k, cap),
                     **{f"acc_fold{i}": float(a) for i, a in accs.items()}})
    columns = ["hp", "folds", "n", "avg_acc", "min_acc", "holdout_acc", "test_acc", "sampled", *(f"acc_fold{i}" for i in range(k))]
    table = pd.DataFrame(rows, columns=columns)  # the header even when every model diverged
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{hp}: {len(rows)} uniform soups evaluated")
    return log_cost(store, ev)


def _candidates(metrics: list[dict], paths: list[str], on_holdout: bool = False):
    """Single models as greedy candidates (soups.methods.candidates: diverged ones left out, in
    the given order), with each one's weight file by name."""
    models = [methods.ModelResult.from_record(m) for m in metrics]
    return methods.candidates(models, on_holdout), {m.name: p for m, p in zip(models, paths) if not m.diverged}


def log_cost(store, ev) -> dict:
    """The soup job's last line, files read and images evaluated (each file read once), and the
    same as a dict, which the soup steps return (scripts/bench.py adds them up)."""
    n = ev.images_evaluated
    log(f"{store.summary()}; {n['val']} val and {n['test']} test images evaluated")
    return {"files": len(store.reads), "reads": sum(store.reads.values()), "bytes_read": store.bytes_read,
            "val_images": n["val"], "test_images": n["test"]}


def _save_greedy(ctx: Context, ev, method: str, result, scorer, out: str) -> None:
    """Save the soup a greedy selection (`result`, made on `scorer`) accepted as `method`."""
    rejected = sum(1 for s in result.steps if s.score is None)
    log(f"{method}: {len(result.steps)} candidates, {result.images} val images evaluated, {rejected} rejected early")
    _save_soup(ctx, ev, out, scorer.mean(), soup_record(method, [c.name for c in result.ingredients], dict(result.fold_accs),
                                                         ctx.cfg["soups"]["cross_fold_val"], ev.counts_of(result.fold_accs),
                                                         steps=[select.step_record(s) for s in result.steps]))


def _greedy_and_save(ctx: Context, ev, method: str, cands: list, paths: dict[str, str], out: str, store) -> None:
    """Alg. 1 over `cands` (each read once, from `store`, by `paths`), then save the soup as `method`."""
    scorer = greedy_scorer(ev, lambda c: store.get(paths[c.name]))
    _save_greedy(ctx, ev, method, methods.greedy_soup(cands, scorer, ctx.cfg["soups"]), scorer, out)


def greedy_per_fold(cfg: dict, data_path: str, folds_path: str, fold: int, model_paths: list[str], metrics_paths: list[str],
                    out_greedy: str, out_uniform: str) -> dict:
    """Alg. 1 over the grid's models of one fold (plain val acc on that fold), and their uniform soup."""
    from foldsoup.soups.average import average

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths)
    store = ctx.ingredients(paths.values())
    _greedy_and_save(ctx, ev, f"greedy_fold{fold}", cands, paths, out_greedy, store)
    uniform = average(store.get(paths[c.name]) for c in cands)  # resident: not read again
    accs = ev.fold_accs(uniform, {fold})
    _save_soup(ctx, ev, out_uniform, uniform, soup_record(f"uniform_fold{fold}", [c.name for c in cands], accs,
                                                            cfg["soups"]["cross_fold_val"], ev.counts_of(accs)))
    return log_cost(store, ev)


def uniform_all(cfg: dict, data_path: str, folds_path: str, model_paths: list[str], metrics_paths: list[str], out: str) -> dict:
    """Uniform soup of every model of the grid and every fold (streamed from disk)."""
    from foldsoup.soups.average import average

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths)
    store = ctx.ingredients(paths.values(), keep=False)
    state = average(store.stream(paths[c.name]) for c in cands)  # each used once: none kept
    accs = ev.fold_accs(state, range(ctx.k))
    _save_soup(ctx, ev, out, state, soup_record("uniform_soup", [c.name for c in cands], accs, cfg["soups"]["cross_fold_val"],
                                                ev.counts_of(accs)))
    return log_cost(store, ev)


def greedy_all(cfg: dict, data_path: str, folds_path: str, model_paths: list[str], metrics_paths: list[str], out: str,
               on_holdout: bool = False) -> dict:
    """Greedy soup over all models of all folds, scored by MinAcc (or AvgAcc) over the included
    folds, or (`on_holdout`, method greedy_soup_holdout) by accuracy on the outer holdout."""
    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    if on_holdout and not ev.has_holdout:
        raise DataError(f"{folds_path}: has no outer holdout (set folds.holdout_fraction > 0 and rerun `folds`)")
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths, on_holdout)
    store = ctx.ingredients(paths.values())
    _greedy_and_save(ctx, ev, "greedy_soup_holdout" if on_holdout else "greedy_soup", cands, paths, out, store)
    return log_cost(store, ev)


def gsgs(cfg: dict, data_path: str, folds_path: str, fold_soup_paths: list[str], out: str) -> dict:
    """GSGS (`soups.methods.gsgs`): Alg. 1 over the per-fold greedy soups, each soup one
    ingredient (its averaged weights), scored across folds."""
    import json

    ctx = Context(cfg, data_path, folds_path)
    scores, paths = {}, {}
    for path in fold_soup_paths:
        with open(Path(path).with_suffix(".json")) as f:
            rec = json.load(f)
        if len(rec["folds"]) != 1:
            raise SoupError(f"{path}: a per-fold greedy soup spans folds {rec['folds']}; GSGS takes one soup per fold")
        (fold,) = rec["folds"]
        scores[fold], paths[f"greedy_fold{fold}"] = record_val(rec), path  # exact, from its counts
    ev = ctx.evaluator()
    store = ctx.ingredients(paths.values())
    scorer = greedy_scorer(ev, lambda c: store.get(paths[c.name]))  # a candidate is named as its soup
    _save_greedy(ctx, ev, "gsgs", methods.gsgs(scores, scorer, cfg["soups"]), scorer, out)
    return log_cost(store, ev)
