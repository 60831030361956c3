"""Ed25519 identity keys: each site's (which signs its audit log, its secure-aggregation
advertisements and consistency signatures, and its ledger) and the server's audit key."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.errors import IntegrityError
from privacy.files import atomic_write_bytes


class KeyFileError(IntegrityError, ValueError):
    """A key file is missing or not an Ed25519 key; the message names the file and the fix."""


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The private key at ``path`` (PEM, PKCS8); created (mode 0600) with its ``.pub`` when absent.

    An existing file is never overwritten.
    """
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(path, pem, mode=0o600)
    atomic_write_bytes(path.with_suffix(".pub"), public_pem(key.public_key()))
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: cannot read the Ed25519 private key ({type(exc).__name__}); "
                           "restore it from backup (a new key breaks the signature chain's continuity)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key; the audit log needs Ed25519")
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    try:
        return public_key_from_pem(Path(path).read_bytes(), str(path))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the Ed25519 public key ({type(exc).__name__})") from None


def public_key_from_pem(data: bytes, where: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{where}: not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: not an Ed25519 public key")
    return key


def public_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex (what operators compare out of band)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
