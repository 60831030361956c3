"""Running Flower's long-lived processes as foreground services (both sides use this):
offline environment, signal forwarding for a clean SIGTERM, and systemd units."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
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
    proc = subprocess.Popen(list(cmd), env=env)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
        # stopped by the SIGTERM/SIGINT a service manager sends: a clean shutdown, exit 0
        return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


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
