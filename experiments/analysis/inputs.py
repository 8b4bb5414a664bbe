"""What ``layerwise analyze`` is told to analyse, resolved and checked before any estimate:
``--model`` (a bundled name or a factory, :func:`layerwise.experiments.models.resolve_model`),
``--checkpoint``, ``--data`` (a factory returning an iterable of batches: a ``DataLoader``, a
list, a generator), ``--loss`` (:func:`resolve_loss`: a loss object such as
:class:`layerwise.sensitivity.CrossEntropy`, a factory returning one, or a
``function(model, batch) -> mean loss``; by default :data:`DEFAULT_CROSS_ENTROPY`,
cross-entropy on ``(inputs, targets)`` as a loss object, and for batches that are mappings
(a Hugging Face collator's dicts or ``BatchEncoding``) :func:`output_loss`, the model's own
``model(**batch).loss``) and ``--device``.

Errors in what the user typed are :class:`~layerwise.experiments.errors.UsageError` (exit 2),
the user's own code failing a :class:`~layerwise.experiments.errors.CLIError` (exit 1), each one
line naming the option and its value.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from layerwise.experiments.analysis.checkpoint import check_finite_weights, load_weights
from layerwise.experiments.errors import CLIError, UsageError, first_line
from layerwise.experiments.importing import import_object
from layerwise.experiments.models import call_factory, resolve_model
from layerwise.sensitivity import CrossEntropy, OutputLoss, leaves_no_trace
from layerwise.sensitivity.batching import batch_size_of, cast_batch, move_batch

__all__ = [
    "DEFAULT_CROSS_ENTROPY",
    "DEFAULT_LOSS",
    "Inputs",
    "cross_entropy_loss",
    "output_loss",
    "parse_device",
    "resolve_loss",
    "user_inputs",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
DEFAULT_LOSS = "cross-entropy (mean over the batch)"


@dataclass
class Inputs:
    """The model (on its device and dtype), the loss, the batches (moved), and plain data
    describing them for the manifest."""

    model: nn.Module
    loss_fn: LossFn
    batches: list[Any]
    manifest: dict[str, Any] = field(default_factory=dict)


def parse_device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a device torch knows that this
    machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...)."""
    if not isinstance(text, str):
        raise TypeError(f"--device must be a str, got {type(text).__name__}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(
            f"--device {text!r} is not a device torch knows (try 'auto', 'cpu', "
            "'cuda', 'cuda:0' or 'mps')"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text!r}: CUDA is not available on this machine")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {text!r} is not available here ({first_line(exc)})") from exc
    return device


def _move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``batch`` with every tensor on ``device`` and every floating tensor in ``dtype``."""
    return cast_batch(move_batch(batch, device), dtype)


def _batches_sha256(batches: list[Any]) -> str:
    """SHA-256 over the structure and every leaf of ``batches`` (tensors by dtype, shape and
    bytes, other leaves by ``repr``), so that the manifest pins the data analysed."""
    leaves, spec = tree_flatten(batches)
    digest = hashlib.sha256(str(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T|{t.dtype}|{tuple(leaf.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{leaf!r}|".encode())
    return digest.hexdigest()


def _load_batches(spec: str, *, limit: int) -> list[Any]:
    """The first ``limit`` batches of the iterable the factory at ``spec`` returns, each with
    examples along dimension 0 (:func:`layerwise.sensitivity.batching.batch_size_of`)."""
    data = call_factory(spec, what="--data")
    wrong = (torch.Tensor, nn.Module, str, bytes, Mapping)
    if isinstance(data, wrong) or not isinstance(data, Iterable):
        raise UsageError(
            f"--data {spec!r} returned a {type(data).__name__}, not an iterable of batches"
        )
    try:
        batches = list(itertools.islice(data, limit))
    except Exception as exc:
        raise CLIError(f"--data {spec!r} failed while yielding batches: {first_line(exc)}") from exc
    if not batches:
        raise UsageError(f"--data {spec!r} yielded no batches")
    # a mapping that is not a dict (transformers' BatchEncoding is a UserDict) becomes one,
    # so that moving, casting and splitting see its tensors
    batches = [
        dict(b) if isinstance(b, Mapping) and not isinstance(b, dict) else b for b in batches
    ]
    for i, batch in enumerate(batches):
        try:
            batch_size_of(batch)
        except ValueError as exc:
            raise UsageError(f"--data {spec!r}: batch {i}: {exc}") from exc
    return batches


def _pair(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of ``batch``, or the default loss's usage error."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise UsageError(
            f"the default loss needs batches (inputs, targets), got a "
            f"{type(batch).__name__}{size}; give --loss"
        )
    return batch[0], batch[1]


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs)`` against class indices ``targets`` for a batch
    ``(inputs, targets)``: (1/B) Σ_i −log softmax(model(x_i))[y_i], in nats."""
    inputs, targets = _pair(batch)
    return F.cross_entropy(model(inputs), targets)


