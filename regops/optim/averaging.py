"""Weight averaging inside the optimizer step: an exponential moving average
(``ema_decay``) or the uniform average of stochastic weight averaging
(``swa_start``) of every parameter, updated by the fused update right after
the parameter, and ``swap_averaged`` to evaluate with the averaged weights.

The rules are those of ``torch.optim.swa_utils.AveragedModel`` updated after
every step: the first update copies the parameter, later ones compute
``average = lerp(average, param, weight)`` with ``weight = 1 - ema_decay``
(``get_ema_multi_avg_fn``) or ``1 / (n_averaged + 1)`` (the default SWA
average). The state of a parameter holds the average (``"ema"`` or
``"swa"``, in the parameter's dtype or ``average_dtype``) and
``"n_averaged"``, a float32 count on the device, so that a step that
GradScaler skips changes neither without a host synchronization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
import numbers

import torch

AVERAGE_DTYPES = (None, torch.float32)


def check_averaging(group: dict) -> None:
    """ValueError naming a bad averaging option of a param group."""
    ema_decay, swa_start = group["ema_decay"], group["swa_start"]
    if ema_decay is not None and swa_start is not None:
        raise ValueError("ema_decay and swa_start exclude each other in a param group, got both "
                         f"(ema_decay={ema_decay!r}, swa_start={swa_start!r})")
    if ema_decay is not None and (isinstance(ema_decay, bool) or not isinstance(ema_decay, numbers.Real)
                                  or not 0.0 < ema_decay < 1.0):
        raise ValueError(f"ema_decay must be None or a number in (0, 1), got {ema_decay!r}")
    if swa_start is not None and (isinstance(swa_start, bool) or not isinstance(swa_start, numbers.Integral)
                                  or swa_start < 0):
        raise ValueError(f"swa_start must be None or an int >= 0, got {swa_start!r}")
    if group["average_dtype"] not in AVERAGE_DTYPES:
        raise ValueError(f"average_dtype must be None (the parameter's dtype) or torch.float32, "
                         f"got {group['average_dtype']!r}")


def average_key(group: dict) -> str | None:
    """The state key of the group's average, or None without averaging."""
    if group.get("ema_decay") is not None:
        return "ema"
    if group.get("swa_start") is not None:
        return "swa"
    return None


def averages_this_step(group: dict) -> bool:
    """Counts the group's step (``average_step``, on the host, GradScaler-
    skipped steps too) and says whether this step updates the average: every
    step for EMA, steps numbered swa_start and later (the first is 1) for SWA."""
    key = average_key(group)
    if key is None:
        return False
    group["average_step"] = group.get("average_step", 0) + 1
    return key == "ema" or group["average_step"] >= group["swa_start"]


def averaging_arguments(state: dict, group: dict, params: list[torch.Tensor]):
    """(averages, counts, weights) for ``params``: the state's averages
    (created as zeros: the first update copies), their counts and the lerp
    weight of each tensor, a float32 tensor on the parameters' device."""
    key = average_key(group)
    averages, counts = [], []
    for p in params:
        param_state = state[p]
        if key not in param_state:
            # average_dtype (float32) applies to 16-bit parameters; others
            # average in their own dtype.
            sixteen_bit = p.dtype in (torch.float16, torch.bfloat16)
            dtype = group["average_dtype"] if sixteen_bit and group["average_dtype"] is not None else p.dtype
            param_state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            param_state["n_averaged"] = torch.zeros((), dtype=torch.float32, device=p.device)
        averages.append(param_state[key])
        counts.append(param_state["n_averaged"])
    n_averaged = torch.stack(counts)
    if key == "ema":
        weights = torch.full_like(n_averaged, 1.0 - float(group["ema_decay"])).masked_fill_(n_averaged == 0, 1.0)
    else:
        weights = 1.0 / (n_averaged + 1.0)
    return averages, counts, weights


def count_averaged(counts: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
    """One more average in each count, unless GradScaler skipped the step."""
    if not counts:
        return
    if found_inf is None:
        torch._foreach_add_(counts, 1.0)
    else:
        torch._foreach_add_(counts, (found_inf.to(counts[0].device) == 0).float())


@contextlib.contextmanager
def swap_averaged(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Puts the averaged weights of ``optimizer`` (its groups with ema_decay
    or swa_start) into the parameters for the block, and the trained weights
    back after it. An average of the parameter's dtype is swapped in by
    exchanging the tensors' storage (no copy); a float32 average of a 16-bit
    parameter is copied in (rounded to nearest) and the parameter restored.
    torch.optim.swa_utils.update_bn recomputes batch-norm statistics for it."""
    swapped, copied = [], []
    with torch.no_grad():
        for group in optimizer.param_groups:
            key = average_key(group)
            if key is None:
                continue
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if key not in state:
                    continue
                average = state[key]
                if average.dtype == p.dtype:
                    trained = p.data
                    p.data = average
                    state[key] = trained
                    swapped.append((p, state, key))
                else:
                    copied.append((p, p.detach().clone()))
                    p.copy_(average)
    try:
        yield optimizer
    finally:
        with torch.no_grad():
            for p, state, key in swapped:
                average = p.data
                p.data = state[key]
                state[key] = average
            for p, trained in copied:
                p.copy_(trained)
