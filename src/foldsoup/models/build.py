"""Building the configured model: the backbone of `model.name` plus the project's linear head.

Architecture only (random weights): pretrained weights come from pretrained/backbone.safetensors,
which the `pretrain` step writes once per run."""

from __future__ import annotations

from torch import nn

from foldsoup.errors import ModelError
from foldsoup.models.classifier import Classifier, digits_cnn


def build_backbone(model_cfg: dict, image_size: int | None = None) -> tuple[nn.Module, int]:
    """Architecture only (random weights); pretrained weights come from pretrained/backbone.safetensors.
    `image_size` (data.image_size) shapes the models whose weights depend on it (a timm ViT's
    position embedding); the others ignore it."""
    name = model_cfg["name"]
    if name == "digits_cnn":
        # .get: the model config in the metadata of weights saved before model.norm existed.
        return digits_cnn(model_cfg["width"], model_cfg.get("norm", "group"))
    if name == "open_clip":
        from foldsoup.models.clip import (
            open_clip_visual,  # open_clip imported only when used
        )

        # .get: weights saved before model.quick_gelu existed rebuild as they were built then.
        return open_clip_visual(model_cfg["arch"], model_cfg.get("pretrained"), model_cfg.get("quick_gelu"))
    if name == "timm":
        from foldsoup.models.timm_backbone import (
            timm_backbone,  # timm imported only when used
        )

        return timm_backbone(model_cfg["arch"], image_size)
    raise ModelError(f"model.name {name!r} is unknown")


def build_classifier(model_cfg: dict, num_classes: int, image_size: int | None = None) -> Classifier:
    backbone, dim = build_backbone(model_cfg, image_size)
    return Classifier(backbone, dim, num_classes, model_cfg.get("normalize_features", False))
