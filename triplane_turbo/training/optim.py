"""Adan, the authors' optimiser (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm", 2022).

Written here, not taken from ``timm.optim.Adan`` (the authors' beta convention), for a measured reason
(2026-12-07, Python 3.11, x86_64, in a fresh venv): ``pip install torch==2.13.0 torchvision==0.28.0 timm``
installs (torch 2.13.0+cpu, the wheel this project's CPU installs use; torchvision 0.28.0, timm 1.0.31),
but ``import timm.optim`` imports torchvision, and that fails with ``RuntimeError: operator
torchvision::nms does not exist``: PyPI's torchvision 0.28.0 x86_64 wheel links ``libc10_cuda.so`` and
``libtorch_cuda.so``, which the CPU torch wheel does not ship, so its operators never load. A torch
install with CUDA would carry timm, but the CPU install (tests, CI) could not, so timm is not a
dependency. The same measurement ran timm 1.0.31's ``adan.py`` file (it needs only torch) beside this
class on 200 random float64 gradient steps with the authors' settings: the parameters agreed to
4.4e-16. (``adan-pytorch`` inverts the betas.)

Betas follow the authors' (and timm's) convention, ``betas = (β1, β2, β3) = (0.98, 0.92, 0.99)``:
each is the weight of the *old* value in its moving average. With g_k the gradient of step k
(g_0 := g_1, so the first difference is zero)::

    m_k = β1 m_{k-1} + (1 − β1) g_k                      first moment
    d_k = β2 d_{k-1} + (1 − β2) (g_k − g_{k-1})          moving average of gradient differences
    u_k = g_k + β2 (g_k − g_{k-1})
    n_k = β3 n_{k-1} + (1 − β3) u_k²                      second moment
    θ_k = θ_{k-1} − lr (m_k / (1 − β1^k) + β2 d_k / (1 − β2^k)) / (√(n_k / (1 − β3^k)) + eps)
    θ_k = θ_k / (1 + lr · weight_decay)                   (proximal decoupled weight decay)

No gradient clipping (the authors' ``max_grad_norm`` is 0). Parameters without a gradient are
skipped and their state is untouched, as in the authors' optimiser; the step count k is kept per
parameter (theirs per parameter group: the same whenever every parameter has a gradient every step).
"""

from __future__ import annotations

import math

import torch


class Adan(torch.optim.Optimizer):
    """Adan with the authors' defaults (lr 2e-4, betas (0.98, 0.92, 0.99), eps 1e-15, no decay)."""

    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
                 eps: float = 1e-15, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Adan: lr, eps and weight_decay must be non-negative, got {lr}, {eps}, {weight_decay}")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adan: betas must be three values in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_diff"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["previous_grad"] = grad.clone()  # the first difference is zero
                state["step"] += 1
                k = int(state["step"])
                diff = grad - state["previous_grad"]
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_diff"].mul_(beta2).add_(diff, alpha=1 - beta2)
                update = grad + beta2 * diff
                state["exp_avg_sq"].mul_(beta3).addcmul_(update, update, value=1 - beta3)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta3 ** k)).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** k))
                p.addcdiv_(state["exp_avg_diff"], denom, value=-lr * beta2 / (1 - beta2 ** k))
                if decay:
                    p.div_(1 + lr * decay)
                state["previous_grad"].copy_(grad)
        return loss


__all__ = ["Adan"]
