"""Messages between the server and the sites: send each node its content, collect the
usable replies (numbers, arrays, protocol bytes), log errors and timeouts."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from privacy import egress as K
from privacy.errors import ServiceError
from privacy.model_arrays import record_to_arrays
from server.stop import StopRequest

log = logging.getLogger("medfed.server")


class NotEnoughSitesError(ServiceError, RuntimeError):
    """Fewer sites connected than the run's ``min-sites`` within the timeout."""


@dataclass
class Reply:
    """One site's usable reply (numbers and arrays only)."""

    node_id: int
    site: str
    metrics: dict[str, float]
    arrays: OrderedDict[str, np.ndarray] | None = None
    audit_head: str | None = None
    secagg: dict[str, bytes] = field(default_factory=dict)  # protocol bytes of a secure-aggregation stage
    masked: np.ndarray | None = None  # a masked update (secure aggregation input stage)


@dataclass
class RoundOutcome:
    replies: list[Reply] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


PULL_INTERVAL = 0.2  # at most this many seconds between polls of the replies (and of a stop request)
FIRST_PULL = 0.01  # the first pause; it doubles up to PULL_INTERVAL


def wait_for_sites(grid: Grid, min_sites: int, timeout: float, stop: StopRequest | None = None) -> list[int]:
    """Node ids once at least ``min_sites`` are connected (bounded wait; a stop request ends it)."""
    deadline = time.monotonic() + timeout
    while True:
        if stop is not None:
            stop.check()
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() > deadline:
            raise NotEnoughSitesError(
                f"only {len(nodes)} site(s) connected after {timeout:.0f}s, the run needs "
                f"{min_sites}: start more sites or lower min-sites"
            )
        time.sleep(1.0)


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, stop: StopRequest | None) -> list[Message]:
    """The replies within ``timeout`` (Grid's public push and pull); a stop request ends the wait
    within ``PULL_INTERVAL`` (raises :class:`server.stop.RunStopped`)."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    pause = FIRST_PULL
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        if stop is not None:
            stop.check()
        time.sleep(pause)
        pause = min(PULL_INTERVAL, 2 * pause)  # quick replies are collected quickly, slow ones polled at 5 Hz
    return replies


def exchange(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, timeout: float,
             with_arrays: bool, stop: StopRequest | None = None) -> RoundOutcome:
    """Send each node its content; collect usable replies, log errors and timeouts."""
    messages = [Message(content=c, dst_node_id=n, message_type=message_type) for n, c in contents.items()]
    sent = {m.metadata.dst_node_id for m in messages}
    outcome = RoundOutcome()
    answered = set()
    for reply in _send_and_receive(grid, messages, timeout, stop):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            log.warning("node %s replied with an error: %s", node, reply.error.reason)
            outcome.failed.append(str(node))
            continue
        content_ = reply.content
        identity = content_.config_records.get(K.SITE)
        site = str(identity[K.SITE_NAME]) if identity is not None else str(node)
        head = str(identity[K.AUDIT_HEAD]) if identity is not None and K.AUDIT_HEAD in identity else None
        record = content_.metric_records.get(K.METRICS)
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, int | float)} if record is not None else {}
        has_arrays = with_arrays and K.ARRAYS in content_.array_records
        arrays = record_to_arrays(content_.array_records[K.ARRAYS]) if has_arrays else None
        masked = None
        if with_arrays and K.MASKED in content_.array_records:
            masked = content_.array_records[K.MASKED][K.MASKED].numpy()
        secagg = {k: v for k, v in content_.config_records[K.SECAGG].items() if isinstance(v, bytes)} \
            if K.SECAGG in content_.config_records else {}
        outcome.replies.append(Reply(node_id=node, site=site, metrics=metrics, arrays=arrays, audit_head=head,
                                     secagg=secagg, masked=masked))
    for node in sorted(sent - answered):
        log.warning("node %s did not reply within %.0fs", node, timeout)
        outcome.failed.append(str(node))
    return outcome
