"""A site's signed summary of its audit log, for the central report (nothing identifying:
run ids, rounds, ε, σ, counts and hashes only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.audit.events import E
from privacy.audit.log import Entry, canonical, now_iso
from privacy.audit.verify import check_chain, segment_files
from privacy.errors import IntegrityError
from privacy.keys import public_fingerprint, public_pem

KIND = "medfed-site-audit-export"


class ExportError(IntegrityError, ValueError):
    """The site's own log does not verify, or an export's signature does not."""


def summarize(entries: list[Entry]) -> dict[str, Any]:
    """Per run: what the site joined with and, per round, what it did."""
    runs: dict[str, Any] = {}
    for e in entries:
        run = e.data.get("run_id")
        if run is None:
            continue
        slot = runs.setdefault(str(run), {"joined": {}, "rounds": []})
        if e.event == E.RUN_JOINED:
            slot["joined"] = {k: v for k, v in e.data.items() if k != "run_id"}
        elif e.event == E.CODE_FOREIGN:  # what the site's launcher verified, not what the bundle says of itself
            slot["code_ran"] = e.data.get("code_sha256")
        elif e.event in (E.ROUND_TRAINED, E.REFUSED) or (e.event == E.EVALUATED and e.data.get("dp")):
            status = {E.ROUND_TRAINED: "trained", E.REFUSED: "refused", E.EVALUATED: "evaluated"}[e.event]
            slot["rounds"].append({
                "round": e.data.get("round"), "status": status,
                "epsilon": e.data.get("epsilon_after", e.data.get("epsilon")), "delta": e.data.get("delta"),
                "noise_multiplier": e.data.get("noise_multiplier"), "patients": e.data.get("patients"),
                "global_sha256": e.data.get("global_sha256"), "entry": e.hash,
            })
    return runs


def build_export(log: Path, site: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Verify the site's own log, summarize it, sign the summary."""
    chain = check_chain(segment_files(log), key.public_key(), site)
    if chain.problems:
        raise ExportError(f"the site's own audit log does not verify: {chain.problems[0]}")
    body = {
        "kind": KIND, "site": site, "created": now_iso(), "key_fingerprint": public_fingerprint(key.public_key()),
        "public_key": public_pem(key.public_key()).decode(), "head": chain.head, "entries": len(chain.entries),
        "runs": summarize(chain.entries),
    }
    return {**body, "sig": key.sign(canonical(body)).hex()}


def verify_export(export: dict[str, Any], key: Ed25519PublicKey) -> None:
    """Raise :class:`ExportError` unless ``export`` is signed by ``key``."""
    body = {k: v for k, v in export.items() if k != "sig"}
    try:
        key.verify(bytes.fromhex(str(export.get("sig", ""))), canonical(body))
    except (InvalidSignature, ValueError):
        raise ExportError(f"export of site {export.get('site')!r}: signature does not verify with its key") from None
