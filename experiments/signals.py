"""Stopping cleanly on SIGTERM and SIGINT, at any phase of an ablation.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM kill the process on the
spot, which leaves its worker processes running (orphans that go on writing into the
results folder). :func:`stop_on_signals` makes both signals raise :class:`Interrupted` in
the main thread, wherever it is (loading a config, generating data, waiting on workers),
so the ``finally``/``except`` blocks above it run: the runner terminates every worker
(:mod:`layerwise.experiments.backends`), the results-folder lock is released, and every
finished run stays as it is (an unfinished one leaves only a temporary folder, removed on
resume; :mod:`layerwise.experiments.rundirs`).

An exception raised by a signal handler while C code runs can be held back or lost:
raised inside a NumPy reduction during data generation, it was seen to surface seconds
later in another call, and it may never surface (which is how an early Ctrl-C came to be
ignored). So the signal is raised again, once a second, until the code that stops the
ablation takes it in hand (:func:`acknowledge`); from then on, until the block is left,
further signals are ignored, so a double Ctrl-C cannot cut the clean-up short.

Worker processes call :func:`worker_signals`: they ignore SIGINT (a Ctrl-C reaches the
whole process group; the main process decides and terminates them) and, on Linux, ask
the kernel to send them SIGTERM if the process that started them dies, even by
``kill -9`` (``prctl(PR_SET_PDEATHSIG)``), so no worker outlives its ablation.

>>> import os, signal
>>> try:
...     with stop_on_signals():
...         os.kill(os.getpid(), signal.SIGTERM)
... except Interrupted as exc:
...     print(exc.signal_name, exc.exit_code)
SIGTERM 143
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import ClassVar

__all__ = [
    "REPEAT_EVERY",
    "Interrupted",
    "acknowledge",
    "acknowledging",
    "children_ignore_sigint",
    "deferred",
    "reinstall",
    "stop_on_signals",
    "worker_signals",
]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_CHILD_BLOCKED = {signal.SIGINT}
#: Seconds between repeats of a signal not yet taken in hand.
REPEAT_EVERY = 0.5


class _State:
    """What the outermost :func:`stop_on_signals` block shares with the other functions."""

    handlers: ClassVar[dict[int, object]] = {}  # installed, by signal number
    signum: ClassVar[int | None] = None  # the first signal that arrived
    pending: ClassVar[int | None] = None  # arrived inside a deferred section
    defer: ClassVar[int] = 0  # depth of deferred sections
    acknowledged: ClassVar[bool] = False  # the stop is in hand: ignore signals
    lock = threading.Lock()  # the repeater against the block's exit


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; :attr:`signum` says which, :attr:`exit_code` is the
    shell's convention for it (128 + the signal number: 130 for SIGINT, 143 for SIGTERM).
    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles SIGTERM the same way."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        """``"SIGTERM"``, ``"SIGINT"``."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Inside the block, each of ``signums`` raises :class:`Interrupted` in the main thread,
    and the first one is raised again every :data:`REPEAT_EVERY` seconds until
    :func:`acknowledge` is called, after which signals are ignored until the outermost
    block is left (module docstring). The previous handlers are restored on leaving. A
    nested block keeps the outer one's handlers; outside the main thread (where Python
    cannot install handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread() or _State.handlers:
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    _State.signum = _State.pending = None
    _State.defer, _State.acknowledged = 0, False
    try:
        for s in signums:
            signal.signal(s, _handler)
            _State.handlers[s] = _handler
        yield
    finally:
        with _State.lock:  # no repeat is sent once the handlers may be the old ones
            _State.handlers = {}
            for s, old in previous.items():
                signal.signal(s, old if old is not None else signal.SIG_DFL)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _State.acknowledged or not _State.handlers:
        return  # the stop is in hand (or a repeat arrived as the block was left)
    if _State.signum is None:
        _State.signum = signum
        threading.Thread(target=_repeat, args=(signum,), daemon=True).start()
    if _State.defer:
        _State.pending = signum
        return
    raise Interrupted(signum)


def _repeat(signum: int) -> None:
    """Send ``signum`` to this process every :data:`REPEAT_EVERY` seconds until the stop is
    acknowledged or the block is left."""
    while True:
        time.sleep(REPEAT_EVERY)
        with _State.lock:
            if _State.acknowledged or not _State.handlers:
                return
            os.kill(os.getpid(), signum)


def acknowledge() -> None:
    """Say that the stop is in hand (the runner is stopping its workers): signals are no
    longer repeated, and ignored until the outermost :func:`stop_on_signals` block is
    left. A no-op outside such a block."""
    if _State.handlers:
        _State.acknowledged = True


@contextlib.contextmanager
def acknowledging() -> Iterator[None]:
    """Call :func:`acknowledge` when a ``KeyboardInterrupt`` (an :class:`Interrupted`
    included) leaves the block, before the blocks around it clean up."""
    try:
        yield
    except KeyboardInterrupt:
        acknowledge()
        raise


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section a signal must not cut in two (starting a process: cut, it leaves a
    half-started child). A signal arriving inside raises :class:`Interrupted` when the
    section ends. Outside a :func:`stop_on_signals` block, a plain block."""
    _State.defer += 1
    try:
        yield
    finally:
        _State.defer -= 1
        if not _State.defer and _State.pending is not None and not _State.acknowledged:
            signum, _State.pending = _State.pending, None
            raise Interrupted(signum)


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside the block start with SIGINT blocked (the signal mask is
    inherited through ``fork`` and ``exec``), so a Ctrl-C sent to the whole process group
    while they boot does not print their tracebacks; :func:`worker_signals` then ignores
    it for good and unblocks it. This thread's SIGINT goes meanwhile to another thread,
    whose flag the main thread's handler reads as usual. A plain block where
    ``pthread_sigmask`` does not exist."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def reinstall() -> None:
    """Put back the handlers of the enclosing :func:`stop_on_signals` block if a library
    replaced them (``ray.init`` installs its own SIGTERM handler in the driver). A no-op
    outside such a block or the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s, handler in _State.handlers.items():
        if signal.getsignal(s) is not handler:
            signal.signal(s, handler)


def worker_signals(parent: int | None = None) -> None:
    """Set up a worker process: ignore SIGINT, and die (SIGTERM) with the process
    ``parent`` (the one that started this worker; Linux only, elsewhere a no-op). If the
    parent is already gone, exit at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by children_ignore_sigint: a pending
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_BLOCKED)  # one is now discarded
    if parent is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request above took effect
        os._exit(1)
