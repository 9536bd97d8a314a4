"""The training half of a tiny real run, shared by test modules that then check soups:
prepare, folds, pretrain, one linear probe per fold and every (grid point, fold) fine-tune,
through the pipeline functions the workflow rules call. `r` provides cfg, data, folds,
backbone, head(fold) and finetune(hp, fold)."""

from __future__ import annotations

from foldsoup import pipeline


def train_tiny_run(r, hps: list[str], k: int):
    pipeline.prepare(r.cfg, r.data)
    pipeline.folds(r.cfg, r.data, r.folds)
    pipeline.pretrain(r.cfg, r.data, r.backbone)
    for fold in range(k):
        pipeline.linear_probe(r.cfg, r.data, r.folds, r.backbone, fold, r.head(fold))
    for hp in hps:
        for fold in range(k):
            r.finetune(hp, fold)
    return r
