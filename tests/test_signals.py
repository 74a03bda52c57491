"""common.signals.signal_handlers: installed for the block, restored after it, nothing outside the main thread."""

from __future__ import annotations

import os
import signal
import threading

from common.signals import signal_handlers


def test_handlers_are_installed_and_restored():
    got = []
    before = signal.getsignal(signal.SIGUSR2)
    with signal_handlers({signal.SIGUSR2: lambda s, f: got.append(s)}) as installed:
        assert installed
        os.kill(os.getpid(), signal.SIGUSR2)
    assert got == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2) == before


def test_nothing_is_installed_outside_the_main_thread():
    seen = []

    def run():
        with signal_handlers({signal.SIGUSR2: signal.SIG_IGN}) as installed:
            seen.append(installed)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [False]
