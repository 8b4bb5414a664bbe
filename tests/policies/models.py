"""Small models used as test cases, as data: one :class:`ModelCase` per architecture.

Self-contained (torch only) so any test may import it. Each case builds a fresh model,
makes a deterministic batch ``(inputs, targets)`` and a mean loss ``loss(model, batch)``.

* ``mlp``: ``nn.Sequential`` of Linear / ReLU (numbered leaves, no blocks);
* ``cnn``: a Sequential stem (Conv2d + BatchNorm2d), two residual blocks with BatchNorm
  (the second downsamples through a 1x1 projection), pooling and a Linear head;
* ``transformer``: token embedding + learned positions, ``nn.TransformerEncoder`` (two
  layers, final LayerNorm) and a Linear classification head;
* ``tied``: a tiny language model whose output layer shares the input embedding matrix
  (``lm_head.weight is embed.weight``, GPT-style, no output bias);
* ``frozen``: a Linear/BatchNorm backbone with ``requires_grad=False`` and a trainable head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CASES",
    "FrozenBackbone",
    "ModelCase",
    "ResidualBlock",
    "SmallCNN",
    "TiedLM",
    "TinyTransformer",
    "mlp",
]

VOCAB, SEQ, CLASSES = 11, 6, 3


def mlp(width: int = 16) -> nn.Sequential:
    """``0`` Linear(4, w), ``2`` Linear(w, w), ``4`` Linear(w, 3); ReLUs between."""
    return nn.Sequential(
        nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallCNN(nn.Module):
    """``stem`` (Sequential conv+bn), ``blocks.0``, ``blocks.1`` (residual), ``fc`` head."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.blocks = nn.Sequential(
            ResidualBlock(channels, channels), ResidualBlock(channels, 2 * channels, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * channels, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


class TinyTransformer(nn.Module):
    """``embed``, ``pos``, ``encoder.layers.{0,1}``, ``encoder.norm``, ``head``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(SEQ, dim))
        layer = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=2, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(dim=1))


class TiedLM(nn.Module):
    """``embed``, ``blocks.{0,1}`` (MLP blocks), ``norm``, ``lm_head`` tied to ``embed``."""

    def __init__(self, dim: int = 8, head_bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=head_bias)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(self.norm(x))


class FrozenBackbone(nn.Module):
    """``backbone`` (Linear, BatchNorm1d, Linear; frozen) and ``head`` (trainable)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 3)
        self.backbone.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _vectors(g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(32, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _images(g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(16, 1, 8, 8, generator=g)
    return x, torch.randint(0, CLASSES, (16,), generator=g)


def _tokens(g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, VOCAB, (16, SEQ), generator=g)
    return x, x[:, 0] % CLASSES


def _next_tokens(g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, VOCAB, (8, SEQ + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of ``model(inputs)`` against integer targets."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass(frozen=True)
class ModelCase:
    """A test case: ``build()`` a fresh model, ``batch(generator)``, ``loss(model, batch)``."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor] = classification_loss

    def __repr__(self) -> str:
        return self.name


CASES = (
    ModelCase("mlp", mlp, _vectors),
    ModelCase("cnn", SmallCNN, _images),
    ModelCase("transformer", TinyTransformer, _tokens),
    ModelCase("tied", TiedLM, _next_tokens),
    ModelCase("frozen", FrozenBackbone, _vectors),
)
