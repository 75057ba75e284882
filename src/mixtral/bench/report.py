"""The one table every ``mixtral bench`` prints: a title naming the model and device, then metric / value rows (or,
given a header, rows of as many columns).

Not here: the measurements themselves, and the JSON records (each benchmark writes its own fields).
"""

from __future__ import annotations


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
    """A rich table (plain text when stdout is not a terminal): two unlabelled columns, or ``header``'s."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=header is not None)
    for name in header or ():
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if header is not None and not console.is_terminal:  # a file or pipe: no 80-column cut of the many columns
        console = Console(width=160)
    console.print(table)
