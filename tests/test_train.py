"""Training pieces: our AdamW equals torch's, the schedule, augmentation, resume equality."""

import math

import pytest
import torch

from foldsoup.training.augment import eval_transform, mixup, train_transform
from foldsoup.models.build import build_classifier
from foldsoup.training.optim import AdamW
from foldsoup.training.loop import ImageSpec, LoopConfig, ResumeStore, lr_factor, train

AUG = {"scale": [0.35, 1.0], "rotate": 20, "translate": 0.15, "jitter": 0.4, "erase": 0.25}


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch(fused):
    """The learning rate set per step reaches torch's optimizer; fused or foreach, the same
    update as torch.optim.AdamW's default (single-tensor/foreach) implementation."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    b = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    ours = AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert ours.fused == fused
    for step in range(20):
        x = torch.randn(16, 5)
        lr = 1e-2 * lr_factor(step, 5, 20)
        ours.lr = lr
        for g in ref.param_groups:
            g["lr"] = lr
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    assert int(ours.state_tensors()["step"]) == 20 and ours.lr == pytest.approx(1e-2 * lr_factor(19, 5, 20))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_schedule_warms_up_then_decays_to_zero():
    total, warmup = 100, 10
    factors = [lr_factor(s, warmup, total) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(factors[9:], factors[10:]))
    assert factors[-1] < 1e-3
    assert lr_factor(0, 500, 20) == pytest.approx(1 / 20)  # warm-up capped at the run's length


def test_train_transform_shapes_randomness_and_reproducibility():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = train_transform(images, 224, [0.5] * 3, [0.25] * 3, AUG, True, g1)
    b = train_transform(images, 224, [0.5] * 3, [0.25] * 3, AUG, True, g2)
    assert a.shape == (6, 3, 224, 224) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)  # same generator state, same batch
    c = train_transform(images, 224, [0.5] * 3, [0.25] * 3, AUG, True, g1)
    assert not torch.allclose(a, c)  # the stream moves on


def test_eval_transform_resizes_and_normalises():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = eval_transform(images, 224, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25


def test_mixup_is_a_convex_combination():
    x = torch.arange(12.0).view(4, 3)
    y = torch.eye(4)
    mx, my = mixup(x, y, 0.7, torch.Generator().manual_seed(0))
    assert torch.allclose(my.sum(1), torch.ones(4))
    assert torch.allclose(my.max(1).values >= 0.7 - 1e-6, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(mx.sum(), x.sum())  # a permutation mixes mass, never creates it


def _tiny_run(tmp_path, resume_dir=None, fail_at_step=None):
    torch.manual_seed(0)
    model = build_classifier({"name": "digits_cnn", "width": 8, "normalize_features": False}, 3)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    spec = ImageSpec(8, [0.5], [0.5], False)
    cfg = LoopConfig(3, 8, 1e-3, 0.1, 2, 1.0, 0.0, "fp32", AUG, 0.4, 0, "test/fold0")
    store = ResumeStore(resume_dir, every_s=0) if resume_dir else None  # saved before every step
    train(model, images, labels, spec, cfg, lambda m: None, store, fail_at_step=fail_at_step)
    return model


@pytest.mark.slow
def test_resume_after_a_crash_gives_the_same_weights(tmp_path):
    straight = _tiny_run(tmp_path)
    resume = tmp_path / "resume"
    with pytest.raises(RuntimeError, match="injected failure"):
        _tiny_run(tmp_path, resume, fail_at_step=12)  # dies in epoch 3 (5 steps per epoch)
    assert (resume / "state.safetensors").is_file()
    resumed = _tiny_run(tmp_path, resume)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_divergence_names_the_run_and_step():
    from foldsoup.errors import Diverged

    torch.manual_seed(0)
    model = build_classifier({"name": "digits_cnn", "width": 8, "normalize_features": False}, 3)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    spec = ImageSpec(8, [0.5], [0.5], False)
    cfg = LoopConfig(1, 8, math.inf, 0.0, 0, None, 0.0, "fp32", AUG, None, 0, "lr_inf/fold3")
    with pytest.raises(Diverged, match=r"lr_inf/fold3: loss became non-finite at step \d+"):
        train(model, images, torch.zeros(16, dtype=torch.long), spec, cfg, lambda m: None)


def test_adamw_resumes_exactly():
    """An optimiser restored from state_tensors (as resume files store them) continues bitwise
    like the one that never stopped, also for a parameter that missed a step's gradient; files
    saved with one common step (before per-parameter steps) still load."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    whole, first = AdamW(nets[0].parameters(), 1e-2, 0.1), AdamW(nets[1].parameters(), 1e-2, 0.1)
    xs = [torch.randn(8, 4) for _ in range(6)]

    def step(net, opt, x, freeze_first=False):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        if freeze_first:
            net[0].bias.grad = None  # skipped in this step: its own step count stays behind
        opt.step()

    for i, x in enumerate(xs[:3]):
        step(nets[0], whole, x, freeze_first=i == 1)
        step(nets[1], first, x, freeze_first=i == 1)
    saved = first.state_tensors()
    assert int(saved["step"]) == 3 and int(saved["step.1"]) == 2 and int(saved["step.0"]) == 3
    resumed = AdamW(nets[2].parameters(), 1e-2, 0.1)
    nets[2].load_state_dict(nets[1].state_dict())
    resumed.load_state_tensors(saved)
    for x in xs[3:]:
        step(nets[0], whole, x)
        step(nets[2], resumed, x)
    for pa, pb in zip(nets[0].parameters(), nets[2].parameters()):
        assert torch.equal(pa, pb)
    assert int(resumed.state_tensors()["step"]) == int(whole.state_tensors()["step"]) == 6

    old = AdamW(torch.nn.Linear(4, 6).parameters(), 1e-2, 0.1)
    old.load_state_tensors({k: v for k, v in saved.items() if not k.startswith("step.")} | {"step": torch.tensor(3)})
    assert int(old.state_tensors()["step"]) == 3 and int(old.state_tensors()["step.1"]) == 3


@pytest.mark.slow
def test_compiled_forward_trains_like_eager():
    """finetune.compile: the same run through torch.compile (inductor, a C++ compiler on CPU)
    ends with the same weights up to float reassociation, and the model's own state is what
    was trained (the compiled module shares its parameters)."""
    from dataclasses import replace

    def run(compile_: bool):
        torch.manual_seed(0)
        model = build_classifier({"name": "digits_cnn", "width": 8, "normalize_features": False}, 3)
        images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(32) % 3
        cfg = LoopConfig(2, 8, 1e-3, 0.1, 2, 1.0, 0.0, "fp32", AUG, None, 0, "test/fold0")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        stats = train(model, images, labels, ImageSpec(8, [0.5], [0.5], False), replace(cfg, compile=compile_), lambda m: None)
        return model.state_dict(), before, stats

    eager, before, eager_stats = run(False)
    compiled, _, compiled_stats = run(True)
    assert set(compiled) == set(eager)  # no _orig_mod. prefixes
    assert any(not torch.equal(compiled[k], before[k]) for k in before)  # it trained
    # Adam divides by the gradient's running scale, so a rounding difference in a near-zero
    # gradient can move a weight by up to ~lr per step: allow that, and ask that most
    # weights agree far more closely.
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-3 * 8)
    diffs = torch.cat([(compiled[k] - eager[k]).abs().flatten() for k in eager])
    assert diffs.median() < 1e-6
    assert compiled_stats["final_loss"] == pytest.approx(eager_stats["final_loss"], rel=1e-4)
