"""The federation roster a site pins: the enrolled sites' identity keys that sign the
secure-aggregation key advertisements. Pinned at first use; a different roster is refused
until the site's operator compares its fingerprint out of band and accepts it."""

from __future__ import annotations

from pathlib import Path

from client.audit_trail import SiteAudit
from client.config import SiteConfig
from privacy.audit.events import E
from privacy.files import atomic_write_bytes
from privacy.secagg.site import VerificationError
from privacy.secagg.wire import canonical_roster, roster_fingerprint

PINNED = Path("trust") / "roster.json"
PENDING = Path("trust") / "roster.pending.json"


def check_delivered(site: SiteConfig, delivered: bytes) -> None:
    """Pin ``delivered`` if nothing is pinned yet; refuse (and keep it pending) if it differs."""
    offered = canonical_roster(delivered)
    pinned_path, pending_path = site.workspace / PINNED, site.workspace / PENDING
    if not pinned_path.exists():
        atomic_write_bytes(pinned_path, offered)
        SiteAudit(site).log.append(E.ROSTER_PINNED, {"roster_sha256": roster_fingerprint(offered)})
        return
    pinned = canonical_roster(pinned_path.read_bytes())
    if pinned == offered:
        return
    atomic_write_bytes(pending_path, offered)
    raise VerificationError(
        f"the federation roster changed (pinned {roster_fingerprint(pinned)[:16]}…, offered "
        f"{roster_fingerprint(offered)[:16]}…): compare the offered fingerprint with the central operator out of "
        f"band, then run `medfed-site roster --workspace {site.workspace} --accept`")


def accept_pending(site: SiteConfig) -> str:
    """Make the pending roster the pinned one; returns its fingerprint."""
    pending_path = site.workspace / PENDING
    if not pending_path.exists():
        raise FileNotFoundError(f"{pending_path} does not exist: no changed roster is waiting")
    offered = canonical_roster(pending_path.read_bytes())
    atomic_write_bytes(site.workspace / PINNED, offered)
    pending_path.unlink()
    fp = roster_fingerprint(offered)
    SiteAudit(site).log.append(E.ROSTER_ACCEPTED, {"roster_sha256": fp})
    return fp
