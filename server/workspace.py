"""The central server's workspace: PKI, audit key, enrolled sites, SuperLink state, runs.

```
server.toml          host, port (the public HTTPS address sites connect to: the Fleet API only),
                     internal_port (the SuperLink itself, on 127.0.0.1: Fleet, Control, Runtime APIs),
                     bind (the interface the public proxy listens on)
ca/ca.key, ca.pem    the federation CA (key 0600)
tls/superlink.*      the SuperLink's TLS key (0600) and certificate (SANs: host, localhost, 127.0.0.1, ::1)
keys/server.key|pub  the server's Ed25519 audit key
sites/<name>.json    one file per enrolled site: node key, identity key, node id, enrolled at
roster.json          the enrolled sites' identity keys and the server's audit key, delivered every run
flwr/config.toml     FLWR_HOME of the `flwr` CLI: the connection "medfed" (127.0.0.1:internal_port) with the CA
keys/superexec.secret  the SuperExec shared secret (SuperLink and the SuperExec that runs ServerApps)
proxy/               the public proxy's (nginx) configuration, pid and logs
state/superlink.db   the SuperLink's database (registered nodes survive restarts)
audit.jsonl          signed log of enrolments
runs/<run>/          run directories (same contract as `simulate`)
```
"""

from __future__ import annotations

import json
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from privacy.errors import InputError
from privacy.files import atomic_write_bytes, atomic_write_json, private_dir
from privacy.keys import load_or_create_key, public_pem
from privacy.secagg.wire import roster_bytes
from server.pki import make_ca, make_server_cert, write_new

SERVER_FILE = "server.toml"
CONNECTION = "medfed"


class WorkspaceError(InputError, ValueError):
    """The server workspace is missing or incomplete; the message says how to fix it."""


@dataclass(frozen=True)
class ServerWorkspace:
    root: Path
    host: str
    port: int  # public: the proxy that passes the Fleet API only
    internal_port: int = 0  # the SuperLink on 127.0.0.1 (0: port + 1)
    bind: str = "0.0.0.0"  # where the public proxy listens

    def __post_init__(self) -> None:
        if not self.internal_port:
            object.__setattr__(self, "internal_port", self.port + 1 if self.port < 65535 else self.port - 1)
        if self.internal_port == self.port:
            raise WorkspaceError(f"internal_port {self.internal_port} must differ from the public port")

    @property
    def address(self) -> str:
        """What sites connect to (the public proxy)."""
        return f"{self.host}:{self.port}"

    @property
    def internal_address(self) -> str:
        """The SuperLink itself, reachable only on the server host's loopback."""
        return f"127.0.0.1:{self.internal_port}"

    ca_key = property(lambda self: self.root / "ca" / "ca.key")
    ca_cert = property(lambda self: self.root / "ca" / "ca.pem")
    tls_key = property(lambda self: self.root / "tls" / "superlink.key")
    tls_cert = property(lambda self: self.root / "tls" / "superlink.pem")
    audit_key = property(lambda self: self.root / "keys" / "server.key")
    sites_dir = property(lambda self: self.root / "sites")
    roster = property(lambda self: self.root / "roster.json")
    flwr_home = property(lambda self: self.root / "flwr")
    superexec_secret = property(lambda self: self.root / "keys" / "superexec.secret")
    proxy_dir = property(lambda self: self.root / "proxy")
    database = property(lambda self: self.root / "state" / "superlink.db")
    audit_log = property(lambda self: self.root / "audit.jsonl")
    runs = property(lambda self: self.root / "runs")

    def enrolled(self) -> dict[str, dict[str, Any]]:
        """Enrolled sites by name."""
        if not self.sites_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.sites_dir.glob("*.json"))}

    def write_roster(self) -> None:
        """The roster every run delivers: the enrolled identity keys and the server's audit key."""
        server = public_pem(load_or_create_key(self.audit_key).public_key()).decode()
        atomic_write_bytes(self.roster, roster_bytes({n: s["identity_pem"] for n, s in self.enrolled().items()}, server))


def init_workspace(root: Path, host: str, port: int, *, internal_port: int = 0, bind: str = "0.0.0.0"
                   ) -> ServerWorkspace:
    """Create the workspace; refuses to overwrite any existing key."""
    root = Path(root).resolve()
    if (root / SERVER_FILE).exists():
        raise WorkspaceError(f"{root / SERVER_FILE} exists: this workspace is already initialised (keys are never "
                             "overwritten); use another --workspace")
    private_dir(root)
    ws = ServerWorkspace(root, host, port, internal_port, bind)
    ca_key, ca_cert = make_ca(host)
    write_new(ws.ca_key, ca_key, 0o600)
    write_new(ws.ca_cert, ca_cert)
    tls_key, tls_cert = make_server_cert(ca_key, ca_cert, host)
    write_new(ws.tls_key, tls_key, 0o600)
    write_new(ws.tls_cert, tls_cert)
    if ws.audit_key.exists():
        raise WorkspaceError(f"{ws.audit_key} exists: move it away or use another --workspace")
    load_or_create_key(ws.audit_key)
    write_new(ws.superexec_secret, secrets.token_bytes(32), 0o600)
    ws.sites_dir.mkdir(parents=True, exist_ok=True)
    ws.database.parent.mkdir(parents=True, exist_ok=True)
    ws.write_roster()
    connection = {"superlink": {"default": CONNECTION, CONNECTION: {"address": ws.internal_address,
                                                                     "root-certificates": str(ws.ca_cert)}}}
    atomic_write_bytes(ws.flwr_home / "config.toml", tomli_w.dumps(connection).encode())
    server = {"host": host, "port": port, "internal_port": ws.internal_port, "bind": bind}
    atomic_write_bytes(root / SERVER_FILE, tomli_w.dumps({"server": server}).encode())
    return ws


def load_workspace(root: Path) -> ServerWorkspace:
    root = Path(root).resolve()
    path = root / SERVER_FILE
    if not path.is_file():
        raise WorkspaceError(f"{path} not found: create the workspace with `medfed-server init --workspace {root} "
                             "--host NAME_OR_IP`")
    try:
        doc = tomllib.loads(path.read_text())["server"]
        return ServerWorkspace(root, str(doc["host"]), int(doc["port"]), int(doc.get("internal_port", 0)),
                               str(doc.get("bind", "0.0.0.0")))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WorkspaceError(f"{path}: invalid ({type(exc).__name__}); it needs [server] host and port") from None


def record_site(ws: ServerWorkspace, name: str, data: dict[str, Any]) -> None:
    atomic_write_json(ws.sites_dir / f"{name}.json", data)
    ws.write_roster()
