"""The first-step guard: did a fine-tune start where its linear probe left it? (No torch: the
report reads it too.)

A fine-tune "started far from its LP init" when its first epoch's mean loss exceeds FAR_FACTOR
x the loss of the LP init on the first batch (same images, augmentation and mixup targets,
eval mode) plus FAR_MARGIN nats; the margin keeps a near-zero LP loss from flagging noise.
On real ImageNet weights (README, "Recipe on real weights") train-mode BatchNorm put first epochs at 230-650
nats; with the frozen default, the runs it flags are those whose learning rate carries them out
of the probe's basin within the first epoch (lr 1e-3 there: their soups across folds fall below
them, where the lower learning rates' soups beat their models).
"""

from __future__ import annotations

import math

FAR_FACTOR = 2.0
FAR_MARGIN = 0.1
FAR_RULE = (f"started far = first epoch's mean loss above {FAR_FACTOR:g} x the LP init's loss on the first batch "
            f"(eval mode) + {FAR_MARGIN:g}")


def started_far(first_epoch_loss: float | None, lp_step_loss: float | None) -> bool:
    """The guard's verdict; False when either loss is unknown (a run from before the guard)."""
    if first_epoch_loss is None or lp_step_loss is None:
        return False
    if not math.isfinite(first_epoch_loss):
        return True
    return first_epoch_loss > FAR_FACTOR * lp_step_loss + FAR_MARGIN
