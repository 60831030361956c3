"""A real loopback deployment: `medfed-server init/start/enroll/run` and three
`medfed-site init/start` as separate processes over TLS with SuperNode authentication, the
SuperLink behind nginx (Fleet API only), each site running only code it approved. Once from
the checkout and once from medfed installed as a wheel (not editable). Every process the
test starts is stopped by pid, on success and on failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w

from client.config import load_site_config
from client.deploy import supernode_command
from client.synth import generate_site, site_profile
from privacy.audit.log import read_entries
from privacy.bundle import code_digest
from privacy.services import offline_env
from server.bundle import app_dir
from server.pki import make_ca
from tests.helpers import shared_with_others, site_ledger

ROOT = Path(__file__).parents[2]
MARKER = "MEDFED_TEST_MARKER"  # the tampered bundle writes this file when any of its code runs at a site


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Install:
    """How the medfed under test is run: the checkout (editable) or a wheel on PYTHONPATH, run
    from a folder that holds no medfed source."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.cwd, self.extra = kind, ROOT, {}
        if kind == "wheel":
            wheels, target = root / "wheelhouse", root / "site-packages"
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                           check=True, timeout=600, capture_output=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                            str(next(wheels.glob("medfed-*.whl")))], check=True, timeout=600, capture_output=True)
            self.cwd, self.extra = root, {"PYTHONPATH": str(target)}

    def env(self, **extra: str) -> dict[str, str]:
        return offline_env(**self.extra, **extra)

    def cli(self, module: str, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.cwd, env=self.env(**env))


class Processes:
    """Started processes, stopped by pid (SIGTERM, then SIGKILL) when the test ends."""

    def __init__(self, logs: Path, install: Install) -> None:
        self.logs, self.install = logs, install
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], **env: str) -> Path:
        log = self.logs / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=self.install.cwd,
                                            env=self.install.env(**env), start_new_session=True)
        return log

    def stop(self, name: str) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=45)
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


def online(install: Install, server_ws: Path, n: int, timeout: float = 120) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        r = install.cli("server.cli", "sites", "--workspace", str(server_ws), "--json", timeout=120)
        rows = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
        if sum(row["status"] == "online" for row in rows) >= n:
            return rows
        time.sleep(2)
    return rows


@pytest.fixture(scope="module", params=["checkout", "wheel"])
def federation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    install = Install(request.param, root)
    procs = Processes(root, install)
    port, internal = free_port(), free_port()
    server = root / "server"
    try:
        r = install.cli("server.cli", "init", "--workspace", str(server), "--host", "127.0.0.1", "--port", str(port),
                        "--internal-port", str(internal), "--bind", "127.0.0.1")
        assert r.returncode == 0, r.stderr
        sites = []
        for i in range(3):
            data = root / f"export-{i + 1}"
            generate_site(data, site_profile(i, patients=36), seed=i)
            ws = root / f"hospital-{i + 1}"
            r = install.cli("client.cli", "init", "--workspace", str(ws), "--server", f"127.0.0.1:{port}", "--ca",
                            str(server / "ca" / "ca.pem"), "--data", str(data), "--name", f"hospital-{i + 1}")
            assert r.returncode == 0, r.stderr
            assert f"medfed-server enroll --workspace SERVER_WORKSPACE {ws.resolve()}/keys/node.pub" in r.stdout
            sites.append(ws)
        log = procs.start("superlink", [sys.executable, "-m", "server.cli", "start", "--workspace", str(server)])
        assert "Uvicorn running on https://127.0.0.1:" in wait_for(log, "Uvicorn running on https://"), log.read_text()
        for ws in sites:
            r = install.cli("server.cli", "enroll", "--workspace", str(server), str(ws / "keys" / "node.pub"),
                            "--name", ws.name)
            assert r.returncode == 0, r.stderr
        roster = json.loads(install.cli("server.cli", "roster", "--workspace", str(server), "--json").stdout)
        for ws in sites:  # each site pins the roster fingerprint it got from the consortium out of band
            r = install.cli("client.cli", "roster", "--workspace", str(ws), "--expect", roster["sha256"])
            assert r.returncode == 0, r.stderr
        for ws in sites:
            procs.start(ws.name, [sys.executable, "-m", "client.cli", "start", "--workspace", str(ws),
                                  "--runtime-port", str(free_port())], **{MARKER: str(root / "marker")})
        rows = online(install, server, 3)
        assert [row["status"] for row in rows] == ["online"] * 3, rows
        yield {"root": root, "server": server, "sites": sites, "port": port, "internal": internal, "procs": procs,
               "install": install}
    finally:
        procs.stop_all()


