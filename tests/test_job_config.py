"""What each job is given of the configuration (foldsoup.config.job), on known cases; the
workflow-level effect (which edits rerun what) is in test_rerun_scope.py."""

from __future__ import annotations

import pytest

from foldsoup.config.schema import validate
from foldsoup.config.yaml_files import load_yaml_files
from foldsoup.config.job import RUNTIME_KEYS, STEP_KEYS, job_config, merge, runtime_config, step_keys

from conftest import ROOT


@pytest.fixture(scope="module")
def demo() -> dict:
    return validate(load_yaml_files(ROOT / "config.yaml"), check_paths=False)



def test_a_fine_tune_gets_its_own_grid_point_and_augmentation(demo):
    cfg = job_config(demo, "finetune", "lr0.001_strong_mixup")
    assert cfg["grid"] == {"lr": [0.001], "aug": ["strong"], "mixup": [True]}
    assert set(cfg["augment"]) == {"strong"} and cfg["finetune"]["mixup_alpha"] == demo["finetune"]["mixup_alpha"]
    plain = job_config(demo, "finetune", "lr0.001_minimal_nomix")
    assert set(plain["augment"]) == {"minimal"} and "mixup_alpha" not in plain["finetune"]
    assert "folds" not in cfg and "lp" not in cfg and "pretrain" not in cfg


def test_no_job_is_given_a_runtime_key(demo):
    runtime = set(RUNTIME_KEYS)
    steps = [(s, None) for s in (*STEP_KEYS, "prepare", "pretrain")] + [("finetune", "lr0.002_medium_nomix")]
    for step, hp in steps:
        assert not runtime & set(step_keys(demo, step, hp)), step
        cfg = job_config(demo, step, hp)
        assert "device" not in cfg and not {"eval_batch_size", "compile", "on_divergence"} & set(cfg.get("finetune", {}))


def test_prepare_reads_only_its_dataset_keys(demo):
    assert job_config(demo, "prepare")["data"] == {k: demo["data"][k] for k in
                                                   ("name", "max_pool", "max_test", "classes", "pretrain_classes", "test_fraction")}
    paper = validate(load_yaml_files(ROOT / "config.yaml", ROOT / "presets" / "paper-cifar10.yaml"), check_paths=False)
    assert set(job_config(paper, "prepare")["data"]) == {"name", "max_pool", "max_test", "root"}
    clip_keys = ("name", "arch", "pretrained", "quick_gelu", "normalize_features")
    # Exported, not trained: nothing else; and none of digits_cnn's keys.
    assert job_config(paper, "pretrain") == {"model": {k: paper["model"][k] for k in clip_keys}}
    assert set(job_config(demo, "lp")["model"]) == {"name", "width", "norm", "normalize_features"}  # no arch


def test_merge_puts_the_runtime_keys_back_where_the_schema_has_them(demo):
    cfg = merge(job_config(demo, "finetune", "lr0.001_strong_mixup"), runtime_config({**demo, "device": "cpu"}))
    assert cfg["device"] == "cpu" and cfg["finetune"]["eval_batch_size"] == demo["finetune"]["eval_batch_size"]
    assert cfg["finetune"]["epochs"] == demo["finetune"]["epochs"]
    # By hand, without --runtime-json: the schema's defaults, under what the config gives.
    assert merge({"seed": 0}, None)["device"] == "auto"
    assert merge({"device": "cuda", "finetune": {"compile": True}}, None)["finetune"] == {
        "compile": True, "eval_batch_size": 1024, "on_divergence": "error", "resume_every_s": 600}
    assert merge({"device": "cuda"}, None)["device"] == "cuda"


def test_the_method_to_ship_reaches_only_the_ship_job(demo):
    """soups.ship chooses among finished soups: editing it reruns the ship job (and the summary,
    through ship.json), no soup; the soup jobs keep the config they had before the key existed."""
    assert job_config(demo, "ship") == {"soups": {"ship": "gsgs"}}
    for step in ("greedy_fold", "soup_all", "gsgs", "budget", "methods"):
        assert "ship" not in job_config(demo, step).get("soups", {}), step
    for step in ("greedy_fold", "soup_all", "gsgs"):
        assert job_config(demo, step)["soups"] == {k: demo["soups"][k] for k in ("greedy_accept", "cross_fold_val", "early_exit")}
