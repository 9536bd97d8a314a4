"""One function per workflow step: read inputs, call the library, write outputs atomically.

The Snakemake rules call these through `python -m foldsoup <step>`; they are plain functions,
so tests and users can run any step without Snakemake.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .config import GridPoint, grid_point
from .data import load_prepared, prepare as prepare_data, save_prepared
from .folds import HOLDOUT, holdout_indices, make_folds, num_folds, read_folds, train_indices, write_folds
from .weights import atomic_write_json, load_weights, save_weights


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data and folds (no torch)


def prepare(cfg: dict, out: str) -> None:
    data = prepare_data(cfg["data"], cfg["seed"])
    counts = np.bincount(data.pool_labels, minlength=data.num_classes)
    log(f"{data.name}: pool {len(data.pool_labels)} images (per class {counts.tolist()}), "
        f"test {len(data.test_labels)}, image shape {list(data.pool_images.shape[1:])}"
        + (f", pretraining {len(data.pretrain_labels)} images of classes {data.pretrain_classes}" if data.pretrain_images is not None else ""))
    save_prepared(out, data)


def folds(cfg: dict, data_path: str, out: str) -> None:
    data = load_prepared(data_path)
    holdout = cfg["folds"].get("holdout_fraction", 0)  # the schema's default, for configs made by hand
    fold_of = make_folds(data.pool_labels, cfg["folds"]["k"], cfg["seed"], data.classes, holdout)
    write_folds(out, data.pool_labels, fold_of)
    log(f"{cfg['folds']['k']} stratified folds of sizes {np.bincount(fold_of[fold_of != HOLDOUT]).tolist()}"
        + (f", outer holdout of {len(holdout_indices(fold_of))} images" if (fold_of == HOLDOUT).any() else ""))


# ---------------------------------------------------------------- models


class Context:
    """What every torch job needs: device, prepared data, folds, the model template."""

    def __init__(self, cfg: dict, data_path: str, folds_path: str | None = None):
        import torch

        from .devices import place
        from .train import ImageSpec

        self.cfg = cfg
        # Torch seeds its default generator at random in every process: seed it, so what is drawn
        # from it (the initial weights of the pretrained backbone) is the same in every run.
        torch.manual_seed(cfg.get("seed", 0))
        placement = place(cfg["device"])
        log(f"device: {placement.note} (SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID', '')} "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})")
        self.device = torch.device(placement.device)
        self.data = load_prepared(data_path)
        self.fold_of = read_folds(folds_path, self.data.pool_labels) if folds_path else None
        self.spec = ImageSpec.from_config(cfg["data"], self.data.pool_images.shape[1])
        # k from the split itself: a job's config holds only what its result depends on.
        self.k = num_folds(self.fold_of) if self.fold_of is not None else None
        self._shapes: dict | None = None  # the configured model's tensor shapes, built on first load()

    def model(self, num_classes: int | None = None):
        from .models import build_classifier

        return build_classifier(self.cfg["model"], num_classes or self.data.num_classes).to(self.device)

    def tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def load(self, path: str, device: str | None = None):
        """Weights onto the job's device (or `device`): soups are summed and evaluated there. Keys
        and shapes are checked against the configured model: an error names the file and the tensor."""
        if self._shapes is None:
            import torch

            from .models import build_classifier

            with torch.device("meta"):  # shapes only: no memory, no init
                model = build_classifier(self.cfg["model"], self.data.num_classes)
            self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return load_weights(path, device=device or str(self.device), expect=self._shapes)[0]

    def ingredients(self, paths, extra_models: int = 0, keep: bool = True):
        """A soup job's weight files, each read at most once (foldsoup.ingredients). Create it
        after the evaluator, so the device's free memory excludes the model and data."""
        from .ingredients import Ingredients

        return Ingredients(self.load, paths, str(self.device), extra_models, log, keep)

    def metadata(self, **extra) -> dict:
        # "source": how `prepare` decoded the images, so `foldsoup predict` reads new ones the same way.
        source = {"dataset": self.cfg["data"]["name"], "resize": self.cfg["data"].get("resize", "stretch")}
        return {"model": self.cfg["model"], "classes": self.data.classes, "image": vars(self.spec), "source": source, **extra}

    def evaluator(self):
        from .evaluation import Evaluator

        d = self.data
        return Evaluator(self.model(), d.pool_images, d.pool_labels, self.fold_of, d.test_images, d.test_labels,
                         self.spec, self.cfg["finetune"]["eval_batch_size"], self.cfg["finetune"]["precision"], self.device)


