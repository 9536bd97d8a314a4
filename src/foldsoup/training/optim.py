"""AdamW with decoupled weight decay, on torch's fused kernel (one kernel for all parameters;
5x faster per step than multi-tensor foreach ops for the demo CNN on a CPU).

Ours rather than torch.optim.AdamW for two reasons: torch.optim's first param-group call
imports torch._dynamo (about 2 s, paid by each of the ~100 short jobs of a CPU run), and the
state is plain tensors that resume files store directly as safetensors.
Same update as torch.optim.AdamW (amsgrad off, maximize off). The foreach path remains for
steps where some parameters have no gradient, and as a reference (`fused=False`).
"""

from __future__ import annotations

import math

import torch


class AdamW:
    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # The fused kernel reads a float step per parameter, on the parameter's device.
        self.fused = fused and len({(p.device, p.dtype) for p in self.params}) <= 1
        self._steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params] if self.fused else []
        self._steps_at = 0  # the step count self._steps hold

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        pairs = [(p, p.grad, m, v) for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq) if p.grad is not None]
        if not pairs:
            return
        if self.fused and len(pairs) == len(self.params):
            self._fused_step()
            return
        params, grads, exp_avg, exp_avg_sq = map(list, zip(*pairs))
        beta1, beta2 = self.betas
        self.step_count += 1
        if self.weight_decay:
            torch._foreach_mul_(params, 1 - self.lr * self.weight_decay)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        bias1 = 1 - beta1**self.step_count
        bias2 = 1 - beta2**self.step_count
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -self.lr / bias1)

    def _fused_step(self) -> None:
        if self._steps_at != self.step_count:  # after a resume or a foreach step
            for s in self._steps:
                s.fill_(float(self.step_count))
        torch._foreach_add_(self._steps, 1.0)  # the kernel reads the new step, as in torch.optim
        beta1, beta2 = self.betas
        torch._fused_adamw_(self.params, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq, [], self._steps,
                            lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=self.weight_decay, eps=self.eps,
                            amsgrad=False, maximize=False)
        self.step_count += 1
        self._steps_at = self.step_count

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            out[f"exp_avg.{i}"] = m
            out[f"exp_avg_sq.{i}"] = v
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.step_count = int(state["step"])
        with torch.no_grad():
            for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
                m.copy_(state[f"exp_avg.{i}"])
                v.copy_(state[f"exp_avg_sq.{i}"])
