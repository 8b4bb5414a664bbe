"""What :func:`layerwise.sensitivity.estimate` needs to know about a model's module tree,
computed once per tree and reused while the tree is unchanged.

Each call of ``estimate`` used to walk the tree about a dozen times (the groups, the
devices, the meta check, the BatchNorm check, the parameters and buffers the functional
loss substitutes, the modes and ``.grad`` fields to restore, the modules to hook). For a
small model those walks cost as much as a forward pass. :func:`model_structure` walks the
tree **once** per call to build a fingerprint, and reuses everything derived from the tree
while the fingerprint is unchanged.

**The fingerprint** holds, for every module in ``named_modules(remove_duplicate=False)``
order: its qualified name, identity, class and ``training`` flag (and
``track_running_stats`` for normalisation layers); for each entry of its own
``_parameters`` and ``_buffers``: the key, the tensor's identity, ``dtype``, ``device`` and
``shape``, and for parameters ``requires_grad``. Everything cached is a function of these:
the parameter and buffer names and objects, the default groups and any resolved
``groups`` mapping (names, trainability, floating dtype, sizes), the devices, whether a
BatchNorm layer uses batch statistics, which running statistics the functional loss
leaves out, where each tensor sits (the slots the functional loss writes its values into,
:func:`~layerwise.sensitivity.functional.slot_paths`), and the meta-device tensors.
Tensor *values* are never cached: every call detaches and copies the current ones. A
replaced parameter, buffer or submodule, a new ``requires_grad``, a ``.to(...)`` (even one
that swaps ``.data`` in place), a ``train()``/``eval()`` switch all change the fingerprint
and rebuild the entry.
Identities are only a safe key while the objects live (a new object may take a dead
one's ``id``): the entry holds the parameters and buffers it fingerprinted (so their
identities stay taken until the entry is replaced, at the model's next estimate) and
weak references to the submodules (a submodule may refer back to the model, which must
stay collectable), and an entry whose submodules have died is rebuilt. Entries are kept
per model in a ``WeakKeyDictionary``, one per model, replaced when the tree changes.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
>>> model_structure(net) is model_structure(net)
True
>>> first = model_structure(net)
>>> net[2] = nn.Linear(3, 2)  # a new submodule: a new entry
>>> model_structure(net) is first, model_structure(net).param_names
(False, ('0.weight', '0.bias', '2.weight', '2.bias'))
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parameter import is_lazy

from layerwise.sensitivity.functional import SlotPath, slot_paths
from layerwise.sensitivity.groups import GroupIndex, resolve_groups

__all__ = ["ModelStructure", "model_structure"]

#: Resolved ``groups`` mappings kept per structure (the engine passes one; a few is plenty).
GROUPS_KEPT = 8

_CACHE: weakref.WeakKeyDictionary[nn.Module, ModelStructure] = weakref.WeakKeyDictionary()


def _entry(key: str, t: torch.Tensor | None, grad: bool) -> tuple[Any, ...]:
    if t is None:
        return (key, None)
    if is_lazy(t):  # an uninitialised parameter of a lazy module: it has no shape yet
        return (key, id(t), "lazy")
    if grad:
        return (key, id(t), t.requires_grad, t.dtype, t.device, t.shape)
    return (key, id(t), t.dtype, t.device, t.shape)


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """The tree as the module docstring lists it (one walk)."""
    out: list[Any] = []
    for prefix, m in model.named_modules(remove_duplicate=False):
        params = tuple(_entry(k, p, True) for k, p in m._parameters.items())
        buffers = tuple(_entry(k, b, False) for k, b in m._buffers.items())
        norm = getattr(m, "track_running_stats", None) if isinstance(m, _NormBase) else None
        out.append((prefix, id(m), type(m), m.training, norm, params, buffers))
    return tuple(out)


class ModelStructure:
    """The tree-derived facts of one model (module docstring); build with
    :func:`model_structure`."""

    def __init__(self, model: nn.Module, key: tuple[Any, ...]) -> None:
        self.key = key
        modules = list(model.modules())
        #: ``model.named_parameters()`` (tied parameters once, under their first name)
        self.named_parameters: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.parameters: tuple[nn.Parameter, ...] = tuple(self.named_parameters.values())
        self.param_names: tuple[str, ...] = tuple(self.named_parameters)
        self.named_buffers: tuple[tuple[str, torch.Tensor], ...] = tuple(model.named_buffers())
        # weakly held (module docstring): ``modules`` and ``param_modules`` resolve them
        self._modules = tuple(weakref.ref(m) for m in modules)
        self._param_modules = tuple(
            weakref.ref(m) for m in modules if any(t is not None for t in m._parameters.values())
        )
        devices: dict[torch.device, None] = {}
        for t in [*self.parameters, *(b for _, b in self.named_buffers)]:
            devices.setdefault(t.device, None)
        self.devices: list[torch.device] = list(devices) or [torch.device("cpu")]
        self.batch_statistics = any(isinstance(m, _BatchNorm) and m.training for m in modules)
        #: modules whose running statistics a functional call replaces by ``None``
        self.batch_stat_modules: frozenset[str] = frozenset(
            name
            for name, m in model.named_modules()
            if isinstance(m, _NormBase) and m.training and m.track_running_stats
        )
        named = [*self.named_parameters.items(), *self.named_buffers]
        self.meta: tuple[str, ...] = tuple(
            name for name, t in named if not is_lazy(t) and t.is_meta
        )
        self._groups: dict[Hashable, GroupIndex] = {}
        #: :func:`~layerwise.sensitivity.functional.slot_paths`: where each tensor sits
        self.slot_paths: dict[str, tuple[SlotPath, ...]] = slot_paths(model)

    def alive(self) -> bool:
        """Whether every fingerprinted submodule still lives (else an identity in the key may
        now belong to a new object)."""
        return all(r() is not None for r in self._modules)

    @property
    def modules(self) -> list[nn.Module]:
        """``model.modules()``."""
        return [r() for r in self._modules]  # type: ignore[misc]

    @property
    def param_modules(self) -> list[nn.Module]:
        """The modules that own parameters directly (those the per-example norms hook)."""
        return [r() for r in self._param_modules]  # type: ignore[misc]

    def groups(self, model: nn.Module, groups: Mapping[str, Iterable[str]] | None) -> GroupIndex:
        """``resolve_groups(model, groups)``, cached per mapping (a mapping of strings to
        lists or tuples of strings; anything else is resolved afresh, errors included)."""
        key = _groups_key(groups)
        if key is None:
            return resolve_groups(model, groups)
        index = self._groups.get(key)
        if index is None:
            index = resolve_groups(model, groups)  # raises on a bad mapping: nothing cached
            if len(self._groups) >= GROUPS_KEPT:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = index
        return index


def _groups_key(groups: Any) -> Hashable | None:
    if groups is None:
        return ("default",)
    if type(groups) is not dict:  # other mappings may compute their items: not cached
        return None
    items = []
    for name, names in groups.items():
        if type(name) is not str or type(names) not in (list, tuple):
            return None
        if not all(type(n) is str for n in names):
            return None
        items.append((name, tuple(names)))
    return ("groups", tuple(items))


def model_structure(model: nn.Module) -> ModelStructure:
    """The :class:`ModelStructure` of ``model`` as its tree is now (module docstring)."""
    key = _fingerprint(model)
    found = _CACHE.get(model)
    if found is not None and found.key == key and found.alive():
        return found
    made = ModelStructure(model, key)
    _CACHE[model] = made
    return made
