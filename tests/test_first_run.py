"""The first real run as a new user meets it (issue 12): one results folder per run, and GPUs
asked for but not visible said once at the start (or the run stopped before any job)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SMOKE, clean_env, snakemake

from foldsoup.config import results_folder
from foldsoup.errors import ConfigError
from foldsoup.config.schema import validate
from foldsoup.config.yaml_files import load_yaml_files
from foldsoup.devices import start_check

PAPER = ROOT / "presets" / "paper-cifar10.yaml"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # the same on a GPU machine: no device visible


def test_the_smoke_overlay_does_not_choose_the_results_folder():
    for base in ("config.yaml", PAPER):
        alone, smoke = load_yaml_files(ROOT / "config.yaml", base), load_yaml_files(ROOT / "config.yaml", base, SMOKE)
        assert smoke.get("results") == alone.get("results")


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    """The demo's prepare and folds jobs, really run, with two GPU slots asked for and none visible."""
    results = tmp_path_factory.mktemp("first") / "results"
    run = snakemake("--cores", "1", "--resources", "gpu=2", "--config", f"results={results}", "--", f"{results}/folds.csv",
                    env=clean_env(**NO_GPU))
    assert run.returncode == 0, run.tail()
    return results, run


@pytest.mark.slow
def test_gpu_slots_without_a_visible_gpu_are_said_once_at_the_start(folds_run):
    _, run = folds_run
    warnings = [line for line in run.output.splitlines() if line.startswith("foldsoup: warning:")]
    assert len(warnings) == 1, run.output
    assert "--resources gpu=2 asks for GPUs, but" in warnings[0] and "every job will run on the CPU" in warnings[0]
    assert run.output.index("foldsoup: warning:") < run.output.index("rule prepare")


@pytest.mark.slow
def test_device_cuda_without_a_visible_gpu_stops_before_any_job(tmp_path):
    results = tmp_path / "results"
    run = snakemake("--cores", "1", "--config", f"results={results}", "device=cuda", "--", f"{results}/folds.csv",
                    env=clean_env(**NO_GPU))
    assert run.returncode != 0
    assert "foldsoup: device: cuda asks for GPUs, but" in run.output and "set device: cpu (or auto)" in run.output
    assert not (results / "prepared").exists() and "rule prepare" not in run.output


def test_the_gpu_presets_ask_for_a_gpu():
    for preset in ("paper-cifar10", "imagefolder-clip", "medmnist-clip"):
        assert load_yaml_files(ROOT / "presets" / f"{preset}.yaml")["device"] == "cuda", preset


def test_start_check_decisions(monkeypatch):
    monkeypatch.delenv("FOLDSOUP_FAKE_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert start_check("cpu", 2) == (None, None)  # the user chose the CPU
    assert start_check("auto", None) == (None, None)  # nothing asked of a GPU
    warning, error = start_check("auto", 1)
    assert error is None and warning.startswith("--resources gpu=1 asks for GPUs, but")
    warning, error = start_check("cuda", None)
    assert warning is None and error.startswith("device: cuda asks for GPUs, but")
    monkeypatch.setenv("FOLDSOUP_FAKE_GPUS", "2")
    assert start_check("cuda", 2) == (None, None)


@pytest.mark.slow
def test_a_results_folder_holds_one_run(folds_run):
    results, _ = folds_run
    assert json.loads((results / "run.json").read_text()) == {"data": "digits", "model": "digits_cnn"}
    # The same data and model with other settings (the smoke overlay) is the same run.
    same = snakemake("-n", "--cores", "1", "--configfile", str(SMOKE), "--config", f"results={results}")
    assert same.returncode == 0, same.tail()
    other = snakemake("-n", "--cores", "1", "--configfile", str(PAPER), "--config", f"results={results}")
    assert other.returncode != 0
    assert (f"foldsoup: results: '{results}' holds a run of digits with digits_cnn ({results}/run.json); this "
            f"configuration is a run of cifar10 (") in other.output, other.tail()
    assert "with open_clip ViT-B-32. Give it its own folder" in other.output


def test_a_damaged_run_record_is_named(tmp_path):
    cfg = validate({"results": str(tmp_path), "data": {"name": "digits"}, "model": {"name": "digits_cnn"}})
    results_folder.record(cfg)
    results_folder.check(cfg)
    (tmp_path / "run.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"run\.json' is not a run record written by foldsoup; delete it"):
        results_folder.check(cfg)
