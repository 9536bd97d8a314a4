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
# Per-class counts (space-separated in a cell), which balanced accuracy is read from exactly.
CLASS_COUNT_COLUMNS = tuple(f"{split}_class_{what}" for split in ("val", "holdout", "test") for what in ("correct", "total"))


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
        row.update({key: m.get(key) for key in ("val_bacc", "test_bacc")})
        # Empty for metrics written before the chance test existed.
        row.update(at_chance=m.get("at_chance"), chance_ceiling=m.get("chance_ceiling"))
        # The first-step guard (training.loop.started_far) and the LP the fine-tune started from.
        row.update({key: m.get(key) for key in ("lp_val_acc", "lp_step_loss", "first_step_loss", "first_epoch_loss", "started_far")})
        row.update({f"acc_fold{i}": a for i, a in m["fold_accs"].items()})
        row.update({f"bacc_fold{i}": a for i, a in m.get("fold_baccs", {}).items()})
        if m.get("holdout_acc") is not None:
            row.update(holdout_acc=m["holdout_acc"], holdout_bacc=m.get("holdout_bacc"))
        # The counts every selection compares (select.score_of); absent in metrics from before them.
        row.update({key: m[key] for key in COUNT_COLUMNS if m.get(key) is not None})
        row.update({key: select.int_cell(m[key]) for key in CLASS_COUNT_COLUMNS if m.get(key) is not None})
        rows.append(row)  # no timings: two identical runs give the same file (they are in metrics.json)
    table = pd.DataFrame(rows)
    for key in COUNT_COLUMNS:
        if key in table:
            table[key] = table[key].astype("Int64")  # integers, never rounded by the float format
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{len(table)} models, val acc {table.val_acc.min():.4f}..{table.val_acc.max():.4f}"
        + (f", val balanced acc {table.val_bacc.min():.4f}..{table.val_bacc.max():.4f}" if table.val_bacc.notna().any() else ""))
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
                counts: dict[int, select.ClassCounts] | None = None, **extra) -> dict:
    """A soup's (or an ensemble's) record. With `counts` (fold -> per-class counts) every score
    is derived from them, for every metric (`val_acc`, `val_bacc`: MinAcc/AvgAcc over the folds,
    `fold_accs`, `fold_baccs`), and they are kept (`fold_class_counts`, `fold_counts` and, where
    the score is one fold's, the `val_*` counts), so readers compare exact values."""
    from foldsoup.soups.select import METRICS, as_float, cross_fold_score, score_fields

    folds = fold_accs if counts is None else counts
    metric = "holdout" if set(folds) == {HOLDOUT} else cross_fold if len(folds) > 1 else "own"
    record = {"method": method, "ingredients": ingredients, "n_ingredients": len(ingredients),
              "folds": sorted(int(i) for i in folds), "val_metric": metric}
    if counts is None:
        record.update(fold_accs={str(i): float(a) for i, a in fold_accs.items()},
                      val_acc=as_float(cross_fold_score(fold_accs, cross_fold)))
        return {**record, **extra}
    for name, suffix in METRICS.items():
        scores = {int(i): c.score(name) for i, c in counts.items()}
        record[f"fold_{suffix}s"] = {str(i): float(a) for i, a in scores.items()}
        record[f"val_{suffix}"] = as_float(cross_fold_score(scores, cross_fold))
    record["fold_counts"] = {str(i): [sum(c.correct), c.images] for i, c in counts.items()}
    record["fold_class_counts"] = {str(i): c.as_record() for i, c in counts.items()}
    if len(counts) == 1:
        (only,) = counts.values()
        record.update({k: v for k, v in score_fields("val", only).items() if not k.endswith(tuple(METRICS.values()))})
    return {**record, **extra}


def record_val(rec: dict, metric: str = "accuracy"):
    """A soup record's val score under `metric`, exact from its per-class counts (MinAcc or
    AvgAcc as recorded); records from before the counts: their float."""
    from foldsoup.soups.select import METRICS, ClassCounts, cross_fold_score, fold_acc

    how = "avg" if rec["val_metric"] == "avg" else "min"
    if "fold_class_counts" in rec:
        scores = {int(i): ClassCounts.from_record(c).score(metric) for i, c in rec["fold_class_counts"].items()}
        return cross_fold_score(scores, how)
    if metric == "accuracy" and "fold_counts" in rec:
        return cross_fold_score({int(i): fold_acc(*c) for i, c in rec["fold_counts"].items()}, how)
    return float(rec[f"val_{METRICS[metric]}"])


def predictions_path(weights_path: str | Path) -> Path:
    """soups/gsgs.safetensors -> soups/gsgs.predictions.safetensors (test logits, for bootstraps)."""
    return Path(weights_path).with_suffix(".predictions.safetensors")


