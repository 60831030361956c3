"""DP accounting, calibration, the ledger and the site's budget enforcement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opacus.accountants import PRVAccountant, RDPAccountant

from client.budget import plan_round, sample_rate
from client.config import PrivacyPolicy
from privacy.dp import BudgetExhausted, GaussianSteps, auto_delta, calibrate_noise, epsilon
from privacy.ledger import LedgerCorruptError, LedgerEvent, PrivacyLedger


def test_pinned_rdp_value_as_in_opacus() -> None:
    # Opacus' own pinned example: σ=1.5, q=0.04, 2,250 steps, δ=1e-5
    assert epsilon([GaussianSteps(1.5, 0.04, 2250)], delta=1e-5) == pytest.approx(7.32911117143, rel=1e-9)


KEY = Ed25519PrivateKey.generate()  # the site's identity key signs its ledger


def _load(path: Path) -> PrivacyLedger:
    return PrivacyLedger.load(path, KEY.public_key())


def _event(r: int, sigma: float, q: float, steps: int, run: str = "run-a") -> LedgerEvent:
    return LedgerEvent(round=r, run_id=run, noise_multiplier=sigma, sample_rate=q, steps=steps,
                       accountant="rdp", epsilon_after=0.0, delta=1e-5, timestamp="2026-01-01T00:00:00+00:00")


@pytest.mark.parametrize("name,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_ledger_epsilon_equals_independent_opacus_accounting(tmp_path: Path, name: str, cls: type) -> None:
    ledger = _load(tmp_path / "ledger.json")
    plan = [(1.1, 0.25, 30), (1.1, 0.25, 30), (2.0, 0.125, 40), (0.9, 0.5, 10)]
    for r, (s, q, n) in enumerate(plan, start=1):
        ledger = ledger.append(_event(r, s, q, n), KEY)
    independent = cls()
    for s, q, n in plan:
        for _ in range(n):
            independent.step(noise_multiplier=s, sample_rate=q)
    expected = independent.get_epsilon(delta=1e-5)
    reloaded = _load(tmp_path / "ledger.json")
    assert reloaded.epsilon(delta=1e-5, accountant=name) == pytest.approx(expected, rel=1e-6)


def test_calibration_hits_the_target_from_below() -> None:
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps=150)
    assert epsilon([GaussianSteps(sigma, 0.25, 150)], delta=1e-5) <= 8.0
    assert epsilon([GaussianSteps(sigma * 0.97, 0.25, 150)], delta=1e-5) > 8.0 * 0.98
    # with half the budget already spent, more noise is needed for the same plan
    prior = [GaussianSteps(sigma, 0.25, 75)]
    sigma2 = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps=150, prior=prior)
    assert sigma2 > sigma
    assert epsilon([*prior, GaussianSteps(sigma2, 0.25, 150)], delta=1e-5) <= 8.0


def test_exhausted_budget_is_refused_not_drowned_in_noise() -> None:
    prior = [GaussianSteps(0.8, 0.5, 200)]
    assert epsilon(prior, delta=1e-5) > 8.0
    with pytest.raises(BudgetExhausted, match="maximum noise multiplier"):
        calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps=10, prior=prior,
                        max_noise_multiplier=20.0)


def test_ledger_survives_restarts_and_refuses_corruption(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    a = _load(path).append(_event(1, 1.0, 0.25, 20), KEY).append(_event(2, 1.0, 0.25, 20), KEY)
    b = _load(path).append(_event(1, 1.0, 0.25, 20, run="run-b"), KEY)  # a new run continues
    assert len(_load(path).events) == 3
    assert b.epsilon(delta=1e-5) > a.epsilon(delta=1e-5) > 0
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    doc = json.loads(path.read_text())
    doc["events"][0]["noise_multiplier"] = 50.0  # someone "fixes" the ledger by hand
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerCorruptError, match="signature does not match.*--rebuild"):
        _load(path)
    b._write(list(b.events), Ed25519PrivateKey.generate())  # re-signed with a key that is not the site's
    with pytest.raises(LedgerCorruptError, match="signature does not match"):
        _load(path)
    path.write_text('{"version": 2, "events": [')
    with pytest.raises(LedgerCorruptError, match=str(path)):
        _load(path)


def test_site_policy_wins_over_requested_noise(tmp_path: Path) -> None:
    policy = PrivacyPolicy(max_epsilon=4.0, delta=1e-5, metrics="exact")  # no evaluation reserved
    ledger = _load(tmp_path / "ledger.json")
    own = plan_round(policy, ledger, patients=100, batch_size=25, steps=20, run_id="r", server_round=1, rounds_left=3)
    low = plan_round(policy, ledger, patients=100, batch_size=25, steps=20, run_id="r", server_round=1, rounds_left=3,
                     requested_noise=0.5)
    assert low.noise_multiplier == pytest.approx(own.noise_multiplier) and low.overridden
    high = plan_round(policy, ledger, patients=100, batch_size=25, steps=20, run_id="r", server_round=1, rounds_left=3,
                      requested_noise=own.noise_multiplier * 2)
    assert high.noise_multiplier == pytest.approx(own.noise_multiplier * 2) and not high.overridden
    assert own.sample_rate == sample_rate(100, 25) == 0.25
    # the whole planned run fits the budget: three such rounds compose to at most max ε
    three = [GaussianSteps(own.noise_multiplier, own.sample_rate, 20)] * 3
    assert epsilon(three, delta=1e-5) == pytest.approx(4.0, rel=0.02)
    assert epsilon(three, delta=1e-5) <= 4.0


def test_budget_runs_out_and_rounds_are_refused(tmp_path: Path) -> None:
    policy = PrivacyPolicy(max_epsilon=2.0, delta=1e-5, max_noise_multiplier=5.0)
    ledger = _load(tmp_path / "ledger.json")
    for r in range(1, 3):
        rp = plan_round(policy, ledger, patients=100, batch_size=25, steps=20, run_id="r", server_round=r, rounds_left=3 - r)
        ledger = ledger.append(_event(r, rp.noise_multiplier, rp.sample_rate, rp.steps), KEY)
    assert ledger.epsilon(delta=1e-5) <= 2.0
    with pytest.raises(BudgetExhausted):
        plan_round(policy, ledger, patients=100, batch_size=25, steps=20, run_id="r", server_round=3, rounds_left=1)


def test_auto_delta_is_below_one_over_patients() -> None:
    for n in (10, 99, 1000, 123456):
        assert auto_delta(n) < 1.0 / n
    assert auto_delta(100) == 1e-5


@pytest.mark.parametrize("q, steps, prior", [
    (0.25, 150, ()),
    (0.32, 250, (GaussianSteps(3.0, 0.32, 50), GaussianSteps(3.0, 0.32, 50))),
    (0.01, 1000, ()),
])
def test_fast_calibration_matches_bisection_on_opacus_epsilon(q: float, steps: int, prior: tuple) -> None:
    """The bracketed search finds the same σ as plain bisection on Opacus' own accountant."""
    def opacus_eps(sigma: float) -> float:
        acc = RDPAccountant()
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in prior] + [(sigma, q, steps)]
        return acc.get_epsilon(delta=1e-5)

    lo, hi = 0.0, 50.0
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if opacus_eps(mid) <= 8.0 else (mid, hi)
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps, prior=prior)
    assert opacus_eps(sigma) <= 8.0
    assert hi <= sigma <= hi * 1.01


