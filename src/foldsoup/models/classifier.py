"""Models: a pretrained backbone plus a linear head, built the same way in every job.

State dicts use the keys `backbone.*` and `head.*`, so a fine-tuned model, a soup and the
pretrained backbone (saved with the `backbone.` prefix stripped) are interchangeable files.
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """features = backbone(x) (optionally L2-normalised, as CLIP does); logits = head(features)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, normalize_features: bool):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.normalize_features = normalize_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return nn.functional.normalize(f, dim=-1) if self.normalize_features else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


NORMS = ("group", "batch")


def digits_cnn(width: int, norm: str = "group") -> tuple[nn.Module, int]:
    """A small CNN for 8x8 grey images. norm "group" (default): GroupNorm, no running statistics,
    like the ViTs of the paper, so averaging weights is the whole story. "batch": BatchNorm2d in
    the same places, with running statistics and a step counter, like CLIP's ResNets and most timm
    CNNs (what soups of BatchNorm models do: README, "BatchNorm models")."""
    if norm not in NORMS:
        raise ValueError(f"model.norm: {norm!r} is unknown; allowed: {', '.join(repr(n) for n in NORMS)}")

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
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"{source}: weights do not fit the configured model: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {list(state[key].shape)}, the model expects {list(value.shape)}")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])  # in place: keeps the resident model's storage (and device)
