"""The primitives SecAgg+ uses, all from `cryptography` and pycryptodome (no home-made ones)."""

from __future__ import annotations

import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRG_NONCE = b"\x00" * 16  # each ChaCha20 key is used for one stream only (fresh HKDF per context)


def hkdf(secret: bytes, context: str, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``secret`` bound to ``context`` (run, round, parties, purpose)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=context.encode()).derive(secret)


def expand_mask(seed: bytes, context: str, length: int) -> np.ndarray:
    """``length`` uniform uint64 words: ChaCha20 keystream under HKDF(seed, context)."""
    key = hkdf(seed, "medfed-secagg-mask|" + context)
    stream = Cipher(algorithms.ChaCha20(key, PRG_NONCE), mode=None).encryptor().update(b"\x00" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def new_x25519() -> tuple[bytes, bytes]:
    """``(private raw, public raw)``."""
    key = X25519PrivateKey.generate()
    return (key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def agree(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def seal(key: bytes, plaintext: bytes, associated: str) -> bytes:
    """AES-256-GCM; output = nonce || ciphertext+tag."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated.encode())


def open_sealed(key: bytes, sealed: bytes, associated: str) -> bytes:
    """Inverse of :func:`seal`; raises ``cryptography.exceptions.InvalidTag`` when tampered."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated.encode())


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares (threshold of ``holders``) of a 32-byte secret: two 16-byte halves shared
    with pycryptodome's GF(2^128) scheme; share ``i`` (1-based x = i) is 33 bytes: x || halves."""
    if len(secret) != 32:
        raise ValueError("secret must be 32 bytes")
    lo = Shamir.split(threshold, holders, secret[:16], ssss=False)
    hi = Shamir.split(threshold, holders, secret[16:], ssss=False)
    return [bytes([x]) + a + b for (x, a), (_, b) in zip(lo, hi, strict=True)]


def combine_secret(shares: list[bytes]) -> bytes:
    """Inverse of :func:`split_secret` from at least ``threshold`` shares."""
    lo = Shamir.combine([(s[0], s[1:17]) for s in shares], ssss=False)
    hi = Shamir.combine([(s[0], s[17:33]) for s in shares], ssss=False)
    return lo + hi
