"""regops.convert: swap torch's regularization modules in a model for regops'.

One call turns an existing model (and its trained state) into a regops model:

    model = regops.convert(model)                     # Dropout, BatchNorm1d/2d/3d, LayerNorm, RMSNorm
    model = regops.convert(model, fuse_bn_relu=True)  # and BatchNorm -> ReLU fused

The new modules take over the very Parameter and buffer tensors of the old
ones (so an optimizer built before the call keeps working, and device, dtype
and values are unchanged), and the train/eval flag.
"""

from __future__ import annotations

from torch import nn

import regops.nn as regops_nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = (nn.LayerNorm, nn.RMSNorm)


def _take_over_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Hands old's parameters and buffers (the same tensor objects) to new."""
    for kind in ("_parameters", "_buffers"):
        old_state, new_state = getattr(old, kind), getattr(new, kind)
        if set(old_state) != set(new_state):
            raise RuntimeError(f"regops.convert: {type(new).__name__} holds {kind[1:]} {sorted(new_state)} but "
                               f"{type(old).__name__} holds {sorted(old_state)}")
        for name, tensor in old_state.items():
            new_state[name] = tensor
    new.train(old.training)
    return new


def _convert_dropout(module: nn.Dropout) -> nn.Module:
    return _take_over_state(module, regops_nn.Dropout(module.p, inplace=module.inplace))


def _convert_batch_norm(module: nn.Module, activation: str | None) -> nn.Module:
    cls = getattr(regops_nn, type(module).__name__)  # BatchNorm1d -> regops.nn.BatchNorm1d
    # Built on the meta device: its own tensors are replaced by module's at once.
    new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
              track_running_stats=module.track_running_stats, device="meta",
              bias=not module.affine or module.bias is not None, activation=activation)
    return _take_over_state(module, new)


def _convert_norm(module: nn.Module) -> nn.Module:
    if type(module) is nn.LayerNorm:
        new = regops_nn.LayerNorm(module.normalized_shape, eps=module.eps,
                                  elementwise_affine=module.elementwise_affine, bias=module.bias is not None,
                                  device="meta")
    else:
        new = regops_nn.RMSNorm(module.normalized_shape, eps=module.eps,
                                elementwise_affine=module.elementwise_affine, device="meta")
    return _take_over_state(module, new)


def _convertible(module: nn.Module) -> bool:
    # Exact types: a user subclass may have changed forward(), and the Lazy,
    # Sync and channel-wise (Dropout1d/2d/3d) variants compute something else.
    return type(module) is nn.Dropout or type(module) in _BATCH_NORMS or type(module) in _NORMS


def convert(model: nn.Module, fuse_bn_relu: bool = False) -> nn.Module:
    """Replaces, in place, every ``torch.nn.Dropout``,
    ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.LayerNorm`` and
    ``torch.nn.RMSNorm`` in ``model`` by the regops module of the same name,
    and returns the model (the new module if ``model`` itself is one of those).

    The new modules reuse the old modules' Parameter and buffer objects
    (weight, bias, running statistics, num_batches_tracked), so values,
    device, dtype and any optimizer that holds the parameters stay valid, and
    each keeps its module's train/eval state. A module that appears at several
    places in the model is replaced by one shared regops module. Only the
    exact torch classes are converted (not subclasses, LazyBatchNorm,
    SyncBatchNorm or Dropout1d/2d/3d); hooks registered on a replaced module
    are not carried over.

    ``fuse_bn_relu=True`` also fuses each BatchNorm that is directly followed
    by an ``nn.ReLU`` inside an ``nn.Sequential``: the BatchNorm becomes a
    regops BatchNorm with ``activation="relu"`` and the ReLU becomes
    ``nn.Identity`` (so state_dict keys do not move). Only Sequential
    containers are fused, because only there is the order of the calls known
    from the module tree; a BatchNorm used at more than one place is not fused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_bn_relu, bool):
        raise TypeError(f"fuse_bn_relu must be a bool, got {fuse_bn_relu!r}")

    # How many container slots hold each module (a container shared by several
    # parents counts once: its slots are the same for every use).
    uses: dict[int, int] = {}
    for container in model.modules():
        for child in container._modules.values():
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1

    replaced: dict[tuple[int, str | None], nn.Module] = {}

    def replacement(module: nn.Module, activation: str | None = None) -> nn.Module:
        key = (id(module), activation)
        if key not in replaced:
            if isinstance(module, nn.Dropout):
                replaced[key] = _convert_dropout(module)
            elif type(module) in _NORMS:
                replaced[key] = _convert_norm(module)
            else:
                replaced[key] = _convert_batch_norm(module, activation)
        return replaced[key]

    visited: set[int] = set()  # a container shared by several parents is walked once

    def visit(parent: nn.Module) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        # _modules, not named_children(): that skips a module's second slot.
        children = [(name, child) for name, child in parent._modules.items() if child is not None]
        if fuse_bn_relu and isinstance(parent, nn.Sequential):
            for (name, child), (next_name, next_child) in zip(children, children[1:]):
                if type(child) in _BATCH_NORMS and type(next_child) is nn.ReLU and uses[id(child)] == 1:
                    setattr(parent, name, replacement(child, "relu"))
                    setattr(parent, next_name, nn.Identity())
        for name, child in children:
            if getattr(parent, name) is not child:
                continue  # fused above
            if _convertible(child):
                setattr(parent, name, replacement(child))
            else:
                visit(child)

    if _convertible(model):
        return replacement(model)
    visit(model)
    return model


__all__ = ["convert"]
