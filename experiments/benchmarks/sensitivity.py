"""Benchmark of the sensitivity estimators, as ratios to a plain forward + backward pass.

Run ``python -m layerwise.experiments.benchmarks.sensitivity`` (``--help`` for options). For an MLP
and a small CNN at a few batch sizes it measures, in the same run and as the median of
repeats:

* ``unit``: one plain forward + backward pass (``loss.backward()``), the unit of cost;
  every measurement below runs round-robin with it (median of ``--repeats``), so that
  the load of a shared machine drifts over all of them alike;
* ``probe``: one Hutchinson probe of the per-group traces at ``--probes`` probes (the whole
  ``estimate`` call divided by the number of probes), chunked ``vmap``, mode ``auto``;
* ``loop``: the same with ``chunk_size=1`` (probe by probe, no batching);
* ``jvp`` / ``vjp``: the probe cost with each Hessian-vector product mode forced;
* ``per-ex`` / ``micro``: per-example (``vmap`` over ``grad``) and micro-batch gradient
  statistics, against one plain pass;
* ``pyhessian``: PyHessian's whole-model trace at the same number of probes (its set-up
  pass included), per probe, when the ``pyhessian`` package is importable.

Threads default to 1: on a machine shared with other jobs, multi-threaded kernels slow
down erratically (30-100x here), and the ratios are what matters. Targets: ``probe`` at
most 2 units on CPU at 32 probes; per-group traces no dearer than
PyHessian's whole-model trace (``ratio`` = our total / PyHessian's total <= 1).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.sensitivity import estimate


def mlp(width: int = 256) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    return model, lambda b: torch.randn(b, 256)


def cnn() -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    return model, lambda b: torch.randn(b, 3, 16, 16)


MODELS = {"mlp": mlp, "cnn": cnn}


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run round-robin so that load drifting on a shared
    machine hits them all alike (after one warm-up call each: first calls pay one-off
    initialisation)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def plain_pass(model: nn.Module, batch) -> None:
    model.zero_grad(set_to_none=True)
    cross_entropy(model, batch).backward()
    model.zero_grad(set_to_none=True)


def pyhessian_trace(model: nn.Module, batch, probes: int) -> Callable[[], object] | None:
    try:
        from pyhessian import hessian
    except Exception:
        return None

    def run() -> object:
        copy_ = copy.deepcopy(model)  # PyHessian switches to eval and writes .grad
        with warnings.catch_warnings():  # its backward(create_graph=True) warns every call
            warnings.simplefilter("ignore", UserWarning)
            h = hessian(copy_, F.cross_entropy, data=batch, cuda=False)
        terms = h.trace(maxIter=probes, tol=-math.inf)  # never "converged": the full budget
        assert len(terms) == probes, f"PyHessian stopped after {len(terms)} probes"
        return terms

    return run


def measure(name: str, batch_size: int, probes: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    batch = (inputs(batch_size), torch.randint(0, 10, (batch_size,)))

    def traces(**kw) -> Callable[[], object]:
        return lambda: estimate(
            model, cross_entropy, batch, quantities=["hessian_trace"], probes=probes, **kw
        )

    def noise(method: str) -> Callable[[], object]:
        return lambda: estimate(
            model, cross_entropy, batch, quantities=["grad_norm", "grad_variance"],
            variance=method,
        )  # fmt: skip

    fns = {
        "unit": lambda: plain_pass(model, batch),
        "probe": traces(),
        "loop": traces(chunk_size=1),
        "jvp": traces(hvp_mode="jvp"),
        "vjp": traces(hvp_mode="vjp"),
        "per-ex": noise("per_example"),
        "micro": noise("micro_batch"),
    }
    ph = pyhessian_trace(model, batch, probes)
    if ph is not None:
        try:
            ph()
            fns["pyhessian"] = ph
        except Exception as exc:  # a broken install must not stop the benchmark
            print(f"pyhessian failed: {type(exc).__name__}: {exc}")
    seconds = interleaved_medians(fns, repeats)
    unit = seconds.pop("unit")
    row = {"params": float(sum(p.numel() for p in model.parameters())), "unit_ms": unit * 1e3}
    for key, value in seconds.items():
        per_probe = key in ("probe", "loop", "jvp", "vjp", "pyhessian")
        row[key] = value / unit / (probes if per_probe else 1)
    if "pyhessian" in row:
        row["ratio"] = row["probe"] / row["pyhessian"]
    return row


COLUMNS = ["params", "unit_ms", "probe", "loop", "jvp", "vjp", "per-ex", "micro", "pyhessian",
           "ratio"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: stable ratios on a shared machine; 0 keeps "
        "torch's default)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import pyhessian  # noqa: F401
    except Exception:
        print("pyhessian not available")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.probes} probes, "
        f"median of {args.repeats}; costs in units of one forward+backward (unit_ms)"
    )
    print(f"{'model':>5} {'B':>4} " + " ".join(f"{c:>9}" for c in COLUMNS))
    for name in args.models:
        for b in args.batch_sizes:
            row = measure(name, b, args.probes, args.repeats)
            cells = []
            for c in COLUMNS:
                v = row.get(c)
                cells.append(
                    f"{'-':>9}" if v is None else f"{v:>9.0f}" if c == "params" else f"{v:>9.2f}"
                )
            print(f"{name:>5} {b:>4} " + " ".join(cells), flush=True)
    print(
        "probe/loop/jvp/vjp/pyhessian: per probe; per-ex/micro: per call. "
        "ratio = probe / pyhessian (per-group traces vs PyHessian's whole-model trace)."
    )


if __name__ == "__main__":
    main()
