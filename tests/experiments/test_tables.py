"""The shared table printer: plain aligned text off a terminal, a rich table on one, the same
rows and footer either way; rows of the wrong width are refused."""

from __future__ import annotations

import io

import pytest

from layerwise.experiments.tables import plain_table, print_table

COLUMNS = [("group", False), ("params", True)]
ROWS = [["stem", "1,024"], ["head[0]", "10"]]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_off_a_terminal():
    out = io.StringIO()
    print_table("title", COLUMNS, ROWS, ["footer line"], file=out)
    assert out.getvalue().splitlines() == [
        "title",
        "group    params",
        "stem      1,024",
        "head[0]      10",
        "footer line",
    ]


def test_rich_on_a_terminal_keeps_cells_verbatim():
    out = Terminal()
    print_table("title [x]", COLUMNS, ROWS, ["footer [bold]line[/bold]"], file=out)
    text = out.getvalue()
    assert "─" in text  # a drawn table
    for cell in ("title [x]", "stem", "1,024", "head[0]", "footer [bold]line[/bold]"):
        assert cell in text  # no markup interpretation


def test_rows_of_the_wrong_width_are_refused():
    with pytest.raises(ValueError, match="rows must have 2 cells each"):
        plain_table("t", COLUMNS, [["only one"]])