def pretrain(cfg: dict, data_path: str, out: str) -> None:
    """The shared pretrained backbone: trained here for digits_cnn, exported for open_clip."""
    from .models import backbone_state

    if cfg["model"]["name"] == "open_clip":
        from .clip import export_pretrained_visual

        state = export_pretrained_visual(cfg["model"])  # on the CPU: no device, no data needed
    else:
        from .train import LoopConfig, train

        ctx = Context(cfg, data_path)
        d = ctx.data
        if d.pretrain_images is None:
            raise ValueError(f"{data_path}: has no pretraining images for model {cfg['model']['name']!r}")
        model = ctx.model(len(d.pretrain_classes))
        p = cfg["pretrain"]
        loop = LoopConfig(p["epochs"], p["batch_size"], p["lr"], p["weight_decay"], warmup_steps=0, grad_clip=1.0,
                          label_smoothing=0.0, precision="fp32", aug=cfg["augment"]["medium"], mixup_alpha=None,
                          seed=cfg["seed"], tag="pretrain")
        train(model, ctx.tensor(d.pretrain_images), ctx.tensor(d.pretrain_labels), ctx.spec, loop, log)
        state = backbone_state(model)
    save_weights(out, state, {"model": cfg["model"], "kind": "backbone"})
    log(f"saved backbone ({sum(v.numel() for v in state.values()) / 1e6:.2f} M values) to {out}")


def linear_probe(cfg: dict, data_path: str, folds_path: str, backbone_path: str, fold: int, out: str) -> None:
    from .models import load_backbone
    from .train import accuracy, linear_probe as fit_head, predict_logits

    ctx = Context(cfg, data_path, folds_path)
    model = ctx.model()
    load_backbone(model, load_weights(backbone_path)[0], backbone_path)
    train_idx = train_indices(ctx.fold_of, fold)
    val_idx = np.flatnonzero(ctx.fold_of == fold)
    d = ctx.data
    head = fit_head(model, ctx.tensor(d.pool_images[train_idx]), ctx.tensor(d.pool_labels[train_idx]), ctx.spec,
                    cfg["lp"], cfg["finetune"]["precision"], cfg["seed"], log)
    val_logits = predict_logits(model, ctx.tensor(d.pool_images[val_idx]), ctx.spec, cfg["finetune"]["eval_batch_size"])
    val_acc = accuracy(val_logits, ctx.tensor(d.pool_labels[val_idx]))
    log(f"fold {fold}: linear probe val acc {val_acc:.4f}")
    save_weights(out, head, {"kind": "head", "fold": fold, "val_acc": val_acc})


def _injected_failure(tag: str) -> int | None:
    """FOLDSOUP_FAIL='<hp>/fold<i>[:step]' makes that fine-tune fail (tests of --keep-going and reruns)."""
    spec = os.environ.get("FOLDSOUP_FAIL", "")
    target, _, step = spec.partition(":")
    return int(step or 0) if target and target == tag else None


