"""The manifest dataset (`data.name: csv`) as far as it is known without decoding an image: one
CSV, a row per image, with the image's path (relative to the CSV's folder, or absolute), its
label and optionally its group (patient, subject, lesion), split (train / val / test) and fold
(the user's own 0..k-1). Column names come from data.columns.

Read with the csv module only (no numpy, torch or scikit-learn): the configuration check runs it
at parse time, before any job, and `prepare` again before decoding the images. Every problem is
one line naming the file, the row (its line number in the CSV, and its image) and the column.
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from foldsoup.errors import DataError

DEFAULT_COLUMNS = {"image": "image", "label": "label", "group": "group", "split": "split", "fold": "fold"}
REQUIRED = ("image", "label")
SPLITS = ("train", "val", "test")  # val rows join the pool: the k folds replace a fixed validation split
DELIMITERS = (",", ";", "\t")
NO_MANIFEST = ("data.manifest: null; with data.name 'csv' allowed: the path of a CSV file with a row per image "
               "(columns image, label and optionally group, split, fold; data.columns renames them)")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the CSV
    image: str  # as written in the CSV: the image's source in the prepared dataset and folds.csv
    path: Path  # the file: relative to the CSV's folder, or absolute
    label: str
    group: str | None
    split: str | None
    fold: int | None

    @property
    def pool(self) -> bool:
        return self.split != "test"


@dataclass
class Manifest:
    path: Path
    rows: list[Row]
    classes: list[str]
    columns: dict[str, str | None]  # the CSV's column of each role; None: not in this manifest


def columns_of(data: dict) -> dict[str, str | None]:
    return {**DEFAULT_COLUMNS, **(data.get("columns") or {})}


def place(key: str, path: Path, line: int | None = None, item: str = "", column: str | None = None) -> str:
    """Where in a CSV a problem is: "<key> '<file>' line 3 (<item>), column 'x'"."""
    return (f"{key} {str(path)!r}" + (f" line {line}" if line is not None else "") + (f" ({item})" if item else "")
            + (f", column {column!r}" if column else ""))


def _at(path: Path, row: Row | None = None, column: str | None = None, line: int | None = None) -> str:
    return place("data.manifest", path, row.line if row is not None else line,
                 f"image {row.image!r}" if row is not None and row.image else "", column)


def _classes(labels: list[str]) -> list[str]:
    """Sorted label names; numerically when every one is an integer ("2" before "10")."""
    unique = set(labels)
    if all(v.lstrip("-").isdigit() for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def csv_rows(path: Path, at, empty_hint: str) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    """(header line, header, [(line, fields)]) of a CSV, blank rows skipped; delimiter , ; or tab
    (the one the header uses most). `at(path, line=..., column=...)` names a place in the file in
    messages; `empty_hint` says what an empty file should hold. The manifest and models_from
    read their files with it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{at(path)}: not UTF-8 text ({exc}); save it as a UTF-8 CSV") from exc
    except OSError as exc:
        raise DataError(f"{at(path)}: cannot be read ({exc})") from exc
    first = text.split("\n", 1)[0]
    delimiter = max(DELIMITERS, key=first.count)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    rows = []
    try:
        for fields in reader:
            if any(v.strip() for v in fields):
                rows.append((reader.line_num, [v.strip() for v in fields]))
    except csv.Error as exc:
        raise DataError(f"{at(path, line=reader.line_num)}: not a CSV row ({exc})") from exc
    if not rows:
        raise DataError(f"{at(path)}: empty file; expected {empty_hint}")
    (line, header), body = rows[0], rows[1:]
    seen = [name for i, name in enumerate(header) if name in header[:i]]
    if seen:
        raise DataError(f"{at(path, line=line, column=seen[0])}: in the header twice; every column needs its own name")
    return line, header, body


def _pick_columns(path: Path, line: int, header: list[str], wanted: dict[str, str | None]) -> dict[str, str | None]:
    """The CSV column of each role: required ones must be there; an optional one is used when the
    CSV has it (a name set in data.columns that the header lacks is an error, a default one not)."""
    columns: dict[str, str | None] = {}
    for role, name in wanted.items():
        if name is not None and name not in header and (role in REQUIRED or name != DEFAULT_COLUMNS[role]):
            raise DataError(f"{_at(path, line=line, column=name)}: not in the header (data.columns.{role}), which has "
                            f"{', '.join(map(repr, header))}; set data.columns.{role} to the column holding the "
                            f"{'image paths' if role == 'image' else role + 's'}"
                            + (" (or null: none)" if role not in REQUIRED else ""))
        columns[role] = name if name in header else None
    return columns


