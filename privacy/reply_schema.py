"""The closed schema of what a site may send (:func:`check_reply`): the reply that leaves is
rebuilt from the fields the schema names, never passed through.

- ``metrics``: whitelisted numbers, quantised to the metric grid (``privacy.quantise``);
- ``site``: the site's own name and a 64-hex audit head;
- ``arrays``: exactly the model's manifest (names, shapes, dtypes), finite;
- ``masked``: one uint64 array named ``masked`` of the secure-aggregation layout length whose
  bytes look uniform (a masked vector does; a view of a file does not);
- ``secagg``: one protocol message that parses as ``privacy.secagg.wire`` and re-encodes to
  the same bytes, within the byte cap the round's sites (the pinned roster) allow.

Any number whose forms (``privacy.identifier_forms``) hit one of the site's keyed
fingerprints of identifying header values is refused as well (defence in depth: the grid
already leaves no room for 8 arbitrary bytes). Problems name keys, never values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privacy import egress as K
from privacy.egress import fingerprint
from privacy.identifier_forms import number_forms
from privacy.quantise import OffGrid, quantise
from privacy.secagg.site import NONCE_BYTES
from privacy.secagg.wire import (
    adverts_from_bytes,
    adverts_to_bytes,
    boxes_from_bytes,
    boxes_to_bytes,
    reveals_from_bytes,
    reveals_to_bytes,
)

_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_BYTES, SIGNATURE_BYTES = 32, 64  # X25519 public keys (and SHA-256 nonce commitments); Ed25519 signatures
SEALED_SHARE_BYTES = 12 + 66 + 16  # AES-GCM nonce || two 33-byte Shamir shares || tag
SHARE_BYTES = 33
ENTRY_OVERHEAD = 64 + 16  # a site name (at most 64 characters) and its JSON punctuation


@dataclass(frozen=True)
class ReplySchema:
    """What this site's replies may hold: its name, the model manifest and the round's peers."""

    site_name: str
    manifest: Mapping[str, tuple[tuple[int, ...], str]]  # array name -> (shape, dtype name)
    peers: frozenset[str] = frozenset()  # the pinned federation roster (this site included)
    masked_only: bool = False  # the site requires secure aggregation: an update leaves masked or not at all

    @property
    def masked_length(self) -> int:
        """The secure-aggregation layout: every model parameter, then the weight."""
        return sum(math.prod(shape) for shape, _ in self.manifest.values()) + 1

    def secagg_cap(self, key: str) -> int:
        """Bytes one secure-aggregation reply value may take with this many peers."""
        n = max(1, len(self.peers))
        per = {K.ADVERT: 2 * (3 * KEY_BYTES + SIGNATURE_BYTES) + ENTRY_OVERHEAD, K.NONCE: NONCE_BYTES,
               K.OUTBOX: n * (2 * SEALED_SHARE_BYTES + ENTRY_OVERHEAD),
               K.REVEALS: n * (2 * SHARE_BYTES + ENTRY_OVERHEAD),
               K.CONSISTENCY: SIGNATURE_BYTES}
        return per[key] + 2


@dataclass(frozen=True)
class Checked:
    """The outcome: the problems (empty: the reply may leave) and the rebuilt reply content."""

    problems: tuple[str, ...]
    content: RecordDict


class _Matcher:
    def __init__(self, prints: frozenset[str], key: bytes) -> None:
        self.prints, self.key = prints, key

    def hits(self, texts: set[str]) -> bool:
        return any(fingerprint(self.key, t) in self.prints for t in texts)


def check_reply(content: RecordDict, schema: ReplySchema, prints: frozenset[str], key: bytes) -> Checked:
    """Validate a reply against the schema and rebuild it from the validated fields."""
    match = _Matcher(prints, key)
    problems: list[str] = []
    out = RecordDict()
    for name, metrics in content.metric_records.items():
        if name != K.METRICS:
            problems.append(f"undeclared metric record {_name(name)}")
            continue
        out[K.METRICS] = MetricRecord(_metrics(metrics, match, problems))
    for name, config in content.config_records.items():
        check = {K.SITE: _site, K.SECAGG: _secagg}.get(name)
        if check is None:
            problems.append(f"undeclared config record {_name(name)}")
            continue
        out[name] = check(config, schema, match, problems)
    for name, arrays in content.array_records.items():
        check_arrays = {K.ARRAYS: _model_arrays, K.MASKED: _masked}.get(name)
        if check_arrays is None:
            problems.append(f"undeclared array record {_name(name)}")
            continue
        out[name] = check_arrays(arrays, schema, problems)
    return Checked(tuple(problems), out)


def _metrics(record: MetricRecord, match: _Matcher, problems: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for k, v in record.items():
        try:
            q = quantise(k, v)
        except OffGrid as exc:
            problems.append(str(exc) if k in K.ALL_METRICS else f"undeclared metric {_name(k)}")
            continue
        if match.hits(number_forms(v) | number_forms(q)):  # type: ignore[arg-type]
            problems.append(f"metric {k} matches an identifying header value (as one of its numeric forms)")
            continue
        values[k] = q
    return values


def _site(record: ConfigRecord, schema: ReplySchema, match: _Matcher, problems: list[str]) -> ConfigRecord:
    out = ConfigRecord()
    for k, v in record.items():
        if k not in K.SITE_KEYS:
            problems.append(f"undeclared key {_name(k)} in {K.SITE}")
        elif k == K.SITE_NAME and v != schema.site_name:
            problems.append(f"{K.SITE}.{k} is not this site's name")
        elif k == K.AUDIT_HEAD and not (isinstance(v, str) and _HEX64.match(v)):
            problems.append(f"{K.SITE}.{k} is not a 64-hex audit head")
        else:
            out[k] = str(v)
    return out


def _secagg(record: ConfigRecord, schema: ReplySchema, match: _Matcher, problems: list[str]) -> ConfigRecord:
    out = ConfigRecord()
    if len(record) != 1:
        problems.append(f"{K.SECAGG} must hold exactly one protocol message")
    for k, v in record.items():
        if k not in K.SECAGG_REPLY_KEYS:
            problems.append(f"undeclared key {_name(k)} in {K.SECAGG}")
        elif not isinstance(v, bytes):
            problems.append(f"{K.SECAGG}.{k} must be protocol bytes")
        elif len(v) > schema.secagg_cap(k):
            problems.append(f"{K.SECAGG}.{k} exceeds its cap of {schema.secagg_cap(k)} bytes for {len(schema.peers)} "
                            "roster sites")
        else:
            try:
                canonical = _PARSERS[k](v, schema)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                problems.append(f"{K.SECAGG}.{k} does not parse as the protocol's wire format ({_reason(exc)})")
                continue
            if canonical != v:
                problems.append(f"{K.SECAGG}.{k} is not the canonical encoding of its protocol message")
                continue
            out[k] = canonical
    return out


def _reason(exc: Exception) -> str:
    """The parser's complaint when it is one of ours (a fixed text), else the exception's kind."""
    return str(exc) if isinstance(exc, _WireError) else type(exc).__name__


class _WireError(ValueError):
    pass


def _advert(data: bytes, schema: ReplySchema) -> bytes:
    adverts = adverts_from_bytes(data)
    if set(adverts) != {schema.site_name}:
        raise _WireError("an advertisement names exactly this site")
    return adverts_to_bytes(adverts)  # field lengths: checked by adverts_from_bytes


def _nonce(data: bytes, schema: ReplySchema) -> bytes:
    if len(data) != NONCE_BYTES:
        raise _WireError("a graph nonce is 32 bytes")
    return data


def _outbox(data: bytes, schema: ReplySchema) -> bytes:
    boxes = boxes_from_bytes(data)
    if not set(boxes) <= schema.peers - {schema.site_name}:
        raise _WireError("shares addressed to sites outside the pinned roster")
    if any(len(b) != SEALED_SHARE_BYTES for b in boxes.values()):
        raise _WireError("a sealed share of the wrong length")
    return boxes_to_bytes(boxes)


def _reveals(data: bytes, schema: ReplySchema) -> bytes:
    reveals = reveals_from_bytes(data)
    if not set(reveals) <= schema.peers:
        raise _WireError("reveals for sites outside the pinned roster")
    if any(kind not in ("b", "c") or len(share) != SHARE_BYTES for kind, share in reveals.values()):
        raise _WireError("a reveal of the wrong kind or length")
    return reveals_to_bytes(reveals)


def _signature(data: bytes, schema: ReplySchema) -> bytes:
    if len(data) != SIGNATURE_BYTES:
        raise _WireError("a consistency signature is 64 bytes")
    return data


_PARSERS: dict[str, Callable[[bytes, ReplySchema], bytes]] = {
    K.ADVERT: _advert, K.NONCE: _nonce, K.OUTBOX: _outbox, K.REVEALS: _reveals, K.CONSISTENCY: _signature,
}


def _model_arrays(record: ArrayRecord, schema: ReplySchema, problems: list[str]) -> ArrayRecord:
    if schema.masked_only:
        problems.append(f"an unmasked update ({K.ARRAYS}) while the site requires secure aggregation")
        return ArrayRecord()
    names = list(record.keys())
    if set(names) != set(schema.manifest):
        unknown = len(set(names) - set(schema.manifest))
        missing = len(set(schema.manifest) - set(names))
        problems.append(f"{K.ARRAYS} differs from the model manifest ({unknown} unknown, {missing} missing array(s))")
        return ArrayRecord()
    out = {}
    for k in schema.manifest:
        a = record[k].numpy()
        shape, dtype = schema.manifest[k]
        if tuple(a.shape) != tuple(shape) or a.dtype.name != dtype:
            problems.append(f"array {k} has not the manifest's shape {tuple(shape)} and dtype {dtype}")
        elif not bool(np.isfinite(a).all()):
            problems.append(f"array {k} holds a non-finite value")
        else:
            out[k] = Array(np.ascontiguousarray(a))
    return ArrayRecord(out)


def _masked(record: ArrayRecord, schema: ReplySchema, problems: list[str]) -> ArrayRecord:
    if list(record.keys()) != [K.MASKED]:
        problems.append(f"{K.MASKED} must hold one array named {K.MASKED}")
        return ArrayRecord()
    a = record[K.MASKED].numpy()
    if a.dtype != np.uint64 or a.ndim != 1 or len(a) != schema.masked_length:
        problems.append(f"{K.MASKED} must be one uint64 vector of the layout length {schema.masked_length}")
        return ArrayRecord()
    if not looks_masked(a):
        problems.append(f"{K.MASKED} is not uniformly distributed: it is not a masked vector (raw data?)")
        return ArrayRecord()
    return ArrayRecord({K.MASKED: Array(np.ascontiguousarray(a))})


def looks_masked(a: np.ndarray) -> bool:
    """Whether a vector's bytes are uniform, as a vector masked with ChaCha20 streams is: the
    chi-square statistic of its byte histogram (255 degrees of freedom, mean 255, standard
    deviation 22.6) below 255 + 12 standard deviations. A view of a file, an image or an
    unmasked update (zero bytes, ASCII, small integers) is far above it."""
    data = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8)
    if len(data) < 2048:  # too short for the test to mean anything (no real model is this small)
        return True
    expected = len(data) / 256.0
    chi2 = float((((np.bincount(data, minlength=256) - expected) ** 2) / expected).sum())
    return chi2 < 255.0 + 12.0 * math.sqrt(2 * 255.0)


def _name(name: str) -> str:
    """A key name fit for a log line (an undeclared key could itself carry a value)."""
    return repr(name) if _IDENTIFIER.match(str(name)) else "(a non-identifier key)"
