"""Random probe vectors for Hutchinson's estimator, from a dedicated generator.

A probe v has independent entries with E[v] = 0 and E[v vᵀ] = I, so that
E[vᵀ A v] = tr(A) for any square A (Hutchinson 1990):

* ``"rademacher"``: entries ±1 with probability 1/2; Var[vᵀ A v] = 2 (‖A‖_F² − Σ_i A_ii²)
  for symmetric A, the smallest of any distribution, and zero when A is diagonal. Drawn
  eight at a time: one uniform byte (``torch.randint(0, 256)``, exact: 256 divides the
  generator's 2^32 outcomes) picks a row of the 256 × 8 table of sign patterns, so every
  bit is an independent fair coin; one random draw per eight entries and one gather make
  it about 4x faster than thresholding ``torch.rand`` on a CPU, which matters because a
  probe costs O(parameters) to draw (32 probes of a 134k-parameter MLP took about as long
  as five forward+backward passes).
* ``"gaussian"``: entries N(0, 1); Var[vᵀ A v] = 2 ‖A‖_F².

Probes come from a ``torch.Generator`` on the parameters' device, never from the global
RNG: estimates are reproducible from a seed, the user's random stream is not consumed,
and on CUDA the draws stay on the device (no host transfer).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["DISTRIBUTIONS", "draw_probes", "make_generator"]

DISTRIBUTIONS = ("rademacher", "gaussian")


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (an int >= 0)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if seed >= 2**64:  # torch.Generator.manual_seed takes 64-bit seeds
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def draw_probes(
    like: Mapping[str, torch.Tensor],
    count: int,
    generator: torch.Generator,
    distribution: str = "rademacher",
) -> dict[str, torch.Tensor]:
    """``count`` probes shaped like ``like``: ``{name: tensor of shape (count, *shape)}``.

    Drawn on the generator's device, in the order of ``like``, then moved to each
    tensor's device (a no-op for a model on one device).

    >>> g = make_generator("cpu", 0)
    >>> v = draw_probes({"w": torch.zeros(3, 2)}, 4, g)
    >>> v["w"].shape, sorted(v["w"].unique().tolist())
    (torch.Size([4, 3, 2]), [-1.0, 1.0])
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    device = generator.device
    out: dict[str, torch.Tensor] = {}
    if distribution == "rademacher" and like:
        sizes = [count * t.numel() for t in like.values()]
        total = sum(sizes)
        first = next(iter(like.values()))
        signs = _signs(first.dtype if first.is_floating_point() else torch.float32, device)
        draws = torch.randint(0, 256, ((total + 7) // 8,), generator=generator, device=device)
        flat = signs.index_select(0, draws).reshape(-1)[:total]
        for (name, t), part in zip(like.items(), flat.split(sizes), strict=True):
            out[name] = part.reshape(count, *t.shape).to(t.dtype).to(t.device, non_blocking=True)
        return out
    for name, t in like.items():
        v = torch.randn((count, *t.shape), generator=generator, device=device, dtype=t.dtype)
        out[name] = v.to(t.device, non_blocking=True)
    return out


def _signs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row b holds the bits of b as ±1 (bit k of b -> column k)."""
    bits = torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)
    return (bits & 1).to(dtype).mul_(2).sub_(1)
