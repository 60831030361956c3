"""Deployment pieces without processes: PKI (SANs, validity, key modes, no overwrite),
offline flags of the Flower commands, systemd units, workspace refusal to re-init."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from client.config import SiteConfigError, load_site_config
from client.deploy import init_site, launcher_command, supernode_command
from privacy.services import offline_env, systemd_unit
from server.deploy import superexec_command, superlink_command
from server.pki import KeyExistsError, write_new
from server.proxy import nginx_config
from server.workspace import WorkspaceError, init_workspace, load_workspace


def test_server_workspace_pki_and_offline_superlink(tmp_path: Path) -> None:
    ws = init_workspace(tmp_path / "server", "fl.example.org", 8443)
    assert load_workspace(ws.root) == ws
    for key in (ws.ca_key, ws.tls_key, ws.audit_key):
        assert key.stat().st_mode & 0o777 == 0o600, key
    ca = x509.load_pem_x509_certificate(ws.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(ws.tls_cert.read_bytes())
    assert leaf.issuer == ca.subject and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc < dt.timedelta(days=830)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and leaf.signature_hash_algorithm is not None
    ca_key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    with pytest.raises(WorkspaceError, match="already initialised"):
        init_workspace(ws.root, "fl.example.org", 8443)
    with pytest.raises(KeyExistsError, match="never overwrites"):
        write_new(ws.ca_key, b"x")
    cmd = superlink_command(ws)
    assert "--disable-runtime-dependency-installation" in cmd and "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--database") + 1] == str(ws.database) and "--insecure" not in cmd
    # the SuperLink answers on loopback only; the public port is nginx's, which passes the Fleet API only
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8444"
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(ws.superexec_secret)
    assert ws.superexec_secret.stat().st_mode & 0o777 == 0o600 and len(ws.superexec_secret.read_bytes()) == 32
    assert "--superexec-auth-secret-file" in superexec_command(ws)
    conf = nginx_config(ws)
    assert "listen 0.0.0.0:8443 ssl;" in conf and "proxy_pass https://127.0.0.1:8444;" in conf
    assert "location ~ ^/v1/fleet/[a-z0-9-]+\\z" in conf and "limit_except POST { deny all; }" in conf
    assert "proxy_ssl_verify on;" in conf and "return 404" in conf and "/v1/control" not in conf.split("location /")[0]
    connection = (ws.flwr_home / "config.toml").read_text()
    assert 'address = "127.0.0.1:8444"' in connection  # the operator's flwr talks to the loopback SuperLink
    assert offline_env()["FLWR_TELEMETRY_ENABLED"] == "0"
    unit = systemd_unit("medfed central server", ["-m", "server.cli", "start", "--workspace", str(ws.root)], ws.root)
    assert "KillSignal=SIGTERM" in unit and f"--workspace {ws.root}" in unit and "Restart=on-failure" in unit


def test_site_workspace_keys_and_supernode_command(tmp_path: Path, small_site: Path) -> None:
    server = init_workspace(tmp_path / "server", "127.0.0.1", 9000)
    config = init_site(tmp_path / "site", name="st-mary", server="127.0.0.1:9000", ca=server.ca_cert,
                       data=small_site, labels=None)
    loaded = load_site_config(config.workspace)
    assert loaded.name == "st-mary" and loaded.privacy.require_secure_aggregation and loaded.privacy.max_epsilon == 8
    node_key = (config.workspace / "keys" / "node.key").read_bytes()
    assert node_key.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")  # Flower refuses PKCS8
    assert (config.workspace / "keys" / "node.key").stat().st_mode & 0o777 == 0o600
    assert (config.workspace / "keys" / "node.pub").read_bytes().startswith(b"ecdsa-sha2-nistp256 ")
    cmd = supernode_command(loaded, 9200)
    assert cmd[cmd.index("--root-certificates") + 1] == str(config.workspace / "trust" / "ca.pem")
    assert f'site-workspace="{config.workspace}"' in cmd and "--insecure" not in cmd
    # the SuperNode runs no ClientApp itself; the site's launcher claims tasks with the shared secret
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    secret = config.workspace / "keys" / "superexec.secret"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    assert launcher_command(loaded, 9200)[1:5] == ["-P", "-m", "client.launcher", "serve"]
    assert "--allow-runtime-dependency-installation" not in cmd
    with pytest.raises(SiteConfigError, match="already initialised"):
        init_site(config.workspace, name="st-mary", server="127.0.0.1:9000", ca=server.ca_cert, data=small_site,
                  labels=None)