def test_enrolled_sites_train_over_tls(federation: dict[str, object]) -> None:
    root, server, sites = Path(str(federation["root"])), Path(str(federation["server"])), federation["sites"]
    install: Install = federation["install"]  # type: ignore[assignment]
    run_dir = root / "run"
    r = install.cli("server.cli", "run", "--workspace", str(server), "--rounds", "2", "--local-steps", "5",
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
    # a site's privacy officer verifies with the roster its site pinned (the sites' and the server's keys)
    pinned = sites[0] / "trust" / "roster.json"  # type: ignore[index]
    v = install.cli("privacy.audit.cli", "verify", str(run_dir), *map(str, sites), "--json",  # type: ignore[call-overload]
                    "--roster", str(pinned))
    verdict = json.loads(v.stdout)
    assert v.returncode == 0 and verdict["unchecked_sites"] == [] and verdict["keys"]["out_of_band"], v.stdout + v.stderr
    assert sorted(verdict["logs"]) == sorted(["server", *names]) and verdict["metrics_checked"]
    # the run directory alone (no site log) is not a verified run, unless the auditor says --server-only
    alone = install.cli("privacy.audit.cli", "verify", str(run_dir), "--roster", str(pinned))  # type: ignore[call-overload]
    assert alone.returncode == 1 and "no site log was given" in alone.stderr, alone.stderr
    server_code = next(e for e in read_entries(run_dir / "audit.jsonl") if e.event == "run-start").data["code_sha256"]
    for ws in sites:  # type: ignore[attr-defined]
        assert (ws / "trust" / "roster.json").is_file()  # pinned at first use
        joined = [e for e in read_entries(ws / "audit.jsonl") if e.event == "run-joined"]
        assert joined[-1].data["code_sha256"] == server_code  # every site ran the code the server submitted
        assert not (ws / "apps").exists()  # nothing from the bundle was installed at the site
    assert "ran code other than the server" not in (run_dir / "report.html").read_text()
    # after a run: keys, cache, ledgers, logs, the SuperLink's database, the run's outputs
    for folder in (server, run_dir, *sites):  # type: ignore[misc]
        assert shared_with_others(folder) == [], folder


def test_outsider_holding_the_ca_cannot_command_the_superlink(federation: dict[str, object], tmp_path: Path) -> None:
    """Only the Fleet API answers on the public address; Control and Runtime APIs answer the
    operator on the server host's loopback only."""
    server, port = Path(str(federation["server"])), int(str(federation["port"]))
    install: Install = federation["install"]  # type: ignore[assignment]
    ca = server / "ca" / "ca.pem"
    public = f"https://127.0.0.1:{port}"
    proto = {"content-type": "application/protobuf"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30) as http:
        for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs",
                     "/v1/control/list-nodes", "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input"):
            r = http.post(public + path, content=b"", headers=proto)
            assert r.status_code == 404 and "serves only the Fleet API" in r.text, (path, r.status_code, r.text)
        for path in ("/docs", "/openapi.json", "/health"):
            assert http.get(public + path).status_code == 404, path
        assert http.get(public + "/v1/fleet/get-run").status_code == 403  # the Fleet API takes POST only
        unsigned = http.post(public + "/v1/fleet/get-run", content=b"", headers=proto)
        assert unsigned.status_code == 401, unsigned.text  # reached the SuperLink: SuperNode auth refuses it
    # the outsider's own flwr, pointed at the public address with the CA
    home = tmp_path / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fed"\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{ca}"\n')
    key = federation["sites"][0] / "keys" / "node.pub"  # type: ignore[index]
    flwr = str(Path(sys.executable).parent / "flwr")
    for args in (["supernode", "register", str(key), "fed"], ["ls", "fed"], ["supernode", "list", "fed"]):
        r = subprocess.run([flwr, *args], capture_output=True, text=True, timeout=120, env=install.env(FLWR_HOME=str(home)))
        out = r.stdout + r.stderr
        assert r.returncode != 0 and ("404" in out or "Not Found" in out or "not found" in out), (args, out[-1500:])
    # the operator, on loopback
    r = subprocess.run([flwr, "ls", "medfed"], capture_output=True, text=True, timeout=120,
                       env=install.env(FLWR_HOME=str(server / "flwr")))
    assert r.returncode == 0, r.stdout + r.stderr
    r = install.cli("server.cli", "sites", "--workspace", str(server), "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 3


def _tampered(dest: Path) -> tuple[Path, str]:
    """A copy of the medfed bundle whose client/app.py writes the marker file when imported."""
    with app_dir() as (app, _):
        shutil.copytree(app, dest)
    target = dest / "client" / "app.py"
    source = target.read_text()
    at = source.index("\nNODE_SITE_KEY")
    payload = (f"\nif __import__('os').environ.get({MARKER!r}):\n"
               f"    open(__import__('os').environ[{MARKER!r}], 'a').write('tampered client code ran\\n')\n")
    target.write_text(source[:at] + payload + source[at:])
    files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*.py")}
    return dest, code_digest(files)


def _raise_budgets(sites: object, max_epsilon: float) -> None:
    """The site operators give their sites more budget (they may; the server may not)."""
    for ws in sites:  # type: ignore[attr-defined]
        doc = tomllib.loads((ws / "site.toml").read_text())
        doc["privacy"]["max_epsilon"] = max_epsilon
        (ws / "site.toml").write_text(tomli_w.dumps(doc))


def _flwr_run(install: Install, server: Path, app: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    config = {"num-server-rounds": 1, "local-steps": 5, "batch-size": 16, "min-sites": 3, "round-timeout": 120.0,
              "run-dir": str(run_dir), "audit-key": str(server / "keys" / "server.key"),
              "roster-file": str(server / "roster.json")}
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(app), "medfed", "--run-config", pairs,
                           "--stream"], capture_output=True, text=True, timeout=900, cwd=install.cwd,
                          env=install.env(FLWR_HOME=str(server / "flwr")))