def _save_soup(ctx: Context, ev, out_weights: str, state, record: dict) -> None:
    """Weights, test logits and the record; test (and holdout) accuracy is measured here, after
    every decision."""
    from foldsoup.soups.evaluation import class_counts
    from foldsoup.soups.select import score_fields

    test_logits = ev.test_logits(state)
    record.update(score_fields("test", class_counts(test_logits, ev.test_labels, ev.num_classes)))
    record.update(score_fields("holdout", ev.holdout_count(state)))
    record["metric"] = ev.metric  # the score every selection behind this soup compared
    save_weights(out_weights, state, ctx.metadata(kind="soup", method=record["method"], ingredients=record["ingredients"]))
    save_weights(predictions_path(out_weights), {"test_logits": test_logits}, {"method": record["method"]})
    atomic_write_json(Path(out_weights).with_suffix(".json"), record)
    suffix = select.METRICS[ev.metric]
    log(f"{record['method']}: {record['n_ingredients']} ingredient(s), val {select.METRIC_LABELS[ev.metric]} "
        f"({record['val_metric']}) {record['val_' + suffix]:.4f}, test {record['test_' + suffix]:.4f}")


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
    from foldsoup.soups.select import METRICS, avg_acc, min_acc
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
        counts = ev.counts_of(ev.fold_accs(soup, subset))
        holdout, test = ev.holdout_count(soup), ev.test_count(soup)
        row = {"hp": hp, "folds": format_folds(subset), "n": len(subset), "sampled": subsets_sampled(k, cap)}
        for metric, suffix in METRICS.items():
            accs = {i: c.score(metric) for i, c in counts.items()}
            row.update({f"avg_{suffix}": float(avg_acc(accs)), f"min_{suffix}": float(min_acc(accs)),
                        # None (an empty cell) without an outer holdout
                        f"holdout_{suffix}": None if holdout is None else float(holdout.score(metric)),
                        f"test_{suffix}": float(test.score(metric)), **{f"{suffix}_fold{i}": float(a) for i, a in accs.items()}})
        rows.append(row)
    columns = ["hp", "folds", "n", "sampled"] + [
        name for suffix in METRICS.values()
        for name in (f"avg_{suffix}", f"min_{suffix}", f"holdout_{suffix}", f"test_{suffix}", *(f"{suffix}_fold{i}" for i in range(k)))]
    table = pd.DataFrame(rows, columns=columns)  # the header even when every model diverged
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{hp}: {len(rows)} uniform soups evaluated")
    return log_cost(store, ev)


def _candidates(metrics: list[dict], paths: list[str], metric: str = "accuracy", on_holdout: bool = False):
    """Single models as greedy candidates scored by `metric` (soups.methods.candidates: diverged
    ones left out, in the given order), with each one's weight file by name."""
    models = [methods.ModelResult.from_record(m, metric=metric) for m in metrics]
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
    """Alg. 1 over the grid's models of one fold (their score on that fold), and their uniform soup."""
    from foldsoup.soups.average import average

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths, ev.metric)
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
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths, ev.metric)
    store = ctx.ingredients(paths.values(), keep=False)
    state = average(store.stream(paths[c.name]) for c in cands)  # each used once: none kept
    accs = ev.fold_accs(state, range(ctx.k))
    _save_soup(ctx, ev, out, state, soup_record("uniform_soup", [c.name for c in cands], accs, cfg["soups"]["cross_fold_val"],
                                                ev.counts_of(accs)))
    return log_cost(store, ev)


def greedy_all(cfg: dict, data_path: str, folds_path: str, model_paths: list[str], metrics_paths: list[str], out: str,
               on_holdout: bool = False) -> dict:
    """Greedy soup over all models of all folds, scored by MinAcc (or AvgAcc) over the included
    folds, or (`on_holdout`, method greedy_soup_holdout) by the score on the outer holdout."""
    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    if on_holdout and not ev.has_holdout:
        raise DataError(f"{folds_path}: has no outer holdout (set folds.holdout_fraction > 0 and rerun `folds`)")
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths, ev.metric, on_holdout)
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
        scores[fold], paths[f"greedy_fold{fold}"] = record_val(rec, ctx.metric), path  # exact, from its counts
    ev = ctx.evaluator()
    store = ctx.ingredients(paths.values())
    scorer = greedy_scorer(ev, lambda c: store.get(paths[c.name]))  # a candidate is named as its soup
    _save_greedy(ctx, ev, "gsgs", methods.gsgs(scores, scorer, cfg["soups"]), scorer, out)
    return log_cost(store, ev)
