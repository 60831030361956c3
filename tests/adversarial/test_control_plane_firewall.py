"""A local account on the server host cannot reach the SuperLink's loopback port once the
firewall rules `medfed-server start --print-firewall` prints are installed (Flower's Control
API authenticates nobody, so the port itself must be kept from other accounts).

Played for real in a private network namespace (nftables tables are per namespace, so the
host's firewall is never touched): a listener on the SuperLink's port, the printed rules, a
connection attempt as `nobody` (refused) and one as the service account (accepted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from server.proxy import firewall_rules, nginx_command
from server.workspace import init_workspace

TOOLS = ("ip", "nft", "setpriv")


def _can_run() -> str:
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (Debian: iproute2, nftables, util-linux)"
    probe = subprocess.run(["ip", "netns", "add", "medfed-probe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "delete", "medfed-probe"], capture_output=True)
    return "" if probe.returncode == 0 else f"cannot create a network namespace here: {probe.stderr.strip()}"


SCRIPT = """
set -e
ip link set lo up
nft -f {rules}
python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \\
s.bind(("127.0.0.1", {port})); s.listen(8); time.sleep(20)' &
for _ in $(seq 1 50); do
  python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 1)' 2>/dev/null && break; sleep 0.1
done
# bash's /dev/tcp: the probe needs no interpreter the other account may not be able to run
probe='exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected || echo refused'
echo "nobody: $(setpriv --reuid=65534 --regid=65534 --clear-groups bash -c "$probe" 2>/dev/null)"
echo "service: $(bash -c "$probe" 2>/dev/null)"
kill %1
"""


# the real nginx configuration in front of a listener that records each connection it accepts
PROXY_SCRIPT = """
set -e
ip link set lo up
nft -f {rules}
python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \\
s.bind(("127.0.0.1", {port})); s.listen(8)
while True:
    c, _ = s.accept(); open(sys.argv[1], "a").write("accepted\\n"); c.close()' {accepted} &
{nginx} &
for _ in $(seq 1 100); do
  python3 -c 'import socket; socket.create_connection(("127.0.0.1", {public}), 1)' 2>/dev/null && break; sleep 0.1
done
curl -sk -o /dev/null -w 'status %{{http_code}}\\n' -X POST https://127.0.0.1:{public}/v1/fleet/ping || true
kill %2 %1
echo "upstream: $(cat {accepted} 2>/dev/null || echo never-reached)"
"""


def _attempt(rules: Path, port: int, script: str = SCRIPT, **fields: object) -> str:
    """Run ``script`` in a fresh network namespace with ``rules``; its output."""
    ns = f"medfed-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", script.format(rules=rules, port=port, **fields)],
                           capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(bool(_can_run()), reason=_can_run() or "ok")
def test_another_local_account_cannot_reach_the_superlink_port(tmp_path: Path) -> None:
    ws = init_workspace(tmp_path / "server", "127.0.0.1", 18900, internal_port=18901)
    rules = tmp_path / "medfed.nft"
    rules.write_text(firewall_rules(ws, os.getuid()))
    out = _attempt(rules, ws.internal_port)
    assert "nobody: refused" in out and "service: connected" in out, out
    rules.write_text("table inet medfed_superlink { }\n")  # control: without the rules it connects
    assert "nobody: connected" in _attempt(rules, ws.internal_port)


@pytest.mark.skipif(bool(_can_run()) or shutil.which("curl") is None, reason=_can_run() or "needs curl")
def test_the_proxy_workers_pass_the_firewall_rules(tmp_path: Path) -> None:
    """nginx started as root runs its workers as ``nobody`` unless told otherwise; the rules would
    then cut the Fleet API off. medfed's configuration names the service account."""
    ws = init_workspace(tmp_path / "server", "127.0.0.1", 18910, internal_port=18911)
    rules = tmp_path / "medfed.nft"
    rules.write_text(firewall_rules(ws, os.getuid()))
    nginx = " ".join(f"'{part}'" for part in nginx_command(ws))
    accepted = tmp_path / "accepted"
    out = _attempt(rules, ws.internal_port, PROXY_SCRIPT, public=ws.port, nginx=nginx, accepted=accepted)
    assert "status 502" in out and "upstream: accepted" in out, out  # reached (the listener speaks no TLS)
    conf = ws.proxy_dir / "nginx.conf"  # control: the same configuration without its user line
    conf.write_text("\n".join(line for line in conf.read_text().splitlines() if not line.startswith("user ")))
    accepted.unlink()
    out = _attempt(rules, ws.internal_port, PROXY_SCRIPT, public=ws.port, nginx=nginx, accepted=accepted)
    assert "upstream: never-reached" in out, out
