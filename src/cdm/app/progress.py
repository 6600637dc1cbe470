"""Progress of training jobs: on a terminal, a rich bar per job with its loss and steps/s;
otherwise (output to a log or a pipe), a plain line per job every `PLAIN_EVERY` percent,
with its steps/s and the time left, so a long run is never silent."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..training.job import Progress as ProgressCallback

PLAIN_EVERY = 5  # percent of a job between two plain lines


def training_progress(console: Console) -> tuple[contextlib.AbstractContextManager, ProgressCallback]:
    """(a context to run the jobs in, the callback they report to)."""
    if not console.is_terminal:
        return contextlib.nullcontext(), plain_progress(console)
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


def plain_progress(console: Console) -> ProgressCallback:
    """A callback that prints one line per job each time it passes another PLAIN_EVERY percent."""
    started: dict[str, tuple[float, int]] = {}  # job -> (time, steps done) when first reported
    shown: dict[str, int] = {}  # job -> last percent printed

    def cb(name: str, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        t0, d0 = started.setdefault(name, (now, done - 1))
        pct = 100 * done // max(total, 1)
        if name in shown and pct < shown[name] + PLAIN_EVERY and done < total:
            return
        shown[name] = pct
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        left = f", about {(total - done) / rate:.0f} s left" if rate and done < total else ""
        console.print(f"train {name}: {pct}% ({done}/{total} steps), loss {loss:.4f}"
                      + (f", {rate:.1f} steps/s" if rate else "") + left, highlight=False, markup=False)

    return cb
