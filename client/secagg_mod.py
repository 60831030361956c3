"""The site's secure-aggregation client: a ClientApp mod that runs the SecAgg+ stages
(``privacy.secagg``: five, and a nonce reveal for sparse graphs) on ``train`` messages carrying a ``secagg-stage``.

Protocol state stays in ``context.state`` between stages. Only the ``input`` stage calls
the wrapped ``train`` handler; its update (the delta) is flattened, weighted and masked
before it leaves, and only when the inbox is complete. Any verification failure (a
substituted key, parameters below the site's ``[secagg]`` floors, a withheld inbox, a ghost
survivor, a second survivor set, an unpinned roster) is refused with an error reply and
written to the site's audit log with the check's code (``secagg-<code>``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.audit_trail import SiteAudit, site_key_path
from client.config import SiteConfig
from client.roster import PINNED, check_delivered
from privacy import egress as K
from privacy.audit.events import E
from privacy.audit.log import read_entries
from privacy.keys import KeyFileError, load_private_key
from privacy.model_arrays import arrays_sha256, record_to_arrays
from privacy.protocol import RoundRequest, RoundRequestError
from privacy.secagg.params import SecAggConfigError
from privacy.secagg.site import SiteSession, VerificationError
from privacy.secagg.wire import (
    WireFormatError,
    adverts_from_bytes,
    adverts_to_bytes,
    boxes_from_bytes,
    boxes_to_bytes,
    load_roster,
    params_from_text,
    reveals_to_bytes,
    session_from_bytes,
    session_to_bytes,
)

STATE = "secagg"
REVEAL_WINDOW = 64  # the reveals whose abandoned ones [secagg] max_abandoned_reveals caps
MASKING = "secagg-masking"  # in context.state while this mod runs the train handler: its update will be masked
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
SECAGG_REFUSED = K.SECAGG_REFUSED  # error code of a round the site refused for a protocol check
log = logging.getLogger("medfed.site")


def masking(context: Context) -> bool:
    """Whether this mod is running the train handler now (its update leaves masked): set by the
    site's own mod in the node's local state, never by anything the server sends."""
    return MASKING in context.state.config_records


def roster_path(site: SiteConfig) -> Path:
    return site.workspace / PINNED


def secagg_mod(resolve: Callable[[Context], SiteConfig]) -> Mod:
    """The mod; ``resolve`` finds the site's configuration from the node context."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        is_train = msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN  # "train.<action>" too
        conf = msg.content.config_records.get(K.CONFIG) if is_train else None
        if conf is None or K.SECAGG_STAGE not in conf:
            return call_next(msg, context)
        site = resolve(context)
        stage = str(conf[K.SECAGG_STAGE])
        try:
            return _stage(stage, msg, context, call_next, site, conf)
        except (VerificationError, KeyFileError, SecAggConfigError, WireFormatError) as exc:
            # a check failed or the request is not in the protocol's format; any other exception is a
            # defect and reaches the egress guard (logged with its traceback, answered 469)
            code = exc.code if isinstance(exc, VerificationError) else "malformed"
            detail = str(exc) if isinstance(exc, VerificationError | KeyFileError | SecAggConfigError) else \
                f"malformed {stage} request ({exc})"
            log.warning("site %s refuses secure-aggregation stage %s: %s", site.name, stage, detail)
            SiteAudit(site).log.append(E.SECAGG_REFUSED, {"run_id": _safe_id(conf.get(K.RUN_ID)), "round": _round(conf),
                                                   "reason": f"secagg-{code}", "stage": _safe_stage(stage)})
            return Message(Error(code=SECAGG_REFUSED, reason=K.secagg_refusal_text(_safe_stage(stage), code)),
                           reply_to=msg)

    return mod


