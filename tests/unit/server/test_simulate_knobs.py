"""The knobs a privacy experiment needs: the optimizer crosses the wire, and the privacy flags
given to simulate apply to reused --sites-dir sites (their own policy otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.config import load_site_config
from privacy.protocol import RoundRequest, RoundRequestError
from server.config import RunConfig, RunConfigError
from server.rounds import round_config
from server.simulate import SimulationPlan, prepare_sites
from tests.conftest import make_workspace


def test_the_optimizer_reaches_the_sites_and_is_checked_on_both_sides() -> None:
    cfg = RunConfig(optimizer="sgd")
    assert RoundRequest.from_record(round_config(cfg, "r1", 1)).optimizer == "sgd"
    with pytest.raises(RunConfigError, match="optimizer must be one of adam, sgd"):
        RunConfig(optimizer="lbfgs")
    record = round_config(RunConfig(), "r1", 1)
    record["optimizer"] = "rmsprop"
    with pytest.raises(RoundRequestError, match="'optimizer' is out of range"):
        RoundRequest.from_record(record)


def test_flags_given_apply_to_reused_sites_and_nothing_else_changes(tmp_path: Path, small_site: Path) -> None:
    sites = tmp_path / "old" / "sites"
    make_workspace(sites, "site-1", small_site, max_epsilon=3.0)
    prepare_sites(tmp_path / "run1", SimulationPlan(sites=1, sites_dir=sites), 16, tmp_path / "k1")
    kept = load_site_config(sites / "site-1")
    assert (kept.privacy.max_epsilon, kept.privacy.dp, kept.data.val_fraction) == (3.0, True, 0.2)  # its own policy
    plan = SimulationPlan(sites=1, sites_dir=sites, val_share=0.5,
                          reuse_privacy=(("max_epsilon", 1.0), ("dp", False), ("max_grad_norm", 0.5)))
    prepare_sites(tmp_path / "run2", plan, 16, tmp_path / "k2")
    changed = load_site_config(sites / "site-1")
    assert (changed.privacy.max_epsilon, changed.privacy.dp, changed.privacy.max_grad_norm) == (1.0, False, 0.5)
    assert changed.data.val_fraction == 0.5 and changed.privacy.accountant == kept.privacy.accountant
    with pytest.raises(ValueError, match="--val-share"):
        SimulationPlan(sites=1, val_share=1.0)
