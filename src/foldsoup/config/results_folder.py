"""One results folder holds one run: the data and the model it was made with.

Two runs of different data or models in one folder would trample each other: the second
deletes the first's prepared data and leaves files of the first (e.g. `best_on_holdout.*`)
beside its own soups. The first real run records what it is in `<results>/run.json`; a later
run of other data or another model into the same folder is refused at parse time, before any
job, naming both. Edits that keep the data and the model (the grid, epochs, a preset overlay
such as presets/smoke.yaml) are the same run: Snakemake reruns what they change.

No torch here: the Snakefile imports this at parse time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from foldsoup.errors import ConfigError
from foldsoup.storage.weights import atomic_write_json

RECORD = "run.json"


def run_identity(cfg: dict) -> dict:
    """What makes two runs different runs: the dataset (and where it lives) and the model."""
    data, model = cfg["data"], cfg["model"]
    identity = {"data": data["name"], "model": model["name"]}
    if data["name"] == "csv":  # the manifest (data.root is not read)
        identity["data_root"] = os.path.abspath(data["manifest"])
    elif data["name"] != "digits":  # digits ships with scikit-learn: no root
        identity["data_root"] = os.path.abspath(data["root"])
    if model["name"] in ("open_clip", "timm"):
        identity["arch"] = model["arch"]
    return identity


def _describe(identity: dict) -> str:
    data = identity["data"] + (f" ({identity['data_root']})" if identity.get("data_root") else "")
    model = identity["model"] + (f" {identity['arch']}" if identity.get("arch") else "")
    return f"{data} with {model}"


def check(cfg: dict) -> None:
    """ConfigError when `results` holds a run of other data or another model."""
    path = Path(cfg["results"]) / RECORD
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
        recorded_text = _describe(recorded)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"results: {str(path)!r} is not a run record written by foldsoup; delete it (the folder's run "
                          f"is then recorded anew) or choose another results folder") from None
    if recorded != run_identity(cfg):
        raise ConfigError(
            f"results: {cfg['results']!r} holds a run of {recorded_text} ({path}); this configuration is a run of "
            f"{_describe(run_identity(cfg))}. Give it its own folder (`results:` in your config file, or "
            f"--config results=<folder>), or delete {cfg['results']!r} to start over there")


def path_problem(results: str) -> str | None:
    """`results` that cannot be a folder: empty, an existing file, or below a file."""
    if not results.strip():
        return "results: '' is empty; allowed: a folder path"
    path = Path(results)
    if path.exists():
        return None if path.is_dir() else f"results: {results!r} exists and is not a folder; allowed: a folder (existing or new)"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"results: {results!r} cannot be created, because {str(parent)!r} is a file; allowed: a folder path"
            return None
    return None


def record(cfg: dict) -> None:
    """Write `<results>/run.json` unless it is there (a real run is starting)."""
    path = Path(cfg["results"]) / RECORD
    if path.exists():
        return
    atomic_write_json(path, run_identity(cfg))
