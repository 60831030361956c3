"""The server's round loop: select sites, train, aggregate, checkpoint, evaluate, record."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from privacy import egress as K
from privacy.model_arrays import arrays_sha256, arrays_to_record
from privacy.protocol import RoundRequest, parse_findings
from server.aggregate import apply_update
from server.audit_trail import ServerAudit
from server.config import RunConfig
from server.messaging import Reply, RoundOutcome, exchange, wait_for_sites
from server.resume import ResumePoint
from server.robust import aggregate, clip_to_norm, l2_norm
from server.rundir import RunDir
from server.secagg_driver import SecureRound, secure_train
from server.stop import RunStopped, StopRequest

log = logging.getLogger("medfed.server")

RoundCallback = Callable[[dict[str, Any]], None]


def _weighted(replies: list[Reply], key: str) -> float:
    pairs = [(r.metrics[key], r.metrics.get(K.NUM_EXAMPLES, 1.0)) for r in replies if key in r.metrics]
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total > 0 else math.nan


def round_config(cfg: RunConfig, run_id: str, round_: int, server_head: str = "") -> ConfigRecord:
    """What every site is told for this round, with the head of the server's audit log (which
    every site records: its counter-signature of the server's log up to there)."""
    record = RoundRequest(
        server_round=round_, run_id=run_id, num_rounds=cfg.num_server_rounds, local_steps=cfg.local_steps,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, image_size=cfg.image_size,
        dp=cfg.dp, noise_multiplier=cfg.noise_multiplier, model=cfg.model, findings=cfg.findings,
        window=cfg.window, optimizer=cfg.optimizer,
    ).to_record()
    if server_head:
        record[K.SERVER_HEAD] = server_head
    return record


def run_federation(
    grid: Grid, cfg: RunConfig, initial: OrderedDict[str, np.ndarray], *, run_id: str,
    on_round: RoundCallback | None = None, init_weights_sha256: str = "", stop: StopRequest | None = None,
    resume: ResumePoint | None = None,
) -> dict[str, Any]:
    """Run ``cfg.num_server_rounds`` rounds; write the run directory; return metrics.

    ``resume``: continue a stopped or crashed run (``server.resume``) at its next round, in the
    same log. ``stop``: polled between and during rounds; when set, the round in progress is
    abandoned, the model after the last applied round is written as model-final.npz, the log
    records ``run-stopped`` and the run can be resumed.
    """
    rundir = RunDir(Path(cfg.run_dir))
    audit = ServerAudit(cfg, run_id)
    if resume is None:
        audit.run_start(cfg, initial, init_weights_sha256=init_weights_sha256)
        metrics: dict[str, Any] = {"run_id": run_id, "config": cfg.to_dict(), "rounds": []}  # checked against the log
        arrays, last_round, first = initial, 0, 1
    else:
        metrics, arrays, last_round, first = resume.metrics, resume.arrays, resume.last_round, resume.next_round
        audit.run_resumed(first, arrays, resume.abandoned)
        metrics.setdefault("resumed", []).append({"next_round": first, "abandoned": resume.abandoned})
        metrics.pop("stopped", None)
        log.warning("resuming run %s at round %d from the model after round %d%s", run_id, first, last_round,
                    f" (round {resume.abandoned} was cut short: abandoned)" if resume.abandoned else "")
    ended_early: int | None = None
    roster = Path(cfg.roster_file).read_bytes() if cfg.roster_file else b""
    names: dict[int, str] = {}  # node id -> site, from the replies so far: a failed node is logged by name
    rnd = first - 1
    try:
        for rnd in range(first, cfg.num_server_rounds + 1):
            if stop is not None:
                stop.check()
            arrays, applied, row, all_refused = _one_round(grid, cfg, arrays, audit, rundir, run_id=run_id, rnd=rnd,
                                              roster=roster, stop=stop, names=names)
            last_round = rnd if applied else last_round
            metrics["rounds"].append(row)
            metrics["audit"] = audit.summary()
            rundir.write_metrics(_jsonable(metrics))  # the row before its round-end: a row may lack one, never
            audit.round_end(rnd, row)  # the reverse (--resume drops a row the log did not end)
            metrics["audit"] = audit.summary()
            rundir.write_metrics(_jsonable(metrics))
            log.info("round %d: sites=%s refused=%s train_loss=%.4f val_auroc=%.4f (%.1fs)", rnd,
                     row["sites"], row["refused"], row["train_loss"], row["val_auroc"], row["seconds"])
            if on_round is not None:
                on_round(row)
            if all_refused:
                log.warning("every site refused round %d: ending the run (no budget left anywhere)", rnd)
                metrics["ended_early"] = f"all sites refused round {rnd}"
                ended_early = rnd
                break
    except RunStopped as exc:
        ended = {r["round"] for r in metrics["rounds"]}
        abandoned = rnd if rnd >= first and rnd not in ended else None
        log.warning("%s: the run stops after round %d%s; continue it with --resume %s", exc, last_round,
                    f" (round {abandoned} abandoned)" if abandoned else "", cfg.run_dir)
        rundir.final(last_round, arrays)
        audit.run_stopped(stop.reason if stop is not None else "request", last_round, arrays, abandoned)
        metrics["stopped"] = {"reason": stop.reason if stop is not None else "request", "after_round": last_round,
                              "abandoned": abandoned}
        metrics["final_model_sha256"] = arrays_sha256(arrays)
        metrics["audit"] = audit.summary()
        rundir.write_metrics(_jsonable(metrics))
        return metrics
    rundir.final(last_round, arrays)
    metrics["final_model_sha256"] = arrays_sha256(arrays)
    audit.run_end(last_round, arrays, ended_early)
    metrics["audit"] = audit.summary()
    rundir.write_metrics(_jsonable(metrics))
    return metrics


