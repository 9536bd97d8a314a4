"""What a file is, in a few words, for the one-line errors about files handed to foldsoup.

A command given the wrong file should say what that file is (a folder, an empty or cut-short
file, a pickle, a CSV, a dataset where weights belong) and what to give instead. The loaders
(weights.load_weights, data.load_prepared, folds.read_folds, usage.read_images) build their
messages from these phrases. Cheap to import; reads a file's first bytes or its safetensors
header only, and never unpickles anything.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# The extensions of weights files (model.pretrained): a value ending so is a file, not a pretrained tag.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def is_checkpoint_path(pretrained: str | None) -> bool:
    """A local file (existing, or spelled like a path) rather than a pretrained tag."""
    return bool(pretrained) and (os.path.isfile(pretrained) or os.sep in pretrained
                                 or str(pretrained).endswith(CHECKPOINT_SUFFIXES))


# safetensors refuses headers larger than this; a larger length field is not a safetensors file.
SAFETENSORS_MAX_HEADER = 100_000_000
_SNIFF_BYTES = 512
_NEVER_UNPICKLED = "foldsoup never unpickles: a pickle can run code"

# First bytes of the files people hand over by mistake.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
)


def missing(path: Path) -> str:
    """'does not exist', with a close file name of the same folder offered when there is one."""
    parent = path.parent
    if not parent.is_dir():
        return f"does not exist (nor does its folder {str(parent)!r})"
    def likeness(name: str) -> float:  # stem and extension each alike: 'gsg.safetensors' ~ 'gsgs.safetensors'
        other = Path(name)
        return min(difflib.SequenceMatcher(None, path.stem, other.stem).ratio(),
                   difflib.SequenceMatcher(None, path.suffix, other.suffix).ratio() if path.suffix or other.suffix else 1.0)

    scored = [(likeness(p.name), p.name) for p in parent.iterdir() if not p.name.startswith(".")]
    score, name = max(scored, default=(0.0, ""))
    return f"does not exist; did you mean {str(parent / name)!r}?" if score >= 0.75 else "does not exist; check the path"


def in_folder(folder: Path, candidates: Iterable[str]) -> Path | None:
    """The first of `candidates` (glob patterns, relative to `folder`) that names a file in it."""
    for pattern in candidates:
        for hit in sorted(folder.glob(pattern)):
            if hit.is_file():
                return hit
    return None


def folder_given(folder: Path, candidates: Iterable[str], noun: str) -> str:
    """'is a folder; give <noun> ...', naming a matching file inside it when there is one."""
    hit = in_folder(folder, candidates)
    return f"is a folder; give {noun}" + (f", e.g. {str(hit)!r}" if hit else " (a file, not a folder)")


def head_bytes(path: Path, n: int = _SNIFF_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _text_kind(head: bytes) -> str | None:
    """'a JSON file ('{"hp": ...')', 'a CSV file (...)', 'a text file (...)' for text, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not a multi-byte character cut by the sniff window
            return None
        text = head[: exc.start].decode("utf-8")
    if not text or any(not (c.isprintable() or c in "\t\r\n") for c in text):
        return None
    shown = " ".join(text.split())
    shown = shown[:40] + ("..." if len(shown) > 40 else "")
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    kind = "a JSON file" if first[:1] in "{[" and first else "a CSV file" if "," in first else "a text file"
    return f"{kind} (starting {shown!r})"


def _zip_kind(path: Path) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "a zip archive"
    if any(n.endswith("data.pkl") for n in names):
        return f"a PyTorch checkpoint (torch.save; {_NEVER_UNPICKLED})"
    if names and all(n.endswith(".npy") for n in names):
        return "a NumPy .npz archive"
    return "a zip archive"


def sniff(path: Path) -> str | None:
    """What a file that is not the expected kind looks like from its first bytes: 'empty (0 bytes)',
    'a PNG image', 'a pickle ...', 'a CSV file (starting ...)', ...; None when nothing is recognised."""
    head = head_bytes(path)
    if not head:
        return "empty (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol 2..5 opcode
        return f"a pickle (torch.save or pickle.dump; {_NEVER_UNPICKLED})"
    if _safetensors_header(head) is not None:
        return "a safetensors file"
    return _text_kind(head)


def _safetensors_header(head: bytes) -> int | None:
    """The header length a safetensors file of this start would have, or None if it is not one."""
    if len(head) < 9:
        return None
    n = int.from_bytes(head[:8], "little")
    return n if 0 < n <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{" else None


def unreadable_safetensors(path: Path, exc: BaseException) -> tuple[str, bool]:
    """Why safetensors could not read `path` (a file): (what it is, damaged). `damaged` is True
    for a safetensors file that is empty, cut short or corrupt (write or copy it again), False
    for another kind of file (give the right one)."""
    size = path.stat().st_size
    head = head_bytes(path)
    if size == 0:
        return "empty (0 bytes): an interrupted write or copy", True
    n = _safetensors_header(head)
    if n is None:
        what = sniff(path)
        if what is not None:
            return what, False
        if size < 9:
            return f"cut short ({size} bytes, less than a safetensors header)", True
        return f"not a safetensors file, or a corrupt one ({type(exc).__name__}: {exc})", True
    if 8 + n > size:
        return f"cut short inside its header ({size} bytes, the header alone needs {8 + n})", True
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, OSError):
        return f"a corrupt safetensors file ({type(exc).__name__}: {exc})", True
    if 8 + n + end > size:
        return f"cut short ({size} of {8 + n + end} bytes): an interrupted write or copy", True
    return f"a corrupt safetensors file ({type(exc).__name__}: {exc})", True


def safetensors_contents(keys: Iterable[str], metadata: Mapping[str, object]) -> str | None:
    """What a readable safetensors file written by foldsoup holds, e.g. 'a prepared dataset',
    or None when its tensors and metadata match none of foldsoup's files."""
    keys = set(keys)
    if keys & {"pool_images", "test_images"}:
        return "a prepared dataset"
    if "test_logits" in keys:
        return "a model's saved logits (a predictions file)"
    if "progress" in metadata and any(k.startswith("optim.") for k in keys):
        return "a fine-tune's resume state"
    kind = metadata.get("kind")
    if kind == "backbone":
        return "the pretrained backbone alone (no head, no class names)"
    if kind == "head":
        return "a linear-probe head alone (no backbone)"
    if kind in ("finetune", "import", "soup") or ("head.weight" in keys and any(k.startswith("backbone.") for k in keys)):
        return "model weights"
    return None
