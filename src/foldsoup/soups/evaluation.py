"""Evaluating models and soups: one resident model, data resident on the device, weights
swapped in place, each fold's val part prepared once per job. Greedy soups pair this with
soup.RunningSoupScorer, so each candidate is loaded once and nothing is re-read per evaluation.

Val accuracies are counted: correct answers batch by batch (batches of `batch_size` from the
fold's first image, the same in full and early-exit evaluation, so both see the same answers),
and `select.fold_acc(correct, total)` is the accuracy, an exact fraction. Single models are
scored with the same per-fold batching (`training.loop.fold_logits`), so the same weights get the
same counts wherever they are scored. `count` can stop a fold early (greedy
soups' early exit); `images_evaluated` counts the forward passes, on val folds (and the outer
holdout) and on the test set."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from foldsoup.data.folds import HOLDOUT
from foldsoup.models.classifier import Classifier, load_full
from foldsoup.soups.average import RunningSoupScorer
from foldsoup.soups.select import FoldCount, fold_acc
from foldsoup.training.loop import ImageSpec, predict_logits


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
        self._loaded: Mapping[str, torch.Tensor] | None = None  # the state dict in the model now
        self.evaluations = 0  # fold_accs calls
        self.images_evaluated = {"val": 0, "test": 0}  # forward passes: val folds and holdout; test set

    def load(self, state: Mapping[str, torch.Tensor], source: str = "soup") -> None:
        """Put `state` into the model, unless it is the state dict already there (the same object:
        every call below names its weights, and scoring one soup on several folds loads it once).
        A state dict must not be changed in place after it was passed here."""
        if state is self._loaded:
            return
        self._loaded = None  # a failed load leaves no claim about the model's weights
        load_full(self.model, state, source)
        self._loaded = state  # kept referenced, so its identity cannot be reused by another dict

    def fold_size(self, fold: int) -> int:
        return len(self.fold_labels[fold])

    def count(self, state: Mapping[str, torch.Tensor], fold: int, need: int = 0) -> FoldCount:
        """Correct answers of `state` on `fold`, batch by batch; stops after the first batch past
        which fewer than `need` correct answers remain possible (more wrong answers than
        total - need)."""
        self.load(state)
        images, labels = self.fold_images[fold], self.fold_labels[fold]
        total, correct, seen = len(labels), 0, 0
        for start in range(0, total, self.batch_size):
            logits = predict_logits(self.model, images[start : start + self.batch_size], self.spec, self.batch_size,
                                    self.precision)
            correct += int((logits.argmax(1) == labels[start : start + self.batch_size]).sum())
            seen = min(start + self.batch_size, total)
            if seen - correct > total - need:
                break
        self.images_evaluated["val"] += seen
        return FoldCount(correct, seen, total)

    def fold_accs(self, state: Mapping[str, torch.Tensor], folds) -> dict:
        """Acc(state, D_val,i) for i in folds (exact fractions); fold HOLDOUT is the outer holdout."""
        self.evaluations += 1
        return {i: self.count(state, i).acc for i in sorted(folds)}

    def counts_of(self, fold_accs: Mapping) -> dict[int, tuple[int, int]]:
        """fold -> (correct, total) of exact accuracies on this evaluator's folds."""
        out = {}
        for fold, acc in fold_accs.items():
            total = self.fold_size(fold)
            correct = acc * total
            if correct != int(correct):
                raise ValueError(f"accuracy {acc!r} is no count of fold {fold}'s {total} images")
            out[int(fold)] = (int(correct), total)
        return out

    def holdout_count(self, state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
        """(correct, total) on the outer holdout; None when the split has none."""
        return self.counts_of(self.fold_accs(state, [HOLDOUT]))[HOLDOUT] if self.has_holdout else None

    def holdout_acc(self, state: Mapping[str, torch.Tensor]) -> float | None:
        """Accuracy on the outer holdout, the fraction's float as records hold it (reporting; a
        selection on the holdout compares fold_accs' exact values); None when the split has none."""
        count = self.holdout_count(state)
        return None if count is None else float(fold_acc(*count))

    def test_logits(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Reporting only: no selection decision ever calls this (or test_acc)."""
        self.load(state)
        self.images_evaluated["test"] += len(self.test_labels)
        return predict_logits(self.model, self.test_images, self.spec, self.batch_size, self.precision)

    def test_count(self, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """(correct, total) on the test set (reporting only)."""
        return int((self.test_logits(state).argmax(1) == self.test_labels).sum()), len(self.test_labels)

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        return float(fold_acc(*self.test_count(state)))


def greedy_scorer(ev, load):
    """A RunningSoupScorer that counts on `ev` (an Evaluator): greedy_soup's early exit."""
    return RunningSoupScorer(load, ev.fold_accs, count=ev.count, fold_size=ev.fold_size)
