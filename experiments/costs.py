"""What a run's training cost, in forward+backward passes (contention-proof) and seconds.

:class:`CostCounter` is the engine's ``callback`` in an ablation run: at each
recalibration it adds the :class:`layerwise.sensitivity.EstimateCost` of the report the
controller used. :meth:`CostCounter.summary` gives, for a run of ``steps`` optimizer steps:

* ``passes_train``: ``steps``, one forward+backward pass of a training batch per step;
* ``passes_estimation``: the estimation's work in the same unit, counted from what the
  estimator did (never timed, so it does not depend on the machine's load):
  ``batches + 2 · hvps + ggn_passes``. Each estimated batch costs one forward+backward
  pass for its gradient (the per-example norms of ``grad_variance`` ride on it); a
  Hessian-vector product by double backward costs about two (Pearlmutter 1994: a gradient
  and its R-operator); each Gauss-Newton backward pass counts as one;
* ``estimation_batches``, ``estimation_hvps``, ``estimation_ggn_passes``: the raw counts,
  so that another weighting can be recomputed;
* ``estimation_time``: the estimator's own wall-clock seconds (part of ``train_time``,
  which excludes evaluation and monitoring).

Evaluation and the sensitivity monitor are not a policy's cost and are not counted here.

>>> from layerwise.sensitivity.report import EstimateCost
>>> class R: cost = EstimateCost(hvps=8, batches=1, seconds=0.5)
>>> class Rec: report = R()
>>> c = CostCounter(); c(Rec()); c(Rec())
>>> c.summary(100)["passes_estimation"]
34
"""

from __future__ import annotations

from typing import Any

__all__ = ["CostCounter"]


class CostCounter:
    """Sums the estimation cost of every recalibration (module docstring)."""

    def __init__(self) -> None:
        self.batches = self.hvps = self.ggn_passes = self.recalibrations = 0
        self.seconds = 0.0

    def __call__(self, record: Any) -> None:
        report = getattr(record, "report", None)
        if report is None:  # a skipped recalibration or a validation fallback: no estimate
            return
        cost = report.cost
        self.batches += int(cost.batches)
        self.hvps += int(cost.hvps)
        self.ggn_passes += int(cost.ggn_passes)
        self.seconds += float(cost.seconds)
        self.recalibrations += 1

    @property
    def passes(self) -> int:
        """Estimation work in forward+backward passes (module docstring)."""
        return self.batches + 2 * self.hvps + self.ggn_passes

    def summary(self, steps: int) -> dict[str, Any]:
        """The cost fields of a run's summary after ``steps`` optimizer steps."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        return {
            "passes_train": steps,
            "passes_estimation": self.passes,
            "estimation_batches": self.batches,
            "estimation_hvps": self.hvps,
            "estimation_ggn_passes": self.ggn_passes,
            "estimation_time": self.seconds,
        }
