"""Conversions between numpy weight dictionaries and Flower records."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap named numpy arrays (kept in order) into an ``ArrayRecord``."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Unwrap an ``ArrayRecord`` into named numpy arrays (in order)."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())
