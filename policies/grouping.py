"""Named parameter groups: :class:`ParamGroup` and the ordered, validated :class:`ParamGroups`.

:func:`layerwise.policies.group_parameters` builds them from a model (see
:mod:`layerwise.policies.grouping_strategies`); this module holds the result and its views: the
``{group: [parameter names]}`` mapping that :mod:`sensitivity` takes, optimizer parameter
groups, a DataFrame, a printed table and a JSON-able manifest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from torch import nn

from layerwise.policies.grouping_rules import list_names

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ROLES", "ParamGroup", "ParamGroups"]

ROLES = ("backbone", "head")


@dataclass(frozen=True)
class ParamGroup:
    """One named group of parameters.

    ``depth``: 0 for the group nearest the input, largest for the head (groups are ranked by
    the shallowest layer they hold, so depths are 0, 1, ... with no gaps). ``role``:
    ``"head"`` when every parameter belongs to the head, else ``"backbone"``. ``size``: the
    number of scalars. ``weight_decay``: False for normalisation weights and biases when the
    grouping split them off (strategy ``norm``), else True.

    >>> ParamGroup("head", ("fc.weight", "fc.bias"), depth=2, role="head", size=42)
    ParamGroup(name='head', param_names=('fc.weight', 'fc.bias'), depth=2, role='head', size=42, weight_decay=True)
    """  # noqa: E501

    name: str
    param_names: tuple[str, ...]
    depth: int = 0
    role: str = "backbone"
    size: int = 0
    weight_decay: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if isinstance(self.param_names, str) or not isinstance(self.param_names, Iterable):
            raise TypeError(
                f"param_names of group {self.name!r} must be a sequence of str, "
                f"got {self.param_names!r}"
            )
        names = tuple(self.param_names)
        if not names:
            raise ValueError(f"group {self.name!r} is empty: param_names=()")
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"param_names of group {self.name!r} must be non-empty str: {names!r}")
        object.__setattr__(self, "param_names", names)
        for field, value in (("depth", self.depth), ("size", self.size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{field} of group {self.name!r} must be an int >= 0, got {value!r}"
                )
        if self.role not in ROLES:
            raise ValueError(
                f"role of group {self.name!r} must be one of {ROLES}, got {self.role!r}"
            )
        if not isinstance(self.weight_decay, bool):
            raise TypeError(
                f"weight_decay of group {self.name!r} must be a bool, got {self.weight_decay!r}"
            )


class ParamGroups(Sequence[ParamGroup]):
    """An ordered collection of :class:`ParamGroup`, checked to partition the trainables.

    ``parameters`` maps every trainable parameter name to its tensor; each must be in exactly
    one group. ``frozen`` names the parameters left out (``requires_grad=False``), ``tied``
    maps each alias of a shared parameter to the one name it is grouped under. Index by
    position or by group name.

    >>> from torch import nn
    >>> from layerwise import policies
    >>> groups = policies.group_parameters(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    >>> groups.names
    ('layer.0', 'head')
    >>> groups["head"].param_names, groups["head"].size, groups.max_depth
    (('1.weight', '1.bias'), 18, 1)
    >>> groups.mapping()
    {'layer.0': ['0.weight', '0.bias'], 'head': ['1.weight', '1.bias']}
    """

    def __init__(
        self,
        groups: Iterable[ParamGroup],
        *,
        parameters: Mapping[str, nn.Parameter],
        frozen: Iterable[str] = (),
        tied: Mapping[str, str] | None = None,
        strategy: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._groups = tuple(groups)
        self._parameters = dict(parameters)
        self._frozen = tuple(frozen)
        self._tied = dict(tied or {})
        self.strategy = strategy
        self.options = dict(options or {})
        for group in self._groups:
            if not isinstance(group, ParamGroup):
                raise TypeError(f"groups must hold ParamGroup objects, got {type(group).__name__}")
        self._index = {g.name: i for i, g in enumerate(self._groups)}
        self._validate()

    def _validate(self) -> None:
        if not self._groups:
            raise ValueError("groups must hold at least one ParamGroup, got none")
        if len(self._index) != len(self._groups):
            seen = [g.name for g in self._groups]
            dups = list(dict.fromkeys(n for n in seen if seen.count(n) > 1))
            raise ValueError(f"duplicate group name {list_names(dups)}")
        owner: dict[str, str] = {}
        for group in self._groups:
            for name in group.param_names:
                if name in owner:
                    raise ValueError(
                        f"parameter {name!r} is in two groups, {owner[name]!r} and {group.name!r}"
                    )
                owner[name] = group.name
        frozen = set(self._frozen)
        in_frozen = [n for n in owner if n in frozen]
        if in_frozen:
            raise ValueError(f"frozen parameters are in a group: {list_names(in_frozen)}")
        unknown = [n for n in owner if n not in self._parameters]
        if unknown:
            raise ValueError(f"grouped names are not trainable parameters: {list_names(unknown)}")
        missing = [n for n in self._parameters if n not in owner]
        if missing:
            raise ValueError(f"trainable parameters in no group: {list_names(missing)}")

    # -- Sequence -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._groups)

    @overload
    def __getitem__(self, key: int | str) -> ParamGroup: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[ParamGroup, ...]: ...
    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"no group named {key!r}; groups are {list_names(self.names, 12)}")
            return self._groups[self._index[key]]
        return self._groups[key]

    def __iter__(self) -> Iterator[ParamGroup]:
        return iter(self._groups)

    def __contains__(self, item: object) -> bool:
        return item in self._index if isinstance(item, str) else item in self._groups

    # -- views ----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Group names, in order."""
        return tuple(g.name for g in self._groups)

    @property
    def frozen(self) -> tuple[str, ...]:
        """Names of the frozen parameters left out of every group."""
        return self._frozen

    @property
    def tied(self) -> dict[str, str]:
        """``{alias: name it is grouped under}`` for parameters registered under several names."""
        return dict(self._tied)

    @property
    def max_depth(self) -> int:
        """The largest group depth (the head's)."""
        return max(g.depth for g in self._groups)

    @property
    def num_params(self) -> int:
        """Trainable scalars over all groups."""
        return sum(g.size for g in self._groups)

    def mapping(self) -> dict[str, list[str]]:
        """``{group name: [parameter names]}``, the form :func:`layerwise.sensitivity.estimate`
        takes."""
        return {g.name: list(g.param_names) for g in self._groups}

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The parameter tensors of group ``name``, in order."""
        return [self._parameters[n] for n in self[name].param_names]

    def to_optimizer_groups(
        self, lr: float | None = None, weight_decay: float | None = None, **hyper: Any
    ) -> list[dict[str, Any]]:
        """Parameter groups for a ``torch.optim`` optimizer, each with its ``"name"``.

        ``lr`` (if given) and ``hyper`` (e.g. ``momentum=0.9``) are set on every group.
        ``weight_decay`` is set on the groups with ``weight_decay=True``; groups split off
        as no-decay always get ``0.0``. With ``weight_decay=None`` the decay groups carry no
        ``"weight_decay"`` key, so the optimizer's own default applies to them.

        >>> import torch
        >>> from torch import nn
        >>> from layerwise import policies
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> groups = policies.group_parameters(model, "role+norm")
        >>> opt = torch.optim.AdamW(groups.to_optimizer_groups(lr=1e-3), weight_decay=0.05)
        >>> [(g["name"], g["weight_decay"]) for g in opt.param_groups]
        [('backbone', 0.05), ('backbone.no_decay', 0.0), ('head', 0.05), ('head.no_decay', 0.0)]
        """
        _check_rate("lr", lr)
        _check_rate("weight_decay", weight_decay)
        clash = sorted({"params", "name"} & set(hyper))
        if clash:
            raise ValueError(
                f"{clash[0]} is set per group and cannot be passed as a hyper-parameter"
            )
        out = []
        for group in self._groups:
            entry: dict[str, Any] = {"params": self.parameters(group.name), "name": group.name}
            if lr is not None:
                entry["lr"] = float(lr)
            if not group.weight_decay:
                entry["weight_decay"] = 0.0
            elif weight_decay is not None:
                entry["weight_decay"] = float(weight_decay)
            out.append(entry | hyper)
        return out

    def describe(self) -> pd.DataFrame:
        """One row per group: name, parameters (tensors), size, depth, role, weight_decay."""
        import pandas as pd  # imported on use: keeps `import policies` light

        rows = [(g.name, len(g.param_names), g.size, g.depth, g.role, g.weight_decay) for g in self]
        columns = ["name", "parameters", "size", "depth", "role", "weight_decay"]
        return pd.DataFrame(rows, columns=columns)

    def manifest(self) -> dict[str, Any]:
        """JSON-able record of the grouping for run manifests."""
        return {
            "strategy": self.strategy,
            "options": self.options,
            "groups": [
                {
                    "name": g.name,
                    "depth": g.depth,
                    "role": g.role,
                    "size": g.size,
                    "weight_decay": g.weight_decay,
                    "parameters": list(g.param_names),
                }
                for g in self
            ],
            "num_params": self.num_params,
            "frozen": list(self._frozen),
            "tied": dict(self._tied),
        }

    def footer(self) -> list[str]:
        """The lines under the table: totals, frozen and tied parameters (each alias with the
        name it is grouped under and the group that holds it)."""
        plural = "group" if len(self) == 1 else "groups"
        lines = [f"total: {len(self)} {plural}, {self.num_params:,} trainable scalars"]
        lines.append(
            f"frozen (left out): {len(self._frozen)} parameters: {list_names(self._frozen)}"
            if self._frozen
            else "frozen (left out): none"
        )
        if self._tied:
            owner = {n: g.name for g in self for n in g.param_names}
            pairs = [
                f"{a} -> {b}" + (f" (group {owner[b]})" if b in owner else " (frozen)")
                for a, b in self._tied.items()
            ]
            lines.append(f"tied (grouped once): {', '.join(pairs)}")
        return lines

    def __str__(self) -> str:
        header = ("group", "params", "size", "depth", "role", "decay")
        rows = [
            (g.name, str(len(g.param_names)), f"{g.size:,}", str(g.depth), g.role, _yes(g))
            for g in self
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {1, 2, 3}

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        table = [line(header), *(line(r) for r in rows)]
        return "\n".join([*table, *self.footer()])

    def __repr__(self) -> str:
        return (
            f"ParamGroups(strategy={self.strategy!r}, groups={list(self.names)!r}, "
            f"frozen={len(self._frozen)})"
        )


def _yes(group: ParamGroup) -> str:
    return "yes" if group.weight_decay else "no"


def _check_rate(argument: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number or None, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument} must be finite and >= 0, got {value!r}")
