"""Model arrays on the wire: numpy weight dictionaries <-> Flower ``ArrayRecord`` and their
digest (``privacy.secagg.wire`` is the secure-aggregation protocol's codec)."""

from __future__ import annotations

import hashlib
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


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Hash of named arrays (names, dtypes, shapes and bytes, in order): the global-model hash
    that server and site logs both record."""
    h = hashlib.sha256()
    for k, v in arrays.items():
        a = np.ascontiguousarray(v)
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()
