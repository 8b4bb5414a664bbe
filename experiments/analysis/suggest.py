"""What a policy would do with a report: the multipliers a fresh
:class:`layerwise.policies.SensitivityController` assigns at its first recalibration, with the
reason for each, the bounds it enforces, and whether it fell back to the uniform rate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Suggestion", "suggest"]


@dataclass(frozen=True)
class Suggestion:
    """A policy's verdict on one report (plain data)."""

    policy: str
    multipliers: dict[str, float]
    reasons: dict[str, str]
    bounds: dict[str, float]
    fallback: bool = False
    event: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def footer(self) -> list[str]:
        """Lines under the table: the policy, its bounds, a fallback if there was one, and
        the reason for each group's multiplier."""
        b = self.bounds
        line = (
            f"policy {self.policy!r}: multipliers end in [{b['band_low']:.3g}, "
            f"{b['band_high']:.3g}] (min {b['min_multiplier']:g}, max {b['max_multiplier']:g}, "
            f"largest/smallest <= {b['max_spread']:g}); each recalibration changes them by at "
            f"most x{b['max_change']:g}, from 1 at the first (shown here)"
        )
        lines = [line]
        if self.fallback:
            lines.append(f"fallback to the uniform rate: {self.event}")
        elif self.event:
            lines.append(f"event: {self.event}")
        lines += [f"  {group}: {reason}" for group, reason in self.reasons.items()]
        return lines


def suggest(report: Any, policy: str) -> Suggestion:
    """Run a fresh controller with rule ``policy`` and default settings on ``report``."""
    from layerwise.policies import SensitivityController

    controller = SensitivityController(rule=policy)
    decision = controller.update(report, step=0)
    band_low, band_high = controller.bounds.interval()
    bounds = {**dataclasses.asdict(controller.bounds), "band_low": band_low, "band_high": band_high}
    return Suggestion(
        policy=policy,
        multipliers={k: float(v) for k, v in decision.multipliers.items()},
        reasons=dict(decision.reasons),
        bounds={k: float(v) for k, v in bounds.items()},
        fallback=bool(decision.fallback),
        event=decision.event,
        settings=dict(controller.settings),
    )
