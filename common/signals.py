"""Temporary signal handlers, the one way ``uvprep`` and ``uvtrain`` install them."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping

__all__ = ["signal_handlers"]


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
