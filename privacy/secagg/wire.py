"""Protocol objects <-> bytes for Flower records (canonical JSON, bytes as hex), and the
site's per-round state for ``context.state``."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.errors import InputError
from privacy.keys import public_key_from_pem
from privacy.secagg.params import SecAggConfigError, SecAggParams
from privacy.secagg.site import KeyAdvert, SiteSession

P = ParamSpec("P")
T = TypeVar("T")


class WireFormatError(InputError, ValueError):
    """A protocol message (attacker input) that is not in the wire format: refused as malformed."""


def _parsed(what: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Parse failures of a message (missing keys, wrong types, bad hex or JSON) become one
    :class:`WireFormatError` naming ``what``; nothing else is relabelled."""

    def wrap(parse: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(parse)
        def parsed(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return parse(*args, **kwargs)
            except SecAggConfigError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError):
                raise WireFormatError(f"malformed {what}") from None

        return parsed

    return wrap


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def adverts_to_bytes(adverts: dict[str, KeyAdvert]) -> bytes:
    return _dump({k: {"c": a.c_pub.hex(), "s": a.s_pub.hex(), "commit": a.commit.hex(), "sig": a.sig.hex()}
                  for k, a in adverts.items()})


ADVERT_FIELD_BYTES = {"c": 32, "s": 32, "commit": 32, "sig": 64}  # X25519, X25519, SHA-256, Ed25519


@_parsed("key advertisements")
def adverts_from_bytes(data: bytes) -> dict[str, KeyAdvert]:
    """Advertisements from JSON; every field must have its exact length (a longer field could
    carry another site's entry)."""
    raw = json.loads(data)
    out = {}
    for k, v in raw.items():
        fields_ = {f: bytes.fromhex(v[f]) for f in ADVERT_FIELD_BYTES}
        if set(v) != set(ADVERT_FIELD_BYTES) or any(len(fields_[f]) != n for f, n in ADVERT_FIELD_BYTES.items()):
            raise ValueError("an advertisement field of the wrong length")
        out[k] = KeyAdvert(k, fields_["c"], fields_["s"], fields_["commit"], fields_["sig"])
    return out


def boxes_to_bytes(boxes: dict[str, bytes]) -> bytes:
    return _dump({k: v.hex() for k, v in boxes.items()})


@_parsed("share boxes")
def boxes_from_bytes(data: bytes) -> dict[str, bytes]:
    return {k: bytes.fromhex(v) for k, v in json.loads(data).items()}


def reveals_to_bytes(reveals: dict[str, tuple[str, bytes]]) -> bytes:
    return _dump({k: [kind, share.hex()] for k, (kind, share) in reveals.items()})


@_parsed("reveals")
def reveals_from_bytes(data: bytes) -> dict[str, tuple[str, bytes]]:
    return {k: (str(kind), bytes.fromhex(share)) for k, (kind, share) in json.loads(data).items()}


def params_to_json(params: SecAggParams) -> dict[str, Any]:
    return {**asdict(params), "sites": list(params.sites)}


@_parsed("secure-aggregation parameters")
def params_from_json(obj: dict[str, Any]) -> SecAggParams:
    """The round parameters from the server's JSON (attacker input: unknown keys and wrong
    types are refused; the dataclass checks the ranges)."""
    names = {f.name for f in fields(SecAggParams)}
    if not isinstance(obj, dict) or set(obj) - names:
        raise ValueError("secure-aggregation parameters with unknown keys")
    return SecAggParams(**{**obj, "sites": tuple(str(s) for s in obj["sites"])})


@_parsed("secure-aggregation parameters")
def params_from_text(text: str) -> SecAggParams:
    """The round parameters from the JSON text the server sent (see :func:`params_from_json`)."""
    return params_from_json(json.loads(text))


_BYTES = ("c_priv", "c_pub", "s_priv", "s_pub", "nonce", "b")


def session_to_bytes(session: SiteSession) -> bytes:
    """The site's secret round state (kept only in the site process's ``context.state``)."""
    return _dump({
        **{k: getattr(session, k).hex() for k in _BYTES},
        "params": params_to_json(session.params_) if session.params_ else None, "site": session.site,
        "run_id": session.run_id, "round": session.round, "revealed_for": session.revealed_for,
        "adverts": adverts_to_bytes(session.adverts).decode(),
        "own_shares": [s.hex() for s in session.own_shares],
        "shares": {k: [a.hex(), b.hex()] for k, (a, b) in session.shares.items()},
        "revealed": session.revealed, "sharers": list(session.sharers), "survivors": list(session.survivors),
    })


def session_from_bytes(data: bytes) -> SiteSession:
    raw = json.loads(data)
    names = {f.name for f in fields(SiteSession)}
    values: dict[str, Any] = {k: bytes.fromhex(raw[k]) for k in _BYTES}
    values |= {
        "params_": params_from_json(raw["params"]) if raw["params"] else None, "site": raw["site"],
        "run_id": raw["run_id"], "round": raw["round"], "revealed_for": str(raw["revealed_for"]),
        "adverts": adverts_from_bytes(raw["adverts"].encode()),
        "own_shares": tuple(bytes.fromhex(s) for s in raw["own_shares"]),
        "shares": {k: (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in raw["shares"].items()},
        "revealed": dict(raw["revealed"]),
        "sharers": tuple(raw.get("sharers", ())), "survivors": tuple(raw.get("survivors", ())),
    }
    return SiteSession(**{k: v for k, v in values.items() if k in names})


def roster_bytes(sites: dict[str, str], server: str | None = None) -> bytes:
    """The canonical federation roster ``{"sites": {name: Ed25519 PEM}, "server": PEM}``: the
    enrolled sites' identity keys and the server's audit key. Its SHA-256 is the fingerprint
    operators compare out of band, so pinning it pins every key an audit is verified with."""
    doc: dict[str, Any] = {"sites": dict(sorted(sites.items()))}
    if server is not None:
        doc["server"] = server
    return _dump(doc)


def canonical_roster(data: bytes) -> bytes:
    """Re-encode a roster document canonically (raises ValueError when it is not one)."""
    raw = json.loads(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("sites"), dict) or set(raw) - {"sites", "server"} \
            or not isinstance(raw.get("server", ""), str):
        raise ValueError("a roster is {\"sites\": {name: PEM}, \"server\": PEM}")
    server = raw.get("server")
    return roster_bytes({str(k): str(v) for k, v in raw["sites"].items()}, None if server is None else str(server))


def roster_fingerprint(data: bytes) -> str:
    return hashlib.sha256(canonical_roster(data)).hexdigest()


def load_roster(path: Path) -> dict[str, Ed25519PublicKey]:
    """The pinned federation roster: ``{"sites": {name: PEM public key}}``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        sites = raw["sites"]
        pems = {str(name): pem.encode() for name, pem in sites.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WireFormatError(f"{path}: not a federation roster ({type(exc).__name__}): it holds "
                              '{"sites": {name: PEM public key}}; restore it from the consortium\'s copy') from None
    return {name: public_key_from_pem(pem, f"{path}: {name}") for name, pem in pems.items()}
