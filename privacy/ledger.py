"""The site's privacy ledger: append-only (σ, q, steps) events in ledger.json, signed by the
site's identity key, appended under an exclusive lock so that no event is ever lost."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.audit.log import canonical
from privacy.clock import timestamp
from privacy.dp import GaussianSteps, epsilon
from privacy.errors import IntegrityError
from privacy.files import atomic_write_json, exclusive_lock

LEDGER_VERSION = 2
KINDS = ("train", "evaluate")  # DP-SGD of a round; a noisy release of validation metrics


class LedgerCorruptError(IntegrityError):
    """ledger.json cannot be trusted; the site refuses to train rather than restart at ε = 0."""


class LedgerChangedError(IntegrityError):
    """Another process appended since this view was loaded: reload, re-plan, append again."""


@dataclass(frozen=True)
class LedgerEvent:
    """One privacy-costing release that left (or was about to leave) the site."""

    round: int
    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    epsilon_after: float
    delta: float
    timestamp: str
    kind: str = "train"
    grad_sample_mode: str = ""  # training: how Opacus computed the per-sample gradients ("hooks", "functorch")

    def mechanism(self) -> GaussianSteps:
        return GaussianSteps(self.noise_multiplier, self.sample_rate, self.steps)

    def key(self) -> tuple[str, str, int, float, float, int]:
        """What identifies the release (the audit log records the same fields)."""
        return (self.kind, self.run_id, self.round, self.noise_multiplier, self.sample_rate, self.steps)


def _signed_bytes(events: list[dict[str, Any]]) -> bytes:
    return canonical({"version": LEDGER_VERSION, "events": events})


@dataclass(frozen=True)
class PrivacyLedger:
    """Immutable view of ``ledger.json``; :meth:`append` writes and returns the new ledger."""

    path: Path
    events: tuple[LedgerEvent, ...] = ()

    @classmethod
    def load(cls, path: Path, key: Ed25519PublicKey) -> PrivacyLedger:
        """Load the ledger (empty if the file does not exist yet) and check the site's signature.

        Raises
        ------
        LedgerCorruptError
            The file is damaged, edited or signed by another key (the message names the file
            and the fix).
        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        fix = ("restore it from backup or rebuild it from the signed audit log (`medfed-site budget "
               "--workspace WORKSPACE --rebuild`); never delete it, or the site's privacy spending "
               "would silently restart at zero")
        try:
            doc = json.loads(path.read_text())
            raw = doc["events"]
            if doc.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {LEDGER_VERSION}")
            try:
                key.verify(bytes.fromhex(str(doc["signature"])), _signed_bytes(raw))
            except InvalidSignature:
                raise ValueError("signature does not match the site's identity key (edited by hand?)") from None
            names = {f.name for f in fields(LedgerEvent)}
            events = tuple(LedgerEvent(**{k: e[k] for k in names if k in e}) for e in raw)  # missing: a TypeError
            if any(e.kind not in KINDS for e in events):
                raise ValueError("unknown event kind")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerCorruptError(f"privacy ledger {path} is corrupted ({exc}): {fix}") from None
        return cls(path, events)

    @staticmethod
    def unverified_events(path: Path) -> tuple[LedgerEvent, ...]:
        """The events of a ledger file that may not verify (a rebuild keeps them: an extra event
        can only over-count); ``()`` when the file is missing or unreadable."""
        try:
            raw = json.loads(Path(path).read_text())["events"]
            names = {f.name for f in fields(LedgerEvent)}
            return tuple(LedgerEvent(**{"kind": "train", **{k: e[k] for k in names if k in e}}) for e in raw)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return ()

    def mechanisms(self) -> list[GaussianSteps]:
        return [e.mechanism() for e in self.events]

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """ε spent so far, recomputed from the events (never read from a stored number)."""
        return epsilon(self.mechanisms(), delta=delta, accountant=accountant)

    def append(self, event: LedgerEvent, key: Ed25519PrivateKey) -> PrivacyLedger:
        """Persist the ledger with ``event`` added and return the new view.

        Under an exclusive lock the file is read again; if another process appended since
        this view was loaded, nothing is written and :class:`LedgerChangedError` is raised,
        so a plan computed from stale spending is never recorded (compare-and-swap).
        """
        with exclusive_lock(self.lock_file):
            current = PrivacyLedger.load(self.path, key.public_key())
            if current.events != self.events:
                raise LedgerChangedError(f"{self.path} changed since it was read (another run at this site)")
            return self._write([*self.events, event], key)

    def _write(self, events: list[LedgerEvent], key: Ed25519PrivateKey) -> PrivacyLedger:
        raw = [asdict(e) for e in events]
        atomic_write_json(self.path, {"version": LEDGER_VERSION, "events": raw,
                                      "signature": key.sign(_signed_bytes(raw)).hex()}, mode=0o600)
        return PrivacyLedger(self.path, tuple(events))

    @property
    def lock_file(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def replaced(self, events: list[LedgerEvent], key: Ed25519PrivateKey) -> PrivacyLedger:
        """Write ``events`` as the whole ledger (the rebuild from the audit log), under the lock."""
        with exclusive_lock(self.lock_file):
            return self._write(events, key)

    def summary(self, *, delta: float, max_epsilon: float, accountant: str = "rdp") -> dict[str, Any]:
        """The numbers `medfed-site budget` prints."""
        eps = self.epsilon(delta=delta, accountant=accountant)
        remaining = 0
        trained = [e for e in self.events if e.kind == "train"]
        if trained:
            last = trained[-1]
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
    return timestamp("seconds")
