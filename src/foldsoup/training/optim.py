"""AdamW for the training loops: torch.optim.AdamW on its fused kernel (one kernel for all
parameters, public on CPU and CUDA since torch 2.4), with the learning rate as an attribute the
loop sets every step and the state as plain tensors that resume files store as safetensors.

It replaced a direct call of the private torch._fused_adamw_ (issue 13): the same kernel, so
the weights after 300 steps with a per-step learning rate and gradient clipping are bitwise
equal, and a step costs the same. torch.optim's first optimizer imports torch._dynamo (about 2 s;
open_clip and timm import it anyway, and the local job server imports it once for all jobs).
"""

from __future__ import annotations

import torch


class AdamW:
    """torch.optim.AdamW(fused=True) over the parameters that require grad (fused=False: the
    multi-tensor foreach implementation, a reference). amsgrad and maximize off, decoupled weight
    decay as in torch.optim.AdamW. A parameter without a gradient in a step is skipped, and its
    own step count stays behind, as in torch.optim."""

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.fused = fused
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                           fused=fused or None, foreach=None if fused else True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def _steps(self) -> list[int]:
        return [int(self.optimizer.state[p]["step"]) if p in self.optimizer.state else 0 for p in self.params]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{"step", "step.<i>", "exp_avg.<i>", "exp_avg_sq.<i>"} for parameter i (zeros before its first step)."""
        steps = self._steps()
        out = {"step": torch.tensor(max(steps, default=0), dtype=torch.int64)}
        for i, (p, step) in enumerate(zip(self.params, steps)):
            state = self.optimizer.state.get(p, {})
            out[f"step.{i}"] = torch.tensor(step, dtype=torch.int64)
            out[f"exp_avg.{i}"] = state.get("exp_avg", torch.zeros_like(p))
            out[f"exp_avg_sq.{i}"] = state.get("exp_avg_sq", torch.zeros_like(p))
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of state_tensors; files without per-parameter steps (saved before they existed)
        give every parameter the common step."""
        saved = self.optimizer.state_dict()
        saved["state"] = {}
        for i, param in enumerate(self.params):
            step = int(state.get(f"step.{i}", state["step"]))
            if step:  # torch.optim rebuilds state it lacks
                # In each parameter's dtype, device and memory layout: files hold contiguous tensors,
                # and the fused kernel pairs a channels_last weight with its moments by memory
                # position, so a contiguous moment would update the wrong elements.
                saved["state"][i] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                     "exp_avg": torch.empty_like(param).copy_(state[f"exp_avg.{i}"]),
                                     "exp_avg_sq": torch.empty_like(param).copy_(state[f"exp_avg_sq.{i}"])}
        self.optimizer.load_state_dict(saved)
