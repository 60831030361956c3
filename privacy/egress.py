"""Every key that crosses the wire between server and site, defined once, and the egress
guard's check of a site's reply against them (:func:`check_reply`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from typing import Any

import numpy as np

# Record names inside a Message's RecordDict
ARRAYS = "arrays"  # server -> site: global model; site -> server: update (delta)
CONFIG = "config"  # server -> site: round configuration
METRICS = "metrics"  # site -> server: whitelisted numeric metrics
SITE = "site"  # site -> server: the site's public name and audit-log head (no patient data)
SECAGG = "secagg"  # both ways: secure-aggregation protocol messages (keys, sealed shares)
MASKED = "masked"  # site -> server: the masked update (one uint64 array named MASKED)

# Round configuration keys (server -> site)
SERVER_ROUND = "server-round"
RUN_ID = "run-id"
NUM_ROUNDS = "num-rounds"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
IMAGE_SIZE = "image-size"
DP_ENABLED = "dp"
NOISE_MULTIPLIER_REQUEST = "noise-multiplier"  # the server's minimum; a site may use more
SERVER_HEAD = "server-audit-head"  # the server's audit-log head when it sent the request (64 hex); sites log it

# Metric keys (site -> server); only these numeric values may leave a site
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_LOSS = "val-loss"
VAL_AUROC = "val-auroc"
SITE_NAME = "name"
AUDIT_HEAD = "audit-head"  # in the SITE record: hash of the site's last audit entry (64 hex)
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
NOISE_OVERRIDDEN = "noise-overridden"  # 1 when the site's policy needed more noise than requested
PATIENTS = "patients"
REFUSED = "refused"  # 1 in a refusal reply (no arrays)
REFUSAL_CODE = "refusal-code"  # numeric reason; see client.budget

# Error codes of a site's error reply (the reason is this fixed text; the detail stays in the site's log)
SITE_ERRORS = {
    460: "site configuration invalid",
    461: "site privacy ledger refused",
    462: "round request malformed or out of range",
    463: "site data unusable",
    469: "internal error at the site",
}

TRAIN_METRICS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, EPSILON, DELTA, NOISE_MULTIPLIER,
                           NOISE_OVERRIDDEN, PATIENTS})
REFUSAL_METRICS = frozenset({REFUSED, REFUSAL_CODE, EPSILON, DELTA, PATIENTS})
EVAL_METRICS = frozenset({NUM_EXAMPLES, VAL_LOSS, VAL_AUROC, EPSILON})  # ε: after a metered evaluation

# Secure aggregation (in CONFIG server -> site, in SECAGG site -> server)
SECAGG_STAGE = "secagg-stage"  # advertise | share | input | consistency | unmask
SECAGG_PARAMS = "secagg-params"  # JSON: run, round, sites, k, threshold, bounds
SECAGG_ADVERTS = "secagg-adverts"
SECAGG_INBOX = "secagg-inbox"
SECAGG_ROSTER = "secagg-roster"  # the enrolled sites' identity keys; each site pins it at first use
SECAGG_SHARERS = "secagg-sharers"  # U2: the sites whose shares were routed (input stage)
SECAGG_SURVIVORS = "secagg-survivors"  # U3: the sites whose masked input arrived (consistency stage)
SECAGG_SIGNATURES = "secagg-signatures"  # the survivors' signatures on U3 (unmask stage)
ADVERT = "advert"
OUTBOX = "outbox"
CONSISTENCY = "consistency"  # a site's signature on the survivor set
REVEALS = "reveals"
STAGES = ("advertise", "share", "input", "consistency", "unmask")

ALL_METRICS = TRAIN_METRICS | REFUSAL_METRICS | EVAL_METRICS
SITE_KEYS = frozenset({SITE_NAME, AUDIT_HEAD})
SECAGG_REPLY_KEYS = frozenset({ADVERT, OUTBOX, CONSISTENCY, REVEALS})
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
FINGERPRINT_HEX = 32


def fingerprint(key: bytes, value: str) -> str:
    """Keyed fingerprint of an identifying value (HMAC-SHA256 of the normalised text, hex,
    truncated): what a site keeps of its header values, and what outgoing values are compared by."""
    return hmac.new(key, value.strip().upper().encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]


def _identifying(value: Any, prints: frozenset[str], key: bytes | None) -> bool:
    if key is None or not prints:
        return False
    texts = {str(value)}
    if isinstance(value, float) and value.is_integer():
        texts.add(str(int(value)))
    return any(fingerprint(key, t) in prints for t in texts)


def check_reply(content: Any, prints: frozenset[str] = frozenset(), key: bytes | None = None) -> list[str]:
    """What in a reply's ``RecordDict`` may not leave the site (empty list: all declared).

    Allowed: the ``METRICS`` record with whitelisted, finite numbers; the ``SITE`` record
    with the site name and a 64-hex audit head; the ``SECAGG`` record with protocol bytes;
    the ``ARRAYS`` record of finite float arrays or the ``MASKED`` record of one uint64 array.
    Values equal to an identifying header value (by keyed fingerprint) are refused. The
    descriptions name keys, never values.
    """
    problems: list[str] = []
    for name, record in content.metric_records.items():
        if name != METRICS:
            problems.append(f"undeclared metric record {_name(name)}")
            continue
        for k, v in record.items():
            if k not in ALL_METRICS:
                problems.append(f"undeclared metric {_name(k)}")
            elif not isinstance(v, int | float) or isinstance(v, bool):
                problems.append(f"metric {k} is not a number")
            elif not math.isfinite(float(v)):
                problems.append(f"metric {k} is not finite")
            elif _identifying(v, prints, key):
                problems.append(f"metric {k} equals an identifying header value")
    for name, record in content.config_records.items():
        allowed = {SITE: SITE_KEYS, SECAGG: SECAGG_REPLY_KEYS}.get(name)
        if allowed is None:
            problems.append(f"undeclared config record {_name(name)}")
            continue
        for k, v in record.items():
            if k not in allowed:
                problems.append(f"undeclared key {_name(k)} in {name}")
            elif name == SECAGG and not isinstance(v, bytes):
                problems.append(f"{name}.{k} must be protocol bytes")
            elif name == SITE and not (isinstance(v, str) and (_HEX64.match(v) if k == AUDIT_HEAD
                                                                   else _IDENTIFIER.match(v))):
                problems.append(f"{name}.{k} is not an identifier")
            elif name == SITE and _identifying(v, prints, key):
                problems.append(f"{name}.{k} equals an identifying header value")
    for name, record in content.array_records.items():
        if name not in (ARRAYS, MASKED):
            problems.append(f"undeclared array record {_name(name)}")
            continue
        for k, arr in record.items():
            a = arr.numpy()
            if name == MASKED and (k != MASKED or a.dtype.kind != "u"):
                problems.append(f"{name} must hold one unsigned array named {MASKED}")
            elif name == ARRAYS and (a.dtype.kind != "f" or not bool(np.isfinite(a).all())):
                problems.append(f"array {_name(k)} is not finite floating point")
    return problems


def _name(name: str) -> str:
    """A key name fit for a log line (an undeclared key could itself carry a value)."""
    return repr(name) if _IDENTIFIER.match(str(name)) else "(a non-identifier key)"