def test_a_bundle_that_differs_from_the_installed_medfed_is_refused_before_its_code_runs(
    federation: dict[str, object], tmp_path: Path,
) -> None:
    root, server, sites = Path(str(federation["root"])), Path(str(federation["server"])), federation["sites"]
    install: Install = federation["install"]  # type: ignore[assignment]
    marker = root / "marker"
    app, digest = _tampered(tmp_path / "tampered")
    r = _flwr_run(install, server, app, root / "tampered-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((root / "tampered-run" / "metrics.json").read_text())
    assert m["rounds"][0]["sites"] == []  # no site trained
    assert not marker.exists(), marker.read_text()  # no line of the bundle's code ran at any site
    for ws in sites:  # type: ignore[attr-defined]
        refused = [e for e in read_entries(ws / "audit.jsonl") if e.event == "code-refused"]
        assert refused and refused[-1].data["code_sha256"] == digest and len(refused[-1].data["fab_sha256"]) == 64
        assert "REFUSED app bundle" in (root / f"{ws.name}.log").read_text()
    # the sites' operators review the bundle and approve its digest: now it runs (and its code did run)
    _raise_budgets(sites, 16.0)  # the first test's run spent each site's ε 8
    for ws in sites:  # type: ignore[attr-defined]
        a = install.cli("client.cli", "approve", digest, "--workspace", str(ws), "--note", "consortium build")
        assert a.returncode == 0, a.stderr
        listed = json.loads(install.cli("client.cli", "approvals", "--workspace", str(ws), "--json").stdout)
        assert [e["digest"] for e in listed["approved"]] == [digest] and listed["installed"] != digest
    try:
        r = _flwr_run(install, server, app, root / "approved-run")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        m = json.loads((root / "approved-run" / "metrics.json").read_text())
        assert m["rounds"][0]["sites"] == sorted(ws.name for ws in sites)  # type: ignore[attr-defined]
        assert marker.read_text().count("tampered client code ran") >= 3
        for ws in sites:  # type: ignore[attr-defined]
            ran = [e for e in read_entries(ws / "audit.jsonl") if e.event == "code-ran"]
            assert ran and ran[-1].data["code_sha256"] == digest
    finally:
        for ws in sites:  # type: ignore[attr-defined]
            install.cli("client.cli", "approve", digest, "--workspace", str(ws), "--revoke")
        marker.unlink(missing_ok=True)


def test_unenrolled_wrong_ca_and_plaintext_supernodes_are_refused(federation: dict[str, object]) -> None:
    root, server, port = Path(str(federation["root"])), Path(str(federation["server"])), int(str(federation["port"]))
    procs: Processes = federation["procs"]  # type: ignore[assignment]
    install: Install = federation["install"]  # type: ignore[assignment]
    stranger = root / "stranger"
    r = install.cli("client.cli", "init", "--workspace", str(stranger), "--server", f"127.0.0.1:{port}", "--ca",
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
    rows = json.loads(install.cli("server.cli", "sites", "--workspace", str(server), "--json").stdout)
    assert "stranger" not in {row["site"] for row in rows}


def _rounds_done(metrics: Path) -> int:
    try:
        return len(json.loads(metrics.read_text()).get("rounds", []))
    except (OSError, ValueError):
        return 0


def test_a_server_killed_mid_run_restarts_keeps_enrolment_and_resumes_the_run(federation: dict[str, object]) -> None:
    """The server host dies (SIGKILL of the SuperLink, SuperExec, nginx and the ServerApp) after round 1
    of 3; it restarts, the sites reconnect without re-enrolment, and `medfed-server run --resume`
    continues the run: round numbers continue, no round is applied twice, the site ledgers count every
    update once, and the run verifies with every site's log."""
    root, server, sites = Path(str(federation["root"])), Path(str(federation["server"])), federation["sites"]
    procs: Processes = federation["procs"]  # type: ignore[assignment]
    install: Install = federation["install"]  # type: ignore[assignment]
    _raise_budgets(sites, 40.0)  # earlier runs spent what the sites had given them
    run_dir = root / "killed-run"
    procs.start("run-1", [sys.executable, "-m", "server.cli", "run", "--workspace", str(server), "--rounds", "3",
                          "--local-steps", "5", "--batch-size", "16", "--out", str(run_dir), "--round-timeout", "300"])
    deadline = time.monotonic() + 600
    while _rounds_done(run_dir / "metrics.json") < 1 and time.monotonic() < deadline:
        assert procs.procs["run-1"].poll() is None, (root / "run-1.log").read_text()[-3000:]
        time.sleep(0.5)
    assert _rounds_done(run_dir / "metrics.json") == 1
    server_proc = procs.procs.pop("superlink")
    os.killpg(server_proc.pid, signal.SIGKILL)  # the host dies: every server process at once
    server_proc.wait(timeout=30)
    procs.stop("run-1")  # the operator's `flwr run --stream` lost its SuperLink
    log = procs.start("superlink-2", [sys.executable, "-m", "server.cli", "start", "--workspace", str(server)])
    assert "Uvicorn running on https://" in wait_for(log, "Uvicorn running on https://")
    rows = online(install, server, 3, timeout=180)
    assert [row["status"] for row in rows] == ["online"] * 3, rows  # reconnected, no re-enrolment
    r = install.cli("server.cli", "run", "--workspace", str(server), "--resume", str(run_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming" in r.stderr and "from the model after round 1" in r.stderr, r.stderr[-2000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    entries = read_entries(run_dir / "audit.jsonl")
    started = [e.data["round"] for e in entries if e.event == "round-start"]
    applied = [e.data["round"] for e in entries if e.event == "aggregate-applied"]
    assert len(started) == len(set(started)) and len(applied) == len(set(applied))  # no round twice
    assert applied[0] == 1 and applied[-1] == 3 and [r_["round"] for r_ in m["rounds"]] == applied
    resumed = [e for e in entries if e.event == "run-resumed"]
    assert len(resumed) == 1 and resumed[0].data["next_round"] in (2, 3)  # round 2, or 3 if 2 had started
    assert sum(e.event == "run-end" for e in entries) == 1 and m["final_model_sha256"] == m["rounds"][-1]["model_sha256"]
    names = sorted(ws.name for ws in sites)  # type: ignore[attr-defined]
    for ws in sites:  # type: ignore[attr-defined]
        ledger = site_ledger(ws)
        trained = [e.round for e in ledger.events if e.kind == "train" and e.run_id == m["run_id"]]
        assert len(trained) == len(set(trained)) and set(applied) <= set(trained) <= set(started)
    pinned = sites[0] / "trust" / "roster.json"  # type: ignore[index]
    v = install.cli("privacy.audit.cli", "verify", str(run_dir), *map(str, sites), "--json",  # type: ignore[call-overload]
                    "--roster", str(pinned))
    verdict = json.loads(v.stdout)
    assert v.returncode == 0 and verdict["metrics_checked"], v.stdout + v.stderr
    assert sorted(verdict["logs"]) == sorted(["server", *names])
    again = install.cli("server.cli", "run", "--workspace", str(server), "--resume", str(run_dir))
    assert again.returncode == 2 and "finished" in again.stderr  # a finished run is not resumed
