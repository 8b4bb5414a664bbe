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
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from layerwise.experiments.tasks.base import Budget, Recipe, Splits, Task, holdout
from layerwise.experiments.tasks.cache import cached_arrays

__all__ = ["CNN", "MLP", "default_args", "load_arrays", "mnist1d_cnn", "mnist1d_mlp"]


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


def _splits(val_fraction: float, split_seed: int, cache_dir: Path | None) -> Splits:
    arrays = load_arrays(cache_dir=cache_dir)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    train, val = holdout(x, y, val_fraction, split_seed)
    test = (torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    return Splits(train=train, val=val, test=test)


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


def _seeded(cls, seed: int, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return cls(**kwargs)


def _mlp_model(seed: int) -> nn.Module:
    return _seeded(MLP, seed)


def _cnn_model(seed: int) -> nn.Module:
    return _seeded(CNN, seed)


class _Loader:
    """Picklable data loader bound to the holdout settings."""

    def __init__(self, val_fraction: float, split_seed: int):
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)

    def __call__(self, cache_dir: Path | None) -> Splits:
        return _splits(self.val_fraction, self.split_seed, cache_dir)


def mnist1d_mlp(val_fraction: float = 0.2, split_seed: int = 0) -> Task:
    """MNIST-1D with the paper's MLP; Adam, 2,000 steps of 100 examples by default."""
    return Task(
        name="mnist1d_mlp",
        description="MNIST-1D (4000 train / 1000 test), MLP 40-100-100-10 (Greydanus 2020)",
        build_model=_mlp_model,
        load_data=_Loader(val_fraction, split_seed),
        budget=Budget(steps=2000, batch_size=100, eval_every=100, target=0.55),
        recipe=Recipe("adam", (1e-3, 3e-3, 1e-2)),
        head=(r"^linear3\.",),
        options={"val_fraction": val_fraction, "split_seed": split_seed},
    )


def mnist1d_cnn(val_fraction: float = 0.2, split_seed: int = 0) -> Task:
    """MNIST-1D with the paper's CNN; Adam, 2,000 steps of 100 examples by default."""
    return Task(
        name="mnist1d_cnn",
        description=(
            "MNIST-1D (4000 train / 1000 test), CNN 3x Conv1d(25) + linear (Greydanus 2020)"
        ),
        build_model=_cnn_model,
        load_data=_Loader(val_fraction, split_seed),
        budget=Budget(steps=2000, batch_size=100, eval_every=100, target=0.8),
        recipe=Recipe("adam", (1e-3, 3e-3, 1e-2)),
        head=(r"^linear\.",),
        options={"val_fraction": val_fraction, "split_seed": split_seed},
    )
