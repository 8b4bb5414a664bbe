"""The per-batch work of :func:`layerwise.sensitivity.estimate`: traces, gradients and gradient
noise accumulated on the device, weighted by batch size, and one transfer at the end.

**When per-example gradients cannot be had.** Parameters the factorised norms do not cover
take ``vmap`` of ``grad`` (:mod:`layerwise.sensitivity.factorised`), and ``vmap`` refuses
code that depends on the data (a ``.item()``, a tensor in an ``if``, as in Hugging Face
attention-mask helpers; a data-dependent output shape). Under ``variance="auto"`` the
estimate then uses micro-batch statistics for that batch and the following ones
(:mod:`layerwise.sensitivity.microbatch`), records why in
``report.settings["variance_fallback"]`` (``"variance"`` reads ``"micro_batch"``, or
``"per_example+micro_batch"`` when earlier batches had per-example statistics) and warns
once per cause and model class; an explicit ``variance="per_example"`` raises
:class:`~layerwise.sensitivity.errors.PerExampleGradientError` naming the module and the
cause (:mod:`layerwise.sensitivity.vmap_fallback`). Likewise the sampled or exact GGN
trace, per example through ``vmap``, falls back to the batch function's products (exact in
expectation too, :mod:`layerwise.sensitivity.ggn`) and records it in
``report.settings["ggn_fallback"]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from layerwise.sensitivity.attention import ATTENTION_BACKEND
from layerwise.sensitivity.errors import NoGradientPathError, vmap_cause
from layerwise.sensitivity.factorised import ExampleNorms, example_norms
from layerwise.sensitivity.functional import FunctionalLoss, RngReplay
from layerwise.sensitivity.ggn import GGNEstimator
from layerwise.sensitivity.gradient_stats import (
    BatchGradStats,
    GradientSamples,
    combine_batches,
    noise_to_signal,
)
from layerwise.sensitivity.groups import GroupIndex
from layerwise.sensitivity.hutchinson import hutchinson_samples, trace_estimate
from layerwise.sensitivity.hvp import HessianProduct, loss_gradient
from layerwise.sensitivity.microbatch import accumulate_micro_batches
from layerwise.sensitivity.report import EstimateCost, GroupEstimate, SensitivityReport
from layerwise.sensitivity.vmap_fallback import per_example_failure, warn_once

__all__ = ["Plan", "Run"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """The resolved options of one :func:`layerwise.sensitivity.estimate` call."""

    index: GroupIndex
    trace: bool  # Hutchinson traces wanted
    noise: bool  # gradient noise wanted
    gradient: bool  # the mean gradient is needed (grad_norm or noise)
    budget: int  # probes per batch (per group if isolated)
    chunk_size: int
    mode: str  # "jvp" or "vjp"
    fallback: bool  # may fall back from jvp to vjp
    method: str  # "per_example", "micro_batch" or "two_batch"
    micro_batches: int
    distribution: str
    isolated: bool
    tolerance: float | None
    example_chunk_size: int | None
    batch_statistics: bool = False  # a BatchNorm layer normalises with batch statistics
    ggn: str | None = None  # "mc" or "exact" when ggn_trace is wanted
    ggn_samples: int = 1  # label samples per batch (mc)
    variance_auto: bool = False  # variance="auto": may fall back from per_example


class Run:
    """Accumulates per-batch results on the device; one transfer in :meth:`report`."""

    def __init__(
        self,
        plan: Plan,
        loss: FunctionalLoss,
        generator: torch.Generator,
        devices: list[torch.device],
        progress: Callable[[int, int], Any] | None,
        expected: int | None,
        ggn: GGNEstimator | None = None,
    ) -> None:
        self.plan, self.loss, self.gen, self.devices = plan, loss, generator, devices
        self.ggn = ggn
        self.progress, self.expected = progress, expected
        g = len(plan.index)
        first = next(iter(loss.values.values()))
        self.device = first.device
        self.group_ids = plan.index.group_ids(self.device)  # copied once per device, kept
        self.zeros = first.new_zeros(g)
        self.trace_sum, self.trace_var_sum = self.zeros.clone(), self.zeros.clone()
        self.names = list(loss.values)
        # Σ_b B_b G_b in names' order, as (scale, tensors): the first batch's gradient is
        # kept as it is (no copy); a second batch starts the running sum
        self.grad_sum: tuple[float, list[torch.Tensor], bool] | None = None  # owned?
        self.stats: list[BatchGradStats] = []
        self.centre_sq: torch.Tensor | None = None  # per-group ‖G‖² from the noise, one batch
        self.group_probes = [0] * g
        self.examples = self.batches = self.hvps = self.done = 0
        self.modes: dict[str, None] = {}
        self.fell_back: str | None = None
        self.vmapped: dict[str, None] = {}  # parameters whose per-example norms used vmap
        self.method = plan.method  # per_example until vmap fails under variance="auto"
        self.methods: dict[str, None] = {}  # the variance methods the batches used
        self.variance_fallback: str | None = None
        self.ggn_fallback: str | None = None
        isolated_factor = g if plan.isolated else 1
        self.steps = int(plan.gradient) + (plan.budget * isolated_factor if plan.trace else 0)
        self.ggn_steps = 0 if ggn is None else 1 if plan.ggn == "exact" else plan.ggn_samples
        self.steps += self.ggn_steps
        self.ggn_sum, self.ggn_var_sum = self.zeros.clone(), self.zeros.clone()
        self.ggn_count = self.ggn_passes = 0

    def _tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            known = self.expected if self.expected is not None else self.batches
            self.progress(self.done, self.steps * max(known, self.batches))

    def batch(self, batch: Any, size: int) -> None:
        if self.plan.noise and size < 2:  # checked before any work is spent on the batch
            raise ValueError(
                f"grad_variance with variance={self.plan.method!r} needs batches of >= 2 "
                f"examples, batch {self.batches} has {size}"
            )
        plan = self.plan
        pieces = plan.noise and plan.method != "per_example" and plan.batch_statistics
        if pieces and size < 2 * plan.micro_batches:  # else a micro-batch of one example
            raise ValueError(
                f"micro_batches={plan.micro_batches} on a model with BatchNorm in training "
                f"mode needs batches of >= {2 * plan.micro_batches} examples (>= 2 per "
                f"micro-batch), batch {self.batches} has {size}; lower micro_batches"
            )
        self.batches += 1
        self.examples += size
        self.loss.reached = False
        rng = RngReplay(self.devices)
        gradient = self._traces(batch, size, rng) if self.plan.trace else None
        if self.ggn is not None:
            rng.replay()  # the dropout stream of the batch, as for the gradient
            # the sampled terms' forward pass also gives the gradient, when nothing else does
            share = plan.gradient and gradient is None
            share = share and not (plan.noise and self.method == "per_example")
            shared = self._ggn(batch, size, share)
            if shared is not None:
                gradient = shared
                self.loss.reached = True  # the mean loss of this batch reached the parameters
        if self.plan.gradient:
            norms = None
            if self.plan.noise and self.method == "per_example":  # one pass: c and norms
                rng.replay()
                norms = self._example_norms(batch, size)
                if norms is not None:
                    gradient = norms.gradient
                    self.vmapped.update(dict.fromkeys(norms.fallback))
            if gradient is None:
                rng.replay()
                gradient = loss_gradient(self.loss, self.loss.values, batch)
            grads = [gradient[n] for n in self.names]
            if self.grad_sum is None:
                self.grad_sum = (float(size), grads, False)
            else:
                scale, total, owned = self.grad_sum
                if not owned:  # the first batch's own tensors: copy before adding
                    total = torch._foreach_mul(total, scale)
                torch._foreach_add_(total, grads, alpha=size)
                self.grad_sum = (1.0, total, True)
            if self.plan.noise:
                self.stats.append(self._noise(batch, size, gradient, norms))
                # one batch, its gradient centred the noise: the same per-group ‖G‖², reused
                one = self.batches == 1 and list(gradient) == self.names
                self.centre_sq = self.stats[-1].centre_sq if one else None
            self._tick(1)
        # the GGN alone evaluates the outputs, not this loss: only a loss it ran is checked
        if (self.plan.trace or self.plan.gradient) and not self.loss.reached:
            raise NoGradientPathError(
                f"the loss of batch {self.batches - 1} does not depend on any parameter of the "
                f"groups {list(plan.index.names)}: it has no gradient path to them (computed "
                "under torch.no_grad(), detached, or from parameters outside the groups?), so "
                "its gradient, noise and Hessian trace cannot be measured"
            )

    def _example_norms(self, batch: Any, size: int) -> ExampleNorms | None:
        """Per-example norms; ``None`` after falling back to micro-batches (module docstring)."""
        try:
            return example_norms(self.loss, batch, size, self.plan.example_chunk_size)
        except Exception as exc:
            self.variance_fallback = per_example_failure(
                exc, self.loss, self.loss.values, self.loss.model, batch, size,
                auto=self.plan.variance_auto, micro_batches=self.plan.micro_batches,
            )  # fmt: skip
            self.method = "micro_batch"
            return None

    def _traces(self, batch: Any, size: int, rng: RngReplay) -> Params:
        plan, index, values = self.plan, self.plan.index, self.loss.values
        if plan.isolated:
            jobs = [
                (
                    self.loss.restricted(m),
                    {n: values[n] for n in m},
                    torch.zeros(len(m), dtype=torch.long, device=self.device),
                    range(g, g + 1),
                )
                for g, m in enumerate(index.members)
            ]
        else:  # one job for all groups: shared probes
            jobs = [(self.loss, values, self.group_ids, range(len(index)))]
        gradient: Params = {}
        for loss, like, group_of, groups in jobs:
            product = HessianProduct(
                loss, like, batch, plan.mode, rng, self.loss.model, fallback=plan.fallback
            )
            z = hutchinson_samples(
                product, like, group_of, len(groups), budget=plan.budget,
                chunk_size=plan.chunk_size, generator=self.gen,
                distribution=plan.distribution, tolerance=plan.tolerance, on_chunk=self._tick,
            )  # fmt: skip
            mean, stderr = trace_estimate(z)
            span = slice(groups.start, groups.stop)
            self.trace_sum[span] += size * mean
            self.trace_var_sum[span] += (size * stderr).square()
            for g in groups:
                self.group_probes[g] += z.shape[0]
            self.hvps += z.shape[0]
            self.modes[product.mode] = None
            self.fell_back = self.fell_back or product.fell_back
            gradient.update(product.gradient or {})
        return gradient

    def _ggn(self, batch: Any, size: int, gradient: bool = False) -> Params | None:
        """Add the batch's GGN traces; the mean loss's gradient when ``gradient`` and the
        sampled terms' forward pass gave it (:meth:`~layerwise.sensitivity.ggn.GGNEstimator.
        batch`), else ``None``."""
        exact, samples = self.plan.ggn == "exact", self.plan.ggn_samples
        state = self.gen.get_state()
        try:
            mean, stderr, passes, shared = self.ggn.batch(
                self.loss.values,
                batch,
                size,
                samples=samples,
                generator=self.gen,
                exact=exact,
                gradient=gradient,
            )
        except Exception as exc:
            cause = vmap_cause(exc)
            if cause is None or not self.ggn.per_example:
                raise
            # the batch function's products need no vmap over examples (module docstring)
            self.ggn.per_example = False
            self.ggn_fallback = f"per-example products (vmap) fail: {cause}; batch function used"
            warn_once(self.loss.model, f"ggn: {cause}", f"ggn_trace: {self.ggn_fallback}", 4)
            self.gen.set_state(state)  # the same label noise as the failed attempt drew
            mean, stderr, passes, shared = self.ggn.batch(
                self.loss.values, batch, size, samples=samples, generator=self.gen, exact=exact
            )
        self.ggn_sum += size * mean
        self.ggn_var_sum += (size * stderr).square()
        self.ggn_count += 0 if exact else samples
        self.ggn_passes += passes
        self._tick(self.ggn_steps)
        return shared

    def _noise(
        self, batch: Any, size: int, gradient: Params, norms: ExampleNorms | None
    ) -> BatchGradStats:
        plan, index = self.plan, self.plan.index
        samples = GradientSamples(gradient, self.group_ids, len(index))
        if norms is not None:
            samples.add_norms(norms.sq, norms.dot, norms.total)
        else:
            with self.loss.slices_of(batch, size):  # each piece on the batch's scale
                accumulate_micro_batches(
                    samples, self.loss, self.loss.values, batch, size, plan.micro_batches
                )
        self.methods[self.method] = None
        return samples.finish(self.method)

    def _math_attention(self) -> bool:
        """Whether a pass ran under :func:`~layerwise.sensitivity.attention.
        twice_differentiable_attention`: Hessian products, the GGN, ``vmap`` gradients."""
        return self.plan.trace or self.ggn is not None or bool(self.vmapped)

    def _per_group(self, stacked: torch.Tensor) -> torch.Tensor:
        """(params,) -> (G,): the sum over each group's parameters."""
        return self.zeros.clone().index_add_(0, self.group_ids, stacked.to(self.device))

    def report(self, wanted: tuple[str, ...]) -> SensitivityReport:
        plan, index, n = self.plan, self.plan.index, self.examples
        names = list(self.loss.values)
        rows: dict[str, torch.Tensor] = {
            "param_norm": self._per_group(_squares([self.loss.values[p] for p in names]))
        }
        if plan.gradient:
            scale, total, _ = self.grad_sum or (1.0, [], True)
            grad_sq = self._per_group(_squares(total)) if self.centre_sq is None else self.centre_sq
            grad_sq = grad_sq * (scale / n) ** 2
            rows["grad_norm"] = grad_sq.sqrt()
        if plan.noise:
            trace_sigma, trace_var, norm_var = combine_batches(self.stats)
            sizes = index.size_tensor(self.zeros.dtype, self.zeros.device)
            rows["grad_variance"] = trace_sigma / sizes
            rows["grad_variance_stderr"] = trace_var.sqrt() / sizes
            mean_batch = n / self.batches  # B: the noise of one batch's gradient
            rows["noise_to_signal"] = noise_to_signal(trace_sigma, grad_sq, n, mean_batch)
            rows["grad_norm_stderr"] = norm_var.sqrt()
        if plan.trace:
            rows["hessian_trace"] = self.trace_sum / n
            rows["hessian_trace_stderr"] = self.trace_var_sum.sqrt() / n
        if self.ggn is not None:
            rows["ggn_trace"] = self.ggn_sum / n
            rows["ggn_trace_stderr"] = self.ggn_var_sum.sqrt() / n
        keys = list(rows)
        values = torch.stack([rows[k] for k in keys]).tolist()  # the one host transfer
        table = {
            k: dict(zip(index.names, v, strict=True)) for k, v in zip(keys, values, strict=True)
        }
        table["param_norm"] = {g: math.sqrt(v) for g, v in table["param_norm"].items()}
        if "grad_norm" not in wanted:
            table.pop("grad_norm", None)
            table.pop("grad_norm_stderr", None)
        groups = []
        for g, name in enumerate(index.names):
            fields = {k: col[name] for k, col in table.items()}
            if plan.trace:
                fields["hessian_probes"] = self.group_probes[g]
            if self.ggn is not None and plan.ggn == "mc":
                fields["ggn_samples"] = self.ggn_count
            groups.append(GroupEstimate(name, index.sizes[g], **fields))
        if self.progress is not None:
            self.progress(self.done, self.done)  # complete, also after an early stop
        cost = EstimateCost(
            probes=max(self.group_probes) if plan.trace else 0,
            hvps=self.hvps,
            examples=n,
            batches=self.batches,
            ggn_passes=self.ggn_passes,
        )
        settings = {
            "hvp_mode": "+".join(self.modes) if plan.trace else None,
            "variance": "+".join(self.methods) if plan.noise else None,
            "hvp_fallback": self.fell_back,
            # the passes differentiated twice or batched with vmap ran on the math backend
            "attention_backend": ATTENTION_BACKEND if self._math_attention() else None,
        }
        if self.variance_fallback is not None:
            settings["variance_fallback"] = self.variance_fallback
        if self.ggn_fallback is not None:
            settings["ggn_fallback"] = self.ggn_fallback
        if plan.noise and "per_example" in self.methods:
            vmapped = [p for p in index.params if p in self.vmapped]
            settings["per_example"] = (
                "factorised" if not vmapped else "vmap" if len(vmapped) == len(index.params)
                else "factorised+vmap"
            )  # fmt: skip
            settings["per_example_vmap"] = vmapped
        return SensitivityReport(tuple(groups), cost, settings)


def _squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖t‖² of each tensor, stacked, in one fused pass (and one squaring)."""
    return torch.stack(torch._foreach_norm(tensors)).square()
