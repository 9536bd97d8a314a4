"""Every soup job reads each weight file at most once (foldsoup.soups.ingredients), counted at the real
loader: safetensors' `safe_open`, which `weights.load_weights` opens each file with.

A tiny real run (digits, k = 2, 2 grid points, an outer holdout, 4 images per evaluation batch
so that greedy candidates stop inside a fold) goes through the pipeline functions the workflow
rules call; each soup job then runs with the loader watched. Also: where the ingredients live
and what a job says when memory is short.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

# Workflow runs (Snakemake, a SLURM cluster or served jobs): outside the fast lane.
pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from foldsoup import steps  # noqa: E402

try:
    from tiny_runs import TinyRun, train_tiny_run  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun, train_tiny_run  # noqa: E402
from foldsoup.steps import budget  # noqa: E402
from foldsoup.errors import MemoryShort
from foldsoup.soups.ingredients import ACTIVATIONS, MODEL_BUFFERS, format_bytes, residence  # noqa: E402

K = 2


class Run(TinyRun):
    def __init__(self, root: Path):
        super().__init__(root, {
            "seed": 0, "device": "cpu",
            "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6, 8, 9], "test_fraction": 0.5,
                     "max_pool": 90},
            "model": {"name": "digits_cnn", "width": 8},
            "pretrain": {"epochs": 2},
            "folds": {"k": K, "holdout_fraction": 0.25},
            "lp": {"max_iter": 10},
            "finetune": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 4},
            "grid": {"lr": [0.003, 0.001], "aug": ["minimal"], "mixup": [False]},
            "budget": {"draws": 2},
        })
        self.soups = root / "soups"

    def lists(self, hps: list[str] | None = None, folds: list[int] | None = None) -> tuple[list[str], list[str]]:
        dirs = [self.root / "models" / hp / f"fold{f}" for hp in hps or self.hps for f in folds or range(K)]
        return [str(d / "model.safetensors") for d in dirs], [str(d / "metrics.json") for d in dirs]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a workflow job: tiny batches on a busy machine
    r = Run(tmp_path_factory.mktemp("reads") / "results")
    train_tiny_run(r, r.hps, K)
    steps.models_table(r.lists()[1], str(r.root / "tables" / "models.csv"))
    for fold in range(K):  # gsgs's inputs
        steps.greedy_per_fold(r.cfg, r.data, r.folds, fold, *r.lists(folds=[fold]), str(r.soups / f"greedy_fold{fold}.safetensors"),
                                 str(r.soups / f"uniform_fold{fold}.safetensors"))
    yield r
    torch.set_num_threads(before)


@pytest.fixture
def opens(monkeypatch):
    """Files opened through safetensors.safe_open (load_weights imports it at each call), by path."""
    import safetensors

    real, seen = safetensors.safe_open, Counter()

    def counting(path, *args, **kwargs):
        seen[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    return seen


def _jobs(r: Run, out: Path) -> dict:
    """Each soup job: (a call, the weight files it must read)."""
    models, metrics = r.lists()
    per_fold = [str(r.soups / f"greedy_fold{i}.safetensors") for i in range(K)]
    return {
        "uniform_subsets": (lambda: steps.uniform_subsets(r.cfg, r.data, r.folds, r.hps[0], *r.lists([r.hps[0]]),
                                                             str(out / "subsets.csv")), r.lists([r.hps[0]])[0]),
        "greedy_fold": (lambda: steps.greedy_per_fold(r.cfg, r.data, r.folds, 1, *r.lists(folds=[1]), str(out / "g.safetensors"),
                                                         str(out / "u.safetensors")), r.lists(folds=[1])[0]),
        "uniform_soup": (lambda: steps.uniform_all(r.cfg, r.data, r.folds, models, metrics, str(out / "u.safetensors")), models),
        "greedy_soup": (lambda: steps.greedy_all(r.cfg, r.data, r.folds, models, metrics, str(out / "g.safetensors")), models),
        "greedy_soup_holdout": (lambda: steps.greedy_all(r.cfg, r.data, r.folds, models, metrics, str(out / "h.safetensors"),
                                                            on_holdout=True), models),
        "gsgs": (lambda: steps.gsgs(r.cfg, r.data, r.folds, per_fold, str(out / "gsgs.safetensors")), per_fold),
        "budget": (lambda: budget(r.cfg, r.data, r.folds, str(r.root / "models"), 1,
                                  str(out / "f1.csv")), models),
    }


@pytest.mark.parametrize("job", ["uniform_subsets", "greedy_fold", "uniform_soup", "greedy_soup", "greedy_soup_holdout",
                                 "gsgs", "budget"])
def test_each_weight_file_is_read_at_most_once_per_job(run, job, opens, capsys, tmp_path):
    call, expected = _jobs(run, tmp_path)[job]
    cost = call()
    weights = {p: n for p, n in opens.items() if p in expected}
    assert weights == {p: 1 for p in expected}, opens  # every ingredient, each once
    assert max(opens.values()) == 1, opens  # and nothing else twice
    assert cost["files"] == cost["reads"] == len(expected)
    assert cost["bytes_read"] == sum(Path(p).stat().st_size for p in expected)
    assert cost["val_images"] > 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"read {len(expected)} files, {format_bytes(cost['bytes_read'])}, each once" in last, last
    assert f"; {cost['val_images']} val and {cost['test_images']} test images evaluated" in last


def test_budget_reads_each_model_once_over_all_its_cells(run, opens, tmp_path):
    """The f = 2 job uses every model in several cells and draws, and each fold's greedy soup
    again in BGSS and GSGS: still one read per model file."""
    cost = budget(run.cfg, run.data, run.folds, str(run.root / "models"), 2,
                  str(tmp_path / "f2.csv"))
    assert cost["reads"] == cost["files"] == 2 * K and max(opens.values()) == 1


def test_greedy_steps_record_the_images_evaluated(run):
    """Recorded per-fold greedy soups (early exit on, 4 images per batch) say which folds and how
    many images each candidate was evaluated on, and why a rejected one stopped."""
    for fold in range(K):
        rec = json.loads((run.soups / f"greedy_fold{fold}.json").read_text())
        for step in rec["steps"]:
            assert list(step["images"]) == [str(fold)] and 0 < step["images"][str(fold)]
            assert (step["reason"] is None) == step["accepted"]


# ------------------------------------------------------------------------------------------
# Where the ingredients live, and short memory
# ------------------------------------------------------------------------------------------

GB = 10**9


def test_residence_prefers_the_device_then_host_memory():
    model = 351_435_472  # a ViT-B/32 fine-tune in float32
    total = 90 * model  # the paper preset's 90 models: 31.6 GB
    gpu_need = total + MODEL_BUFFERS * model + ACTIVATIONS
    assert residence("cuda:0", total, model, gpu_need, 64 * GB) == "cuda:0"
    assert residence("cuda:0", total, model, gpu_need - 1, 64 * GB) == "cpu"  # a byte short on the GPU: host memory
    assert residence("cuda:0", total, model, 20 * GB, None) == "cpu"  # host memory unknown: not checked
    # A CPU job keeps its ingredients and its own buffers in host memory.
    assert residence("cpu", total, model, None, total + MODEL_BUFFERS * model) == "cpu"
    # The budget analysis keeps k + 2 soups besides: they count on the device.
    assert residence("cuda:0", total, model, gpu_need, 64 * GB, extra_models=7) == "cpu"


def test_short_memory_stops_with_the_sizes_and_what_to_change():
    model = 351_435_472
    with pytest.raises(MemoryShort) as err:
        residence("cuda:0", 90 * model, model, 20 * GB, 24 * GB)
    assert str(err.value) == (
        "the soup job's 31.6 GB of weight files do not fit in memory: 20.0 GB free on cuda:0 (needs 35.2 GB), "
        "24.0 GB of host memory available (needs 31.6 GB); give the soup jobs more memory (resources.soups.mem_mb; "
        "--retries raises it per attempt) or a larger GPU, or halve the files with finetune.save_dtype: bfloat16")


def test_a_soup_job_short_of_memory_fails_before_evaluating(run, monkeypatch, tmp_path, capsys):
    """Host memory made short (the job's probe of it answers 1 kB): the CPU job stops with one
    line from the command line, and writes nothing."""
    import foldsoup.soups.ingredients
    from foldsoup.cli import main

    monkeypatch.setattr(foldsoup.soups.ingredients, "host_memory_available", lambda: 1000)
    models, metrics = run.lists()
    out = tmp_path / "greedy_soup.safetensors"
    status = main(["greedy-all", "--config-json", json.dumps(run.cfg), "--data", run.data, "--folds", run.folds,
                   "--models", *models, "--metrics", *metrics, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and not out.exists()
    assert err[-1].startswith("foldsoup greedy-all: error: the soup job's ") and "1.0 kB of host memory available (needs" in err[-1]
    assert "resources.soups.mem_mb" in err[-1] and not any("val images evaluated" in line for line in err)