def finetune(cfg: dict, data_path: str, folds_path: str, backbone_path: str, head_path: str, hp: str, fold: int,
             out_dir: str, resume_dir: str) -> None:
    import torch

    from .models import load_backbone
    from .train import Diverged, Interrupted, LoopConfig, ResumeStore, SigtermTrap, fold_accuracies, predict_logits, train

    point: GridPoint = grid_point(cfg, hp)
    tag = f"{hp}/fold{fold}"
    ctx = Context(cfg, data_path, folds_path)
    model = ctx.model()
    load_backbone(model, load_weights(backbone_path)[0], backbone_path)
    model.head.load_state_dict(load_weights(head_path)[0])
    d, ft = ctx.data, cfg["finetune"]
    train_idx = train_indices(ctx.fold_of, fold)
    loop = LoopConfig(ft["epochs"], ft["batch_size"], point.lr, ft["weight_decay"], ft["warmup_steps"], ft["grad_clip"],
                      ft["label_smoothing"], ft["precision"], cfg["augment"][point.aug],
                      ft["mixup_alpha"] if point.mixup else None, cfg["seed"], tag, compile=ft["compile"])
    resume = ResumeStore(resume_dir, ft["resume_every_s"])
    log(f"{tag}: fine-tuning on {len(train_idx)} images, {ft['epochs']} epochs, lr {point.lr:g}, aug {point.aug}, mixup {point.mixup}")
    diverged = False
    try:
        stats = train(model, ctx.tensor(d.pool_images[train_idx]), ctx.tensor(d.pool_labels[train_idx]), ctx.spec, loop,
                      log, resume, fail_at_step=_injected_failure(tag))
    except Diverged as exc:
        if ft["on_divergence"] != "exclude":
            raise
        log(f"{exc}; marked diverged (finetune.on_divergence: exclude), excluded from every soup")
        diverged, stats = True, {"steps": None, "final_loss": float("nan"), "images_per_s": None, "train_seconds": None}
    # A SIGTERM from here on (a time limit during the final evaluation) keeps the trained
    # weights as resume state: the rerun skips training and only evaluates.
    try:
        with SigtermTrap(raising=True):
            batch = ft["eval_batch_size"]
            pool_logits = predict_logits(model, ctx.tensor(d.pool_images), ctx.spec, batch, ft["precision"])
            test_logits = predict_logits(model, ctx.tensor(d.test_images), ctx.spec, batch, ft["precision"])
            labels = ctx.tensor(d.pool_labels)
            accs = fold_accuracies(pool_logits, labels, ctx.tensor(ctx.fold_of), ctx.k)
            holdout = ctx.tensor(holdout_indices(ctx.fold_of))
            holdout_acc = (pool_logits[holdout].argmax(1) == labels[holdout]).float().mean().item() if len(holdout) else None
            test_acc = (test_logits.argmax(1) == ctx.tensor(d.test_labels)).float().mean().item()
            out = Path(out_dir)
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ft["save_dtype"]]
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
            meta = ctx.metadata(kind="finetune", **point.as_dict(), fold=fold)
            save_weights(out / "model.safetensors", state, meta)
            save_weights(out / "predictions.safetensors", {"pool_logits": pool_logits, "test_logits": test_logits},
                         {"hp": hp, "fold": fold})
            # At chance: own-fold val accuracy no better than always predicting that fold's largest class
            # (exact binomial test, analysis.chance_ceiling): a loss that exploded without turning NaN.
            from .analysis import CHANCE_ALPHA, at_chance, chance_ceiling, majority_rate

            val_labels = d.pool_labels[ctx.fold_of == fold]
            majority, n_val = majority_rate(val_labels), len(val_labels)
            chance, ceiling = at_chance(accs[fold], n_val, majority), chance_ceiling(n_val, majority)
            metrics = {**point.as_dict(), "fold": fold, "val_acc": accs[fold], "test_acc": test_acc,
                       "fold_accs": {str(i): a for i, a in accs.items()}, "holdout_acc": holdout_acc, "diverged": diverged,
                       "at_chance": chance, "chance_ceiling": ceiling, "val_majority": majority, "val_images": n_val, **stats}
            atomic_write_json(out / "metrics.json", metrics)  # written last: its presence means the job finished
    except Interrupted:
        if diverged:
            raise
        resume.save_trained(model, stats)
        raise Interrupted(f"{tag}: SIGTERM after training; the trained weights are saved to {resume.path}, "
                          f"a rerun only evaluates them") from None
    resume.clear()
    log(f"{tag}: val acc (fold {fold}) {accs[fold]:.4f}" + (f", holdout acc {holdout_acc:.4f}" if holdout_acc is not None else "")
        + f", test acc {test_acc:.4f}")
    if chance and not diverged:
        log(f"WARNING {tag}: at chance: val acc {accs[fold]:.4f} is not above {ceiling:.4f}, the most a model blind to its "
            f"input plausibly reaches on fold {fold}'s {n_val} val images (largest class {majority:.4f}; binomial test at "
            f"p = {CHANCE_ALPHA}); final train loss {stats['final_loss']:.4g}. It learned nothing: lower lr {point.lr:g} in "
            f"grid.lr or check the data. It is not diverged, so it still enters the soups and Table 2's threshold")


