"""Checkpoints trained outside foldsoup (`models_from`) mapped into the configured model: the
whole classifier, foldsoup's `backbone.*` and `head.*` keys, from the file as its training
script saved it.

Read once, never unpickling objects: `.safetensors`, or a torch file with `weights_only=True`;
a `state_dict`/`model` wrapper (training checkpoints, Lightning) is unwrapped and a `module.`
(DataParallel/DDP), `model.` (Lightning) or `_orig_mod.` (torch.compile) prefix shared by every
key removed. Then, by model.name:
* timm: the state dict of the timm model with its classifier (`timm.create_model(arch,
  num_classes=C)`): the classifier's tensors (`pretrained_cfg["classifier"]`, e.g. `fc`,
  `classifier`, `head`, `head.fc`) become `head.*`, every other tensor must fit the backbone
  (models.timm_backbone.check_state: BatchNorm step counters filled, a family's own layout
  converted);
* open_clip: the image tower (keys under `visual.`, also inside a whole CLIP model or an
  `image_encoder.model.visual.` wrapper, or the tower's own keys) plus a linear head named
  `head`, `classifier`, `classification_head`, `fc` or `linear`;
* a file foldsoup wrote itself (`backbone.*`, `head.*`): as it is.
The result must fit the configured model exactly (storage.weights.state_mismatch): an error
names the file and the first tensor that does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from foldsoup.errors import ModelError
from foldsoup.models.classifier import Classifier
from foldsoup.storage.weights import state_mismatch

PREFIXES = ("module.", "model.", "_orig_mod.")
HEAD_NAMES = ("head", "classifier", "classification_head", "fc", "linear")  # open_clip checkpoints' linear heads


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """name -> tensor of a checkpoint file, unwrapped (state_dict/model wrapper, prefixes)."""
    from foldsoup.models.timm_backbone import read_state

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file does not exist (models_from)")
    state = read_state(path)  # .safetensors or weights_only torch file; wrappers and "module." removed
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _is_foldsoup_layout(state: dict, own: dict) -> bool:
    return any(k.startswith("backbone.") for k in state) and all(k.startswith(("backbone.", "head.")) for k in state) \
        and "head.weight" in state and "head.weight" in own


def _head(state: dict, names: tuple[str, ...], model: Classifier, source: str, backbone_keys, what: str) -> tuple[dict, str]:
    """(head.weight/head.bias from the first classifier name the file has, that name)."""
    for name in names:
        if f"{name}.weight" in state and f"{name}.weight" not in backbone_keys:
            found = {f"{name}.{k}": state[f"{name}.{k}"] for k in ("weight", "bias") if f"{name}.{k}" in state}
            problem = state_mismatch(found, {f"{name}.{k}": v for k, v in model.head.state_dict().items()},
                                     f"the configured model's head ({model.head.out_features} classes of the data, "
                                     f"{model.head.in_features} features)",
                                     f"is {name!r} the linear classifier over the data's classes?")
            if problem:
                raise ModelError(f"{source}: {problem}")
            return {k.removeprefix(f"{name}."): v for k, v in found.items()}, name
    others = [k for k in state if k not in backbone_keys]
    shown = f"; tensors the backbone lacks: {', '.join(map(repr, others[:5]))}" if others else ""
    raise ModelError(f"{source}: no classifier {' or '.join(repr(n + '.weight') for n in names)} ({what}){shown}; a "
                     f"checkpoint without its classifier cannot be scored: save the state_dict of the whole model with "
                     f"its linear classifier over the {model.head.out_features} classes")


def classifier_state(model: Classifier, model_cfg: dict, path: str | os.PathLike,
                     log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `model` (the configured classifier, `backbone.*` and `head.*`) from the
    checkpoint at `path`, cast to the model's dtypes. Errors name the file and the tensor."""
    source = str(path)
    state = read_checkpoint(path)
    own = model.state_dict()
    if _is_foldsoup_layout(state, own):
        full = state
    elif model_cfg["name"] == "timm":
        from foldsoup.models.timm_backbone import check_state, classifier_names

        backbone_keys = set(model.backbone.state_dict())
        names = classifier_names(model.backbone)
        head, _ = _head(state, names, model, source, backbone_keys,
                        f"timm's classifier of {model_cfg['arch']}, pretrained_cfg['classifier']")
        backbone = check_state(model.backbone, state, source, log)  # the classifier's tensors dropped
        full = {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in head.items()}}
    elif model_cfg["name"] == "open_clip":
        from foldsoup.models.clip import load_visual_state

        if any(k.startswith("visual.") or ".visual." in k for k in state):
            tower = {k.split("visual.", 1)[1]: v for k, v in state.items()
                     if k.startswith("visual.") or ".visual." in k}
        else:
            tower = {k: v for k, v in state.items() if not k.startswith(tuple(f"{n}." for n in HEAD_NAMES))}
        head, _ = _head(state, HEAD_NAMES, model, source, set(tower) & set(state), "a linear head over the image "
                        "tower's features")
        load_visual_state(model.backbone, tower, source, log)  # in place: checked, fp16/bf16 cast
        full = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
                **{f"head.{k}": v for k, v in head.items()}}
    else:
        raise ModelError(f"models_from: model.name {model_cfg['name']!r} cannot import checkpoints; allowed: 'timm' or "
                         f"'open_clip' (model.arch the checkpoints' architecture)")
    if "head.bias" not in full and "head.bias" in own:
        raise ModelError(f"{source}: the classifier has no bias; the configured model's head is a linear layer with one")
    problem = state_mismatch(full, own, "the configured model", dtypes="kind")
    if problem:
        raise ModelError(f"{source}: {problem}")
    return {k: full[k].to(own[k].dtype) for k in own}
