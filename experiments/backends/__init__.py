"""Execution backends of the ablation runner: where each run of an ablation executes.

Every backend runs the same function on the same arguments
(:func:`layerwise.experiments.runner.run_one`, one run per call, one torch thread per
run), and each run writes its own folder under ``runs/`` (a temporary folder renamed into
place once finished; :mod:`layerwise.experiments.rundirs`). So the results do not depend on
the backend; only ``backend`` and ``host`` in each ``done.json`` and the timings differ.

* ``local`` (the default): ``workers=1`` runs in this process; more run in a pool of
  *spawn* worker processes on this machine (:mod:`layerwise.experiments.backends.local`).
* ``ray``: every run is a Ray task, on a local Ray started with ``num_cpus=workers``, or on
  the cluster at ``address``, whose nodes must see the results folder at the same path
  (shared storage) and have the project installed
  (:mod:`layerwise.experiments.backends.ray_tasks`). Needs the ``ray`` extra.

An executor has ``submit(fn, *args) -> concurrent.futures.Future``, ``shutdown()`` (wait
for what was submitted, release everything) and ``terminate()`` (stop every worker now,
for an interrupted ablation: nothing keeps running once it returns).

>>> check_backend("local", None)
>>> check_backend("dask", None)
Traceback (most recent call last):
...
ValueError: backend must be one of ['local', 'ray'], got 'dask'
"""

from __future__ import annotations

from typing import Any

from layerwise.experiments.extras import require

__all__ = ["BACKENDS", "check_backend", "open_executor"]

BACKENDS = ("local", "ray")


def check_backend(backend: str, address: str | None) -> None:
    """Refuse an unknown backend, an ``address`` without ``ray``, or a backend whose extra
    is not installed (:class:`layerwise.experiments.extras.MissingExtraError`, naming it),
    before anything is written."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if address is not None:
        if backend != "ray":
            raise ValueError(f"address {address!r} needs backend 'ray', got {backend!r}")
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"address must be a non-empty string, got {address!r}")
    if backend == "ray":
        require("ray")


def open_executor(backend: str, workers: int, address: str | None = None) -> Any:
    """A started executor of ``backend`` (module docstring)."""
    check_backend(backend, address)
    if backend == "ray":
        from layerwise.experiments.backends.ray_tasks import RayExecutor

        return RayExecutor(workers, address)
    from layerwise.experiments.backends.local import InProcess, LocalPool

    return InProcess() if workers == 1 else LocalPool(workers)
