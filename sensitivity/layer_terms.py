"""What one call of a layer contributes to each example's gradient, per layer type.

For a layer with input x and output y = f(x; θ), the gradient of a loss ℓ_i that depends
on example i only through row i of y is ∂ℓ_i/∂θ = Σ_t ∂y_it/∂θ ᵀ δ_it with δ_it = ∂ℓ_i/∂y_it
(t runs over the positions of a sequence or an image). For the layers below it factorises
(Goodfellow 2015, "Efficient per-example gradient computations"; BackPACK's
``BatchL2Grad``), and a call's contribution is one of three *terms*:

* :class:`Outer` -- g_i = Σ_t a_it ⊗ b_it in K blocks: ``Linear`` weight (a = δ, b = x,
  K = 1; T = the positions of a sequence input, 1 without), ``Conv1d``/``Conv2d`` weight
  (a = δ, b = the input patch (im2col, one strided copy), K = groups, the weight reshaped to
  (K, out/K, in/K · kernel));
* :class:`Index` -- g_i = Σ_t e_{id_it} ⊗ b_it: ``Embedding`` weight (id the token, b = δ;
  positions at ``padding_idx`` get no gradient and are zeroed);
* :class:`Direct` -- the per-example gradient itself, small as the parameter: biases
  (Σ_t δ_it) and the affine weights of normalisation layers (Σ_t δ_it ⊙ x̂_it, x̂ the
  normalised input) of ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` in eval
  mode (running statistics; in training mode examples interact and no layer is covered).

A layer is covered only if its class keeps the stock ``forward`` (a subclass that
overrides it is not), its input and output lead with the B examples, and it has none of
the options that mix examples or edit weights (``Embedding`` with ``max_norm``,
``scale_grad_by_freq`` or ``sparse``). :func:`spec_for` gives the handler or ``None``.
Units: δ is whatever gradient reaches the output (the caller scales it).

A ``Linear`` on a sequence: example i's weight gradient is Σ_t δ_it x_itᵀ.

>>> layer, x, delta = nn.Linear(3, 2), torch.randn(4, 5, 3), torch.randn(4, 5, 2)
>>> spec = spec_for(layer, x, 4)
>>> terms = spec.terms(layer, spec.save(layer, x), delta)
>>> a, b = terms["weight"].make(0, 4)  # (4, 1, 5, 2) and (4, 1, 5, 3)
>>> torch.allclose((a.transpose(-1, -2) @ b)[:, 0], delta.transpose(1, 2) @ x)
True
>>> spec_for(layer, torch.randn(5, 3), 4) is None  # the input does not lead with 4 examples
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LINEAR", "Direct", "Index", "LayerSpec", "Outer", "spec_for"]

Maker = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Outer:
    """g_i = Σ_t a_it ⊗ b_it per block; ``make(s, e)`` gives examples s:e as
    a (e−s, K, T, rows) and b (e−s, K, T, cols). ``inputs(s, e)``, when given, is b alone
    and ``outputs(s, e)`` a alone (b depends on the layer's input only, a on its output
    gradient: a caller with several output gradients of one forward pass reuses b)."""

    blocks: int
    rows: int
    cols: int
    length: int
    make: Maker
    inputs: Callable[[int, int], torch.Tensor] | None = None
    outputs: Callable[[int, int], torch.Tensor] | None = None


@dataclass(frozen=True)
class Index:
    """g_i = Σ_t e_{id_it} ⊗ b_it; ``make(s, e)`` gives ids (e−s, T) and b (e−s, T, cols)."""

    rows: int
    cols: int
    length: int
    make: Maker


@dataclass(frozen=True)
class Direct:
    """The per-example gradient (B, *shape) itself."""

    grad: torch.Tensor


Term = Outer | Index | Direct


@dataclass(frozen=True)
class LayerSpec:
    """``save(module, x)`` keeps what the terms need from the input (detached);
    ``terms(module, saved, delta)`` maps local parameter names to terms."""

    save: Callable[[nn.Module, torch.Tensor], Any]
    terms: Callable[[nn.Module, Any, torch.Tensor], dict[str, Term]]


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(B, *, d) -> (B, T, d)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _linear_terms(m: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict[str, Term]:
    a, b = _positions(delta), _positions(x)

    def make(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return a[s:e].unsqueeze(1), b[s:e].unsqueeze(1)

    out: dict[str, Term] = {"weight": Outer(1, a.shape[2], b.shape[2], a.shape[1], make)}
    out["bias"] = Direct(a.sum(1))
    return out


def _conv_save(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input, padded as the layer pads it (zeros, or the layer's ``padding_mode``)."""
    dims = x.dim() - 2
    if isinstance(m.padding, str):  # "valid" or "same" (stride 1): as F.conv pads
        pads = [0] * (2 * dims)
        if m.padding == "same":
            for d in range(dims):
                total = m.dilation[d] * (m.kernel_size[d] - 1)
                left = total // 2
                pads[2 * (dims - 1 - d)], pads[2 * (dims - 1 - d) + 1] = left, total - left
    else:
        pads = [p for p in reversed(m.padding) for _ in range(2)]
    if any(pads):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pads, mode=mode)
    return x


def _patches(x: torch.Tensor, kernel, dilation, stride, out: tuple[int, ...]) -> torch.Tensor:
    """im2col of a padded (n, C, H, W) input: (n, C·kh·kw, Ho·Wo) in ``F.unfold``'s order,
    by one strided copy (several times faster than ``F.unfold`` on a CPU)."""
    x = x.contiguous()
    sn, sc, sh, sw = x.stride()
    view = x.as_strided(
        (x.shape[0], x.shape[1], kernel[0], kernel[1], out[0], out[1]),
        (sn, sc, dilation[0] * sh, dilation[1] * sw, stride[0] * sh, stride[1] * sw),
    )
    return view.reshape(x.shape[0], -1, out[0] * out[1])


