"""The site's privacy ledger: append-only (σ, q, steps) events persisted atomically in ledger.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privacy.dp import GaussianSteps, epsilon
from privacy.files import atomic_write_json

LEDGER_VERSION = 1


class LedgerCorruptError(Exception):
    """ledger.json cannot be trusted; the site refuses to train rather than restart at ε = 0."""


@dataclass(frozen=True)
class LedgerEvent:
    """One round of DP training that left (or was about to leave) the site."""

    round: int
    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    epsilon_after: float
    delta: float
    timestamp: str

    def mechanism(self) -> GaussianSteps:
        return GaussianSteps(self.noise_multiplier, self.sample_rate, self.steps)


def _digest(events: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(events, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class PrivacyLedger:
    """Immutable view of ``ledger.json``; :meth:`append` writes and returns the new ledger."""

    path: Path
    events: tuple[LedgerEvent, ...] = ()

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Load the ledger (empty if the file does not exist yet); refuse a damaged file."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        fix = ("restore it from backup; never delete it, or the site's privacy spending "
               "would silently restart at zero")
        try:
            doc = json.loads(path.read_text())
            raw = doc["events"]
            if doc.get("version") != LEDGER_VERSION or doc.get("sha256") != _digest(raw):
                raise ValueError("checksum or version mismatch")
            names = {f.name for f in fields(LedgerEvent)}
            events = tuple(LedgerEvent(**{k: e[k] for k in names}) for e in raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerCorruptError(f"privacy ledger {path} is corrupted ({exc}): {fix}") from None
        return cls(path, events)

    def mechanisms(self) -> list[GaussianSteps]:
        return [e.mechanism() for e in self.events]

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """ε spent so far, recomputed from the events (never read from a stored number)."""
        return epsilon(self.mechanisms(), delta=delta, accountant=accountant)

    def append(self, event: LedgerEvent) -> PrivacyLedger:
        """Persist the ledger with ``event`` added (atomic write), return the new view."""
        events = [*self.events, event]
        raw = [asdict(e) for e in events]
        atomic_write_json(self.path, {"version": LEDGER_VERSION, "events": raw, "sha256": _digest(raw)},
                          mode=0o600)
        return PrivacyLedger(self.path, tuple(events))

    def summary(self, *, delta: float, max_epsilon: float, accountant: str = "rdp") -> dict[str, Any]:
        """The numbers `medfed-site budget` prints."""
        eps = self.epsilon(delta=delta, accountant=accountant)
        remaining = 0
        if self.events:
            last = self.events[-1]
            while remaining < 10_000:
                more = GaussianSteps(last.noise_multiplier, last.sample_rate, last.steps * (remaining + 1))
                nxt = epsilon([*self.mechanisms(), more], delta=delta, accountant=accountant)
                if nxt > max_epsilon:
                    break
                remaining += 1
        return {"epsilon": eps, "delta": delta, "max_epsilon": max_epsilon,
                "remaining_rounds_estimate": remaining,
                "events": [asdict(e) for e in self.events]}


def now_utc() -> str:
    """UTC timestamp, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")
