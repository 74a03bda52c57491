"""Temporary signal handlers, the one way ``uvprep`` and ``uvtrain`` install them."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping

__all__ = [
    "STOP_SIGNALS",
    "SignalInterrupt",
    "blocked_signals",
    "interrupt_signal",
    "interrupted_exit_code",
    "signal_handlers",
    "signals_interrupt",
]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What a scheduler sends to stop or preempt a job (SLURM: SIGUSR1 as the warning, SIGTERM at the limit / scancel);
their default action ends a Python process silently."""


@contextlib.contextmanager
def signal_handlers(handlers: Mapping[signal.Signals, Callable | int]) -> Iterator[bool]:
    """Install ``handlers`` (signal -> handler, ``SIG_IGN`` or ``SIG_DFL``) for the ``with`` block and restore the
    previous ones after it. Python handles signals in the main thread only: elsewhere nothing is installed and the
    block gets False (True when installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler not installed from Python


@contextlib.contextmanager
def blocked_signals(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Block ``signals`` in the calling thread for the ``with`` block (they stay pending and arrive after it). A
    process forked or a thread started inside the block starts with them blocked: it can install its own handling
    before any of them reaches it (see :func:`train.data.make_loader`)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalInterrupt(KeyboardInterrupt):
    """A KeyboardInterrupt raised for another signal than SIGINT by :func:`signals_interrupt`; its message is the
    signal's name. A subclass, not KeyboardInterrupt itself: CPython ends a process whose KeyboardInterrupt ever left
    code run through ``PyRun_*`` (imports of some extensions) by re-sending itself SIGINT, even when the interrupt was
    caught later, which would replace the command's exit code with 130."""


def _interrupt(signum: int, frame) -> None:
    raise SignalInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_interrupt(signals: tuple[signal.Signals, ...]) -> Iterator[bool]:
    """For the ``with`` block, each of ``signals`` raises :class:`SignalInterrupt` (a KeyboardInterrupt) in the main
    thread, as Ctrl-C's SIGINT does: a command unwinds the same way for all of them and says so in one line, where the
    default action would end it silently (SIGTERM, SIGUSR1). A handler installed inside the block (a trainer's stop
    request) takes over until it is restored. Yields whether the handlers were installed (see
    :func:`signal_handlers`)."""
    with signal_handlers({s: _interrupt for s in signals}) as installed:
        yield installed


def interrupt_signal(e: KeyboardInterrupt) -> str:
    """The signal behind a KeyboardInterrupt: the one :func:`signals_interrupt` raised it for, else ``SIGINT``."""
    return str(e) if isinstance(e, SignalInterrupt) else "SIGINT"


def interrupted_exit_code(sig: str, stop_code: int | None = None) -> int:
    """A command's exit code after ``sig`` ended it: the shell's 128 + its number (SIGINT 130, SIGTERM 143), or
    ``stop_code`` for :data:`STOP_SIGNALS` where the command gives them a meaning of its own (``uvtrain fit``'s 124:
    preempted, rerun to resume)."""
    s = signal.Signals[sig]
    return stop_code if stop_code is not None and s in STOP_SIGNALS else 128 + int(s)
