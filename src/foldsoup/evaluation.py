"""Evaluating models and soups: one resident model, data resident on the device, weights
swapped in place, each fold's val part prepared once per job. Greedy soups pair this with
soup.RunningSoupScorer, so each candidate is loaded once and nothing is re-read per evaluation."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .folds import HOLDOUT
from .models import Classifier, load_full
from .train import ImageSpec, predict_logits


class Evaluator:
    """Accuracy of any weights on each fold's val part of the pool, on the outer holdout (as
    fold HOLDOUT, when the split has one) and on the test set."""

    def __init__(
        self,
        model: Classifier,
        pool_images: np.ndarray,
        pool_labels: np.ndarray,
        fold_of: np.ndarray,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        spec: ImageSpec,
        batch_size: int,
        precision: str,
        device: torch.device,
    ):
        self.model = model.to(device)
        self.spec, self.batch_size, self.precision = spec, batch_size, precision
        self.k = int(fold_of.max()) + 1
        # Prepared once per job: each fold's images and labels, on the device.
        self.fold_images = {}
        self.fold_labels = {}
        self.has_holdout = bool((fold_of == HOLDOUT).any())
        for i in range(self.k) if not self.has_holdout else [*range(self.k), HOLDOUT]:
            idx = np.flatnonzero(fold_of == i)
            self.fold_images[i] = torch.from_numpy(pool_images[idx]).to(device)
            self.fold_labels[i] = torch.from_numpy(pool_labels[idx]).to(device)
        self.test_images = torch.from_numpy(test_images).to(device)
        self.test_labels = torch.from_numpy(test_labels).to(device)
        self.evaluations = 0

    def load(self, state: Mapping[str, torch.Tensor], source: str = "soup") -> None:
        load_full(self.model, state, source)

    def _acc(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        logits = predict_logits(self.model, images, self.spec, self.batch_size, self.precision)
        return (logits.argmax(1) == labels).float().mean().item()

    def fold_accs(self, state: Mapping[str, torch.Tensor] | None, folds) -> dict[int, float]:
        """Acc(state, D_val,i) for i in folds (state None: the weights already loaded); fold
        HOLDOUT is the outer holdout."""
        if state is not None:
            self.load(state)
        self.evaluations += 1
        return {i: self._acc(self.fold_images[i], self.fold_labels[i]) for i in sorted(folds)}

    def holdout_acc(self, state: Mapping[str, torch.Tensor] | None = None) -> float | None:
        """Accuracy on the outer holdout; None when the split has none."""
        return self.fold_accs(state, [HOLDOUT])[HOLDOUT] if self.has_holdout else None

    def test_logits(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Reporting only: no selection decision ever calls this (or test_acc)."""
        if state is not None:
            self.load(state)
        return predict_logits(self.model, self.test_images, self.spec, self.batch_size, self.precision)

    def test_acc(self, state: Mapping[str, torch.Tensor] | None = None) -> float:
        return (self.test_logits(state).argmax(1) == self.test_labels).float().mean().item()