# ---------------------------------------------------------------- gathering


def models_table(metrics_paths: list[str], out: str) -> None:
    import json

    import pandas as pd

    from .weights import atomic_write_text

    rows = []
    for path in metrics_paths:
        with open(path) as f:
            m = json.load(f)
        row = {key: m[key] for key in ("hp", "lr", "aug", "mixup", "fold", "val_acc", "test_acc", "diverged")}
        # Empty for metrics written before the chance test existed.
        row.update(at_chance=m.get("at_chance"), chance_ceiling=m.get("chance_ceiling"))
        row.update({f"acc_fold{i}": a for i, a in m["fold_accs"].items()})
        if m.get("holdout_acc") is not None:
            row["holdout_acc"] = m["holdout_acc"]
        row["images_per_s"] = m.get("images_per_s")
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["hp", "fold"], kind="stable")
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{len(table)} models, val acc {table.val_acc.min():.4f}..{table.val_acc.max():.4f}")
    from .analysis import at_chance_mask, diverged_mask, model_name

    chance = [model_name(r) for _, r in table[at_chance_mask(table) & ~diverged_mask(table)].iterrows()]
    if chance:
        log(f"WARNING {len(chance)} model(s) at chance (val acc not above their fold's largest class, binomial test): "
            f"{', '.join(chance)}; see their fine-tune logs")


# ---------------------------------------------------------------- soups


def _model_metrics(paths: list[str]) -> list[dict]:
    import json

    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out


def _soup_record(method: str, ingredients: list[str], fold_accs: dict[int, float], cross_fold: str, **extra) -> dict:
    from .select import avg_acc, min_acc

    val = min_acc(fold_accs) if cross_fold == "min" else avg_acc(fold_accs)
    metric = "holdout" if set(fold_accs) == {HOLDOUT} else cross_fold if len(fold_accs) > 1 else "own"
    return {"method": method, "ingredients": ingredients, "n_ingredients": len(ingredients),
            "folds": sorted(int(i) for i in fold_accs), "fold_accs": {str(i): a for i, a in fold_accs.items()},
            "val_metric": metric, "val_acc": val, **extra}


def predictions_path(weights_path: str | Path) -> Path:
    """soups/gsgs.safetensors -> soups/gsgs.predictions.safetensors (test logits, for bootstraps)."""
    return Path(weights_path).with_suffix(".predictions.safetensors")


def _save_soup(ctx: Context, ev, out_weights: str, state, record: dict) -> None:
    """Weights, test logits and the record; test (and holdout) accuracy is measured here, after
    every decision."""
    test_logits = ev.test_logits(state)
    record["test_acc"] = (test_logits.argmax(1) == ev.test_labels).float().mean().item()
    record["holdout_acc"] = ev.holdout_acc()  # the weights test_logits loaded
    save_weights(out_weights, state, ctx.metadata(kind="soup", method=record["method"], ingredients=record["ingredients"]))
    save_weights(predictions_path(out_weights), {"test_logits": test_logits}, {"method": record["method"]})
    atomic_write_json(Path(out_weights).with_suffix(".json"), record)
    log(f"{record['method']}: {record['n_ingredients']} ingredient(s), val ({record['val_metric']}) "
        f"{record['val_acc']:.4f}, test {record['test_acc']:.4f}")