def _fold(path: Path, row: Row, column: str, text: str, k: int | None) -> int | None:
    """The fold of a row: an integer 0..k-1 ("2.0" too: pandas writes a column with empty cells so)."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value.is_integer() or value < 0 or (k is not None and value >= k):
        allowed = f"0..{k - 1} (folds.k = {k})" if k is not None else "an integer >= 0"
        raise DataError(f"{_at(path, row, column)}: fold {text!r} is not a fold number; allowed: {allowed}")
    return int(value)


def read_manifest(data: dict, k: int | None = None, holdout_fraction: float = 0.0) -> Manifest:
    """The checked manifest of `data` (a data section with data.name csv). With `k` (folds.k),
    the fold column's values are checked against it, and the groups of every class against k."""
    if not data.get("manifest"):
        raise DataError(NO_MANIFEST)
    path = Path(data["manifest"])
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"{_at(path)} {what}; allowed: a CSV file with a row per image (image path, label, ...)")
    header_line, header, body = csv_rows(path, _at, "a header (e.g. image,label,group) and a row per image")
    columns = _pick_columns(path, header_line, header, columns_of(data))
    index = {name: header.index(name) for name in columns.values() if name is not None}
    class_names = data.get("class_names")
    rows, by_path, missing = [], {}, []
    for line, fields in body:
        if len(fields) != len(header):
            raise DataError(f"{_at(path, line=line)}: {len(fields)} field(s), the header has {len(header)}; every row "
                            f"needs one value per column (quote values holding the delimiter)")
        value = {role: fields[index[name]] if name is not None else None for role, name in columns.items()}
        row = Row(line, value["image"], Path(), "", None, None, None)
        for role in ("image", "label", "group"):
            if value[role] == "":
                raise DataError(f"{_at(path, row, columns[role])}: empty {role}; every row needs "
                                + ("the path of its image" if role == "image" else f"its {role}"))
        if class_names is not None and value["label"] not in class_names:
            raise DataError(f"{_at(path, row, columns['label'])}: label {value['label']!r} is not in data.class_names "
                            f"(allowed: {', '.join(map(repr, class_names))})")
        split = value["split"]
        if split is not None:
            split = split.lower()
            if split not in SPLITS:
                raise DataError(f"{_at(path, row, columns['split'])}: split {value['split']!r} is not a split; allowed: "
                                f"{', '.join(SPLITS)} (val rows join the training pool)")
        fold = _fold(path, row, columns["fold"], value["fold"], k) if columns["fold"] else None
        if fold is not None and split == "test":
            raise DataError(f"{_at(path, row, columns['fold'])}: a test row with fold {fold}; test rows are in no fold, "
                            f"leave their fold empty")
        file = _image_file(path, row, columns["image"], data.get("image_glob"))
        row = Row(line, value["image"], file, value["label"], value["group"], split, fold)
        key = os.path.normpath(file)
        if key in by_path:
            raise DataError(f"{_at(path, row, columns['image'])}: the same image as line {by_path[key].line}; every image "
                            f"may have one row only")
        by_path[key] = row
        if not file.is_file():
            missing.append(row)
        rows.append(row)
    if not rows:
        raise DataError(f"{_at(path)}: a header but no rows; expected a row per image")
    if missing:
        row = missing[0]
        what = "is a folder" if row.path.is_dir() else "does not exist"
        where = (f"no file matches data.image_glob {data['image_glob']!r}" if data.get("image_glob") else
                 f"relative paths are read from the CSV's folder {str(path.parent)!r}")
        raise DataError(f"{_at(path, row, columns['image'])}: image file {str(row.path)!r} {what} ({len(missing)} of "
                        f"{len(rows)} image(s) missing; {where})")
    manifest = Manifest(path, rows, class_names or _classes([r.label for r in rows]), columns)
    _check_splits(manifest)
    _check_folds(manifest, k, holdout_fraction)
    return manifest


