"""The workflow as users run it: dry-run job counts, lint, logs and benchmarks, a tiny real run
of the smoke preset, and one failed fine-tune (the default profile keeps going) followed by a rerun that
redoes only that job and what depends on it."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest

from conftest import ROOT, SMOKE, clean_env, copy_upstream, jobs_of, shell_argv, snakemake

pytestmark = pytest.mark.slow

HPS = ["lr0.001_minimal_mixup", "lr0.001_minimal_nomix"]  # the smoke preset's grid
METHODS = ["best_on_val", "uniform_soup", "greedy_soup", "bgss", "gsgs", "best_uniform_per_split"]


def _dry_run(tmp_path, *extra: str) -> dict[str, int]:
    run = snakemake("-n", "--cores", "2", *extra, "--config", f"results={tmp_path / 'results'}")
    assert run.returncode == 0, run.tail()
    assert run.stats, f"no Job stats table in:\n{run.tail()}"
    assert run.stats["total"] == sum(v for k, v in run.stats.items() if k != "total")
    return run.stats


def test_dry_run_of_the_default_config(tmp_path):
    stats = _dry_run(tmp_path)
    assert stats == {
        "prepare": 1, "folds": 1, "pretrain": 1, "lp": 5, "finetune": 90, "uniform_subsets": 18,
        "greedy_fold": 5, "soup_all": 3, "gsgs": 1, "models_table": 1, "methods": 1, "reliability": 1,
        "figures": 1, "summary": 1, "ship": 1, "budget": 5, "budget_table": 1, "all": 1, "total": 138,
    }


def test_dry_run_of_the_paper_preset(tmp_path):
    stats = _dry_run(tmp_path, "--configfile", str(ROOT / "presets" / "paper-cifar10.yaml"))
    assert stats["finetune"] == 90
    assert stats["lp"] == 5
    assert stats["uniform_subsets"] == 18
    assert stats["greedy_fold"] == 5
    assert stats["soup_all"] == 2  # the paper's setup: no outer holdout, no greedy_soup_holdout


def test_dry_run_of_a_3_fold_4_point_grid(tmp_path):
    overlay = tmp_path / "grid.yaml"
    overlay.write_text("folds:\n  k: 3\ngrid:\n  lr: [0.002, 0.001]\n  aug: [medium]\n  mixup: [false, true]\n")
    stats = _dry_run(tmp_path, "--configfile", str(overlay))
    assert stats["finetune"] == 12
    assert stats["lp"] == 3 and stats["greedy_fold"] == 3 and stats["uniform_subsets"] == 4


def test_lint_is_clean():
    run = snakemake("--lint")
    assert run.returncode == 0, run.tail()
    assert "Congratulations, your workflow is in a good condition!" in run.output, run.output


def _rule_blocks() -> dict[str, str]:
    blocks = {}
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        parts = re.split(r"^(?:rule|checkpoint) (\w+):\n", path.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            blocks[name] = re.split(r"^\S", body, maxsplit=1, flags=re.M)[0]  # up to the next top-level line
    return blocks


def test_every_rule_has_a_log_and_every_gpu_rule_a_benchmark():
    listed = snakemake("--list-rules")
    assert listed.returncode == 0, listed.tail()
    names = {line.strip() for line in listed.output.splitlines() if re.fullmatch(r"[A-Za-z_]\w*", line.strip())}
    blocks = _rule_blocks()
    assert names >= set(blocks) - {"all"} and "finetune" in names
    for name, body in blocks.items():
        if name == "all":
            continue
        assert re.search(r"^\s+log:", body, re.M), f"rule {name} has no log:"
        if re.search(r"\bgpu=1\b", body):
            assert re.search(r"^\s+benchmark:", body, re.M), f"GPU rule {name} has no benchmark:"


# ------------------------------------------------------------------------ the tiny real run


def test_smoke_run_writes_every_output(smoke_run):
    r = smoke_run.results
    models = pd.read_csv(r / "tables" / "models.csv")
    assert {"hp", "lr", "aug", "mixup", "fold", "val_acc", "test_acc"} <= set(models.columns)
    assert len(models) == 4 and sorted(models.hp.unique()) == HPS and sorted(models.fold.unique()) == [0, 1]
    assert models.val_acc.between(0, 1).all() and models.test_acc.between(0, 1).all()

    methods = pd.read_csv(r / "tables" / "methods.csv")
    assert [m for m in methods.method if m in METHODS] == METHODS  # other rows (e.g. ensembles) may follow
    assert {"val_acc", "test_acc", "n_ingredients"} <= set(methods.columns)

    from foldsoup.storage.weights import load_weights

    reference, _ = load_weights(r / "models" / HPS[0] / "fold0" / "model.safetensors")
    for method in METHODS:
        state, meta = load_weights(r / "soups" / f"{method}.safetensors")
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}, method
        assert json.loads((r / "soups" / f"{method}.json").read_text())["method"] == method
    # Selections are relative links to what they chose (no copies), inside the results folder.
    for method in ("best_on_val", "bgss", "best_uniform_per_split"):
        selected = json.loads((r / "soups" / f"{method}.json").read_text())["selected"]
        for suffix in (".safetensors", ".predictions.safetensors"):
            link = r / "soups" / f"{method}{suffix}"
            assert link.is_symlink() and not os.path.isabs(os.readlink(link)), link
            target = link.resolve()
            assert target.is_relative_to(r.resolve()) and target.is_file(), target
            if method == "best_on_val":
                assert target.parent == (r / "models" / selected).resolve(), (target, selected)
            else:
                assert target.name == f"{selected}{suffix}", (target, selected)

    k, points = 2, len(HPS)
    subsets = pd.read_csv(r / "tables" / "uniform_subsets.csv", dtype={"folds": str})
    assert len(subsets) == points * (2**k - 1)
    for name in ("reliability.csv",):
        assert (r / "tables" / name).stat().st_size > 0
    assert len(list((r / "figures").glob("*.png"))) == 7  # figures 2-4, methods, validation signals, budget, confusion
    assert (r / "summary.md").read_text().strip()


def test_smoke_run_ships_gsgs_and_says_so_at_its_end(smoke_run):
    """soups.ship (default gsgs): ship/model.safetensors is a copy of the soup, ship.json and the
    summary's first paragraph name it, and the run's last lines on the console say where it is."""
    r = smoke_run.results
    shipped, soup = r / "ship" / "model.safetensors", r / "soups" / "gsgs.safetensors"
    assert not shipped.is_symlink() and shipped.read_bytes() == soup.read_bytes()
    ship = json.loads((r / "ship" / "ship.json").read_text())
    record = json.loads(soup.with_suffix(".json").read_text())
    assert (ship["method"], ship["file"], ship["copy_of"]) == ("gsgs", str(shipped), str(soup))
    assert (ship["val_acc"], ship["test_acc"], ship["val_metric"]) == (record["val_acc"], record["test_acc"], record["val_metric"])
    methods = pd.read_csv(r / "tables" / "methods.csv").set_index("method")
    assert methods.loc["gsgs", "test_acc"] == pytest.approx(ship["test_acc"], abs=1e-6)
    summary = (r / "summary.md").read_text()
    assert summary.split("\n\n")[1].startswith(f"**The model to ship: `{shipped}`** (gsgs, ")
    assert "not a fair selection" in summary.split("\n\n")[1]
    end = smoke_run.run.output[smoke_run.run.output.index(f"foldsoup: summary: {r / 'summary.md'}"):]
    assert f"foldsoup: the model to ship: {shipped} (gsgs, " in end
    assert f"test {100 * ship['test_acc']:.2f}%" in end and "not a fair selection" in end


def test_smoke_run_every_job_wrote_a_log_and_every_gpu_job_a_benchmark(smoke_run):
    jobs = [j for j in smoke_run.jobs if j.rule != "all"]
    # import_model replaces the training rules only with models_from (tests/test_import_models.py).
    assert {j.rule for j in jobs} == set(_rule_blocks()) - {"all", "import_model"}
    assert sum(j.rule == "finetune" for j in jobs) == 4
    for job in jobs:
        assert job.log is not None and job.log.is_file(), f"{job.rule} {job.wildcards}: no log"
        if job.gpu:
            assert job.benchmark is not None and job.benchmark.is_file(), f"{job.rule} {job.wildcards}: no benchmark"
            assert "device" in job.log.read_text(), job.log
    for job in (j for j in jobs if j.rule == "finetune"):
        text = job.log.read_text()
        assert re.search(r"epoch 1/1 loss \d+\.\d+ lr \S+ \d+ images/s", text), text  # progress is visible


def test_the_pretrained_backbone_is_the_same_in_every_run(smoke_run, tmp_path):
    """Torch seeds its default generator at random per process; the backbone's initial weights
    must not depend on it (SLURM and local runs, reruns, the job server all give one result)."""
    import subprocess
    import sys

    import torch

    from foldsoup.storage.weights import load_weights

    argv = shell_argv(next(j for j in smoke_run.jobs if j.rule == "pretrain"))
    out = tmp_path / "backbone.safetensors"
    argv[argv.index("--out") + 1] = str(out)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = load_weights(smoke_run.results / "pretrained" / "backbone.safetensors")[0], load_weights(out)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ one failed job


def test_a_failed_finetune_keeps_going_and_the_rerun_redoes_only_it(smoke_run, tmp_path):
    results = tmp_path / "results"
    copy_upstream(smoke_run.results, results)
    failing_hp, failing_fold = HPS[0], 1
    args = ("--cores", "2", "--configfile", str(SMOKE), "--config", f"results={results}")

    # No --keep-going: the default profile keeps going, as README says.
    first = snakemake(*args, env=clean_env(FOLDSOUP_FAIL=f"{failing_hp}/fold{failing_fold}"))
    assert first.returncode != 0, first.tail()
    assert first.stats["finetune"] == 4
    assert "foldsoup: the run stopped: a job failed" in first.output, first.tail()  # onerror: how to go on
    failed = results / "models" / failing_hp / f"fold{failing_fold}"
    assert not (failed / "metrics.json").exists() and not (failed / "model.safetensors").exists()
    log = (results / "logs" / "finetune" / failing_hp / f"fold{failing_fold}.log").read_text()
    assert "injected failure" in log, log
    others = [results / "models" / hp / f"fold{i}" for hp in HPS for i in (0, 1) if (hp, i) != (failing_hp, failing_fold)]
    for folder in others:
        assert (folder / "metrics.json").is_file(), folder
    # --keep-going also ran what does not depend on the failed model.
    assert (results / "analysis" / "uniform_subsets" / f"{HPS[1]}.csv").is_file()
    assert (results / "soups" / "greedy_fold0.safetensors").is_file()
    assert not (results / "tables" / "models.csv").exists()
    mtimes = {f: f.stat().st_mtime_ns for folder in others for f in folder.iterdir()}

    expected = {"finetune": 1, "uniform_subsets": 1, "greedy_fold": 1, "soup_all": 3, "gsgs": 1, "models_table": 1,
                "methods": 1, "reliability": 1, "figures": 1, "summary": 1, "ship": 1, "budget": 2, "budget_table": 1,
                "all": 1}
    dry = snakemake("-n", *args)
    assert dry.returncode == 0, dry.tail()
    assert dry.stats == {**expected, "total": sum(expected.values())}

    second = snakemake(*args)
    assert second.returncode == 0, second.tail()
    assert second.stats == dry.stats
    reran = [(j.rule, j.wildcards) for j in jobs_of(second.output)]
    assert ("finetune", f"hp={failing_hp}, fold={failing_fold}") in reran, reran
    assert ("uniform_subsets", f"hp={failing_hp}") in reran and ("greedy_fold", f"fold={failing_fold}") in reran
    assert (failed / "metrics.json").is_file()
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes  # the other models were not touched
    assert len(pd.read_csv(results / "tables" / "models.csv")) == 4


def test_a_target_outside_the_configured_grid_or_folds_is_refused(tmp_path):
    """docs/reruns-and-crashes.md's --forcerun names a model by path; a grid point or fold the config does not have
    is refused by the dry run, before any job (the wildcards are constrained to the grid)."""
    results = tmp_path / "results"
    for target in (f"{results}/models/lr1e-05_medium_mixup/fold0/model.safetensors",  # not a grid point
                   f"{results}/models/{HPS[0]}/fold7/model.safetensors"):  # k = 2
        run = snakemake("-n", "--cores", "2", "--configfile", str(SMOKE), "--config", f"results={results}",
                        "--forcerun", target)
        assert run.returncode != 0, run.tail()
        assert "No rule to produce" in run.output and target in run.output, run.tail()
    run = snakemake("-n", "--cores", "2", "--configfile", str(SMOKE), "--config", f"results={results}",
                    "--forcerun", f"{results}/models/{HPS[0]}/fold1/model.safetensors")
    assert run.returncode == 0, run.tail()