def _conv_terms(m: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict[str, Term]:
    one_d = x.dim() == 3
    kernel = (1, *m.kernel_size) if one_d else m.kernel_size
    dilation = (1, *m.dilation) if one_d else m.dilation
    stride = (1, *m.stride) if one_d else m.stride
    out = (1, delta.shape[2]) if one_d else tuple(delta.shape[2:])
    k = m.groups
    length = delta[0, 0].numel()
    rows, cols = m.out_channels // k, m.weight.shape[1:].numel()

    def inputs(s: int, e: int) -> torch.Tensor:
        xs = x[s:e].unsqueeze(2) if one_d else x[s:e]
        patches = _patches(xs, kernel, dilation, stride, out)  # (c, Cin·k, L)
        return patches.reshape(e - s, k, cols, length).transpose(2, 3)

    def outputs(s: int, e: int) -> torch.Tensor:
        return delta[s:e].reshape(e - s, k, rows, length).transpose(2, 3)

    def make(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = inputs(s, e)
        return outputs(s, e), b

    flat = delta.reshape(delta.shape[0], delta.shape[1], -1)
    weight = Outer(k, rows, cols, length, make, inputs, outputs)
    return {"weight": weight, "bias": Direct(flat.sum(2))}


def _embedding_save(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return ids.reshape(ids.shape[0], -1)


def _embedding_terms(m: nn.Module, ids: torch.Tensor, delta: torch.Tensor) -> dict[str, Term]:
    b = delta.reshape(ids.shape[0], ids.shape[1], -1)
    if m.padding_idx is not None:  # the padding row gets no gradient
        b = b * (ids != m.padding_idx).unsqueeze(-1).to(b.dtype)

    def make(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ids[s:e], b[s:e]

    return {"weight": Index(m.num_embeddings, b.shape[2], ids.shape[1], make)}


def _affine_terms(x_hat: torch.Tensor, delta: torch.Tensor, channel_dims: int) -> dict[str, Term]:
    """Weight Σ δ ⊙ x̂ and bias Σ δ over the dims that are neither the example dim nor the
    parameter's ``channel_dims`` (trailing for LayerNorm, dim 1 for Group/BatchNorm)."""
    if channel_dims < 0:  # the parameter spans dims 1..-channel_dims of the channel axis
        over = tuple(range(2, delta.dim()))
    else:
        over = tuple(range(1, delta.dim() - channel_dims))
    weight = (delta * x_hat).sum(over) if over else delta * x_hat
    bias = delta.sum(over) if over else delta
    return {"weight": Direct(weight), "bias": Direct(bias)}


def _layer_norm_save(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


def _rms_norm_save(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, m.normalized_shape, None, m.eps)


def _trailing(m: nn.Module, x_hat: torch.Tensor, delta: torch.Tensor) -> dict[str, Term]:
    return _affine_terms(x_hat, delta, len(m.normalized_shape))


def _group_norm_save(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, m.num_groups, None, None, m.eps)


def _batch_norm_save(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def _channels(m: nn.Module, x_hat: torch.Tensor, delta: torch.Tensor) -> dict[str, Term]:
    return _affine_terms(x_hat, delta, -1)


def _keep(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


#: The handler of ``Linear`` (its per-example norms have a shortcut without positions:
#: :func:`layerwise.sensitivity.outer_norms.linear_sq_norms_and_dots`).
LINEAR = LayerSpec(_keep, _linear_terms)
_CONV = LayerSpec(_conv_save, _conv_terms)
_EMBEDDING = LayerSpec(_embedding_save, _embedding_terms)
_LAYER_NORM = LayerSpec(_layer_norm_save, _trailing)
_RMS_NORM = LayerSpec(_rms_norm_save, _trailing)
_GROUP_NORM = LayerSpec(_group_norm_save, _channels)
_BATCH_NORM = LayerSpec(_batch_norm_save, _channels)


def _stock(m: nn.Module, base: type[nn.Module], *methods: str) -> bool:
    return isinstance(m, base) and all(
        getattr(type(m), name) is getattr(base, name) for name in ("forward", *methods)
    )


def spec_for(module: nn.Module, x: Any, size: int) -> LayerSpec | None:
    """The handler of ``module`` called on ``x`` with ``size`` examples, or ``None`` when
    the call is not covered (see the module docstring)."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == size):
        return None
    floating = x.is_floating_point()
    if _stock(module, nn.Linear):
        return LINEAR if floating and x.dim() >= 2 else None
    for base, dims in ((nn.Conv1d, 3), (nn.Conv2d, 4)):
        if _stock(module, base, "_conv_forward"):
            return _CONV if floating and x.dim() == dims else None
    if _stock(module, nn.Embedding):
        m: Any = module
        plain = m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
        return _EMBEDDING if plain and not floating else None
    if not floating or x.dim() < 2:
        return None
    if _stock(module, nn.LayerNorm):
        return _LAYER_NORM
    if hasattr(nn, "RMSNorm") and _stock(module, nn.RMSNorm):
        return _RMS_NORM
    if _stock(module, nn.GroupNorm):
        return _GROUP_NORM
    if _stock(module, nn.modules.batchnorm._BatchNorm):
        m = module
        eval_stats = not m.training and m.running_mean is not None and m.running_var is not None
        return _BATCH_NORM if eval_stats else None
    return None
