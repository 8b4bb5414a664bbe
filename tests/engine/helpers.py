"""Small models, data and optimizer/scheduler constructors shared by the engine tests.

Test cases are data: :data:`OPTIMIZERS` and :data:`SCHEDULERS` map readable ids to small
constructors, expanded by ``pytest.mark.parametrize``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(seed: int = 0, dropout: float = 0.1, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 3-layer MLP (with dropout, so the global RNG matters) on 6 features, 3 classes."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Dropout(dropout), nn.Linear(10, 8), nn.Tanh(),
        nn.Linear(8, 3),
    )  # fmt: skip
    return net.to(dtype)


def named_groups(net: nn.Module, *, tensor_lr: bool = False, **hyper: object) -> list[dict]:
    """One optimizer group per Linear layer, named fc0, fc1, fc2; with ``tensor_lr`` each
    group's rate is a 0-d tensor (0.01, ``foreach`` off, as torch requires)."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    groups = [
        {"params": list(m.parameters()), "name": f"fc{i}", **hyper} for i, m in enumerate(linears)
    ]
    if tensor_lr:
        for g in groups:
            g["lr"], g["foreach"] = torch.tensor(0.01), False
    return groups


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(steps: int, size: int = 12, seed: int = 1, dtype=torch.float32) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
        for _ in range(steps)
    ]


OPTIMIZERS = {
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05),
}


def _sequential(opt):
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])


SCHEDULERS = {
    "none": lambda opt: None,
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
    "linear_sequential": _sequential,
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def scheduler_step(sched, loss: torch.Tensor) -> None:
    """``sched.step()``, or ``sched.step(metric)`` for ReduceLROnPlateau (``None``: nothing)."""
    if sched is None:
        return
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(float(loss))
    else:
        sched.step()


def params_of(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()
