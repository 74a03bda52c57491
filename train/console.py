"""What ``uvtrain`` prints around :func:`train.loop.fit`, :func:`train.infer.infer` and :func:`train.evaluate.evaluate`:
progress bars, summary tables, one-line errors and exit codes."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import zarr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from common.signals import interrupt_signal, interrupted_exit_code
from common.store import DamagedChunk, StoreMismatch
from train.config import EXIT_PREEMPTED, EvalConfig, ExportConfig, InferConfig, RunOptions, TrainConfig
from train.data import NoUsableSamples
from train.evaluate import YAW_BANDS, evaluate
from train.infer import InferSummary, infer
from train.loop import CHECKPOINT, RunError, fit

USER_ERRORS = (RunError, StoreMismatch, NoUsableSamples, DamagedChunk)


def one_line(e: BaseException) -> str:
    """A user error's message as one line. An error raised in a DataLoader worker reaches the main process with the
    worker's traceback in its message ("Caught X in DataLoader worker process 0. Original Traceback ... X: msg"):
    the message is its last line, after the exception's name."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(e).__name__}: "
    return last.split(name, 1)[1] if name in last else last


def _summary(result: dict, cfg: TrainConfig, run: RunOptions) -> Table:
    table = Table(title="uvtrain fit", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("run directory", str(run.run_dir))
    table.add_row("step", f"{result['step']} of {cfg.total_steps}")
    table.add_row("resumed", "yes" if result["resumed"] else "no")
    last = result["rows"][-1] if result["rows"] else {}
    for k, v in last.items():
        if k.startswith("loss") or k in ("steps_per_s", "data_wait_s"):
            table.add_row(k, f"{v:.4g}")
    if best := result.get("val_best"):
        table.add_row(f"best held-out {best['metric']} (best.pt)", f"{best['value']:.4g} at step {best['step']} "
                                                                   f"({best['method']})")
    return table


def run_fit(cfg: TrainConfig, run: RunOptions, console: Console | None = None) -> int:
    """Run :func:`fit` with a progress line; returns the exit code: 0 ok, 2 a user error (printed as one line),
    :data:`EXIT_PREEMPTED` stopped by a signal with its checkpoint written (one line)."""
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:  # under torchrun only rank 0 shows progress, the summary and the preemption line
        run = dataclasses.replace(run, progress=False)
    console = console or Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("[cyan]{task.fields[rate]}"), TextColumn("{task.fields[loss]}"),
                        TimeRemainingColumn(), console=console, disable=not run.progress)
    task = progress.add_task("uvtrain", total=cfg.total_steps, rate="", loss="")

    def on_log(row: dict, stop: int) -> None:
        loss = row.get("loss", float("nan"))
        progress.update(task, rate=f"{row['steps_per_s']:.2f} steps/s", loss=f"loss {loss:.4f}")

    stepped: list[int] = []  # the last step this invocation took

    def on_step(step: int, phase: str) -> None:
        stepped[:] = [step]
        progress.update(task, completed=step, description=phase)

    try:
        with progress:
            result = fit(cfg, run, on_log=on_log, on_step=on_step)
    except KeyboardInterrupt as e:  # SIGINT at any time; SIGTERM / SIGUSR1 before fit installs its StopSignals
        code = interrupted_exit_code(sig := interrupt_signal(e), EXIT_PREEMPTED)
        where = (f"at step {stepped[0]}: the steps since the last checkpoint are lost" if stepped else
                 "during start-up, before the first step: nothing trained")
        if main:
            console.print(f"uvtrain fit: interrupted by {sig} {where}; rerun the same command to resume (exit code "
                          f"{code})", highlight=False, soft_wrap=True)
        return code
    except USER_ERRORS as e:
        console.print(f"[red]error:[/red] {one_line(e)}", highlight=False, soft_wrap=True)
        return 2
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        console.print(f"[red]error:[/red] {cfg.store}: no store there ({e})", highlight=False, soft_wrap=True)
        return 2
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
    if result["preempted"]:
        if main:
            console.print(f"preempted by {result['preempted']} at step {result['step']} of {cfg.total_steps}: "
                          f"checkpoint written to {Path(run.run_dir) / CHECKPOINT}; rerun the same command to resume "
                          f"(exit code {EXIT_PREEMPTED}: requeue)", highlight=False, soft_wrap=True)
        return EXIT_PREEMPTED
    if run.progress:
        console.print(_summary(result, cfg, run))
    return 0


