"""Small float64 models with exact answers, for the accuracy rows of the sensitivity
benchmark: per-group Hessian block traces from the dense Hessian (``torch.func.hessian``
of the flattened parameters) and per-group gradient variance from a loop of per-example
``autograd.grad`` calls. Both are sequential models of layers every peer supports
(``Linear``, ``Conv2d``, ``Tanh``, ``ReLU``, ``MaxPool2d``, ``Flatten``), trained by
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F

__all__ = ["SMALL", "exact_traces", "exact_variances", "small_batch"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _mlp() -> tuple[nn.Module, Callable[[int, torch.Generator], torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    return model, lambda b, g: torch.randn(b, 16, generator=g)


def _cnn() -> tuple[nn.Module, Callable[[int, torch.Generator], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 10),
    )  # fmt: skip
    return model, lambda b, g: torch.randn(b, 1, 8, 8, generator=g)


SMALL = {"mlp-small": _mlp, "cnn-small": _cnn}


def small_batch(name: str, size: int, seed: int = 0) -> tuple[nn.Module, Batch]:
    """The model ``name`` (float64, seeded) and a batch of ``size`` examples."""
    torch.manual_seed(seed)
    model, inputs = SMALL[name]()
    gen = torch.Generator().manual_seed(seed + 1)
    x = inputs(size, gen).double()
    return model.double(), (x, torch.randint(0, 10, (size,), generator=gen))


def _flat(model: nn.Module) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    return names, params, torch.cat([p.reshape(-1) for p in params])


def exact_traces(model: nn.Module, batch: Batch, groups: dict[str, list[str]]) -> dict[str, float]:
    """tr(H_gg) per group from the dense Hessian of the mean cross-entropy."""
    names, params, flat = _flat(model)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        values, start = {}, 0
        for n, p in zip(names, params, strict=True):
            values[n] = theta[start : start + p.numel()].view_as(p)
            start += p.numel()
        return F.cross_entropy(functional_call(model, values, (batch[0],)), batch[1])

    diag = hessian(loss)(flat).diagonal()
    return _sum_groups(names, params, diag, groups)


def exact_variances(
    model: nn.Module, batch: Batch, groups: dict[str, list[str]]
) -> dict[str, float]:
    """Unbiased tr(Σ̂_g) per group from per-example gradients, one example at a time."""
    names, params, _ = _flat(model)
    live = list(model.parameters())
    rows = []
    for i in range(batch[0].shape[0]):
        loss = F.cross_entropy(model(batch[0][i : i + 1]), batch[1][i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, live)]))
    grads = torch.stack(rows)
    per_entry = grads.var(0, correction=1)
    return _sum_groups(names, params, per_entry, groups)


def _sum_groups(names, params, per_entry, groups) -> dict[str, float]:
    where, start = {}, 0
    for n, p in zip(names, params, strict=True):
        where[n] = slice(start, start + p.numel())
        start += p.numel()
    return {g: float(sum(per_entry[where[n]].sum() for n in ns)) for g, ns in groups.items()}
