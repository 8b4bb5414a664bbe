"""Policies: parameter grouping, schedules, per-group factors and the sensitivity controller.

May use the report type of :mod:`sensitivity`; imports nothing else of the project.
"""

__all__: list[str] = []

# Each section below is owned by one module; add its re-exports in its own section.
# -- grouping --
# -- schedules --
# -- factors --
# -- scheduler --
# -- controller --
