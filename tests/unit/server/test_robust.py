"""Bounding a site's influence: norm clipping and Flower's robust aggregators on medfed's named arrays."""

from __future__ import annotations

import numpy as np
import pytest

from client.config import SiteConfigError, load_site_config, write_site_config
from server.chaos import ChaosError, Poison, flip_labels, parse_poison
from server.config import RunConfig, RunConfigError
from server.robust import aggregate, clip_to_norm, l2_norm


def _u(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, dtype=np.float32), "b": np.full(3, value, dtype=np.float32)}


def test_clipping_scales_only_updates_above_the_bound() -> None:
    big, norm = clip_to_norm(_u(3.0), 2.0)
    assert norm == pytest.approx(3.0 * np.sqrt(7)) and l2_norm(big) == pytest.approx(2.0, rel=1e-6)
    small, _ = clip_to_norm(_u(0.1), 2.0)
    assert np.array_equal(small["w"], _u(0.1)["w"]) and small["w"].dtype == np.float32
    same, _ = clip_to_norm(_u(3.0), 0.0)  # 0 = no bound
    assert np.array_equal(same["b"], _u(3.0)["b"])


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum"])
def test_robust_aggregators_ignore_one_scaled_update(aggregator: str) -> None:
    honest = [_u(v) for v in (0.9, 1.0, 1.1, 1.0, 0.95, 1.05)]
    poisoned = [*honest, _u(100.0)]
    out = aggregate(poisoned, [10.0] * len(poisoned), aggregator)
    assert set(out) == {"w", "b"} and out["w"].shape == (2, 2)
    assert abs(float(out["w"].mean()) - 1.0) < 0.2, out
    mean = aggregate(poisoned, [10.0] * len(poisoned), "mean")
    assert float(mean["w"].mean()) > 10  # the plain mean is dragged away


def test_robust_aggregators_need_updates_in_the_clear() -> None:
    with pytest.raises(RunConfigError, match="in the clear"):
        RunConfig(aggregator="median")  # secure aggregation is on by default
    assert RunConfig(aggregator="median", secure_aggregation=False).aggregator == "median"
    with pytest.raises(RunConfigError, match="aggregator"):
        RunConfig(aggregator="bulyan", secure_aggregation=False)
    with pytest.raises(RunConfigError, match="update-norm-bound"):
        RunConfig(update_norm_bound=-1.0)


def test_poison_switch_forms(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert parse_poison("site-2:scale=100") == Poison("site-2", scale=100.0)
    assert parse_poison("site-1:flip-labels") == Poison("site-1", flip_labels=True)
    for bad in ("site-2", "site-2:scale=x", "site-2:drop", ":scale=3"):
        with pytest.raises(ChaosError, match="SITE:scale"):
            parse_poison(bad)
    src = tmp_path / "labels.csv"
    src.write_text("SOPInstanceUID,label\n1.2,0\n1.3,1\n")
    assert flip_labels(src, tmp_path / "f.csv").read_text().splitlines() == ["SOPInstanceUID,label", "1.2,1", "1.3,0"]


def test_site_bound_is_site_policy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from client.config import RobustnessPolicy
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path, "site-a", tmp_path / "data")
    write_site_config(replace(load_site_config(ws), robustness=RobustnessPolicy(max_update_norm=2.5)))
    assert load_site_config(ws).robustness.max_update_norm == 2.5
    with pytest.raises(SiteConfigError, match="max_update_norm"):
        RobustnessPolicy(max_update_norm=-1.0)


def test_a_site_holds_its_update_to_its_own_bound_and_audits_it(tmp_path, small_site) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from client.config import RobustnessPolicy
    from privacy.audit.events import E
    from privacy.audit.log import read_entries
    from tests.adversarial.harness import MaliciousServer, request, update
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path, "site-a", small_site, require_secure_aggregation=False)
    write_site_config(replace(load_site_config(ws), robustness=RobustnessPolicy(max_update_norm=0.01)))
    sent = update(MaliciousServer(ws).train(request()))
    assert l2_norm(sent) == pytest.approx(0.01, rel=1e-4)  # DP noise alone is far above 0.01: it was scaled
    entry = [e for e in read_entries(ws / "audit.jsonl") if e.event == E.UPDATE_BOUNDED][-1]
    assert entry.data["bound"] == 0.01 and entry.data["scaled"] is True and entry.data["round"] == 1
