"""The server's SecAgg+ driver: the protocol's stages as Message exchanges on the ``Grid``.

advertise -> reveal (sparse graphs only) -> share -> input (sites train here) -> consistency ->
unmask; each with the round timeout. Sites that do not answer a stage are dropped; the round completes while every
needed secret stays reconstructable, and is abandoned cleanly otherwise (no update applied).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from privacy import egress as K
from privacy.model_arrays import arrays_sha256, arrays_to_record
from privacy.protocol import RoundRequest
from privacy.secagg.params import SecAggConfigError, SecAggParams
from privacy.secagg.server import Aggregator, RoundAborted
from privacy.secagg.wire import (
    adverts_from_bytes,
    adverts_to_bytes,
    boxes_from_bytes,
    boxes_to_bytes,
    params_to_json,
    reveals_from_bytes,
)
from server.messaging import Reply, exchange
from server.stop import StopRequest

log = logging.getLogger("medfed.server")


@dataclass
class SecureRound:
    """What one secure round produced: the input-stage replies (metrics, refusals), the mean
    update (``None`` when aborted or nobody trained) and the protocol outcome."""

    replies: list[Reply] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # nodes that left before their input (no train reply)
    names: dict[int, str] = field(default_factory=dict)  # node id -> site, from the advertisements
    update: OrderedDict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _stage_conf(conf: ConfigRecord, stage: str, **extra: Any) -> ConfigRecord:
    out = ConfigRecord(dict(conf))
    out[K.SECAGG_STAGE] = stage
    for k, v in extra.items():
        out[k] = v
    return out


def secure_train(grid: Grid, nodes: list[int], arrays: Mapping[str, np.ndarray], conf: ConfigRecord, *,
                 run_id: str, round_: int, timeout: float, k: int = 0, threshold: int = 0, colluders: int = 0,
                 roster: bytes = b"", stop: StopRequest | None = None) -> SecureRound:
    """Run one training round under SecAgg+; the server learns only the weighted mean update."""
    result = SecureRound(info={"sites": 0, "dropped": 0, "aborted": False})
    clock = _Clock()
    dropped: dict[str, list[str]] = {}  # stage -> the nodes that did not answer it
    try:
        names = [f"node-{n}" for n in nodes]  # provisional: the real names come with the advertisements
        request = RoundRequest.from_record(conf).digest(arrays_sha256(arrays))  # what every site trains
        agg = Aggregator(SecAggParams.for_sites(run_id, round_, names, k=k, threshold=threshold, colluders=colluders,
                                                request=request))
        advertise = _stage_conf(conf, "advertise", **({K.SECAGG_ROSTER: roster} if roster else {}))
        adv = exchange(grid, {n: RecordDict({K.CONFIG: advertise}) for n in nodes}, MessageType.TRAIN, timeout,
                       with_arrays=False, stop=stop)
        result.failed += adv.failed
        dropped["advertise"] = adv.failed
        clock.mark("advertise")
        node_of = {r.site: r.node_id for r in adv.replies if K.ADVERT in r.secagg}
        result.names = {n: s for s, n in node_of.items()}
        adverts: dict[str, Any] = {}
        for r in adv.replies:
            adverts |= adverts_from_bytes(r.secagg.get(K.ADVERT, b"{}"))
        params, relay = agg.collect_adverts({s: a for s, a in adverts.items() if s in node_of})
        agg.params = params = round_params(run_id, round_, relay, k=k, threshold=threshold, colluders=colluders,
                                           request=request)
        nonces: dict[str, bytes] = {}
        if not params.complete:  # the graph's seed: every advertised site's nonce, revealed for this set
            reveal_conf = _stage_conf(conf, "reveal", **{K.SECAGG_PARAMS: json.dumps(params_to_json(params)),
                                                         K.SECAGG_ADVERTS: adverts_to_bytes(relay)})
            revealed_nonces = exchange(grid, {node_of[s]: RecordDict({K.CONFIG: reveal_conf}) for s in params.sites},
                                       MessageType.TRAIN, timeout, with_arrays=False, stop=stop)
            result.failed += revealed_nonces.failed
            dropped["reveal"] = revealed_nonces.failed
            clock.mark("reveal")
            nonces = {r.site: r.secagg[K.NONCE] for r in revealed_nonces.replies if K.NONCE in r.secagg}
            params = agg.collect_nonces(nonces)
        share_conf = _stage_conf(conf, "share", **{K.SECAGG_PARAMS: json.dumps(params_to_json(params)),
                                                   K.SECAGG_ADVERTS: adverts_to_bytes(relay),
                                                   **({K.SECAGG_NONCES: boxes_to_bytes(nonces)} if nonces else {})})
        shared = exchange(grid, {node_of[s]: RecordDict({K.CONFIG: share_conf}) for s in params.sites},
                          MessageType.TRAIN, timeout, with_arrays=False, stop=stop)
        result.failed += shared.failed
        dropped["share"] = shared.failed
        clock.mark("share")
        inboxes, sharers = agg.route_shares({r.site: boxes_from_bytes(r.secagg[K.OUTBOX]) for r in shared.replies
                                             if K.OUTBOX in r.secagg})
        global_record = arrays_to_record(arrays)
        contents = {node_of[s]: RecordDict({K.ARRAYS: global_record, K.CONFIG: _stage_conf(
            conf, "input", **{K.SECAGG_INBOX: boxes_to_bytes(inboxes[s]), K.SECAGG_SHARERS: sharers})})
            for s in sorted(inboxes)}
        trained = exchange(grid, contents, MessageType.TRAIN, timeout, with_arrays=True, stop=stop)
        result.failed += trained.failed
        dropped["input"] = trained.failed
        clock.mark("input")
        result.replies = trained.replies
        masked = {r.site: r.masked for r in trained.replies if r.masked is not None}
        if not masked:
            result.info["sites"] = 0
            return result
        survivors = agg.collect_inputs(masked)
        check_conf = _stage_conf(conf, "consistency", **{K.SECAGG_SURVIVORS: survivors})
        checked = exchange(grid, {node_of[s]: RecordDict({K.CONFIG: check_conf}) for s in survivors},
                           MessageType.TRAIN, timeout, with_arrays=False, stop=stop)
        dropped["consistency"] = checked.failed  # these sent their input: their train reply stands
        clock.mark("consistency")
        signatures = agg.collect_signatures({r.site: r.secagg[K.CONSISTENCY] for r in checked.replies
                                             if K.CONSISTENCY in r.secagg})
        unmask_conf = _stage_conf(conf, "unmask", **{K.SECAGG_SIGNATURES: boxes_to_bytes(signatures)})
        revealed = exchange(grid, {node_of[s]: RecordDict({K.CONFIG: unmask_conf}) for s in sorted(signatures)},
                            MessageType.TRAIN, timeout, with_arrays=False, stop=stop)
        dropped["unmask"] = revealed.failed
        total, weight = agg.finish({r.site: reveals_from_bytes(r.secagg[K.REVEALS]) for r in revealed.replies
                                    if K.REVEALS in r.secagg})
        result.update = _unflatten(total / weight, arrays)
        clock.mark("unmask")
        result.info = {"sites": len(survivors), "dropped": len(nodes) - len(survivors), "aborted": False,
                       "k": params.k, "threshold": params.threshold, "stage_seconds": clock.laps}
    except (RoundAborted, SecAggConfigError) as exc:
        log.warning("round %d: secure aggregation abandoned: %s", round_, exc)
        result.update = None
        result.info = {"sites": 0, "dropped": len(nodes), "aborted": True, "reason": str(exc)}
    result.info["dropped_at"] = {stage: sorted(result.names.get(int(n), f"node-{n}") for n in failed)
                                 for stage, failed in dropped.items() if failed}
    return result


def round_params(run_id: str, round_: int, advertised: Mapping[str, Any], *, k: int = 0,
                 threshold: int = 0, colluders: int = 0, request: str = "") -> SecAggParams:
    """The round's parameters for the sites that advertised (k and threshold sized for them); above
    the complete graph's size the graph's seed comes later, from the sites' revealed nonces
    (``Aggregator.collect_nonces``)."""
    return SecAggParams.for_sites(run_id, round_, list(advertised), k=k, threshold=threshold, colluders=colluders,
                                  request=request)  # type: ignore[arg-type]


class _Clock:
    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.monotonic()
        self.laps[stage] = round(now - self.last, 3)
        self.last = now


def _unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    pos = 0
    for name, ref in like.items():
        size = int(np.prod(ref.shape))
        out[name] = flat[pos : pos + size].reshape(ref.shape).astype(ref.dtype)
        pos += size
    if pos != len(flat):
        raise RoundAborted(f"unmasked vector has {len(flat)} values, the model {pos}")
    return out
