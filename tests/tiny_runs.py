"""The training half of a tiny real run, shared by test modules that then check soups:
prepare, folds, pretrain, one linear probe per fold and every (grid point, fold) fine-tune,
through the pipeline functions the workflow rules call. `r` provides cfg, data, folds,
backbone, head(fold) and finetune(hp, fold)."""

from __future__ import annotations

from foldsoup import steps


def train_tiny_run(r, hps: list[str], k: int):
    steps.prepare(r.cfg, r.data)
    steps.folds(r.cfg, r.data, r.folds)
    steps.pretrain(r.cfg, r.data, r.backbone)
    for fold in range(k):
        steps.linear_probe(r.cfg, r.data, r.folds, r.backbone, fold, r.head(fold))
    for hp in hps:
        for fold in range(k):
            r.finetune(hp, fold)
    return r


class TinyRun:
    """A results folder of a tiny run with the workflow's layout: paths and the two per-fold
    steps `train_tiny_run` calls (prepare, folds and pretrain write the plain paths)."""

    def __init__(self, root, cfg: dict):
        from pathlib import Path

        from foldsoup.config.schema import grid_points, validate

        self.root = Path(root)
        self.cfg = validate({"results": str(root), **cfg})
        self.data = str(self.root / "prepared" / "dataset.safetensors")
        self.folds = str(self.root / "folds.csv")
        self.backbone = str(self.root / "pretrained" / "backbone.safetensors")
        self.hps = [p.name for p in grid_points(self.cfg)]

    def head(self, fold: int) -> str:
        return str(self.root / "lp" / f"fold{fold}" / "head.safetensors")

    def model_dir(self, hp: str, fold: int, models=None):
        """models/<hp>/fold<i> of this run, or of another models folder `models`."""
        from pathlib import Path

        return Path(models or self.root / "models") / hp / f"fold{fold}"

    def finetune(self, hp: str, fold: int, data: str | None = None, models=None):
        """One fine-tune into model_dir(hp, fold, models), on `data` (default: this run's prepared
        data); its resume state in .resume/ beside that models folder."""
        out = self.model_dir(hp, fold, models)
        steps.finetune(self.cfg, data or self.data, self.folds, self.backbone, self.head(fold), hp, fold, str(out),
                          str(out.parent.parent.parent / ".resume" / hp / f"fold{fold}"))
        return out
