"""The one-run canary audit (Steinke, Nasr, Jagielski 2023): the bound pinned where it has a
closed form, sound against a mechanism of known ε, positive on a memorising model, and never
above the accountant's ε of real Opacus DP-SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from client.dicom.cohort import Cohort
from client.train import LocalPlan, image_losses, logits, train_plain, train_private
from privacy.attacks.canary import audit, draw_inclusion, epsilon_lower_bound, p_value
from privacy.dp import GaussianSteps, epsilon


def test_all_right_guesses_pin_the_closed_form() -> None:
    # pure DP, r = v: P[Bin(r, q) >= r] = q^r = 0.05  ->  ε = log(q / (1 - q)), q = 0.05^(1/r)
    for r in (10, 40):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_lower_bound(m=10, r=10, v=5, delta=0.0) == 0.0  # a coin's score bounds nothing


def test_p_value_grows_with_epsilon_and_delta_and_the_bound_shrinks_with_delta() -> None:
    assert p_value(m=100, r=50, v=40, epsilon=0.5, delta=0) < p_value(m=100, r=50, v=40, epsilon=2.0, delta=0)
    assert p_value(m=100, r=50, v=40, epsilon=1.0, delta=0) < p_value(m=100, r=50, v=40, epsilon=1.0, delta=1e-3)
    assert epsilon_lower_bound(m=100, r=50, v=45, delta=1e-3) < epsilon_lower_bound(m=100, r=50, v=45, delta=0.0)
    with pytest.raises(ValueError, match="correct"):
        p_value(m=10, r=5, v=6, epsilon=1.0, delta=0.0)


def test_the_bound_holds_against_randomized_response_of_known_epsilon() -> None:
    """Each canary's score reveals its inclusion with ε-DP randomized response (ε = 2, exactly):
    the bound stays below 2 in about 95% of audits (its confidence), and gets close with 2000 canaries."""
    true_eps, m = 2.0, 2000
    keep = 1 / (1 + math.exp(-true_eps))
    bounds = []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        inc = draw_inclusion(m, rng)
        told = np.where(rng.random(m) < keep, inc, ~inc)
        scores = told + rng.random(m) * 0.1  # ties broken by noise independent of inclusion
        bounds.append(audit(scores, inc, delta=0.0, guesses_in=500, guesses_out=500).epsilon_lower_bound)
    assert sum(b <= true_eps for b in bounds) >= 88  # 95 expected; 88 or fewer: p < 0.01
    assert 1.3 < float(np.median(bounds)) <= true_eps


def _canaries(m: int, seed: int) -> Cohort:
    rng = np.random.default_rng(seed)
    return Cohort(rng.uniform(size=(m, 8, 8)).astype(np.float32), rng.integers(0, 2, m).astype(np.float32),
                  np.arange(m, dtype=np.int64), m)


def _scores(model: nn.Module, c: Cohort) -> np.ndarray:
    return -image_losses(logits(model, c, torch.device("cpu")), c.labels)


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1), nn.Flatten(0))


def test_a_memorising_model_gives_a_clearly_positive_bound() -> None:
    m = 120
    canaries = _canaries(m, 3)
    inc = draw_inclusion(m, np.random.default_rng(4))
    model = _toy()
    train_plain(model, canaries.subset(np.flatnonzero(inc)), LocalPlan(steps=300, batch_size=64, learning_rate=0.01,
                                                                       seed=0), torch.device("cpu"))
    result = audit(_scores(model, canaries), inc, delta=1e-5, guesses_in=30, guesses_out=30)
    assert result.correct >= 50 and result.epsilon_lower_bound > 1.0


def test_opacus_dp_sgd_never_exceeds_the_accountants_epsilon() -> None:
    """Real Opacus DP-SGD (Poisson sampling, clipping 1, σ = 1.5): the bound stays <= the RDP ε."""
    m, steps, batch, sigma = 120, 300, 30, 1.5
    canaries = _canaries(m, 3)
    inc = draw_inclusion(m, np.random.default_rng(4))
    trained = canaries.subset(np.flatnonzero(inc))
    model = _toy()
    train_private(model, trained, LocalPlan(steps=steps, batch_size=batch, learning_rate=0.01, seed=0),
                  torch.device("cpu"), noise_multiplier=sigma, max_grad_norm=1.0, noise_seed=5)
    delta = 1e-5
    eps = epsilon([GaussianSteps(sigma, batch / trained.n_patients, steps)], delta=delta)
    result = audit(_scores(model, canaries), inc, delta=delta, guesses_in=30, guesses_out=30)
    assert 0 <= result.epsilon_lower_bound <= eps
    assert result.guesses == 60 and result.canaries == m and result.included == int(inc.sum())
