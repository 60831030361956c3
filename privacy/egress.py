"""Every key that crosses the wire between server and site, defined once.

The egress guard (a ClientApp mod) that enforces what may leave a site lives here too
once secure aggregation lands; for now this module is the single source of the names.
"""

from __future__ import annotations

# Record names inside a Message's RecordDict
ARRAYS = "arrays"  # server -> site: global model; site -> server: update (delta)
CONFIG = "config"  # server -> site: round configuration
METRICS = "metrics"  # site -> server: whitelisted numeric metrics
SITE = "site"  # site -> server: the site's public name and audit-log head (no patient data)

# Round configuration keys (server -> site)
SERVER_ROUND = "server-round"
RUN_ID = "run-id"
NUM_ROUNDS = "num-rounds"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
IMAGE_SIZE = "image-size"
SEED = "seed"
DP_ENABLED = "dp"
NOISE_MULTIPLIER_REQUEST = "noise-multiplier"  # the server's minimum; a site may use more

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

TRAIN_METRICS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, EPSILON, DELTA, NOISE_MULTIPLIER,
                           NOISE_OVERRIDDEN, PATIENTS})
REFUSAL_METRICS = frozenset({REFUSED, REFUSAL_CODE, EPSILON, DELTA, PATIENTS})
EVAL_METRICS = frozenset({NUM_EXAMPLES, VAL_LOSS, VAL_AUROC})