def _image_file(path: Path, row: Row, column: str, image_glob: str | None) -> Path:
    """The image file of `row`: its image value as a path (relative to the CSV's folder), or with
    data.image_glob the one file its pattern matches (none: the pattern as the missing path)."""
    if image_glob is None:
        file = Path(row.image)
        return file if file.is_absolute() else path.parent / file
    pattern = os.path.join(path.parent, image_glob.replace("{image}", glob.escape(row.image)))
    matches = sorted(glob.glob(pattern))
    if len(matches) > 1:
        raise DataError(f"{_at(path, row, column)}: {len(matches)} files match data.image_glob for {row.image!r} "
                        f"({matches[0]!r}, {matches[1]!r}{', ...' if len(matches) > 2 else ''}); allowed: a pattern "
                        f"that matches one file per row")
    return Path(matches[0]) if matches else Path(pattern)


def _check_splits(m: Manifest) -> None:
    pool = [r for r in m.rows if r.pool]
    if m.columns["split"] is not None and len(pool) == len(m.rows):
        raise DataError(f"{_at(m.path, column=m.columns['split'])}: no row has split 'test'; mark the test rows, or set "
                        f"data.columns.split: null to split the test set off by data.test_fraction")
    for name in m.classes:
        if not any(r.label == name for r in pool):
            raise DataError(f"{_at(m.path, column=m.columns['label'])}: class {name!r} has no train/val row; every class "
                            f"needs images in the training pool")
    if m.columns["group"] is not None and m.columns["split"] is not None:
        pool_rows: dict[str | None, Row] = {}
        for row in pool:
            pool_rows.setdefault(row.group, row)
        for row in m.rows:
            if not row.pool and row.group in pool_rows:
                other = pool_rows[row.group]
                raise DataError(f"{_at(m.path, row, m.columns['group'])}: group {row.group!r} is in a test row and in "
                                f"{other.split} row {other.line} ({other.image!r}); no group may be in the training pool "
                                f"and the test set")


def _check_folds(m: Manifest, k: int | None, holdout_fraction: float) -> None:
    pool = [r for r in m.rows if r.pool]
    column = m.columns["fold"]
    if column is not None:
        given = [r for r in pool if r.fold is not None]
        if not given:
            m.columns["fold"] = None  # an empty fold column: the folds are computed
        elif len(given) < len(pool):
            row = next(r for r in pool if r.fold is None)
            raise DataError(f"{_at(m.path, row, column)}: empty fold, while {len(given)} of {len(pool)} train/val rows "
                            f"have one; give every train/val row its fold, or none (folds computed)")
    if m.columns["fold"] is not None:
        if m.columns["split"] is None:
            raise DataError(f"{_at(m.path, column=column)}: a fold column needs a split column (data.columns.split) "
                            f"marking the test rows; the folds are used as given")
        if holdout_fraction > 0:
            raise DataError(f"folds.holdout_fraction: {holdout_fraction} with the folds of {_at(m.path, column=column)}; "
                            f"they are used as given, allowed: 0 (or data.columns.fold: null to compute the folds)")
        fold_of_group: dict[str, Row] = {}
        for row in pool:
            first = fold_of_group.setdefault(row.group, row) if row.group is not None else row
            if first.fold != row.fold:
                raise DataError(f"{_at(m.path, row, column)}: group {row.group!r} is in fold {row.fold} here and in fold "
                                f"{first.fold} on line {first.line}; no group may be in two folds")
        if k is not None:
            empty = sorted(set(range(k)) - {r.fold for r in pool})
            if empty:
                raise DataError(f"{_at(m.path, column=column)}: fold {empty[0]} has no rows; folds.k = {k} needs at least "
                                f"one image in every fold 0..{k - 1}")
    elif k is not None:
        rows = pool if m.columns["split"] is not None else m.rows  # without a split column: an upper bound
        for name in m.classes:
            units = {r.group if r.group is not None else r.line for r in rows if r.label == name}
            if len(units) < k:
                what = f"group(s) (column {m.columns['group']!r})" if m.columns["group"] else "image(s)"
                raise DataError(f"{_at(m.path, column=m.columns['label'])}: class {name!r} has {len(units)} {what} in the "
                                f"training pool, fewer than folds.k = {k}; every fold needs one of every class, allowed: "
                                f"k <= {len(units)}")
