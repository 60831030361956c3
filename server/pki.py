"""The federation's PKI with `cryptography`'s X.509 API: a CA and the SuperLink's TLS certificate."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.clock import utc_now
from privacy.errors import InputError
from privacy.files import atomic_write_bytes

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity browsers and most TLS stacks accept for a leaf


class KeyExistsError(InputError, FileExistsError):
    """A key or certificate is already there: re-running never overwrites keys silently."""


def _now() -> dt.datetime:
    return utc_now()


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a key or certificate that must not exist yet."""
    if path.exists():
        raise KeyExistsError(f"{path} exists: medfed never overwrites keys; move it away to create a new one")
    atomic_write_bytes(path, data, mode=mode)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """``(key PEM, certificate PEM)`` of a self-signed CA (EC P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"medfed CA {name}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def make_server_cert(ca_key_pem: bytes, ca_cert_pem: bytes, host: str, days: int = SERVER_DAYS) -> tuple[bytes, bytes]:
    """``(key PEM, certificate PEM)`` for the SuperLink; SANs: ``host``, localhost, 127.0.0.1, ::1."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        names.insert(0, x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.insert(0, x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(data: bytes) -> str:
    """SHA-256 of a key or certificate file's content, hex, for comparison out of band."""
    return hashlib.sha256(data.strip()).hexdigest()