def uniform_subsets(cfg: dict, data_path: str, folds_path: str, hp: str, model_paths: list[str], metrics_paths: list[str],
                    out: str) -> dict:
    """Section 3.1: uniform soups of one grid point's models over every (sampled) fold subset."""
    import pandas as pd

    from .analysis import fold_subsets, format_folds, subsets_sampled
    from .select import avg_acc, min_acc
    from .soup import average
    from .weights import atomic_write_text

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    metrics = _model_metrics(metrics_paths)
    usable = {m["fold"]: p for m, p in zip(metrics, model_paths) if not m["diverged"]}
    store = ctx.ingredients(usable.values())
    states = {fold: store.get(p) for fold, p in usable.items()}
    k, cap = ctx.k, cfg["analysis"]["max_subsets_per_n"]
    rows = []
    for subset in fold_subsets(k, cap, cfg["seed"]):
        if not set(subset) <= set(states):
            continue  # a diverged model is never averaged in
        soup = average(states[i] for i in subset)
        accs = ev.fold_accs(soup, subset)
        holdout_acc = ev.holdout_acc()  # None (an empty cell) without an outer holdout
        rows.append({"hp": hp, "folds": format_folds(subset), "n": len(subset), "avg_acc": avg_acc(accs),
                     "min_acc": min_acc(accs), "holdout_acc": holdout_acc, "test_acc": ev.test_acc(), "sampled": subsets_sampled(k, cap),
                     **{f"acc_fold{i}": a for i, a in accs.items()}})
    columns = ["hp", "folds", "n", "avg_acc", "min_acc", "holdout_acc", "test_acc", "sampled", *(f"acc_fold{i}" for i in range(k))]
    table = pd.DataFrame(rows, columns=columns)  # the header even when every model diverged
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{hp}: {len(rows)} uniform soups evaluated")
    return log_cost(store, ev)


def _candidates(metrics: list[dict], paths: list[str], on_holdout: bool = False):
    """Single models as greedy candidates (diverged ones left out), with a loader by name.
    `on_holdout`: each is validated on the outer holdout instead of its own fold."""
    from .select import Candidate

    by_name = {}
    cands = []
    for m, p in zip(metrics, paths):
        if m["diverged"]:
            continue
        folds, val_acc = ({HOLDOUT}, m["holdout_acc"]) if on_holdout else ({m["fold"]}, m["val_acc"])
        c = Candidate(name=f"{m['hp']}/fold{m['fold']}", folds=frozenset(folds), val_acc=val_acc)
        cands.append(c)
        by_name[c.name] = p
    return cands, by_name


def log_cost(store, ev) -> dict:
    """The soup job's last line, files read and images evaluated (each file read once), and the
    same as a dict, which the soup steps return (scripts/bench.py adds them up)."""
    n = ev.images_evaluated
    log(f"{store.summary()}; {n['val']} val and {n['test']} test images evaluated")
    return {"files": len(store.reads), "reads": sum(store.reads.values()), "bytes_read": store.bytes_read,
            "val_images": n["val"], "test_images": n["test"]}


def greedy_scorer(ev, load):
    """A RunningSoupScorer that counts on `ev` (evaluation.Evaluator): greedy_soup's early exit."""
    from .soup import RunningSoupScorer

    return RunningSoupScorer(load, ev.fold_accs, count=ev.count, fold_size=ev.fold_size)


def _greedy_and_save(ctx: Context, ev, method: str, cands: list, paths: dict[str, str], out: str, store) -> None:
    """Alg. 1 over `cands` (each read once, from `store`, by `paths`), then save the soup as `method`."""
    from .select import greedy_soup, step_record

    soups = ctx.cfg["soups"]
    scorer = greedy_scorer(ev, lambda c: store.get(paths[c.name]))
    result = greedy_soup(cands, scorer, accept=soups["greedy_accept"], cross_fold=soups["cross_fold_val"],
                         early_exit=soups["early_exit"])
    rejected = sum(1 for s in result.steps if s.score is None)
    log(f"{method}: {len(result.steps)} candidates, {result.images} val images evaluated, {rejected} rejected early")
    _save_soup(ctx, ev, out, scorer.mean(), _soup_record(method, [c.name for c in result.ingredients], dict(result.fold_accs),
                                                         soups["cross_fold_val"], steps=[step_record(s) for s in result.steps]))


