"""Step `import-model` (models_from): one checkpoint trained outside foldsoup, mapped into the
configured model (models.imported), scored and written to models/<config>/fold<i>/ exactly as a
fine-tune's files are (steps.train.write_model), so every later step reads it as one."""

from __future__ import annotations

import hashlib
from pathlib import Path

from foldsoup.steps.context import Context, log
from foldsoup.steps.train import log_scores, write_model

# What a fine-tune knows and an imported checkpoint does not: its grid point's values, the linear
# probe it started from and its training statistics (first-step guard included).
NOT_KNOWN = ("lr", "aug", "mixup")
TRAINING = ("steps", "final_loss", "images_per_s", "train_seconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_model(cfg: dict, data_path: str, folds_path: str, checkpoint: str, hp: str, fold: int, out_dir: str) -> None:
    from foldsoup.models.imported import classifier_state
    from foldsoup.training.loop import guard_stats

    tag = f"{hp}/fold{fold}"
    ctx = Context(cfg, data_path, folds_path)
    model = ctx.model()
    state = classifier_state(model, cfg["model"], checkpoint, log)
    model.load_state_dict(state)
    log(f"{tag}: imported {checkpoint} ({sum(v.numel() for v in state.values()) / 1e6:.2f} M values, "
        f"{cfg['model']['name']} {cfg['model'].get('arch', '')}, {model.head.out_features} classes)")
    fields = {"hp": hp, **{key: None for key in NOT_KNOWN}}
    meta = ctx.metadata(kind="import", **fields, fold=fold, checkpoint=str(checkpoint),
                        checkpoint_sha256=_sha256(Path(checkpoint)))
    tail = {"lp_val_acc": None, **{key: None for key in (*TRAINING, *guard_stats({}))}}
    metrics = write_model(ctx, model, out_dir, fold, fields, meta, False, tail)
    if log_scores(tag, metrics):
        log(f"WARNING {tag}: at chance: val acc {metrics['val_acc']:.4f} is not above {metrics['chance_ceiling']:.4f} on "
            f"fold {fold}'s {metrics['val_images']} val images: is {checkpoint} a model of fold {fold} trained on these "
            f"classes in this order, with this preprocessing (data.image_size, data.mean, data.std)? It still enters the "
            f"soups")
