"""Your own data as it really comes (issue 20, points 1, 2 and 5's sources): `data.name: csv`, a
manifest CSV with a row per image (path, label, patient, optionally split and fold), and
group-aware splits everywhere: no patient in two folds, or in the pool and the test set or the
outer holdout, for a manifest's group column and for imagefolder's data.group_pattern. Bad
manifests are refused before any job with one line naming the file, the row and the column.

Images are tiny PNGs written here, one colour per class (R) and per group (G), so the prepared
pixels tell which row each image came from. Three unbalanced classes, 2-4 images per patient.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldsoup import steps
from foldsoup.config.job import job_config
from foldsoup.config.results_folder import run_identity
from foldsoup.config.schema import validate
from foldsoup.config.yaml_files import deep_update, load_yaml_files
from foldsoup.data.folds import HOLDOUT, LARGE_GROUP_SHARE, make_folds, read_folds, write_folds
from foldsoup.data.prepared import load_prepared, prepare, source_paths
from foldsoup.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
# Patients per class (unbalanced, as in clinics): nevus common, melanoma and bcc rare.
PATIENTS = {"nevus": 12, "melanoma": 7, "bcc": 6}
CLASSES = sorted(PATIENTS)  # the labels found, sorted: bcc, melanoma, nevus
COLUMNS = {"image": "image_id", "label": "dx", "group": "patient", "split": "split", "fold": "fold"}
MODEL = {"name": "timm", "arch": "mobilenetv3_small_100", "pretrained": "lamb_in1k"}


def _rows(split: bool = True, fold: bool = False) -> list[dict[str, str]]:
    """A row per image: patient p of each class has 2 + p % 3 views. With `split`: each class's
    last patient is test, its second-last val, the rest train. With `fold`: fold = p % 3."""
    rows = []
    for name, n in PATIENTS.items():
        for p in range(n):
            for v in range(2 + p % 3):
                row = {"image_id": f"images/{name}_{p}_{v}.png", "dx": name, "patient": f"{name[:3]}{p:02d}"}
                if split:
                    row["split"] = "test" if p == n - 1 else "val" if p == n - 2 else "train"
                if fold:
                    row["fold"] = "" if row.get("split") == "test" else str(p % 3)
                rows.append(row)
    return rows


def _pixel(row: dict[str, str]) -> tuple[int, int, int]:
    name, p, v = Path(row["image_id"]).stem.split("_")
    return 40 + 60 * CLASSES.index(name), 10 * int(p), 30 * int(v)


def write_manifest(folder: Path, rows: list[dict[str, str]], images: bool = True, delimiter: str = ",") -> Path:
    """manifest.csv in `folder` and (images) a 6x5 PNG per row, filled with the row's colour."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for row in rows:
            Image.new("RGB", (6, 5), _pixel(row)).save(folder / row["image_id"])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (folder / "manifest.csv").write_text(out.getvalue())
    return folder / "manifest.csv"


def config(manifest: Path, k: int = 3, holdout: float = 0.0, **data) -> dict:
    cfg = {"data": {"name": "csv", "manifest": str(manifest), "columns": COLUMNS, "image_size": 4, **data},
           "model": MODEL, "folds": {"k": k, "holdout_fraction": holdout}}
    return cfg


def problems_of(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return [line.removeprefix("  - ") for line in str(info.value).splitlines()[1:]]


def _groups_apart(*parts: list[str]) -> bool:
    sets = [set(p) for p in parts]
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])


@pytest.fixture(scope="module")
def split_manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("split"), _rows(split=True))


@pytest.fixture(scope="module")
def plain_manifest(tmp_path_factory) -> Path:
    """No split column: the test set comes from data.test_fraction."""
    return write_manifest(tmp_path_factory.mktemp("plain"), _rows(split=False))


# ---------------------------------------------------------------- the prepared dataset


