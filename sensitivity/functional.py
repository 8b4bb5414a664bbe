"""A model plus a loss function as a pure function of a name-keyed parameter dict.

``FunctionalLoss(model, loss_fn, params)(values, batch)`` evaluates
``loss_fn(model, batch)`` with the parameters named in ``params`` replaced by
``values`` (what :func:`torch.func.functional_call` does, see :func:`slot_paths`); every
other parameter is a detached constant and every buffer a detached copy, so nothing the
estimators do can reach the model's own tensors and ``torch.func`` transforms (``grad``,
``jvp``, ``vjp``, ``vmap``) apply directly.

Normalisation layers in training mode that track running statistics (BatchNorm,
SyncBatchNorm, InstanceNorm with ``track_running_stats``) get ``None`` for their running
statistics: in training mode they normalise with the batch statistics either way, so the
loss is exactly the one training sees, and with ``None`` the running statistics are
neither read nor updated (the functional analogue of
``torch.func.replace_all_batch_norm_modules_``, without touching the module).

:class:`RngReplay` makes every evaluation on one batch see the same random numbers
(dropout masks), and :func:`leaves_no_trace` guarantees that the global RNG state, the
train/eval modes and the ``.grad`` fields are as before when an estimator returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from layerwise.sensitivity.losses import OutputLoss

if TYPE_CHECKING:
    from layerwise.sensitivity.structure import ModelStructure

__all__ = [
    "FunctionalLoss",
    "RngReplay",
    "leaves_no_trace",
    "model_devices",
    "slot_paths",
    "uses_batch_statistics",
]

#: Where a tensor of the tree sits: (index in ``model.modules()``, ``"_parameters"`` or
#: ``"_buffers"``, key).
SlotPath = tuple[int, str, str]

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` applies."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.scale: tuple[int, Any] | None = None  # (B, M) of the batch slices come from

    def forward(self, batch: Any) -> torch.Tensor:
        if self.scale is not None:
            return self.loss_fn.share(self.model, batch, *self.scale)
        return self.loss_fn(self.model, batch)


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm-type layer normalises with batch statistics (training mode), in
    which case the examples of a batch interact and per-example gradients are undefined."""
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices of the model's parameters and buffers, in order of appearance."""
    devices: dict[torch.device, None] = {}
    for t in [*model.parameters(), *model.buffers()]:
        devices.setdefault(t.device, None)
    return list(devices) or [torch.device("cpu")]


def slot_paths(model: nn.Module) -> dict[str, tuple[SlotPath, ...]]:
    """For every parameter and buffer name (tied aliases and names through shared
    submodules included), every slot that holds the same tensor, each once.

    Substituting a value for a name means writing it into all of these slots and putting
    the originals back afterwards: what :func:`torch.func.functional_call` does with
    ``tie_weights=True`` (a value given for one name of a tied tensor replaces it under all
    its names), without walking the tree on every call. The slots are a function of the
    tree only (:class:`~layerwise.sensitivity.structure.ModelStructure` keeps them)."""
    position = {id(m): i for i, m in enumerate(model.modules())}
    names: dict[int, list[str]] = {}  # id(tensor) -> its names
    slots: dict[int, dict[SlotPath, None]] = {}  # id(tensor) -> its slots, in order
    for prefix, m in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(m, kind).items():
                if t is None:
                    continue
                names.setdefault(id(t), []).append(f"{prefix}.{key}" if prefix else key)
                slots.setdefault(id(t), {})[(position[id(m)], kind, key)] = None
    return {n: tuple(slots[i]) for i, ns in names.items() for n in ns}


