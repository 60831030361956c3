"""What a site writes to its own signed audit log (``<workspace>/audit.jsonl``).

Each round's entry carries the run id, the round and the hash of the global model the
site received, so the server's and the site's logs cross-check; the hash of the site's
last entry goes back with every reply (``audit-head`` in the site record)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.config import SITE_FILE, SiteConfig
from privacy.audit.events import E
from privacy.audit.log import AuditLog, read_entries
from privacy.keys import load_or_create_key
from privacy.ledger import LedgerEvent

AUDIT_FILE = "audit.jsonl"
SITE_KEY = "audit.key"  # in the site's keys folder: its Ed25519 identity key doubles as its audit key


@dataclass(frozen=True)
class RoundIds:
    """What ties a site's entry to the server's: run, round, hash of the global model received,
    and the server's audit-log head the request carried (the site's counter-signature of it)."""

    run_id: str
    round: int
    global_sha256: str
    server_head: str = ""

    def data(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "round": self.round, "global_sha256": self.global_sha256,
                "server_head": self.server_head}


def site_key_path(site: SiteConfig) -> Path:
    return site.keys_dir / SITE_KEY


class SiteAudit:
    """One site's audit log."""

    def __init__(self, site: SiteConfig) -> None:
        self.log = AuditLog(site.workspace / AUDIT_FILE, site.name, load_or_create_key(site_key_path(site)))
        self._config_sha256 = hashlib.sha256((site.workspace / SITE_FILE).read_bytes()).hexdigest()

    def join(self, run_id: str, facts: dict[str, Any]) -> None:
        """First message of a run: ``run-joined`` with the site's policy and data fingerprint
        (``facts``); ``config-changed`` when site.toml changed since the last entry."""
        joined, last_config = False, None
        if self.log.path.exists():
            for e in read_entries(self.log.path):
                if e.event == E.RUN_JOINED and e.data.get("run_id") == run_id:
                    joined = True
                if "config_sha256" in e.data:
                    last_config = e.data["config_sha256"]
        if last_config is not None and last_config != self._config_sha256:
            self.log.append(E.CONFIG, {"config_sha256": self._config_sha256, "previous": last_config})
        if not joined:
            self.log.append(E.RUN_JOINED, {"run_id": run_id, "config_sha256": self._config_sha256, **facts})

    def trained(self, ids: RoundIds, event: LedgerEvent | None, *, patients: int, deterministic: bool,
                model: str = "slicenet", findings: tuple[str, ...] = ()) -> None:
        """The round is counted (DP: the ledger event) before the update leaves.
        ``deterministic``: the site chose reproducible noise (``privacy.seed``); ``model`` and
        ``findings``: the network and the label columns it was trained on."""
        data: dict[str, Any] = {**ids.data(), "patients": patients, "dp": event is not None,
                                "deterministic_noise": deterministic, "model": model, "findings": list(findings)}
        self.log.append(E.ROUND_TRAINED, data | _mechanism(event))

    def update_bounded(self, ids: RoundIds, *, bound: float, scaled: bool) -> None:
        """The update was held to the site's ``[robustness] max_update_norm`` (``scaled``: it was above it)."""
        self.log.append(E.UPDATE_BOUNDED, {**ids.data(), "bound": bound, "scaled": scaled})

    def evaluated(self, ids: RoundIds, event: LedgerEvent | None, *, metrics: str, deterministic: bool) -> None:
        """Validation metrics are about to leave: metered (``event``, charged) or, by the site's
        own choice, exact (``metrics = "exact"``, no guarantee)."""
        data: dict[str, Any] = {**ids.data(), "metrics": metrics, "dp": event is not None,
                                "deterministic_noise": deterministic}
        self.log.append(E.EVALUATED, data | _mechanism(event))

    def evaluation_refused(self, ids: RoundIds, *, reason: str) -> None:
        self.log.append(E.EVALUATED, {**ids.data(), "refused": reason, "dp": False})

    def refused(self, ids: RoundIds, *, reason: str, epsilon: float) -> None:
        self.log.append(E.REFUSED, {**ids.data(), "reason": reason, "epsilon": epsilon})

    def head(self) -> str:
        return self.log.head()


def _mechanism(event: LedgerEvent | None) -> dict[str, Any]:
    """The ledger event's fields the audit log repeats (so a lost ledger can be rebuilt from it)."""
    if event is None:
        return {}
    fields = {"noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate, "steps": event.steps,
              "epsilon_after": event.epsilon_after, "delta": event.delta, "accountant": event.accountant}
    return fields | ({"grad_sample_mode": event.grad_sample_mode} if event.grad_sample_mode else {})
