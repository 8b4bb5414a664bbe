"""The registry of bundled tasks, and user tasks by import path.

``get_task("digits_cnn")`` builds a bundled task; ``get_task("mypkg.tasks:make_task",
**options)`` imports ``make_task`` (a :class:`Task`, or a factory returning one, called
with ``options``). Factories take keyword options (data sizes, split seeds...) and
validate them.
"""

from __future__ import annotations

from collections.abc import Callable

from layerwise.experiments.errors import UsageError
from layerwise.experiments.importing import import_object
from layerwise.experiments.tasks.base import Task
from layerwise.experiments.tasks.digits import digits_cnn, digits_mlp
from layerwise.experiments.tasks.mnist1d import mnist1d_cnn, mnist1d_mlp, mnist1d_scaled
from layerwise.experiments.tasks.sequence import sequence_count
from layerwise.experiments.tasks.transfer import transfer_mnist1d

__all__ = ["TASKS", "get_task", "register_task"]

#: Bundled task factories by name.
TASKS: dict[str, Callable[..., Task]] = {
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_cnn": mnist1d_cnn,
    "mnist1d_scaled": mnist1d_scaled,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "transfer_mnist1d": transfer_mnist1d,
    "sequence_count": sequence_count,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Add ``factory`` to :data:`TASKS` under ``name`` (an existing name is an error)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier, got {name!r}")
    if name in TASKS:
        raise ValueError(f"name {name!r} is already registered")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    TASKS[name] = factory


def get_task(name: str, **options) -> Task:
    """The task ``name`` (a key of :data:`TASKS` or ``package.module:factory``) built with
    ``options``. Raises :class:`~layerwise.experiments.errors.UsageError` for an unknown name or a
    factory that does not accept the options."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"task must be a non-empty string, got {name!r}")
    if ":" in name:
        factory = import_object(name, what="task")
    elif name in TASKS:
        factory = TASKS[name]
    else:
        raise UsageError(
            f"unknown task {name!r}; bundled tasks: {', '.join(sorted(TASKS))} "
            "(or give 'package.module:factory')"
        )
    if isinstance(factory, Task):
        if options:
            raise UsageError(f"task {name!r} is a Task object and takes no options")
        return factory
    if not callable(factory):
        raise UsageError(f"task {name!r} is neither a Task nor a factory: {factory!r}")
    try:
        task = factory(**options)
    except TypeError as exc:
        raise UsageError(f"task {name!r}: bad options {sorted(options)} ({exc})") from exc
    if not isinstance(task, Task):
        raise UsageError(f"task {name!r}: factory returned {type(task).__name__}, not a Task")
    return task
