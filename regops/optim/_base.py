"""What SGD and AdamW share: validation, grouping by (device, dtype), global
gradient-norm clipping and GradScaler support.

Distributed training (FSDP2 DTensor parameters) needs one hook here:
``_local`` maps a parameter, gradient or state to the tensor the kernel
updates (a DTensor's local shard); the clipping norm across ranks is
regops.distributed.grad_norm_squared's.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from regops.distributed import grad_norm_squared, is_dtensor, local_tensor
from regops.optim.averaging import averages_this_step, averaging_arguments, count_averaged

# Complex parameters are updated as pairs of real numbers (torch.view_as_real),
# as torch.optim does.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128)
L1_MODES = ("subgradient", "proximal")
# The torch.optim options of every group and the values torch gives them when
# a state_dict lacks them (torch.optim.SGD/AdamW.__setstate__): never the
# values of the optimizer the state_dict is loaded into.
TORCH_FLAG_DEFAULTS = {"maximize": False, "foreach": None, "differentiable": False, "fused": None}
# torch's words for a bad hyperparameter, followed by regops' rule.
_TORCH_NAMES = {"lr": "learning rate", "eps": "epsilon value"}


def tensor_hyperparameter(value: torch.Tensor, name: str, rule: str, read_tensor: bool) -> float | None:
    """The value of a hyperparameter given as a tensor, which must hold one
    floating-point element (torch's words, then regops' ``rule``). The value
    is read only with ``read_tensor`` (at construction): in ``step()`` that
    read would wait for the device every step, so there only its size and
    dtype are checked and the result is None."""
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"Tensor {name} must be 1-element: {rule}, got a {value.dtype} tensor of {value.numel()} "
                         "elements")
    return float(value) if read_tensor else None


def check_nonnegative(value, name: str, *, read_tensor: bool = True) -> None:
    """A number >= 0, or a one-element floating-point tensor (its value
    checked with ``read_tensor`` only, see tensor_hyperparameter)."""
    if isinstance(value, torch.Tensor):
        value = tensor_hyperparameter(value, name, f"{name} must be a float or a one-element floating-point tensor",
                                      read_tensor)
        if value is None:
            return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        words = _TORCH_NAMES.get(name, f"{name} value")
        raise ValueError(f"Invalid {words}: {value!r} ({name} must be a number >= 0)")


def check_implementation_flags(group: dict, optimizer: str) -> None:
    """torch.optim's implementation options. ``foreach`` and ``fused`` pick
    among torch's implementations of one rule; every regops step is one fused
    multi-tensor update whatever they say, so any value is accepted (with
    torch's rule that they exclude each other). ``capturable``: the step never
    reads a device value on the host, so it is always capturable. A
    differentiable step (autograd through the update) is not implemented."""
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("differentiable"):
        prefix = "`fused` does not support `differentiable`; " if group.get("fused") else ""
        raise NotImplementedError(f"{prefix}{optimizer} does not implement differentiable=True (autograd through "
                                  "the update); use torch.optim with differentiable=True for that")


def check_l1_mode(value) -> None:
    if value not in L1_MODES:
        raise ValueError(f"l1_mode must be one of {L1_MODES}, got {value!r}")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_max_grad_norm(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
        raise ValueError(f"max_grad_norm must be None or a number > 0, got {value!r}")


def is_flat(t: torch.Tensor) -> bool:
    """Whether a kernel can walk ``t``'s storage as one flat array: it covers
    exactly its elements (any dimension order, no gaps, no overlap)."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class PenalizedOptimizer(Optimizer):
    """Base of regops.optim.SGD and AdamW. Subclasses define ``_check_group``
    (hyperparameters of one param group, ValueError naming the argument),
    ``_group_step`` (one fused call per (device, dtype) bucket) and
    ``_extra_defaults`` for ``__setstate__``."""

    # GradScaler then hands over grad_scale and found_inf as attributes
    # (self.grad_scale, self.found_inf) instead of unscaling and checking the
    # gradients itself: unscaling is fused into the update and an inf/NaN
    # step is skipped on the device.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults):
        self._check_group(defaults)
        self.last_grad_norm: torch.Tensor | None = None
        # Whether any parameter is a DTensor: without one, the per-tensor
        # hooks below are skipped (the step's Python work per parameter is
        # what small models wait for).
        self._has_dtensors = False
        # Whether this step maps tensors for the kernels (a DTensor, a complex
        # or a non-flat parameter, see _locals), and the contiguous copies of
        # non-flat tensors it writes back after the update.
        self._maps_tensors = False
        self._write_back: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, defaults)

    # --- hooks for distributed subclasses ----------------------------------------

    @staticmethod
    def _local(tensor: torch.Tensor) -> torch.Tensor:
        """The tensor the kernel updates for a parameter, gradient or state:
        a DTensor's local shard (FSDP2), any other tensor itself."""
        return local_tensor(tensor)

    def _locals(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the kernels update for parameters or states: ``_local``
        of each, a complex one viewed as real pairs (torch.view_as_real), and
        one the kernels cannot walk flat (``w[:, ::2]``) replaced by a copy
        with the layout of its states (torch.empty_like), which ``step``
        writes back after the update; the same copy for every call of one
        step. The list itself when this step maps nothing (callers do not
        modify it)."""
        if not self._maps_tensors:
            return tensors
        return [self._kernel_tensor(t) for t in tensors]

    def _kernel_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        local = self._local(tensor) if self._has_dtensors else tensor
        view = _real_view(local)
        if is_flat(view):
            return view
        entry = self._write_back.get(id(tensor))
        if entry is None:
            entry = self._write_back[id(tensor)] = (view, _real_view(torch.empty_like(local)).copy_(view))
        return entry[1]

    def _kernel_grad(self, grad: torch.Tensor, kernel_param: torch.Tensor) -> torch.Tensor:
        """The (local, real) gradient with the strides of the tensor the
        kernel updates for its parameter; copied only when they differ."""
        if self._maps_tensors:
            grad = _real_view(self._local(grad) if self._has_dtensors else grad)
        return self._dense_like(grad, kernel_param)

    # --- param groups --------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        # torch.optim's own rules first (a tensor or an iterable of tensors or
        # of (name, tensor) pairs; a duplicate in a group warns, one across
        # groups raises), then regops' checks of the group as torch completed
        # it; a group that fails them is not kept.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"{type(self).__name__} supports float32, float64, float16, bfloat16, complex64 "
                                    f"and complex128 parameters, got {p.dtype}")
            check_implementation_flags(group, f"regops.optim.{type(self).__name__}")
            self._check_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        self._has_dtensors = self._has_dtensors or any(is_dtensor(p) for p in group["params"])
        self._share_rounding_seed()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_has_dtensors", any(is_dtensor(p) for group in self.param_groups
                                                          for p in group["params"]))
        self.__dict__.setdefault("_maps_tensors", False)
        self.__dict__.setdefault("_write_back", {})
        # A state_dict without an option: torch's options take torch's
        # defaults, as torch.optim does; the regops options, which a
        # torch.optim state_dict never has, keep this optimizer's.
        torch_defaults = {**TORCH_FLAG_DEFAULTS, **self._torch_flag_defaults()}
        for group in self.param_groups:
            for key, value in self._extra_defaults().items():
                group.setdefault(key, torch_defaults[key] if key in torch_defaults else self.defaults.get(key, value))
            for key, value in torch_defaults.items():
                group.setdefault(key, value)
            # The kernels walk a parameter and its states as one flat array
            # each: a loaded state laid out otherwise (torch's momentum
            # buffer is a clone of the gradient) takes its parameter's layout.
            for p in group["params"]:
                if p not in self.state or is_dtensor(p) or p.numel() <= 1:
                    continue
                layout = p.stride() if is_flat(p) else torch.empty_like(p).stride()  # that of zeros_like(p)
                for key, value in self.state[p].items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != layout:
                        self.state[p][key] = torch.empty_like(p).copy_(value)

        self._share_rounding_seed()

    def _torch_flag_defaults(self) -> dict:
        """The torch.optim options of this optimizer besides
        TORCH_FLAG_DEFAULTS, with torch's values for a state_dict that lacks them."""
        return {}

    # --- stochastic rounding ---------------------------------------------------------

    def _share_rounding_seed(self) -> None:
        """Once a group rounds stochastically, every group carries the
        optimizer's seed ("rounding_seed", drawn once from torch's default
        generator) and a count of its steps ("rounding_step"), so both go into
        the state_dict with the param groups."""
        if not any(group.get("stochastic_rounding") for group in self.param_groups):
            return
        seeds = [group["rounding_seed"] for group in self.param_groups if group.get("rounding_seed") is not None]
        seed = seeds[0] if seeds else int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        for group in self.param_groups:
            group["rounding_seed"] = seed
            group.setdefault("rounding_step", 0)

    def _rounding_tensor(self, group_index: int, params: list[torch.Tensor]):
        """The ops' rounding argument for ``params`` of param group
        ``group_index``: int64 [seed, group, step, each tensor's index in the
        group] on their device (README "Stochastic rounding")."""
        group = self.param_groups[group_index]
        positions = {id(p): i for i, p in enumerate(group["params"])}
        values = [group["rounding_seed"], group_index, group["rounding_step"]] + [positions[id(p)] for p in params]
        rounding = torch.tensor(values, dtype=torch.int64)
        device = params[0].device
        if device.type == "cpu":
            return rounding
        return rounding.pin_memory().to(device, non_blocking=True)

    def _op_extras(self, group_index: int, averaging: bool, counts: list, params: list[torch.Tensor]) -> dict:
        """The ops' stochastic rounding and averaging arguments for ``params``
        (a bucket of the group, or part of one); the averages' counts are
        collected in ``counts`` for after the update."""
        group = self.param_groups[group_index]
        extras = {}
        if group.get("stochastic_rounding"):
            extras["rounding"] = self._rounding_tensor(group_index, params)
        if averaging:
            averages, bucket_counts, weights = averaging_arguments(self.state, group, params)
            counts.extend(bucket_counts)
            extras.update(averages=self._locals(averages), average_weights=weights)
        return extras

    # --- the step ------------------------------------------------------------------

    def _params_with_grads(self, group, seen: set) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None or id(p) in seen:
                # A parameter listed twice in a group (torch warns) is updated once.
                continue
            seen.add(id(p))
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                                   "use torch.optim.SparseAdam or a dense gradient")
            # Checked here, for every group before any is updated, so that a
            # bad parameter never leaves a half-done step behind.
            if grad.dtype != p.dtype:
                raise TypeError(f"gradient dtype {grad.dtype} differs from its parameter's {p.dtype}")
            # Strides can change after construction (``p.data = ...``).
            if not self._maps_tensors and (p.is_complex() or not p.is_contiguous()):
                self._maps_tensors = True
            params.append(p)
            grads.append(grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._maps_tensors = self._has_dtensors
        seen: set = set()
        per_group = [self._params_with_grads(group, seen) for group in self.param_groups]
        if not any(params for params, _ in per_group):
            return loss
        # Hyperparameters may have changed since construction (a scheduler, a
        # user): validate every group before the first one is updated, without
        # reading tensor values (that would wait for the device every step).
        # Not while compiling: the checks would only add guards there.
        if not torch.compiler.is_compiling():
            for group, (params, _) in zip(self.param_groups, per_group):
                if params:
                    self._check_group(group, read_tensors=False)
        norm = None
        if any(group["max_grad_norm"] is not None for group in self.param_groups):
            # Summed across ranks for DTensor gradients sharded by FSDP2.
            squared = grad_norm_squared([grads for _, grads in per_group])
            norm = squared.sqrt()
            if grad_scale is not None:
                norm = norm / grad_scale.to(norm.device, non_blocking=True)
            self.last_grad_norm = norm
        for group_index, (group, (params, grads)) in enumerate(zip(self.param_groups, per_group)):
            if not params:
                continue
            if group.get("stochastic_rounding"):
                if "rounding_seed" not in group:  # switched on after construction
                    self._share_rounding_seed()
                # Counted on the host for every step, skipped ones too: the
                # count only has to differ between steps.
                group["rounding_step"] += 1
            averaging = averages_this_step(group)
            clip_coef = None
            if group["max_grad_norm"] is not None:
                # torch.nn.utils.clip_grad_norm_'s coefficient, on the device.
                clip_coef = torch.clamp(group["max_grad_norm"] / (norm + 1e-6), max=1.0)
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for p, g in zip(params, grads):
                bucket = buckets.setdefault((p.device, p.dtype), ([], []))
                bucket[0].append(p)
                bucket[1].append(g)
            for (device, _), (bucket_params, bucket_grads) in buckets.items():
                dense_grads = [self._kernel_grad(g, p) for p, g in zip(self._locals(bucket_params), bucket_grads)]
                counts = []
                extras = functools.partial(self._op_extras, group_index, averaging, counts)
                bucket_found_inf = _on(found_inf, device)
                try:
                    self._group_step(group, bucket_params, dense_grads, _on(grad_scale, device), bucket_found_inf,
                                     _on(clip_coef, device), extras)
                finally:
                    for view, copy in self._write_back.values():
                        view.copy_(copy)
                    self._write_back.clear()
                count_averaged(counts, bucket_found_inf)
        return loss

    @staticmethod
    def _dense_like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The (local) gradient with its (local) parameter's strides (the
        kernels walk both as one flat array); copied only in the rare case
        they differ."""
        if grad.numel() <= 1 or grad.stride() == param.stride():
            return grad
        return torch.empty_like(param).copy_(grad)

    @staticmethod
    def _lr(group, device):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.to(device=device, dtype=torch.float32, non_blocking=True)
        return float(lr)

    # Implemented by subclasses.
    def _check_group(self, group: dict, read_tensors: bool = True) -> None:
        """Raises ValueError naming a bad hyperparameter of ``group``; tensor
        values are read only with ``read_tensors`` (see check_nonnegative)."""
        raise NotImplementedError

    def _extra_defaults(self) -> dict:
        raise NotImplementedError

    def _group_step(self, group, params, grads, grad_scale, found_inf, clip_coef, extras) -> None:
        """``extras(params)``: the ops' keyword arguments for stochastic
        rounding and averaging of ``params`` (the bucket or part of it)."""
        raise NotImplementedError


def _on(tensor, device):
    if tensor is None:
        return None
    return tensor.to(device=device, dtype=torch.float32, non_blocking=True)
