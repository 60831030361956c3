"""The federation roster a site pins: the enrolled sites' identity keys that sign the
secure-aggregation key advertisements and the consistency signatures.

The site never trusts the roster the server delivers on its own: its operator first records
the roster's fingerprint obtained from the consortium out of band (``medfed-site roster
--expect``); the first delivered roster that matches it is pinned. No expected fingerprint,
or one that does not match, is refused (a server could otherwise pin a roster of the site
and its own sybils). A changed roster waits until the operator compares and accepts it."""

from __future__ import annotations

import re
from pathlib import Path

from client.audit_trail import SiteAudit
from client.config import SiteConfig, SiteConfigError
from privacy.audit.events import E
from privacy.files import atomic_write_bytes
from privacy.secagg.site import VerificationError
from privacy.secagg.wire import canonical_roster, roster_fingerprint

PINNED = Path("trust") / "roster.json"
PENDING = Path("trust") / "roster.pending.json"
EXPECTED = Path("trust") / "roster.expected"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def expect(site: SiteConfig, fingerprint: str) -> str:
    """Record the roster fingerprint the site's operator obtained out of band (audited)."""
    fp = fingerprint.strip().lower()
    if not _HEX64.match(fp):
        raise SiteConfigError(f"{fingerprint!r} is not a roster fingerprint (64 hex characters, as "
                              "`medfed-server enroll` and `medfed-site roster` print it)")
    atomic_write_bytes(site.workspace / EXPECTED, (fp + "\n").encode())
    SiteAudit(site).log.append(E.ROSTER_EXPECTED, {"roster_sha256": fp})
    return fp


def check_delivered(site: SiteConfig, delivered: bytes) -> None:
    """Pin ``delivered`` when it matches the expected fingerprint and nothing is pinned yet;
    refuse it otherwise (a changed roster is kept pending for the operator)."""
    offered = canonical_roster(delivered)
    offered_fp = roster_fingerprint(offered)
    pinned_path, pending_path = site.workspace / PINNED, site.workspace / PENDING
    if not pinned_path.exists():
        expected_path = site.workspace / EXPECTED
        if not expected_path.exists():
            raise VerificationError(
                "no federation roster is pinned and none is expected: obtain the roster fingerprint from your "
                f"consortium (out of band, not from the server) and run `medfed-site roster --workspace "
                f"{site.workspace} --expect FINGERPRINT`", "roster-not-pinned")
        expected = expected_path.read_text().strip()
        if offered_fp != expected:
            atomic_write_bytes(pending_path, offered)
            raise VerificationError(f"the delivered roster ({offered_fp[:16]}…) is not the one this site expects "
                                    f"({expected[:16]}…); refused", "roster-mismatch")
        atomic_write_bytes(pinned_path, offered)
        SiteAudit(site).log.append(E.ROSTER_PINNED, {"roster_sha256": offered_fp})
        return
    pinned = canonical_roster(pinned_path.read_bytes())
    if pinned == offered:
        return
    atomic_write_bytes(pending_path, offered)
    raise VerificationError(
        f"the federation roster changed (pinned {roster_fingerprint(pinned)[:16]}…, offered "
        f"{offered_fp[:16]}…): compare the offered fingerprint with your consortium out of "
        f"band, then run `medfed-site roster --workspace {site.workspace} --accept FINGERPRINT`", "roster-changed")


def accept_pending(site: SiteConfig, fingerprint: str) -> str:
    """Pin the waiting roster, only if its fingerprint is ``fingerprint`` (the one the operator
    compared with the consortium): a roster the server delivers after the comparison is refused."""
    pending_path = site.workspace / PENDING
    if not (site.workspace / PINNED).exists():
        raise SiteConfigError("no roster is pinned yet: record the consortium's fingerprint with "
                              f"`medfed-site roster --workspace {site.workspace} --expect FINGERPRINT`")
    if not pending_path.exists():
        raise FileNotFoundError(f"{pending_path} does not exist: no changed roster is waiting")
    offered = canonical_roster(pending_path.read_bytes())
    fp = roster_fingerprint(offered)
    if fp != fingerprint.strip().lower():
        raise SiteConfigError(f"the waiting roster's fingerprint is {fp}, not {fingerprint.strip()}: it changed since "
                              "you compared it; compare again")
    atomic_write_bytes(site.workspace / PINNED, offered)
    pending_path.unlink()
    SiteAudit(site).log.append(E.ROSTER_ACCEPTED, {"roster_sha256": fp})
    return fp
