"""Steps `pretrain`, `lp` and `finetune`: the shared backbone, one linear-probe head per fold, one
fine-tuned model per (grid point, fold)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from foldsoup.config.schema import GridPoint, grid_point
from foldsoup.data.folds import holdout_indices, train_indices
from foldsoup.errors import DataError
from foldsoup.steps.context import Context, log
from foldsoup.storage.weights import atomic_write_json, load_weights, save_weights


def pretrain(cfg: dict, data_path: str, out: str) -> None:
    """The shared pretrained backbone: trained here for digits_cnn, exported for open_clip and timm."""
    from foldsoup.models.classifier import backbone_state

    if cfg["model"]["name"] == "open_clip":
        from foldsoup.models.clip import export_pretrained_visual

        state = export_pretrained_visual(cfg["model"], log)  # on the CPU: no device, no data needed
    elif cfg["model"]["name"] == "timm":
        from foldsoup.models.timm_backbone import export_pretrained, image_settings_lines

        for line in image_settings_lines(cfg["data"], cfg["model"]):  # what the run takes, and from where
            log(line)
        # On the CPU, no data needed; random weights (model.pretrained: null) drawn with `seed`.
        state = export_pretrained(cfg["model"], cfg["data"]["image_size"], cfg.get("seed", 0), log)
    else:
        from foldsoup.training.loop import LoopConfig, train

        ctx = Context(cfg, data_path)
        d = ctx.data
        if d.pretrain_images is None:
            raise DataError(f"{data_path}: has no pretraining images for model {cfg['model']['name']!r}")
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
    from foldsoup.models.classifier import load_backbone
    from foldsoup.soups.select import fold_acc
    from foldsoup.training.loop import count, predict_logits
    from foldsoup.training.loop import linear_probe as fit_head

    ctx = Context(cfg, data_path, folds_path)
    model = ctx.model()
    load_backbone(model, load_weights(backbone_path)[0], backbone_path)
    train_idx = train_indices(ctx.fold_of, fold)
    val_idx = np.flatnonzero(ctx.fold_of == fold)
    d = ctx.data
    head, fit = fit_head(model, ctx.tensor(d.pool_images[train_idx]), ctx.tensor(d.pool_labels[train_idx]), ctx.spec,
                         cfg["lp"], cfg["finetune"]["precision"], cfg["seed"], log)
    val_logits = predict_logits(model, ctx.tensor(d.pool_images[val_idx]), ctx.spec, cfg["finetune"]["eval_batch_size"])
    val_acc = float(fold_acc(*count(val_logits, ctx.tensor(d.pool_labels[val_idx]))))
    log(f"fold {fold}: linear probe val acc {val_acc:.4f}")
    save_weights(out, head, {"kind": "head", "fold": fold, "val_acc": val_acc, "fit": fit})


def _injected_failure(tag: str) -> int | None:
    """FOLDSOUP_FAIL='<hp>/fold<i>[:step]' makes that fine-tune fail (tests of --keep-going and reruns)."""
    spec = os.environ.get("FOLDSOUP_FAIL", "")
    target, _, step = spec.partition(":")
    return int(step or 0) if target and target == tag else None


def finetune(cfg: dict, data_path: str, folds_path: str, backbone_path: str, head_path: str, hp: str, fold: int,
             out_dir: str, resume_dir: str) -> None:
    from foldsoup.errors import Diverged, Interrupted
    from foldsoup.models.classifier import load_backbone
    from foldsoup.training.loop import LoopConfig, ResumeStore, SigtermTrap, guard_stats, train

    point: GridPoint = grid_point(cfg, hp)
    tag = f"{hp}/fold{fold}"
    ctx = Context(cfg, data_path, folds_path)
    model = ctx.model()
    load_backbone(model, load_weights(backbone_path)[0], backbone_path)
    head_state, head_meta = load_weights(head_path)
    model.head.load_state_dict(head_state)
    d, ft = ctx.data, cfg["finetune"]
    train_idx = train_indices(ctx.fold_of, fold)
    loop = LoopConfig(ft["epochs"], ft["batch_size"], point.lr, ft["weight_decay"], ft["warmup_steps"], ft["grad_clip"],
                      ft["label_smoothing"], ft["precision"], cfg["augment"][point.aug],
                      ft["mixup_alpha"] if point.mixup else None, cfg["seed"], tag, compile=ft["compile"],
                      batchnorm=ft["batchnorm"])
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
        diverged, stats = True, {"steps": None, "final_loss": float("nan"), "images_per_s": None, "train_seconds": None,
                                 **guard_stats(exc.guard, diverged=True)}
    # A SIGTERM from here on (a time limit during the final evaluation) keeps the trained
    # weights as resume state: the rerun skips training and only evaluates.
    try:
        with SigtermTrap(raising=True):
            metrics = write_model(ctx, model, out_dir, fold, point.as_dict(),
                                  ctx.metadata(kind="finetune", **point.as_dict(), fold=fold), diverged,
                                  {"lp_val_acc": head_meta.get("val_acc"), **stats})
    except Interrupted:
        if diverged:
            raise
        resume.save_trained(model, stats)
        raise Interrupted(f"{tag}: SIGTERM after training; the trained weights are saved to {resume.path}, "
                          f"a rerun only evaluates them") from None
    resume.clear()
    if log_scores(tag, metrics) and not diverged:
        from foldsoup.analysis.reliability import CHANCE_ALPHA

        m = metrics
        log(f"WARNING {tag}: at chance: val acc {m['val_acc']:.4f} is not above {m['chance_ceiling']:.4f}, the most a model "
            f"blind to its input plausibly reaches on fold {fold}'s {m['val_images']} val images (largest class "
            f"{m['val_majority']:.4f}; binomial test at p = {CHANCE_ALPHA}); final train loss {stats['final_loss']:.4g}. It "
            f"learned nothing: lower lr {point.lr:g} in grid.lr or check the data. It is not diverged, so it still enters "
            f"the soups and Table 2's threshold")


def write_model(ctx: Context, model, out_dir: str, fold: int, fields: dict, meta: dict, diverged: bool,
                tail: dict) -> dict:
    """Score `model` as it is saved and write models/<hp>/fold<i>/: model.safetensors (with `meta`),
    predictions.safetensors and metrics.json (`fields`: hp, lr, aug, mixup; then the fold, every
    count and accuracy, the chance test, `diverged` and `tail`: the LP's val accuracy and the
    training statistics). Returns the metrics. A fine-tune and an imported checkpoint
    (steps.imports) both end here, so their files are alike field for field."""
    import torch

    from foldsoup.analysis.reliability import at_chance, chance_ceiling, majority_rate
    from foldsoup.soups.evaluation import class_counts
    from foldsoup.soups.select import METRICS, score_fields
    from foldsoup.training.loop import fold_logits, predict_logits

    cfg, d = ctx.cfg, ctx.data
    ft = cfg["finetune"]
    # Evaluate what is saved: with save_dtype bfloat16 the model first takes the rounded
    # weights, so every accuracy reported for the file (and every selection) is the file's.
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ft["save_dtype"]]
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    if dtype != torch.float32:
        model.load_state_dict(state)
    batch = ft["eval_batch_size"]
    # Counted as the soups are (Evaluator's per-fold batches), every accuracy from the counts.
    fold_of = ctx.tensor(ctx.fold_of)
    pool_logits = fold_logits(model, ctx.tensor(d.pool_images), fold_of, ctx.spec, batch, ft["precision"])
    test_logits = predict_logits(model, ctx.tensor(d.test_images), ctx.spec, batch, ft["precision"])
    labels = ctx.tensor(d.pool_labels)
    n = d.num_classes
    counts = {i: class_counts(pool_logits[fold_of == i], labels[fold_of == i], n) for i in range(ctx.k)}
    accs = {i: float(c.score("accuracy")) for i, c in counts.items()}
    holdout = ctx.tensor(holdout_indices(ctx.fold_of))
    holdout_count = class_counts(pool_logits[holdout], labels[holdout], n) if len(holdout) else None
    test_count = class_counts(test_logits, ctx.tensor(d.test_labels), n)
    out = Path(out_dir)
    save_weights(out / "model.safetensors", state, meta)
    save_weights(out / "predictions.safetensors", {"pool_logits": pool_logits, "test_logits": test_logits},
                 {"hp": fields["hp"], "fold": fold})
    # At chance: own-fold val accuracy no better than always predicting that fold's largest class
    # (exact binomial test, analysis.chance_ceiling): a loss that exploded without turning NaN.
    val_labels = d.pool_labels[ctx.fold_of == fold]
    majority, n_val = majority_rate(val_labels), len(val_labels)
    chance, ceiling = at_chance(accs[fold], n_val, majority), chance_ceiling(n_val, majority)
    # Every metric's scores and the per-class counts behind them (soups.metric picks one later,
    # so changing it reruns no fine-tune).
    metrics = {**fields, "fold": fold, **score_fields("val", counts[fold]), **score_fields("test", test_count),
               **score_fields("holdout", holdout_count),
               **{f"fold_{suffix}s": {str(i): float(c.score(m)) for i, c in counts.items()} for m, suffix in METRICS.items()},
               "fold_counts": {str(i): [sum(c.correct), c.images] for i, c in counts.items()},
               "fold_class_counts": {str(i): c.as_record() for i, c in counts.items()},
               "diverged": diverged,
               "at_chance": chance, "chance_ceiling": ceiling, "val_majority": majority, "val_images": n_val, **tail}
    atomic_write_json(out / "metrics.json", metrics)  # written last: its presence means the job finished
    return metrics


def log_scores(tag: str, m: dict) -> bool:
    """The job's last line of scores; True when the model is at chance (the caller says why)."""
    holdout = f", holdout acc {m['holdout_acc']:.4f}" if m["holdout_acc"] is not None else ""
    log(f"{tag}: val acc (fold {m['fold']}) {m['val_acc']:.4f}{holdout}, test acc {m['test_acc']:.4f}")
    return bool(m["at_chance"])
