"""Does a checkpoint fit the wrapped optimizer? Checked before anything is loaded.

``torch.optim.Optimizer.load_state_dict`` checks the number of groups and of parameters per
group, nothing else: an SGD checkpoint loads into Adam (and the next step raises
``KeyError``), a checkpoint of a model whose layers had other widths loads too (and the next
step raises a size mismatch). So the engine's part of a checkpoint records, under ``base``,

* ``class``: the base optimizer's class, ``module.QualName``;
* ``shapes``: per group, each parameter's shape (a list of ints);

and :func:`check_fits` compares a checkpoint with the optimizer it is loaded into: the
class, the number of groups, the number of parameters in each group and their shapes, and
the per-parameter state: every entry of ``state`` must belong to a parameter of the
checkpoint's groups, be a mapping, and have the same keys as this optimizer's state for the
same parameter where it has one (an optimizer that has not stepped has no state to compare:
the recorded class stands for its keys). Each mismatch is a ``ValueError`` that names the
group, the parameter and both sides.

>>> net = torch.nn.Linear(2, 1)
>>> describe(torch.optim.SGD(net.parameters(), lr=0.1))
{'class': 'torch.optim.sgd.SGD', 'shapes': [[[1, 2], [1]]]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_fits", "class_name", "describe"]


def class_name(optimizer: torch.optim.Optimizer) -> str:
    """``module.QualName`` of the optimizer's class."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The ``base`` entry: the class and, per group, each parameter's shape (plain data)."""
    return {
        "class": class_name(optimizer),
        "shapes": [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups],
    }


def check_fits(
    saved: Any, state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer, names: list[str]
) -> None:
    """``ValueError`` naming the first way in which the checkpoint ``state_dict`` (whose
    ``base`` entry is ``saved``) does not fit ``optimizer`` (groups named ``names``)."""
    where = "state_dict['layerwise']['base']"
    if not isinstance(saved, Mapping) or set(saved) != {"class", "shapes"}:
        raise ValueError(f"{where} must be a mapping with keys class, shapes; got {saved!r:.120}")
    here = class_name(optimizer)
    if saved["class"] != here:
        raise ValueError(
            f"state_dict was saved from a {saved['class']} optimizer; this engine wraps a {here}: "
            "its state (and hyper-parameters) would not fit"
        )
    shapes, groups = saved["shapes"], state_dict["param_groups"]
    if not isinstance(shapes, list) or len(shapes) != len(optimizer.param_groups):
        raise ValueError(
            f"{where}['shapes'] must list the parameter shapes of {len(names)} groups, "
            f"got {shapes!r:.120}"
        )
    ids: dict[Any, tuple[str, int, torch.Tensor]] = {}
    for group, name, saved_shapes, saved_group in zip(
        optimizer.param_groups, names, shapes, groups, strict=True
    ):
        params, saved_ids = group["params"], saved_group.get("params")
        if not isinstance(saved_shapes, list) or not isinstance(saved_ids, list):
            raise ValueError(f"state_dict: group {name!r} lists no parameters ({saved_ids!r:.80})")
        if not len(saved_shapes) == len(saved_ids) == len(params):
            raise ValueError(
                f"group {name!r} has {len(saved_ids)} parameters in the state_dict "
                f"({len(saved_shapes)} shapes recorded) and {len(params)} here"
            )
        for i, (p, shape, pid) in enumerate(zip(params, saved_shapes, saved_ids, strict=True)):
            if isinstance(pid, bool) or not isinstance(pid, int):
                raise ValueError(
                    f"state_dict: parameter {i} of group {name!r} has id {pid!r:.40}, not an int"
                )
            if shape != list(p.shape):
                raise ValueError(
                    f"parameter {i} of group {name!r} has shape {_shape(shape)} in the "
                    f"state_dict and {tuple(p.shape)} here"
                )
            ids[pid] = (name, i, p)
    _check_state(state_dict.get("state"), ids, optimizer)


def _check_state(state: Any, ids: Mapping[Any, tuple[str, int, torch.Tensor]], optimizer) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"state_dict['state'] must be a mapping, got {state!r:.80}")
    for pid, entry in state.items():
        if pid not in ids:
            raise ValueError(
                f"state_dict['state'] holds an entry for parameter id {pid!r}, which no group "
                "of the state_dict lists"
            )
        name, i, param = ids[pid]
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"state of parameter {i} of group {name!r} must be a mapping, got {entry!r:.80}"
            )
        own = optimizer.state.get(param)
        if own and set(own) != set(entry):
            raise ValueError(
                f"state of parameter {i} of group {name!r} has keys {sorted(map(str, entry))} "
                f"in the state_dict and {sorted(map(str, own))} here"
            )


def _shape(shape: Any) -> Any:
    return tuple(shape) if isinstance(shape, list) else shape
