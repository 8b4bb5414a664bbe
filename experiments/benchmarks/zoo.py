"""The cost of :func:`layerwise.sensitivity.estimate` on the model zoo, in forward+backward units.

Run from the repository root (the zoo's models live in ``tests/zoo``):
``python -m layerwise.experiments.benchmarks.zoo`` (``--help`` for options). Every figure is
a ratio to ``unit``, one plain forward + backward pass (``loss.backward()``) of the same
model and batch, timed round-robin with everything else (medians of ``--repeats``) in this
process's CPU time, one thread by default, so that the load of a shared machine drifts over
all of them alike.

**1. The zoo** (``--section zoo``): every case of ``tests/zoo/cases.py`` that can be
imported here (tiny random-initialised configurations: replicas of torchvision's and
timm's models, Hugging Face BERT, GPT-2 and a Llama-style decoder; the real timm and
torchvision models where they import), grouped by depth, ``estimate`` at default options
(32 probes, every quantity a plain loss gives; BatchNorm models in training mode).

**2. ResNet-18** (``--section resnet``): torchvision's ResNet-18 at its real sizes (the
replica, 11.7M parameters) with BatchNorm in training mode, ``--batch`` images of
``--image`` pixels, 8 probes: the whole default report (``report``), and where it goes:
the traces alone (``trace``), the gradient noise alone (``variance``, micro-batches under
BatchNorm), the gradient alone (``grad``). ``vmap``/``loop``: one Hessian-vector product
per probe through one batched second backward pass of 8 probes against one second
backward pass per probe (``HessianProduct(..., batched=)``; ``hvp_mode="vjp"`` on the CPU
picks between them by the FLOPs of a pass, the loop for ResNet-18), per probe, after the
first pass with its graph (``first``). Target: ``report`` <= 25 units.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from layerwise.experiments.benchmarks import sensitivity as bench
from layerwise.policies import group_parameters
from layerwise.sensitivity import estimate
from layerwise.sensitivity.functional import FunctionalLoss
from layerwise.sensitivity.hvp import HessianProduct
from layerwise.sensitivity.probes import draw_probes, make_generator

PROBES = 8


def _zoo() -> Any:
    try:
        from tests.zoo import cases
    except ImportError as exc:
        sys.exit(f"the zoo's models are in tests/zoo: run this from the repository root ({exc})")
    return cases


def _unit(model: torch.nn.Module, loss_fn: Callable, batch: Any) -> Callable[[], None]:
    def unit() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    return unit


def zoo_rows(repeats: int) -> list[tuple[str, int, float, float, str]]:
    """(case, parameters, unit ms, estimate units, note) per importable zoo case."""
    cases = _zoo()
    rows = []
    for case in cases.CASES:
        reason = case.skip_reason()
        if reason:
            print(f"skipped {case.name}: {reason}", flush=True)
            continue
        model = case.build().train()
        batch = case.batch(torch.Generator().manual_seed(0))
        groups = group_parameters(model, "depth", head=case.head).mapping()
        times = bench.interleaved_medians(
            {
                "unit": _unit(model, case.loss, batch),
                "report": functools.partial(
                    estimate, model, case.loss, batch, groups=groups, **case.estimator
                ),
            },
            repeats,
        )
        size = sum(p.numel() for p in model.parameters())
        note = ", ".join(f"{k}={v}" for k, v in case.estimator.items())
        rows.append((case.name, size, times["unit"] * 1e3, times["report"] / times["unit"], note))
        print(f"{rows[-1][0]:>30} {size:>10,} {rows[-1][2]:>8.1f} {rows[-1][3]:>8.1f}  {note}")
    return rows


def resnet_row(batch_size: int, image: int, repeats: int) -> dict[str, float]:
    """The ResNet-18 figures of section 2, in units."""
    from tests.zoo.replicas import resnet18

    torch.manual_seed(0)
    model = resnet18(10).train()
    batch = (torch.randn(batch_size, 3, image, image), torch.randint(0, 10, (batch_size,)))

    def loss_fn(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    groups = group_parameters(model, "depth").mapping()
    functional = FunctionalLoss(model, loss_fn, [n for ns in groups.values() for n in ns])
    values = functional.values
    probes = draw_probes(values, PROBES, make_generator("cpu", 0))

    def first() -> Any:  # the forward and first backward pass, their graph kept
        return torch.autograd.grad(
            loss_fn(model, batch), list(model.parameters()), create_graph=True
        )

    def products(batched: bool) -> Callable[[], object]:
        return lambda: HessianProduct(
            functional, values, batch, mode="vjp", batched=batched
        ).quadratic_forms(probes)

    def run(**kw: Any) -> Callable[[], object]:
        return lambda: estimate(model, loss_fn, batch, groups=groups, probes=PROBES, **kw)

    times = bench.interleaved_medians(
        {
            "unit": _unit(model, loss_fn, batch),
            "report": run(),
            "trace": run(quantities=["hessian_trace"]),
            "variance": run(quantities=["grad_variance"]),
            "grad": run(quantities=["grad_norm"]),
            "first": first,
            "vmap": products(True),
            "loop": products(False),
        },
        repeats,
    )
    unit = times.pop("unit")
    out = {k: v / unit for k, v in times.items()}
    for mode in ("vmap", "loop"):
        out[mode] = (out[mode] - out["first"]) / PROBES
    out["unit_ms"] = unit * 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m layerwise.experiments.benchmarks.zoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--section", choices=["all", "zoo", "resnet"], default="all")
    parser.add_argument("--batch", type=int, default=32, help="ResNet-18 batch size (32)")
    parser.add_argument("--image", type=int, default=64, help="ResNet-18 image side (64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 8 or args.image < 32:
        parser.error("--repeats must be >= 1, --batch >= 8 (micro-batches), --image >= 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU time, "
          f"median of {args.repeats}")  # fmt: skip
    if args.section in ("all", "zoo"):
        print("\n1. estimate at default options, in forward+backward units")
        print(f"{'model':>30} {'params':>10} {'unit_ms':>8} {'report':>8}  options")
        zoo_rows(args.repeats)
    if args.section in ("all", "resnet"):
        print(f"\n2. ResNet-18, BatchNorm in training mode, batch {args.batch} of "
              f"{args.image}x{args.image}, {PROBES} probes, in forward+backward units")  # fmt: skip
        row = resnet_row(args.batch, args.image, args.repeats)
        keys = ["unit_ms", "report", "trace", "variance", "grad", "first", "vmap", "loop"]
        print(" ".join(f"{k:>9}" for k in keys))
        print(" ".join(f"{row[k]:>9.2f}" for k in keys))
        print("vmap/loop: per probe, after the first pass; target: report <= 25")


if __name__ == "__main__":
    main()
