"""Resolve what ``layerwise analyze`` is told to analyse and check it before estimating.

``--model package.module:factory``   a callable with no arguments returning an ``nn.Module``;
``--data package.module:factory``    a callable with no arguments returning an iterable of
                                     batches (a ``DataLoader``, a list, a generator, ...);
``--loss package.module:function``   ``function(model, batch) -> scalar mean loss``; the
                                     default is cross-entropy on ``(inputs, targets)``.

Errors in what the user typed (paths that do not resolve, objects of the wrong kind, data that
yields nothing) are :class:`~layerwise.experiments.errors.UsageError` (exit 2); the user's own code
failing when called is :class:`~layerwise.experiments.errors.CLIError` (exit 1). Every message is
one line naming the option and its value.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.experiments.errors import CLIError, UsageError
from layerwise.experiments.importing import import_object

__all__ = [
    "AnalysisInputs",
    "batch_size",
    "batches_sha256",
    "call_factory",
    "cross_entropy_loss",
    "first_line",
    "load_batches",
    "load_loss",
    "load_model",
    "move_batch",
    "probe_loss",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, for one-line error reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def call_factory(path: str, *, option: str) -> Any:
    """Import ``path`` (``package.module:name``) and call it with no arguments."""
    factory = import_object(path, what=option)
    if not callable(factory):
        raise UsageError(f"{option} {path!r} is a {type(factory).__name__}, not a callable")
    try:
        return factory()
    except Exception as exc:  # the user's code: report it on one line, keep the chain
        raise CLIError(f"{option} {path!r} raised {first_line(exc)}") from exc


def load_model(path: str) -> nn.Module:
    """Build the model from the factory at ``path``; it must return an ``nn.Module`` with
    at least one trainable parameter."""
    model = call_factory(path, option="--model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {path!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--model {path!r} returned a model with no trainable parameters")
    return model


def batch_size(batch: Any) -> int | None:
    """Examples in ``batch``: ``len(batch[0])`` for a tuple/list, ``shape[0]`` for a tensor,
    the first tensor's ``shape[0]`` for a mapping; None when it cannot be told."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return batch_size(value)
    return None


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``batch`` with every tensor on ``device`` and every floating tensor in ``dtype``;
    tuples, lists and mappings are rebuilt, anything else is left as it is."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, tuple):
        return tuple(move_batch(b, device, dtype) for b in batch)
    if isinstance(batch, list):
        return [move_batch(b, device, dtype) for b in batch]
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    return batch


def batches_sha256(batches: list[Any]) -> str:
    """SHA-256 over the layout, dtypes, shapes and bytes of every tensor in ``batches``, in
    order (other leaves by their ``repr``), so the manifest pins the data analysed."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            digest.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, (tuple, list)):
            digest.update(f"{type(item).__name__}[{len(item)}]|".encode())
            for x in item:
                feed(x)
        elif isinstance(item, Mapping):
            digest.update(f"map[{len(item)}]|".encode())
            for k, v in item.items():
                digest.update(f"{k!r}:".encode())
                feed(v)
        else:
            digest.update(f"{item!r}|".encode())

    for batch in batches:
        feed(batch)
    return digest.hexdigest()


def load_batches(
    path: str, *, limit: int, device: torch.device, dtype: torch.dtype
) -> tuple[list[Any], str]:
    """The first ``limit`` batches of the iterable the factory at ``path`` returns, moved to
    ``device`` (floating tensors cast to ``dtype``), and :func:`batches_sha256` of them as
    yielded. Refuses data that yields nothing or a batch without examples."""
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    data = call_factory(path, option="--data")
    wrong = (torch.Tensor, nn.Module, str, bytes, Mapping)
    if isinstance(data, wrong) or not isinstance(data, Iterable):
        raise UsageError(
            f"--data {path!r} returned a {type(data).__name__}, not an iterable of batches"
        )
    try:
        batches = list(itertools.islice(iter(data), limit))
    except Exception as exc:
        raise CLIError(f"--data {path!r} failed while yielding batches: {first_line(exc)}") from exc
    if not batches:
        raise UsageError(f"--data {path!r} yielded no batches")
    for i, batch in enumerate(batches):
        size = batch_size(batch)
        if size == 0:
            raise UsageError(f"--data {path!r}: batch {i} holds no examples")
    return [move_batch(b, device, dtype) for b in batches], batches_sha256(batches)


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs)`` against integer class ``targets`` for a batch
    ``(inputs, targets)``: (1/B) Σ_i −log softmax(model(x_i))[y_i]."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = (
            f"{type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else type(batch).__name__
        )
        raise UsageError(
            f"the default loss needs batches (inputs, targets), got a {kind}; give --loss"
        )
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def load_loss(path: str | None) -> LossFn:
    """The loss function at ``path``, or :func:`cross_entropy_loss` when ``path`` is None."""
    if path is None:
        return cross_entropy_loss
    fn = import_object(path, what="--loss")
    if not callable(fn):
        raise UsageError(f"--loss {path!r} is a {type(fn).__name__}, not a callable")
    return fn


def probe_loss(model: nn.Module, loss_fn: LossFn, batch: Any, *, loss_name: str) -> float:
    """Evaluate the loss once on ``batch`` to catch bad data or a bad loss early, leaving no
    trace (buffers such as BatchNorm statistics and the RNG state are restored).

    Refuses a loss that is not a real scalar tensor or not finite on this batch.
    """
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
            loss = loss_fn(model, batch)
    except UsageError:
        raise
    except Exception as exc:
        raise CLIError(f"{loss_name} failed on the first batch: {first_line(exc)}") from exc
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (
            f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}"
            if isinstance(loss, torch.Tensor)
            else f"a {type(loss).__name__}"
        )
        raise UsageError(f"{loss_name} must return a scalar floating tensor, got {got}")
    value = float(loss)
    if value != value or value in (float("inf"), float("-inf")):
        raise UsageError(f"{loss_name} is {value} on the first batch; check --data for NaN or inf")
    return value


@dataclass
class AnalysisInputs:
    """What an analysis runs on: the model (on its device and dtype), the loss function, the
    batches (already moved), and plain data describing each for the manifest."""

    model: nn.Module
    loss_fn: LossFn
    batches: list[Any]
    manifest: dict[str, Any] = field(default_factory=dict)