def test_prepared_pool_and_test_of_a_manifest_with_a_split_column(split_manifest):
    cfg = validate(config(split_manifest))
    data = prepare(cfg["data"], cfg["seed"])
    rows = _rows()
    pool = [r for r in rows if r["split"] != "test"]
    test = [r for r in rows if r["split"] == "test"]
    assert data.name == "csv" and data.classes == CLASSES
    assert len(data.pool_labels) == len(pool) == 64 and len(data.test_labels) == len(test) == 10
    assert data.pool_labels.tolist() == [CLASSES.index(r["dx"]) for r in pool]  # val rows join the pool, in CSV order
    assert data.pool_images.shape == (64, 3, 4, 4) and data.pool_images.dtype == np.uint8
    # Each image is its row's (the colour), stored at image_size: nothing mixed up by the split.
    assert [tuple(img[:, 0, 0]) for img in data.test_images] == [_pixel(r) for r in test]
    assert data.pool_sources == [r["image_id"] for r in pool] and data.test_groups == [r["patient"] for r in test]
    assert _groups_apart(data.pool_groups, data.test_groups)
    # Class names given: their order is the label order.
    named = prepare(validate(config(split_manifest, class_names=["nevus", "melanoma", "bcc"]))["data"], 0)
    assert named.classes == ["nevus", "melanoma", "bcc"] and named.pool_labels[0] == 0
    assert source_paths(cfg["data"]) == [str(split_manifest)]  # editing the CSV reruns `prepare`


def test_test_fraction_split_is_group_disjoint_and_seeded(plain_manifest, tmp_path):
    cfg = validate(config(plain_manifest, test_fraction=0.25))
    data = prepare(cfg["data"], seed=0)
    assert len(data.pool_labels) + len(data.test_labels) == 74
    assert _groups_apart(data.pool_groups, data.test_groups)
    assert 0.15 < len(data.test_labels) / 74 < 0.35  # a quarter of the patients, about a quarter of the images
    assert set(data.test_labels.tolist()) == {0, 1, 2}  # stratified: every class in the test set
    assert prepare(cfg["data"], seed=0).test_sources == data.test_sources
    assert prepare(cfg["data"], seed=1).test_sources != data.test_sources
    # The same manifest with ';' as delimiter (European spreadsheets) reads the same.
    semicolon = write_manifest(tmp_path, _rows(split=False), images=False, delimiter=";")
    for row in _rows(split=False):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / row["image_id"]).write_bytes((plain_manifest.parent / row["image_id"]).read_bytes())
    again = prepare(validate(config(semicolon, test_fraction=0.25))["data"], seed=0)
    assert again.test_sources == data.test_sources


# ---------------------------------------------------------------- group-disjoint folds and holdout


def test_folds_and_holdout_are_group_disjoint_and_stratified(plain_manifest):
    data = prepare(validate(config(plain_manifest, test_fraction=0.2))["data"], seed=0)
    groups = np.array(data.pool_groups)
    fold_of = make_folds(data.pool_labels, 3, seed=0, classes=data.classes, holdout_fraction=0.2, groups=data.pool_groups)
    parts = [groups[fold_of == f].tolist() for f in (HOLDOUT, 0, 1, 2)]
    assert all(parts) and _groups_apart(*parts, data.test_groups)
    for f in range(3):
        assert set(data.pool_labels[fold_of == f].tolist()) == {0, 1, 2}  # stratified: every class in every fold
    assert np.array_equal(fold_of, make_folds(data.pool_labels, 3, 0, data.classes, 0.2, data.pool_groups))
    # Plain stratified folds of the same images put patients in two folds: what this prevents.
    plain = make_folds(data.pool_labels, 3, seed=0, classes=data.classes)
    assert not _groups_apart(*[groups[plain == f].tolist() for f in range(3)])


def test_a_class_with_fewer_groups_than_k_is_refused_naming_it(split_manifest, plain_manifest):
    # Parse time: bcc has 5 train/val patients.
    (problem,) = problems_of(config(split_manifest, k=6))
    assert problem == (f"data.manifest {str(split_manifest)!r}, column 'dx': class 'bcc' has 5 group(s) (column 'patient') "
                       f"in the training pool, fewer than folds.k = 6; every fold needs one of every class, allowed: k <= 5")
    # The folds job: exactly, after the test split.
    data = prepare(validate(config(plain_manifest, k=3, test_fraction=0.3))["data"], seed=0)
    n = len(set(g for g, y in zip(data.pool_groups, data.pool_labels) if data.classes[y] == "bcc"))
    assert n < 6
    with pytest.raises(DataError, match=re.escape(f"folds.k = 6 is larger than the number of groups of class 'bcc': {n} "
                                                  f"group(s); no group may be in two folds")):
        make_folds(data.pool_labels, 6, 0, data.classes, groups=data.pool_groups)


