"""The public side of the SuperLink: nginx (Debian's package), passing only the Fleet API.

Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port and authenticates no
Control API caller, so the SuperLink listens on 127.0.0.1 only and nginx faces the network:
it terminates TLS with the federation's server certificate and forwards ``POST
/v1/fleet/<call>`` to the SuperLink over TLS (verified against the federation CA). Every other
path (``/v1/control``, ``/v1/runtime``, ``/docs``, ``/openapi.json``, ...) gets 404 from nginx;
the SuperLink never sees it. SuperNode authentication signs headers nginx forwards unchanged.
When the SuperLink is down nginx answers 502, which SuperNodes retry.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil

from privacy.files import atomic_write_bytes
from server.workspace import ServerWorkspace, WorkspaceError

FLEET_PATH = r"^/v1/fleet/[a-z0-9-]+\z"  # \z: no trailing newline slips through


def nginx_binary() -> str:
    """The nginx executable; a clear error when it is not installed."""
    for candidate in ("nginx", "/usr/sbin/nginx"):
        found = shutil.which(candidate)
        if found:
            return found
    raise WorkspaceError("nginx is not installed: the SuperLink's public side needs it (Debian/Ubuntu: "
                         "`apt-get install nginx`); medfed starts and stops it, no system service is needed")


def worker_user() -> str:
    """nginx's ``user`` line: started as root, nginx would run its workers as ``nobody``, whom
    the firewall rules (``--print-firewall``) keep off the SuperLink's port; they run as the
    service account instead. Under any other account nginx keeps it and needs no line."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


def nginx_config(ws: ServerWorkspace) -> str:
    """The configuration: one TLS server on the public address, the Fleet API only."""
    d = ws.proxy_dir
    temp = "\n".join(f"    {kind}_temp_path {d / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                                "scgi"))
    bind = f"[{ws.bind}]" if ":" in ws.bind else ws.bind
    return f"""# written by medfed-server start: only the Fleet API of the SuperLink faces the network
{worker_user()}worker_processes 1;
pid {d / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    server_tokens off;
    client_max_body_size 64m;
    client_header_timeout 10s;
    client_body_timeout 30s;
    send_timeout 60s;
    keepalive_timeout 30s;
    limit_conn_zone $binary_remote_addr zone=per_address:1m;
    limit_req_zone $binary_remote_addr zone=fleet_calls:1m rate=50r/s;
    server {{
        listen {bind}:{ws.port} ssl;
        limit_conn per_address 64;
        ssl_certificate {ws.tls_cert};
        ssl_certificate_key {ws.tls_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        default_type application/json;
        location ~ {FLEET_PATH} {{
            limit_except POST {{ deny all; }}
            limit_req zone=fleet_calls burst=200 nodelay;
            proxy_pass https://127.0.0.1:{ws.internal_port};
            proxy_http_version 1.1;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ws.ca_cert};
            proxy_ssl_name localhost;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            proxy_redirect off;
        }}
        location / {{
            return 404 '{{"detail": "not found: this address serves only the Fleet API"}}';
        }}
    }}
}}
"""


def nginx_command(ws: ServerWorkspace) -> list[str]:
    """Write the configuration and return the foreground nginx command that serves it."""
    for sub in ("tmp",):
        (ws.proxy_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = ws.proxy_dir / "nginx.conf"
    atomic_write_bytes(conf, nginx_config(ws).encode(), mode=0o600)
    return [nginx_binary(), "-p", str(ws.proxy_dir), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]


def firewall_rules(ws: ServerWorkspace, uid: int) -> str:
    """nftables rules (for the host's firewall, installed by its administrator) that let only the
    service account ``uid`` connect to the SuperLink's loopback port: Flower's Control API
    authenticates nobody, so without them any local account on the server host commands it."""
    return f"""# medfed: only uid {uid} (the account running medfed-server) may reach the SuperLink on 127.0.0.1:{ws.internal_port}
table inet medfed_superlink {{
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr 127.0.0.1 tcp dport {ws.internal_port} meta skuid != {uid} counter reject with tcp reset
        ip6 daddr ::1 tcp dport {ws.internal_port} counter reject with tcp reset
    }}
}}
"""