def _stage(stage: str, msg: Message, context: Context, call_next: ClientAppCallable, site: SiteConfig,
           conf: ConfigRecord) -> Message:
    run_id, round_ = _str(conf, K.RUN_ID), _int(conf, K.SERVER_ROUND)
    if not _ID.match(run_id):  # what the audit log records and what the train handler accepts
        raise VerificationError("the run id is not 1-64 letters, digits, '.', '_' or '-'", "malformed")
    if stage == "advertise":
        if K.SECAGG_ROSTER not in conf and not roster_path(site).exists():
            raise VerificationError("no roster delivered and none pinned", "roster-not-pinned")
        if K.SECAGG_ROSTER in conf:
            check_delivered(site, _bytes(conf, K.SECAGG_ROSTER))
        audit = SiteAudit(site)
        earlier = read_entries(audit.log.path) if audit.log.path.exists() else []
        if any(e.event == E.SECAGG_ADVERTISED and e.data.get("run_id") == run_id and e.data.get("round") == round_
               for e in earlier):
            # a restarted round would give the server a second set of keys, masks and signatures
            raise VerificationError("this site already advertised keys for this round of this run; a round is never "
                                    "restarted", "re-advertise")
        session, advert = SiteSession.start(run_id, round_, site.name, load_private_key(site_key_path(site)))
        audit.log.append(E.SECAGG_ADVERTISED, {"run_id": _safe_id(run_id), "round": round_})
        _save(context, session)
        return _reply(msg, site, {K.ADVERT: adverts_to_bytes({site.name: advert})})
    session = _load(context)
    if (run_id, round_) != (session.run_id, session.round):
        raise VerificationError("the request names another run or round than this site's secure-aggregation round",
                                "wrong-round")
    if stage == "reveal":
        params = params_from_text(_str(conf, K.SECAGG_PARAMS))
        floors = site.secagg.floors()
        audit = SiteAudit(site)
        abandoned = _abandoned_reveals(audit)
        if abandoned >= floors.max_abandoned_reveals:
            raise VerificationError(f"{abandoned} of this site's last {REVEAL_WINDOW} graph-nonce reveals (any run) "
                                    f"were never followed by its masked input (the site allows "
                                    f"{floors.max_abandoned_reveals}): no more reveals until completed rounds dilute "
                                    "them", "too-many-abandoned")
        nonce = session.reveal(params, adverts_from_bytes(_bytes(conf, K.SECAGG_ADVERTS)),
                               load_roster(roster_path(site)), floors)
        audit.log.append(E.SECAGG_REVEALED, {"run_id": run_id, "round": round_})
        _save(context, session)
        return _reply(msg, site, {K.NONCE: nonce})
    if stage == "share":
        params = params_from_text(_str(conf, K.SECAGG_PARAMS))
        nonces = boxes_from_bytes(_bytes(conf, K.SECAGG_NONCES)) if K.SECAGG_NONCES in conf else {}
        outbox = session.share_keys(params, adverts_from_bytes(_bytes(conf, K.SECAGG_ADVERTS)),
                                    load_roster(roster_path(site)), site.secagg.floors(), nonces)
        _save(context, session)
        return _reply(msg, site, {K.OUTBOX: boxes_to_bytes(outbox)})
    if stage == "input":
        inbox, sharers = boxes_from_bytes(_bytes(conf, K.SECAGG_INBOX)), _strs(conf, K.SECAGG_SHARERS)
        if _training_digest(msg, conf) != session.params.request:  # before training: refused at no privacy cost
            raise VerificationError("the training request or global model differs from the one this round's view "
                                    "fixed at the share stage (a per-site request could zero the other updates)",
                                    "request-mismatch")
        session.check_inbox(inbox, sharers)  # before training: a withheld inbox is refused at no privacy cost
        context.state[MASKING] = ConfigRecord({"run": run_id, "round": round_})  # what the train handler trusts
        try:
            reply = call_next(msg, context)
        finally:
            del context.state[MASKING]
        if reply.has_error() or K.ARRAYS not in reply.content.array_records:
            return reply  # a refusal: the site drops out of this round; its masks are recovered
        update = record_to_arrays(reply.content.array_records[K.ARRAYS])
        flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in update.values()])
        weight = _int(reply.content.metric_records[K.METRICS], K.NUM_EXAMPLES)
        masked = session.masked_input(flat, weight, inbox, sharers)
        _save(context, session)
        if session.revealed_for:  # a sparse round that reached its input: not an abandoned reveal
            SiteAudit(site).log.append(E.SECAGG_MASKED, {"run_id": run_id, "round": round_})
        count, largest = session.clipped
        if count:
            log.warning("site %s: %d update value(s) exceeded the round's clipping range (largest %.3g) and were "
                        "clipped before masking", site.name, count, largest)
            SiteAudit(site).log.append(E.SECAGG_CLIPPED, {"run_id": session.run_id, "round": session.round,
                                                          "count": count, "max_abs": largest})
        content = RecordDict({K.METRICS: reply.content.metric_records[K.METRICS], K.SITE: reply.content.config_records[K.SITE],
                              K.MASKED: ArrayRecord({K.MASKED: Array(masked)})})
        return Message(content, reply_to=msg)
    if stage == "consistency":
        signature = session.consistency(_strs(conf, K.SECAGG_SURVIVORS), load_private_key(site_key_path(site)))
        _save(context, session)
        return _reply(msg, site, {K.CONSISTENCY: signature})
    if stage == "unmask":
        reveals = session.unmask(boxes_from_bytes(_bytes(conf, K.SECAGG_SIGNATURES)), load_roster(roster_path(site)))
        _save(context, session)
        return _reply(msg, site, {K.REVEALS: reveals_to_bytes(reveals)})
    raise VerificationError("unknown secure-aggregation stage", "malformed")


