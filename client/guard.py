"""The egress guard: the outermost ClientApp mod, through which every reply leaves the site.

What leaves is rebuilt by the site from a closed schema (``privacy.reply_schema``): the
reply's metrics quantised to the metric grid, its arrays only when they are the model's
manifest (or the secure-aggregation layout), its protocol bytes only when they parse and
fit their cap, no number whose forms match a fingerprint of the site's identifying header
values. An error reply leaves as a known numeric code with that code's fixed text
(``privacy.egress.error_text``), never its own text. An exception anywhere inside the
ClientApp, the guard's own work included (a failing site configuration, a missing
fingerprint set), is logged here, at the site, with its detail, and answered with a
numeric code only. Every reply the guard stops or rewrites is written to the site's
audit log (``egress-blocked``), naming the keys, never the values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.audit_trail import SiteAudit
from client.config import SiteConfig, SiteConfigError
from client.dicom import SiteDataError
from client.dicom.identifiers import PRINTS_FILE, Fingerprints, IdentifierKeyError, load_fingerprints
from client.dicom.ingest import ingest
from client.dicom.preprocess import Preprocessing
from client.model_names import ModelNameError, ModelRefused
from client.models import manifest
from client.roster import PINNED
from privacy import egress as K
from privacy.audit.events import E
from privacy.egress import BLOCKED_REASON as BLOCKED_REASON  # re-exported: the guard's fixed text
from privacy.egress import (
    CONFIG_INVALID,
    DATA_UNUSABLE,
    EGRESS_BLOCKED,
    FINGERPRINTS_UNAVAILABLE,
    INTERNAL_ERROR,
    LEDGER_REFUSED,
    REQUEST_MALFORMED,
    error_text,
)
from privacy.errors import IntegrityError
from privacy.files import LockTimeout
from privacy.ledger import LedgerChangedError, LedgerCorruptError
from privacy.protocol import RoundRequest, RoundRequestError
from privacy.reply_schema import ReplySchema, check_reply

MESSAGE_TYPES = frozenset({MessageType.TRAIN, MessageType.EVALUATE})  # exactly; no "train.<action>"
log = logging.getLogger("medfed.site")


class FingerprintsUnavailable(IntegrityError, RuntimeError):
    """The site's fingerprint set is missing and cannot be rebuilt; the message names the file
    and the fix. The site sends nothing until it exists."""


Resolver = Callable[[Context], SiteConfig]
_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (SiteConfigError, CONFIG_INVALID), ((LedgerCorruptError, LedgerChangedError, LockTimeout), LEDGER_REFUSED),
    (RoundRequestError, REQUEST_MALFORMED), (SiteDataError, DATA_UNUSABLE),
    ((FingerprintsUnavailable, IdentifierKeyError), FINGERPRINTS_UNAVAILABLE),
)


def error_code(exc: BaseException) -> int:
    """The numeric code an exception at the site is answered with."""
    return next((code for kinds, code in _CODES if isinstance(exc, kinds)), INTERNAL_ERROR)


def site_fingerprints(site: SiteConfig) -> Fingerprints:
    """The site's fingerprint set (``keys/``); rebuilt from the DICOM scan of the export when
    missing or made with another key. Raises :class:`FingerprintsUnavailable` when it cannot be."""
    found = load_fingerprints(site.keys_dir)
    if found is not None:
        return found
    path = site.keys_dir / PRINTS_FILE
    log.warning("site %s: %s is missing or was made with another identifier key; rebuilding it from the DICOM "
                "export", site.name, path)
    fix = (f"point [data] dicom in {site.workspace / 'site.toml'} at the site's DICOM export and run "
           f"`medfed-site check --workspace {site.workspace}` to rebuild it")
    try:
        ingest(site.dicom_dir, site.data.preprocessing(Preprocessing().image_size), cache_dir=site.cache_dir,
               keys_dir=site.keys_dir, workers=site.data.workers, exclude=[site.labels_file])
    except (SiteDataError, OSError, IdentifierKeyError) as exc:
        raise FingerprintsUnavailable(f"{path} is missing and could not be rebuilt from the DICOM export "
                                      f"({exc}); {fix}; the site sends nothing until it exists") from None
    found = load_fingerprints(site.keys_dir)
    if found is None:
        raise FingerprintsUnavailable(f"{path} could not be written; {fix}")
    return found


def request_manifest(site: SiteConfig, msg: Message) -> Mapping[str, tuple[tuple[int, ...], str]]:
    """The arrays of the network the request names, when this site trains it (none may leave for a
    network it refuses); a request that does not parse was answered without training: the built-in default."""
    try:
        req = RoundRequest.from_record(msg.content.config_records[K.CONFIG])
    except (RoundRequestError, KeyError):
        return manifest()
    if site.task_refusal(req.model, req.image_size, req.finding_names, req.batch_size) is not None:
        return MappingProxyType({})
    try:
        return manifest(req.model, req.outputs, site.models.factories, req.channels)
    except (ModelRefused, ModelNameError):
        return MappingProxyType({})


def reply_schema(site: SiteConfig, model_manifest: Mapping[str, tuple[tuple[int, ...], str]] | None = None
                 ) -> ReplySchema:
    """What this site's replies may hold: its name, the manifest of the request's network (default:
    the built-in SliceNet), the pinned roster's sites."""
    peers: frozenset[str] = frozenset()
    roster = site.workspace / PINNED
    if roster.is_file():
        try:
            peers = frozenset(str(name) for name in json.loads(roster.read_text())["sites"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("site %s: the pinned roster %s is unreadable; secure-aggregation replies are blocked until "
                        "it is pinned again (`medfed-site roster`)", site.name, roster)
    return ReplySchema(site_name=site.name, manifest=manifest() if model_manifest is None else model_manifest, peers=peers,
                       masked_only=site.privacy.require_secure_aggregation)


def egress_guard(resolve: Resolver) -> Mod:
    """The mod; ``resolve`` finds the site's configuration from the node context."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type not in MESSAGE_TYPES:
            # Flower routes "train.<action>" to the train handler too; only the two exact types run
            # (the secure-aggregation mod and the site's checks are written for them)
            log.warning("site refuses a request of message type %r: only %s are answered",
                        _safe_type(msg), ", ".join(sorted(MESSAGE_TYPES)))
            _audit(resolve, context, msg, reason="message-type", code=REQUEST_MALFORMED)
            return _error(msg, REQUEST_MALFORMED)
        try:
            return _guarded(msg, context, call_next(msg, context), resolve)
        except Exception as exc:  # the outermost layer: detail stays here, a code leaves
            code = error_code(exc)
            log.error("site request %s failed (code %d): %s", msg.metadata.message_type, code, exc,
                      exc_info=code == INTERNAL_ERROR)
            _audit(resolve, context, msg, reason="error-detail-withheld", code=code)
            return _error(msg, code)

    return mod


def _guarded(msg: Message, context: Context, reply: Message, resolve: Resolver) -> Message:
    if reply.has_error():
        code, text = error_text(reply.error.code, reply.error.reason or "")
        if (code, text) != (reply.error.code, reply.error.reason):
            log.warning("an error reply to %s (code %d) leaves as code %d with its fixed text; its own text stays "
                        "here: %s", msg.metadata.message_type, reply.error.code, code, reply.error.reason)
            _audit(resolve, context, msg, reason="error-text-rebuilt", code=code)
        return Message(Error(code=code, reason=text), reply_to=msg)
    site = resolve(context)
    try:
        found = site_fingerprints(site)
    except FingerprintsUnavailable as exc:
        log.error("site %s refuses to send its %s reply: %s", site.name, msg.metadata.message_type, exc)
        _audit(resolve, context, msg, reason="fingerprints-unavailable", code=FINGERPRINTS_UNAVAILABLE)
        return _error(msg, FINGERPRINTS_UNAVAILABLE)
    checked = check_reply(reply.content, reply_schema(site, request_manifest(site, msg)), found.prints, found.key)
    if not checked.problems:
        return Message(checked.content, reply_to=msg)
    log.warning("site %s: egress guard blocked a reply: %s", site.name, "; ".join(checked.problems))
    _audit(resolve, context, msg, reason="schema", code=EGRESS_BLOCKED, problems=len(checked.problems))
    return _error(msg, EGRESS_BLOCKED)


def _safe_type(msg: Message) -> str:
    """The request's message type for a log line or audit entry (the server chose it: only known ones)."""
    kind = msg.metadata.message_type
    return kind if kind in MESSAGE_TYPES else "other"


def _error(msg: Message, code: int) -> Message:
    code, text = error_text(code)
    return Message(Error(code=code, reason=text), reply_to=msg)


def _audit(resolve: Resolver, context: Context, msg: Message, **data: object) -> None:
    """An ``egress-blocked`` entry in the site's audit log (when the site can be found at all)."""
    try:
        site = resolve(context)
        SiteAudit(site).log.append(E.EGRESS_BLOCKED, {"message_type": _safe_type(msg),
                                                      **data})
    except Exception as exc:  # a broken workspace must not turn a numeric answer into a crash
        log.error("the egress guard could not write its audit entry: %s", exc)
