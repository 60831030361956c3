"""The site's ledger as the site uses it: signed with its identity key, cross-checked at every
load against its signed audit log (a deleted or rolled-back ledger is refused), appended by
compare-and-swap, and rebuilt from the audit log when it was lost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from client.audit_trail import AUDIT_FILE, site_key_path
from client.config import SiteConfig
from privacy.audit.events import E
from privacy.audit.log import Entry
from privacy.audit.verify import check_chain, segment_files
from privacy.keys import load_or_create_key
from privacy.ledger import LedgerChangedError, LedgerCorruptError, LedgerEvent, PrivacyLedger

ATTEMPTS = 8  # compare-and-swap retries when another process appends at the same moment
_KIND = {E.ROUND_TRAINED: "train", E.EVALUATED: "evaluate"}


def audited_events(site: SiteConfig) -> list[LedgerEvent]:
    """Every privacy-costing release the site's signed audit log records, as ledger events."""
    key = load_or_create_key(site_key_path(site))
    files = segment_files(site.workspace / AUDIT_FILE)
    if not files:
        return []
    chain = check_chain(files, key.public_key(), site.name)
    if chain.problems:
        raise LedgerCorruptError(f"the site's audit log does not verify ({chain.problems[0]}): the ledger cannot be "
                                 "cross-checked; restore audit.jsonl from backup")
    return [_event(e) for e in chain.entries if e.event in _KIND and e.data.get("dp")]


def _event(e: Entry) -> LedgerEvent:
    d = e.data
    return LedgerEvent(round=int(d["round"]), run_id=str(d["run_id"]), noise_multiplier=float(d["noise_multiplier"]),
                       sample_rate=float(d["sample_rate"]), steps=int(d["steps"]), accountant=str(d["accountant"]),
                       epsilon_after=float(d["epsilon_after"]), delta=float(d["delta"]), timestamp=e.time,
                       kind=_KIND[e.event], grad_sample_mode=str(d.get("grad_sample_mode", "")))


def open_ledger(site: SiteConfig) -> PrivacyLedger:
    """The site's ledger, refused when it lacks a release its audit log records.

    The audit log is read first: every release is appended to the ledger before the audit log,
    so a ledger read after the log holds everything the log did, even while another process
    appends to both."""
    key = load_or_create_key(site_key_path(site))
    audited = audited_events(site)
    ledger = PrivacyLedger.load(site.ledger_file, key.public_key())
    missing = Counter(e.key() for e in audited) - Counter(e.key() for e in ledger.events)
    if missing:
        kind, run, rnd, *_ = max(missing, key=lambda k: (k[1], k[2]))
        state = "does not exist" if not site.ledger_file.exists() else "lacks them"
        raise LedgerCorruptError(
            f"privacy ledger {site.ledger_file} {state}: the signed audit log {site.workspace / AUDIT_FILE} records "
            f"{sum(missing.values())} release(s) it does not hold (e.g. {kind} of run {run}, round {rnd}), so it "
            f"was deleted or rolled back. Fix: `medfed-site budget --workspace {site.workspace} --rebuild` "
            "rebuilds it from the audit log")
    return ledger


def commit(site: SiteConfig, plan: Callable[[PrivacyLedger], LedgerEvent]) -> tuple[PrivacyLedger, LedgerEvent]:
    """Plan against the ledger as it is on disk and append the planned event; when another
    process appended in between, plan again (no event is lost, no plan uses stale spending)."""
    key = load_or_create_key(site_key_path(site))
    for _ in range(ATTEMPTS):
        ledger = open_ledger(site)
        event = plan(ledger)
        try:
            return ledger.append(event, key), event
        except LedgerChangedError:
            continue
    raise LedgerChangedError(f"{site.ledger_file} kept changing during {ATTEMPTS} attempts: another process is "
                             "appending continuously; stop it and retry")


def rebuild(site: SiteConfig) -> tuple[PrivacyLedger, int, bool]:
    """Rewrite the ledger from the audit log: every audited release, plus every event of the old
    ledger the log lacks, read even when its signature no longer verifies (an extra event can
    only over-count, so the rebuilt ε is never below the old file's). Returns the ledger, how
    many events were restored, and whether an old file existed but could not be read at all."""
    key = load_or_create_key(site_key_path(site))
    audited = audited_events(site)
    current = PrivacyLedger.unverified_events(site.ledger_file)
    unreadable = site.ledger_file.exists() and not current and site.ledger_file.stat().st_size > 0
    extra = Counter(e.key() for e in current) - Counter(e.key() for e in audited)
    kept = []
    for e in current:
        if extra[e.key()] > 0:
            kept.append(e)
            extra[e.key()] -= 1
    events = [*audited, *kept]
    ledger = PrivacyLedger(site.ledger_file).replaced(events, key)
    return ledger, max(0, len(events) - len(current)), unreadable
