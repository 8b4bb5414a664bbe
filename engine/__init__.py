"""Engine: :class:`LayerwiseOptimizer` wraps a torch optimizer and applies per-group
multipliers from a controller, refreshed at each recalibration."""

__all__: list[str] = []
