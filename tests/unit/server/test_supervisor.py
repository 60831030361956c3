"""server.stop.Supervisor with real spawned processes: the child warms up before its job is known,
runs the job it is handed, and leaving the block without a job ends the child and its session."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
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


def test_a_failing_job_is_exit_code_1_and_a_failed_warm_up_still_runs_the_job(tmp_path: Path, capfd) -> None:
    assert supervise(_failing_job) == 1
    assert "the job failed" in capfd.readouterr().err  # the child's traceback
    assert supervise(_job, str(tmp_path), warm=_failing_warm) == 0
    err = capfd.readouterr().err
    assert "warm-up failed" in err and "warm start failed; the run starts it cold" in err
    assert (tmp_path / "job").read_text().split()[2] == "StopRequest"


PARENT_DIES = """
import functools, os, signal, sys, time
from pathlib import Path
from server.stop import Supervisor
from tests.unit.server.test_supervisor import _warm
folder = sys.argv[1]
with Supervisor(functools.partial(_warm, folder)) as runtime:
    Path(folder, "child").write_text(str(runtime.pid))
    while not Path(folder, "warm").is_file():
        time.sleep(0.05)
    holder = os.fork()  # as the DICOM ingest's forked workers do: it keeps the pipe open
    if holder == 0:
        time.sleep(120)
        os._exit(0)
    Path(folder, "holder").write_text(str(holder))
    os.kill(os.getpid(), signal.SIGKILL)  # the CLI dies before it hands over a job
"""


def test_a_child_whose_parent_died_before_its_job_exits(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-c", PARENT_DIES, str(tmp_path)], cwd=root, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    child, holder = int((tmp_path / "child").read_text()), int((tmp_path / "holder").read_text())
    try:
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the runtime child outlived its parent"
        assert _alive(holder)  # the pipe was still open: the child noticed the parent's pid
    finally:
        for pid in (child, holder):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


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
