"""Evaluating models and soups: one resident model, data resident on the device, weights
swapped in place, each fold's val part prepared once per job. Greedy soups pair this with
soup.RunningSoupScorer, so each candidate is loaded once and nothing is re-read per evaluation.

Val scores are counted: correct answers per class, batch by batch (batches of `batch_size` from
the fold's first image, the same in full and early-exit evaluation, so both see the same
answers), and `select.ClassCounts.score(metric)` is the score (accuracy or balanced accuracy, the
run's `soups.metric`), an exact fraction that keeps its counts. Single models are
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
from foldsoup.soups.select import ClassCounts, FoldCount, Score
from foldsoup.training.loop import ImageSpec, predict_logits


def class_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassCounts:
    """Per-class correct answers and images of `logits` on `labels` (`soups.select.ClassCounts`,
    what every accuracy and balanced accuracy is derived from)."""
    labels = labels.to(logits.device).long()
    right = labels[logits.argmax(1) == labels]
    return ClassCounts(tuple(torch.bincount(right, minlength=num_classes).tolist()),
                       tuple(torch.bincount(labels, minlength=num_classes).tolist()))


class Evaluator:
    """Scores (`metric`) of any weights on each fold's val part of the pool, on the outer
    holdout (as fold HOLDOUT, when the split has one) and on the test set."""

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
        num_classes: int | None = None,
        metric: str = "accuracy",
    ):
        self.model = model.to(device)
        self.metric = metric
        labels = [pool_labels, test_labels]
        self.num_classes = num_classes or int(max(int(a.max()) for a in labels if len(a))) + 1
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
        self._class_sizes = {i: tuple(np.bincount(labels.cpu().numpy(), minlength=self.num_classes).tolist())
                             for i, labels in self.fold_labels.items()}
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

    def class_sizes(self, fold: int) -> tuple[int, ...]:
        return self._class_sizes[fold]

    def count(self, state: Mapping[str, torch.Tensor], fold: int, reaches=None) -> FoldCount:
        """Per-class correct answers of `state` on `fold`, batch by batch; with `reaches` (a
        FoldCount -> bool), stops after the first batch whose count no longer reaches."""
        self.load(state)
        images, labels = self.fold_images[fold], self.fold_labels[fold]
        total = self._class_sizes[fold]
        correct, evaluated = np.zeros(len(total), dtype=np.int64), np.zeros(len(total), dtype=np.int64)
        count = FoldCount.nothing_evaluated(total, self.metric)
        for start in range(0, len(labels), self.batch_size):
            batch = labels[start : start + self.batch_size]
            logits = predict_logits(self.model, images[start : start + self.batch_size], self.spec, self.batch_size,
                                    self.precision)
            counts = class_counts(logits, batch, self.num_classes)
            correct += counts.correct
            evaluated += counts.total
            count = FoldCount(tuple(correct.tolist()), tuple(evaluated.tolist()), total, self.metric)
            if reaches is not None and not reaches(count):
                break
        self.images_evaluated["val"] += count.images
        return count

    def fold_accs(self, state: Mapping[str, torch.Tensor], folds) -> dict:
        """fold -> score of `state` on D_val,i for i in folds (exact `select.Score`s that keep
        their per-class counts); fold HOLDOUT is the outer holdout."""
        self.evaluations += 1
        return {i: self.count(state, i).score for i in sorted(folds)}

    @staticmethod
    def counts_of(fold_scores: Mapping) -> dict[int, ClassCounts]:
        """fold -> the per-class counts behind each score (fold_accs' Scores)."""
        out = {}
        for fold, score in fold_scores.items():
            if not isinstance(score, Score) or score.counts is None:
                raise ValueError(f"fold {fold}'s score {score!r} keeps no counts")
            out[int(fold)] = score.counts
        return out

    def holdout_count(self, state: Mapping[str, torch.Tensor]) -> ClassCounts | None:
        """Per-class counts on the outer holdout; None when the split has none."""
        return self.counts_of(self.fold_accs(state, [HOLDOUT]))[HOLDOUT] if self.has_holdout else None

    def holdout_acc(self, state: Mapping[str, torch.Tensor]) -> float | None:
        """Score (`metric`) on the outer holdout, the fraction's float as records hold it
        (reporting; a selection on the holdout compares fold_accs' exact values); None when the
        split has none."""
        count = self.holdout_count(state)
        return None if count is None else float(count.score(self.metric))

    def test_logits(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Reporting only: no selection decision ever calls this (or test_acc)."""
        self.load(state)
        self.images_evaluated["test"] += len(self.test_labels)
        return predict_logits(self.model, self.test_images, self.spec, self.batch_size, self.precision)

    def test_count(self, state: Mapping[str, torch.Tensor]) -> ClassCounts:
        """Per-class counts on the test set (reporting only)."""
        return class_counts(self.test_logits(state), self.test_labels, self.num_classes)

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        """Score (`metric`) on the test set (reporting only)."""
        return float(self.test_count(state).score(self.metric))


def greedy_scorer(ev, load):
    """A RunningSoupScorer that counts on `ev` (an Evaluator): greedy_soup's early exit."""
    return RunningSoupScorer(load, ev.fold_accs, count=ev.count, fold_size=ev.fold_size, class_sizes=ev.class_sizes,
                             metric=ev.metric)
