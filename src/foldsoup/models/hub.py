"""Pretrained weights from outside foldsoup, for open_clip and timm alike: the state dict inside
a checkpoint file, and one line for weights that could not be fetched from the Hugging Face hub
(or their URL), with the ways out without network."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from foldsoup.errors import ModelError


def checkpoint_state(obj: object, path: Path, wrappers: Iterable[str] = ("state_dict",)) -> dict:
    """The name -> value dict of a loaded checkpoint: unwrapped from the first of `wrappers`
    that holds a dict (a training checkpoint's "state_dict", ...), with string keys and a
    DataParallel "module." prefix removed. The values are the caller's to check (a CLIP file
    holds text-tower entries the image tower never reads)."""
    if isinstance(obj, dict):
        for wrapper in wrappers:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ModelError(f"{path}: state dict key {key!r} is not a string")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def tensors_only(state: dict, path: Path) -> dict:
    """`state`, refused naming the first entry that is not a tensor."""
    import torch

    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def fetch_failure(library: str, arch: str, tag: str, exc: Exception, where: Callable[[], tuple[str, str]]) -> str:
    """`where()` -> (where the weights come from, the local-file way out); called only for a
    failed download, as it may look up the tag's configuration."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    root = chain[-1]
    cause = f"{type(root).__name__}: {(str(root).splitlines() or [''])[0][:160]}"
    if not any(isinstance(e, OSError) for e in chain):  # not a download: a damaged cache file, ...
        return f"model.pretrained: {library} could not load the {tag!r} weights of {arch!r} ({cause})"
    from huggingface_hub import constants

    source, local = where()
    if constants.HF_HUB_OFFLINE:
        return (f"model.pretrained: the {tag!r} weights of {arch!r} are not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} and HF_HUB_OFFLINE=1 forbids downloading them from {source}; {local}, or "
                f"fill that cache (HF_HOME) on a machine with network and copy it here")
    return (f"model.pretrained: {library} could not download the {tag!r} weights of {arch!r} from {source} ({cause}); "
            f"without network, {local}, or copy a Hugging Face cache filled on a machine with network to HF_HOME "
            f"(now {constants.HF_HOME}) and set HF_HUB_OFFLINE=1, which also fails at once instead of retrying")
