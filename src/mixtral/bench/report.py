"""The one table every ``mixtral bench`` prints: a title naming the model and device, then metric / value rows.

Not here: the measurements themselves, and the JSON records (each benchmark writes its own fields).
"""

from __future__ import annotations


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column rich table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
