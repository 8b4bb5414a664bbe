"""``layerwise analyze``: measure a model's per-group sensitivity offline and show what rates
a policy would give each group.

With no arguments it analyses the bundled default (an MLP on scikit-learn's digits, briefly
trained); with ``--model``/``--data`` (and optionally ``--checkpoint``, ``--loss``) the user's
own. The work is in :mod:`layerwise.experiments.analysis`; this module parses and orchestrates.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from layerwise.experiments.errors import UsageError

__all__ = ["register", "run"]

POLICIES = ("curvature", "noise", "trust_ratio", "uniform")
FORMATS = ("table", "csv", "json")

EPILOG = """\
examples:
  layerwise analyze
  layerwise analyze --model mypkg.models:make_net --checkpoint run/ckpt.pt \\
      --data mypkg.data:train_batches --groups module --policy noise --out analysis/

--model and --data name factories called with no arguments: the first returns the
torch.nn.Module, the second an iterable of batches (the first --batches are used). --loss
names a function loss(model, batch) -> mean loss (default: cross-entropy on
(inputs, targets)). --out DIR writes report.csv (one row per group, with the policy's
multiplier and reason), report.json (the report, the policy's decision and a manifest: model,
checkpoint SHA-256, data SHA-256, groups, estimator settings, seed, versions, device, dtype)
and hessian_trace.png, grad_variance.png, noise_to_signal.png, multipliers.png; an existing
DIR holding any of these is refused unless --force, which replaces only them.
Exit codes: 0 done, 2 bad arguments or input, 1 the user's code failed.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make the parser report a usage error as one line on stderr, exit code 2."""

    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="measure per-group sensitivity of a model and the multipliers a policy gives",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("what to analyse (default: the bundled digits MLP)")
    src.add_argument("--model", metavar="PKG.MOD:FACTORY", help="factory returning the model")
    src.add_argument("--checkpoint", metavar="PATH", help="state dict (or dict holding one)")
    src.add_argument("--data", metavar="PKG.MOD:FACTORY", help="factory returning batches")
    src.add_argument("--loss", metavar="PKG.MOD:FUNCTION", help="loss(model, batch) -> mean")
    grp = p.add_mutually_exclusive_group()
    grp.add_argument(
        "--groups",
        choices=("depth", "module", "role", "norm"),
        default=None,
        help="grouping strategy (default: depth)",
    )
    grp.add_argument(
        "--groups-file",
        metavar="PATTERNS.toml",
        help="ordered table 'group = pattern' (first match wins)",
    )
    est = p.add_argument_group("estimator")
    est.add_argument(
        "--probes",
        type=_positive_int,
        default=32,
        metavar="N",
        help="Hutchinson probes per batch (default: 32)",
    )
    est.add_argument(
        "--batches",
        type=_positive_int,
        default=4,
        metavar="N",
        help="the first N batches of the data (default: 4)",
    )
    est.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of the probes, the model factory and the default (default: 0)",
    )
    est.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available), cpu, cuda, cuda:N, mps (default: auto)",
    )
    est.add_argument("--dtype", default="float32", help="float32 or float64 (default: float32)")
    est.add_argument(
        "--tolerance",
        type=_tolerance,
        default=None,
        metavar="REL",
        help="stop a batch's probes once every group's trace has relative stderr <= REL "
        "(--probes is then the most per batch)",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="curvature",
        help="policy whose multipliers to show (default: curvature)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="write report.csv, report.json and plots")
    out.add_argument(
        "--force",
        action="store_true",
        help="replace earlier results in --out (other files are kept)",
    )
    out.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="what to print on standard output (default: table)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )
    _one_line_errors(p)
    p.set_defaults(func=run)


def _check_combination(args: argparse.Namespace) -> None:
    if args.model is None:
        extra = [f"--{n}" for n in ("checkpoint", "data", "loss") if getattr(args, n)]
        if extra:
            raise UsageError(f"{', '.join(extra)} needs --model (the default brings its own)")
    elif args.data is None:
        raise UsageError(f"--model {args.model!r} needs --data (a factory returning batches)")
    if args.force and args.out is None:
        raise UsageError("--force needs --out")


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Any]:
    """A rich progress bar on stderr when it is a terminal (else None: errors stay one line
    and logs stay clean); yields ``callback(done, total)``."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(file=sys.stderr)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def run(args: argparse.Namespace) -> int:
    from layerwise.experiments.analysis import pipeline as build
    from layerwise.experiments.analysis.devices import parse_device, parse_dtype
    from layerwise.experiments.analysis.outputs import check_out_dir

    _check_combination(args)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    out = None if args.out is None else check_out_dir(args.out, force=args.force)

    with _progress("training the default" if args.model is None else "loading") as cb:
        inputs = build.load_inputs(args, device=device, dtype=dtype, progress=cb)
    groups, grouping = build.make_groups(inputs.model, args)
    with _progress("estimating") as cb:
        report = build.estimate(inputs, groups, args, dtype=dtype, progress=cb)
    suggestion = build.suggest(report, args.policy)
    manifest = build.manifest(args, inputs, groups, grouping, report, suggestion, device, dtype)
    result = build.Result(report=report, suggestion=suggestion, manifest=manifest)

    if out is not None:
        written = build.write(result, out)
        print(f"wrote {', '.join(p.name for p in written)} to {out}", file=sys.stderr)
    build.show(result, args.format, file=sys.stdout)
    if not report.is_finite():
        bad = [g.group for g in report if not g.is_finite()]
        print(f"layerwise analyze: warning: non-finite estimates in groups {bad}", file=sys.stderr)
    return 0
