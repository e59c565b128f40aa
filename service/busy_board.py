"""Which worker processes of one `mvke serve` have requests in flight: a page of shared memory.

The batcher's idle bypass gives a lone request's model call a second thread (the idle session), which
pays only when the box's other core is free. A worker sees only its own requests: at c=4 on 2 workers
each one often found itself idle while the other worker was busy, and the idle call's second thread
took that worker's core (c=4 QPS -13%, p99 twice as long: docs/results/predictor_ab/README.md, eleventh
session). So each worker writes its number of requests in flight into its own slot of a board the
workers share, and a request counts as lone only when every other slot reads 0.

`mvke serve` creates the board (one 64-byte slot per worker, so that two workers' writes never share a
cache line) in shared memory and names it in MVKE_BUSY_BOARD before the workers start; each worker
claims a free slot with a lock on that byte range (the kernel releases it when the worker dies, so a
restarted worker takes its place). A process started without a board (one worker under plain uvicorn,
the tests' in-process apps) has no one to share the box with and sees every other slot idle.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import tempfile
from pathlib import Path

log = logging.getLogger("mvke.service")

BOARD_ENV = "MVKE_BUSY_BOARD"
SLOT = 64       # bytes per worker: one cache line


def board_dir() -> str:
    """Shared memory where the system has it, else the temp directory (a file the page cache keeps)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def create_board(workers: int) -> Path:
    """The board of a `mvke serve` with `workers` processes (the caller removes it when they end)."""
    fd, name = tempfile.mkstemp(prefix="mvke-busy-", dir=board_dir())
    try:
        os.ftruncate(fd, max(1, workers) * SLOT)
    finally:
        os.close(fd)
    return Path(name)


class BusyBoard:
    """This worker's slot on the shared board, and a look at the others'."""

    def __init__(self, path: str | os.PathLike):
        self._fd = os.open(path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size)
        self._own = self._claim(size // SLOT)
        # the other slots' first bytes, read on every lone request (two workers: one read)
        self._others = tuple(i * SLOT for i in range(size // SLOT) if i != self._own)

    def _claim(self, slots: int) -> int | None:
        for i in range(slots):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, SLOT, i * SLOT)
            except OSError:
                continue    # another live worker's
            self._map[i * SLOT] = 0         # a dead worker's count, if it held this slot
            return i
        log.warning("busy board: all %d slots are taken; this worker's requests are not shown to the others", slots)
        return None

    @classmethod
    def from_env(cls) -> BusyBoard | None:
        path = os.environ.get(BOARD_ENV)
        if not path:
            return None
        try:
            return cls(path)
        except (OSError, ValueError) as e:      # a board that vanished: run as if alone, say so once
            log.warning("busy board %s unusable (%s): each worker sees only its own requests", path, e)
            return None

    def set_inflight(self, n: int) -> None:
        if self._own is not None:
            self._map[self._own * SLOT] = n if n < 255 else 255

    def others_idle(self) -> bool:
        m = self._map
        for at in self._others:
            if m[at]:
                return False
        return True

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)      # releases the slot's lock
