"""MNIST-1D (Greydanus, 2020): the data set and the two models of its paper.

Data: ``mnist1d.data.make_dataset`` with the package's default arguments (5,000 signals
of length 40, 10 classes, ``train_split=0.8``: 4,000 training and 1,000 test examples,
``seed=42``). A validation split (20% by default) is held out of the 4,000 training
examples by a fixed permutation, so the test split is the paper's. Generation takes a
few seconds; it runs once per process and is cached on disk when a folder is given.

Models, as in ``notebooks/models.py`` of https://github.com/greydanus/mnist1d:

* :class:`MLP` (``MLPBase``): 40 -> 100 -> 100 -> 10 with ReLU, the middle layer residual
  (``h = h + relu(linear2(h))``).
* :class:`CNN` (``ConvBase``): three ``Conv1d`` layers with 25 channels, stride 2, padding
  1, kernels 5, 3, 3 (lengths 40 -> 19 -> 10 -> 5), ReLU, then a linear head on the
  flattened 125 features.

Regimes (options of every factory here, see :mod:`layerwise.experiments.tasks.regimes`):
``generator`` overrides arguments of ``make_dataset`` (``num_samples``,
``iid_noise_scale``...; the test split is then the generator's own), ``train_size`` keeps
that many training examples (a random subset drawn with ``split_seed``), and
``label_noise`` flips exactly that fraction of the training labels (seeded by
``noise_seed``) to another class. The validation split is held out first and keeps its
clean labels, as the test split does, so every regime is scored on the same examples.

The positive control, :func:`mnist1d_scaled`: a deeper plain MLP (:class:`ScaledMLP`, no
normalisation, no residual) with one layer (by default the head, ``scale = 100``) stored
at ``1/scale`` of its weights (:class:`ScaledLinear`, ``W = scale * V``), trained with SGD
and momentum. The network
computes the same functions as without the scale, but the gradient of ``V`` is ``scale``
times that of ``W`` and an SGD step on ``V`` moves ``W`` by ``scale**2`` times the step
on ``W``: one layer's effective rate is ``scale**2`` times the others'. A uniform rate is
held down by that layer's stability (for the head, the loss diverges above it), and the
others crawl. The trust ratio
``||V|| / ||grad V|| = (||W|| / ||grad W||) / scale**2`` (LARS, You et al. 2017) undoes the
reparametrisation exactly, so a layer-wise rate has a known, large gain to find here.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from layerwise.experiments.tasks.base import Budget, Recipe, Splits, Task, holdout
from layerwise.experiments.tasks.cache import cached_arrays
from layerwise.experiments.tasks.regimes import check_regime, flip_labels, subsample

__all__ = [
    "CNN",
    "MLP",
    "ScaledLinear",
    "ScaledMLP",
    "default_args",
    "load_arrays",
    "mnist1d_cnn",
    "mnist1d_mlp",
    "mnist1d_scaled",
]


def default_args() -> dict[str, Any]:
    """The ``mnist1d`` package's default generator arguments (without the download URL)."""
    from mnist1d.data import get_dataset_args

    args = dict(get_dataset_args(as_dict=True))
    args.pop("url", None)
    return args


