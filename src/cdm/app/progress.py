"""Progress bars for training jobs (rich): one bar per job, with its loss and steps/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..training.job import Progress as ProgressCallback


def training_progress(console: Console) -> tuple[Progress, ProgressCallback]:
    """A rich progress bar per job with loss and steps/s; returns (progress, callback)."""
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]} steps/s"),
                    TimeRemainingColumn(), console=console)
    tasks: dict[str, int] = {}

    def cb(name: str, done: int, total: int, loss: float) -> None:
        if name not in tasks:
            tasks[name] = prog.add_task(name, total=total, completed=done - 1, loss=loss, rate="-")
        t = prog.tasks[tasks[name]]
        prog.update(tasks[name], completed=done, loss=loss, rate=f"{t.speed:.1f}" if t.speed else "-")

    return prog, cb
