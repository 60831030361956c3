"""The central server as a service: the SuperLink (TLS, SuperNode authentication, persisted
state, no runtime dependency installation), enrolment of sites, and runs submitted with
``flwr run`` against it."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from privacy.audit.log import AuditLog
from privacy.clock import timestamp, utc_now
from privacy.errors import ServiceError
from privacy.files import atomic_write_bytes
from privacy.keys import load_or_create_key, public_fingerprint, public_key_from_pem, public_pem
from privacy.services import offline_env
from server.pki import fingerprint, write_new
from server.workspace import CONNECTION, ServerWorkspace, WorkspaceError, record_site

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class EnrolError(ServiceError, RuntimeError):
    """Enrolment failed; the message says why and what to do."""


def superlink_command(ws: ServerWorkspace) -> list[str]:
    """The SuperLink on the server host's loopback only (TLS, SuperNode authentication, persisted
    state); ServerApps run in a separate SuperExec that must sign with the shared secret."""
    return [str(Path(sys.executable).parent / "flower-superlink"),
            "--ssl-ca-certfile", str(ws.ca_cert), "--ssl-certfile", str(ws.tls_cert), "--ssl-keyfile", str(ws.tls_key),
            "--enable-supernode-auth", "--database", str(ws.database), "--disable-runtime-dependency-installation",
            "--isolation", "process", "--superexec-auth-secret-file", str(ws.superexec_secret),
            "--host", "127.0.0.1", "--port", str(ws.internal_port)]


def superexec_command(ws: ServerWorkspace) -> list[str]:
    """Flower's SuperExec that claims and runs ServerApp tasks from the loopback SuperLink."""
    return [str(Path(sys.executable).parent / "flower-superexec"), "--runtime-api-address", ws.internal_address,
            "--root-certificates", str(ws.ca_cert), "--superexec-auth-secret-file", str(ws.superexec_secret)]


def server_services(ws: ServerWorkspace) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Every process of the central server: SuperLink, SuperExec, and the public proxy."""
    from server.proxy import nginx_command

    if not ws.superexec_secret.exists():  # a workspace made before the secret existed
        write_new(ws.superexec_secret, secrets.token_bytes(32), 0o600)
    env = flwr_env(ws)
    return {"superlink": (superlink_command(ws), env), "superexec": (superexec_command(ws), env),
            "proxy": (nginx_command(ws), env)}


def flwr_env(ws: ServerWorkspace) -> dict[str, str]:
    return offline_env(FLWR_HOME=str(ws.flwr_home))


def _flwr(ws: ServerWorkspace, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], capture_output=True, text=True,
                          env=flwr_env(ws), timeout=timeout)


def enrol(ws: ServerWorkspace, node_pub: Path, name: str, identity_pub: Path) -> dict[str, Any]:
    """Register the site's SuperNode key with the SuperLink and record its identity key."""
    if not _NAME.match(name):
        raise EnrolError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    if name in ws.enrolled():
        raise EnrolError(f"site {name} is already enrolled ({ws.sites_dir / (name + '.json')})")
    node_key = Path(node_pub).read_bytes()
    if not node_key.startswith(b"ecdsa-sha2-nistp256 "):
        raise EnrolError(f"{node_pub}: not the site's SuperNode public key (OpenSSH ecdsa-sha2-nistp256); use "
                         "keys/node.pub from the site workspace")
    identity = public_key_from_pem(Path(identity_pub).read_bytes(), str(identity_pub))
    r = _flwr(ws, "supernode", "register", str(node_pub), CONNECTION)
    out = r.stdout + r.stderr
    found = re.search(r"SuperNode (\d+) registered", out)
    if r.returncode != 0 or found is None:
        reason = "the SuperLink is not running (start it with `medfed-server start`)" if "unavailable" in out \
            else out.strip().splitlines()[-1] if out.strip() else f"exit code {r.returncode}"
        raise EnrolError(f"registering {name} failed: {reason}")
    record = {"name": name, "node_id": found.group(1), "node_key": node_key.decode().strip(),
              "node_key_sha256": fingerprint(node_key), "identity_pem": public_pem(identity).decode(),
              "identity_sha256": public_fingerprint(identity),
              "enrolled_at": timestamp()}
    record_site(ws, name, record)
    AuditLog(ws.audit_log, "server", load_or_create_key(ws.audit_key)).append(
        "site-enrolled", {"site": name, "node_id": record["node_id"], "node_key_sha256": record["node_key_sha256"],
                          "identity_sha256": record["identity_sha256"]})
    return record


def node_status(ws: ServerWorkspace) -> dict[str, dict[str, Any]]:
    """The SuperLink's view of the registered nodes (node id -> status fields), empty when unreachable."""
    r = _flwr(ws, "supernode", "list", CONNECTION, "--format", "json", timeout=60)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return {}
    nodes = doc.get("nodes", doc) if isinstance(doc, dict) else doc
    out: dict[str, dict[str, Any]] = {}
    for node in nodes if isinstance(nodes, list) else []:
        if isinstance(node, dict):
            out[str(node.get("node-id", node.get("node_id", "")))] = node
    return out


def run_command(app: Path, run_config: dict[str, Any]) -> list[str]:
    """``flwr run`` of the app directory ``app`` (:func:`server.bundle.app_dir`) against this
    SuperLink (on loopback), with run-config overrides."""
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    return [str(Path(sys.executable).parent / "flwr"), "run", str(app), CONNECTION, "--run-config", pairs, "--stream"]


def prepare_run_dir(ws: ServerWorkspace, run_dir: Path) -> None:
    """The public keys of the run, and the roster they come from, beside its logs. An auditor
    trusts them only through the roster's fingerprint obtained out of band
    (``medfed-audit verify RUN_DIR --roster-fingerprint FP``), or on request (``--trust-run-keys``)."""
    keys = run_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(keys / "server.pub", public_pem(load_or_create_key(ws.audit_key).public_key()))
    for name, site in ws.enrolled().items():
        atomic_write_bytes(keys / f"{name}.pub", site["identity_pem"].encode())
    atomic_write_bytes(keys / "roster.json", ws.roster.read_bytes())


def new_run_dir(ws: ServerWorkspace) -> Path:
    return ws.runs / utc_now().strftime("%Y%m%dT%H%M%SZ")


__all__ = ["EnrolError", "WorkspaceError", "enrol", "node_status", "prepare_run_dir", "run_command",
           "server_services", "superexec_command", "superlink_command"]
