"""Stopping a run cleanly on SIGINT/SIGTERM: the operator's signal ends the round loop within
seconds, the run directory keeps every completed round and ``--resume`` continues it.

Ray installs its own SIGTERM handlers in the process that starts it (one exits, one aborts), so
``simulate`` runs the simulation runtime in a child process in its own session and keeps the
signals in the parent (:func:`supervise`): the parent writes the stop request to a file the
child's round loop polls (:class:`StopRequest`), between and during every exchange with the
sites (``server.messaging``). The child raises :class:`RunStopped`, which the round loop turns
into an audited ``run-stopped`` entry, ``model-final.npz`` and ``metrics.json``. A second
signal while stopping kills the child's session at once (exit 130).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from privacy.errors import ServiceError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_SECONDS = 0.2


class RunStopped(ServiceError, RuntimeError):
    """The operator stopped the run (a signal); the run directory can be resumed."""


class StopRequest:
    """A stop request: set in this process (:meth:`request`) or by another one (the file ``file``
    exists; its text is the reason)."""

    def __init__(self, file: Path | None = None) -> None:
        self.file = Path(file) if file is not None else None
        self._event = threading.Event()
        self._reason = ""

    @property
    def reason(self) -> str:
        if not self._reason and self.file is not None and self.file.is_file():
            self._reason = self.file.read_text().strip()
        return self._reason

    def request(self, reason: str) -> None:
        self._reason = self._reason or reason
        self._event.set()
        if self.file is not None and not self.file.exists():
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(reason)
            os.replace(tmp, self.file)  # the reader never sees a half-written reason

    def is_set(self) -> bool:
        return self._event.is_set() or (self.file is not None and self.file.is_file())

    def check(self) -> None:
        """Raise :class:`RunStopped` when a stop was asked for."""
        if self.is_set():
            raise RunStopped(f"stopped by {self.reason or 'request'}")


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, on_first: Callable[[str], None] | None = None) -> Iterator[StopRequest]:
    """While the block runs, the first SIGINT or SIGTERM requests ``stop`` (``on_first`` is told
    its name) and a second raises ``SystemExit(130)``. Main thread only; the previous handlers
    come back after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            raise SystemExit(130)
        stop.request(name)
        if on_first is not None:
            on_first(name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _child(target: Callable[..., Any], stop_file: str, args: tuple[Any, ...]) -> None:
    os.setsid()  # a terminal's Ctrl-C reaches the parent only; the parent decides
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    target(*args, stop=StopRequest(Path(stop_file)))


def supervise(target: Callable[..., Any], *args: Any, on_signal: Callable[[str], None] | None = None) -> int:
    """Run ``target(*args, stop=StopRequest)`` in a child process (spawned, its own session) while
    this process holds SIGINT/SIGTERM and relays the first as a stop request. Returns the child's
    exit code; a second signal kills the child's session and exits 130."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="medfed-stop-") as tmp:
        stop = StopRequest(Path(tmp) / "stop")
        child = ctx.Process(target=_child, args=(target, str(stop.file), args), name="medfed-runtime")
        with stop_on_signals(stop, on_first=on_signal):
            child.start()
            try:
                while child.is_alive():
                    child.join(POLL_SECONDS)
            except BaseException:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
                child.join(10)
                raise
        return int(child.exitcode or 0)
