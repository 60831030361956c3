"""Site and server files belong to the account that runs medfed: 0600 files in 0700 folders,
keys, cache shards, the index and the ledger included, whatever the caller's umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import shared_with_others

ROOT = Path(__file__).parents[2]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    # a permissive umask in the caller's shell: the entry points must not inherit it
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, preexec_fn=lambda: os.umask(0o002))


def test_site_and_server_workspaces_are_private(tmp_path: Path, small_site: Path) -> None:
    server = tmp_path / "server"
    r = _cli("server.cli", "init", "--workspace", str(server), "--host", "127.0.0.1", "--port", "18920")
    assert r.returncode == 0, r.stderr
    site = tmp_path / "site"
    r = _cli("client.cli", "init", "--workspace", str(site), "--server", "127.0.0.1:18920",
             "--ca", str(server / "ca" / "ca.pem"), "--data", str(small_site))
    assert r.returncode == 0, r.stderr
    r = _cli("client.cli", "check", "--workspace", str(site), "--json")  # fills the image cache
    assert r.returncode == 0 and json.loads(r.stdout)["patients"] == 24, r.stderr
    cache = [p for p in (site / "cache").rglob("*") if p.is_file()]
    assert len(cache) >= 2  # shards and their index exist, so the check below covers them
    assert shared_with_others(site) == [] and shared_with_others(server) == []
    for ws in (site, server):
        assert ws.stat().st_mode & 0o777 == 0o700