def _one_round(grid: Grid, cfg: RunConfig, arrays: OrderedDict[str, np.ndarray], audit: ServerAudit, rundir: RunDir,
               *, run_id: str, rnd: int, roster: bytes, stop: StopRequest | None, names: dict[int, str]
               ) -> tuple[OrderedDict[str, np.ndarray], bool, dict[str, Any], bool]:
    """One round: (the global model after it, whether an update was applied, its metrics row,
    whether every site refused it). ``names``: node id -> site as learnt from replies (updated)."""
    started = time.monotonic()
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.round_timeout, stop)
    audit.round_start(rnd, arrays, nodes)
    conf = round_config(cfg, run_id, rnd, audit.log.head())
    train, updates, secure = _train_round(grid, cfg, nodes, arrays, conf, run_id=run_id, rnd=rnd, roster=roster,
                                          stop=stop)
    refused = sorted(r.site for r in train.replies if r.metrics.get(K.REFUSED))
    names.update({r.node_id: r.site for r in train.replies} | (secure.names if secure is not None else {}))
    train.failed = sorted(names.get(int(n), f"node-{n}") for n in train.failed)  # never-named nodes: node-ID
    _audit_replies(audit, rnd, train)
    if secure is not None:
        audit.secure_aggregation(rnd, secure.info)
    row: dict[str, Any] = {
        "round": rnd, "sites": sorted(r.site for r in updates), "refused": refused,
        "failed": train.failed,
        "epsilon": {r.site: r.metrics[K.EPSILON] for r in train.replies if K.EPSILON in r.metrics},
        "noise_multiplier": {r.site: r.metrics[K.NOISE_MULTIPLIER] for r in updates
                             if K.NOISE_MULTIPLIER in r.metrics},
    }
    for site in refused:
        log.warning("round %d: site %s refused to train (privacy budget exhausted)", rnd, site)
    if secure is not None:
        row["secagg"] = secure.info
    update = _round_update(cfg, updates, secure, row, audit, rnd) if updates else None
    applied = update is not None
    if update is not None:
        arrays = apply_update(arrays, update)
        path = rundir.checkpoint(rnd, arrays)  # the file before the log says so: --resume loads what it signed
        audit.aggregate(rnd, sorted(r.site for r in updates), arrays)
        audit.checkpoint(rnd, path.name, arrays)
    elif not updates:
        log.warning("round %d: no site returned an update; the global model is unchanged", rnd)
    row["model_sha256"] = arrays_sha256(arrays)
    row["train_loss"] = _weighted(train.replies, K.TRAIN_LOSS)
    conf = round_config(cfg, run_id, rnd, audit.log.head())  # the sites counter-sign the round so far
    names.update(_evaluate_round(grid, cfg, nodes, arrays, conf, audit, rnd, row, stop))
    row["seconds"] = round(time.monotonic() - started, 3)
    row = _jsonable(row)
    all_refused = bool(not updates and refused and len(refused) == len(train.replies) and not train.failed)
    return arrays, applied, row, all_refused


