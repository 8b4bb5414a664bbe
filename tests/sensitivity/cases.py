"""Test cases as data: tiny float64 models, a batch and a criterion for each.

``loss_fn(model, batch) = criterion(model(inputs), targets)``, the mean over the batch.
The brute-force references in :mod:`tests.sensitivity.reference` call ``model.forward``
through ``torch.func.functional_call`` themselves, independently of the package.

A case with a ``loss_object`` (a :class:`layerwise.sensitivity.CrossEntropy` or
:class:`layerwise.sensitivity.MeanSquaredError` that computes the same loss as its
``criterion``) can be asked for ``ggn_trace``; :data:`GGN_CASES` lists them. The references
use the criterion, never the loss object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.sensitivity import CrossEntropy, MeanSquaredError

DTYPE = torch.float64


def _model_outputs(model, batch):
    return model(batch[0])


def _targets(batch):
    return batch[1]


CE = CrossEntropy(_model_outputs, _targets)
MSE = MeanSquaredError(_model_outputs, _targets)


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
    loss_object: Any = None  # the same loss as a loss object, for ggn_trace

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
    return Case("mlp", model, x, torch.randint(0, 3, (10,)), cross_entropy, loss_object=CE)


def cnn() -> Case:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).to(
        DTYPE
    )
    x = torch.randn(6, 1, 6, 6, dtype=DTYPE)
    return Case("cnn", model, x, torch.randint(0, 2, (6,)), cross_entropy, loss_object=CE)


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
    y = torch.randint(0, 2, (12,))
    return Case("batchnorm_train", model, x, y, cross_entropy, False, loss_object=CE)


CASES = [mlp, cnn, residual, attention, batchnorm_train]
CASE_IDS = [c.__name__ for c in CASES]


class SDPAttention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (the fused CPU kernel by
    default, which has first derivatives only: enough for the GGN)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        q, k, v = self.qkv(h).reshape(*h.shape[:2], 3, 2, 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)
        return self.head(a.mean(1))


class TiedLM(nn.Module):
    """A causal one-layer language model whose output layer is its embedding (tied)."""

    def __init__(self, vocab: int = 5, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return self.norm(h) @ self.embed.weight.T  # [N, T, V]


IGNORE = -1
SMOOTHING = 0.1


def sequence_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the non-ignored tokens of the smoothed cross-entropy, classes last."""
    return F.cross_entropy(
        out.flatten(0, 1), y.flatten(), ignore_index=IGNORE, label_smoothing=SMOOTHING
    )


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def sdpa_attention() -> Case:
    torch.manual_seed(6)
    model = SDPAttention().to(DTYPE)
    x = torch.randn(5, 3, 3, dtype=DTYPE)
    return Case("sdpa_attention", model, x, torch.randn(5, 2, dtype=DTYPE), mse, loss_object=MSE)


def tied_lm() -> Case:
    torch.manual_seed(7)
    model = TiedLM().to(DTYPE)
    tokens = torch.randint(0, 5, (4, 6))
    targets = torch.randint(0, 5, (4, 6))
    targets[0, :2] = IGNORE  # padding, and a whole ignored example
    targets[2] = IGNORE
    loss = CrossEntropy(_model_outputs, _targets, ignore_index=IGNORE, label_smoothing=SMOOTHING)
    return Case("tied_lm", model, tokens, targets, sequence_cross_entropy, loss_object=loss)


GGN_CASES = [mlp, cnn, sdpa_attention, batchnorm_train, tied_lm]
GGN_CASE_IDS = [c.__name__ for c in GGN_CASES]
