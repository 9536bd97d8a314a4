"""The fine-tune recipe on pretrained weights (issue 23): BatchNorm frozen in fine-tuning, an
L2-regularised linear probe whose strength is chosen without the fold's val part, and the
first-step guard that tells a fine-tune which started where its probe left it from one which
did not. On real ImageNet weights the old recipe (train-mode BatchNorm, an unregularised probe on
per-dimension standardised features) started every fine-tune at a loss of hundreds (README,
Recipe); these tests pin each part on tiny models with known answers.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from foldsoup.models.build import build_classifier  # noqa: E402
from foldsoup.models.classifier import Classifier  # noqa: E402
from foldsoup.training.guard import FAR_FACTOR, FAR_MARGIN, started_far  # noqa: E402
from foldsoup.training.loop import (  # noqa: E402
    ImageSpec,
    LoopConfig,
    extract_features,
    fit_logistic,
    linear_probe,
    set_train_mode,
    train,
)

SPEC = ImageSpec(8, [0.5], [0.5], False)
MINIMAL = {"scale": [1.0, 1.0], "rotate": 0, "translate": 0.0, "jitter": 0.0, "erase": 0.0}
LP = {"l2": [0.001, 0.01, 0.1, 1.0], "inner_val_fraction": 0.25, "max_iter": 100, "batch_size": 64}


def quiet(_message: str) -> None:
    pass


def bn_classifier() -> Classifier:
    torch.manual_seed(0)
    return build_classifier({"name": "digits_cnn", "width": 8, "norm": "batch"}, 3)


def digit_like(n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 8x8 images whose class shows as a bright row (row 2c), over noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 120, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    for i, c in enumerate(labels.tolist()):
        images[i, 0, 2 * c] = 250
    return images, labels


def loop_config(batchnorm: str, lr: float = 1e-3, epochs: int = 1) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=8, lr=lr, weight_decay=0.0, warmup_steps=1, grad_clip=None,
                      label_smoothing=0.0, precision="fp32", aug=MINIMAL, mixup_alpha=None, seed=0, tag="test",
                      batchnorm=batchnorm)


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


# ---------------------------------------------------------------- 1. BatchNorm in fine-tuning


def test_frozen_batchnorm_trains_its_affine_weights_but_keeps_the_running_statistics():
    model = bn_classifier()
    images, labels = digit_like()
    before_stats = statistics(model)
    before_affine = [bn.weight.detach().clone() for bn in batchnorm_layers(model)]
    stats = train(model, images, labels, SPEC, loop_config("frozen", lr=1e-2), quiet)
    assert stats["steps"] == 6
    after = statistics(model)
    assert all(torch.equal(before_stats[k], after[k]) for k in before_stats), "frozen BatchNorm changed its statistics"
    assert any(not torch.equal(b, bn.weight) for b, bn in zip(before_affine, batchnorm_layers(model)))


def test_train_mode_batchnorm_updates_statistics_and_counters():
    model = bn_classifier()
    images, labels = digit_like()
    train(model, images, labels, SPEC, loop_config("train"), quiet)
    first = batchnorm_layers(model)[0]
    assert int(first.num_batches_tracked) == 6
    assert not torch.equal(first.running_mean, torch.zeros_like(first.running_mean))


def test_set_train_mode_puts_only_batchnorm_in_eval():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    set_train_mode(model, "frozen")
    assert model.training and model[2].training and model[0].training
    assert not model[1].training
    set_train_mode(model, "train")
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"finetune.batchnorm: 'eval' is unknown; allowed: frozen, train"):
        set_train_mode(model, "eval")


# ---------------------------------------------------------------- 2. the linear probe


def test_fit_logistic_is_sklearns_l2_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(120, 5, generator=gen, dtype=torch.float64)
    labels = (z[:, 0] + 0.5 * torch.randn(120, generator=gen, dtype=torch.float64) > 0).long() + (z[:, 1] > 1).long()
    l2 = 0.05
    weight, bias = fit_logistic(z, labels, 3, l2, max_iter=500)
    # sklearn minimises 1/2 |W|^2 + C sum CE: ours (mean CE + l2/2 |W|^2) divided by l2, C = 1/(n l2).
    ref = sklearn.LogisticRegression(C=1 / (len(z) * l2), tol=1e-10, max_iter=10_000).fit(z.numpy(), labels.numpy())
    ours = torch.softmax(z @ weight.T + bias, 1)
    torch.testing.assert_close(ours, torch.from_numpy(ref.predict_proba(z.numpy())), atol=1e-5, rtol=0)


def flat_classifier() -> Classifier:
    """Features = the normalised pixels themselves (64 of them), so a test sets the features."""
    return Classifier(nn.Flatten(), 64, 3, normalize_features=False)


def test_probe_weights_are_bounded_by_the_penalty_even_on_near_constant_features():
    # Pixel (0, 0) tells the class but varies by 1 grey level of 255; per-dimension
    # standardisation turned such a feature into weights of thousands (max |w| 3,591 on
    # EfficientNet-Lite0). With one isotropic scale s, the fit's objective at W = 0 is ln 3, so
    # l2/2 |W_z|^2 <= ln 3 and every raw weight is at most sqrt(2 ln 3 / l2) / s.
    images, labels = digit_like(90)
    images[:, 0, 0, 0] = 100 + (labels == 0).to(torch.uint8)
    model = flat_classifier()
    head, fit = linear_probe(model, images, labels, SPEC, LP, "fp32", 0, quiet)
    bound = math.sqrt(2 * math.log(3) / fit["l2"]) / fit["feature_scale"]
    assert fit["max_abs_weight"] <= bound * (1 + 1e-4)
    assert head["weight"].abs().max().item() == pytest.approx(fit["max_abs_weight"])
    # The head is the fit's function of the raw features (centring and scale folded in).
    feats = extract_features(model, images, SPEC, 64, "fp32")
    assert fit["train_acc"] == pytest.approx((model.head(feats).argmax(1) == labels).float().mean().item())


def test_l2_is_chosen_on_the_inner_split_by_its_loss():
    model = flat_classifier()
    images, labels = digit_like(120)
    _, fit = linear_probe(model, images, labels, SPEC, LP, "fp32", 0, quiet)
    assert set(fit["sweep"]) == {"0.001", "0.01", "0.1", "1"}
    assert fit["l2"] == min(LP["l2"], key=lambda v: fit["sweep"][f"{v:g}"]["loss"])
    assert fit["l2"] < 1.0  # a visible class: the weakest penalties fit it better
    # Labels that are noise: the strongest penalty (the class priors) has the lowest held-out loss.
    noise = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    images_noise = torch.randint(0, 255, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    _, fit_noise = linear_probe(model, images_noise, noise, SPEC, LP, "fp32", 0, quiet)
    assert fit_noise["l2"] == 1.0


def test_one_strength_is_no_sweep():
    _, fit = linear_probe(flat_classifier(), *digit_like(30), SPEC, {**LP, "l2": [0.1]}, "fp32", 0, quiet)
    assert fit["l2"] == 0.1 and fit["sweep"] == {}


# ---------------------------------------------------------------- 3. the first-step guard


def test_started_far_rule():
    assert not started_far(FAR_FACTOR * 0.5 + FAR_MARGIN, 0.5)
    assert started_far(FAR_FACTOR * 0.5 + FAR_MARGIN + 1e-6, 0.5)
    assert started_far(float("nan"), 0.5) and started_far(float("inf"), 0.5)
    assert not started_far(None, 0.5) and not started_far(3.0, None)


def shifted_statistics_model() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    """A BatchNorm model whose running variances are 100x its batches': what pretrained
    statistics are to a new domain. Its probe is fit (in eval mode) on the running statistics."""
    model = bn_classifier()
    for bn in batchnorm_layers(model):
        bn.running_var.fill_(100.0)
    images, labels = digit_like(64)
    linear_probe(model, images, labels, SPEC, {**LP, "l2": [0.1]}, "fp32", 0, quiet)
    return model, images, labels


# A learning rate too small to move the weights: the guard's losses then measure the start alone.
STILL = 1e-9


def test_guard_sees_a_start_far_from_the_probe_under_batch_statistics():
    model, images, labels = shifted_statistics_model()
    stats = train(model, images, labels, SPEC, loop_config("train", lr=STILL), quiet)
    assert stats["first_step_loss"] > 10 * stats["lp_step_loss"]
    assert stats["started_far"] is True


def test_guard_passes_frozen_batchnorm_whose_first_step_is_the_probe():
    model, images, labels = shifted_statistics_model()
    messages: list[str] = []
    stats = train(model, images, labels, SPEC, loop_config("frozen", lr=STILL), messages.append)
    # Frozen BatchNorm and no dropout: the first training forward is the probe's own function.
    assert stats["first_step_loss"] == pytest.approx(stats["lp_step_loss"], rel=1e-6)
    assert stats["started_far"] is False
    assert any("first-step guard" in m for m in messages) and not any("WARNING" in m for m in messages)


# ---------------------------------------------------------------- the CNN route's memory layout


def test_convolutional_backbones_run_channels_last_and_save_plain_files(tmp_path):
    from foldsoup.storage.weights import load_weights, save_weights

    model = bn_classifier()
    assert model.channels_last
    conv = model.backbone[3]  # 8 -> 16 channels (with 1 input channel both layouts are the same)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    images, _ = digit_like(16)
    x = (images.float() / 255 - 0.5) / 0.5
    model.eval()
    reference = bn_classifier().eval()
    reference.channels_last = False
    reference.backbone.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)  # the same function
    save_weights(tmp_path / "m.safetensors", model.state_dict(), {})
    assert all(t.is_contiguous() for t in load_weights(tmp_path / "m.safetensors")[0].values())
    # One convolution (a ViT's patch embedding) is not a CNN.
    vit_like = Classifier(nn.Sequential(nn.Conv2d(1, 4, 4, stride=4), nn.Flatten()), 16, 3, normalize_features=False)
    assert not vit_like.channels_last


def test_resumed_moments_take_their_channels_last_weights_layout():
    # torch's fused AdamW pairs a weight with its moments by memory position: moments read back
    # from a file (contiguous) beside a channels_last weight updated the wrong elements.
    from foldsoup.training.optim import AdamW

    torch.manual_seed(0)
    start = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last) for _ in range(3)]

    def steps(param: torch.Tensor, opt: AdamW, gs: list[torch.Tensor]) -> None:
        for g in gs:
            param.grad = g.clone()
            opt.step()

    straight = start.clone().requires_grad_()
    opt = AdamW([straight], lr=0.1, weight_decay=0.1)
    steps(straight, opt, grads)
    half = start.clone().requires_grad_()
    first = AdamW([half], lr=0.1, weight_decay=0.1)
    steps(half, first, grads[:1])
    saved = {k: v.contiguous() for k, v in first.state_tensors().items()}  # as a resume file holds them
    resumed = AdamW([half], lr=0.1, weight_decay=0.1)
    resumed.load_state_tensors(saved)
    assert resumed.optimizer.state[half]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    steps(half, resumed, grads[1:])
    assert torch.equal(half.detach(), straight.detach())


def test_a_diverged_run_keeps_its_guard_losses():
    """A run that diverges says how it started: the losses measured before it diverged travel
    with Diverged, and only a run that diverged within its first epoch counts as started far."""
    from foldsoup.errors import Diverged
    from foldsoup.training.loop import guard_stats

    model, images, labels = shifted_statistics_model()
    with pytest.raises(Diverged) as info:
        train(model, images, labels, SPEC, loop_config("frozen", lr=1e30), quiet)
    assert info.value.guard["lp_step_loss"] > 0 and "first_step_loss" in info.value.guard
    assert "first_epoch_loss" not in info.value.guard  # it diverged in its first epoch
    assert guard_stats(info.value.guard, diverged=True)["started_far"] is True
    calm = {"lp_step_loss": 0.2, "first_step_loss": 0.2, "first_epoch_loss": 0.25}  # diverged later
    assert guard_stats(calm, diverged=True) == {**calm, "started_far": False}
    assert guard_stats({}, diverged=True)["started_far"] is False  # nothing measured: unknown, not flagged