def _infer_summary(sm: InferSummary, cfg: InferConfig) -> Table:
    table = Table(title="uvtrain infer", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("photos", str(sm.photos))
    table.add_row("UV textures written", str(sm.written))
    table.add_row("meshes + views written", str(sm.meshes))
    table.add_row("framing / detector", f"{sm.framing} / {sm.detector}")
    table.add_row("shape fitter", sm.fitter)
    for reason, n in sorted(Counter(r for _, r, _ in sm.failures).items()):
        table.add_row(f"failed: {reason}", str(n))
    total = sum(sm.seconds.values()) or 1.0
    for stage, sec in sm.seconds.items():
        table.add_row(f"time: {stage}", f"{sec:.2f} s ({100 * sec / total:.0f} %)")
    table.add_row("output", str(cfg.out))
    return table


def _with_progress(label: str, show: bool, console: Console, work, unfinished: str):
    """Call ``work(report)`` under a progress bar (``report(done, total)``); (result, None) or (None, exit code) after
    printing one line: 2 for a user error, 128 + the signal's number for SIGINT / SIGTERM / SIGUSR1 (the line says how
    far it got and ``unfinished``: what is left incomplete)."""
    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=not show)
    task = progress.add_task(label, total=None)
    reached: list[int] = []

    def report(done: int, total: int) -> None:
        reached[:] = [done, total]
        progress.update(task, completed=done, total=total)

    try:
        with progress:
            return work(report), None
    except USER_ERRORS as e:
        console.print(f"[red]error:[/red] {one_line(e)}", highlight=False, soft_wrap=True)
        return None, 2
    except KeyboardInterrupt as e:
        code = interrupted_exit_code(sig := interrupt_signal(e))
        where = f"after {reached[0]} of {reached[1]}" if reached else "during start-up"
        console.print(f"uvtrain {label}: interrupted by {sig} {where}: {unfinished}; rerun the same command (exit code "
                      f"{code})", highlight=False, soft_wrap=True)
        return None, code


def run_infer(cfg: InferConfig, console: Console | None = None) -> int:
    """Run :func:`train.infer.infer` with a progress bar and a summary; 0 ok, 2 a user error, 130 / 143 interrupted
    (one line each)."""
    console = console or Console(stderr=True)
    sm, code = _with_progress("infer", cfg.progress, console, lambda report: infer(cfg, on_photo=report),
                              f"{cfg.out} lacks the photos not done and failures.csv")
    if code:
        return code
    for note in sm.notes:
        console.print(f"note: {note}", highlight=False)
    if sm.failures:
        console.print(f"{len(sm.failures)} photo(s) failed: see {cfg.out / 'failures.csv'}", highlight=False)
    if cfg.progress:
        console.print(_infer_summary(sm, cfg))
    return 0


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def eval_tables(result: dict) -> list[Table]:
    """Table 1's layout (reconstruction, identity) and, with ground truth, completion MAE x 255 per yaw band."""
    t = Table(title=f"uvtrain eval: {result['samples']} samples of {result['store']}", show_header=True)
    for col in ("method", "L1", "SSIM", "ID Recon", "ID Front", "L1 (face px)"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for m, row in result["methods"].items():
        t.add_row(m, _fmt(row.get("l1")), _fmt(row.get("ssim")), _fmt(row.get("id_recon")),
                  _fmt(row.get("id_front")), _fmt(row.get("l1_face")))
    tables = [t]
    if any("completion_mae_255" in r for r in result["methods"].values()):
        c = Table(title="completion against uv_true: mean abs. error x 255 (seen / unseen / all face texels)")
        c.add_column("method")
        for band in ("all", *(b[0] for b in YAW_BANDS)):
            c.add_column(band, justify="right")
        for m, row in result["methods"].items():
            comp = row.get("completion_mae_255", {})
            c.add_row(m, *(" / ".join(_fmt(comp.get(band, {}).get(k), 1) for k in ("seen", "unseen", "all"))
                           + f" (n={comp.get(band, {}).get('samples', 0)})"
                           for band in ("all", *(b[0] for b in YAW_BANDS))))
        tables.append(c)
    return tables


def run_eval(cfg: EvalConfig, console: Console | None = None) -> int:
    """Run :func:`train.evaluate.evaluate` with a progress bar and the tables; 0 ok, 2 a user error, 130 / 143
    interrupted (one line each)."""
    console = console or Console(stderr=True)
    result, code = _with_progress("eval", cfg.progress, console, lambda report: evaluate(cfg, on_batch=report),
                                  f"{cfg.out} not written")
    if code:
        return code
    if cfg.progress:
        for table in eval_tables(result):
            console.print(table)
    if result["failures"]:
        console.print(f"{len(result['failures'])} store sample(s) not usable (listed in {cfg.out})", highlight=False)
    console.print(f"wrote {cfg.out}", highlight=False)
    return 0


def run_export(cfg: ExportConfig, console: Console | None = None) -> int:
    """Run :func:`train.export.export_run`; 0 ok (one line naming the folder), 2 a user error (one line)."""
    from train.export import export_run

    console = console or Console(stderr=True)
    try:
        manifest = export_run(cfg)
    except RunError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"exported step {manifest['step']} ({manifest['source']['checkpoint']}) to {cfg.out}: "
                  f"{len(manifest['files'])} files + export.json", highlight=False, soft_wrap=True)
    return 0
