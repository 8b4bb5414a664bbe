"""Benchmark of the sensitivity estimators beside their peers, in forward+backward units.

Run ``python -m layerwise.experiments.benchmarks.sensitivity`` (``--help`` for options).
Every figure is a ratio to ``unit``, one plain forward + backward pass
(``loss.backward()``) of the same model and batch, timed round-robin with everything
else (medians of ``--repeats``), so that the load of a shared machine drifts over all of
them alike; the time is this process's CPU time (``--clock cpu``, one thread by default).

**1. Accuracy** (``--section accuracy``), on small float64 models where exact answers
exist (:mod:`layerwise.experiments.benchmarks.small_models`): per-group Hessian block
traces from the dense Hessian and per-group gradient variance from a per-example loop.
Each row is one method: its cost in units and its relative error |est − exact| / |exact|,
the median and the worst over the groups, and for the whole model (the sum over groups).
Ours (Hutchinson, shared and isolated probes; variance from the factorised per-example
norms and from ``vmap``) beside PyHessian (whole-model Hutchinson trace), BackPACK (exact
``DiagHessian``; ``Variance``) and curvlinops (Hutchinson per group on its block-diagonal
Hessian operator) (:mod:`layerwise.experiments.benchmarks.peers`). Same probe count for
every Hutchinson row, whose errors are averaged over ``--seeds`` seeds of the probes; a
peer that is not installed is skipped with a line saying how to install it.

**2. Cost** (``--section cost``), on an MLP, a wide MLP and a CNN at batch 32 and 128:
``probe``/``jvp``/``vjp`` one Hutchinson probe of the per-group traces (``auto`` mode
and each mode forced), ``var`` the per-group gradient variance (grad_norm and
grad_variance, factorised per-example norms), ``vmap`` the same from ``vmap``
per-example gradients (the previous method), ``micro`` from micro-batches, ``ggn`` the
per-group GGN trace (``ggn="mc"``, its default 4 label samples, factorised norms),
``ggn1`` the cheap recalibration an engine asks for: ``grad_norm`` and ``ggn_trace`` with
one label sample (both from one forward pass), ``var-floor`` (MLPs only) the least the
per-example statistics behind ``var`` cost written out by hand for that model: one
forward pass with hooks, one backward pass, ‖g_i‖² and g_i·c per layer (a matrix product
per weight) and the sums the variance and its standard errors need, without any of the
estimator's generality (:func:`variance_floor`), ``report``
the whole default report (every quantity, ``--probes`` probes), ``pyhess`` PyHessian's
whole-model trace at the same probes (per probe), ``bp-var`` BackPACK's ``Variance``.
``floor``: the cheapest exact Hessian-vector product plain PyTorch offers on the model,
per probe (:func:`hvp_floor`: the gradient once with ``create_graph``, then one second
backward pass per probe or one per 8 probes batched, whichever is cheaper; no probe
drawn, no trace formed). ``ratio`` = report / (PyHessian's trace + per-example variance
by ``vmap``), ``ratio-floor`` = (probes x floor + var) / the same, the least ``ratio`` a
report whose Hessian products cost the floor could reach, and ``ratio-bp`` the ratio
with BackPACK's variance. ``var-mem``: the peak memory ``var``
allocates above what was allocated before it, over that of ``unit`` (from the memory
events of ``torch.profiler``, a separate untimed run).

**Fixed cost**: ``unit``, ``var``, ``ggn1`` and ``var-floor`` in milliseconds per call at
batch 2 (:func:`fixed_cost`), where the passes cost little: what ``var`` costs beyond
``var-floor`` is the estimator's fixed per-call cost, which weighs on a small model's
``var`` at any batch size (and on every engine recalibration, ``ggn1``).

Targets: ``var`` <= 2, ``var-mem`` <= 2 and ``ggn`` <= 4 on the MLPs and the CNN at batch 128;
``ratio`` <= 0.5, which cannot be met where ``ratio-floor`` > 0.5; ``ggn1`` about 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.experiments.benchmarks import peers
from layerwise.experiments.benchmarks.small_models import (
    SMALL,
    exact_traces,
    exact_variances,
    small_batch,
)
from layerwise.sensitivity import CrossEntropy, default_groups, estimate
from layerwise.sensitivity.functional import FunctionalLoss
from layerwise.sensitivity.gradient_stats import GradientSamples
from layerwise.sensitivity.hvp import loss_gradient
from layerwise.sensitivity.per_example import per_example_gradients

_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = time.process_time


def mlp(width: int = 256) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    return model, lambda b: torch.randn(b, 256)


def wide() -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    return mlp(1024)


def cnn() -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    return model, lambda b: torch.randn(b, 3, 16, 16)


MODELS = {"mlp": mlp, "wide": wide, "cnn": cnn}


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


#: The same loss as a loss object, for ``ggn_trace``.
CROSS_ENTROPY = CrossEntropy(lambda model, batch: model(batch[0]), lambda batch: batch[1])


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run round-robin so that load drifting on a shared
    machine hits them all alike (after one warm-up call each: first calls pay one-off
    initialisation)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = _clock()
            fn()
            times[key].append(_clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def plain_pass(model: nn.Module, batch) -> None:
    model.zero_grad(set_to_none=True)
    cross_entropy(model, batch).backward()
    model.zero_grad(set_to_none=True)


def vmap_variance(model: nn.Module, batch, groups: dict[str, list[str]]) -> dict[str, float]:
    """Per-group tr(Σ̂_g) from ``vmap`` per-example gradients (the method before the
    factorised norms), in chunks of at most 2**25 gradient entries."""
    names = [n for ns in groups.values() for n in ns]
    loss = FunctionalLoss(model, cross_entropy, names)
    centre = loss_gradient(loss, loss.values, batch)
    which = {n: g for g, ns in enumerate(groups.values()) for n in ns}
    samples = GradientSamples(centre, [which[n] for n in names], len(groups))
    size = batch[0].shape[0]
    step = max(1, min(size, 2**25 // sum(v.numel() for v in loss.values.values())))
    for s in range(0, size, step):
        part = (batch[0][s : s + step], batch[1][s : s + step])
        samples.add(per_example_gradients(loss, loss.values, part, part[0].shape[0]))
    return dict(zip(groups, samples.finish().trace_sigma.tolist(), strict=True))


def hvp_floor(model: nn.Module, batch, probes: int, chunk: int | None) -> Callable[[], object]:
    """``probes`` exact Hessian-vector products of the mean cross-entropy in plain PyTorch,
    as cheaply as it offers them: the gradient once with ``create_graph=True`` (its graph
    reused, as PyHessian does), then one second backward pass per probe (``chunk`` None)
    or per ``chunk`` probes batched (``is_grads_batched``). The probes are ±1 vectors drawn
    once, outside the timing, and no trace is formed: a floor for any Hutchinson estimate,
    which must also draw its probes and reduce the products."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    size = chunk or 1
    signs = [
        torch.randint(0, 2, (size, *p.shape), generator=gen).to(p.dtype).mul_(2).sub_(1)
        for p in params
    ]

    def run() -> None:
        loss = cross_entropy(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(0, probes, size):
            if chunk is None:
                torch.autograd.grad(grads, params, [v[0] for v in signs], retain_graph=True)
            else:
                torch.autograd.grad(grads, params, signs, retain_graph=True, is_grads_batched=True)

    return run


def variance_floor(model: nn.Module, batch) -> Callable[[], object] | None:
    """The per-example statistics of ``var`` written out by hand for a ``Sequential`` of
    ``Linear`` layers and activations (``None`` for any other model): the model's own
    forward pass with hooks keeping each layer's input and output edge, one backward pass
    for the parameters' gradients c and the outputs' gradients δ, then per layer
    ‖g_i‖² = ‖δ_i‖²‖x_i‖² (weight), ‖δ_i‖² (bias), g_i·c = δ_iᵀ C x_i (one matrix product)
    and δ_i·c_b, scaled by B and B², and Σ_i d_i, Σ_i d_i², Σ_i ((g_i − c)·c)² with
    d_i = ‖g_i − c‖² per parameter, copied to the host once: the least work the estimate
    does, without groups, checks, fallbacks or a model left untouched."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = [m for m in model if isinstance(m, nn.Linear)]
    if any(not isinstance(m, nn.Linear | nn.ReLU | nn.Tanh) for m in model) or not layers:
        return None
    from torch.autograd.graph import get_gradient_edge

    size = batch[0].shape[0]

    def run() -> object:
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        hooks = [m.register_forward_hook(lambda m, a, o: saved.append((a[0], o))) for m in layers]
        try:
            loss = cross_entropy(model, batch)
        finally:
            for h in hooks:
                h.remove()
        params = [p for m in layers for p in (m.weight, m.bias)]
        edges = [get_gradient_edge(o) for _, o in saved]
        grads = torch.autograd.grad(loss, [*params, *edges])
        sq, dot = [], []
        for (x, _), delta, gw, gb in zip(
            saved, grads[len(params) :], grads[0 : len(params) : 2], grads[1 : len(params) : 2],
            strict=True,
        ):  # fmt: skip
            d2 = torch.linalg.vecdot(delta, delta)
            sq += [d2 * torch.linalg.vecdot(x, x), d2]
            dot += [torch.linalg.vecdot(delta @ gw, x), delta @ gb]
        sq_t, dot_t = torch.stack(sq, -1) * size**2, torch.stack(dot, -1) * size
        centre = torch.stack([g.square().sum() for g in grads[: len(params)]])
        d = sq_t - 2 * dot_t + centre
        return torch.stack([d.sum(0), d.square().sum(0), (dot_t - centre).square().sum(0)]).tolist()

    return run


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU above what was allocated before ``fn`` ran, from the
    memory events of ``torch.profiler`` (each operator's own allocations and the frees
    between operators, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    try:  # the profiler's C++ side logs its start and stop on stderr: silence it
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        own = event.name == "[memory]"
        current += event.cpu_memory_usage if own else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _errors(est: dict[str, float], exact: dict[str, float]) -> tuple[float, float, float]:
    """(median, worst) relative error over groups, and that of the sum."""
    rel = [abs(est[g] - exact[g]) / abs(exact[g]) for g in exact]
    total = abs(sum(est.values()) - sum(exact.values())) / abs(sum(exact.values()))
    return statistics.median(rel), max(rel), total


def accuracy(
    name: str, size: int, probes: int, repeats: int, seeds: int = 5
) -> list[tuple[Any, ...]]:
    """Rows (method, what, units, median err, worst err, whole-model err) on ``name``; the
    errors of a stochastic method are averaged over ``seeds`` seeds of its probes."""
    model, batch = small_batch(name, size)
    groups = default_groups(model)
    traces, variances = exact_traces(model, batch, groups), exact_variances(model, batch, groups)

    def ours(seed: int, **kw: Any) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            r = estimate(
                model, cross_entropy, batch, quantities="hessian_trace", probes=probes,
                seed=seed, **kw,
            )  # fmt: skip
            return {g: r[g].hessian_trace for g in groups}

        return run

    def our_variance() -> dict[str, float]:
        r = estimate(model, cross_entropy, batch, quantities="grad_variance")
        return {g: r[g].grad_variance * r[g].num_params for g in groups}

    Make = Callable[[int], Callable[[], Any] | None]
    jobs: dict[str, tuple[str, str, Make, dict[str, float], bool]] = {
        "ours": ("ours", f"per-group trace, {probes} shared probes", ours, traces, True),
        "ours-iso": (
            "ours",
            f"per-group trace, {probes} isolated probes",
            lambda seed: ours(seed, isolated=True),
            traces,
            True,
        ),
        "pyhessian": (
            "PyHessian",
            f"whole-model trace, {probes} probes",
            lambda seed: peers.pyhessian_trace(model, batch, probes, seed),
            traces,
            True,
        ),
        "curvlinops": (
            "curvlinops",
            f"per-group trace, {probes} probes (block-diagonal)",
            lambda seed: peers.curvlinops_traces(model, batch, groups, probes, seed),
            traces,
            True,
        ),
        "backpack": (
            "BackPACK",
            "per-group trace, exact (DiagHessian)",
            lambda seed: peers.backpack_diag_hessian(model, batch, groups),
            traces,
            False,
        ),
        "ours-var": (
            "ours",
            "per-group variance, factorised",
            lambda seed: our_variance,
            variances,
            False,
        ),
        "ours-vmap": (
            "ours",
            "per-group variance, vmap (before)",
            lambda seed: lambda: vmap_variance(model, batch, groups),
            variances,
            False,
        ),
        "backpack-var": (
            "BackPACK",
            "per-group variance (Variance)",
            lambda seed: peers.backpack_variance(model, batch, groups),
            variances,
            False,
        ),
    }
    first = {k: job[2](0) for k, job in jobs.items()}
    fns = {"unit": lambda: plain_pass(model, batch)}
    fns.update({k: fn for k, fn in first.items() if fn is not None})
    seconds = interleaved_medians(fns, repeats)
    rows = []
    for key, (who, what, make, exact, stochastic) in jobs.items():
        if first[key] is None:
            continue
        errors = []
        for seed in range(seeds if stochastic else 1):
            answer = (first[key] if seed == 0 else make(seed))()
            if isinstance(answer, dict):
                errors.append(_errors(answer, exact))
            else:  # a whole-model figure
                total = sum(exact.values())
                errors.append((None, None, abs(answer - total) / abs(total)))
        mean = [None if e[0] is None else statistics.fmean(e) for e in zip(*errors, strict=True)]
        rows.append((who, what, seconds[key] / seconds["unit"], *mean))
    return rows


def cost(name: str, batch_size: int, probes: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    batch = (inputs(batch_size), torch.randint(0, 10, (batch_size,)))
    groups = default_groups(model)

    def traces(**kw: Any) -> Callable[[], object]:
        return lambda: estimate(
            model, cross_entropy, batch, quantities=["hessian_trace"], probes=probes, **kw
        )

    def noise(method: str) -> Callable[[], object]:
        return lambda: estimate(
            model, cross_entropy, batch, quantities=["grad_norm", "grad_variance"],
            variance=method,
        )  # fmt: skip

    fns: dict[str, Callable[[], object]] = {
        "unit": lambda: plain_pass(model, batch),
        "probe": traces(),
        "jvp": traces(hvp_mode="jvp"),
        "vjp": traces(hvp_mode="vjp"),
        "var": noise("per_example"),
        "vmap": lambda: vmap_variance(model, batch, groups),
        "micro": noise("micro_batch"),
        "report": lambda: estimate(model, cross_entropy, batch, probes=probes),
        "floor-loop": hvp_floor(model, batch, probes, None),
        "floor-vmap": hvp_floor(model, batch, probes, 8),
        "ggn": lambda: estimate(model, CROSS_ENTROPY, batch, quantities=["ggn_trace"]),
        "ggn1": lambda: estimate(
            model, CROSS_ENTROPY, batch, quantities=["grad_norm", "ggn_trace"], ggn_samples=1
        ),
    }
    floor = variance_floor(model, batch)
    if floor is not None:
        fns["var-floor"] = floor
    for key, fn in (
        ("pyhess", peers.pyhessian_trace(model, batch, probes)),
        ("bp-var", peers.backpack_variance(model, batch, groups)),
    ):
        if fn is not None:
            fns[key] = fn
    seconds = interleaved_medians(fns, repeats)
    unit = seconds.pop("unit")
    row = {"params": float(sum(p.numel() for p in model.parameters())), "unit_ms": unit * 1e3}
    per_probe = ("probe", "jvp", "vjp", "pyhess", "floor-loop", "floor-vmap")
    for key, value in seconds.items():
        row[key] = value / unit / (probes if key in per_probe else 1)
    row["floor"] = min(row.pop("floor-loop"), row.pop("floor-vmap"))
    row["var-mem"] = peak_memory(fns["var"]) / peak_memory(fns["unit"])
    if "pyhess" in row:
        ph = row["pyhess"] * probes
        row["ratio"] = row["report"] / (ph + row["vmap"])
        row["ratio-floor"] = (row["floor"] * probes + row["var"]) / (ph + row["vmap"])
        if "bp-var" in row:
            row["ratio-bp"] = row["report"] / (ph + row["bp-var"])
    return row


COLUMNS = ["params", "unit_ms", "probe", "jvp", "vjp", "floor", "var", "var-floor",
           "var-mem", "vmap", "micro", "ggn", "ggn1", "report", "pyhess", "bp-var", "ratio",
           "ratio-floor", "ratio-bp"]  # fmt: skip


FIXED_COLUMNS = ["unit", "var", "ggn1", "var-floor"]


def _cell(value: float | None, spec: str = "8.2f") -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else f"{value:{spec}}"


def _accuracy_section(args: argparse.Namespace) -> None:
    print(
        f"\n1. accuracy: small float64 models, batch {args.small_batch}, exact answers; cost "
        "in forward+backward units; relative error per group (median, worst) and of the "
        f"whole-model trace or variance, Hutchinson rows averaged over {args.seeds} seeds"
    )
    head = ["model", "method", "what", "units", "median", "worst", "whole"]
    print(f"{head[0]:<10} {head[1]:<11} {head[2]:<46}" + "".join(f"{h:>9}" for h in head[3:]))
    for name in SMALL:
        rows = accuracy(name, args.small_batch, args.probes, args.repeats, args.seeds)
        for who, what, units, med, worst, whole in rows:
            errors = "".join(_cell(e, "9.1e") for e in (med, worst, whole))
            print(f"{name:<10} {who:<11} {what:<46}{units:>9.2f}{errors}", flush=True)


#: The batch of the fixed-cost table: small enough that the passes cost little beside it.
FIXED_BATCH = 2


def fixed_cost(name: str, repeats: int) -> dict[str, float]:
    """Milliseconds per call at batch :data:`FIXED_BATCH` of ``unit``, ``var``, ``ggn1`` and
    ``var-floor`` (where it applies): at that batch the passes cost little, so what ``var``
    and ``ggn1`` cost beyond ``var-floor`` and ``unit`` is the estimator's fixed per-call
    cost (groups, checks, hooks, the report). ``repeats`` x 40 interleaved calls each."""
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    batch = (inputs(FIXED_BATCH), torch.randint(0, 10, (FIXED_BATCH,)))
    fns: dict[str, Callable[[], object]] = {
        "unit": lambda: plain_pass(model, batch),
        "var": lambda: estimate(
            model, cross_entropy, batch, quantities=["grad_norm", "grad_variance"]
        ),
        "ggn1": lambda: estimate(
            model, CROSS_ENTROPY, batch, quantities=["grad_norm", "ggn_trace"], ggn_samples=1
        ),
    }
    floor = variance_floor(model, batch)
    if floor is not None:
        fns["var-floor"] = floor
    return {k: v * 1e3 for k, v in interleaved_medians(fns, repeats * 40).items()}


def _cost_section(args: argparse.Namespace) -> None:
    print(f"\n2. cost in forward+backward units (unit_ms), {args.probes} probes")
    print(f"{'model':>5} {'B':>4} " + " ".join(f"{c:>8}" for c in COLUMNS))
    for name in args.models:
        for b in args.batch_sizes:
            row = cost(name, b, args.probes, args.repeats)
            cells = [f"{row['params']:>8.0f}"] + [_cell(row.get(c)) for c in COLUMNS[1:]]
            print(f"{name:>5} {b:>4} " + " ".join(cells), flush=True)
    print(
        "probe/jvp/vjp/floor/pyhess: per probe; var/var-floor/vmap/micro/ggn/ggn1/report/"
        "bp-var: per call; var-mem: peak memory of var / of the unit, above what was "
        "allocated before (torch.profiler). ratio = report / (pyhess x probes + vmap); "
        "ratio-floor = (floor x probes + var) / (pyhess x probes + vmap), the least ratio a "
        "report whose probes cost the floor could reach; ratio-bp: with bp-var instead of "
        "vmap."
    )
    print(f"\nfixed cost: ms per call at batch {FIXED_BATCH}, median of {args.repeats * 40}")
    print(f"{'model':>5} " + " ".join(f"{c:>9}" for c in FIXED_COLUMNS))
    for name in args.models:
        row = fixed_cost(name, args.repeats)
        print(f"{name:>5} " + " ".join(_cell(row.get(c), "9.3f") for c in FIXED_COLUMNS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m layerwise.experiments.benchmarks.sensitivity",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--section", choices=["all", "accuracy", "cost"], default="all")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--small-batch", type=int, default=64)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds of the probes the errors average over"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(_CLOCKS), default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: stable ratios on a shared machine; 0 keeps "
        "torch's default)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("probes", "repeats", "small_batch", "seeds"):
        if getattr(args, flag) < 1 or (flag == "small_batch" and args.small_batch < 2):
            parser.error(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = _CLOCKS[args.clock]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} time, "
        f"median of {args.repeats}"
    )
    for line in peers.missing():
        print(line)
    if args.section in ("all", "accuracy"):
        _accuracy_section(args)
    if args.section in ("all", "cost"):
        _cost_section(args)


if __name__ == "__main__":
    main()
