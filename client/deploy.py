"""A hospital's site as a service: workspace creation (keys, trust anchor, policy) and the
SuperNode (TLS pinned to the federation CA, SuperNode authentication key, node config
pointing at the workspace)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.app import NODE_SITE_KEY
from client.audit_trail import site_key_path
from client.config import SITE_FILE, DataConfig, SiteConfig, SiteConfigError, write_site_config
from client.launcher import SECRET_FILE
from privacy.files import atomic_write_bytes
from privacy.keys import load_or_create_key, public_fingerprint

NODE_KEY = Path("keys") / "node.key"
NODE_PUB = Path("keys") / "node.pub"
CA_FILE = Path("trust") / "ca.pem"
DEFAULT_RUNTIME_PORT = 9094


def init_site(workspace: Path, *, name: str, server: str, ca: Path, data: Path, labels: Path | None) -> SiteConfig:
    """Create the site workspace; refuses to touch an existing one."""
    workspace = Path(workspace).resolve()
    if (workspace / SITE_FILE).exists():
        raise SiteConfigError(f"{workspace / SITE_FILE} exists: this site is already initialised (keys are never "
                              "overwritten); use another --workspace")
    if not Path(ca).is_file():
        raise SiteConfigError(f"--ca {ca}: file not found; copy the federation CA certificate (ca/ca.pem of the "
                              "server workspace) to this machine")
    if ":" not in server:
        raise SiteConfigError(f"--server {server!r}: give HOST:PORT of the SuperLink")
    data = Path(data).resolve()
    config = SiteConfig(workspace=workspace, name=name, server=server,
                        data=DataConfig(dicom=str(data), labels=str(Path(labels).resolve() if labels else data / "labels.csv")))
    private, public = make_node_keys()
    for rel, content, mode in ((NODE_KEY, private, 0o600), (NODE_PUB, public, 0o600)):
        if (workspace / rel).exists():
            raise SiteConfigError(f"{workspace / rel} exists: move it away (keys are never overwritten)")
        atomic_write_bytes(workspace / rel, content, mode=mode)
    load_or_create_key(site_key_path(config))
    ensure_superexec_secret(config)
    atomic_write_bytes(workspace / CA_FILE, Path(ca).read_bytes())
    write_site_config(config)
    return config


def make_node_keys() -> tuple[bytes, bytes]:
    """SuperNode authentication key pair, the type Flower expects: EC P-256, private key in
    OpenSSH PEM (PKCS8 is refused by the SuperNode), public key as one OpenSSH line."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def identity_fingerprint(config: SiteConfig) -> str:
    return public_fingerprint(load_or_create_key(site_key_path(config)).public_key())


def supernode_command(config: SiteConfig, runtime_port: int = DEFAULT_RUNTIME_PORT, *, insecure: bool = False,
                      ca: Path | None = None) -> list[str]:
    """The SuperNode of this site (``insecure``/``ca`` exist for tests of refusals only).

    ``--isolation process``: the SuperNode runs no ClientApp itself; the site's launcher
    (:func:`launcher_command`) claims each task on the loopback Runtime API, signed with the
    shared SuperExec secret, and runs only code the site approved."""
    ensure_superexec_secret(config)
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", config.server,
           "--node-config", f'{NODE_SITE_KEY}="{config.workspace}"', "--host", "127.0.0.1", "--port", str(runtime_port),
           "--isolation", "process", "--superexec-auth-secret-file", str(config.workspace / SECRET_FILE)]
    if insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(ca or config.workspace / CA_FILE),
            "--auth-supernode-private-key", str(config.workspace / NODE_KEY)]


def launcher_command(config: SiteConfig, runtime_port: int = DEFAULT_RUNTIME_PORT) -> list[str]:
    """The site's task runner (``client.launcher``) for the SuperNode on ``runtime_port``.
    ``-P``: the working directory is never put on ``sys.path``."""
    return [sys.executable, "-P", "-m", "client.launcher", "serve", "--workspace", str(config.workspace),
            "--runtime-api-address", f"127.0.0.1:{runtime_port}"]


def ensure_superexec_secret(config: SiteConfig) -> Path:
    """The secret the SuperNode and the launcher share (created 0600 on first use)."""
    path = config.workspace / SECRET_FILE
    if not path.exists():
        atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
    return path


