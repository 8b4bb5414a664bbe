"""Brute-force references: dense Hessians, per-example gradient loops, exact Hutchinson terms.

Independent of the package's functional machinery: a deep copy of the model with
``torch.func.replace_all_batch_norm_modules_`` (BatchNorm then always normalises with
batch statistics), parameters substituted by ``torch.func.functional_call`` on the model
itself, and plain autograd: ``torch.autograd.functional.hessian`` (double backward, one
row at a time) and ``torch.autograd.grad`` loops.

Not ``torch.func.hessian``: in torch 2.13 it returns a wrong, asymmetric Hessian for
``F.layer_norm`` with affine parameters (``jacrev(jacrev)`` and ``jacfwd(jacfwd)`` alike;
cf. pytorch/pytorch#196700), while ``jvp``/``vjp`` of ``grad`` and plain double backward
agree with finite differences. :func:`dense_hessian` checks the symmetry of its result.
(:func:`dense_ggn` does use ``torch.func.hessian``, but only of the criterion in the
outputs, a cross-entropy or a squared error, not of a model.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch.autograd.functional import hessian
from torch.func import functional_call, replace_all_batch_norm_modules_

from .cases import Case


def _flat_loss(case: Case, names: Sequence[str]):
    model = copy.deepcopy(case.model)
    replace_all_batch_norm_modules_(model)
    own = dict(model.named_parameters())
    shapes = [own[n].shape for n in names]
    sizes = [own[n].numel() for n in names]
    fixed = {n: p.detach() for n, p in own.items() if n not in names}

    def loss(flat: torch.Tensor, x=None, y=None) -> torch.Tensor:
        x = case.inputs if x is None else x
        y = case.targets if y is None else y
        parts = torch.split(flat, sizes)
        values = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return case.criterion(functional_call(model, {**fixed, **values}, (x,)), y)

    flat = torch.cat([own[n].detach().reshape(-1) for n in names])
    return loss, flat, sizes


_CACHE: dict[tuple[str, tuple[str, ...]], tuple[torch.Tensor, list[slice]]] = {}


def dense_hessian(case: Case, names: Sequence[str]) -> tuple[torch.Tensor, list[slice]]:
    """The Hessian of the mean loss w.r.t. ``names`` (flattened in that order) and the slice
    of each name (cached per case name: cases are deterministic)."""
    key = (case.name, tuple(names))
    if key not in _CACHE:
        _CACHE[key] = _dense_hessian(case, names)
    return _CACHE[key]


def _dense_hessian(case: Case, names: Sequence[str]) -> tuple[torch.Tensor, list[slice]]:
    loss, flat, sizes = _flat_loss(case, names)
    h = hessian(loss, flat, vectorize=True)
    assert torch.allclose(h, h.T, atol=1e-10), "reference Hessian is not symmetric"
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return h, [slice(a, b) for a, b in pairwise(bounds)]


def block_traces(case: Case, groups: dict[str, list[str]]) -> dict[str, float]:
    """Exact tr(H_gg) for every group."""
    names = [n for members in groups.values() for n in members]
    h, slices = dense_hessian(case, names)
    where = dict(zip(names, slices, strict=True))
    out = {}
    for g, members in groups.items():
        idx = torch.cat([torch.arange(where[n].start, where[n].stop) for n in members])
        out[g] = h[idx][:, idx].trace().item()
    return out


def per_example_loop(case: Case, names: Sequence[str]) -> torch.Tensor:
    """(B, P): the gradient of each example's loss, one ``autograd.grad`` call per example."""
    loss, flat, _ = _flat_loss(case, names)
    rows = []
    for i in range(case.inputs.shape[0]):
        theta = flat.clone().requires_grad_(True)
        value = loss(theta, case.inputs[i : i + 1], case.targets[i : i + 1])
        rows.append(torch.autograd.grad(value, theta)[0])
    return torch.stack(rows)


def exact_trace_sigma(grads: torch.Tensor) -> float:
    """tr of the unbiased sample covariance of the rows of ``grads``."""
    centred = grads - grads.mean(0)
    return (centred.square().sum() / (grads.shape[0] - 1)).item()


