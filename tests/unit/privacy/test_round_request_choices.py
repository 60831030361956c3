"""The run's choices in the round request (network, findings, window): parsed strictly at the site."""

from __future__ import annotations

from dataclasses import replace

import pytest

from client.config import DataConfig
from privacy import egress as K
from privacy.protocol import RoundRequest, RoundRequestError, parse_findings, parse_window, parse_windows
from server.config import RunConfig, RunConfigError
from server.rounds import round_config

BASE = RoundRequest(server_round=1, run_id="r", num_rounds=2, local_steps=1, batch_size=4, learning_rate=1e-3,
                    image_size=64, dp=True, noise_multiplier=0.0)


def test_the_round_request_carries_the_runs_choices_and_parses_them_back() -> None:
    cfg = RunConfig(model="densenet121", findings="nodule,effusion", window="-600,1500", image_size=224)
    record = round_config(cfg, "run-1", 1)
    req = RoundRequest.from_record(record)
    assert (req.model, req.finding_names, req.outputs, req.voi_windows, req.channels) == (
        "densenet121", ("nodule", "effusion"), 2, ((-600.0, 1500.0),), 1)
    assert record[K.MODEL] == "densenet121" and record[K.WINDOW] == "-600,1500"
    assert BASE.outputs == 1 and BASE.voi_windows == () and BASE.channels == 1 and BASE.model == "slicenet"
    three = replace(BASE, window="-600,1500;40,400;400,1800")
    assert three.channels == 3 and three.voi_windows[2] == (400.0, 1800.0)
    assert parse_window("-600,1500;40,400") is None and parse_windows("") == ()
    with pytest.raises(RoundRequestError, match="at most 4"):
        parse_windows(";".join(["0,1"] * 5))
    with pytest.raises(RunConfigError, match="one channel"):
        RunConfig(window="-600,1500;40,400")  # slicenet is single-channel


@pytest.mark.parametrize("text", ["-600", "a,b", "0,0", "0,-5", "nan,10", "0,1e9", "1,2,3"])
def test_malformed_windows_are_refused(text: str) -> None:
    with pytest.raises(RoundRequestError, match="window"):
        parse_window(text)
    with pytest.raises(RoundRequestError):
        replace(BASE, window=text)
    with pytest.raises(RunConfigError, match="window"):
        RunConfig(window=text)


@pytest.mark.parametrize("text", ["a,a", "1abc", "x y", ",".join(f"f{i}" for i in range(17)), "PatientName,"])
def test_malformed_findings_are_refused(text: str) -> None:
    with pytest.raises(RoundRequestError, match="findings"):
        parse_findings(text)


def test_the_runs_window_then_the_sites_then_the_files() -> None:
    assert DataConfig().preprocessing(64, (40.0, 400.0)).window == (40.0, 400.0)
    assert DataConfig(window=(-600.0, 1500.0)).preprocessing(64, (40.0, 400.0)).window == (40.0, 400.0)
    assert DataConfig(window=(-600.0, 1500.0)).preprocessing(64).window == (-600.0, 1500.0)
    assert DataConfig().preprocessing(64).window is None  # each file's own VOI window


def test_unknown_networks_are_refused_in_the_run_config() -> None:
    with pytest.raises(RunConfigError, match="densenet121"):
        RunConfig(model="vgg16")