def _training_digest(msg: Message, conf: ConfigRecord) -> str:
    """``RoundRequest.digest`` of the request and global model this input stage would train; ""
    when the config holds no valid request (the train handler then refuses it: nothing trains)."""
    try:
        request = RoundRequest.from_record(conf)
    except RoundRequestError:
        return ""
    arrays = msg.content.array_records.get(K.ARRAYS)
    return request.digest(arrays_sha256(record_to_arrays(arrays)) if arrays is not None else "")


def _abandoned_reveals(audit: SiteAudit) -> int:
    """Of this site's last :data:`REVEAL_WINDOW` graph-nonce reveals (any run: run ids are the
    server's choice), those never followed by its masked input: each is one more random graph
    for a server that abandons the rounds whose draw it dislikes, at no cost (no training)."""
    if not audit.log.path.exists():
        return 0
    reveals: list[tuple[object, object]] = []
    masked = set()
    for e in read_entries(audit.log.path):
        if e.event == E.SECAGG_REVEALED:
            reveals.append((e.data.get("run_id"), e.data.get("round")))
        elif e.event == E.SECAGG_MASKED:
            masked.add((e.data.get("run_id"), e.data.get("round")))
    return sum(1 for key in reveals[-REVEAL_WINDOW:] if key not in masked)


def _save(context: Context, session: SiteSession) -> None:
    context.state[STATE] = ConfigRecord({"session": session_to_bytes(session)})


def _load(context: Context) -> SiteSession:
    if STATE not in context.state.config_records:
        raise VerificationError("protocol stage out of order: no key advertisement for this round", "out-of-order")
    return session_from_bytes(_bytes(context.state.config_records[STATE], "session"))


def _reply(msg: Message, site: SiteConfig, secagg: dict[str, bytes]) -> Message:
    record = ConfigRecord()
    for k, v in secagg.items():
        record[k] = v
    return Message(RecordDict({K.SECAGG: record, K.SITE: ConfigRecord({K.SITE_NAME: site.name})}), reply_to=msg)


def _safe_id(value: object) -> str:
    """A run id for the audit log (the server's value only when it is identifier-like)."""
    text = str(value) if value is not None else ""
    return text if _ID.match(text) else "malformed"


def _safe_stage(stage: str) -> str:
    return stage if stage in K.STAGES else "unknown"


def _round(conf: ConfigRecord) -> int:
    try:
        return max(0, min(_int(conf, K.SERVER_ROUND), 1_000_000))
    except ValueError:
        return 0


def _value(record: Mapping[str, object], key: str, kind: Any) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WireFormatError(f"{key} has the wrong type")
    return value


def _str(record: Mapping[str, object], key: str) -> str:
    return str(_value(record, key, str))


def _int(record: Mapping[str, object], key: str) -> int:
    return int(_value(record, key, int | float))


def _bytes(record: Mapping[str, object], key: str) -> bytes:
    return bytes(_value(record, key, bytes))


def _strs(record: Mapping[str, object], key: str) -> list[str]:
    values = _value(record, key, list)
    if not all(isinstance(v, str) for v in values):
        raise WireFormatError(f"{key} must be a list of site names")
    return list(values)
