r"""Depth units: the layers of a model from input to output, found from its module paths.

A **block** is a repeated numbered module that contains layers of its own: a module at
a path ending in a number (``layers.3``, ``encoder.layer.11``, ``blocks.0``) whose children
own parameters and whose class occurs at two or more such paths in the model. A parameter
belongs to the block at the first such prefix of its name. So a numbered *leaf* (``stem.0``,
a Conv2d inside an ``nn.Sequential``) is no block and a Sequential stem stays one unit, and
a one-off numbered wrapper (``nn.Sequential(embedding, encoder, norm, head)``) is looked
through to the repeated layers inside it. Nested repeats (stages of blocks) give the outer
level; the ``blocks`` option replaces the rule by patterns that fully match block paths
(``blocks=r"stages\.\d+\.blocks\.\d+"``).

What it finds on the common model families (tested on each, ``tests/zoo``): torchvision's
and timm's ResNets give ``conv1``/``bn1`` as the stem, their blocks ``layer1.0`` ..
``layer4.1`` (the fine grouping of timm's ``group_matcher``; ``blocks=r"layer\d+"`` gives
the four stages) and ``fc`` as the head; timm's ViT ``cls_token``, ``pos_embed`` and
``patch_embed`` as the stem, ``blocks.N``, ``norm``, ``head``; timm's staged models
(``stages.N.blocks.M``) their stages; Hugging Face BERT ``bert.embeddings``,
``bert.encoder.layer.N``, ``bert.pooler.dense``, ``classifier``; GPT-2 ``transformer.wte`` and
``wpe``, ``transformer.h.N``, ``transformer.ln_f`` (its ``lm_head`` is tied to ``wte``, so it is
the head only when ``head=`` names it); Llama-style decoders ``model.embed_tokens``,
``model.layers.N``, ``model.norm``, ``lm_head``.

Units, in registration order (the order of ``named_parameters()``):

* when the model has blocks: everything before the first block is ``stem``; each block is
  ``layer.<i>`` (``i`` counts blocks from 0); a run of parameters between or after blocks
  is one unit named after its modules' common path (``encoder.norm``);
* when it has none: each module owning parameters is ``layer.<i>``, a normalisation
  module joining the layer before it (``Linear`` + ``BatchNorm1d`` is one layer);
* the head, if any, is ``head``, always last (also when a tied head's shared weight was
  registered first, by the input embedding).

Frozen parameters count: unit names and order are those of the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from layerwise.policies.grouping_rules import ModelParams, Pattern, is_norm_module, list_names

__all__ = ["DepthUnits", "block_finder", "depth_units", "merge_units"]


@dataclass(frozen=True)
class DepthUnits:
    """``names[k]`` is unit ``k`` (0 = nearest the input); ``unit_of[param] = k``."""

    names: tuple[str, ...]
    unit_of: dict[str, int]


def block_finder(
    model: nn.Module, blocks: tuple[Pattern, ...] | None = None
) -> Callable[[str], str | None]:
    """Return ``block_of(parameter name) -> block path or None``."""
    if blocks:

        def block_of_pattern(name: str) -> str | None:
            path = name.rpartition(".")[0]
            for pattern in blocks:
                prefix = pattern.prefix(path) if path else None
                if prefix is not None:
                    return prefix
            return None

        return block_of_pattern

    blocks_found: set[str] = set()
    kinds: dict[type, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        numbered = path.rpartition(".")[2].isdigit()
        if numbered and any(any(True for _ in c.parameters()) for c in module.children()):
            kinds.setdefault(type(module), []).append(path)
    for paths in kinds.values():
        if len(paths) >= 2:  # a repeated kind of numbered module with layers inside: a block
            blocks_found.update(paths)

    def is_block(path: str) -> bool:
        return path in blocks_found

    def block_of_auto(name: str) -> str | None:
        parts = name.split(".")[:-1]
        for i, part in enumerate(parts):
            if part.isdigit() and is_block(".".join(parts[: i + 1])):
                return ".".join(parts[: i + 1])
        return None

    return block_of_auto


def _common_name(paths: list[str]) -> str:
    """The common dotted prefix of module paths, else their distinct first components."""
    split = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for tokens in zip(*split, strict=False):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    if common:
        return ".".join(common)
    tops = dict.fromkeys(p.split(".")[0] if p else "(root)" for p in paths)
    return "+".join(tops)


def depth_units(
    model: nn.Module,
    params: ModelParams,
    head: tuple[str, ...],
    block_of: Callable[[str], str | None],
) -> DepthUnits:
    """Split every parameter of ``params`` into depth units (see the module docstring)."""
    head_set = set(head)
    body = [n for n in params.names if n not in head_set]
    block = {n: block_of(n) for n in body}
    keys: dict[str, tuple] = {}  # parameter -> unit key
    if any(b is not None for b in block.values()):
        gap = -1
        for i, name in enumerate(body):
            if block[name] is not None:
                keys[name] = ("block", block[name])
            else:
                if i == 0 or block[body[i - 1]] is not None:
                    gap += 1
                keys[name] = ("gap", gap)
    else:
        last: tuple | None = None
        unit_of_path: dict[str, tuple] = {}
        for name in body:
            path = params.modules[name]
            if path not in unit_of_path:
                joins = last is not None and is_norm_module(model.get_submodule(path))
                unit_of_path[path] = last if joins else ("module", path)
            keys[name] = last = unit_of_path[path]
    order = list(dict.fromkeys(keys.values()))
    names: list[str] = []
    blocks_seen = 0
    for k, key in enumerate(order):
        if key[0] == "gap" and k == 0:
            names.append("stem")
        elif key[0] == "gap":
            members = [params.modules[n] for n in body if keys[n] == key]
            names.append(_common_name(list(dict.fromkeys(members))))
        else:
            names.append(f"layer.{blocks_seen}")
            blocks_seen += 1
    names = _unique(names, reserved={"head"} if head_set else set())
    if head_set:
        order.append(("head",))
        names.append("head")
        keys.update(dict.fromkeys(head, ("head",)))
    index = {key: k for k, key in enumerate(order)}
    return DepthUnits(names=tuple(names), unit_of={n: index[keys[n]] for n in params.names})


def _unique(names: list[str], reserved: set[str]) -> list[str]:
    """Make names unique by numbering repeats ``name#2``; a reserved name is never kept."""
    seen: dict[str, int] = dict.fromkeys(reserved, 1)
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _range_name(first: str, last: str) -> str:
    a, b = re.fullmatch(r"(.*\.)(\d+)", first), re.fullmatch(r"(.*\.)(\d+)", last)
    if a and b and a[1] == b[1]:
        return f"{first}-{b[2]}"
    return f"{first}-{last}"


def merge_units(split: list[tuple[str, list[str]]], num_groups: int) -> list[tuple[str, list[str]]]:
    """Merge contiguous ``(unit name, parameters)`` into ``num_groups`` groups.

    The groups are as even in unit count as possible, the first ones taking one more unit
    when the count does not divide. A merged group is named by its first and last units.

    >>> merge_units([("stem", ["a"]), ("layer.0", ["b"]), ("layer.1", ["c"])], 2)
    [('stem-layer.0', ['a', 'b']), ('layer.1', ['c'])]
    >>> _range_name("layer.0", "layer.3")
    'layer.0-3'
    """
    if num_groups > len(split):
        raise ValueError(
            f"num_groups={num_groups} exceeds the {len(split)} trainable layer(s) of this model "
            f"({list_names([name for name, _ in split], 8)})"
        )
    size, extra = divmod(len(split), num_groups)
    out, start = [], 0
    for k in range(num_groups):
        chunk = split[start : start + size + (k < extra)]
        start += len(chunk)
        name = chunk[0][0] if len(chunk) == 1 else _range_name(chunk[0][0], chunk[-1][0])
        out.append((name, [n for _, members in chunk for n in members]))
    return out
