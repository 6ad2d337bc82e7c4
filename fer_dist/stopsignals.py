"""The stop signals, and the helper processes that must never die of them.

SLURM sends its stop signals (SIGTERM, SIGUSR1 at the time-limit warning) to every process of a job and a
terminal's Ctrl-C reaches the whole group: the stop is the trainer's to handle at a step boundary. A helper
process inherits its starter's signal mask, so one started with the stop signals blocked never takes them.
No torch import here: the image-work helpers of `fer-dist shard` import this module's users.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """The calling thread with the stop signals blocked (held, not lost), restored at the end."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ensure_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, where not yet running, with the stop signals blocked.

    Whoever starts it first (a loader's workers, `fer-dist shard`'s helpers) decides its mask for the
    process's life: started unblocked, a SIGUSR1 to every process ends it, and the tracker started again
    prints a KeyError traceback per semaphore its predecessor registered."""
    with stop_signals_blocked():
        resource_tracker.ensure_running()