def hutchinson_reference(
    h: torch.Tensor,
    order: Sequence[str],
    slices: Sequence[slice],
    groups: dict[str, list[str]],
    like: dict[str, torch.Tensor],
    *,
    probes: int,
    chunk: int,
    generator: torch.Generator,
    isolated: bool = False,
) -> dict[str, tuple[float, float]]:
    """Hutchinson (mean, stderr) per group from the dense Hessian ``h`` (parameters in
    ``order``, at ``slices``), drawing the probes exactly as the estimator does: chunks of
    ``chunk`` from ``draw_probes``, over all parameters (shared) or group by group."""
    from layerwise.sensitivity.probes import draw_probes

    where = dict(zip(order, slices, strict=True))

    def idx(names):
        return torch.cat([torch.arange(where[n].start, where[n].stop) for n in names])

    def terms(names, members_of):
        sub = h[idx(names)][:, idx(names)]
        rows, done = [], 0
        while done < probes:
            count = min(chunk, probes - done)
            v = draw_probes({n: like[n] for n in names}, count, generator)
            flat = torch.cat([v[n].reshape(count, -1) for n in names], 1)
            hv = flat @ sub
            sizes = [like[n].numel() for n in names]
            parts_v, parts_hv = torch.split(flat, sizes, 1), torch.split(hv, sizes, 1)
            per = {n: (a * b).sum(1) for n, a, b in zip(names, parts_v, parts_hv, strict=True)}
            rows.append(torch.stack([sum(per[n] for n in m) for m in members_of], 1))
            done += count
        return torch.cat(rows)

    out = {}
    if isolated:
        for g, members in groups.items():
            z = terms(members, [members])[:, 0]
            out[g] = (z.mean().item(), (z.std() / probes**0.5).item())
    else:
        names = [n for n in like if any(n in m for m in groups.values())]
        z = terms(names, list(groups.values()))
        for i, g in enumerate(groups):
            out[g] = (z[:, i].mean().item(), (z[:, i].std() / probes**0.5).item())
    return out


def dense_ggn(case: Case, names: Sequence[str]) -> tuple[torch.Tensor, list[slice]]:
    """The generalised Gauss-Newton matrix Jᵀ H_out J of the mean loss w.r.t. ``names``:
    J the Jacobian of the whole batch's outputs (``torch.func.jacrev`` over the flat
    parameters; scaled-dot-product attention on its math backend), H_out the Hessian of
    ``case.criterion`` in the outputs (``torch.func.hessian``); checked symmetric PSD."""
    from torch.func import hessian as func_hessian
    from torch.func import jacrev
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = copy.deepcopy(case.model)
    replace_all_batch_norm_modules_(model)
    own = dict(model.named_parameters())
    shapes = [own[n].shape for n in names]
    sizes = [own[n].numel() for n in names]
    fixed = {n: p.detach() for n, p in own.items() if n not in names}

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        values = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, {**fixed, **values}, (case.inputs,))

    flat = torch.cat([own[n].detach().reshape(-1) for n in names])
    with sdpa_kernel(SDPBackend.MATH):
        jac = jacrev(outputs)(flat).reshape(-1, flat.numel())
        z = outputs(flat).detach()
    h_out = func_hessian(lambda out: case.criterion(out, case.targets))(z)
    h_out = h_out.reshape(z.numel(), z.numel())
    g = jac.T @ h_out @ jac
    assert torch.allclose(g, g.T, atol=1e-12), "reference GGN is not symmetric"
    assert torch.linalg.eigvalsh(g).min() > -1e-10 * max(1.0, g.abs().max().item())
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return g, [slice(a, b) for a, b in pairwise(bounds)]


def ggn_block_traces(case: Case, groups: dict[str, list[str]]) -> dict[str, float]:
    """Exact tr(G_gg) for every group, from :func:`dense_ggn`."""
    names = [n for members in groups.values() for n in members]
    g, slices = dense_ggn(case, names)
    where = dict(zip(names, slices, strict=True))
    return {
        name: sum(g[where[n], where[n]].trace().item() for n in members)
        for name, members in groups.items()
    }