def greedy_per_fold(cfg: dict, data_path: str, folds_path: str, fold: int, model_paths: list[str], metrics_paths: list[str],
                    out_greedy: str, out_uniform: str) -> dict:
    """Alg. 1 over the grid's models of one fold (plain val acc on that fold), and their uniform soup."""
    from .soup import average

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths)
    store = ctx.ingredients(paths.values())
    _greedy_and_save(ctx, ev, f"greedy_fold{fold}", cands, paths, out_greedy, store)
    uniform = average(store.get(paths[c.name]) for c in cands)  # resident: not read again
    accs = ev.fold_accs(uniform, {fold})
    _save_soup(ctx, ev, out_uniform, uniform, _soup_record(f"uniform_fold{fold}", [c.name for c in cands], accs,
                                                            cfg["soups"]["cross_fold_val"]))
    return log_cost(store, ev)


def uniform_all(cfg: dict, data_path: str, folds_path: str, model_paths: list[str], metrics_paths: list[str], out: str) -> dict:
    """Uniform soup of every model of the grid and every fold (streamed from disk)."""
    from .soup import average

    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths)
    store = ctx.ingredients(paths.values(), keep=False)
    state = average(store.stream(paths[c.name]) for c in cands)  # each used once: none kept
    accs = ev.fold_accs(state, range(ctx.k))
    _save_soup(ctx, ev, out, state, _soup_record("uniform_soup", [c.name for c in cands], accs, cfg["soups"]["cross_fold_val"]))
    return log_cost(store, ev)


def greedy_all(cfg: dict, data_path: str, folds_path: str, model_paths: list[str], metrics_paths: list[str], out: str,
               on_holdout: bool = False) -> dict:
    """Greedy soup over all models of all folds, scored by MinAcc (or AvgAcc) over the included
    folds, or (`on_holdout`, method greedy_soup_holdout) by accuracy on the outer holdout."""
    ctx = Context(cfg, data_path, folds_path)
    ev = ctx.evaluator()
    if on_holdout and not ev.has_holdout:
        raise ValueError(f"{folds_path}: has no outer holdout (set folds.holdout_fraction > 0 and rerun `folds`)")
    cands, paths = _candidates(_model_metrics(metrics_paths), model_paths, on_holdout)
    store = ctx.ingredients(paths.values())
    _greedy_and_save(ctx, ev, "greedy_soup_holdout" if on_holdout else "greedy_soup", cands, paths, out, store)
    return log_cost(store, ev)


def gsgs(cfg: dict, data_path: str, folds_path: str, fold_soup_paths: list[str], out: str) -> dict:
    """GSGS: Alg. 1 over the per-fold greedy soups (each soup weighs the same), scored across folds."""
    import json

    from .select import Candidate

    ctx = Context(cfg, data_path, folds_path)
    cands, paths = [], {}
    for path in fold_soup_paths:
        with open(Path(path).with_suffix(".json")) as f:
            rec = json.load(f)
        c = Candidate(name=rec["method"], folds=frozenset(rec["folds"]), val_acc=rec["val_acc"])
        cands.append(c)
        paths[c.name] = path
    ev = ctx.evaluator()
    store = ctx.ingredients(paths.values())
    _greedy_and_save(ctx, ev, "gsgs", cands, paths, out, store)
    return log_cost(store, ev)


