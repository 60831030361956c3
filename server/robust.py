"""Bounding a site's influence on the global model: update-norm clipping, robust aggregators, and the
aggregate-norm check that still works under secure aggregation (``docs/robustness.md``).

Robust aggregators need every site's update in the clear; they are Flower's own
(``flwr.server.strategy.aggregate``: coordinate-wise median, trimmed mean, Krum). Under secure
aggregation the server sees only the weighted mean, so it can check only that mean's norm: the mean
of updates each within ``bound`` lies within ``bound``, and a round whose aggregate does not is
rejected (its update is not applied).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from privacy.update_norm import clip_to_norm, l2_norm
from server.aggregate import weighted_mean

__all__ = ["AGGREGATORS", "aggregate", "clip_to_norm", "l2_norm"]

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
TRIM = 0.2  # trimmed mean: the share cut from each end of every coordinate
KRUM_MALICIOUS = 1  # Krum: the sites assumed malicious in a round


def aggregate(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], aggregator: str
              ) -> OrderedDict[str, np.ndarray]:
    """The round's update by ``aggregator`` (one of :data:`AGGREGATORS`) over the sites' updates."""
    if aggregator == "mean":
        return weighted_mean(updates, weights)
    names = list(updates[0])
    results = [([np.asarray(u[k], dtype=np.float32) for k in names], max(1, int(round(w))))
               for u, w in zip(updates, weights, strict=True)]
    if aggregator == "median":
        out = aggregate_median(results)
    elif aggregator == "trimmed-mean":
        out = aggregate_trimmed_avg(results, TRIM)
    elif aggregator == "krum":
        if len(results) <= 2 * KRUM_MALICIOUS + 2:  # Krum's own requirement: n > 2f + 2
            return weighted_mean(updates, weights)
        out = aggregate_krum(results, KRUM_MALICIOUS, 0)
    else:
        raise ValueError(f"unknown aggregator {aggregator!r}: use one of {', '.join(AGGREGATORS)}")
    return OrderedDict((k, np.asarray(a, dtype=np.float32)) for k, a in zip(names, out, strict=True))
