"""A real loopback deployment: `medfed-server init/start/enroll/run` and three
`medfed-site init/start` as separate processes over TLS with SuperNode authentication.
Every process the test starts is stopped by pid, on success and on failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.config import load_site_config
from client.deploy import supernode_command
from client.synth import generate_site, site_profile
from privacy.services import offline_env
from server.pki import make_ca

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=offline_env())


class Processes:
    """Started processes, stopped by pid (SIGTERM, then SIGKILL) when the test ends."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str]) -> Path:
        log = self.logs / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=offline_env(),
                                            start_new_session=True)
        return log

    def stop(self, name: str) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def wait_for(path: Path, text: str, timeout: float = 90, proc: subprocess.Popen[bytes] | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = path.read_text(errors="replace") if path.exists() else ""
        if text in out:
            return out
        if proc is not None and proc.poll() is not None:
            return path.read_text(errors="replace")
        time.sleep(0.5)
    return path.read_text(errors="replace") if path.exists() else ""


def online(server_ws: Path, n: int, timeout: float = 120) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        r = cli("server.cli", "sites", "--workspace", str(server_ws), "--json", timeout=120)
        rows = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
        if sum(row["status"] == "online" for row in rows) >= n:
            return rows
        time.sleep(2)
    return rows


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("deploy")
    procs = Processes(root)
    port = free_port()
    server = root / "server"
    try:
        r = cli("server.cli", "init", "--workspace", str(server), "--host", "127.0.0.1", "--port", str(port))
        assert r.returncode == 0, r.stderr
        sites = []
        for i in range(3):
            data = root / f"export-{i + 1}"
            generate_site(data, site_profile(i, patients=36), seed=i)
            ws = root / f"hospital-{i + 1}"
            r = cli("client.cli", "init", "--workspace", str(ws), "--server", f"127.0.0.1:{port}", "--ca",
                    str(server / "ca" / "ca.pem"), "--data", str(data), "--name", f"hospital-{i + 1}")
            assert r.returncode == 0, r.stderr
            assert f"medfed-server enroll --workspace SERVER_WORKSPACE {ws.resolve()}/keys/node.pub" in r.stdout
            sites.append(ws)
        log = procs.start("superlink", [sys.executable, "-m", "server.cli", "start", "--workspace", str(server)])
        assert "Uvicorn running on https://" in wait_for(log, "Uvicorn running on https://"), log.read_text()
        for ws in sites:
            r = cli("server.cli", "enroll", "--workspace", str(server), str(ws / "keys" / "node.pub"),
                    "--name", ws.name)
            assert r.returncode == 0, r.stderr
        for ws in sites:
            procs.start(ws.name, [sys.executable, "-m", "client.cli", "start", "--workspace", str(ws),
                                  "--runtime-port", str(free_port())])
        rows = online(server, 3)
        assert [row["status"] for row in rows] == ["online"] * 3, rows
        yield {"root": root, "server": server, "sites": sites, "port": port, "procs": procs}
    finally:
        procs.stop_all()


def test_enrolled_sites_train_over_tls(federation: dict[str, object]) -> None:
    root, server, sites = Path(str(federation["root"])), Path(str(federation["server"])), federation["sites"]
    run_dir = root / "run"
    r = cli("server.cli", "run", "--workspace", str(server), "--rounds", "2", "--local-steps", "5",
            "--batch-size", "16", "--out", str(run_dir), "--round-timeout", "300")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    names = sorted(ws.name for ws in sites)  # type: ignore[attr-defined]
    assert [r_["sites"] for r_ in m["rounds"]] == [names, names]
    assert all(r_["secagg"]["sites"] == 3 and not r_["secagg"]["aborted"] for r_ in m["rounds"])
    assert m["config"]["secure_aggregation"] is True and m["config"]["dp"] is True
    for name in ("checkpoints/round-1.npz", "checkpoints/round-2.npz", "model-final.npz", "audit.jsonl",
                 "report.html"):
        assert (run_dir / name).is_file(), name
    assert max(max(r_["epsilon"].values()) for r_ in m["rounds"]) <= 8.0
    v = cli("privacy.audit.cli", "verify", str(run_dir), *map(str, sites), "--json")  # type: ignore[call-overload]
    assert v.returncode == 0 and json.loads(v.stdout)["unchecked_sites"] == [], v.stdout + v.stderr
    for ws in sites:  # type: ignore[attr-defined]
        assert (ws / "trust" / "roster.json").is_file()  # pinned at first use


def test_unenrolled_wrong_ca_and_plaintext_supernodes_are_refused(federation: dict[str, object]) -> None:
    root, server, port = Path(str(federation["root"])), Path(str(federation["server"])), int(str(federation["port"]))
    procs: Processes = federation["procs"]  # type: ignore[assignment]
    stranger = root / "stranger"
    r = cli("client.cli", "init", "--workspace", str(stranger), "--server", f"127.0.0.1:{port}", "--ca",
            str(server / "ca" / "ca.pem"), "--data", str(root / "export-1"))
    assert r.returncode == 0, r.stderr
    config = load_site_config(stranger)
    other_ca = root / "other-ca.pem"
    other_ca.write_bytes(make_ca("elsewhere")[1])
    cases = {
        "unenrolled": (supernode_command(config, free_port()), "Failed to activate SuperNode"),
        "wrong-ca": (supernode_command(config, free_port(), ca=other_ca), "CERTIFICATE_VERIFY_FAILED"),
        "plaintext": (supernode_command(config, free_port(), insecure=True), "could not establish a connection"),
    }
    for name, (cmd, expected) in cases.items():
        log = procs.start(name, [*cmd, "--max-retries", "2", "--max-wait-time", "20"])
        out = wait_for(log, expected, timeout=120, proc=procs.procs[name])
        procs.stop(name)
        assert expected in out, (name, out[-2000:])
    rows = json.loads(cli("server.cli", "sites", "--workspace", str(server), "--json").stdout)
    assert "stranger" not in {row["site"] for row in rows}


def test_server_restart_keeps_enrolment(federation: dict[str, object]) -> None:
    root, server = Path(str(federation["root"])), Path(str(federation["server"]))
    procs: Processes = federation["procs"]  # type: ignore[assignment]
    assert procs.stop("superlink") == 0  # clean shutdown on SIGTERM
    log = procs.start("superlink-2", [sys.executable, "-m", "server.cli", "start", "--workspace", str(server)])
    assert "Uvicorn running on https://" in wait_for(log, "Uvicorn running on https://")
    rows = online(server, 3, timeout=180)
    assert [row["status"] for row in rows] == ["online"] * 3, rows  # reconnected, no re-enrolment
    for ws in federation["sites"]:  # type: ignore[attr-defined]
        # the first run spent each site's budget (ε 8 over two rounds and their metered evaluations): the site
        # operators raise it, so the run after the restart trains (they may; the server may not)
        toml = ws / "site.toml"
        toml.write_text(toml.read_text().replace("max_epsilon = 8.0", "max_epsilon = 16.0"))
    r = cli("server.cli", "run", "--workspace", str(server), "--rounds", "1", "--local-steps", "5",
            "--batch-size", "16", "--out", str(root / "after-restart"), "--round-timeout", "300")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((root / "after-restart" / "metrics.json").read_text())
    assert len(m["rounds"][0]["sites"]) == 3
