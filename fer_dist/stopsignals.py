"""A rank's stop and its end: the stop signals, the stop request, the one-line error and the stopped message.

SLURM sends its stop signals (SIGTERM, SIGUSR1 at the time-limit warning) to every process of a job and a
terminal's Ctrl-C reaches the whole group: the stop is the trainer's to handle at a step boundary (it agrees
on `StopRequest.requested` with `dist.any_process` and checkpoints). A helper process inherits its starter's
signal mask, so one started with the stop signals blocked never takes them. `fer_dist.launch` starts the
ranks with them blocked too: a request that arrives while a rank is still importing waits until its
`StopRequest` exists. Nothing here knows the launcher beyond the environment it sets. No torch import: the
image-work helpers of `fer-dist shard` import this module's users.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from pathlib import Path
from types import FrameType
from typing import Any

from fer_dist.launchenv import ERRORS_ENV

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


class StopRequest:
    """Sets `requested` on SIGTERM, SIGUSR1 or a first SIGINT, so the trainer stops at a step boundary.

    A second SIGINT exits at once (code 130): the user pressed Ctrl-C twice and wants no checkpoint.
    The launcher found gone (this rank's parent changed) also counts as a request: orphaned ranks should
    save and end rather than train on unsupervised. Handlers are installed on creation (main thread only),
    the signals unblocked (a request held back since start-up arrives now), and the previous handlers
    restored by close(); they are not chained: a default SIGTERM would kill the process the stop saves.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")) -> None:
        self._requested: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._parent = os.getppid()
        self._launched = "LOCAL_RANK" in os.environ  # started by torchrun / accelerate launch
        for name in signals:
            sig = getattr(signal, name, None)
            if sig is not None:  # SIGUSR1 does not exist on Windows
                self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._requested == "SIGINT":
            print("interrupted again: exiting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        # The first request names the stop: a Ctrl-C followed by a SIGUSR1 stays a Ctrl-C.
        self._requested = self._requested or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived since creation, or the launcher that started this rank is gone."""
        if self._requested is None and self._launched and os.getppid() != self._parent:
            self._requested = "launcher gone"
        return self._requested is not None

    @property
    def signal_name(self) -> str | None:
        """The name of the signal that asked to stop (the first one), "launcher gone", or None."""
        return self._requested

    def close(self) -> None:
        """Restore the handlers that were installed before this object."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def report_error(message: str, code: int = 2) -> None:
    """A rank's one-line error: into the launcher's folder where it named one, else printed by rank 0.

    Every rank reaches a config or data error alike; printed by each, a 2-process launch shows it twice."""
    rank = int(os.environ.get("RANK", "0"))
    folder = os.environ.get(ERRORS_ENV)
    if folder and Path(folder).is_dir():
        with contextlib.suppress(OSError):  # the launcher then names the rank and its code instead
            (Path(folder) / f"rank-{rank}.json").write_text(json.dumps({"code": code, "message": message}))
            return
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def stopped(run: Any, message: str) -> int:
    """A rank's end after a stop request (its checkpoint is written): say so; returns the exit code.

    Under a launcher a stopped rank exits 0 (anything else is a failure to it); the launcher returns 130
    for a Ctrl-C. Standalone, a Ctrl-C'd run returns 130 itself."""
    run.log.say(f"{message}; the same command resumes from its checkpoint (run.resume=auto)")
    return 130 if run.stop.signal_name == "SIGINT" and "LOCAL_RANK" not in os.environ else 0
