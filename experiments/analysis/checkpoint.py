"""``--checkpoint``: load a state dict safely, check that it fits the model, and that the
weights are finite.

A checkpoint is a state dict (``{name: tensor}``) or a dict holding one under one of
:data:`STATE_DICT_KEYS`. It is read with ``torch.load(..., weights_only=True)``, so a file that
would run code when unpickled is refused. A state dict saved from a ``DataParallel`` or
``DistributedDataParallel`` wrapper (every key prefixed ``module.``) is unwrapped when the
model's own keys carry no such prefix. Every problem is one
:class:`~layerwise.experiments.errors.UsageError` line naming ``--checkpoint`` and the path.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from layerwise.experiments.errors import UsageError, first_line

__all__ = ["STATE_DICT_KEYS", "check_finite_weights", "load_weights"]

#: Keys under which a checkpoint dict may hold the model's state dict, tried in this order.
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network")


def _listed(items: list[str], sep: str = ", ", shown: int = 6) -> str:
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def _is_state_dict(obj: Any) -> bool:
    tensors = isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())
    return tensors and bool(obj) and all(isinstance(k, str) for k in obj)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _unpickle(path: str, where: str) -> Any:
    """``torch.load(path, weights_only=True)``, its refusals and failures as one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage bytes make the unpickler fail in any way
        text = str(exc)
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
        if found:
            raise UsageError(
                f"{where} holds a {found.group(1)} object, which weights_only=True refuses to "
                "unpickle; save the model's state_dict() instead"
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = detail.group(1).strip() if detail else first_line(exc).split(". ")[0]
        raise UsageError(f"{where} is not a readable torch checkpoint ({reason})") from exc


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict in the file at ``path`` and its manifest entry: absolute path, SHA-256
    of the bytes, the key it sat under (None: top level) and the number of tensors."""
    where = f"--checkpoint {path!r}"
    if not os.path.exists(path):
        raise UsageError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{where} is not a file")
    obj = _unpickle(path, where)
    if _is_state_dict(obj):
        key = None
    elif isinstance(obj, dict):
        key = next((k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None:
            raise UsageError(
                f"{where} holds a dict with no state dict in it (top-level keys "
                f"{[str(k) for k in obj][:6]}; expected tensors by parameter name, or one "
                f"under {list(STATE_DICT_KEYS)})"
            )
    else:
        raise UsageError(f"{where} holds a {type(obj).__name__}, not a state dict")
    state = dict(obj if key is None else obj[key])
    entry = {"path": os.path.abspath(path), "sha256": _sha256(path), "key": key}
    return state, {**entry, "tensors": len(state)}


def load_weights(model: nn.Module, path: str) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``model`` strictly, unwrapping a ``module.`` prefix
    (above); returns its manifest entry. On a mismatch name the missing keys (in the model
    only), the unexpected keys (in the checkpoint only) and the shape mismatches, on one line."""
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    state, entry = _read(path)
    own = model.state_dict()
    if not any(k.startswith("module.") for k in own):
        consume_prefix_in_state_dict_if_present(state, "module.")
    missing = sorted(repr(k) for k in own.keys() - state.keys())
    unexpected = sorted(repr(k) for k in state.keys() - own.keys())
    shapes = [
        f"{k!r} checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [f"missing keys [{_listed(missing)}]"] if missing else []
    problems += [f"unexpected keys [{_listed(unexpected)}]"] if unexpected else []
    problems += [f"shape mismatch {_listed(shapes, sep='; ')}"] if shapes else []
    if problems:
        raise UsageError(f"--checkpoint {path!r} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return entry


def check_finite_weights(model: nn.Module, *, source: str) -> None:
    """Refuse a model with a NaN or an infinity in a parameter or floating buffer, naming
    each such tensor and ``source``, where the weights came from."""
    bad = []
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{name!r} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} inf)")
    if bad:
        raise UsageError(f"{source} gives non-finite weights: {_listed(bad)}")
