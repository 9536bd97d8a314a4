"""A config edit reruns only what it changes (issue 11.2): dry runs over the finished smoke run
after one edit each, counted per rule. On the paper preset every needless rerun is GPU-hours.

The smoke run's grid is lr 0.001 x aug minimal x mixup {off, on}, k = 2 (4 fine-tunes) with the
demo's 20 % outer holdout; the backbone is the demo's digits_cnn, pretrained by the workflow
with the `medium` augmentation.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SMOKE, snakemake

pytestmark = pytest.mark.slow

# What a change of the fine-tuned models reruns after them: the soups and tables of the run
# (2 folds, so 2 greedy_fold jobs and 2 budget fold counts; 3 soup_all with the holdout).
AFTER_MODELS = {"greedy_fold": 2, "soup_all": 3, "gsgs": 1, "models_table": 1, "methods": 1, "reliability": 1,
                "figures": 1, "summary": 1, "ship": 1, "budget": 2, "budget_table": 1, "all": 1}


def dry_run(smoke_run, tmp_path, overlay: dict | None) -> dict[str, int]:
    """Per-rule job counts of a dry run over the smoke run's results with `overlay` on top."""
    files = [str(SMOKE)]
    if overlay is not None:
        path = tmp_path / "edit.yaml"
        path.write_text(json.dumps(overlay))  # JSON is YAML
        files.append(str(path))
    run = snakemake("-n", "--cores", "2", "--configfile", *files, "--config", f"results={smoke_run.results}")
    assert run.returncode == 0, run.tail()
    if "Nothing to be done" in run.output:
        return {}
    assert run.stats, run.tail()
    return {rule: n for rule, n in run.stats.items() if rule != "total"}


def test_the_finished_run_is_complete(smoke_run, tmp_path):
    assert dry_run(smoke_run, tmp_path, None) == {}


@pytest.mark.parametrize("overlay", [
    {"device": "cpu"},
    {"finetune": {"eval_batch_size": 7}},
    {"finetune": {"compile": True}},
    {"finetune": {"on_divergence": "exclude"}},
    {"finetune": {"resume_every_s": 60}},
    {"local_job_server": False},
    {"resources": {"finetune": {"runtime": 5, "mem_mb": 100}}},
    {"augment": {"strong": {"scale": [0.5, 1.0], "rotate": 5, "translate": 0.0, "jitter": 0.0, "erase": 0.0}}},
], ids=lambda o: json.dumps(o)[:40])
def test_settings_that_cannot_change_a_result_rerun_nothing(smoke_run, tmp_path, overlay):
    # `strong` is not in the smoke grid and the backbone is pretrained with `medium`.
    assert dry_run(smoke_run, tmp_path, overlay) == {}


def test_adding_a_learning_rate_trains_only_the_new_grid_points(smoke_run, tmp_path):
    stats = dry_run(smoke_run, tmp_path, {"grid": {"lr": [0.001, 0.002]}})
    assert stats == {"finetune": 4, "uniform_subsets": 2, **AFTER_MODELS}


def test_removing_a_grid_value_retrains_nothing(smoke_run, tmp_path):
    stats = dry_run(smoke_run, tmp_path, {"grid": {"mixup": [False]}})
    assert "finetune" not in stats and "lp" not in stats and "pretrain" not in stats
    assert "uniform_subsets" not in stats  # the remaining grid point's models did not change
    assert stats["greedy_fold"] == 2 and stats["methods"] == 1


def test_an_augmentation_edit_reruns_only_its_fine_tunes(smoke_run, tmp_path):
    minimal = {"scale": [0.8, 1.0], "rotate": 0, "translate": 0.0, "jitter": 0.0, "erase": 0.0}
    stats = dry_run(smoke_run, tmp_path, {"augment": {"minimal": minimal}})
    assert stats == {"finetune": 4, "uniform_subsets": 2, **AFTER_MODELS}


def test_mixup_alpha_reruns_only_the_mixup_fine_tunes(smoke_run, tmp_path):
    stats = dry_run(smoke_run, tmp_path, {"finetune": {"mixup_alpha": 0.2}})
    assert stats == {"finetune": 2, "uniform_subsets": 1, **AFTER_MODELS}


def test_fine_tune_epochs_rerun_no_pretraining_and_no_linear_probe(smoke_run, tmp_path):
    stats = dry_run(smoke_run, tmp_path, {"finetune": {"epochs": 2}})
    assert stats == {"finetune": 4, "uniform_subsets": 2, **AFTER_MODELS}


def test_analysis_settings_rerun_only_what_reads_them(smoke_run, tmp_path):
    stats = dry_run(smoke_run, tmp_path, {"analysis": {"bootstrap_resamples": 500}})
    assert stats == {"methods": 1, "figures": 1, "summary": 1, "all": 1}
    stats = dry_run(smoke_run, tmp_path, {"analysis": {"max_subsets_per_n": 1}})
    assert stats == {"uniform_subsets": 2, "reliability": 1, "figures": 1, "summary": 1, "all": 1}


def test_soup_settings_rerun_soups_and_not_models(smoke_run, tmp_path):
    stats = dry_run(smoke_run, tmp_path, {"soups": {"greedy_accept": ">"}})
    assert "finetune" not in stats and "uniform_subsets" not in stats
    assert stats["greedy_fold"] == 2 and stats["soup_all"] == 3 and stats["budget"] == 2


@pytest.mark.parametrize("method", ["greedy_soup_holdout", "bgss"])
def test_the_method_to_ship_reruns_only_the_ship_and_the_summary(smoke_run, tmp_path, method):
    """soups.ship chooses among finished soups (the smoke run has an outer holdout)."""
    assert dry_run(smoke_run, tmp_path, {"soups": {"ship": method}}) == {"ship": 1, "summary": 1, "all": 1}


def test_a_checkpoint_file_is_an_input_of_pretrain(tmp_path):
    """model.pretrained as a file: replacing the checkpoint reruns `pretrain` (and all after it)."""
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import load_yaml_files

    checkpoint = tmp_path / "clip.safetensors"
    checkpoint.write_bytes(b"not read by a dry run")
    cfg = load_yaml_files(ROOT / "presets" / "paper-cifar10.yaml")
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    overlay = tmp_path / "file.yaml"
    overlay.write_text(json.dumps({"model": {"pretrained": str(checkpoint), "quick_gelu": True},
                                   "data": {"root": str(tmp_path / "data"), "download": False}}))
    assert validate(load_yaml_files(ROOT / "presets" / "paper-cifar10.yaml", overlay))["model"]["pretrained"] == str(checkpoint)
    assert cfg["model"]["pretrained"] == "openai"
    run = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "presets" / "paper-cifar10.yaml"), str(overlay),
                    "--config", f"results={tmp_path / 'results'}", "--printshellcmds")
    assert run.returncode == 0, run.tail()
    pretrain = run.output[run.output.index("rule pretrain:"):]
    assert str(checkpoint) in pretrain[:pretrain.index("output:")], pretrain[:600]
