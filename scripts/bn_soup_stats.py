"""BatchNorm soups (a measurement, not a test): the soup's running statistics averaged like weights
(what foldsoup does) against recomputed for the soup with `torch.optim.swa_utils.update_bn`, as
SWA does, on several sets of images.

Trains the embedded default with `model.norm: batch` (the demo's grid x folds, through the same
pipeline functions the workflow rules call; finished steps are kept), or reads a finished run's
folder, builds the uniform soup and the greedy soup, and prints for each: val (MinAcc over the
soup's folds), holdout and test accuracy with averaged statistics and with statistics recomputed
on

  union      the pool images of the ingredients' training parts (every D_train,i, i in the soup's
             folds). For a soup of two or more folds this holds every val image of those folds:
             it leaks into the soup's validation (MinAcc), not into the holdout;
  disjoint   the pool images of no val fold of the soup (the training parts' intersection; the
             holdout excluded): leaks into nothing, but is empty for a soup of all k folds;
  holdout    the outer holdout (folds.holdout_fraction > 0): leaks into the holdout score only;
  pretrain   the backbone's pretraining images (other classes): leaks into nothing.

  .venv/bin/python scripts/bn_soup_stats.py --results /tmp/bn-soups              # seed 0
  .venv/bin/python scripts/bn_soup_stats.py --results /tmp/bn-soups --seeds 0 1 2
  .venv/bin/python scripts/bn_soup_stats.py --results results-rn50 --no-train --configfile my-rn50.yaml
                                                      # a finished run of any BatchNorm model, its own config
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from foldsoup import steps  # noqa: E402
from foldsoup.training.augment import eval_transform  # noqa: E402
from foldsoup.config.schema import grid_points, validate  # noqa: E402
from foldsoup.config.yaml_files import deep_update, load_yaml_files  # noqa: E402
from foldsoup.data.folds import HOLDOUT, train_indices  # noqa: E402
from foldsoup.models.classifier import load_full  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402

SOUPS = ("uniform_soup", "greedy_soup")
SOURCES = ("averaged", "union", "disjoint", "holdout", "pretrain")


class Paths:
    """The results layout of docs/ARCHITECTURE.md."""

    def __init__(self, root: Path):
        self.root = root
        self.data = str(root / "prepared" / "dataset.safetensors")
        self.folds = str(root / "folds.csv")
        self.backbone = str(root / "pretrained" / "backbone.safetensors")

    def head(self, fold: int) -> str:
        return str(self.root / "lp" / f"fold{fold}" / "head.safetensors")

    def model(self, hp: str, fold: int) -> Path:
        return self.root / "models" / hp / f"fold{fold}"

    def soup(self, name: str) -> Path:
        return self.root / "soups" / f"{name}.safetensors"


def train_run(cfg: dict, p: Paths) -> None:
    """Every step of the workflow up to the two soups; a step whose output exists is skipped."""
    k, hps = cfg["folds"]["k"], [g.name for g in grid_points(cfg)]
    if not Path(p.data).is_file():
        steps.prepare(cfg, p.data)
    if not Path(p.folds).is_file():
        steps.folds(cfg, p.data, p.folds)
    if not Path(p.backbone).is_file():
        steps.pretrain(cfg, p.data, p.backbone)
    for fold in range(k):
        if not Path(p.head(fold)).is_file():
            steps.linear_probe(cfg, p.data, p.folds, p.backbone, fold, p.head(fold))
    for hp in hps:
        for fold in range(k):
            out = p.model(hp, fold)
            if not (out / "metrics.json").is_file():
                steps.finetune(cfg, p.data, p.folds, p.backbone, p.head(fold), hp, fold, str(out),
                                  str(p.root / ".resume" / hp / f"fold{fold}"))
    models = [str(p.model(hp, f) / "model.safetensors") for hp in hps for f in range(k)]
    metrics = [str(p.model(hp, f) / "metrics.json") for hp in hps for f in range(k)]
    if not p.soup("uniform_soup").is_file():
        steps.uniform_all(cfg, p.data, p.folds, models, metrics, str(p.soup("uniform_soup")))
    if not p.soup("greedy_soup").is_file():
        steps.greedy_all(cfg, p.data, p.folds, models, metrics, str(p.soup("greedy_soup")))


def stat_images(ctx, source: str, folds: list[int]) -> np.ndarray | None:
    """uint8 images to recompute the statistics on; None where the source is empty."""
    d, fold_of = ctx.data, ctx.fold_of
    if source == "pretrain":
        return d.pretrain_images
    if source == "union":
        idx = np.unique(np.concatenate([train_indices(fold_of, i) for i in folds]))
    elif source == "disjoint":
        idx = np.flatnonzero((fold_of != HOLDOUT) & ~np.isin(fold_of, folds))
    else:
        idx = np.flatnonzero(fold_of == HOLDOUT)
    return d.pool_images[idx] if len(idx) else None


def leaks(source: str, folds: list[int]) -> str:
    """What the statistics' images would also score: the soup's val folds, the holdout, or nothing."""
    if source == "union":
        return "val" if len(folds) > 1 else "no"
    if source == "holdout":
        return "holdout"
    return "no" if source != "averaged" else "-"


@torch.no_grad()
def recompute(ctx, state: dict, images: np.ndarray) -> dict:
    """The soup with BatchNorm statistics recomputed on `images` (update_bn: one pass, cumulative
    average over the finetune.batch_size batches, no augmentation)."""
    model = ctx.model()
    load_full(model, state, "soup")
    size, spec = ctx.cfg["finetune"]["batch_size"], ctx.spec
    x = ctx.tensor(images)
    # A generator: one transformed batch at a time (224-pixel CIFAR-10 would not fit at once).
    batches = (eval_transform(x[s:s + size], spec.size, spec.mean, spec.std) for s in range(0, len(x), size))
    torch.optim.swa_utils.update_bn(batches, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def measure(cfg: dict, p: Paths) -> list[dict]:
    ctx = steps.Context(cfg, p.data, p.folds)
    ev = ctx.evaluator()
    rows = []
    for name in SOUPS:
        averaged = load_weights(p.soup(name))[0]
        rec = json.loads(p.soup(name).with_suffix(".json").read_text())
        folds = [int(f) for f in rec["folds"]]
        for source in SOURCES:
            if source == "averaged":
                state = averaged
            else:
                images = stat_images(ctx, source, folds)
                if images is None:
                    rows.append({"soup": name, "stats": source, "folds": folds, "images": 0})
                    continue
                state = recompute(ctx, averaged, images)
            accs = ev.fold_accs(state, folds)
            rows.append({"soup": name, "stats": source, "folds": folds, "n_ingredients": rec["n_ingredients"],
                         "images": 0 if source == "averaged" else len(images), "leaks": leaks(source, folds),
                         "val_min_acc": min(accs.values()), "holdout_acc": ev.holdout_acc(state), "test_acc": ev.test_acc(state)})
    return rows


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def table(rows: list[dict], seeds: list[int]) -> str:
    """Markdown: one line per (soup, statistics), accuracies as the mean over the seeds where the
    source has images (in %), and the test difference to averaged statistics of each such seed."""
    lines = ["| soup | statistics | seeds | images | leaks into | val MinAcc | holdout | test | test - averaged, per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for soup in SOUPS:
        base = {r["seed"]: r["test_acc"] for r in rows if r["soup"] == soup and r["stats"] == "averaged"}
        for source in SOURCES:
            got = [r for r in rows if r["soup"] == soup and r["stats"] == source and "test_acc" in r]
            if not got:
                lines.append(f"| {soup} | {source} | 0 | 0 | | (no such images for this soup) | | | |")
                continue

            def mean(key):
                vals = [r[key] for r in got if r[key] is not None]
                return float(np.mean(vals)) if vals else None

            diffs = ", ".join(f"{100 * (r['test_acc'] - base[r['seed']]):+.2f}" for r in got)
            lines.append(f"| {soup} | {source} | {len(got)} | {round(mean('images'))} | {got[0]['leaks']} | "
                         f"{pct(mean('val_min_acc'))} | {pct(mean('holdout_acc'))} | {pct(mean('test_acc'))} | {diffs} |")
    folds = [f"seed {r['seed']} {r['soup']} {'-'.join(map(str, r['folds']))} ({r['n_ingredients']} models)"
             for r in rows if r["stats"] == "averaged"]
    lines.append("")
    lines.append(f"Seeds {seeds}; accuracies in %; soups: " + "; ".join(folds))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="folder of the run(s): <results>/seed<s> (or the run itself with --no-train)")
    ap.add_argument("--configfile", nargs="*", default=[str(ROOT / "config.yaml")], help="YAML files, merged in order")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed (ignored with --no-train)")
    ap.add_argument("--no-train", action="store_true",
                    help="read the finished run at --results (a BatchNorm model; --configfile: its configuration)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    rows = []
    for seed in [None] if args.no_train else args.seeds:
        root = Path(args.results) if args.no_train else Path(args.results) / f"seed{seed}"
        # A finished run is read with its own configuration (--configfile); a new one is the
        # embedded default (or --configfile) with BatchNorm, on the CPU.
        overlay = {"results": str(root)} if args.no_train else {
            "results": str(root), "seed": seed, "device": "cpu", "model": {"norm": "batch"}}
        cfg = validate(deep_update(load_yaml_files(*args.configfile), overlay))
        p = Paths(root)
        if args.no_train:
            if not p.soup("greedy_soup").is_file():
                raise SystemExit(f"{p.soup('greedy_soup')}: not found; finish the run first, or drop --no-train")
        else:
            train_run(cfg, p)
        rows += [{**r, "seed": cfg["seed"]} for r in measure(cfg, p)]
    print(table(rows, sorted({r["seed"] for r in rows})))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
