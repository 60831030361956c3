"""Server pieces: run config, weighted averaging, run directory files."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from privacy.model_arrays import arrays_sha256
from server.aggregate import apply_update, weighted_mean
from server.config import RunConfig, RunConfigError
from server.rundir import RunDir, load_npz


def test_weighted_mean_weights_by_examples() -> None:
    a = OrderedDict(w=np.array([1.0, 2.0], dtype=np.float32), b=np.array([0.0], dtype=np.float32))
    b = OrderedDict(w=np.array([3.0, 6.0], dtype=np.float32), b=np.array([4.0], dtype=np.float32))
    m = weighted_mean([a, b], [1, 3])
    np.testing.assert_allclose(m["w"], [2.5, 5.0])
    np.testing.assert_allclose(m["b"], [3.0])
    assert list(m) == ["w", "b"]
    np.testing.assert_allclose(apply_update(a, m)["w"], [3.5, 7.0])
    with pytest.raises(ValueError):
        weighted_mean([a], [0])


def test_run_config_from_flower_keys_and_errors() -> None:
    cfg = RunConfig.from_run_config({"num-server-rounds": 5, "learning-rate": "0.01", "dp": "false",
                                     "run-dir": "x"})
    assert (cfg.num_server_rounds, cfg.learning_rate, cfg.dp, cfg.run_dir) == (5, 0.01, False, "x")
    with pytest.raises(RunConfigError, match="unknown key 'rounds'"):
        RunConfig.from_run_config({"rounds": 3})
    with pytest.raises(RunConfigError, match="local-steps must be >= 1"):
        RunConfig(local_steps=0)
    # cast by the fields' real types: a typo in a flag, a fraction of a round or a boolean count is refused
    for bad, expected in ((("dp", "flase"), "give true or false"), (("num-server-rounds", 2.5), "give a whole number"),
                          (("num-server-rounds", True), "give a whole number"), (("learning-rate", "fast"), "give a number")):
        with pytest.raises(RunConfigError, match=f"{bad[0]}=.* is not a valid .*; {expected}"):
            RunConfig.from_run_config(dict([bad]))
    assert RunConfig.from_run_config({"secure-aggregation": "yes", "batch-size": 32.0}).secure_aggregation is True


def test_checkpoints_have_sidecars_and_detect_damage(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    arrays = OrderedDict(conv=np.arange(6, dtype=np.float32).reshape(2, 3), bias=np.ones(2, np.float32))
    path = rd.checkpoint(1, arrays)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["round"] == 1 and side["keys"] == ["conv", "bias"]
    assert side["arrays_sha256"] == arrays_sha256(arrays)
    loaded = load_npz(path)
    assert list(loaded) == ["conv", "bias"]
    np.testing.assert_array_equal(loaded["conv"], arrays["conv"])  # exact: the stored bytes read back
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_npz(path)


def test_one_server_process_runs_a_run_directory_at_a_time(tmp_path: Path) -> None:
    """A resume while the first server process still runs (or two ``flwr run`` into one directory)
    is refused with the reason; the lock goes with its holder."""
    from server.resume import ResumeError, run_lock

    with run_lock(tmp_path, wait=0.0):
        with pytest.raises(ResumeError, match="being run by another server process"), run_lock(tmp_path, wait=0.0):
            pass
    with run_lock(tmp_path, wait=0.0):  # released: free again
        assert (tmp_path / "run.lock").is_file()