def methods(cfg: dict, data_path: str, folds_path: str, models_csv: str, model_dir: str, soups_dir: str, out: str) -> None:
    """Tables 3/4 rows, logit ensembles of the same ingredients, and paired bootstrap intervals.

    Selections (best on val, BGSS, best uniform per split) copy an existing soup or model. No
    torch: ensembles and intervals come from saved logits.
    """
    import json

    import pandas as pd
    from safetensors.numpy import load_file

    from .data import load_prepared
    from .uncertainty import ensemble_logits, fold_accuracies, paired_bootstrap
    from .weights import atomic_write_text

    soups, models_root = Path(soups_dir), Path(model_dir)
    cross_fold = cfg["soups"]["cross_fold_val"]
    data = load_prepared(data_path)
    fold_of = read_folds(folds_path, data.pool_labels)
    k = num_folds(fold_of)

    def record(name: str) -> dict:
        with open(soups / f"{name}.json") as f:
            return json.load(f)

    def model_file(name: str, file: str) -> Path:
        hp, fold = name.split("/")
        return models_root / hp / fold / file

    def adopt(src: Path, method: str, rec: dict) -> dict:
        """A selection: the chosen weights and test logits under the method's own name."""
        for src_file, dst in ((src, soups / f"{method}.safetensors"),
                              (predictions_path(src) if src.parent == soups else src.with_name("predictions.safetensors"),
                               predictions_path(soups / f"{method}.safetensors"))):
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src_file, tmp)
            os.replace(tmp, dst)
        rec = {**rec, "method": method, "selected": rec.get("method", rec["ingredients"][0])}
        atomic_write_json(soups / f"{method}.json", rec)
        return rec

    models = pd.read_csv(models_csv)
    usable = models[~models.diverged.astype(bool)]
    best = usable.loc[usable.val_acc.idxmax()]  # idxmax: first of ties, in table order
    best_name = f"{best.hp}/fold{best.fold}"
    has_holdout = "holdout_acc" in usable.columns

    def model_holdout_acc(m) -> dict:
        return {"holdout_acc": float(m.holdout_acc)} if has_holdout else {}

    rows = [adopt(model_file(best_name, "model.safetensors"), "best_on_val",
                  {"ingredients": [best_name], "n_ingredients": 1, "folds": [int(best.fold)], "val_metric": "own",
                   "val_acc": float(best.val_acc), "test_acc": float(best.test_acc), **model_holdout_acc(best)})]
    if has_holdout:
        top = usable.loc[usable.holdout_acc.idxmax()]
        top_name = f"{top.hp}/fold{top.fold}"
        rows.append(adopt(model_file(top_name, "model.safetensors"), "best_on_holdout",
                          {"ingredients": [top_name], "n_ingredients": 1, "folds": [HOLDOUT], "val_metric": "holdout",
                           "val_acc": float(top.holdout_acc), "test_acc": float(top.test_acc), **model_holdout_acc(top)}))
    rows += [record("uniform_soup"), record("greedy_soup")] + ([record("greedy_soup_holdout")] if has_holdout else [])
    per_fold = [record(f"greedy_fold{i}") for i in range(k)]
    rows.append(adopt(soups / f"{max(per_fold, key=lambda r: r['val_acc'])['method']}.safetensors", "bgss",
                      max(per_fold, key=lambda r: r["val_acc"])))  # max(): first of ties, in fold order
    rows.append(record("gsgs"))
    uniform = [record(f"uniform_fold{i}") for i in range(k)]
    pick = max(uniform, key=lambda r: r["val_acc"])
    rows.append(adopt(soups / f"{pick['method']}.safetensors", "best_uniform_per_split", pick))
    test_logits = {r["method"]: load_file(predictions_path(soups / f"{r['method']}.safetensors"))["test_logits"] for r in rows}

    # Logit ensembles of the same ingredients: what choosing a single model costs.
    logits = {name: load_file(model_file(name, "predictions.safetensors")) for name in
              (f"{m.hp}/fold{m.fold}" for m in usable.itertuples())}

    def ensemble(method: str, members: list[str], folds) -> dict:
        pool = ensemble_logits([logits[m]["pool_logits"] for m in members])
        accs = fold_accuracies(pool, data.pool_labels, fold_of, folds)
        rec = _soup_record(method, members, accs, cross_fold)
        if has_holdout:
            rec["holdout_acc"] = fold_accuracies(pool, data.pool_labels, fold_of, [HOLDOUT])[HOLDOUT]
        test_logits[method] = ensemble_logits([logits[m]["test_logits"] for m in members])
        rec["test_acc"] = float((test_logits[method].argmax(1) == data.test_labels).mean())
        return rec

    def folds_of(members: list[str]) -> set[int]:
        return {int(name.rsplit("/fold", 1)[1]) for name in members}

    fold_ensembles = [ensemble(f"ensemble_fold{i}", [n for n in logits if folds_of([n]) == {i}], [i]) for i in range(k)]
    best_fold = max(fold_ensembles, key=lambda r: r["val_acc"])  # an ensemble's BGSS: best fold on its own val
    test_logits["ensemble_best_fold"] = test_logits[best_fold["method"]]
    greedy_members = record("greedy_soup")["ingredients"]
    gsgs_members = [m for soup in record("gsgs")["ingredients"] for m in record(soup)["ingredients"]]
    rows += [
        ensemble("ensemble_all", list(logits), range(k)),
        {**best_fold, "method": "ensemble_best_fold", "selected": best_fold["method"]},
        ensemble("ensemble_greedy_soup", greedy_members, folds_of(greedy_members)),
        ensemble("ensemble_gsgs", gsgs_members, folds_of(gsgs_members)),
    ]
    if has_holdout:
        holdout_members = record("greedy_soup_holdout")["ingredients"]
        rows.append(ensemble("ensemble_greedy_soup_holdout", holdout_members, [HOLDOUT]))

    a = cfg["analysis"]
    correct = {r["method"]: test_logits[r["method"]].argmax(1) == data.test_labels for r in rows}
    intervals = {b["method"]: b for b in paired_bootstrap(correct, "best_on_val", a["bootstrap_resamples"], cfg["seed"], a["ci_level"])}
    table = pd.DataFrame([{
        "method": r["method"], "val_acc": r["val_acc"], "test_acc": r["test_acc"],
        **({"holdout_acc": r["holdout_acc"]} if has_holdout else {}), "n_ingredients": r["n_ingredients"],
        "val_metric": r["val_metric"], "folds": "-".join(map(str, r["folds"])),
        **{key: value for key, value in intervals[r["method"]].items() if key not in ("method", "test_acc")},
    } for r in rows])
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log("\n" + table.to_string(index=False))


