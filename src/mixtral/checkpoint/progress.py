"""A rich progress bar over checkpoint tensors, shown only on a terminal (or when asked)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], total: int, description: str, show: bool | None = None) -> Iterator[T]:
    """Yield ``items``, drawing a transient bar on stderr when it is a terminal (``show=None``) or ``show``."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
