"""Transfer: pre-train the MNIST-1D CNN on digits 0-4, fine-tune on digits 5-9.

The setting where per-layer rates are known to matter most (Howard & Ruder 2018,
"discriminative fine-tuning"): a pre-trained trunk wants gentle steps, a fresh head bold
ones.

* Pre-training: the paper's CNN (:class:`~layerwise.experiments.tasks.mnist1d.CNN`) with 5 outputs,
  trained with Adam (lr 1e-2, batches of 100, ``pretrain_steps`` steps, seed
  ``pretrain_seed``) on every MNIST-1D training example of digits 0-4. Deterministic; the
  weights are cached in-process and, once the data have been loaded with a cache folder,
  on disk, keyed by a hash of every pre-training setting, the data generator's arguments
  and the versions of the project, torch, numpy and mnist1d. The disk entry is shared by
  the workers of an ablation (the local pool's processes, Ray tasks on shared storage):
  the first to ask trains the trunk under a lock, the others wait and load it, so it is
  trained once per (settings, seed), not once per worker
  (:func:`layerwise.experiments.tasks.cache.entry_lock`).
* Fine-tuning data: digits 5-9 (relabelled 0-4). ``val_size`` examples of the training
  split's digits 5-9 form the validation split and the next ``finetune_train`` the
  (deliberately small) training split; the test split is the test examples of 5-9.
* Fine-tuned model: the pre-trained conv trunk, a fresh linear head drawn with the run
  seed. Every run starts from the same trunk; seeds vary the head and the data order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from layerwise.experiments.tasks.base import Budget, Recipe, Splits, Task, cross_entropy
from layerwise.experiments.tasks.cache import cached_state_dict
from layerwise.experiments.tasks.mnist1d import CNN, default_args, load_arrays

__all__ = ["pretrain", "transfer_mnist1d"]

_CACHE_DIR: dict[str, Path | None] = {"dir": None}


def _arrays():
    return load_arrays(cache_dir=_CACHE_DIR["dir"])


def _versions() -> dict[str, str]:
    """Versions of what the trunk's weights depend on: the project's code, torch and numpy
    (the arithmetic), mnist1d (the data)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    from layerwise.experiments import __version__

    try:
        mnist1d = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        mnist1d = "unknown"
    return {
        "layerwise-lr": __version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": numpy.__version__,
        "mnist1d": mnist1d,
    }


def _train_trunk(steps: int, seed: int, lr: float, batch_size: int) -> dict[str, torch.Tensor]:
    """Pre-train the CNN (5 outputs) on digits 0-4: Adam, batches drawn without replacement
    from a permutation reshuffled every epoch, all of it seeded by ``seed``."""
    arrays = _arrays()
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    keep = y < 5
    x, y = x[keep], y[keep]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CNN(output_size=5)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        perm = torch.randperm(len(x), generator=generator)
        cursor = 0
        for _ in range(steps):
            if cursor + batch_size > len(x):
                perm, cursor = torch.randperm(len(x), generator=generator), 0
            index = perm[cursor : cursor + batch_size]
            cursor += batch_size
            loss = cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrain(
    steps: int = 1000,
    seed: int = 0,
    lr: float = 1e-2,
    batch_size: int = 100,
    cache_dir: Path | None = None,
):
    """``state_dict`` of the CNN (5 outputs) pre-trained on MNIST-1D digits 0-4, from the
    in-process cache, the disk cache under ``cache_dir`` (default: the folder the task's
    data were loaded with) or trained now, once across processes (module docstring)."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if cache_dir is not None:
        _CACHE_DIR["dir"] = Path(cache_dir)
    spec = {
        "data": default_args(),
        "steps": steps,
        "seed": seed,
        "lr": lr,
        "batch": batch_size,
        "versions": _versions(),
        "model": "CNN(5)",
    }
    return cached_state_dict(
        "mnist1d-pretrain",
        spec,
        lambda: _train_trunk(steps, seed, lr, batch_size),
        _CACHE_DIR["dir"],
    )


class _Model:
    def __init__(self, pretrain_steps: int, pretrain_seed: int):
        self.pretrain_steps, self.pretrain_seed = pretrain_steps, pretrain_seed

    def __call__(self, seed: int) -> nn.Module:
        state = pretrain(self.pretrain_steps, self.pretrain_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = CNN(output_size=5)  # the head drawn with the run seed
        trunk = {k: v for k, v in state.items() if not k.startswith("linear.")}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        if unexpected or set(missing) != {"linear.weight", "linear.bias"}:
            raise RuntimeError(
                f"pre-trained trunk does not fit the CNN: missing {missing}, "
                f"unexpected {unexpected}"
            )
        return model


class _Loader:
    def __init__(self, finetune_train: int, val_size: int, split_seed: int, model: _Model):
        self.args = (finetune_train, val_size, split_seed)
        self.model = model

    def __call__(self, cache_dir: Path | None) -> Splits:
        if cache_dir is not None:
            _CACHE_DIR["dir"] = cache_dir
        finetune_train, val_size, split_seed = self.args
        arrays = _arrays()
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
        keep = y >= 5
        x, y = x[keep], y[keep] - 5
        if val_size + finetune_train > len(x):
            raise ValueError(
                f"val_size + finetune_train = {val_size + finetune_train} exceeds the "
                f"{len(x)} training examples of digits 5-9"
            )
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
        val_idx, train_idx = perm[:val_size], perm[val_size : val_size + finetune_train]
        xt, yt = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
        test_keep = yt >= 5
        # warm the pre-training cache now that the cache folder is known
        pretrain(self.model.pretrain_steps, self.model.pretrain_seed)
        return Splits(
            train=(x[train_idx], y[train_idx]),
            val=(x[val_idx], y[val_idx]),
            test=(xt[test_keep], yt[test_keep] - 5),
        )


def transfer_mnist1d(
    finetune_train: int = 500,
    val_size: int = 400,
    pretrain_steps: int = 1000,
    pretrain_seed: int = 0,
    split_seed: int = 0,
) -> Task:
    """Fine-tune an MNIST-1D CNN pre-trained on digits 0-4 on a small set of digits 5-9."""
    for name, value in (
        ("finetune_train", finetune_train),
        ("val_size", val_size),
        ("pretrain_steps", pretrain_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model = _Model(pretrain_steps, pretrain_seed)
    return Task(
        name="transfer_mnist1d",
        description=(
            f"MNIST-1D CNN pre-trained on digits 0-4 ({pretrain_steps} steps), fine-tuned "
            f"on {finetune_train} examples of digits 5-9 with a fresh head"
        ),
        build_model=model,
        load_data=_Loader(finetune_train, val_size, split_seed, model),
        budget=Budget(steps=400, batch_size=50, eval_every=40, target=0.7),
        recipe=Recipe("adam", (3e-4, 1e-3, 3e-3)),
        head=(r"^linear\.",),
        options={
            "finetune_train": finetune_train,
            "val_size": val_size,
            "pretrain_steps": pretrain_steps,
            "pretrain_seed": pretrain_seed,
            "split_seed": split_seed,
        },
    )
