"""server.stop.Supervisor with real spawned processes: the child warms up before its job is known,
runs the job it is handed, and leaving the block without a job ends the child and its session."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from server.stop import StopRequest, Supervisor, supervise


def _warm(folder: str) -> None:
    Path(folder, "warm").write_text(f"{os.getpid()} {time.monotonic()}")


def _warm_with_a_grandchild(folder: str) -> None:
    """Starts a process in the child's session (as Ray's would be), then waits for its job."""
    sleeper = subprocess.Popen(["sleep", "300"])
    Path(folder, "grandchild").write_text(str(sleeper.pid))


def _failing_warm() -> None:
    raise RuntimeError("warm-up failed")


def _job(folder: str, *, stop: StopRequest) -> None:
    Path(folder, "job").write_text(f"{os.getpid()} {time.monotonic()} {type(stop).__name__} {os.getsid(0) == os.getpid()}")


def _failing_job(*, stop: StopRequest) -> None:
    raise ValueError("the job failed")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path.name} was not written within {timeout:.0f}s")


def test_the_child_warms_up_then_runs_its_job_in_its_own_session(tmp_path: Path) -> None:
    with Supervisor(functools.partial(_warm, str(tmp_path))) as runtime:
        warm = _wait_for(tmp_path / "warm")  # before any job was handed over
        assert not (tmp_path / "job").exists()
        code = runtime.run(_job, str(tmp_path))
    assert code == 0
    warm_pid, warm_t = warm.split()
    job_pid, job_t, stop_type, own_session = (tmp_path / "job").read_text().split()
    assert job_pid == warm_pid and float(job_t) > float(warm_t)
    assert stop_type == "StopRequest" and own_session == "True"


def test_a_failing_job_or_warm_up_is_a_nonzero_exit_code(tmp_path: Path) -> None:
    assert supervise(_failing_job) == 1
    assert supervise(_job, str(tmp_path), warm=_failing_warm) == 1
    assert not (tmp_path / "job").exists()  # a child whose warm-up failed runs no job


def test_leaving_without_a_job_ends_the_child_and_its_session(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(KeyError), Supervisor(functools.partial(_warm_with_a_grandchild, str(tmp_path))) as runtime:
        grandchild = int(_wait_for(tmp_path / "grandchild"))
        child = runtime.pid
        assert _alive(child) and _alive(grandchild)
        raise KeyError("bad input")  # as simulate's input checks leave the block
    assert not _alive(child)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(grandchild), "the child's session outlived the supervisor"
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
    assert time.monotonic() - started < 60
