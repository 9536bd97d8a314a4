"""One line for pretrained weights that open_clip or timm could not fetch from the Hugging Face
hub (or their URL): without network, the ways out."""

from __future__ import annotations

from collections.abc import Callable


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
