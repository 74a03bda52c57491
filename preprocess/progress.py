"""Progress bars and the build summary table (rich); everything here is presentation only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table


class BuildProgress:
    """A rich progress display with a samples/s column; a no-op when disabled."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TaskProgressColumn(), TextColumn("[cyan]{task.fields[rate]}"),
                                  TimeRemainingColumn(), console=console, disable=not enabled)

    def __enter__(self) -> BuildProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def add(self, description: str, total: int) -> int:
        return self._progress.add_task(description, total=total, rate="")

    def advance(self, task: int, n: int) -> None:
        self._progress.advance(task, int(n))
        t = self._progress.tasks[[x.id for x in self._progress.tasks].index(task)]
        speed = t.speed
        self._progress.update(task, rate=f"{speed:.1f} samples/s" if speed else "")


def summary_table(summary, fit=None) -> Table:
    """A rich table of a :class:`preprocess.build.BuildSummary` (and of the fitter that ran, when given)."""
    from common.faces.fit import describe_fit

    table = Table(title="uvprep build", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    if fit is not None:
        table.add_row("fitter", describe_fit(fit))
    done = summary.ok + sum(summary.failed.values())
    table.add_row("samples in store", str(summary.n_samples))
    table.add_row("processed this run", str(done))
    table.add_row("ok", str(summary.ok))
    for reason, count in sorted(summary.failed.items()):
        table.add_row(f"failed: {reason}", str(count))
    table.add_row("chunks already complete (skipped)", str(summary.skipped_chunks))
    table.add_row("chunks written", str(summary.done_chunks))
    for chunk, err in sorted(summary.failed_chunks.items()):
        table.add_row(f"[red]chunk {chunk} FAILED", err[:80])
    total = sum(summary.stage_seconds.values()) or 1.0
    for stage, sec in sorted(summary.stage_seconds.items(), key=lambda kv: -kv[1]):
        per = 1000 * sec / max(done, 1)
        table.add_row(f"time: {stage}", f"{sec:.1f} s ({100 * sec / total:.0f}%, {per:.1f} ms/sample)")
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    table.add_row("throughput", f"{done / max(summary.wall_seconds, 1e-9):.2f} samples/s")
    return table