def _one_step(poison: torch.Tensor | None) -> list[torch.Tensor]:
    """One DP-SGD step of a fixed model on three samples' per-sample gradients; ``poison``
    replaces the third sample's (seeded noise, so two calls are comparable)."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from privacy.dp import make_private

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(3, 4)
    loader = DataLoader(TensorDataset(x, torch.zeros(3)), batch_size=3, generator=torch.Generator().manual_seed(0))
    gsm, opt, _ = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
                               noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(5))
    gsm(x).sum().backward()
    for p in model.parameters():
        if poison is not None:
            p.grad_sample[2] = poison
        else:
            p.grad_sample[2] = 0.0
    opt.step()
    out = [p.detach().clone() for p in model.parameters()]
    gsm.to_standard_module()
    return out


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_per_sample_gradient_counts_as_a_zero_one(poison: float) -> None:
    """A crafted model can make one patient's gradient inf or NaN; Opacus' clipping would turn the
    whole sum into NaN, and whether the update is finite would reveal that patient. The site's
    optimizer zeroes such a sample first: the update equals the one with that sample at zero."""
    zero = _one_step(None)
    poisoned = _one_step(torch.tensor(poison))
    for a, b in zip(zero, poisoned, strict=True):
        assert bool(torch.isfinite(b).all())
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # exact: the same operations on the same numbers


def test_dp_training_survives_empty_poisson_batches() -> None:
    """Poisson sampling at q = 1/19 draws empty batches often; each still takes a (noise-only) step."""
    from client.dicom.cohort import Cohort
    from client.models import build_model
    from client.train import LocalPlan, train_private

    rng = np.random.default_rng(0)
    cohort = Cohort(rng.uniform(size=(19, 16, 16)).astype(np.float32), rng.integers(0, 2, 19).astype(np.float32),
                    np.arange(19), 19)
    model = build_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_private(model, cohort, LocalPlan(steps=30, batch_size=1, learning_rate=1e-3, seed=3),
                           torch.device("cpu"), noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=4)
    assert result.steps == 30 and result.num_examples < 30 * 3  # about 30 sampled patients, some steps empty
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_ledger_records_the_per_sample_gradient_mode_and_reads_ledgers_written_before_it(tmp_path: Path) -> None:
    from dataclasses import replace

    from privacy.audit.log import canonical

    def sign(events: list) -> str:  # what a site signs: the canonical JSON of the version and the events
        return KEY.sign(canonical({"version": 2, "events": events})).hex()

    path = tmp_path / "ledger.json"
    _load(path).append(replace(_event(1, 1.0, 0.25, 20), grad_sample_mode="hooks"), KEY)
    assert _load(path).events[0].grad_sample_mode == "hooks"
    assert json.loads(path.read_text())["events"][0]["grad_sample_mode"] == "hooks"
    # a ledger an earlier medfed signed (no grad_sample_mode field) still verifies and loads
    old = [{k: v for k, v in e.items() if k != "grad_sample_mode"} for e in json.loads(path.read_text())["events"]]
    path.write_text(json.dumps({"version": 2, "events": old, "signature": sign(old)}))
    assert _load(path).events[0].grad_sample_mode == "" and _load(path).events[0].steps == 20
    del old[0]["steps"]  # a missing field that has no default is still a corrupt ledger
    path.write_text(json.dumps({"version": 2, "events": old, "signature": sign(old)}))
    with pytest.raises(LedgerCorruptError):
        _load(path)
