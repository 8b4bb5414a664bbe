"""The summary table ``layerwise analyze`` prints: a rich table on a terminal, aligned plain
text otherwise (pipes, files, CI logs), one row per parameter group."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["fmt", "print_table", "table_rows"]

#: (header, right-aligned) per column of the table.
HEADERS = (
    ("group", False),
    ("params", True),
    ("‖θ‖", True),
    ("‖G‖", True),
    ("grad var", True),
    ("noise/signal", True),
    ("tr(H) ± se", True),
    ("curvature", True),
    ("multiplier", True),
)


def fmt(value: float | int | None, digits: int = 3) -> str:
    """Short text of a number: ``-`` for None, ``nan``/``inf`` kept visible.

    >>> fmt(None), fmt(float("nan")), fmt(12345.678), fmt(7)
    ('-', 'nan', '1.23e+04', '7')
    """
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def table_rows(
    groups: Sequence[Mapping[str, Any]], multipliers: Mapping[str, float]
) -> list[list[str]]:
    """One list of cell texts per group (``groups`` are :meth:`GroupEstimate.to_dict` rows)."""
    rows = []
    for g in groups:
        name = g["group"]
        trace, se = g.get("hessian_trace"), g.get("hessian_trace_stderr")
        n = g.get("num_params") or 0
        curvature = None if trace is None or n == 0 else trace / n
        trace_text = fmt(trace) if se is None else f"{fmt(trace)} ± {fmt(se, 2)}"
        rows.append(
            [
                name,
                fmt(int(n)),
                fmt(g.get("param_norm")),
                fmt(g.get("grad_norm")),
                fmt(g.get("grad_variance")),
                fmt(g.get("noise_to_signal")),
                trace_text,
                fmt(curvature),
                fmt(multipliers.get(name)),
            ]
        )
    return rows


def _plain(title: str, rows: list[list[str]], footer: Sequence[str]) -> str:
    headers = [h for h, _ in HEADERS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, (_, right) in zip(cells, widths, HEADERS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(headers), rule, *(line(r) for r in rows), *footer]) + "\n"


def print_table(
    title: str,
    rows: list[list[str]],
    footer: Sequence[str] = (),
    *,
    file: IO[str],
    terminal: bool | None = None,
) -> None:
    """Print the table to ``file``: rich when ``file`` is a terminal (or ``terminal`` is True),
    plain aligned text otherwise."""
    if terminal is None:
        isatty = getattr(file, "isatty", None)
        terminal = bool(isatty and isatty())
    if not terminal:
        file.write(_plain(title, rows, footer))
        file.flush()
        return
    from rich import box  # only on a terminal
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False, soft_wrap=False, force_terminal=True)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for header, right in HEADERS:
        table.add_column(
            header,
            justify="right" if right else "left",
            no_wrap=True,
            style="bold" if header == "group" else None,
        )
    for row in rows:
        table.add_row(*row)
    # never squeeze numbers: on a narrow terminal the lines wrap instead
    natural = console.measure(table, options=console.options.update(max_width=10_000)).maximum
    console.width = max(console.width, natural)
    console.print(table)
    for line in footer:
        console.print(line, markup=False, highlight=False)