def _generate(args: dict[str, Any]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global numpy and random generators: put them back.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def load_arrays(args: dict[str, Any] | None = None, cache_dir: Path | None = None):
    """``{"x", "y", "x_test", "y_test"}`` numpy arrays of MNIST-1D for generator ``args``
    (defaults: :func:`default_args`), cached in-process and under ``cache_dir``."""
    full = default_args()
    if args:
        unknown = set(args) - set(full)
        if unknown:
            raise ValueError(f"args: unknown MNIST-1D argument(s) {sorted(unknown)}")
        full.update(args)
    return cached_arrays("mnist1d", full, lambda: _generate(full), cache_dir)


def _splits(
    val_fraction: float,
    split_seed: int,
    cache_dir: Path | None,
    regime: dict[str, Any] | None = None,
) -> Splits:
    """Validation held out of the generator's training split, then the ``regime`` (keys
    ``generator``, ``train_size``, ``label_noise``, ``noise_seed``) applied to the rest."""
    regime = regime or {}
    arrays = load_arrays(regime.get("generator") or None, cache_dir=cache_dir)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    (x_train, y_train), val = holdout(x, y, val_fraction, split_seed)
    if regime.get("train_size") is not None:
        x_train, y_train = subsample(x_train, y_train, regime["train_size"], split_seed)
    if regime.get("label_noise", 0.0) > 0:
        classes = int(max(y.max(), torch.from_numpy(arrays["y_test"]).max())) + 1
        y_train = flip_labels(y_train, regime["label_noise"], classes, regime["noise_seed"])
    test = (torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    return Splits(train=(x_train, y_train), val=val, test=test)


class MLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 -> 100 -> 100 (residual) -> 10, ReLU."""

    def __init__(self, input_size: int = 40, output_size: int = 10, hidden_size: int = 100):
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.linear3 = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


class CNN(nn.Module):
    """The MNIST-1D paper's CNN: 3 x Conv1d(25 channels, stride 2, padding 1), linear head."""

    def __init__(self, output_size: int = 10, channels: int = 25, linear_in: int = 125):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(linear_in, output_size)

    def features(self, x: Tensor) -> Tensor:
        """The flattened trunk features (125 per signal of length 40)."""
        h = x.reshape(-1, 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


class ScaledLinear(nn.Module):
    """A linear layer stored at ``1/scale`` of its weights: ``y = x (scale V)^T + scale c``.

    ``V`` and ``c`` are drawn as ``nn.Linear`` draws ``W`` and ``b``, then divided by
    ``scale``, so at initialisation the layer computes what ``nn.Linear`` would. The
    gradient of ``V`` is ``scale`` times the gradient of ``W = scale V``.
    """

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__()
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        plain = nn.Linear(in_features, out_features)
        self.weight = nn.Parameter(plain.weight.detach() / self.scale)
        self.bias = nn.Parameter(plain.bias.detach() / self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.scale * self.weight, self.scale * self.bias)

    def extra_repr(self) -> str:
        rows, cols = self.weight.shape
        return f"in_features={cols}, out_features={rows}, scale={self.scale:g}"


class ScaledMLP(nn.Module):
    """40 -> ``hidden`` x ``depth`` -> 10, ReLU, no normalisation, no residual; layer
    ``scaled_layer`` (0-based: ``layers[i]``, or the head for ``depth``) is a
    :class:`ScaledLinear` with ``scale``."""

    def __init__(
        self,
        scale: float = 100.0,
        depth: int = 3,
        hidden: int = 100,
        scaled_layer: int = 3,
        input_size: int = 40,
        output_size: int = 10,
    ):
        super().__init__()
        if isinstance(scaled_layer, bool) or not (
            isinstance(scaled_layer, int) and 0 <= scaled_layer <= depth
        ):
            raise ValueError(
                f"scaled_layer must be an integer in [0, {depth}] ({depth}: the head), "
                f"got {scaled_layer!r}"
            )
        sizes = [input_size] + [hidden] * depth + [output_size]

        def layer(i: int) -> nn.Module:
            a, b = sizes[i], sizes[i + 1]
            return ScaledLinear(a, b, scale) if i == scaled_layer else nn.Linear(a, b)

        self.layers = nn.ModuleList(layer(i) for i in range(depth))
        self.head = layer(depth)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x).relu()
        return self.head(x)


def _seeded(cls, seed: int, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return cls(**kwargs)


def _mlp_model(seed: int) -> nn.Module:
    return _seeded(MLP, seed)


def _cnn_model(seed: int) -> nn.Module:
    return _seeded(CNN, seed)


class _ScaledModel:
    """Picklable factory of :class:`ScaledMLP` models with fixed settings."""

    def __init__(self, **kwargs: Any):
        ScaledMLP(**kwargs)  # validate now, not in every run
        self.kwargs = kwargs

    def __call__(self, seed: int) -> nn.Module:
        return _seeded(ScaledMLP, seed, **self.kwargs)


class _Loader:
    """Picklable data loader bound to the holdout settings and the regime."""

    def __init__(self, val_fraction: float, split_seed: int, regime: dict[str, Any]):
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)
        self.regime = regime

    def __call__(self, cache_dir: Path | None) -> Splits:
        return _splits(self.val_fraction, self.split_seed, cache_dir, self.regime)


def _regime(
    val_fraction: float,
    split_seed: int,
    train_size: int | None,
    label_noise: float,
    noise_seed: int,
    generator: dict[str, Any] | None,
) -> dict[str, Any]:
    """The task options (validated): holdout settings and regime."""
    check_regime(train_size, label_noise, noise_seed)
    generator = dict(generator or {})
    unknown = set(generator) - set(default_args())
    if unknown:
        raise ValueError(
            f"generator: unknown MNIST-1D argument(s) {sorted(unknown)}; "
            f"known: {sorted(default_args())}"
        )
    return {
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "train_size": train_size,
        "label_noise": float(label_noise),
        "noise_seed": noise_seed,
        "generator": generator,
    }


def _loader(options: dict[str, Any]) -> _Loader:
    regime = {k: options[k] for k in ("train_size", "label_noise", "noise_seed", "generator")}
    return _Loader(options["val_fraction"], options["split_seed"], regime)


def mnist1d_mlp(
    val_fraction: float = 0.2,
    split_seed: int = 0,
    train_size: int | None = None,
    label_noise: float = 0.0,
    noise_seed: int = 0,
    generator: dict[str, Any] | None = None,
) -> Task:
    """MNIST-1D with the paper's MLP; Adam, 2,000 steps of 100 examples by default."""
    options = _regime(val_fraction, split_seed, train_size, label_noise, noise_seed, generator)
    return Task(
        name="mnist1d_mlp",
        description="MNIST-1D (4000 train / 1000 test), MLP 40-100-100-10 (Greydanus 2020)",
        build_model=_mlp_model,
        load_data=_loader(options),
        budget=Budget(steps=2000, batch_size=100, eval_every=100, target=0.55),
        recipe=Recipe("adam", (1e-3, 3e-3, 1e-2)),
        head=(r"^linear3\.",),
        options=options,
    )


def mnist1d_cnn(
    val_fraction: float = 0.2,
    split_seed: int = 0,
    train_size: int | None = None,
    label_noise: float = 0.0,
    noise_seed: int = 0,
    generator: dict[str, Any] | None = None,
) -> Task:
    """MNIST-1D with the paper's CNN; Adam, 2,000 steps of 100 examples by default."""
    options = _regime(val_fraction, split_seed, train_size, label_noise, noise_seed, generator)
    return Task(
        name="mnist1d_cnn",
        description=(
            "MNIST-1D (4000 train / 1000 test), CNN 3x Conv1d(25) + linear (Greydanus 2020)"
        ),
        build_model=_cnn_model,
        load_data=_loader(options),
        budget=Budget(steps=2000, batch_size=100, eval_every=100, target=0.8),
        recipe=Recipe("adam", (1e-3, 3e-3, 1e-2)),
        head=(r"^linear\.",),
        options=options,
    )


def mnist1d_scaled(
    scale: float = 100.0,
    depth: int = 3,
    hidden: int = 100,
    scaled_layer: int | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    train_size: int | None = None,
    label_noise: float = 0.0,
    noise_seed: int = 0,
    generator: dict[str, Any] | None = None,
) -> Task:
    """MNIST-1D with :class:`ScaledMLP`, the positive control (module docstring): by
    default the head (``scaled_layer=None``) is stored at 1/100 of its weights; SGD with
    momentum 0.9, 400 steps of 100 examples, rates tuned over 1e-4 .. 0.3."""
    options = _regime(val_fraction, split_seed, train_size, label_noise, noise_seed, generator)
    if scaled_layer is None:
        scaled_layer = depth
    model = {"scale": scale, "depth": depth, "hidden": hidden, "scaled_layer": scaled_layer}
    return Task(
        name="mnist1d_scaled",
        description=(
            f"MNIST-1D, MLP 40-{hidden}x{depth}-10 without normalisation, "
            f"{'the head' if scaled_layer == depth else f'hidden layer {scaled_layer}'} stored "
            f"at 1/{scale:g} of its weights (effective rate x{scale**2:g})"
        ),
        build_model=_ScaledModel(**model),
        load_data=_loader(options),
        budget=Budget(steps=400, batch_size=100, eval_every=50, target=0.5),
        recipe=Recipe("sgd", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), momentum=0.9),
        head=(r"^head\.",),
        options={**model, **options},
    )
