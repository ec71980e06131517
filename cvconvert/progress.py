"""Training progress on stderr: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys


class Reporter:
    """A rich progress bar on a terminal, plain log lines otherwise (stderr; rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.progress = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=False)
            self.progress.start()
        self.task = None

    def epoch(self, epoch: int, epochs: int, steps: int):
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, stats="")

    def step(self, text: str, line: str | None):
        if self.progress is not None:
            self.progress.update(self.task, advance=1, stats=text)
        elif self.enabled and line:
            print(line, file=sys.stderr, flush=True)

    def log(self, msg: str):
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.progress is not None:
            self.progress.stop()


def fmt(stats: dict) -> str:
    out = f"loss {stats['loss']:.4f} acc {1 - stats['error']:.3f}"
    if "wdist" in stats:
        out += f" W {stats['wdist']:.3f}"
    return out
