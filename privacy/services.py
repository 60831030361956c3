"""Running Flower's long-lived processes as foreground services (both sides use this):
offline environment, one supervisor for a group of processes (signal forwarding for a clean
SIGTERM, the group stops when one member dies), and systemd units."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a Flower process: no telemetry, this interpreter's tools first on PATH."""
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def run_foreground(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run ``cmd`` until it exits; SIGTERM/SIGINT are passed on so it shuts down cleanly."""
    return supervise({"service": (cmd, env)})


def supervise(services: Mapping[str, tuple[Sequence[str], dict[str, str]]], *, grace: float = 30.0) -> int:
    """Run several processes as one service until any of them exits or a SIGTERM/SIGINT arrives;
    then stop the others (SIGTERM, then SIGKILL after ``grace`` seconds).

    Returns 0 after a clean stop by signal, else the exit code of the first process that ended
    (a service manager then restarts the whole group).
    """
    procs = {name: subprocess.Popen(list(cmd), env=env) for name, (cmd, env) in services.items()}
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        first: int | None = None
        while first is None:
            for name, p in procs.items():
                code = p.poll()
                if code is not None:
                    first = code
                    if not stopping:
                        print(f"medfed: {name} exited with code {code}; stopping the others", file=sys.stderr,
                              flush=True)
                    break
            else:
                time.sleep(0.2)
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        # stopped by the SIGTERM/SIGINT a service manager sends: a clean shutdown, exit 0
        return 0 if stopping or first in (-signal.SIGTERM, -signal.SIGINT) else first
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def systemd_unit(description: str, args: Sequence[str], workdir: Path, user: str = "medfed") -> str:
    """A unit file that runs ``args`` (a medfed command) as a restartable service."""
    return f"""[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
WorkingDirectory={workdir}
Environment=FLWR_TELEMETRY_ENABLED=0
ExecStart={shlex.join([sys.executable, *args])}
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=10
NoNewPrivileges=true
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""
