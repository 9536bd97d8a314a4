"""What every step shares: the log line format and the job context (device, prepared data, folds,
the configured model and how weights are loaded onto it)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from foldsoup.data.folds import num_folds, read_folds
from foldsoup.data.prepared import load_prepared
from foldsoup.storage.weights import load_weights


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)



class Context:
    """What every torch job needs: device, prepared data, folds, the model template."""

    def __init__(self, cfg: dict, data_path: str, folds_path: str | None = None):
        import torch

        from foldsoup.devices import place
        from foldsoup.training.loop import ImageSpec

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
        from foldsoup.models.build import build_classifier

        return build_classifier(self.cfg["model"], num_classes or self.data.num_classes, self.spec.size).to(self.device)

    def tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def load(self, path: str, device: str | None = None):
        """Weights onto the job's device (or `device`): soups are summed and evaluated there. Keys
        and shapes are checked against the configured model: an error names the file and the tensor."""
        if self._shapes is None:
            import torch

            from foldsoup.models.build import build_classifier

            with torch.device("meta"):  # shapes only: no memory, no init
                model = build_classifier(self.cfg["model"], self.data.num_classes, self.spec.size)
            self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return load_weights(path, device=device or str(self.device), expect=self._shapes)[0]

    def ingredients(self, paths, extra_models: int = 0, keep: bool = True):
        """A soup job's weight files, each read at most once (foldsoup.soups.ingredients). Create it
        after the evaluator, so the device's free memory excludes the model and data."""
        from foldsoup.soups.ingredients import Ingredients

        return Ingredients(self.load, paths, str(self.device), extra_models, log, keep)

    def metadata(self, **extra) -> dict:
        # "source": how `prepare` decoded the images, so `foldsoup predict` reads new ones the same way.
        source = {"dataset": self.cfg["data"]["name"], "resize": self.cfg["data"].get("resize", "stretch")}
        if self.data.background is not None:  # transparent pixels of new images go onto the same
            source["background"] = self.data.background
        return {"model": self.cfg["model"], "classes": self.data.classes, "image": vars(self.spec), "source": source, **extra}

    def evaluator(self):
        from foldsoup.soups.evaluation import Evaluator

        d = self.data
        return Evaluator(self.model(), d.pool_images, d.pool_labels, self.fold_of, d.test_images, d.test_labels,
                         self.spec, self.cfg["finetune"]["eval_batch_size"], self.cfg["finetune"]["precision"], self.device,
                         num_classes=d.num_classes, metric=self.metric)

    @property
    def metric(self) -> str:
        """soups.metric: the score every selection compares."""
        return self.cfg.get("soups", {}).get("metric", "accuracy")