def test_the_users_fold_column_is_used_as_given(tmp_path):
    manifest = write_manifest(tmp_path / "data", _rows(split=True, fold=True))
    cfg = validate(config(manifest, k=3))
    out = tmp_path / "results"
    steps.prepare(cfg, str(out / "dataset.safetensors"))
    steps.folds(cfg, str(out / "dataset.safetensors"), str(out / "folds.csv"))
    expected = [int(r["fold"]) for r in _rows(split=True, fold=True) if r["split"] != "test"]
    assert read_folds(out / "folds.csv").tolist() == expected
    (problem,) = problems_of(config(manifest, k=3, holdout=0.2))
    assert problem.startswith("folds.holdout_fraction: 0.2 with the folds of data.manifest ")


# ---------------------------------------------------------------- bad manifests: one line each


def _edit(rows: list[dict], line: int, **values) -> list[dict]:
    """The rows with row `line` of the CSV (the header is line 1) changed."""
    rows = [dict(r) for r in rows]
    rows[line - 2].update(values)
    return rows


FIRST_TEST = next(i for i, r in enumerate(_rows()) if r["split"] == "test") + 2  # its line in the CSV
BAD = {
    # case: (rows, extra data keys, line, column, what the line says after "column '...': ")
    "missing image": (lambda: _edit(_rows(), 3, image_id="images/nope.png"), {}, 3, "image_id",
                      "image file '{folder}/images/nope.png' does not exist (1 of 74 image(s) missing; relative paths "
                      "are read from the CSV's folder '{folder}')"),
    "empty label": (lambda: _edit(_rows(), 4, dx=""), {}, 4, "dx", "empty label; every row needs its label"),
    "label not in class_names": (lambda: _edit(_rows(), 5, dx="naevus"), {"class_names": ["bcc", "melanoma", "nevus"]}, 5,
                                 "dx", "label 'naevus' is not in data.class_names (allowed: 'bcc', 'melanoma', 'nevus')"),
    "empty group": (lambda: _edit(_rows(), 6, patient=""), {}, 6, "patient", "empty group; every row needs its group"),
    "unknown split": (lambda: _edit(_rows(), 7, split="training"), {}, 7, "split",
                      "split 'training' is not a split; allowed: train, val, test (val rows join the training pool)"),
    "patient in train and test": (lambda: _edit(_rows(), FIRST_TEST, patient="nev00"), {}, FIRST_TEST, "patient",
                                  "group 'nev00' is in a test row and in train row 2 ('images/nevus_0_0.png'); no group "
                                  "may be in the training pool and the test set"),
    "fold outside 0..k-1": (lambda: _edit(_rows(fold=True), 8, fold="3"), {}, 8, "fold",
                            "fold '3' is not a fold number; allowed: 0..2 (folds.k = 3)"),
    "fold of only some rows": (lambda: _edit(_rows(fold=True), 9, fold=""), {}, 9, "fold",
                               "empty fold, while 63 of 64 train/val rows have one; give every train/val row its fold, or "
                               "none (folds computed)"),
    "patient in two folds": (lambda: _edit(_rows(fold=True), 3, fold="1"), {}, 3, "fold",
                             "group 'nev00' is in fold 1 here and in fold 0 on line 2; no group may be in two folds"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_manifest_is_one_line_naming_file_row_and_column(tmp_path, case):
    make_rows, keys, line, column, message = BAD[case]
    write_manifest(tmp_path, _rows())  # every image is there
    rows = make_rows()
    manifest = write_manifest(tmp_path, rows, images=False)
    folder = str(tmp_path)
    image = rows[line - 2]["image_id"]
    expected = (f"data.manifest {str(manifest)!r} line {line} (image {image!r}), column {column!r}: "
                + message.format(folder=folder))
    assert problems_of(config(manifest, **keys)) == [expected]  # at parse time, before any job
    if "folds.k" not in message:  # `prepare` checks the same rows again (the k is the `folds` job's)
        with pytest.raises(DataError) as info:
            prepare(validate(config(manifest, **keys), check_paths=False)["data"], 0)
        assert str(info.value) == expected


def test_file_and_header_problems_name_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    assert problems_of(config(missing)) == [f"data.manifest {str(missing)!r} does not exist; allowed: a CSV file with a "
                                            f"row per image (image path, label, ...)"]
    manifest = write_manifest(tmp_path, _rows())
    assert problems_of(config(manifest, columns={**COLUMNS, "group": "PatientID"})) == [
        f"data.manifest {str(manifest)!r} line 1, column 'PatientID': not in the header (data.columns.group), which has 'image_id', 'dx', "
        f"'patient', 'split'; set data.columns.group to the column holding the groups (or null: none)"]
    assert problems_of({**config(manifest), "data": {"name": "csv", "image_size": 4}}) == [
        "data.manifest: null; with data.name 'csv' allowed: the path of a CSV file with a row per image (columns image, "
        "label and optionally group, split, fold; data.columns renames them)"]


# ---------------------------------------------------------------- folds.csv and the folds job


def test_the_folds_job_writes_group_and_source_and_warns_of_a_large_group(tmp_path, capsys):
    rows = _rows(split=True)
    rows += [{"image_id": f"images/nevus_20_{v}.png", "dx": "nevus", "patient": "big", "split": "train"} for v in range(12)]
    manifest = write_manifest(tmp_path / "data", rows)
    cfg = validate(config(manifest, k=3))
    out = tmp_path / "results"
    steps.prepare(cfg, str(out / "dataset.safetensors"))
    steps.folds(cfg, str(out / "dataset.safetensors"), str(out / "folds.csv"))
    table = list(csv.DictReader((out / "folds.csv").open()))
    assert list(table[0]) == ["index", "label", "fold", "group", "source"]
    pool = [r for r in rows if r["split"] != "test"]
    assert [(t["group"], t["source"]) for t in table] == [(r["patient"], r["image_id"]) for r in pool]
    folds_of_group: dict[str, set] = {}
    for t in table:
        folds_of_group.setdefault(t["group"], set()).add(t["fold"])
    assert all(len(f) == 1 for f in folds_of_group.values())  # no patient in two folds
    log = capsys.readouterr().err
    assert "3 stratified folds (group-disjoint) of sizes" in log
    assert re.search(r"fold 0: \d+ images of \d+ groups \(largest group '\w+'", log), log
    big_fold = next(t["fold"] for t in table if t["group"] == "big")
    n_fold = sum(t["fold"] == big_fold for t in table)
    assert 12 / n_fold > LARGE_GROUP_SHARE
    assert re.search(rf"\] WARNING fold {big_fold}: group 'big' holds {12 / n_fold:.0%} of its images \(12 of {n_fold}, "
                     rf"above 25%\)", log), log
    # The prepared file keeps groups and sources for every later job.
    data = load_prepared(out / "dataset.safetensors")
    assert data.pool_sources == [r["image_id"] for r in pool] and data.test_groups == [r["patient"] for r in rows
                                                                                       if r["split"] == "test"]


def test_read_folds_reads_old_and_new_fold_tables(tmp_path):
    labels, fold_of = np.array([0, 1, 0, 1]), np.array([0, 1, 1, HOLDOUT])
    old = tmp_path / "old.csv"
    old.write_text("index,label,fold\n0,0,0\n1,1,1\n2,0,1\n3,1,-1\n")  # a run made before groups existed
    assert read_folds(old, labels).tolist() == fold_of.tolist()
    new = tmp_path / "new.csv"
    write_folds(new, labels, fold_of, ["p1", "p2", "p3", "p4"], ["a.png", "b, c.png", 'd"e.png', "f.png"])
    assert new.read_text().splitlines()[:3] == ["index,label,fold,group,source", "0,0,0,p1,a.png", '1,1,1,p2,"b, c.png"']
    assert read_folds(new, labels).tolist() == fold_of.tolist()


# ---------------------------------------------------------------- imagefolder: groups from the file name


def test_imagefolder_group_pattern_gives_group_disjoint_splits(tmp_path):
    from PIL import Image

    root = tmp_path / "scans"
    for name, n in PATIENTS.items():
        (root / name).mkdir(parents=True)
        for p in range(n):
            for v in range(2 + p % 3):
                Image.new("RGB", (5, 5), (p, v, 0)).save(root / name / f"P{name[:2]}{p:02d}_view{v}.png")
    base = {"data": {"name": "imagefolder", "root": str(root), "image_size": 4, "test_fraction": 0.25,
                     "group_pattern": r"^(?P<group>P\w\w\d+)_"}, "model": MODEL, "folds": {"k": 3, "holdout_fraction": 0.2}}
    cfg = validate(base)
    data = prepare(cfg["data"], 0)
    assert all(source.startswith(f"{data.classes[y]}/{group}_view") for source, group, y in
               zip(data.pool_sources + data.test_sources, data.pool_groups + data.test_groups,
                   [*data.pool_labels, *data.test_labels]))
    fold_of = make_folds(data.pool_labels, 3, 0, data.classes, 0.2, data.pool_groups)
    groups = np.array(data.pool_groups)
    assert _groups_apart(*[groups[fold_of == f].tolist() for f in (HOLDOUT, 0, 1, 2)], data.test_groups)
    assert "group_pattern" in job_config(cfg, "prepare")["data"]  # the pattern reruns prepare, and so folds
    assert "group_pattern" not in job_config(validate({**base, "data": {**base["data"], "group_pattern": None}}),
                                             "prepare")["data"]  # runs made before the key keep their prepare job
    assert problems_of(deep_update(base, {"data": {"group_pattern": "^P"}})) == [
        "data.group_pattern: '^P' has no group; allowed: a regular expression whose first group (or named group `group`) "
        "is the image's group, e.g. '^(P\\d+)_' for P012_view2.png"]
    other = r"^(X\d+)_"
    with pytest.raises(DataError, match=re.escape(f"{root}/bcc/Pbc00_view0.png: data.group_pattern {other!r} finds no "
                                                  f"group in 'Pbc00_view0.png' (the image's path inside its class folder)")):
        prepare(validate(deep_update(base, {"data": {"group_pattern": other}}))["data"], 0)


# ---------------------------------------------------------------- the configuration and the workflow


def test_job_config_and_run_identity_of_a_manifest_run(split_manifest):
    cfg = validate(config(split_manifest))
    prep = job_config(cfg, "prepare")["data"]
    assert prep["manifest"] == str(split_manifest) and prep["columns"] == COLUMNS and "root" not in prep
    assert run_identity(cfg)["data_root"] == os.path.abspath(split_manifest)
    preset = validate(deep_update(load_yaml_files(REPO / "config.yaml", REPO / "presets" / "manifest-cpu.yaml"),
                                  {"data": {"manifest": str(split_manifest), "columns": COLUMNS}}))
    assert preset["data"]["name"] == "csv" and preset["device"] == "cpu" and preset["model"]["name"] == "timm"
    clip = validate(deep_update(load_yaml_files(REPO / "config.yaml", REPO / "presets" / "manifest-clip.yaml"),
                                {"data": {"manifest": str(split_manifest), "columns": COLUMNS}}))
    assert (clip["model"]["arch"], clip["model"]["pretrained"], clip["model"]["quick_gelu"]) == ("ViT-B-32", "openai", True)
    assert clip["data"]["name"] == "csv" and clip["finetune"]["precision"] == "bf16" and clip["folds"]["k"] == 5


@pytest.mark.slow
def test_workflow_dry_run_of_the_manifest_preset(split_manifest, tmp_path):
    from conftest import snakemake

    overlay = tmp_path / "my_data.yaml"
    overlay.write_text(json.dumps({"results": str(tmp_path / "results"), "data": {"manifest": str(split_manifest),
                                                                                  "columns": COLUMNS}}))
    run = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "presets" / "manifest-cpu.yaml"), str(overlay))
    assert run.returncode == 0, run.tail()
    assert {r: run.stats[r] for r in ("prepare", "folds", "pretrain", "lp", "finetune", "greedy_fold")} == {
        "prepare": 1, "folds": 1, "pretrain": 1, "lp": 5, "finetune": 90, "greedy_fold": 5}
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"results": str(tmp_path / "results"), "data": {"manifest": str(split_manifest)}}))
    refused = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "presets" / "manifest-cpu.yaml"), str(bad))
    assert refused.returncode != 0 and "line 1, column 'image': not in the header" in refused.output, refused.tail()


