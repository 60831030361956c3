"""Every key that crosses the wire between server and site, defined once.

The egress guard (a ClientApp mod) that enforces what may leave a site lives here too
once secure aggregation lands; for now this module is the single source of the names.
"""

from __future__ import annotations

# Record names inside a Message's RecordDict
ARRAYS = "arrays"  # server -> site: global model; site -> server: update (delta)
CONFIG = "config"  # server -> site: round configuration
METRICS = "metrics"  # site -> server: whitelisted numeric metrics
SITE = "site"  # site -> server: the site's public name (enrolled identity, not patient data)

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

# Metric keys (site -> server); only these numeric values may leave a site
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_LOSS = "val-loss"
VAL_AUROC = "val-auroc"
SITE_NAME = "name"

TRAIN_METRICS = frozenset({NUM_EXAMPLES, TRAIN_LOSS})
EVAL_METRICS = frozenset({NUM_EXAMPLES, VAL_LOSS, VAL_AUROC})
