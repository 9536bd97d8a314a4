"""The model to ship: what results/ship/ship.json says, and the one statement summary.md and the
end of the run make of it.

The method is chosen before the run (`soups.ship`), so the shipped file's test accuracy is a fair
estimate; taking the method with the best test accuracy afterwards would be a selection on the
test set. Each validation estimate says what it is worth: MinAcc/AvgAcc span folds whose images
trained the other folds' ingredients (optimistic); an own-fold val accuracy is clean of training
but was the basis of the choice; the outer holdout was seen by no model.

No torch, no pandas: the Snakefile's `onsuccess` handler reads ship.json with this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from foldsoup.data.folds import HOLDOUT
from foldsoup.report.formats import fmt_pct
from foldsoup.soups.select import METRIC_LABELS, METRICS

UNFAIR = ("choosing among the other rows of tables/methods.csv by their test accuracy is not a fair selection: it "
          "makes the test set a validation set, and the chosen row's test accuracy is then optimistic")


def _folds_text(folds) -> str:
    folds = list(folds)
    return ("fold " if len(folds) == 1 else "folds ") + ", ".join(str(f) for f in folds)


def val_estimate(record: dict, ingredient_folds: list[int]) -> str:
    """What the record's val accuracy is, and what it is worth."""
    metric, folds = record["val_metric"], [f for f in record["folds"] if f != HOLDOUT]
    if metric == "holdout":
        return ("accuracy on the outer holdout, which no model trained on; the choice was made on these images, "
                "so it is slightly optimistic")
    if metric == "own":
        return (f"val accuracy on {_folds_text(folds)}, which none of its ingredients trained on; the choice among "
                f"candidates was made on these images, so it is somewhat optimistic")
    name = {"min": "MinAcc", "avg": "AvgAcc"}[metric]
    return (f"{name} over {_folds_text(folds)}, the folds its ingredients were validated on: each of these folds' "
            f"images trained the ingredients of the others, so the soup has seen them and the estimate is optimistic")


HOLDOUT_ESTIMATE = "no model trained on it and no choice was made on it: unbiased"
TEST_ESTIMATE = "the test set took part in no choice and soups.ship was set before the run: a fair estimate"


def ship_record(method: str, record: dict, file: str, copy_of: str, sha256: str) -> dict:
    """ship.json: the shipped file, what it is, and its estimates with what each is worth."""
    from foldsoup.soups.methods import ingredient_folds

    folds = ingredient_folds(record["ingredients"])
    metric = record.get("metric", "accuracy")  # the score its selection compared (soups.metric)
    suffix = METRICS[metric]
    out = {
        "method": method, "file": file, "copy_of": copy_of,
        **({"selected": record["selected"]} if "selected" in record else {}),
        "sha256": sha256, "chosen_by": "soups.ship (set before the run)",
        "ingredients": record["ingredients"], "n_ingredients": record["n_ingredients"], "ingredient_folds": folds,
        "metric": metric, "val_acc": record[f"val_{suffix}"], "val_metric": record["val_metric"], "val_folds": record["folds"],
        "val_estimate": val_estimate(record, folds),
    }
    if record.get(f"holdout_{suffix}") is not None and record["val_metric"] != "holdout":
        out.update(holdout_acc=record[f"holdout_{suffix}"], holdout_estimate=HOLDOUT_ESTIMATE)
    # val_acc, holdout_acc, test_acc: scores under `metric` (accuracy by default)
    return {**out, "test_acc": record[f"test_{suffix}"], "test_estimate": TEST_ESTIMATE, "note": UNFAIR}


def _what(ship: dict) -> str:
    selected = f", the chosen {ship['selected']}" if ship.get("selected") else ""
    return f"{ship['method']}, set before the run by soups.ship; a copy of {ship['copy_of']}{selected}"


def statement(ship: dict) -> str:
    """The paragraph at the top of summary.md."""
    holdout = (f" Outer holdout: {fmt_pct(ship['holdout_acc'])} ({ship['holdout_estimate']})."
               if ship.get("holdout_acc") is not None else "")
    return (f"**The model to ship: `{ship['file']}`** ({_what(ship)}). Validation estimate: {fmt_pct(ship['val_acc'])}, "
            f"{ship['val_estimate']}.{holdout} Test {METRIC_LABELS[ship.get('metric', 'accuracy')]}: {fmt_pct(ship['test_acc'])} ({ship['test_estimate']}). "
            f"The other methods below are for comparison: {UNFAIR}.\n")


def console_lines(ship_json: str | os.PathLike, summary: str | os.PathLike, configured: str) -> list[str]:
    """The end of a successful run: where summary.md is and the model to ship. A ship.json older
    than the record it was made from (a run to another target) or of another method is named as
    not up to date, not shown as the answer."""
    ship_json, lines = Path(ship_json), [f"foldsoup: summary: {summary}"]
    if not ship_json.is_file():
        return lines
    ship = json.loads(ship_json.read_text())
    record = Path(ship["copy_of"]).with_suffix(".json")
    if ship["method"] != configured or (record.is_file() and record.stat().st_mtime > ship_json.stat().st_mtime):
        return lines + [f"foldsoup: {ship_json} is not up to date (soups.ship: {configured}); run the workflow to its "
                        f"end to ship the current {configured}"]
    lines += [f"foldsoup: the model to ship: {ship['file']} ({_what(ship)})",
              f"foldsoup:   val {fmt_pct(ship['val_acc'])} ({ship['val_estimate']})"]
    if ship.get("holdout_acc") is not None:
        lines.append(f"foldsoup:   holdout {fmt_pct(ship['holdout_acc'])} ({ship['holdout_estimate']})")
    return lines + [f"foldsoup:   test {fmt_pct(ship['test_acc'])} ({ship['test_estimate']})",
                    f"foldsoup:   {UNFAIR}; details: {ship_json}"]