def test_the_summary_counts_groups_per_fold_and_warns_of_a_large_one():
    from foldsoup.report.summary import groups_section

    folds = pd.DataFrame({"fold": [0, 0, 0, 0, 0, 1, 1, 1, 1, -1],
                          "group": ["p1", "p1", "p1", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]})
    text = groups_section(folds)
    assert "| 0 | 5 | 2 | p1 (4, 80%) |" in text and "| 1 | 4 | 4 | p3 (1, 25%) |" in text
    assert text.index("| 1 |") < text.index("| outer holdout | 1 | 1 |")
    assert "in fold(s) 0 (p1: 80%), outer holdout (p7: 100%) one group holds more than 25%" in text
    assert groups_section(folds.assign(group=None)) == "" and groups_section(None) == ""


def test_image_glob_finds_ham10000_style_images(tmp_path):
    """HAM10000's metadata names each image by image_id, without folder or extension, and the
    images lie in two part folders: data.image_glob finds each row's one file; a pattern that
    matches none or two files is refused naming the row, and the key outside csv or without
    {image} is refused by the config check."""
    from PIL import Image

    rows = [{"image_id": f"ISIC_{i:07d}", "dx": r["dx"], "patient": r["patient"], "split": r["split"]}
            for i, r in enumerate(_rows(split=True))]
    for i, row in enumerate(rows):
        part = tmp_path / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        Image.new("RGB", (6, 5), (40 + 60 * CLASSES.index(row["dx"]), 0, 0)).save(part / f"{row['image_id']}.jpg")
    manifest = write_manifest(tmp_path, rows, images=False)
    cfg = validate(config(manifest, image_glob="HAM10000_images_part_?/{image}.jpg"))
    data = prepare(cfg["data"], cfg["seed"])
    assert len(data.pool_labels) + len(data.test_labels) == len(rows)
    assert data.pool_sources + data.test_sources == [r["image_id"] for r in rows if r["split"] != "test"] + [
        r["image_id"] for r in rows if r["split"] == "test"]  # each image's source, as the CSV names it
    assert [int(img[0, 0, 0]) for img in data.test_images] == [40 + 60 * CLASSES.index(r["dx"]) for r in rows
                                                                if r["split"] == "test"]
    with pytest.raises(ConfigError, match=r"line 2 \(image 'ISIC_0000000'\), column 'image_id': image file .*ISIC_0000000"
                                          r"\.png' does not exist \(74 of 74 image\(s\) missing; no file matches data.image_glob"):
        validate(config(manifest, image_glob="{image}.png"))
    (tmp_path / "HAM10000_images_part_2" / f"{rows[0]['image_id']}.jpg").write_bytes(b"")  # now in both parts
    with pytest.raises(ConfigError, match=r"line 2 \(image 'ISIC_0000000'\), column 'image_id': 2 files match "
                                          r"data.image_glob for 'ISIC_0000000'"):
        validate(config(manifest, image_glob="HAM10000_images_part_?/{image}.jpg"))
    assert any("data.image_glob: 'x.jpg' has no {image}" in p for p in problems_of(config(manifest, image_glob="x.jpg")))
    digits = {"data": {"name": "digits", "image_glob": "{image}.jpg"}, "model": {"name": "digits_cnn"}}
    assert any(p.startswith("data.image_glob: only for data.name 'csv'") for p in problems_of(digits))
    assert job_config(cfg, "prepare")["data"]["image_glob"] == "HAM10000_images_part_?/{image}.jpg"  # reruns prepare