def _default_outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(_pair(batch)[0])


def _default_targets(batch: Any) -> torch.Tensor:
    return _pair(batch)[1]


#: The default ``--loss``: :func:`cross_entropy_loss` as a loss object (so ``ggn_trace`` and
#: the ``curvature_ggn`` policy work on it).
DEFAULT_CROSS_ENTROPY = CrossEntropy(_default_outputs, _default_targets)
#: The default ``--loss`` for batches that are mappings (Hugging Face style).
DEFAULT_OUTPUT_LOSS = "model(**batch).loss (the model's own mean loss)"


def output_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a model computes itself from a mapping batch,
    :func:`layerwise.sensitivity.model_output_loss` (``model(**batch).loss``: a Hugging Face
    model given ``labels``, its mean loss); a model that returns none is a usage error."""
    from layerwise.sensitivity import model_output_loss

    try:
        return model_output_loss(model, batch)
    except ValueError as exc:
        if "returned no loss" not in str(exc):
            raise
        raise UsageError(
            f"the default loss for dict batches: {first_line(exc)}; give --loss"
        ) from exc


def resolve_loss(spec: str) -> LossFn:
    """``--loss``: the object at the import path ``spec`` when it is a loss object or a
    function ``loss(model, batch)``, or what it returns when it is a factory called with no
    arguments (a loss object such as ``CrossEntropy(forward, target)``, or a function)."""
    obj = import_object(spec, what="--loss")
    if isinstance(obj, OutputLoss):
        return obj
    if not callable(obj):
        raise UsageError(f"--loss {spec!r} is a {type(obj).__name__}, not a callable")
    try:
        inspect.signature(obj).bind()
    except (TypeError, ValueError):  # takes arguments (or has no signature): the loss itself
        return obj
    try:
        made = obj()
    except Exception as exc:  # the user's factory failed: one line, chain kept for --debug
        raise CLIError(f"--loss {spec!r} raised {first_line(exc)}") from exc
    if not callable(made):
        raise UsageError(
            f"--loss {spec!r} is a factory that returned a {type(made).__name__}, not a loss "
            "object or a function loss(model, batch)"
        )
    return made


def _first_loss(model: nn.Module, loss_fn: LossFn, batch: Any, *, name: str) -> float:
    """The loss on ``batch``, evaluated once to catch a bad loss or bad data before the
    estimate; leaves no trace (buffers, modes, gradients and the RNG state are restored)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with leaves_no_trace(model), torch.no_grad():
            loss = loss_fn(model, batch)
    except UsageError:
        raise
    except Exception as exc:
        raise CLIError(f"{name} failed on the first batch: {first_line(exc)}") from exc
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (
            f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}"
            if isinstance(loss, torch.Tensor)
            else f"a {type(loss).__name__}"
        )
        raise UsageError(f"{name} must return a scalar floating tensor, got {got}")
    if not math.isfinite(value := float(loss)):
        raise UsageError(f"{name} is {value} on the first batch; check --data for NaN or inf")
    return value


def user_inputs(args: Any, *, device: torch.device, dtype: torch.dtype) -> Inputs:
    """The user's model (``--seed`` seeds its factory), checkpoint, data and loss, each
    checked: keys and shapes, finite weights, a finite scalar loss on the first batch."""
    torch.manual_seed(args.seed)
    model = resolve_model(args.model, what="--model")
    checkpoint = None if args.checkpoint is None else load_weights(model, args.checkpoint)
    source = (
        f"--model {args.model!r}" if checkpoint is None else f"--checkpoint {args.checkpoint!r}"
    )
    check_finite_weights(model, source=source)
    model = model.to(device=device, dtype=dtype)
    raw = _load_batches(args.data, limit=args.batches)
    batches = [_move_batch(b, device, dtype) for b in raw]
    mapping = isinstance(raw[0], Mapping)
    default, described = (
        (output_loss, DEFAULT_OUTPUT_LOSS) if mapping else (DEFAULT_CROSS_ENTROPY, DEFAULT_LOSS)
    )
    loss_fn = default if args.loss is None else resolve_loss(args.loss)
    name = "the default loss" if args.loss is None else f"--loss {args.loss!r}"
    manifest = {
        "model": {"source": args.model, "class": type(model).__qualname__},
        "checkpoint": checkpoint,
        "data": {"source": args.data, "batches": len(raw), "sha256": _batches_sha256(raw)},
        "loss": args.loss or described,
        "first_batch_loss": _first_loss(model, loss_fn, batches[0], name=name),
    }
    return Inputs(model, loss_fn, batches, manifest)
