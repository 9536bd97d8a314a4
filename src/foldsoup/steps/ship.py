"""Step `ship`: the model the run ships (`soups.ship`) at a stable path, results/ship/model.safetensors,
with ship.json saying what it is and what its estimates are worth. No torch: a copy and a record."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from foldsoup.errors import SoupError
from foldsoup.steps.context import log
from foldsoup.storage.weights import atomic_path, atomic_write_json


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ship(cfg: dict, weights: str, out: str, out_record: str) -> dict:
    """Copy `weights` (soups/<soups.ship>.safetensors, or the file a selection links to) to `out`
    and write `out_record`. A copy, not a link: a symbolic link dies with the soups folder, and a
    hard link shares the soup's modification time, which Snakemake reads as the output's (older
    than its inputs, so the job would rerun every time)."""
    from foldsoup.report.ship import ship_record

    method = cfg["soups"]["ship"]
    with open(Path(weights).with_suffix(".json")) as f:
        record = json.load(f)
    if record["method"] != method:
        raise SoupError(f"{weights}: its record is of method {record['method']!r}, soups.ship is {method!r}; give "
                        f"soups/{method}.safetensors")
    with atomic_path(out) as tmp:
        shutil.copyfile(Path(weights).resolve(), tmp)
    shipped = ship_record(method, record, str(out), str(weights), sha256(out))
    atomic_write_json(out_record, shipped)
    log(f"{method}: {weights} copied to {out}; val ({record['val_metric']}) {record['val_acc']:.4f}, "
        f"test {record['test_acc']:.4f}; {out_record} says what each is worth")
    return shipped