# ---------------------------------------------------------------- analysis and report (no torch)


def reliability(subset_paths: list[str], models_csv: str, out_subsets: str, out: str) -> None:
    import pandas as pd

    from .analysis import reliability_table
    from .weights import atomic_write_text

    subsets = pd.concat([pd.read_csv(p, dtype={"folds": str}) for p in subset_paths], ignore_index=True)
    models = pd.read_csv(models_csv)
    table = reliability_table(subsets, models)
    atomic_write_text(out_subsets, subsets.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{len(subsets)} uniform soups\n" + table.to_string(index=False))


def figures(models_csv: str, subsets_csv: str, reliability_csv: str, methods_csv: str, outs: list[str]) -> None:
    import pandas as pd

    from .plots import plot_methods, plot_models_val_test, plot_subsets_val_test, plot_validation_signals

    models, subsets = pd.read_csv(models_csv), pd.read_csv(subsets_csv, dtype={"folds": str})
    threshold = float(pd.read_csv(reliability_csv).threshold.iloc[0])
    fig2, fig3, fig4, fig_methods, fig_signals = outs
    plot_models_val_test(models, fig2)
    plot_subsets_val_test(subsets, fig3)
    plot_subsets_val_test(subsets, fig4, threshold=threshold)
    plot_methods(pd.read_csv(methods_csv), models, fig_methods)
    plot_validation_signals(subsets, fig_signals)


def summary(cfg: dict, models_csv: str, subsets_csv: str, reliability_csv: str, methods_csv: str, out: str,
            budget_csv: str | None = None) -> None:
    import pandas as pd

    from .analysis import subsets_sampled
    from .summary import write_summary

    models = pd.read_csv(models_csv)
    run_info = {
        "dataset": cfg["data"]["name"],
        "model": cfg["model"]["name"] if cfg["model"]["name"] != "open_clip" else f"open_clip {cfg['model']['arch']} ({cfg['model']['pretrained']})",
        "k": cfg["folds"]["k"],
        "grid_points": models.hp.nunique(),
        "models": len(models),
        "sampled": subsets_sampled(cfg["folds"]["k"], cfg["analysis"]["max_subsets_per_n"]),
        "diverged": models.loc[models.diverged.astype(bool), "hp"].tolist() if "diverged" in models else [],
    }
    write_summary(out, pd.read_csv(reliability_csv), pd.read_csv(methods_csv), models,
                  pd.read_csv(subsets_csv, dtype={"folds": str}), run_info,
                  budget=pd.read_csv(budget_csv, dtype={"grid": str, "folds": str}) if budget_csv else None)
