"""A small Transformer encoder on a generated sequence task: count the query token.

Data: sequences of ``length`` tokens over a vocabulary of ``vocab`` symbols, generated
deterministically from ``data_seed``. The first token is the *query*; the label is the
number of times it occurs again in the other ``length - 1`` positions, uniform over
``0 .. classes - 1`` (the positions are drawn at random, every other position holds one
of the other symbols, drawn uniformly). Solving it needs attention: each position must be
compared with the first one; bag-of-tokens statistics alone do not determine the label.
Training shows the phase transition typical of such tasks (chance level for a few hundred
steps, then a fast rise), which makes it sensitive to the learning rate.
4,000 / 1,000 / 1,000 examples for train / validation / test.

Model (:class:`TinyTransformer`): token embedding + learned positional embedding,
``layers`` pre-LayerNorm encoder blocks (multi-head self-attention and a ReLU MLP, each
in a residual branch), a final LayerNorm, mean pooling over positions and a linear head.
The attention is written out (``softmax(Q K^T / sqrt(d_head)) V``) rather than taken from
``nn.TransformerEncoder``: torch's fused CPU attention kernel has neither a double
backward nor forward-mode AD, so Hessian-vector products (the curvature estimates)
would fail on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from layerwise.experiments.tasks.base import Budget, Recipe, Splits, Task
from layerwise.experiments.tasks.cache import cached_arrays

__all__ = ["TinyTransformer", "generate_query_count", "sequence_count"]


def generate_query_count(
    n: int, length: int, vocab: int, classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences (int64, ``(n, length)``) and their labels (int64, ``(n,)``): how often
    the first token occurs again.

    >>> x, y = generate_query_count(6, 10, 4, 3, seed=0)
    >>> bool(all((row[1:] == row[0]).sum() == label for row, label in zip(x, y)))
    True
    """
    if vocab < 2 or classes < 2 or length <= classes - 1:
        raise ValueError(
            f"need vocab >= 2, classes >= 2 and length > classes - 1, got vocab={vocab}, "
            f"classes={classes}, length={length}"
        )
    rng = np.random.default_rng(seed)
    xs = np.empty((n, length), dtype=np.int64)
    ys = rng.integers(0, classes, size=n).astype(np.int64)
    for i, count in enumerate(ys):
        query = rng.integers(vocab)
        others = np.array([t for t in range(vocab) if t != query])
        row = rng.choice(others, size=length - 1)
        row[rng.choice(length - 1, size=count, replace=False)] = query
        xs[i, 0], xs[i, 1:] = query, row
    return xs, ys


class SelfAttention(nn.Module):
    """Multi-head self-attention, ``softmax(Q K^T / sqrt(d_head)) V`` then an output map."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: ``h + attn(ln1(h))`` then ``h + mlp(ln2(h))``."""

    def __init__(self, d_model: int, heads: int, d_ff: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TinyTransformer(nn.Module):
    """Embeddings, ``layers`` encoder blocks, LayerNorm, mean pooling, linear head."""

    def __init__(
        self,
        vocab: int,
        length: int,
        classes: int,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 2,
        d_ff: int = 64,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class _Model:
    def __init__(self, vocab: int, length: int, classes: int):
        self.vocab, self.length, self.classes = vocab, length, classes

    def __call__(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return TinyTransformer(self.vocab, self.length, self.classes)


class _Loader:
    def __init__(
        self, vocab: int, length: int, classes: int, sizes: tuple[int, int, int], data_seed: int
    ):
        self.spec = {
            "vocab": vocab,
            "length": length,
            "classes": classes,
            "sizes": list(sizes),
            "seed": data_seed,
        }

    def __call__(self, cache_dir: Path | None) -> Splits:
        spec = self.spec

        def compute() -> dict[str, np.ndarray]:
            x, y = generate_query_count(
                sum(spec["sizes"]), spec["length"], spec["vocab"], spec["classes"], spec["seed"]
            )
            return {"x": x, "y": y}

        arrays = cached_arrays("query-count", spec, compute, cache_dir)
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
        a, b, _ = spec["sizes"]
        return Splits(
            train=(x[:a], y[:a]), val=(x[a : a + b], y[a : a + b]), test=(x[a + b :], y[a + b :])
        )


def sequence_count(
    vocab: int = 8,
    length: int = 16,
    classes: int = 5,
    train: int = 4000,
    val: int = 1000,
    test: int = 1000,
    data_seed: int = 0,
) -> Task:
    """Query-token counting with a 2-layer Transformer encoder (d_model 32, 4 heads)."""
    for name, value in (
        ("vocab", vocab),
        ("length", length),
        ("classes", classes),
        ("train", train),
        ("val", val),
        ("test", test),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return Task(
        name="sequence_count",
        description=(
            f"count the first token's repeats in {length} tokens over {vocab} "
            "symbols; Transformer encoder (2 pre-LN blocks, d_model 32, 4 heads)"
        ),
        build_model=_Model(vocab, length, classes),
        load_data=_Loader(vocab, length, classes, (train, val, test), data_seed),
        budget=Budget(steps=1200, batch_size=64, eval_every=100, target=0.9),
        recipe=Recipe("adam", (1e-3, 2e-3, 4e-3)),
        head=(r"^head\.",),
        options={
            "vocab": vocab,
            "length": length,
            "classes": classes,
            "train": train,
            "val": val,
            "test": test,
            "data_seed": data_seed,
        },
    )
