"""Models: a pretrained backbone plus a linear head, built the same way in every job.

State dicts use the keys `backbone.*` and `head.*`, so a fine-tuned model, a soup and the
pretrained backbone (saved with the `backbone.` prefix stripped) are interchangeable files.
"""

from __future__ import annotations

import torch
from torch import nn

from foldsoup.errors import ModelError, WeightsError
from foldsoup.storage.weights import state_mismatch


def is_convolutional(backbone: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN (a ViT has one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) > 1


class Classifier(nn.Module):
    """features = backbone(x) (optionally L2-normalised, as CLIP does); logits = head(features).

    A convolutional backbone holds its weights, and takes its images, in channels_last (NHWC)
    layout: oneDNN on the CPU and cuDNN on the GPU run convolutions faster so (EfficientNet-Lite0,
    a training step of 64 images at 64 px on 2 CPU threads: 0.60 s NCHW, 0.33 s NHWC; docs/benchmarks.md,
    Speed). State dicts are saved contiguous, so files do not depend on it."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, normalize_features: bool):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.normalize_features = normalize_features
        self.channels_last = is_convolutional(backbone)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.backbone(x)
        return nn.functional.normalize(f, dim=-1) if self.normalize_features else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


NORMS = ("group", "batch")


def digits_cnn(width: int, norm: str = "group") -> tuple[nn.Module, int]:
    """A small CNN for 8x8 grey images. norm "group" (default): GroupNorm, no running statistics,
    like the ViTs of the paper, so averaging weights is the whole story. "batch": BatchNorm2d in
    the same places, with running statistics and a step counter, like CLIP's ResNets and most timm
    CNNs (what soups of BatchNorm models do: docs/batchnorm.md)."""
    if norm not in NORMS:
        raise ModelError(f"model.norm: {norm!r} is unknown; allowed: {', '.join(repr(n) for n in NORMS)}")

    def block(cin: int, cout: int) -> list[nn.Module]:
        layer = nn.GroupNorm(8, cout) if norm == "group" else nn.BatchNorm2d(cout)
        return [nn.Conv2d(cin, cout, 3, padding=1), layer, nn.GELU()]

    w2 = 2 * width
    net = nn.Sequential(
        *block(1, width),
        *block(width, w2),
        nn.MaxPool2d(2),
        *block(w2, w2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, w2


def backbone_state(model: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.backbone.state_dict().items()}


def load_backbone(model: Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    _load_strict(model.backbone, state, source)


def load_full(model: Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    _load_strict(model, state, source)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error naming the file and the first mismatching tensor."""
    own = module.state_dict()
    problem = state_mismatch(state, own, "the model")
    if problem:
        raise WeightsError(f"{source}: {problem}")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])  # in place: keeps the resident model's storage (and device)
