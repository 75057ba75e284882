"""The trainer's progress display: a rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """``update(step, loss, aux, tok_s)`` after each step; values of None keep the last ones shown."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total, self.start = total, start
        self.fields = {"loss": "-", "aux": "-", "toks": "-"}
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> TrainProgress:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  aux {task.fields[aux]}  {task.fields[toks]} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, **self.fields)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.__exit__(exc_type, exc, tb)

    def update(self, step: int, loss: float | None, aux: float | None, tok_s: float | None) -> None:
        if loss is not None:
            self.fields = {"loss": f"{loss:.4f}", "aux": f"{aux:.4f}", "toks": f"{tok_s:,.0f}"}
            if self.enabled and not self.live:
                self.console.print(f"step {step}/{self.total}  loss {self.fields['loss']}  aux {self.fields['aux']}"
                                   f"  {self.fields['toks']} tok/s", highlight=False)
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step, **self.fields)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, total=total)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)
