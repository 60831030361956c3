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
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from privacy.errors import ServiceError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_SECONDS = 0.2
PARENT_CHECK_SECONDS = 0.5  # how often a waiting runtime child checks that its parent lives


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


def _child(conn: Connection, stop_file: str, warm: Callable[[], None] | None) -> None:
    """The child's body: ``warm()`` (work that needs no job: imports, starting Ray) while the parent
    still prepares, then the job from ``conn``: ``(target, args)``. Without one (the parent died:
    SIGKILL, or SIGTERM before it holds the signals) the normal exit, whose handlers stop what
    ``warm`` started; the parent's death is noticed by its pid, since processes it forked (the DICOM
    ingest's workers) may keep the pipe open. A failed warm-up is reported and the job still runs
    (the runtime then starts Ray itself).

    When ``target`` returns, everything it wrote is durable (atomic, fsynced writes) and the
    simulation runtime has shut Ray down, so the child ends at once: the interpreter's teardown of
    torch, Ray and Flower took ~1.4 s of every run's wall time. An exception takes the normal path
    (traceback, exit code 1)."""
    os.setsid()  # a terminal's Ctrl-C reaches the parent only; the parent decides
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    parent = os.getppid()
    if warm is not None:
        try:
            warm()
        except Exception:
            traceback.print_exc()
            print("warning: the runtime's warm start failed; the run starts it cold", file=sys.stderr)
    try:
        while not conn.poll(PARENT_CHECK_SECONDS):
            if os.getppid() != parent:
                sys.exit(0)
        target, args = conn.recv()
    except (EOFError, OSError):  # the parent is gone (or died halfway through sending)
        sys.exit(0)
    conn.close()
    target(*args, stop=StopRequest(Path(stop_file)))
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not fail a finished run
            stream.flush()
    os._exit(0)


class Supervisor:
    """A child process (spawned, its own session) started before its job is known, so that its
    ``warm`` step (importing the runtime, starting Ray) overlaps the parent's own work; :meth:`run`
    hands it ``target(*args, stop=StopRequest)`` and holds SIGINT/SIGTERM meanwhile, relaying the
    first as a stop request. Leaving the block without :meth:`run` (bad input, Ctrl-C) ends the child."""

    def __init__(self, warm: Callable[[], None] | None = None) -> None:
        self._warm = warm
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._child: Any = None
        self._conn: Connection | None = None

    def __enter__(self) -> Supervisor:
        ctx = multiprocessing.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="medfed-stop-")
        self.stop = StopRequest(Path(self._tmp.name) / "stop")
        ours, theirs = ctx.Pipe()
        try:
            self._child = ctx.Process(target=_child, args=(theirs, str(self.stop.file), self._warm),
                                      name="medfed-runtime")
            self._child.start()
        except BaseException:
            ours.close()
            self._tmp.cleanup()
            raise
        finally:
            theirs.close()
        self._conn = ours
        return self

    @property
    def pid(self) -> int:
        """The child's process id (also its session's)."""
        return int(self._child.pid)

    def run(self, target: Callable[..., Any], *args: Any, on_signal: Callable[[str], None] | None = None) -> int:
        """The child's exit code once it has run the job; a second signal kills its session and exits 130."""
        assert self._conn is not None, "use Supervisor as a context manager"
        conn, self._conn = self._conn, None
        with stop_on_signals(self.stop, on_first=on_signal):
            try:
                try:
                    conn.send((target, args))
                except (BrokenPipeError, EOFError, OSError):
                    pass  # the child died while warming: its exit code says so
                finally:
                    conn.close()
                while self._child.is_alive():
                    self._child.join(POLL_SECONDS)
            except BaseException:  # a second signal (SystemExit 130), also while sending
                self._kill()
                raise
        return int(self._child.exitcode or 0)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._child.pid, signal.SIGKILL)
        if self._child.is_alive():  # killed before its setsid: not yet a group of its own
            self._child.kill()
        self._child.join(10)

    def __exit__(self, *exc: object) -> None:
        try:
            if self._conn is not None:  # no job (bad input, Ctrl-C): end the child's session now; Ray's
                self._conn.close()       # processes die with the child (Ray's kernel fate sharing)
                self._conn = None
                self._kill()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()


def supervise(target: Callable[..., Any], *args: Any, on_signal: Callable[[str], None] | None = None,
              warm: Callable[[], None] | None = None) -> int:
    """Run ``target(*args, stop=StopRequest)`` in a :class:`Supervisor`'s child; its exit code."""
    with Supervisor(warm) as child:
        return child.run(target, *args, on_signal=on_signal)
