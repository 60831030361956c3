"""Before each round: what noise the site's budget needs, and whether it can train at all."""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.config import PrivacyPolicy
from privacy.dp import BudgetExhausted, GaussianSteps, calibrate_noise, epsilon
from privacy.ledger import PrivacyLedger

# refusal codes, sent as numbers (never free text)
REFUSED_BUDGET = 1  # this round would exceed the site's privacy budget
REFUSED_POLICY = 2  # the update would leave unmasked and the site requires secure aggregation


@dataclass(frozen=True)
class RoundPrivacy:
    """The DP parameters one round will use, and the ε the ledger will show after it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    overridden: bool  # the site's own noise was higher than the server asked for


def sample_rate(patients: int, batch_size: int) -> float:
    """Opacus' Poisson rate for a loader of ``batch_size`` over ``patients`` records."""
    return 1.0 / math.ceil(patients / max(1, min(batch_size, patients)))


def plan_round(
    policy: PrivacyPolicy, ledger: PrivacyLedger, *, patients: int, batch_size: int, steps: int,
    rounds_left: int, requested_noise: float = 0.0,
) -> RoundPrivacy:
    """Calibrate σ so that everything spent so far plus ``rounds_left`` rounds fits the budget.

    When the run goes to plan, every round of a run gets the same σ. The round is
    refused (:class:`BudgetExhausted`) if even this one round cannot be paid within
    ``policy.max_noise_multiplier`` — the site never trains on pure noise.
    """
    delta = policy.delta_for(patients)
    q = sample_rate(patients, batch_size)
    prior = ledger.mechanisms()
    try:
        sigma = calibrate_noise(target_epsilon=policy.max_epsilon, delta=delta, sample_rate=q,
                                steps=steps * max(1, rounds_left), prior=prior,
                                accountant=policy.accountant, max_noise_multiplier=policy.max_noise_multiplier)
    except BudgetExhausted:
        # not enough for the whole plan: is there enough for this one round?
        sigma = calibrate_noise(target_epsilon=policy.max_epsilon, delta=delta, sample_rate=q,
                                steps=steps, prior=prior, accountant=policy.accountant,
                                max_noise_multiplier=policy.max_noise_multiplier)
    used = max(sigma, requested_noise)
    eps_after = epsilon([*prior, GaussianSteps(used, q, steps)], delta=delta, accountant=policy.accountant)
    return RoundPrivacy(noise_multiplier=used, sample_rate=q, steps=steps, delta=delta,
                        epsilon_after=eps_after, overridden=sigma > requested_noise)
