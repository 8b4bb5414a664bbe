"""The Ray backend: every run of an ablation is a Ray task.

Without an address, :class:`RayExecutor` starts a Ray on this machine with
``num_cpus=workers`` (no dashboard, no usage statistics) and shuts it down at the end;
with one (``"ray://head:10001"``, ``"head:6379"`` or ``"auto"``) it joins that cluster,
whose CPUs then set how many runs go at once. Each task asks for one CPU, runs with one
torch thread and writes its run folder itself, so every node must see the results folder
(and the cache folder) at the same path: shared storage such as NFS. A run whose folder
is not there says so (its error names the host). The driver (this process) plans, tunes
and writes ``tuning.json``, the lock and the report, as with the local backend, so resume,
locks and manifests work the same.

Ray retries a task whose worker or node died (``max_retries``), which is safe: a run
writes into a fresh temporary folder and only a finished one is renamed into place.
:meth:`RayExecutor.terminate` force-cancels every task still pending or running (its worker
process is killed) and shuts down the Ray this executor started.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from layerwise.experiments.extras import require
from layerwise.experiments.signals import Interrupted, deferred, reinstall

__all__ = ["RayExecutor"]


def _in_ray_worker(fn: Callable[..., Any], *args: Any) -> Any:
    import torch

    torch.set_num_threads(1)
    return fn(*args)


class RayExecutor:
    """Runs each submitted call as a Ray task (module docstring)."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None, max_retries: int = 3) -> None:
        ray = require("ray")
        self._ray = ray
        # no usage statistics reported home; must be set before Ray starts
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._owned = not ray.is_initialized()
        try:
            with deferred():  # a signal while Ray starts acts once it has started
                if self._owned and address is None:
                    ray.init(
                        num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING
                    )
                elif self._owned:
                    ray.init(address=address, logging_level=logging.WARNING)
                reinstall()  # ray.init replaces the driver's SIGTERM handler with its own
        except BaseException as exc:
            if self._owned:
                ray.shutdown()
            if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
                raise Interrupted(signal.SIGTERM) from None  # what ray.init's handler made of it
            raise
        self._remote = ray.remote(num_cpus=1, max_retries=max_retries)(_in_ray_worker)
        self._refs: dict[Any, None] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        ref = self._remote.remote(fn, *args)
        with self._lock:
            self._refs[ref] = None
        future = ref.future()

        def forget(_: cf.Future) -> None:
            with self._lock:
                self._refs.pop(ref, None)

        future.add_done_callback(forget)
        return future

    def shutdown(self) -> None:
        """Wait for the submitted tasks, then shut down the Ray this executor started."""
        with self._lock:
            refs = list(self._refs)
        if refs:
            self._ray.wait(refs, num_returns=len(refs))
        if self._owned:
            self._ray.shutdown()

    def terminate(self) -> None:
        """Force-cancel every task not yet finished (killing its worker) and shut down the
        Ray this executor started (its processes with it)."""
        with self._lock:
            refs = list(self._refs)
        for ref in refs:
            with contextlib.suppress(Exception):  # finished meanwhile, or Ray going down
                self._ray.cancel(ref, force=True)
        if self._owned:
            self._ray.shutdown()
