"""Every key, metric and error code that crosses the wire between server and site, defined
once (the closed schema a reply is checked against is ``privacy.reply_schema``).
"""

from __future__ import annotations

import hashlib
import hmac
import re

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
MODEL = "model"  # the network: a built-in name or a factory the site installed and approved
FINDINGS = "findings"  # comma-separated label columns of a multi-label task ("" = one binary 'label')
OPTIMIZER = "optimizer"  # local optimizer: "adam" or "sgd" (momentum 0.9)
WINDOW = "window"  # "center,width": the run's VOI window ("" = each file's own); a site's own window wins
SERVER_HEAD = "server-audit-head"  # the server's audit-log head when it sent the request (64 hex); sites log it

# Metric keys (site -> server); only these numeric values may leave a site
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_LOSS = "val-loss"
VAL_AUROC = "val-auroc"  # binary: the AUROC; multi-label: the macro AUROC over the findings
MAX_FINDINGS = 16
FINDING_AUROC = tuple(f"val-auroc-{i}" for i in range(MAX_FINDINGS))  # per finding, by its position in FINDINGS
SITE_NAME = "name"
AUDIT_HEAD = "audit-head"  # in the SITE record: hash of the site's last audit entry (64 hex)
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
NOISE_OVERRIDDEN = "noise-overridden"  # 1 when the site's policy needed more noise than requested
PATIENTS = "patients"
REFUSED = "refused"  # 1 in a refusal reply (no arrays)
REFUSAL_CODE = "refusal-code"  # numeric reason, one of REFUSAL_CODES

# Refusal codes (the REFUSAL_CODE metric of a refusal reply: numbers, never free text)
REFUSED_BUDGET = 1  # this round would exceed the site's privacy budget
REFUSED_POLICY = 2  # the update would leave unmasked and the site requires secure aggregation
REFUSED_ROUND_CAP = 3  # the site already trained privacy.max_rounds_per_run rounds of this run
REFUSED_METRICS = 4  # the site releases no metrics (policy), or this round was already evaluated or never trained
REFUSED_REPEAT = 5  # this round of this run was already trained (a request is answered once)
REFUSED_MODEL = 6  # the site does not train this network (not allowed in [models], not installed, or not DP-valid)
REFUSAL_CODES = frozenset({REFUSED_BUDGET, REFUSED_POLICY, REFUSED_ROUND_CAP, REFUSED_METRICS, REFUSED_REPEAT,
                           REFUSED_MODEL})

# Error codes of a site's error reply (the reason is this fixed text; the detail stays in the site's log)
CONFIG_INVALID, LEDGER_REFUSED, REQUEST_MALFORMED, DATA_UNUSABLE, FINGERPRINTS_UNAVAILABLE = 460, 461, 462, 463, 464
SITE_ERRORS = {
    CONFIG_INVALID: "site configuration invalid",
    LEDGER_REFUSED: "site privacy ledger refused",
    REQUEST_MALFORMED: "round request malformed or out of range",
    DATA_UNUSABLE: "site data unusable",
    FINGERPRINTS_UNAVAILABLE: "site identifier fingerprints unavailable",
    469: "internal error at the site",
}
EGRESS_BLOCKED = 451  # error code of a reply the egress guard stopped
# fixed text: the problems name the reply's keys, which a malicious server may have chosen to
# be identifying (``undeclared metric 'DOE_JOHN'``); they stay in the site's log
BLOCKED_REASON = "egress guard blocked the reply (the site's log says why)"
SECAGG_REFUSED = 452  # error code of a secure-aggregation round the site refused for a protocol check
# the codes a secure-aggregation refusal names (``privacy.secagg`` and ``client.roster`` checks)
SECAGG_REFUSAL_CODES = frozenset({
    "clip-below-bound", "colluders-below-floor", "equivocation", "ghost-site", "graph-not-complete", "graph-seed",
    "incomplete-inbox", "k-below-floor", "malformed", "not-in-roster", "out-of-order", "params", "re-advertise",
    "request-mismatch", "roster-changed", "roster-mismatch", "roster-not-pinned", "substituted-key", "tampered-share",
    "threshold-below-floor", "too-few-holders", "too-few-neighbours", "too-few-sites", "too-few-survivors", "too-many-abandoned",
    "verification", "wrong-round",
})
SECAGG_REFUSED_REASON = "secure aggregation refused"
INTERNAL_ERROR = 469


