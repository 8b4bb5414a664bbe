"""From a ``{group name: [parameter names]}`` mapping to the index the estimators use.

Conventions (decided here, relied upon everywhere else):

* **Default groups**: one group per module that owns parameters directly, named by the
  module's qualified name (``"(root)"`` for parameters of the model itself), in
  ``model.named_parameters()`` order. Frozen parameters (``requires_grad=False``) are left
  out of the default groups.
* **Tied parameters** (one tensor under several names) are counted once: any alias may be
  named, it resolves to the first name ``model.named_parameters()`` gives. A tensor named
  by two groups is an error (it would be counted twice).
* **Frozen parameters named explicitly** are measured like any other: every quantity is a
  property of the loss surface, not of the optimizer, so a group the user asks for is
  differentiated whether or not the optimizer will update it.
* Parameters in no group are held constant: they are not differentiated at all, which
  also makes the estimate cheaper.
* Only floating-point parameters can be named: an integer (or boolean, or complex)
  parameter has no real gradient and raises
  :class:`~layerwise.sensitivity.errors.NonFloatingParameterError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerwise.sensitivity.errors import NonFloatingParameterError

__all__ = ["GroupIndex", "default_groups", "resolve_groups"]

ROOT_GROUP = "(root)"


@dataclass(frozen=True)
class GroupIndex:
    """Resolved groups: ``names[g]`` owns the canonical parameter names ``members[g]``.

    ``params`` lists every differentiated parameter name in model order and
    ``param_group[i]`` is the group index of ``params[i]``.
    """

    names: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]
    params: tuple[str, ...]
    param_group: tuple[int, ...]
    sizes: tuple[int, ...]
    #: tensors made from the fields, per (what, dtype, device): made once, read only
    _tensors: dict[Any, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.names)

    def group_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``param_group`` as a long tensor, for ``index_add`` reductions per group (made once
        per device and shared: do not modify it)."""
        return self._tensor("group_ids", self.param_group, torch.long, device)

    def size_tensor(self, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        """``sizes`` as a tensor of ``dtype`` (made once per dtype and device, shared: do not
        modify it)."""
        return self._tensor("sizes", self.sizes, dtype, device)

    def _tensor(self, what: str, values: tuple[int, ...], dtype: torch.dtype, device: Any) -> Any:
        if device is None:  # the default device may change: not cached
            return torch.tensor(values, dtype=dtype)
        key = (what, dtype, torch.device(device))
        found = self._tensors.get(key)
        if found is None:
            found = self._tensors[key] = torch.tensor(values, dtype=dtype, device=device)
        return found

    def mapping(self) -> dict[str, list[str]]:
        return {n: list(m) for n, m in zip(self.names, self.members, strict=True)}


def default_groups(model: nn.Module) -> dict[str, list[str]]:
    """One group per module owning trainable parameters directly (see module docstring).

    >>> default_groups(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups: dict[str, list[str]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            groups.setdefault(mod_name or ROOT_GROUP, []).append(full)
    return groups


def resolve_groups(model: nn.Module, groups: Mapping[str, Iterable[str]] | None) -> GroupIndex:
    """Validate ``groups`` against ``model`` and build the :class:`GroupIndex`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = canonical.setdefault(id(p), name)
    if groups is None:
        groups = default_groups(model)
        if not groups:
            raise ValueError(
                f"model {type(model).__name__} has no trainable parameters; pass groups= "
                "naming the parameters to measure"
            )
    if not isinstance(groups, Mapping):
        raise TypeError(
            f"groups must be a mapping {{group name: [parameter names]}}, got "
            f"{type(groups).__name__}"
        )
    if not groups:
        raise ValueError("groups is empty; pass None for one group per module")
    owner: dict[str, str] = {}
    members: list[tuple[str, ...]] = []
    for gname, names in groups.items():
        if not isinstance(gname, str) or not gname:
            raise ValueError(f"group names must be non-empty strings, got {gname!r}")
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(f"groups[{gname!r}] must be a list of parameter names, got {names!r}")
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"groups[{gname!r}] must list parameter names (strings), got {names!r}")
        unknown = [n for n in names if n not in alias]
        if unknown:
            raise ValueError(
                f"groups[{gname!r}] names unknown parameters {unknown}; the model's "
                f"parameters are {list(dict.fromkeys(alias.values()))}"
            )
        resolved: list[str] = []
        for n in names:
            c = alias[n]
            if c in owner and owner[c] != gname:
                raise ValueError(
                    f"parameter {n!r} is in groups {owner[c]!r} and {gname!r}; a parameter "
                    "(or a tied alias of it) may belong to one group only"
                )
            if c not in owner:
                owner[c] = gname
                resolved.append(c)
        if not resolved:
            raise ValueError(f"groups[{gname!r}] is empty")
        members.append(tuple(resolved))
    names_in_order = list(groups)
    index = {g: i for i, g in enumerate(names_in_order)}
    params = tuple(n for n in dict.fromkeys(alias.values()) if n in owner)
    tensors = dict(model.named_parameters())
    for n in params:
        if not tensors[n].is_floating_point():
            raise NonFloatingParameterError(
                f"groups[{owner[n]!r}] names parameter {n!r} of dtype {tensors[n].dtype}; only "
                "floating-point parameters have a gradient to measure: leave it out of groups"
            )
    sizes = [0] * len(names_in_order)
    for n in params:
        sizes[index[owner[n]]] += tensors[n].numel()
    return GroupIndex(
        names=tuple(names_in_order),
        members=tuple(members),
        params=params,
        param_group=tuple(index[owner[n]] for n in params),
        sizes=tuple(sizes),
    )
