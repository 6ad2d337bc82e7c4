"""The shard job's image work on all cores: load, align and PNG-encode each face, results in order.

The job's own process takes part (it also writes the shards), with `workers - 1` helper processes. This
module is all a helper's tasks import: not the shard writer, as webdataset imports torch, seconds of
start-up in a helper that does no tensor work. (Under the `fer-dist` command a spawned helper also re-runs
the command's main module, and with it imports the CLI and torch.)
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np

from fer_dist.data.faces import align_face, to_channels
from fer_dist.data.sources import ImageReadError
from fer_dist.data.sources.base import ImageFile, decode_image, read_file
from fer_dist.stopsignals import ensure_resource_tracker


@dataclass(frozen=True)
class ImageParams:
    """How every face is turned into PNG bytes (sent once to each worker)."""

    size: int
    channels: int
    align: str


# (png, detected, why the image was skipped, the size in bytes of the image file read, if one was)
Processed = tuple[bytes | None, bool | None, str | None, int | None]
Loads = list[Callable[[], np.ndarray]]


def process_chunk(loads: Loads, params: ImageParams) -> list[Processed]:
    """_process_image of a run of loaders: one task for a helper process (one message each way per chunk).

    The run's files are read first, then decoded and encoded: alternating file reads with image coding made
    each face slower (timed side by side in one process; docs/design/shard-job.md).
    """
    files = [_read_ahead(load) for load in loads]
    return [_process_image(load, data, params) for load, data in zip(loads, files, strict=True)]


def _read_ahead(load: Callable[[], np.ndarray]) -> bytes | ImageReadError | None:
    """An ImageFile loader's file bytes, or why they cannot be read; None for other loaders (they read when
    called)."""
    if not isinstance(load, ImageFile):
        return None
    try:
        return read_file(load.path)
    except ImageReadError as exc:
        return exc


def _process_image(load: Callable[[], np.ndarray], data: bytes | ImageReadError | None,
                   params: ImageParams) -> Processed:
    """Load one face (from what _read_ahead gave for its loader), convert its channels, align it and encode it
    as PNG; a corrupt file gives a reason."""
    file_size = None
    try:
        if data is None:
            image = load()
        elif isinstance(data, ImageReadError):
            raise data
        else:  # an ImageFile's bytes: their size comes back with the face, for the source fingerprint
            file_size = len(data)
            image = decode_image(data, load.path)  # type: ignore[attr-defined]
    except ImageReadError as exc:
        return None, None, exc.reason, file_size
    face = align_face(to_channels(image, params.channels), params.size, params.align)
    pixels = face.image
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR: the PNG then holds true RGB
    ok, png = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError(f"cv2.imencode failed on a {pixels.shape} image")
    return png.tobytes(), face.detected, None, file_size


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    # A corrupt file is reported once, as a skipped entry; OpenCV would also log it to stderr.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


# Images per task (at most; small jobs get smaller chunks so that every process gets several). The pool's
# threads in this process (pickling, results) cost less per image in larger chunks.
CHUNK = 256
DEPTH = 3  # tasks queued or running per helper, so a helper never waits for this process to hand out work


class Processor:
    """Maps loaders to Processed results in order, on `workers` processes: this one and workers - 1 helpers.

    This process writes the results; it takes a chunk of image work itself whenever the next chunk to write
    is still being worked on and nothing else is ready, and does all of it until a helper has started (spawn
    and importing OpenCV take a second or so, in which this process is not idle). With one worker there is no
    pool at all. Results do not depend on which process made them.
    """

    def __init__(self, workers: int) -> None:
        self.helpers = workers - 1
        self.pool: ProcessPoolExecutor | None = None
        self._started: list[Future] = []  # one trivial task per helper: done once the helper is up
        self._up = False

    def __enter__(self) -> Processor:
        # This process does image work too: quiet and single-threaded OpenCV, as in the helpers, until exit.
        self._log_level, self._threads = cv2.utils.logging.getLogLevel(), cv2.getNumThreads()
        _init_worker()
        if self.helpers == 0:
            return self
        # spawn, not fork: forking a parent that runs threads (OpenCV's, rich's, torch's) can deadlock the
        # child. An executor, not multiprocessing.Pool: a worker that dies (say, a caller's unguarded
        # __main__ re-run under spawn) raises BrokenProcessPool instead of being respawned forever.
        ctx = multiprocessing.get_context("spawn")
        ensure_resource_tracker()  # spawn starts it otherwise, unprotected from a job's stop signals
        self.pool = ProcessPoolExecutor(self.helpers, mp_context=ctx, initializer=_init_worker)
        # Start every helper now: they import OpenCV while this process lists the source. They do no linear
        # algebra: without this, numpy's OpenBLAS starts a thread per core in each, and those threads spin
        # for a while (CPU taken from this process on a small machine).
        with _environ(OPENBLAS_NUM_THREADS="1"):
            self._started = [self.pool.submit(os.getpid) for _ in range(self.helpers)]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        cv2.utils.logging.setLogLevel(self._log_level)
        cv2.setNumThreads(self._threads)
        if self.pool is not None:
            # After an error (bad input found while listing, Ctrl-C), or when this process did all the work
            # before any helper was up (a small job), do not wait for helpers still importing: they exit on
            # their own when they see the shutdown.
            self.pool.shutdown(wait=exc_type is None and self._helpers_up(), cancel_futures=True)

    def map(self, loads: Loads, params: ImageParams) -> Iterator[Processed]:
        """_process_image of every loader, in the order of `loads`."""
        size = max(1, min(CHUNK, len(loads) // (8 * (self.helpers + 1))))
        chunks = [loads[i:i + size] for i in range(0, len(loads), size)]
        if self.pool is None:
            # The same chunks as with helpers: image work and writing alternate chunk by chunk.
            return (result for chunk in chunks for result in process_chunk(chunk, params))
        return self._shared(chunks, params)

    def _shared(self, chunks: list[Loads], params: ImageParams) -> Iterator[Processed]:
        """The chunks' results in order, the work shared between this process and the helpers."""
        assert self.pool is not None
        running: dict[int, Future] = {}  # chunks given to helpers, until their turn to be written
        ahead: dict[int, list[Processed]] = {}  # chunks done (here or by a helper), until their turn
        given = 0  # chunks before this index are given out (to a helper, or done here)
        for k in range(len(chunks)):  # every chunk before k is written, so k <= given
            while k not in ahead:
                if given < len(chunks) and self._helpers_up():  # keep each helper's queue full
                    busy = sum(not f.done() for f in running.values())
                    while given < len(chunks) and busy < DEPTH * self.helpers:
                        running[given] = self.pool.submit(process_chunk, chunks[given], params)
                        given, busy = given + 1, busy + 1
                future = running.get(k)
                # Wait for chunk k when it is ready, when nothing is left to do here, or when later chunks are
                # ready (the helpers are ahead: writing is the bottleneck, image work here would slow it).
                if future is not None and (future.done() or given == len(chunks)
                                           or any(f.done() for f in running.values())):
                    ahead[k] = running.pop(k).result()
                else:  # chunk k is not given out yet, or every helper is busy: do the next chunk here
                    ahead[given] = process_chunk(chunks[given], params)
                    given += 1
            yield from ahead.pop(k)

    def _helpers_up(self) -> bool:
        """Whether a helper has started (a failed start shows as BrokenProcessPool at the next submit)."""
        self._up = self._up or any(f.done() for f in self._started)
        return self._up


@contextmanager
def _environ(**defaults: str) -> Iterator[None]:
    """Environment variables set where the user has not set them (for processes started meanwhile)."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
