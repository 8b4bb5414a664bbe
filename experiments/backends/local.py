"""The local backend: runs in this process, or in a pool of worker processes on this machine.

:class:`LocalPool` is a ``concurrent.futures.ProcessPoolExecutor`` with the *spawn* start
method (a fresh interpreter per worker: no state inherited from the caller) and one torch
thread per worker, so a run computes exactly what it computes in this process. Its
workers ignore SIGINT and die with this process
(:func:`layerwise.experiments.signals.worker_signals`); :meth:`LocalPool.terminate` stops
them at once (SIGTERM, then SIGKILL after a grace period), which the standard
library's ``shutdown`` does not do: it lets running calls finish, and an interrupted
ablation would go on running for as long as its longest run.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from layerwise.experiments.signals import children_ignore_sigint, deferred, worker_signals

__all__ = ["InProcess", "LocalPool"]


class InProcess:
    """An executor that runs each submitted call at once, in this process, with one torch
    thread (as a pool worker has)."""

    name = "local"

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        import torch

        future: cf.Future = cf.Future()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # KeyboardInterrupt included: re-raised by the caller
            future.set_exception(exc)
        finally:
            torch.set_num_threads(threads)
        return future

    def shutdown(self) -> None:
        """Nothing to release."""

    def terminate(self) -> None:
        """Nothing runs outside this process."""


def _init_worker(parent: int) -> None:
    import torch

    worker_signals(parent)
    torch.set_num_threads(1)


class LocalPool:
    """``workers`` spawned worker processes (module docstring)."""

    name = "local"

    def __init__(self, workers: int, grace: float = 5.0) -> None:
        self.grace = grace
        self._pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        # submit may start a worker: not to be cut in two by a signal, nor the worker by
        # a Ctrl-C to the process group while it boots
        with deferred(), children_ignore_sigint():
            return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        """Wait for the submitted calls, then stop the workers."""
        self._pool.shutdown(wait=True)

    def terminate(self) -> None:
        """Cancel what has not started and stop every worker now: SIGTERM, then SIGKILL for
        any still alive after :attr:`grace` seconds. Returns once none is left."""
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + self.grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
