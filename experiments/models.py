"""Small bundled models the command line can use by name (``layerwise groups --model cnn``),
and :func:`resolve_model` / :func:`call_factory`, which build what a command names by import path.

Each factory takes keyword arguments with defaults and returns a fresh ``nn.Module``;
``layerwise.experiments.models:mlp`` and friends are also valid ``package.module:factory`` paths.

* :func:`mlp`: ``Sequential`` of Linear / BatchNorm1d / ReLU for 8x8 digit images (64 -> 10);
* :func:`cnn`: a small ResNet: a conv + BatchNorm stem, residual stages, a Linear head;
* :func:`transformer`: token + position embeddings, ``nn.TransformerEncoder`` and a Linear
  classification head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerwise.experiments.errors import CLIError, UsageError, first_line
from layerwise.experiments.importing import import_object

__all__ = ["DEFAULT_MODEL", "MODELS", "call_factory", "cnn", "mlp", "resolve_model", "transformer"]


def mlp(in_features: int = 64, hidden: int = 64, depth: int = 2, classes: int = 10) -> nn.Module:
    """``depth`` hidden Linear + BatchNorm1d + ReLU layers, then a Linear head.

    >>> mlp()(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity or 1x1-projected shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """``stem``, ``blocks.0`` .. ``blocks.{n-1}`` (width doubling every other block), ``fc``."""

    def __init__(self, in_channels: int = 1, width: int = 8, blocks: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        )
        stages, cin = [], width
        for i in range(blocks):
            cout = width * 2 ** (i // 2)
            stages.append(BasicBlock(cin, cout, stride=2 if i and i % 2 == 0 else 1))
            cin = cout
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def cnn(in_channels: int = 1, width: int = 8, blocks: int = 4, classes: int = 10) -> nn.Module:
    """A small ResNet for 1x8x8 to 1x28x28 images.

    >>> cnn()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    return SmallResNet(in_channels, width, blocks, classes)


class TinyTransformer(nn.Module):
    """``embed``, ``pos``, ``encoder.layers.{i}``, ``encoder.norm``, ``head``."""

    def __init__(self, vocab: int, length: int, dim: int, layers: int, heads: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.encoder(x).mean(dim=1))


def transformer(
    vocab: int = 32, length: int = 16, dim: int = 32, layers: int = 4, heads: int = 4, classes=2
) -> nn.Module:
    """A pre-norm Transformer encoder classifying token sequences of up to ``length``.

    >>> transformer()(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 2])
    """
    return TinyTransformer(vocab, length, dim, layers, heads, classes)


#: Bundled factories by name.
MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
DEFAULT_MODEL = "cnn"


def call_factory(spec: str, *, what: str, accept: type | None = None) -> Any:
    """Import ``package.module:name`` and call it with no arguments; an ``accept`` instance
    found at the path is returned as it is.

    Bad paths and objects are :class:`~layerwise.experiments.errors.UsageError` (exit 2), the
    factory's own failure a :class:`~layerwise.experiments.errors.CLIError` (exit 1), each one
    line naming ``what`` (the option, e.g. ``"--data"``) and ``spec``.

    >>> call_factory("collections:OrderedDict", what="--data")
    OrderedDict()
    """
    if not isinstance(what, str) or not what:
        raise ValueError(f"what must be a non-empty str, got {what!r}")
    obj = import_object(spec, what=what)
    if accept is not None and isinstance(obj, accept):
        return obj
    if not callable(obj):
        also = f" or a {accept.__name__}" if accept is not None else ""
        raise UsageError(f"{what} {spec!r} is a {type(obj).__name__}, not a factory{also}")
    try:
        inspect.signature(obj).bind()
    except TypeError as exc:
        raise UsageError(f"{what} {spec!r} cannot be called without arguments ({exc})") from exc
    except ValueError:  # no signature to inspect (some builtins): just call it
        pass
    try:
        return obj()
    except Exception as exc:  # the user's code failed: one line, chain kept for --debug
        raise CLIError(f"{what} {spec!r} raised {first_line(exc)}") from exc


def resolve_model(spec: str, *, what: str = "model") -> nn.Module:
    """Build the model named ``spec``: a bundled name or ``package.module:name`` (a factory
    called with no arguments, or an ``nn.Module`` used as it is); errors name ``what``.

    >>> type(resolve_model("cnn")).__name__
    'SmallResNet'
    >>> type(resolve_model("layerwise.experiments.models:mlp")).__name__
    'Sequential'
    """
    if not isinstance(spec, str) or not spec:
        raise UsageError(f"{what} must be a bundled name or 'package.module:name', got {spec!r}")
    if spec in MODELS:
        return MODELS[spec]()
    if ":" not in spec:
        raise UsageError(
            f"unknown {what} {spec!r}: bundled models are {', '.join(MODELS)}; "
            "or give 'package.module:name' of a factory"
        )
    model = call_factory(spec, what=what, accept=nn.Module)
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{what} {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model
