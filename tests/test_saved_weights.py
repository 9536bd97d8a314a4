"""Every number reported for a weights file is that file's (issue 19.1): with
finetune.save_dtype bfloat16 a fine-tune is evaluated with the rounded weights it saves, so its
predictions, metrics.json and everything selected from them (models.csv, best_on_val, the greedy
soups) describe model.safetensors, not the fp32 weights that were in memory."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from foldsoup.data.prepared import load_prepared  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402
from foldsoup.training.loop import predict_logits  # noqa: E402
from foldsoup.usage import evaluate, load_model  # noqa: E402

try:
    from tiny_runs import TinyRun, train_tiny_run  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun, train_tiny_run  # noqa: E402

K = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = TinyRun(tmp_path_factory.mktemp("bf16") / "results", {
        "seed": 0, "device": "cpu",
        "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6], "test_fraction": 0.5, "max_pool": 90},
        "model": {"name": "digits_cnn", "width": 8},
        "pretrain": {"epochs": 2},
        "folds": {"k": K, "holdout_fraction": 0},
        "lp": {"max_iter": 20},
        "finetune": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "save_dtype": "bfloat16", "eval_batch_size": 32},
        "grid": {"lr": [0.003], "aug": ["minimal"], "mixup": [False]},
    })
    return train_tiny_run(r, r.hps, K)


@pytest.mark.parametrize("fold", range(K))
def test_a_bf16_fine_tune_reports_the_predictions_of_its_file(run, fold):
    out = run.root / "models" / run.hps[0] / f"fold{fold}"
    state, _ = load_weights(out / "model.safetensors")
    assert state["head.weight"].dtype == torch.bfloat16
    model, _, spec = load_model(str(out / "model.safetensors"), "cpu")
    data = load_prepared(run.data)
    saved = load_weights(out / "predictions.safetensors")[0]
    batch = run.cfg["finetune"]["eval_batch_size"]
    for images, key in ((data.pool_images, "pool_logits"), (data.test_images, "test_logits")):
        logits = predict_logits(model, torch.from_numpy(images), spec, batch, run.cfg["finetune"]["precision"])
        assert torch.equal(logits, saved[key]), key  # the file's own logits, bit for bit
    metrics = json.loads((out / "metrics.json").read_text())
    scored = evaluate(str(out / "model.safetensors"), run.data, run.folds, "cpu")
    # The same correct counts (metrics.json still holds float32 means; evaluate gives the fraction).
    n_test, n_val = int(scored["test_images"]), metrics["val_images"]
    assert scored["test_acc_exact"] == f"{round(metrics['test_acc'] * n_test)}/{n_test}"
    assert scored[f"val_acc_fold{fold}_exact"] == f"{round(metrics['val_acc'] * n_val)}/{n_val}"