def _round_update(cfg: RunConfig, updates: list[Reply], secure: SecureRound | None, row: dict[str, Any],
                  audit: ServerAudit, rnd: int) -> OrderedDict[str, np.ndarray] | None:
    """The round's aggregated update, or None when the round is rejected (``server.robust``): in the
    clear each update is clipped to ``update_norm_bound`` and aggregated by ``cfg.aggregator``; a
    secure aggregate above the bound is rejected (honest sites' mean cannot exceed it)."""
    bound = cfg.update_norm_bound
    if secure is not None and secure.update is not None:
        norm = l2_norm(secure.update)
        row["update_norm"] = norm
        if bound > 0 and norm > bound:
            log.warning("round %d: the secure aggregate's norm %.4g exceeds update-norm-bound %.4g: round rejected, "
                        "the global model is unchanged", rnd, norm, bound)
            row["rejected"] = f"aggregate norm {norm:.6g} above the bound {bound:g}"
            row["rejected_sites"], row["sites"] = row["sites"], []  # "sites": whose update was applied
            audit.aggregate_rejected(rnd, norm, bound)
            return None
        return secure.update
    clipped, norms = [], {}
    for r in updates:
        if r.arrays is None:
            continue
        arrays, norms[r.site] = clip_to_norm(r.arrays, bound)
        clipped.append(arrays)
    row["update_norms"] = norms
    if bound > 0:
        row["clipped"] = sorted(site for site, n in norms.items() if n > bound)
    return aggregate(clipped, [r.metrics[K.NUM_EXAMPLES] for r in updates if r.arrays is not None], cfg.aggregator)


def _train_round(grid: Grid, cfg: RunConfig, nodes: list[int], arrays: OrderedDict[str, np.ndarray],
                 conf: ConfigRecord, *, run_id: str, rnd: int, roster: bytes, stop: StopRequest | None = None
                 ) -> tuple[RoundOutcome, list[Reply], SecureRound | None]:
    """One round of training: the replies, the ones whose update counts, and the secure round (if any)."""
    if cfg.secure_aggregation:
        secure = secure_train(grid, nodes, arrays, conf, run_id=run_id, round_=rnd, timeout=cfg.round_timeout,
                              k=cfg.secagg_k, threshold=cfg.secagg_threshold, colluders=cfg.secagg_colluders,
                              roster=roster, stop=stop)
        train = RoundOutcome(replies=secure.replies, failed=secure.failed)
        return train, [r for r in train.replies if r.masked is not None] if secure.update is not None else [], secure
    train = exchange(grid, dict.fromkeys(nodes, RecordDict({K.ARRAYS: arrays_to_record(arrays), K.CONFIG: conf})),
                     MessageType.TRAIN, cfg.round_timeout, with_arrays=True, stop=stop)
    return train, [r for r in train.replies if r.arrays is not None], None


def _evaluate_round(grid: Grid, cfg: RunConfig, nodes: list[int], arrays: OrderedDict[str, np.ndarray],
                    conf: ConfigRecord, audit: ServerAudit, rnd: int, row: dict[str, Any],
                    stop: StopRequest | None = None) -> dict[int, str]:
    """Validation metrics of the new model, into ``row``; each reply into the audit log. Returns
    node id -> site of the replies."""
    evaluation = exchange(grid, dict.fromkeys(nodes, RecordDict({K.ARRAYS: arrays_to_record(arrays), K.CONFIG: conf})),
                          MessageType.EVALUATE, cfg.round_timeout, with_arrays=False, stop=stop)
    row["val_loss"] = _weighted(evaluation.replies, K.VAL_LOSS)
    row["val_auroc"] = _weighted(evaluation.replies, K.VAL_AUROC)
    row["val_auroc_by_site"] = {r.site: r.metrics[K.VAL_AUROC] for r in evaluation.replies if K.VAL_AUROC in r.metrics}
    names = parse_findings(cfg.findings)
    if names:  # multi-label: each finding's AUROC (weighted over the sites); val_auroc is their macro mean per site
        row["val_auroc_findings"] = {name: _weighted(evaluation.replies, K.FINDING_AUROC[j])
                                     for j, name in enumerate(names)}
    for r in evaluation.replies:  # a metered evaluation is charged: the site's ε after it
        if K.EPSILON in r.metrics:
            row["epsilon"][r.site] = r.metrics[K.EPSILON]
        audit.reply(rnd, r.site, "evaluation-refused" if r.metrics.get(K.REFUSED) else "evaluated",
                    site_head=r.audit_head, epsilon=r.metrics.get(K.EPSILON))
    return {r.node_id: r.site for r in evaluation.replies}


def _audit_replies(audit: ServerAudit, rnd: int, outcome: RoundOutcome) -> None:
    for r in outcome.replies:
        trained = r.arrays is not None or r.masked is not None
        status = "refused" if r.metrics.get(K.REFUSED) else ("trained" if trained else "error")
        audit.reply(rnd, r.site, status, site_head=r.audit_head, epsilon=r.metrics.get(K.EPSILON))
    for node in outcome.failed:
        audit.reply(rnd, node, "failed")


def _jsonable(obj: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