def test_a_fold_without_a_class_is_warned_of_in_the_folds_log_and_the_summary():
    """A class with fewer groups than k is refused before any job; with enough groups a fold can
    still miss a class (unequal group sizes, or the user's own fold column): its val score then
    says nothing about that class, and the folds job's log and the summary say so."""
    from foldsoup.data.folds import fold_summary, missing_classes
    from foldsoup.report.summary import groups_section

    labels = np.array([0, 1, 2, 1, 2, 2, 0, 2])
    fold_of = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert missing_classes(labels, fold_of, 3) == {1: [0], 2: [1]}
    lines = fold_summary(fold_of, [f"p{i}" for i in range(8)], labels, ["bcc", "melanoma", "nevus"])
    assert "WARNING fold 1: no image of class(es) 'bcc' (too few groups of them to reach every fold)" in lines[-2]
    assert lines[-1].startswith("WARNING fold 2: no image of class(es) 'melanoma'")
    folds = pd.DataFrame({"label": labels, "fold": fold_of, "group": [f"p{i}" for i in range(8)]})
    text = groups_section(folds, ["bcc", "melanoma", "nevus"])
    assert "**Warning**: some folds have no image of a class (fold 1: bcc; fold 2: melanoma)" in text
    assert "no image of a class" not in groups_section(folds.assign(fold=[0, 0, 0, 1, 1, 1, 1, 0]), ["a", "b", "c"])