def secagg_refusal_text(stage: str, code: str) -> str:
    """The fixed text of a secure-aggregation refusal (stage and code from closed sets)."""
    stage = stage if stage in STAGES else "unknown"
    return f"{SECAGG_REFUSED_REASON} at the {stage} stage ({code})" if code in SECAGG_REFUSAL_CODES else \
        SECAGG_REFUSED_REASON


def error_text(code: int, reason: str = "") -> tuple[int, str]:
    """The code and fixed text an error reply leaves the site with: a known code keeps its
    text (a secure-aggregation refusal its stage and check, when both are from the closed
    sets); any other code becomes 469."""
    if code == SECAGG_REFUSED:
        parsed = _SECAGG_TEXT.match(reason)
        return code, secagg_refusal_text(*parsed.groups()) if parsed else SECAGG_REFUSED_REASON
    if code == EGRESS_BLOCKED:
        return code, BLOCKED_REASON
    if code in SITE_ERRORS:
        return code, SITE_ERRORS[code]
    return INTERNAL_ERROR, SITE_ERRORS[INTERNAL_ERROR]

TRAIN_METRICS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, EPSILON, DELTA, NOISE_MULTIPLIER,
                           NOISE_OVERRIDDEN, PATIENTS})
REFUSAL_METRICS = frozenset({REFUSED, REFUSAL_CODE, EPSILON, DELTA, PATIENTS})
EVAL_METRICS = frozenset({NUM_EXAMPLES, VAL_LOSS, VAL_AUROC, EPSILON, *FINDING_AUROC})  # ε: after a metered evaluation

# Secure aggregation (in CONFIG server -> site, in SECAGG site -> server)
SECAGG_STAGE = "secagg-stage"  # advertise | reveal (sparse graphs) | share | input | consistency | unmask
SECAGG_PARAMS = "secagg-params"  # JSON: run, round, sites, k, threshold, bounds
SECAGG_ADVERTS = "secagg-adverts"
SECAGG_NONCES = "secagg-nonces"  # sparse graphs: every advertised site's revealed nonce (share stage)
SECAGG_INBOX = "secagg-inbox"
SECAGG_ROSTER = "secagg-roster"  # the enrolled sites' identity keys; each site pins it at first use
SECAGG_SHARERS = "secagg-sharers"  # U2: the sites whose shares were routed (input stage)
SECAGG_SURVIVORS = "secagg-survivors"  # U3: the sites whose masked input arrived (consistency stage)
SECAGG_SIGNATURES = "secagg-signatures"  # the survivors' signatures on U3 (unmask stage)
ADVERT = "advert"
OUTBOX = "outbox"
CONSISTENCY = "consistency"  # a site's signature on the survivor set
REVEALS = "reveals"
NONCE = "nonce"  # a site's graph nonce, revealed once the round's advertisements are fixed (sparse graphs)
STAGES = ("advertise", "reveal", "share", "input", "consistency", "unmask")

ALL_METRICS = TRAIN_METRICS | REFUSAL_METRICS | EVAL_METRICS
SITE_KEYS = frozenset({SITE_NAME, AUDIT_HEAD})
SECAGG_REPLY_KEYS = frozenset({ADVERT, NONCE, OUTBOX, CONSISTENCY, REVEALS})
_SECAGG_TEXT = re.compile(r"^secure aggregation refused at the ([a-z]+) stage \(([a-z-]+)\)$")
FINGERPRINT_HEX = 32


def fingerprint(key: bytes, value: str) -> str:
    """Keyed fingerprint of an identifying value (HMAC-SHA256 of the normalised text, hex,
    truncated): what a site keeps of its header values, and what outgoing values are compared by."""
    return hmac.new(key, value.strip().upper().encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]
