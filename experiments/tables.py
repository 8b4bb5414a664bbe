"""The tables the commands print: drawn with ``rich`` on a terminal, aligned plain text
otherwise (pipes, files, CI logs), the same rows either way.

A table is a title, columns ``(header, right_aligned)``, rows of cell texts and footer lines
printed under it. ``rich`` (the ``experiments`` extra) is imported only to draw on a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

__all__ = ["plain_table", "print_table"]

Columns = Sequence[tuple[str, bool]]


def plain_table(title: str, columns: Columns, rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of the plain table: the title, the header, one line per row; columns two
    spaces apart, right-aligned ones padded on the left.

    >>> plain_table("t", [("name", False), ("n", True)], [["a", "10"], ["bb", "2"]])
    ['t', 'name   n', 'a     10', 'bb     2']
    """
    if not isinstance(title, str) or not columns:
        raise TypeError(f"title must be a str and columns non-empty, got {title!r}, {columns!r}")
    headers = [header for header, _ in columns]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"rows must have {len(columns)} cells each, got {list(row)!r}")
    widths = [max(len(str(c)) for c in [h, *(r[i] for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = zip(cells, widths, columns, strict=True)
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, (_, right) in parts)

    return [title, *(line(r).rstrip() for r in [headers, *rows])]


def print_table(
    title: str,
    columns: Columns,
    rows: Sequence[Sequence[str]],
    footer: Sequence[str] = (),
    *,
    file: IO[str] | None = None,
) -> None:
    """Print the table and its footer to ``file`` (default: standard output): with ``rich``
    when ``file`` is a terminal, else :func:`plain_table`."""
    file = sys.stdout if file is None else file
    lines = plain_table(title, columns, rows)  # also checks the rows
    if not (hasattr(file, "isatty") and file.isatty()):
        file.write("\n".join([*lines, *footer]) + "\n")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=file, highlight=False, soft_wrap=False, force_terminal=True)
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, title_justify="left")
    for header, right in columns:
        table.add_column(header, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    # never squeeze numbers: on a narrow terminal the lines wrap instead
    console.width = max(console.width, max(len(line) for line in lines) + 4 * len(columns))
    console.print(table)
    for line in footer:
        console.print(Text(line))
