"""``layerwise analyze``: measure a model's per-group sensitivity offline and show what rates
a policy would give each group.

With no arguments it analyses the bundled default (an MLP on scikit-learn's digits, briefly
trained); with ``--model``/``--data`` (and optionally ``--checkpoint``, ``--loss``) the user's
own. The pieces are in :mod:`layerwise.experiments.analysis`; this module parses and chains them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from collections.abc import Callable, Iterator
from typing import Any

from layerwise.experiments.commands.groups import add_grouping_arguments
from layerwise.experiments.errors import CLIError, UsageError, first_line

__all__ = ["register", "run"]

EPILOG = """\
examples:
  layerwise analyze
  layerwise analyze --model mypkg.models:make_net --checkpoint run/ckpt.pt \\
      --data mypkg.data:train_batches --strategy module --policy noise --out analysis/
  layerwise analyze --model mypkg.hf:make_gpt2 --data mypkg.hf:collated_batches \
      --strategy depth --head lm_head --quantities grad_norm grad_variance

--model (a bundled name or a factory), --data (a factory returning an iterable of batches)
and --loss (loss(model, batch) -> mean loss, or a loss object or a factory returning one,
e.g. layerwise.sensitivity.CrossEntropy(forward, target); default: cross-entropy on
(inputs, targets), a loss object; for dict batches, such as a Hugging Face collator's,
model(**batch).loss) are import paths; the grouping flags (--strategy, --head, ...) are those of
`layerwise groups`. --quantities picks what is estimated (default: all, which leaves out
ggn_trace); the policy's own quantities are always added, as the engine asks for them: the
default --policy curvature reads ggn_trace from a loss object and hessian_trace from a plain
function, and --policy curvature_ggn estimates ggn_trace, which needs a loss object. --out
DIR receives
report.csv (a row per group, with the policy's multiplier and reason), report.json (the
report, the policy's decision and the manifest: model, checkpoint and data SHA-256, groups,
estimator, seed, versions, device, dtype) and four PNG plots; a DIR holding earlier results
is refused unless --force, which replaces only those files.
Exit codes: 0 done, 2 bad arguments or input, 1 the user's code failed.
"""
TOLERANCE = "stop a batch's probes once every trace's relative stderr is <= REL"


def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    """An argparse ``type``: ``cast(text)`` if ``ok`` holds for it, else a usage error."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def register(subparsers: Any) -> None:
    from layerwise.policies import RULES
    from layerwise.sensitivity import KNOWN_QUANTITIES
    from layerwise.sensitivity.ggn import GGN_MODES

    p = subparsers.add_parser(
        "analyze",
        help="measure per-group sensitivity of a model and the multipliers a policy gives",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("what to analyse (default: the bundled digits MLP)")
    src.add_argument("--model", metavar="NAME|PKG.MOD:FACTORY", help="the model or its factory")
    src.add_argument("--checkpoint", metavar="PATH", help="state dict (or dict holding one)")
    src.add_argument("--data", metavar="PKG.MOD:FACTORY", help="factory returning batches")
    src.add_argument(
        "--loss", metavar="PKG.MOD:NAME", help="loss(model, batch) -> mean, or a loss object"
    )
    add_grouping_arguments(p)
    est = p.add_argument_group("estimator")
    positive = _checked(int, lambda v: v >= 1, "a positive integer")
    for flag, kind, default, text in (
        ("--probes", positive, 32, "Hutchinson probes per batch"),
        ("--batches", positive, 4, "use the first N batches of the data"),
        ("--seed", _checked(int, lambda v: v >= 0, "an integer >= 0"), 0, "seeds all randomness"),
    ):
        est.add_argument(flag, type=kind, default=default, metavar="N", help=f"{text} ({default})")
    est.add_argument("--device", default="auto", help="auto (CUDA if any), cpu, cuda:N, mps")
    est.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    tolerance = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
    est.add_argument("--tolerance", type=tolerance, metavar="REL", help=TOLERANCE)
    est.add_argument(
        "--quantities", nargs="+", choices=("all", *KNOWN_QUANTITIES), default=["all"],
        metavar="Q", help=f"what to estimate: all (the default) or some of {KNOWN_QUANTITIES}",
    )  # fmt: skip
    est.add_argument(
        "--ggn", choices=GGN_MODES, default="mc", help="ggn_trace: sampled labels or exact (mc)"
    )
    est.add_argument(
        "--ggn-samples", type=positive, default=4, metavar="N",
        help="label samples per batch for --ggn mc (4)",
    )  # fmt: skip
    p.add_argument(
        "--policy", choices=tuple(RULES), default="curvature", help="multipliers to show"
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="write report.csv, report.json and plots")
    out.add_argument("--force", action="store_true", help="replace earlier results in --out")
    out.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    # a usage error is one line on stderr, exit code 2
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see {p.prog} --help)\n")
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
def _progress(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """``callback(done, total)`` of a rich progress bar on stderr when it is a terminal, else
    None (errors stay one line, logs stay clean)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def quantities_of(args: argparse.Namespace, loss_fn: Any) -> tuple[str, ...]:
    """The quantities to estimate: ``--quantities`` (``all``: those any loss gives) and those
    the ``--policy`` rule reads of ``loss_fn``, as the engine asks for them
    (:func:`layerwise.policies.rules.rule_quantities`: ``curvature`` reads ``ggn_trace`` from
    a loss object, ``hessian_trace`` from a plain function), in the estimator's order."""
    from layerwise.policies import make_rule
    from layerwise.policies.rules import rule_quantities
    from layerwise.sensitivity import KNOWN_QUANTITIES, QUANTITIES, OutputLoss

    rule = make_rule(args.policy)
    wanted = set(rule_quantities(rule, isinstance(loss_fn, OutputLoss)) or ())
    for q in args.quantities:
        wanted.update(QUANTITIES if q == "all" else (q,))
    return tuple(q for q in KNOWN_QUANTITIES if q in wanted)


def _check_loss(inputs: Any, quantities: tuple[str, ...], args: argparse.Namespace) -> None:
    """``ggn_trace`` needs a loss object: refuse a plain ``--loss`` before any estimate."""
    from layerwise.sensitivity import OutputLoss

    if "ggn_trace" in quantities and not isinstance(inputs.loss_fn, OutputLoss):
        why = "--policy " + args.policy if "ggn_trace" not in args.quantities else "--quantities"
        given = (
            f"--loss {args.loss!r}"
            if args.loss
            else f"the default loss of these batches, {inputs.manifest['loss']},"
        )
        raise UsageError(
            f"ggn_trace (asked for by {why}) needs --loss to give a loss object, e.g. a factory "
            f"returning layerwise.sensitivity.CrossEntropy(forward, target); {given} gives a "
            "plain function"
        )


def _estimate(inputs: Any, groups: Any, args: argparse.Namespace, dtype: Any) -> Any:
    """:func:`layerwise.sensitivity.estimate` of :func:`quantities_of`; a failure inside the
    user's model or loss is one line (exit 1)."""
    from layerwise.sensitivity import EstimateOptions, estimate

    settings = {name: getattr(args, name) for name in ("probes", "seed", "tolerance")}
    settings.update(ggn=args.ggn, ggn_samples=args.ggn_samples)
    options = {
        "groups": groups.mapping(),
        "options": EstimateOptions(
            **settings, dtype=dtype, quantities=quantities_of(args, inputs.loss_fn)
        ),
    }
    with _progress("estimating") as progress:
        try:
            return estimate(
                inputs.model, inputs.loss_fn, inputs.batches, progress=progress, **options
            )
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            raise CLIError(f"the estimate failed: {first_line(exc)}") from exc


def run(args: argparse.Namespace) -> int:
    import torch

    from layerwise.experiments import analysis
    from layerwise.experiments.commands.groups import build_groups, grouping_from_args
    from layerwise.experiments.extras import require
    from layerwise.experiments.manifest import versions

    _check_combination(args)
    device, dtype = analysis.parse_device(args.device), getattr(torch, args.dtype)
    grouping = grouping_from_args(args)
    out = None if args.out is None else analysis.check_out_dir(args.out, force=args.force)
    if out is not None:
        require("matplotlib")  # before the work, not after it
    with _progress("training the default" if args.model is None else "loading") as progress:
        if args.model is None:
            inputs = analysis.bundled_default(
                seed=args.seed, batches=args.batches, device=device, dtype=dtype, progress=progress
            )
        else:
            inputs = analysis.user_inputs(args, device=device, dtype=dtype)
    _check_loss(inputs, quantities_of(args, inputs.loss_fn), args)
    groups = build_groups(inputs.model, grouping)
    report = _estimate(inputs, groups, args, dtype)
    policy = analysis.suggest(report, args.policy)
    settings = ("probes", "batches", "tolerance", "seed", "quantities", "ggn", "ggn_samples")
    manifest = {
        "command": "analyze",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **inputs.manifest,
        "groups": {**grouping, **groups.manifest()},
        "estimator": {**{k: vars(args)[k] for k in settings}, "settings": report.settings},
        "policy": policy["settings"],
        "seed": args.seed,
        "device": str(device),
        "dtype": args.dtype,
        "versions": versions(),
    }
    result = analysis.Analysis(report, policy, manifest)
    if out is not None:
        written = result.write(out)
        print(f"wrote {', '.join(p.name for p in written)} to {out}", file=sys.stderr)
    result.show(args.format, sys.stdout)
    if not report.is_finite():
        bad = [g.group for g in report if not g.is_finite()]
        print(f"layerwise analyze: warning: non-finite estimates in groups {bad}", file=sys.stderr)
    return 0
