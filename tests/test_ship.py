"""The run names the model to ship (issue 19.6): `soups.ship`, set before the run, is copied to
results/ship/model.safetensors with ship.json saying what its estimates are worth; the end of the
run says so on the console; `foldsoup evaluate` gives exact fractions and a soup's folds.

No training: per-fold soups are the configured model's random backbone with a nearest-centroid
head per fold (as in test_gsgs.py), and GSGS over them is the workflow's own step."""

from __future__ import annotations

import json
import os
import re

import pytest

torch = pytest.importorskip("torch")

from foldsoup import cli, steps  # noqa: E402
from foldsoup.data.folds import HOLDOUT  # noqa: E402
from foldsoup.errors import SoupError  # noqa: E402
from foldsoup.report.ship import UNFAIR, console_lines  # noqa: E402
from foldsoup.steps.context import Context  # noqa: E402
from foldsoup.steps.methods import link_selection  # noqa: E402
from foldsoup.steps.soups import soup_record  # noqa: E402
from foldsoup.storage.weights import load_weights, save_weights  # noqa: E402

try:
    from tiny_runs import TinyRun  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepared digits with an outer holdout, k = 3, one per-fold soup per fold (with the record
    and metadata `greedy_fold` writes), GSGS over them, and bgss as the link `methods` writes."""
    from foldsoup.training.loop import extract_features

    r = TinyRun(tmp_path_factory.mktemp("ship") / "results", {
        "seed": 0, "device": "cpu",
        "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4], "test_fraction": 0.5, "max_pool": 150},
        "model": {"name": "digits_cnn", "width": 8},
        "folds": {"k": K, "holdout_fraction": 0.2},
        "finetune": {"eval_batch_size": 16},
        "grid": {"lr": [0.001], "aug": ["minimal"], "mixup": [False]},
    })
    steps.prepare(r.cfg, r.data)
    steps.folds(r.cfg, r.data, r.folds)
    ctx = Context(r.cfg, r.data, r.folds)
    ev, model = ctx.evaluator(), ctx.model()
    features = extract_features(model, ctx.tensor(ctx.data.pool_images), ctx.spec, 64, "fp32")
    labels, fold_of = torch.from_numpy(ctx.data.pool_labels), torch.from_numpy(ctx.fold_of)
    g = torch.Generator().manual_seed(1)
    soups = r.root / "soups"
    for fold in range(K):
        train = (fold_of != fold) & (fold_of != HOLDOUT)
        centroids = torch.stack([features[train & (labels == c)].mean(0) for c in range(ctx.data.num_classes)])
        state = {**model.state_dict(), "head.bias": -(centroids**2).sum(1) / 2,
                 "head.weight": centroids + 0.2 * centroids.std() * torch.randn(centroids.shape, generator=g)}
        name = f"greedy_fold{fold}"
        record = soup_record(name, [f"{r.hps[0]}/fold{fold}"], ev.fold_accs(state, [fold]), "min",
                             test_acc=ev.test_acc(state), holdout_acc=ev.holdout_acc(state))
        save_weights(soups / f"{name}.safetensors", state, ctx.metadata(kind="soup", method=name,
                                                                       ingredients=record["ingredients"]))
        (soups / f"{name}.json").write_text(json.dumps(record))
    steps.gsgs(r.cfg, r.data, r.folds, [str(soups / f"greedy_fold{i}.safetensors") for i in range(K)],
               str(soups / "gsgs.safetensors"))
    link_selection(soups / "greedy_fold1.safetensors", soups / "bgss.safetensors")
    record = json.loads((soups / "greedy_fold1.json").read_text())
    (soups / "bgss.json").write_text(json.dumps({**record, "method": "bgss", "selected": "greedy_fold1"}))
    return r


def _ship(r, method: str, tmp_path):
    out, record = tmp_path / "ship" / "model.safetensors", tmp_path / "ship" / "ship.json"
    cfg = {**r.cfg, "soups": {**r.cfg["soups"], "ship": method}}
    steps.ship(cfg, str(r.root / "soups" / f"{method}.safetensors"), str(out), str(record))
    return out, json.loads(record.read_text())


def test_the_default_ship_is_gsgs_copied_with_its_estimates(run, tmp_path):
    assert run.cfg["soups"]["ship"] == "gsgs"
    out, ship = _ship(run, "gsgs", tmp_path)
    soup = run.root / "soups" / "gsgs.safetensors"
    assert out.read_bytes() == soup.read_bytes() and not out.is_symlink()
    ours, theirs = load_weights(out)[0], load_weights(soup)[0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    record = json.loads(soup.with_suffix(".json").read_text())
    folds = sorted(int(name.removeprefix("greedy_fold")) for name in record["ingredients"])
    assert len(folds) > 1 and record["val_metric"] == "min"  # this seed: a soup spanning folds
    assert ship["method"] == "gsgs" and ship["file"] == str(out) and ship["copy_of"] == str(soup)
    assert ship["ingredient_folds"] == folds and ship["val_folds"] == folds
    assert (ship["val_acc"], ship["test_acc"], ship["holdout_acc"]) == (record["val_acc"], record["test_acc"],
                                                                        record["holdout_acc"])
    assert ship["val_estimate"].startswith(f"MinAcc over folds {', '.join(map(str, folds))}")
    assert "optimistic" in ship["val_estimate"] and "unbiased" in ship["holdout_estimate"]
    assert ship["note"] == UNFAIR and "not a fair selection" in UNFAIR
    import hashlib

    assert ship["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_a_selection_ships_the_file_it_links_to(run, tmp_path):
    out, ship = _ship(run, "bgss", tmp_path)
    assert (run.root / "soups" / "bgss.safetensors").is_symlink()
    assert not out.is_symlink() and out.read_bytes() == (run.root / "soups" / "greedy_fold1.safetensors").read_bytes()
    assert ship["selected"] == "greedy_fold1" and ship["val_metric"] == "own" and ship["ingredient_folds"] == [1]
    assert ship["val_estimate"].startswith("val accuracy on fold 1, which none of its ingredients trained on")


def test_a_record_of_another_method_is_refused(run, tmp_path):
    cfg = {**run.cfg, "soups": {**run.cfg["soups"], "ship": "greedy_soup"}}
    with pytest.raises(SoupError, match=re.escape("its record is of method 'gsgs', soups.ship is 'greedy_soup'")):
        steps.ship(cfg, str(run.root / "soups" / "gsgs.safetensors"), str(tmp_path / "m.safetensors"),
                   str(tmp_path / "ship.json"))


def test_the_end_of_the_run_names_the_model_to_ship(run, tmp_path):
    out, ship = _ship(run, "gsgs", tmp_path)
    record = tmp_path / "ship" / "ship.json"
    lines = console_lines(record, "results/summary.md", "gsgs")
    text = "\n".join(lines)
    assert lines[0] == "foldsoup: summary: results/summary.md"
    assert f"the model to ship: {out} (gsgs, set before the run by soups.ship" in text
    assert f"val {100 * ship['val_acc']:.2f}% (MinAcc over folds" in text
    assert f"test {100 * ship['test_acc']:.2f}%" in text and "not a fair selection" in text
    # Another method configured, or a record newer than the ship (a run to another target): not the answer.
    assert "is not up to date (soups.ship: bgss)" in console_lines(record, "s.md", "bgss")[1]
    soup_json = run.root / "soups" / "gsgs.json"
    later = record.stat().st_mtime + 10
    os.utime(soup_json, (later, later))
    assert "is not up to date" in console_lines(record, "s.md", "gsgs")[1]
    assert console_lines(tmp_path / "none.json", "s.md", "gsgs") == ["foldsoup: summary: s.md"]


def test_evaluate_prints_exact_fractions_and_the_soups_folds(run, capsys):
    soup = run.root / "soups" / "gsgs.safetensors"
    assert cli.main(["evaluate", str(soup), "--data", run.data, "--folds", run.folds, "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    correct, total = map(int, out["test_acc_exact"].split("/"))
    assert total == out["test_images"] and out["test_acc"] == correct / total
    record = json.loads(soup.with_suffix(".json").read_text())
    assert out["test_acc"] == pytest.approx(record["test_acc"], abs=1e-6)  # the record's float32 mean
    for i in range(K):
        c, n = map(int, out[f"val_acc_fold{i}_exact"].split("/"))
        assert out[f"val_acc_fold{i}"] == c / n
    assert "holdout_acc_exact" in out
    folds = sorted(int(name.removeprefix("greedy_fold")) for name in record["ingredients"])
    assert (out["kind"], out["method"], out["ingredient_folds"]) == ("soup", "gsgs", folds)
    assert out["trained_on_folds"] == list(range(K))  # ingredients of two folds or more: every fold was trained on
    assert "no fold is clean" in out["folds_note"]
    one = run.root / "soups" / "greedy_fold1.safetensors"
    assert cli.main(["evaluate", str(one), "--data", run.data, "--folds", run.folds, "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ingredient_folds"] == [1] and out["trained_on_folds"] == [0, 2] and "clean for fold 1" in out["folds_note"]


def test_the_end_of_run_handler_imports_neither_torch_nor_pandas():
    """The Snakefile's onsuccess handler runs in the Snakemake process: no 2+ s import there."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, foldsoup.report.ship; "
            "assert not {'torch', 'pandas'} & set(sys.modules), sorted({'torch', 'pandas'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
