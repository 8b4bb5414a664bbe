"""``OptimizerWrapper``: a torch optimizer that changes the step of another and delegates the rest.

The wrappers of this package (:class:`layerwise.engine.SAM`,
:class:`layerwise.engine.NormalizedGradients`) change *how* a step is taken and leave
everything else to the optimizer they wrap: ``param_groups``, ``state``, ``defaults``,
``zero_grad``, the state dict and the hooks are the wrapped optimizer's own, so a
wrapper holds no state of its own, its checkpoints are the wrapped optimizer's, and
:class:`layerwise.engine.LayerwiseOptimizer` and any torch ``LRScheduler`` can wrap it (the
rates they set in ``param_groups`` are the ones the wrapped step reads). A wrapper is a
``torch.optim.Optimizer`` by type only, as the engine is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Delegate everything but ``step`` to ``optimizer`` (see the module docstring).

    >>> net = torch.nn.Linear(2, 1)
    >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> OptimizerWrapper(sgd).param_groups is sgd.param_groups
    True
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {optimizer!r} "
                f"({type(optimizer).__name__})"
            )
        self.base = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        self.base.load_state_dict(state_dict)  # type: ignore[arg-type]

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.base.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        return self.base.register_step_post_hook(hook)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"
