"""The last lines of a run on the console (the Snakefile's `onsuccess` and `onerror`): where the
summary is, the model to ship, and the warnings that matter, which otherwise stay in the jobs'
logs and in summary.md."""

from __future__ import annotations

import os
from pathlib import Path

from foldsoup.report.ship import console_lines

SHOWN = 4  # model names per warning line; the rest are counted


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def warning_lines(models_csv: str | os.PathLike) -> list[str]:
    """One line per kind of model that went wrong (analysis.reliability.flagged_models); none
    without tables/models.csv (the run stopped before it)."""
    if not Path(models_csv).is_file():
        return []
    import pandas as pd

    from foldsoup.analysis.reliability import flagged_models

    models = pd.read_csv(models_csv)
    flagged, n = flagged_models(models), len(models)
    kinds = [
        (flagged.diverged, n, "fine-tunes diverged and are left out of every soup"),
        (flagged.at_chance, n, "models are at chance (they learned nothing, yet stay in the soups)"),
        (flagged.started_far, n, "fine-tunes started far from their linear probe (first-epoch loss; finetune.batchnorm, grid.lr)"),
        (flagged.below_probe, flagged.with_probe, "fine-tunes end below their linear probe's val accuracy"),
    ]
    lines = [f"{len(names)} of {of} {what}: {_names(names)}" for names, of, what in kinds if names]
    return [f"foldsoup: warning: {line}; see {models_csv} and the fine-tune logs" for line in lines]


def end_of_run(results: str | os.PathLike, configured_ship: str, failed: bool = False) -> list[str]:
    """After a run: where summary.md is and the model to ship (or, after a failure, what to do)
    and the warnings of the models trained so far."""
    results = Path(results)
    warnings = warning_lines(results / "tables" / "models.csv")
    if failed:
        return [f"foldsoup: the run stopped: a job failed (its rule and log are named above, 'Error in rule ...'); "
                f"finished jobs are kept, and the same command resumes after the fix (docs/reruns-and-crashes.md)",
                *warnings]
    return console_lines(results / "ship" / "ship.json", results / "summary.md", configured_ship) + warnings