class FunctionalLoss:
    """``loss(values, batch)``: the mean loss with ``values`` substituted for ``params``.

    ``dtype`` (optional) casts the floating parameters and buffers; the caller casts the
    batch (see :func:`layerwise.sensitivity.batching.cast_batch`).

    ``reached`` becomes ``True`` when an evaluation returns a loss that requires a gradient,
    i.e. one that depends on the values being differentiated (under ``torch.func``
    transforms too); the estimator resets it per batch and refuses a batch whose
    evaluations never reached the parameters
    (:class:`~layerwise.sensitivity.errors.NoGradientPathError`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        params: Sequence[str],
        dtype: torch.dtype | None = None,
        *,
        structure: ModelStructure | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        self.model = model
        #: the model's :class:`~layerwise.sensitivity.structure.ModelStructure` when given
        #: (its tree as of now), which spares the walks of the tree
        self.structure = structure
        self.params = tuple(params)
        if structure is not None:
            own = structure.named_parameters
            buffers: Iterable[tuple[str, torch.Tensor]] = structure.named_buffers
            batch_stats = structure.batch_stat_modules
        else:
            own = dict(model.named_parameters())
            buffers = model.named_buffers()
            batch_stats = frozenset(
                name
                for name, m in model.named_modules()
                if isinstance(m, _NormBase) and m.training and m.track_running_stats
            )
        unknown = [n for n in self.params if n not in own]
        if unknown:
            raise ValueError(
                f"params names unknown parameters {unknown}; the model's parameters are {list(own)}"
            )
        self._module = _LossModule(model, loss_fn)

        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        chosen = set(self.params)
        self.values = {n: cast(own[n]) for n in self.params}
        fixed: dict[str, torch.Tensor | None] = {
            "model." + n: cast(p) for n, p in own.items() if n not in chosen
        }
        for name, b in buffers:
            owner, _, leaf = name.rpartition(".")
            if owner in batch_stats and leaf in _RUNNING:
                fixed["model." + name] = None
            else:
                fixed["model." + name] = cast(b).clone()
        self._fixed = fixed
        modules = structure.modules if structure is not None else list(model.modules())
        paths = structure.slot_paths if structure is not None else slot_paths(model)
        #: name -> the (dict, key) slots that hold its tensor (:func:`slot_paths`)
        self._slots = {
            n: tuple((getattr(modules[i], kind), key) for i, kind, key in p)
            for n, p in paths.items()
        }
        self._fixed_items = [(n[len("model.") :], v) for n, v in fixed.items()]
        self.reached = False

    def evaluate(self, values: dict[str, torch.Tensor], batch: Any) -> Any:
        """What ``loss_fn(model, batch)`` returns with ``values`` substituted, unchecked (for a
        ``loss_fn`` that returns the model's outputs, e.g. a loss object's ``forward``).

        The values are written into the tree's slots (:func:`slot_paths`) and the originals
        put back afterwards, also on error: the substitution of
        :func:`torch.func.functional_call`, without its walks of the tree."""
        slots = self._slots
        if not all(n in slots for n in values):  # not a parameter of the tree: its rules
            full = {"model." + n: v for n, v in values.items()}
            return functional_call(self._module, (full, self._fixed), (batch,), strict=False)
        swapped: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for items in (values.items(), self._fixed_items):
                for name, value in items:
                    for where, key in slots[name]:
                        swapped.append((where, key, where[key]))
                        where[key] = value
            return self._module(batch)
        finally:
            for where, key, original in reversed(swapped):
                where[key] = original

    def __call__(self, values: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        loss = self.evaluate(values, batch)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (the mean loss over the batch), got a tensor "
                f"of shape {tuple(loss.shape)}"
            )
        if loss.requires_grad:  # metadata only: no computation, no host sync
            self.reached = True
        return loss

    @contextlib.contextmanager
    def slices_of(self, batch: Any, size: int) -> Iterator[None]:
        """Inside, evaluations of slices of ``batch`` (``size`` examples) are on the batch's
        scale when ``loss_fn`` is a loss object (:meth:`~layerwise.sensitivity.losses.
        OutputLoss.share`): a per-example gradient is B × the example's share of the
        batch's gradient, a micro-batch's (B / b) × its share, whatever the number of
        counted tokens of each. A plain ``loss_fn`` is evaluated on the slice as it is."""
        loss_fn = self._module.loss_fn
        if not isinstance(loss_fn, OutputLoss):
            yield
            return
        targets = loss_fn.target(batch)
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"target(batch) must return a tensor, got {type(targets).__name__}")
        self._module.scale = (size, loss_fn.normaliser(targets))
        try:
            yield
        finally:
            self._module.scale = None

    def restricted(self, names: Sequence[str]) -> Callable[[dict[str, torch.Tensor], Any], Any]:
        """The loss as a function of ``names`` only, the other parameters held at their
        current values (used for isolated per-group probes)."""
        chosen = set(names)
        rest = {n: v for n, v in self.values.items() if n not in chosen}

        def loss(values: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            return self({**rest, **values}, batch)

        return loss


class RngReplay:
    """Capture the global RNG state (CPU and the model's CUDA devices) and replay it, so
    that several evaluations on one batch draw identical dropout masks."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.capture()

    def capture(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(i) for i in self.cuda]

    def replay(self) -> None:
        torch.set_rng_state(self.cpu_state)
        for i, state in zip(self.cuda, self.cuda_states, strict=True):
            torch.cuda.set_rng_state(state, i)


@contextlib.contextmanager
def leaves_no_trace(model: nn.Module, *, structure: ModelStructure | None = None) -> Iterator[None]:
    """Restore, on exit (also on error), the global RNG state (CPU and the model's CUDA
    devices), the train/eval mode of every module and the ``.grad`` of every parameter.
    ``structure``: the model's :class:`~layerwise.sensitivity.structure.ModelStructure`, if
    the caller has it (the same modules and parameters, without walking the tree).

    Parameters and buffers need no restoring: estimators only ever see detached copies
    (:class:`FunctionalLoss`), so the model's tensors are never written to.
    """
    if structure is None:
        found, modules, params = model_devices(model), model.modules(), model.parameters()
    else:
        found, modules, params = structure.devices, structure.modules, structure.parameters
    devices = sorted({d.index or 0 for d in found if d.type == "cuda"})
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.grad) for p in params]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, g in grads:
                if p.grad is not g:
                    p.grad = g
