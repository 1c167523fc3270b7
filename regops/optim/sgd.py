"""Penalized SGD: torch.optim.SGD plus L1, global-norm clipping and fused
GradScaler unscaling, as one fused update per (device, dtype)."""

from __future__ import annotations

import torch

from regops.ops.optim import sgd_step_
from regops.optim._base import (ParamsT, PenalizedOptimizer, check_bool, check_l1_mode, check_max_grad_norm,
                                check_nonnegative)
from regops.optim.averaging import check_averaging


class SGD(PenalizedOptimizer):
    r"""SGD with momentum and L2 / L1 penalties.

    With ``p`` the parameter before the step and ``g`` its gradient (divided by
    GradScaler's scale and multiplied by the clipping coefficient when those
    apply)::

        g = -g                                  if maximize
        g = g + weight_decay * p                coupled L2, as torch.optim.SGD
        g = g + l1 * sign(p)                    l1_mode="subgradient"
        buf = g (first step), else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf      (when momentum != 0)
        p = p - lr * g
        p = sign(p) * max(|p| - lr * l1, 0)     l1_mode="proximal" (exact zeros)

    With ``l1 = 0`` and no clipping this is ``torch.optim.SGD`` (for-loop
    implementation) within float rounding; the math is float32 for every
    parameter dtype, the momentum buffer has the parameter's dtype.

    ``max_grad_norm``: the gradients are scaled as by
    ``torch.nn.utils.clip_grad_norm_(all parameters of this optimizer,
    max_grad_norm)`` before the step (the norm spans every group; a group
    whose max_grad_norm is None is not scaled). The norm is kept on the device
    in ``last_grad_norm``. Every option can be set per param group.

    ``stochastic_rounding``: bfloat16 / float16 parameters and states are
    rounded stochastically from the float32 update (README "Stochastic
    rounding"). ``ema_decay`` / ``swa_start``: a weight average in the state
    ("ema" / "swa", of ``average_dtype``), updated in the same pass (see
    regops.optim.averaging and regops.optim.swap_averaged).
    """

    def __init__(self, params: ParamsT, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 l1: float = 0.0, l1_mode: str = "subgradient", max_grad_norm: float | None = None,
                 stochastic_rounding: bool = False, ema_decay: float | None = None, swa_start: int | None = None,
                 average_dtype: torch.dtype | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, l1=l1, l1_mode=l1_mode, max_grad_norm=max_grad_norm,
                        stochastic_rounding=stochastic_rounding, ema_decay=ema_decay, swa_start=swa_start,
                        average_dtype=average_dtype)
        super().__init__(params, defaults)

    def _extra_defaults(self) -> dict:
        return {"nesterov": False, "maximize": False, "l1": 0.0, "l1_mode": "subgradient", "max_grad_norm": None,
                "stochastic_rounding": False, "ema_decay": None, "swa_start": None, "average_dtype": None}

    def _torch_flag_defaults(self) -> dict:
        return {"nesterov": False, "fused": False}  # torch.optim.SGD.__setstate__'s

    def _check_group(self, group: dict, read_tensors: bool = True) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay", "l1"):
            check_nonnegative(group[name], name, read_tensor=read_tensors)
        check_l1_mode(group["l1_mode"])
        check_max_grad_norm(group["max_grad_norm"])
        check_bool(group["stochastic_rounding"], "stochastic_rounding")
        check_averaging(group)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening, got "
                             f"momentum={group['momentum']} and dampening={group['dampening']}")

    def _group_step(self, group, params, grads, grad_scale, found_inf, clip_coef, extras) -> None:
        momentum = float(group["momentum"])
        options = dict(lr=self._lr(group, params[0].device), momentum=momentum, dampening=float(group["dampening"]),
                       weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                       maximize=bool(group["maximize"]), l1=float(group["l1"]),
                       proximal=group["l1_mode"] == "proximal", grad_scale=grad_scale, found_inf=found_inf,
                       clip_coef=clip_coef)
        local = self._locals(params)
        if momentum == 0:
            sgd_step_(local, grads, [], first_step=False, **extras(params), **options)
            return
        # Parameters whose buffer exists, and those on their first step (the
        # buffer then takes the gradient as is, as in torch). The new buffers
        # start as zeros rather than uninitialized memory so that a first step
        # skipped by GradScaler leaves a harmless buffer.
        old, new = ([], [], [], []), ([], [], [], [])
        for p, local_p, g in zip(params, local, grads):
            state = self.state[p]
            buffer = state.get("momentum_buffer")
            target = old
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                target = new
            target[0].append(local_p)
            target[1].append(g)
            target[2].append(buffer)
            target[3].append(p)
        for (bucket_params, bucket_grads, buffers, originals), first_step in ((old, False), (new, True)):
            if bucket_params:
                sgd_step_(bucket_params, bucket_grads, self._locals(buffers), first_step=first_step,
                          **extras(originals), **options)
