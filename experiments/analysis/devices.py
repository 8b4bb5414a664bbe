"""Parse ``--device`` and ``--dtype`` into torch objects, refusing what this machine lacks."""

from __future__ import annotations

import torch

from layerwise.experiments.errors import UsageError

__all__ = ["DTYPES", "parse_device", "parse_dtype"]

#: The dtypes ``--dtype`` accepts.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_device(text: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (or any device torch knows) into a
    :class:`torch.device` that exists on this machine.

    ``auto`` is CUDA when available, else CPU.

    >>> parse_device("cpu")
    device(type='cpu')
    """
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"--device must be a device name such as 'cpu' or 'cuda:0', got {text!r}")
    name = text.strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(
            f"--device {text!r} is not a device torch knows (try 'auto', 'cpu', 'cuda', "
            "'cuda:0' or 'mps')"
        ) from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {text!r}: this machine has {count} CUDA device(s), "
                f"indices 0..{count - 1}"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {text!r}: MPS is not available on this machine")
        return device
    try:  # any other backend: it exists if a tensor can be made on it
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {text!r} is not available on this machine") from exc
    return device


def parse_dtype(text: str) -> torch.dtype:
    """Turn ``float32`` or ``float64`` into a torch dtype.

    >>> parse_dtype("float64")
    torch.float64
    """
    try:
        return DTYPES[text]
    except (KeyError, TypeError):
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {text!r}") from None
