"""scikit-learn's handwritten digits (UCI, 1,797 images of 8 x 8 pixels, 10 classes).

The data ship with scikit-learn (``sklearn.datasets.load_digits``), so nothing is
downloaded. Pixel values 0..16 are scaled to [0, 1]. A fixed permutation (``split_seed``)
holds out 20% as the test split and then 20% of the rest as the validation split
(1,150 / 288 / 359 examples). Models: an MLP 64-128-64-10 and a small CNN with BatchNorm
(two 3x3 conv blocks, 16 and 32 channels, max-pooling, linear head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from layerwise.experiments.tasks.base import Budget, Recipe, Splits, Task, holdout
from layerwise.experiments.tasks.cache import cached_arrays

__all__ = ["DigitsCNN", "DigitsMLP", "digits_cnn", "digits_mlp"]


def _load() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return {
        "x": (np.asarray(bunch.data, dtype=np.float32) / 16.0),
        "y": np.asarray(bunch.target, dtype=np.int64),
    }


def _splits(test_fraction: float, val_fraction: float, split_seed: int) -> Splits:
    arrays = cached_arrays("digits", {"source": "sklearn.load_digits"}, _load)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    rest, test = holdout(x, y, test_fraction, split_seed)
    train, val = holdout(*rest, val_fraction, split_seed + 1)
    return Splits(train=train, val=val, test=test)


class _Loader:
    def __init__(self, test_fraction: float, val_fraction: float, split_seed: int):
        self.args = (float(test_fraction), float(val_fraction), int(split_seed))

    def __call__(self, cache_dir: Path | None) -> Splits:
        return _splits(*self.args)


class DigitsMLP(nn.Module):
    """64 -> 128 -> 64 -> 10 with ReLU."""

    def __init__(self, hidden: tuple[int, int] = (128, 64)):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.head = nn.Linear(hidden[1], 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fc2(self.fc1(x).relu()).relu())


class DigitsCNN(nn.Module):
    """conv3x3(16)-BN-ReLU -> conv3x3(32)-BN-ReLU -> maxpool 2 -> linear(512 -> 10)."""

    def __init__(self, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.head = nn.Linear(c2 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, 1, 8, 8)
        h = self.bn1(self.conv1(h)).relu()
        h = self.bn2(self.conv2(h)).relu()
        h = nn.functional.max_pool2d(h, 2)
        return self.head(h.flatten(1))


def _seeded(cls, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return cls()


def _mlp_model(seed: int) -> nn.Module:
    return _seeded(DigitsMLP, seed)


def _cnn_model(seed: int) -> nn.Module:
    return _seeded(DigitsCNN, seed)


def digits_mlp(test_fraction: float = 0.2, val_fraction: float = 0.2, split_seed: int = 0) -> Task:
    """scikit-learn digits with an MLP; Adam, 600 steps of 64 examples by default."""
    return Task(
        name="digits_mlp",
        description="scikit-learn digits (8x8, 1797 images), MLP 64-128-64-10",
        build_model=_mlp_model,
        load_data=_Loader(test_fraction, val_fraction, split_seed),
        budget=Budget(steps=600, batch_size=64, eval_every=50, target=0.95),
        recipe=Recipe("adam", (1e-3, 3e-3, 1e-2)),
        head=(r"^head\.",),
        options={
            "test_fraction": test_fraction,
            "val_fraction": val_fraction,
            "split_seed": split_seed,
        },
    )


def digits_cnn(test_fraction: float = 0.2, val_fraction: float = 0.2, split_seed: int = 0) -> Task:
    """scikit-learn digits with a small CNN with BatchNorm; Adam, 400 steps of 64."""
    return Task(
        name="digits_cnn",
        description="scikit-learn digits (8x8, 1797 images), CNN 2x[conv3x3-BN-ReLU] + linear",
        build_model=_cnn_model,
        load_data=_Loader(test_fraction, val_fraction, split_seed),
        budget=Budget(steps=400, batch_size=64, eval_every=40, target=0.95),
        recipe=Recipe("adam", (1e-3, 3e-3, 1e-2)),
        head=(r"^head\.",),
        options={
            "test_fraction": test_fraction,
            "val_fraction": val_fraction,
            "split_seed": split_seed,
        },
    )
