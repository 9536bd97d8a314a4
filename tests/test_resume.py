"""Crashes and preemption of a fine-tune: the real `python -m foldsoup finetune` command (as the
smoke run's Snakemake printed it, made longer) killed with SIGKILL or stopped with SIGTERM in
the middle of training, then rerun: it resumes and ends with exactly the weights of a run that
was never interrupted. Plus in-process checks of mid-epoch resume and of stale resume state."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env, jobs_of, shell_argv

EPOCHS = 12


def _command(smoke_run, out_dir: Path, resume_dir: Path) -> list[str]:
    """The smoke run's fine-tune command for a mixup grid point (mixup and augmentation both draw
    random numbers), with more, smaller steps and its own output and resume folders."""
    job = next(j for j in jobs_of(smoke_run.run.output) if j.rule == "finetune" and "mixup" in j.wildcards)
    argv = shell_argv(job)
    assert argv[:3] == ["python", "-m", "foldsoup"] and argv[3] == "finetune", argv
    args = dict(zip(argv[4::2], argv[5::2]))
    cfg = json.loads(args["--config-json"])
    cfg["finetune"].update(epochs=EPOCHS, batch_size=8)
    runtime = json.loads(args["--runtime-json"])
    runtime["device"] = "cpu"
    runtime["finetune"]["resume_every_s"] = 0  # resume state before every step: a kill always finds some
    args.update({"--config-json": json.dumps(cfg), "--runtime-json": json.dumps(runtime), "--out-dir": str(out_dir),
                 "--resume-dir": str(resume_dir)})
    return [sys.executable, "-m", "foldsoup", "finetune", *[x for kv in args.items() for x in kv]]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    with open(log, "a") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)


def _epochs_done(log: Path) -> int:
    done = re.findall(rf"epoch (\d+)/{EPOCHS} loss", log.read_text())
    return max(map(int, done), default=0)


def _wait_for_epoch(proc: subprocess.Popen, log: Path, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _epochs_done(log) < epoch:
        assert proc.poll() is None, f"fine-tune ended (rc {proc.returncode}) before epoch {epoch}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no epoch {epoch} after {timeout} s:\n{log.read_text()}"
        time.sleep(0.01)


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from foldsoup.storage.weights import load_weights

    return load_weights(out_dir / "model.safetensors")[0]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(smoke_run, tmp_path_factory):
    """An uninterrupted run of the long fine-tune."""
    base = tmp_path_factory.mktemp("straight")
    log = base / "finetune.log"
    proc = _start(_command(smoke_run, base / "out", base / "resume"), log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    assert "resumed" not in log.read_text()
    assert not (base / "resume" / "state.safetensors").exists()  # cleared once the outputs exist
    return base / "out"


@pytest.mark.slow
def test_kill_9_mid_training_then_the_rerun_resumes_to_the_same_weights(smoke_run, straight, tmp_path):
    out, resume, log = tmp_path / "out", tmp_path / "resume", tmp_path / "finetune.log"
    cmd = _command(smoke_run, out, resume)
    proc = _start(cmd, log)
    _wait_for_epoch(proc, log, 3)  # epoch 3 running: epoch 2's state is saved
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (resume / "state.safetensors").is_file()
    assert not (out / "metrics.json").exists()

    rerun = _start(cmd, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    m = re.search(r"resumed \S+ from epoch (\d+) step \d+", log.read_text())
    assert m and int(m.group(1)) >= 2, log.read_text()
    _assert_same_weights(_weights(straight), _weights(out))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, out))
    assert (a["val_acc"], a["test_acc"], a["fold_accs"]) == (b["val_acc"], b["test_acc"], b["fold_accs"])
    assert not (resume / "state.safetensors").exists()


@pytest.mark.slow
def test_sigterm_saves_state_exits_non_zero_and_the_rerun_continues(smoke_run, straight, tmp_path):
    out, resume, log = tmp_path / "out", tmp_path / "resume", tmp_path / "finetune.log"
    cmd = _command(smoke_run, out, resume)
    proc = _start(cmd, log)
    _wait_for_epoch(proc, log, 2)
    time.sleep(0.1)  # most likely into epoch 3 (mid-epoch resume is also checked in-process below)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    text = log.read_text()
    m = re.search(r"foldsoup finetune: error: \S+: SIGTERM at epoch (\d+) step (\d+); resume state saved to (\S+),", text)
    assert m, text
    assert Path(m.group(3)) == resume / "state.safetensors" and Path(m.group(3)).is_file()
    assert not (out / "metrics.json").exists()

    rerun = _start(cmd, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert re.search(rf"resumed \S+ from epoch {m.group(1)} step {m.group(2)} ", log.read_text()), log.read_text()
    _assert_same_weights(_weights(straight), _weights(out))


# ------------------------------------------------------------------------ in-process


AUG = {"scale": [0.35, 1.0], "rotate": 20, "translate": 0.15, "jitter": 0.4, "erase": 0.25}


def _loop(resume_dir=None, lr=1e-3, init_seed=0, log=None, every_s=0, **kw):
    from foldsoup.models.build import build_classifier
    from foldsoup.training.loop import ImageSpec, LoopConfig, ResumeStore, train

    torch.manual_seed(init_seed)
    model = build_classifier({"name": "digits_cnn", "width": 8, "normalize_features": False}, 3)
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    cfg = LoopConfig(3, 8, lr, 0.1, 2, 1.0, 0.0, "fp32", AUG, 0.4, 0, "test/fold0")
    store = ResumeStore(resume_dir, every_s) if resume_dir else None
    train(model, images, labels, ImageSpec(8, [0.5], [0.5], False), cfg, log or (lambda m: None), store, **kw)
    return model.state_dict()


@pytest.mark.slow
def test_sigterm_in_the_middle_of_an_epoch_resumes_exactly(tmp_path, monkeypatch):
    import foldsoup.training.loop as train_mod
    from foldsoup.errors import Interrupted

    straight = _loop()
    real_transform, calls = train_mod.train_transform, []

    def transform_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # step 3 of epoch 2 (5 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_transform(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_transform", transform_then_sigterm)
    with pytest.raises(Interrupted, match=r"SIGTERM at epoch 1 step 3; resume state saved"):
        _loop(tmp_path)
    monkeypatch.setattr(train_mod, "train_transform", real_transform)
    lines = []
    resumed = _loop(tmp_path, log=lines.append)
    assert any("from epoch 1 step 3" in line for line in lines), lines
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"init_seed": 1}])
def test_resume_state_of_a_run_with_other_inputs_is_ignored(tmp_path, change):
    with pytest.raises(RuntimeError, match="injected failure"):
        _loop(tmp_path, fail_at_step=12)  # epoch 2's state saved
    assert (tmp_path / "state.safetensors").is_file()
    lines = []
    changed = _loop(tmp_path, log=lines.append, **change)
    assert any("ignoring resume state" in line for line in lines), lines
    assert not any(line.startswith("resumed") for line in lines), lines
    expected = _loop(**change)
    for key in expected:
        assert torch.equal(expected[key], changed[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("every_s, saved", [(None, False), (3600, False), (0, True)])
def test_resume_state_is_written_on_its_interval(tmp_path, every_s, saved):
    """finetune.resume_every_s: a 1 GB write per epoch per job is not what a ViT-B/32 sweep can
    afford; between steps the state is written only once the interval has passed."""
    with pytest.raises(RuntimeError, match="injected failure"):
        _loop(tmp_path, every_s=every_s, fail_at_step=12)
    assert (tmp_path / "state.safetensors").is_file() == saved


@pytest.fixture
def one_thread():
    """Torch on one thread in this process, as `straight` ran (OMP_NUM_THREADS=1): the same sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_keeps_the_trained_weights(smoke_run, straight, tmp_path, monkeypatch, capfd,
                                                                        one_thread):
    """SLURM's time limit can fall after training, while the job evaluates: the trained weights
    are saved, the job fails, and its rerun only evaluates, to the same outputs."""
    import foldsoup.training.loop as train_mod
    from foldsoup.cli import main
    from foldsoup.storage.weights import load_weights

    out, resume = tmp_path / "out", tmp_path / "resume"
    argv = _command(smoke_run, out, resume)[3:]
    real_predict = train_mod.predict_logits

    def sigterm_then_predict(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(train_mod, "predict_logits", sigterm_then_predict)
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert "SIGTERM after training; the trained weights are saved to" in err, err
    tensors, meta = load_weights(resume / "state.safetensors")
    assert meta["progress"]["done"] is True and not any(k.startswith("optim.") for k in tensors)
    assert not (out / "metrics.json").exists()

    monkeypatch.setattr(train_mod, "predict_logits", real_predict)
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "training had finished" in err and " epoch 1/" not in err, err  # no step was trained again
    _assert_same_weights(_weights(straight), _weights(out))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, out))
    assert (a["val_acc"], a["test_acc"], a["fold_accs"], a["final_loss"]) == (b["val_acc"], b["test_acc"], b["fold_accs"], b["final_loss"])
    assert not (resume / "state.safetensors").exists()
