"""Load a checkpoint safely and check that it fits the model and holds finite weights.

A checkpoint is a state dict (``{name: tensor}``), or a dict holding one under one of
:data:`STATE_DICT_KEYS` (what training scripts commonly save). It is read with
``torch.load(..., weights_only=True)``, so a file that would run code on unpickling is refused.
A state dict saved from a ``DistributedDataParallel``/``DataParallel`` wrapper (every key
prefixed ``module.``) is unwrapped when the model's own keys carry no such prefix.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerwise.experiments.errors import UsageError

__all__ = [
    "STATE_DICT_KEYS",
    "LoadedCheckpoint",
    "apply_checkpoint",
    "check_finite_weights",
    "load_checkpoint",
    "sha256_file",
]

#: Keys under which a checkpoint dict may hold the model's state dict, tried in this order.
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network")

_SHOWN = 6  # names listed in a message before "(+N more)"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A state dict read from ``path``; ``key`` is where it sat in the file (None: top level)."""

    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    key: str | None = None
    stripped_prefix: str | None = None

    def manifest(self) -> dict[str, Any]:
        return {
            "path": os.path.abspath(self.path),
            "sha256": self.sha256,
            "key": self.key,
            "stripped_prefix": self.stripped_prefix,
            "tensors": len(self.state_dict),
        }


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _names(names: list[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return "[" + ", ".join(repr(n) for n in names[:_SHOWN]) + "]" + more


def _sentence(text: str) -> str:
    """The first sentence of the first line of ``text`` (torch's messages run long)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Read ``path`` with ``weights_only=True`` and find the state dict in it.

    Raises :class:`~layerwise.experiments.errors.UsageError` (naming ``--checkpoint`` and the path)
    when the file is missing, unreadable, corrupt, holds objects other than tensors and plain
    containers, or holds no state dict.
    """
    where = f"--checkpoint {str(path)!r}"
    if not os.path.exists(path):
        raise UsageError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{where} is not a file")
    try:
        sha = sha256_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise UsageError(
                f"{where} holds a {found.group(1)} object, which weights_only=True refuses to "
                "unpickle; save the model's state_dict() instead"
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = detail.group(1).strip() if detail else _sentence(text)
        raise UsageError(f"{where} is not a readable torch checkpoint ({reason})") from exc
    except Exception as exc:  # garbage bytes make the unpickler fail in any way
        reason = f"{type(exc).__name__}: {_sentence(str(exc))}".rstrip(": ")
        raise UsageError(f"{where} is not a readable torch checkpoint ({reason})") from exc
    if _is_state_dict(obj):
        return LoadedCheckpoint(str(path), sha, dict(obj))
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return LoadedCheckpoint(str(path), sha, dict(obj[key]), key=key)
        keys = [str(k) for k in obj][:_SHOWN]
        raise UsageError(
            f"{where} holds a dict with no state dict in it (top-level keys {keys}; expected "
            f"tensors by parameter name, or one under {list(STATE_DICT_KEYS)})"
        )
    raise UsageError(f"{where} holds a {type(obj).__name__}, not a state dict")


def _strip_wrapper_prefix(
    ckpt: LoadedCheckpoint, model_keys: set[str], prefix: str = "module."
) -> LoadedCheckpoint:
    keys = set(ckpt.state_dict)
    if keys == model_keys or not all(k.startswith(prefix) for k in keys):
        return ckpt
    if any(k.startswith(prefix) for k in model_keys):
        return ckpt
    stripped = {k[len(prefix) :]: v for k, v in ckpt.state_dict.items()}
    return LoadedCheckpoint(ckpt.path, ckpt.sha256, stripped, ckpt.key, stripped_prefix=prefix)


def apply_checkpoint(model: nn.Module, ckpt: LoadedCheckpoint) -> LoadedCheckpoint:
    """Load ``ckpt`` into ``model`` strictly; returns the checkpoint as applied.

    On a mismatch raises :class:`~layerwise.experiments.errors.UsageError` naming the missing keys
    (in the model, not in the checkpoint), the unexpected keys (in the checkpoint, not in the model)
    and any shape mismatches, all on one line.
    """
    own = model.state_dict()
    ckpt = _strip_wrapper_prefix(ckpt, set(own))
    theirs = ckpt.state_dict
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f"{k!r} checkpoint {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if shapes:
        more = f" (+{len(shapes) - _SHOWN} more)" if len(shapes) > _SHOWN else ""
        problems.append("shape mismatch " + "; ".join(shapes[:_SHOWN]) + more)
    if problems:
        raise UsageError(
            f"--checkpoint {ckpt.path!r} does not match the model: " + "; ".join(problems)
        )
    model.load_state_dict(theirs, strict=True)
    return ckpt


def check_finite_weights(model: nn.Module, *, source: str) -> None:
    """Raise :class:`~layerwise.experiments.errors.UsageError` naming every parameter or floating
    buffer of ``model`` that holds a NaN or an infinity; ``source`` says where the weights came from
    (e.g. ``"--checkpoint 'x.pt'"``)."""
    bad = []
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            inexact = tensor.is_floating_point() or tensor.is_complex()
            if inexact and not bool(torch.isfinite(tensor).all()):
                nans = int(torch.isnan(tensor).sum())
                infs = int(torch.isinf(tensor).sum())
                bad.append(f"{name!r} ({nans} NaN, {infs} inf)")
    if bad:
        more = f" (+{len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
        raise UsageError(f"{source} gives non-finite weights: " + ", ".join(bad[:_SHOWN]) + more)
