"""Models trained outside foldsoup (`models_from`): a CSV with a row per checkpoint, its val fold
and a label for its training configuration, which takes the place of a grid point (its `hp`
name in every table and the folder models/<config>/fold<i>/ its import job writes).

Columns: checkpoint (a weights file, relative to the CSV's folder or absolute), fold (its val
fold, 0..folds.k-1, the folds of the data's own fold column) and config (a safe name,
[A-Za-z0-9._-]+). Every config needs a checkpoint for every fold, as a grid point has a
fine-tune of every fold. Read with the csv module only (the configuration check runs it at parse
time, before any job); every problem is one line naming the file, the row and the column.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from foldsoup.config import manifest
from foldsoup.errors import DataError
from foldsoup.storage.files import CHECKPOINT_SUFFIXES

COLUMNS = ("checkpoint", "fold", "config")
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
NEEDS_FOLDS = ("models_from: the checkpoints' folds must be the data's own: data.name 'csv' with a fold column "
               "(data.columns.fold: each train/val image's fold 0..k-1, the fold it was validated on)")


@dataclass(frozen=True)
class Entry:
    line: int  # 1-based line of the CSV
    checkpoint: str  # as written in the CSV
    path: Path  # the file: relative to the CSV's folder, or absolute
    fold: int
    config: str


@dataclass
class ModelsFrom:
    path: Path
    entries: list[Entry]
    configs: list[str] = field(default_factory=list)  # in order of first appearance: the "grid order"

    def checkpoint(self, config: str, fold: int) -> Path:
        return next(e.path for e in self.entries if e.config == config and e.fold == fold)


def _at(path: Path, entry: Entry | None = None, column: str | None = None, line: int | None = None) -> str:
    return manifest.place("models_from", path, entry.line if entry is not None else line,
                          f"checkpoint {entry.checkpoint!r}" if entry is not None and entry.checkpoint else "", column)


def _rows(path: Path) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    return manifest.csv_rows(path, _at, "a header checkpoint,fold,config and a row per checkpoint")


def read_models_from(csv_path: str | os.PathLike, k: int) -> ModelsFrom:
    """The checked checkpoint list: every row's file present with a weights suffix, its fold in
    0..k-1, its config a safe name, no (config, fold) twice, every fold and every config's k
    folds covered. Raises DataError naming the file, the row and the column."""
    path = Path(csv_path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"{_at(path)} {what}; allowed: a CSV file with a row per checkpoint (columns checkpoint, fold, "
                        f"config)")
    header_line, header, body = _rows(path)
    for name in COLUMNS:
        if name not in header:
            raise DataError(f"{_at(path, line=header_line, column=name)}: not in the header, which has "
                            f"{', '.join(map(repr, header))}; models_from needs the columns checkpoint, fold and config")
    index = {name: header.index(name) for name in COLUMNS}
    entries: list[Entry] = []
    seen: dict[tuple[str, int], Entry] = {}
    files: dict[str, Entry] = {}
    for line, fields in body:
        if len(fields) != len(header):
            raise DataError(f"{_at(path, line=line)}: {len(fields)} field(s), the header has {len(header)}; every row "
                            f"needs one value per column (quote values holding the delimiter)")
        value = {name: fields[index[name]] for name in COLUMNS}
        entry = Entry(line, value["checkpoint"], Path(), -1, value["config"])
        for name in COLUMNS:
            if value[name] == "":
                raise DataError(f"{_at(path, entry, name)}: empty {name}; every row needs its checkpoint file, its val "
                                f"fold and its config label")
        if not SAFE_NAME.fullmatch(value["config"]):
            raise DataError(f"{_at(path, entry, 'config')}: config {value['config']!r} is not a safe name; allowed: "
                            f"letters, digits, '.', '_' and '-' (it names the folder models/<config>/ and the hp column)")
        try:
            fold = float(value["fold"])
        except ValueError:
            fold = -1.0
        if not fold.is_integer() or not 0 <= fold < k:
            raise DataError(f"{_at(path, entry, 'fold')}: fold {value['fold']!r} is not a fold of this run; allowed: "
                            f"0..{k - 1} (folds.k = {k}, the folds of the data's fold column)")
        file = Path(value["checkpoint"])
        file = file if file.is_absolute() else path.parent / file
        entry = Entry(line, value["checkpoint"], file, int(fold), value["config"])
        if not file.name.endswith(CHECKPOINT_SUFFIXES):
            raise DataError(f"{_at(path, entry, 'checkpoint')}: {file.name!r} is not a weights file name; allowed "
                            f"suffixes: {', '.join(CHECKPOINT_SUFFIXES)} (safetensors, or a torch file read with "
                            f"weights_only=True)")
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "does not exist"
            raise DataError(f"{_at(path, entry, 'checkpoint')}: checkpoint file {str(file)!r} {what} (relative paths are "
                            f"read from the CSV's folder {str(path.parent)!r})")
        key = (entry.config, entry.fold)
        if key in seen:
            raise DataError(f"{_at(path, entry, 'fold')}: config {entry.config!r} fold {entry.fold} again (line "
                            f"{seen[key].line} has it); every (config, fold) has one checkpoint")
        same = files.get(os.path.normpath(file))
        if same is not None:
            raise DataError(f"{_at(path, entry, 'checkpoint')}: the same file as line {same.line}; each checkpoint is one "
                            f"model, validated on one fold")
        seen[key], files[os.path.normpath(file)] = entry, entry
        entries.append(entry)
    if not entries:
        raise DataError(f"{_at(path)}: a header but no rows; expected a row per checkpoint")
    empty = sorted(set(range(k)) - {e.fold for e in entries})
    if empty:
        raise DataError(f"{_at(path, column='fold')}: fold {empty[0]} has no checkpoint; folds.k = {k} needs checkpoints "
                        f"of every fold 0..{k - 1} (set folds.k to the number of your folds)")
    configs = list(dict.fromkeys(e.config for e in entries))
    for config in configs:
        lacking = sorted(set(range(k)) - {e.fold for e in entries if e.config == config})
        if lacking:
            first = next(e for e in entries if e.config == config)
            raise DataError(f"{_at(path, first, 'config')}: config {config!r} has no checkpoint of fold(s) "
                            f"{', '.join(map(str, lacking))}; every config needs all k = {k} folds, as a grid point does "
                            f"(its per-fold soups and Tables 1-2 take one model per fold)")
    return ModelsFrom(path, entries, configs)


def problems(cfg: dict, check_paths: bool = True) -> list[str]:
    """models_from against the rest of the configuration (the data must give the folds), and with
    `check_paths` the CSV and its checkpoints (read_models_from), one line each."""
    csv_path, data = cfg.get("models_from"), cfg["data"]
    if csv_path is None:
        return []
    if data["name"] != "csv":
        return [f"{NEEDS_FOLDS}; data.name is {data['name']!r}, allowed: 'csv' (data.manifest with a fold column)"]
    if not check_paths:
        return []
    out = []
    try:
        read_models_from(csv_path, cfg["folds"]["k"])
    except DataError as exc:
        out.append(str(exc))
    try:
        m = manifest.read_manifest(data, cfg["folds"]["k"], cfg["folds"]["holdout_fraction"])
    except DataError:
        return out  # the manifest's problem is said by the data check (config.data_checks.manifest_problem)
    if m.columns["fold"] is None:
        column = manifest.columns_of(data)["fold"]
        if column is None:
            out.append(f"{NEEDS_FOLDS}; data.columns.fold is null: set it to the column of data.manifest holding each "
                       f"image's fold")
        else:
            have = "is empty" if column in _header(m.path) else "is not in its header"
            out.append(f"{NEEDS_FOLDS}; data.manifest {str(m.path)!r}: its fold column {column!r} {have}; give every "
                       f"train/val row its fold, or set data.columns.fold to the column holding it")
    return out


def _header(path: Path) -> list[str]:
    try:
        return _rows(path)[1]
    except DataError:
        return []
