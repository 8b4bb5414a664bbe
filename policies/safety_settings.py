"""The settings of the controller's safety machinery, as one validated, frozen value.

:class:`Safety` configures the three state machines of :mod:`layerwise.policies.safety`: the
gradient-norm spike check (:class:`~layerwise.policies.safety.SpikeMonitor`), the fallback
gate (:class:`~layerwise.policies.safety.FallbackGate`) and the validation watch
(:class:`~layerwise.policies.safety.ValidationWatch`).

>>> Safety(cooldown=0, mode="max").to_dict()["mode"]
'max'
>>> Safety.from_dict(Safety().to_dict()) == Safety()
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from layerwise.policies.checks import int_at_least, real_in, settings_from_mapping
from layerwise.policies.safety import FallbackGate, SpikeMonitor, ValidationWatch

__all__ = ["Safety"]


@dataclass(frozen=True)
class Safety:
    """When the controller falls back to the uniform rate, and how it recovers.

    * ``spike_factor`` -- in (1, inf]: a group's ``grad_norm`` above ``spike_factor`` times its
      running geometric mean trips the fallback (a dimensionless ratio; ``inf`` disables the
      spike check).
    * ``spike_ema`` -- in [0, 1): decay β of that running mean, a bias-corrected EMA of
      ``log grad_norm`` (memory about 1/(1-β) recalibrations).
    * ``cooldown`` -- int >= 0: recalibrations held at all ones after a fallback.
    * ``hysteresis`` -- int >= 1: consecutive healthy reports needed after the cooldown
      before adapting again (the one that completes the count is adapted).
    * ``patience`` -- int >= 1: consecutive worsenings of the validation metric, while
      adapting, that trip the fallback.
    * ``mode`` -- ``"min"`` (lower is better, a loss) or ``"max"`` (higher is better, an
      accuracy): the direction of the validation metric.
    * ``min_delta`` -- in [0, inf): the change of the metric, in its own units, that counts
      as a worsening (and that a collapse must exceed too).
    * ``collapse_drop`` -- in (0, inf]: the relative decline from the best value seen while
      adapting that counts as a collapse (dimensionless; ``inf`` disables the collapse watch).
      The decline is measured in units of ``max(|peak - reference|, |peak|)``, ``peak`` the
      best value while adapting and ``reference`` the best before
      (:class:`~layerwise.policies.safety.ValidationWatch`). The default 0.5: an accuracy
      that loses half of its peak, or a loss that climbs back half way to where adaptation
      found it; overfitting moves a metric by a few percent of that.
    * ``collapse_patience`` -- int >= 1: consecutive collapsed observations that trip the
      fallback (default 2: one bad evaluation may be noise, two in a row are not).

    Each invalid field raises ``TypeError``/``ValueError`` naming the field and the value.
    """

    spike_factor: float = 10.0
    spike_ema: float = 0.9
    cooldown: int = 2
    hysteresis: int = 2
    patience: int = 3
    mode: str = "min"
    min_delta: float = 0.0
    collapse_drop: float = 0.5
    collapse_patience: int = 2

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "spike_factor", real_in("spike_factor", self.spike_factor, 1.0, math.inf,
                                           open_lo=True))  # fmt: skip
        set_(self, "spike_ema", real_in("spike_ema", self.spike_ema, 0.0, 1.0, open_hi=True))
        set_(self, "cooldown", int_at_least("cooldown", self.cooldown, 0))
        set_(self, "hysteresis", int_at_least("hysteresis", self.hysteresis, 1))
        set_(self, "patience", int_at_least("patience", self.patience, 1))
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        set_(self, "min_delta", real_in("min_delta", self.min_delta, 0.0, math.inf,
                                        open_hi=True))  # fmt: skip
        set_(self, "collapse_drop", real_in("collapse_drop", self.collapse_drop, 0.0, math.inf,
                                            open_lo=True))  # fmt: skip
        set_(self, "collapse_patience", int_at_least("collapse_patience", self.collapse_patience,
                                                     1))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain data (floats, ints, a string)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Safety:
        """Inverse of :meth:`to_dict` (missing keys take their defaults); an unknown key is a
        ``ValueError`` naming it."""
        return settings_from_mapping(cls, data, "safety")

    # -- the state machines these settings configure (fresh, empty state) ----------------
    def spike_monitor(self) -> SpikeMonitor:
        return SpikeMonitor(self.spike_factor, self.spike_ema)

    def fallback_gate(self) -> FallbackGate:
        return FallbackGate(self.cooldown, self.hysteresis)

    def validation_watch(self) -> ValidationWatch:
        return ValidationWatch(
            self.mode, self.patience, self.min_delta, self.collapse_drop, self.collapse_patience
        )
