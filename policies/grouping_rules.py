"""How :func:`layerwise.policies.group_parameters` reads a model: names, ties, patterns, heads,
norms.

Everything here is a pure read of ``model.named_parameters()`` and ``model.named_modules()``
in registration order; nothing is run through the model.

Conventions
-----------
* A parameter is named by its **first** name in ``named_parameters()`` (the canonical
  name); later names of the same tensor (tied weights, shared modules) are *aliases*.
* A **pattern** is a regular expression (``syntax="regex"``, matched with
  :func:`re.search` anywhere in the name) or a shell glob (``syntax="glob"``, matched with
  :func:`fnmatch.fnmatchcase` against the full name or any dotted prefix of it, so
  ``"head"`` matches ``"head.weight"``).
* The default **head** is the last module that owns parameters, when it is Linear-like
  (``nn.Linear``, ``nn.Bilinear`` or a 1x1 convolution) and not inside a block.
* **No weight decay** applies to the parameters of normalisation modules and to biases
  (the last name component is ``bias`` or ends with ``_bias``), the usual split
  (Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019; timm, nanoGPT).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "SYNTAXES",
    "ModelParams",
    "Pattern",
    "compile_patterns",
    "find_default_head",
    "is_bias",
    "is_linear_like",
    "is_norm_module",
    "list_names",
    "read_parameters",
]

SYNTAXES = ("regex", "glob")

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_NORM_NAME = re.compile(r"Norm(\d+d?|\d*d)?$")  # LlamaRMSNorm, T5LayerNorm, GroupNorm32, ...


def list_names(names: Iterable[str], limit: int = 5) -> str:
    """Quote up to ``limit`` names for an error message: ``'a', 'b' and 3 more``."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


@dataclass(frozen=True)
class ModelParams:
    """The parameters of a model, once each, in ``named_parameters()`` order.

    ``names``: canonical names; ``tensors``: name -> parameter; ``modules``: name -> owning
    module path (``""`` for the root); ``trainable``: names with ``requires_grad``;
    ``frozen``: the others; ``tied``: alias -> canonical name.
    """

    names: tuple[str, ...]
    tensors: dict[str, nn.Parameter]
    modules: dict[str, str]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    tied: dict[str, str]


def read_parameters(model: nn.Module) -> ModelParams:
    """Read every parameter of ``model`` once, under its first name; record aliases."""
    seen: dict[int, str] = {}
    tensors: dict[str, nn.Parameter] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(param), name)
        if first != name:
            tied[name] = first
        else:
            tensors[name] = param
    names = tuple(tensors)
    return ModelParams(
        names=names,
        tensors=tensors,
        modules={n: n.rpartition(".")[0] for n in names},
        trainable=tuple(n for n in names if tensors[n].requires_grad),
        frozen=tuple(n for n in names if not tensors[n].requires_grad),
        tied=tied,
    )


@dataclass(frozen=True)
class Pattern:
    """One compiled name pattern; ``source`` is what the user wrote."""

    source: str
    syntax: str
    matches: Callable[[str], bool]

    def prefix(self, name: str) -> str | None:
        """The shortest dotted prefix of ``name`` that this pattern matches in full."""
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            candidate = ".".join(parts[:end])
            if self._full(candidate):
                return candidate
        return None

    def _full(self, text: str) -> bool:
        if self.syntax == "glob":
            return fnmatch.fnmatchcase(text, self.source)
        return re.fullmatch(self.source, text) is not None


def _glob_matcher(source: str) -> Callable[[str], bool]:
    def matches(name: str) -> bool:
        parts = name.split(".")
        return any(
            fnmatch.fnmatchcase(".".join(parts[:end]), source) for end in range(1, len(parts) + 1)
        )

    return matches


def compile_patterns(value: object, *, argument: str, syntax: str) -> tuple[Pattern, ...]:
    """Compile a pattern or a sequence of patterns given for ``argument``.

    >>> [p.source for p in compile_patterns(["head", r"\\.bias$"], argument="head", syntax="regex")]
    ['head', '\\\\.bias$']
    >>> compile_patterns("head", argument="head", syntax="glob")[0].matches("head.weight")
    True
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    items = [value] if isinstance(value, (str, re.Pattern)) else value
    if not isinstance(items, Iterable):
        raise TypeError(
            f"{argument} must be a pattern (str) or a sequence of patterns, "
            f"got {type(value).__name__}"
        )
    compiled = []
    for item in items:
        if isinstance(item, re.Pattern):
            if syntax != "regex":
                raise ValueError(
                    f"{argument}: a compiled regex {item.pattern!r} needs syntax='regex'"
                )
            compiled.append(
                Pattern(item.pattern, "regex", lambda n, r=item: r.search(n) is not None)
            )
            continue
        if not isinstance(item, str):
            raise TypeError(f"{argument}: a pattern must be a str, got {type(item).__name__}")
        if not item:
            raise ValueError(f"{argument}: a pattern must not be empty, got {item!r}")
        if syntax == "glob":
            compiled.append(Pattern(item, "glob", _glob_matcher(item)))
            continue
        try:
            regex = re.compile(item)
        except re.error as exc:
            raise ValueError(f"{argument}: invalid regular expression {item!r} ({exc})") from exc
        compiled.append(Pattern(item, "regex", lambda n, r=regex: r.search(n) is not None))
    if not compiled:
        raise ValueError(f"{argument} must name at least one pattern, got {value!r}")
    return tuple(compiled)


def is_norm_module(module: nn.Module) -> bool:
    """True for normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ``*Norm``)."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def is_bias(name: str) -> bool:
    """True when the last name component is ``bias`` or ends with ``_bias``."""
    last = name.rpartition(".")[2]
    return last == "bias" or last.endswith("_bias")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses), ``nn.Bilinear`` and 1x1 convolutions."""
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return True
    conv = nn.modules.conv._ConvNd
    return isinstance(module, conv) and all(k == 1 for k in module.kernel_size)


def find_default_head(
    model: nn.Module, params: ModelParams, block_of: Callable[[str], str | None]
) -> tuple[str | None, tuple[str, ...], str]:
    """The default head: ``(module path, its own parameter names, why)``.

    The head is the last module owning parameters in registration order, if it is
    Linear-like and not inside a block. Otherwise the path is None and ``why`` says why.
    Its parameters are those it owns under their first name: a head tied to an earlier
    module (an output layer sharing the input embedding, GPT-2's ``lm_head``) owns none, so
    the shared weight stays with the module that registered it first, and ``why`` says so
    (``head=`` patterns may name the alias, which moves the shared weight to the head).
    """
    owners = [
        (path, module)
        for path, module in model.named_modules()
        if any(p is not None for p in module._parameters.values())
    ]
    if not owners:
        return None, (), "the model has no parameters"
    path, module = owners[-1]
    shown = repr(path) if path else "the model itself"
    if not is_linear_like(module):
        why = (
            f"the last module owning parameters, {shown} ({type(module).__name__}), "
            "is not Linear-like"
        )
        return None, (), why
    block = block_of(path + ".x")
    if block is not None:
        return None, (), f"the last module owning parameters, {shown}, is inside block {block!r}"
    own = tuple(n for n in params.names if params.modules[n] == path)
    if own:
        return path, own, f"the last Linear-like module {shown}"
    ties = [
        f"{alias!r} is tied to {first!r}"
        for alias, first in params.tied.items()
        if alias.rpartition(".")[0] == path
    ]
    why = (
        f"the last Linear-like module {shown} owns no parameter of its own ({', '.join(ties)}); "
        f"head=[{path!r}] makes the tied weight the head"
    )
    return path, (), why
