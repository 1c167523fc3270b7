"""Penalized AdamW: torch.optim.AdamW plus coupled L2, L1, global-norm
clipping and fused GradScaler unscaling, as one fused update per (device, dtype)."""

from __future__ import annotations

import numbers

import torch

from regops.ops.optim import adamw_step_
from regops.optim._base import (ParamsT, PenalizedOptimizer, check_bool, check_l1_mode, check_max_grad_norm,
                                check_nonnegative, tensor_hyperparameter)
from regops.optim.averaging import check_averaging


class AdamW(PenalizedOptimizer):
    r"""AdamW with decoupled weight decay, a coupled L2 and an L1 penalty.

    With ``p`` the parameter before the step, ``g`` its gradient (divided by
    GradScaler's scale and multiplied by the clipping coefficient when those
    apply) and ``t`` the step count after this step::

        g = -g                                  if maximize
        g = g + l2 * p                          coupled L2, as torch.optim.Adam's weight_decay
        g = g + l1 * sign(p)                    l1_mode="subgradient"
        p = p * (1 - lr * weight_decay)         decoupled decay, as torch.optim.AdamW
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2;   v_max = max(v_max, v) and use v_max if amsgrad
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
        p = sign(p) * max(|p| - lr * l1, 0)     l1_mode="proximal" (exact zeros)

    With ``l1 = l2 = 0`` and no clipping this is ``torch.optim.AdamW``
    (for-loop implementation) within float rounding; the math is float32 for
    every parameter dtype and the states (``step`` a float32 tensor,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are laid out as torch's,
    so state_dicts load both ways.

    ``max_grad_norm``: as ``torch.nn.utils.clip_grad_norm_(all parameters,
    max_grad_norm)`` before the step, fused (see ``regops.optim.SGD``); the
    norm is kept on the device in ``last_grad_norm``.

    ``stochastic_rounding``: bfloat16 / float16 parameters and states are
    rounded stochastically from the float32 update (README "Stochastic
    rounding"). ``ema_decay`` / ``swa_start``: a weight average in the state
    ("ema" / "swa", of ``average_dtype``), updated in the same pass (see
    regops.optim.averaging and regops.optim.swap_averaged).
    """

    def __init__(self, params: ParamsT, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, l2: float = 0.0, l1: float = 0.0, l1_mode: str = "subgradient",
                 max_grad_norm: float | None = None, stochastic_rounding: bool = False,
                 ema_decay: float | None = None, swa_start: int | None = None,
                 average_dtype: torch.dtype | None = None) -> None:
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            # torch's form: a one-element tensor beta becomes a 0-dim one.
            betas = tuple(b.reshape(()) if isinstance(b, torch.Tensor) and b.numel() == 1 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True, l2=l2, l1=l1, l1_mode=l1_mode, max_grad_norm=max_grad_norm,
                        stochastic_rounding=stochastic_rounding, ema_decay=ema_decay, swa_start=swa_start,
                        average_dtype=average_dtype)
        super().__init__(params, defaults)

    def _extra_defaults(self) -> dict:
        return {"amsgrad": False, "maximize": False, "l2": 0.0, "l1": 0.0, "l1_mode": "subgradient",
                "max_grad_norm": None, "stochastic_rounding": False, "ema_decay": None, "swa_start": None,
                "average_dtype": None}

    def _torch_flag_defaults(self) -> dict:
        return {"amsgrad": False, "capturable": False, "decoupled_weight_decay": True}

    def __setstate__(self, state):
        super().__setstate__(state)
        # torch.optim keeps a state_dict's Python-number step as a tensor.
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state and not isinstance(p_state["step"], torch.Tensor):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32, device=p.device)

    def _check_group(self, group: dict, read_tensors: bool = True) -> None:
        for name in ("lr", "eps", "weight_decay", "l2", "l1"):
            check_nonnegative(group[name], name, read_tensor=read_tensors)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                beta = tensor_hyperparameter(beta, f"betas[{index}]", "a one-element floating-point tensor",
                                             read_tensors)
                if beta is None:
                    continue
            if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} (betas[{index}] must be in "
                                 "[0, 1))")
        if not group["decoupled_weight_decay"]:
            raise ValueError("decoupled_weight_decay must be True for regops.optim.AdamW (a coupled penalty "
                             "is its l2 option)")
        check_l1_mode(group["l1_mode"])
        check_max_grad_norm(group["max_grad_norm"])
        check_bool(group["stochastic_rounding"], "stochastic_rounding")
        check_averaging(group)

    def _state_of(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = state["step"]
        if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.device != p.device:
            # torch keeps step on the CPU (and as float64 under a float64
            # default dtype); the kernel reads it on the parameter's device.
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device).reshape(())
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _group_step(self, group, params, grads, grad_scale, found_inf, clip_coef, extras) -> None:
        amsgrad = bool(group["amsgrad"])
        states = [self._state_of(p, amsgrad) for p in params]
        beta1, beta2 = group["betas"]
        adamw_step_(
            self._locals(params), grads,
            self._locals([s["exp_avg"] for s in states]), self._locals([s["exp_avg_sq"] for s in states]),
            self._locals([s["max_exp_avg_sq"] for s in states]) if amsgrad else [],
            [s["step"] for s in states],
            lr=self._lr(group, params[0].device), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), l2=float(group["l2"]), l1=float(group["l1"]),
            proximal=group["l1_mode"] == "proximal", amsgrad=amsgrad, maximize=bool(group["maximize"]),
            grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, **extras(params))
