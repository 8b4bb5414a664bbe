"""Names for the optimizer's groups and for the parameters inside them.

Groups are named by ``group["name"]``, ``"group{i}"`` when absent (the engine writes the
default into the group, so checkpoints and torch schedulers see it). Parameters are named
as in ``model.named_parameters()`` of the *unwrapped* model (the module inside a
``DistributedDataParallel``/``DataParallel`` wrapper or a ``torch.compile`` result), so
that the sensitivity mapping ``{group name: [parameter names]}`` speaks the model's language.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["name_groups", "parameter_mapping", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters under their plain names.

    >>> unwrap_model(nn.DataParallel(nn.Linear(2, 1))).__class__.__name__
    'Linear'
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def name_groups(
    param_groups: Sequence[MutableMapping[str, Any]], start: int = 0, *, assign: bool = True
) -> list[str]:
    """The groups' names, ``group["name"]`` or ``"group{i}"``, checked to be unique
    non-empty strings; with ``assign``, the default is written into the groups from index
    ``start`` on (after the check, so a failed check changes nothing)."""
    names = [g.get("name", f"group{i}") for i, g in enumerate(param_groups)]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"optimizer group {i} has name {name!r}; names must be non-empty str")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"optimizer group names must be unique, got duplicates {duplicated}")
    if assign:
        for i in range(start, len(param_groups)):
            param_groups[i].setdefault("name", names[i])
    return names


def parameter_mapping(
    model: nn.Module, param_groups: Sequence[MutableMapping[str, Any]]
) -> dict[str, list[str]]:
    """``{group name: [names of the group's trainable parameters in model]}``.

    Every parameter of the optimizer must belong to ``model`` (``ValueError`` otherwise,
    naming the group and the parameter's shape). Parameters with ``requires_grad=False``
    are left out of the mapping (there is nothing to measure), as are groups left empty.
    Model parameters that no group holds are allowed (another optimizer may own them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {model!r}")
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    mapping: dict[str, list[str]] = {}
    for i, group in enumerate(param_groups):
        label = group.get("name", f"group{i}")
        chosen = []
        for j, p in enumerate(group["params"]):
            if id(p) not in names:
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else p
                raise ValueError(
                    f"model: parameter {j} (shape {shape}) of optimizer group {label!r} is not "
                    f"a parameter of model ({type(model).__name__}); pass the model whose "
                    "parameters the optimizer updates"
                )
            if p.requires_grad:
                chosen.append(names[id(p)])
        if chosen:
            mapping[label] = chosen
    if not mapping:
        raise ValueError(
            f"model: the optimizer holds no trainable parameter of model ({type(model).__name__})"
        )
    return mapping
