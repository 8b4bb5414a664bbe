"""The transfer trunk is pre-trained once across workers: a shared disk cache, entries
computed under a lock that dies with its holder, keys that hash everything that
determines the weights."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from layerwise.experiments.tasks import cache, transfer
from layerwise.experiments.tasks.cache import entry_lock

fcntl = pytest.importorskip("fcntl")

STEPS, SEED = 20, 3


def _ask_for_trunk(cache_dir: str, counter: str, barrier, result: str) -> None:
    """In a fresh worker: count every training of the trunk, then ask for it at the same
    moment as the other worker."""
    import torch

    from layerwise.experiments.tasks import transfer

    torch.set_num_threads(1)
    train = transfer._train_trunk

    def counted(*args):
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the window in which the other worker asks too
        return train(*args)

    transfer._train_trunk = counted
    transfer.load_arrays(cache_dir=Path(cache_dir))  # the data are on disk already
    barrier.wait()
    torch.save(transfer.pretrain(STEPS, SEED, cache_dir=Path(cache_dir)), result)


@pytest.fixture(scope="module")
def _arrays_on_disk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist1d")
    saved = dict(cache._MEMORY)
    cache._MEMORY.clear()  # so that they are written to disk, not taken from memory
    try:
        transfer.load_arrays(cache_dir=folder)
    finally:
        cache._MEMORY.update(saved)
    (arrays,) = folder.glob("mnist1d-*.npz")
    return arrays


@pytest.fixture
def data_cache(_arrays_on_disk, tmp_path):
    """A cache folder holding the MNIST-1D arrays (and nothing else)."""
    shutil.copy(_arrays_on_disk, tmp_path)
    return tmp_path


def _forget_trunks() -> None:
    for key in [k for k in cache._MEMORY if k[0] == "mnist1d-pretrain"]:
        del cache._MEMORY[key]


@pytest.mark.slow
def test_two_workers_asking_at_once_train_the_trunk_once(data_cache, tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    counter = tmp_path / "trainings.txt"
    results = [tmp_path / f"trunk{i}.pt" for i in range(2)]
    workers = [
        context.Process(
            target=_ask_for_trunk, args=(str(data_cache), str(counter), barrier, str(result))
        )
        for result in results
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert len(counter.read_text().split()) == 1, "trained once"
    first, second = (torch.load(r, weights_only=True) for r in results)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "identical weights"
    (entry,) = data_cache.glob("mnist1d-pretrain-*.pt")
    assert (data_cache / f"{entry.name}.lock").is_file()
    assert not list(data_cache.glob(".*.tmp")), "no temporary file left"


def test_the_key_hashes_the_settings_seed_and_versions(tmp_path, monkeypatch):
    data_cache = tmp_path
    rng = np.random.default_rng(0)  # small stand-in data: the key is what is tested here
    small = {"x": rng.normal(size=(200, 40)).astype(np.float32), "y": np.arange(200) % 10}
    monkeypatch.setattr(transfer, "_arrays", lambda: small)
    trainings = []
    train = transfer._train_trunk
    monkeypatch.setattr(
        transfer, "_train_trunk", lambda *args: trainings.append(args) or train(*args)
    )
    monkeypatch.setattr(cache, "_MEMORY", dict(cache._MEMORY))
    _forget_trunks()  # only the disk cache counts here
    transfer.pretrain(5, SEED, cache_dir=data_cache)
    _forget_trunks()
    transfer.pretrain(5, SEED, cache_dir=data_cache)  # from disk
    assert len(trainings) == 1
    transfer.pretrain(5, SEED + 1, cache_dir=data_cache)  # another seed
    transfer.pretrain(6, SEED, cache_dir=data_cache)  # another setting
    versions = transfer._versions()
    monkeypatch.setattr(transfer, "_versions", lambda: {**versions, "torch": "0.0.1"})
    transfer.pretrain(5, SEED, cache_dir=data_cache)  # another torch
    assert len(trainings) == 4
    assert len(list(data_cache.glob("mnist1d-pretrain-*.pt"))) == 4


def test_a_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    """A process killed while holding an entry's lock (kill -9) blocks nobody: the kernel
    releases the lock; the lock file left behind is not stale."""
    path = tmp_path / "entry.pt"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from layerwise.experiments.tasks.cache import entry_lock\n"
            f"with entry_lock({str(path)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"held"
    fd = os.open(f"{path}.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held: exclusive
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with entry_lock(path):
        assert time.monotonic() - start < 5
    assert Path(f"{path}.lock").is_file()
