"""Which code the site runs: the medfed it installed, and the bundles its operator approved.

``trust/approved-code.json`` (0600) lists approved code digests (``privacy.bundle``); the
installed medfed is always approved. Approving and revoking are written to the site's audit log.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from client.audit_trail import SiteAudit
from client.config import SiteConfig, SiteConfigError
from privacy.audit.events import E
from privacy.clock import timestamp
from privacy.files import atomic_write_json, exclusive_lock

APPROVALS = "trust/approved-code.json"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def approvals_path(site: SiteConfig) -> Path:
    return site.workspace / APPROVALS


def approved(site: SiteConfig) -> dict[str, dict[str, Any]]:
    """Approved digests (beyond the installed medfed) with when and why."""
    path = approvals_path(site)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        entries = {str(e["digest"]): dict(e) for e in doc["approved"]}
    except (ValueError, KeyError, TypeError):
        raise SiteConfigError(f"{path} is not a valid approvals file; fix it or remove it and approve again") from None
    if not all(_DIGEST.match(d) for d in entries):
        raise SiteConfigError(f"{path}: an approved digest is not 64 lowercase hex characters")
    return entries


def approve(site: SiteConfig, digest: str, *, note: str = "") -> None:
    """Add ``digest`` to the site's allow-list (idempotent), audited as ``code-approved``."""
    digest = digest.strip().lower()
    if not _DIGEST.match(digest):
        raise SiteConfigError(f"{digest!r} is not a code digest (64 hex characters, as `medfed-site approvals` and the "
                              "site's code-refused log line print it)")
    with exclusive_lock(approvals_path(site).with_suffix(".lock")):
        entries = approved(site)
        entries.setdefault(digest, {"digest": digest, "approved_at": timestamp(),
                                    "note": note})
        atomic_write_json(approvals_path(site), {"approved": list(entries.values())}, mode=0o600)
    SiteAudit(site).log.append(E.CODE_APPROVED, {"code_sha256": digest})


def revoke(site: SiteConfig, digest: str) -> bool:
    """Remove ``digest`` from the allow-list; audited as ``code-revoked``. False if it was not there."""
    with exclusive_lock(approvals_path(site).with_suffix(".lock")):
        entries = approved(site)
        if entries.pop(digest.strip().lower(), None) is None:
            return False
        atomic_write_json(approvals_path(site), {"approved": list(entries.values())}, mode=0o600)
    SiteAudit(site).log.append(E.CODE_REVOKED, {"code_sha256": digest.strip().lower()})
    return True
