"""Test cases as data: tiny float64 models, a batch and a criterion for each.

``loss_fn(model, batch) = criterion(model(inputs), targets)``, the mean over the batch.
The brute-force references in :mod:`tests.sensitivity.reference` call ``model.forward``
through ``torch.func.functional_call`` themselves, independently of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

DTYPE = torch.float64


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum(-1).mean()


@dataclass(frozen=True)
class Case:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    per_example: bool = True  # examples do not interact (no BatchNorm in training mode)

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.inputs, self.targets)

    def loss_fn(self, model: nn.Module, batch) -> torch.Tensor:
        return self.criterion(model(batch[0]), batch[1])


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.block = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.block(torch.tanh(self.norm(h)))
        return self.head(h)


class Attention(nn.Module):
    def __init__(self, need_weights: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 1)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        a = self.attn(h, h, h, need_weights=self.need_weights)[0]
        return self.head(a.mean(1))


def mlp() -> Case:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x = torch.randn(10, 4, dtype=DTYPE)
    return Case("mlp", model, x, torch.randint(0, 3, (10,)), cross_entropy)


def cnn() -> Case:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).to(
        DTYPE
    )
    x = torch.randn(6, 1, 6, 6, dtype=DTYPE)
    return Case("cnn", model, x, torch.randint(0, 2, (6,)), cross_entropy)


def residual() -> Case:
    torch.manual_seed(3)
    model = Residual().to(DTYPE)
    x = torch.randn(8, 4, dtype=DTYPE)
    return Case("layernorm_residual", model, x, torch.randn(8, 2, dtype=DTYPE), squared_error)


def attention() -> Case:
    torch.manual_seed(4)
    model = Attention().to(DTYPE)
    x = torch.randn(5, 3, 3, dtype=DTYPE)
    return Case("attention", model, x, torch.randn(5, 1, dtype=DTYPE), squared_error)


def batchnorm_train() -> Case:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    model.train()
    x = torch.randn(12, 3, dtype=DTYPE)
    return Case("batchnorm_train", model, x, torch.randint(0, 2, (12,)), cross_entropy, False)


CASES = [mlp, cnn, residual, attention, batchnorm_train]
CASE_IDS = [c.__name__ for c in CASES]
