"""Estimation batches drawn, one per recalibration, from an iterable given once.

The iterable is cycled: when an iterator is exhausted, ``iter(batches)`` starts it again
(a ``DataLoader`` then reshuffles as it would for a new epoch). The number of batches drawn
is the source's state (:meth:`BatchSource.state_dict`, part of the engine's checkpoint);
after a resume, the first draw re-creates the iterator and skips that many batches, so an
iterable that yields the same sequence each time it is iterated anew continues exactly
where it stopped. A sequence (list, tuple) is indexed, so
nothing is replayed; any other iterable is replayed batch by batch, which for a shuffling
``DataLoader`` also draws its shuffling seeds again: give such a loader its own
``generator`` so that the replay does not consume the global random stream.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from layerwise.policies.schedule_base import check_int

__all__ = ["BatchSource", "random_streams_kept"]


class BatchSource:
    """Cycle ``batches`` and count the draws.

    >>> source = BatchSource([1, 2, 3])
    >>> [source.next() for _ in range(4)], source.drawn
    ([1, 2, 3, 1], 4)
    >>> resumed = BatchSource([1, 2, 3]); resumed.load_state_dict(source.state_dict())
    >>> resumed.next()
    2
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
            raise TypeError(f"batches must be an iterable of batches, got {batches!r}")
        if isinstance(batches, Iterator):
            raise TypeError(
                "batches must be re-iterable (a list, a DataLoader), not a one-shot iterator "
                f"such as {type(batches).__name__}: it is cycled and replayed after a resume"
            )
        self.batches = batches
        self.drawn = 0
        self._iterator: Iterator[Any] | None = None
        self._position = 0  # draws that the live iterator accounts for

    def next(self) -> Any:
        """The next batch; raises ``ValueError`` if the iterable yields nothing."""
        if isinstance(self.batches, Sequence):
            if len(self.batches) == 0:
                raise ValueError("batches yielded no batch (an empty sequence)")
            batch = self.batches[self.drawn % len(self.batches)]
            self.drawn += 1
            return batch
        if self._iterator is None or self._position != self.drawn:
            self._iterator = iter(self.batches)
            self._position = 0
            while self._position < self.drawn:
                self._skip()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.batches)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("batches yielded no batch (an empty iterable)") from None
        self.drawn += 1
        self._position = self.drawn
        return batch

    def peek(self) -> Any:
        """A batch to check, without counting it: the one :meth:`next` gives next for a
        sequence; else the first batch of a fresh iterator, drawn with the global random
        streams kept as they were; ``None`` if the iterable yields nothing."""
        if isinstance(self.batches, Sequence):
            return self.batches[self.drawn % len(self.batches)] if len(self.batches) else None
        with random_streams_kept():
            return next(iter(self.batches), None)

    def _skip(self) -> None:
        assert self._iterator is not None
        try:
            next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.batches)
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError("batches yielded no batch (an empty iterable)") from None
        self._position += 1

    def state_dict(self) -> dict[str, int]:
        """Plain data for a checkpoint: ``{"drawn": batches drawn so far}``."""
        return {"drawn": self.drawn}

    def load_state_dict(self, state: Any) -> None:
        """Continue after ``state["drawn"]`` draws (the next draw replays up to there);
        checked first, so a bad state changes nothing."""
        self.drawn = self.check_state_dict(state)
        self._iterator, self._position = None, 0

    @staticmethod
    def check_state_dict(state: Any) -> int:
        """The draw count of a :meth:`state_dict`, validated, or ``ValueError``."""
        if not isinstance(state, Mapping) or set(state) != {"drawn"}:
            raise ValueError(
                f"batches state must be a mapping with the one key 'drawn', got {state!r:.80}"
            )
        try:
            return check_int("batches state['drawn']", state["drawn"], minimum=0)
        except TypeError as err:
            raise ValueError(str(err)) from err


@contextlib.contextmanager
def random_streams_kept() -> Iterator[None]:
    """Keep the global random streams (torch on the CPU, Python's ``random``, NumPy's if
    loaded) as they were, e.g. while a data loader yields a batch to peek at."""
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    saved = None if numpy is None else numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            if numpy is not None:
                numpy.random.set_state(saved)
