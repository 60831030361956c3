"""Before each release: what noise the site's budget and caps need, and whether it may go ahead.

Every bound here comes from the site's policy; what the server's request says (rounds left,
a minimum noise) can only make the site spend *less* per round, never more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.config import PrivacyPolicy
from privacy.dp import BudgetExhausted, GaussianSteps, calibrate_noise, epsilon
from privacy.errors import RefusedError
from privacy.ledger import PrivacyLedger


class RoundCapReached(RefusedError):
    """The site trained as many rounds of this run as its policy allows."""


class RepeatedRelease(RefusedError):
    """The server asked again for a release this site already made (same run, round and kind)."""


@dataclass(frozen=True)
class RoundPrivacy:
    """The DP parameters one round will use, and the ε the ledger will show after it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    overridden: bool  # the site's own noise was higher than the server asked for
    capped: bool  # the per-round cap (not the total budget) set the noise
    site_noise_multiplier: float  # the σ the site's own bounds need (what it reports: never a server-chosen number)


def sample_rate(patients: int, batch_size: int) -> float:
    """Opacus' Poisson rate for a loader of ``batch_size`` over ``patients`` records."""
    return 1.0 / math.ceil(patients / max(1, min(batch_size, patients)))


def evaluation_mechanism(policy: PrivacyPolicy, evaluations: int = 1) -> GaussianSteps:
    """``evaluations`` metered releases of validation metrics (sensitivity 1, no sampling)."""
    return GaussianSteps(policy.eval_noise_multiplier, 1.0, evaluations)


def plan_round(
    policy: PrivacyPolicy, ledger: PrivacyLedger, *, patients: int, batch_size: int, steps: int,
    run_id: str, server_round: int, rounds_left: int, requested_noise: float = 0.0,
) -> RoundPrivacy:
    """Calibrate σ for this round of ``run_id`` from the site's own bounds.

    σ is the largest of: what spreads the remaining budget over the rounds still planned
    (the request's ``rounds_left``, at most the site's ``max_rounds_per_run`` less the rounds
    already trained in this run; the metered evaluations of those rounds are reserved too);
    what keeps this round's ε increment, its evaluation included, within
    ``max_epsilon_per_round``; the site's ``min_noise_multiplier``; and the server's request.

    Raises
    ------
    BudgetExhausted
        Even ``policy.max_noise_multiplier`` cannot pay for this one round (the site never
        trains on pure noise).
    RoundCapReached
        The site already trained ``max_rounds_per_run`` rounds of this run.
    RepeatedRelease
        This round of this run was trained already: each request is answered once, so reusing
        a round number cannot buy a second per-round allowance.
    """
    trained = sum(1 for e in ledger.events if e.kind == "train" and e.run_id == run_id)
    if any(e.kind == "train" and e.run_id == run_id and e.round == server_round for e in ledger.events):
        raise RepeatedRelease(f"round {server_round} of run {run_id} was trained already")
    if trained >= policy.max_rounds_per_run:
        raise RoundCapReached(f"{trained} rounds of run {run_id} trained; privacy.max_rounds_per_run is "
                              f"{policy.max_rounds_per_run}")
    rounds = max(1, min(rounds_left, policy.max_rounds_per_run - trained))
    delta = policy.delta_for(patients)
    q = sample_rate(patients, batch_size)
    prior = ledger.mechanisms()
    metered = policy.metrics == "dp"  # under DP (the only case this is called in) evaluations are charged
    evals = [evaluation_mechanism(policy, rounds)] if metered else []

    def calibrate(target: float, steps: int, prior: list[GaussianSteps]) -> float:
        return calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, prior=prior,
                               accountant=policy.accountant, max_noise_multiplier=policy.max_noise_multiplier)

    try:
        sigma = calibrate(policy.max_epsilon, steps * rounds, [*prior, *evals])
    except BudgetExhausted:  # not enough for the whole plan: is there enough for this one round?
        sigma = calibrate(policy.max_epsilon, steps, [*prior, *evals[:1]])
    this_eval = [evaluation_mechanism(policy)] if metered else []
    spent = epsilon(prior, delta=delta, accountant=policy.accountant)
    capped = False
    cap = spent + policy.max_epsilon_per_round
    if epsilon([*prior, *this_eval, GaussianSteps(sigma, q, steps)], delta=delta, accountant=policy.accountant) > cap:
        sigma = calibrate(cap, steps, [*prior, *this_eval])
        capped = True
    own = max(sigma, policy.min_noise_multiplier)
    used = max(own, min(requested_noise, policy.max_noise_multiplier))  # more noise than the site's maximum: no
    eps_after = epsilon([*prior, GaussianSteps(used, q, steps)], delta=delta, accountant=policy.accountant)
    return RoundPrivacy(noise_multiplier=used, sample_rate=q, steps=steps, delta=delta, epsilon_after=eps_after,
                        overridden=own > requested_noise, capped=capped, site_noise_multiplier=own)


def plan_evaluation(policy: PrivacyPolicy, ledger: PrivacyLedger, *, patients: int, run_id: str,
                    server_round: int) -> tuple[GaussianSteps, float]:
    """The metered evaluation of the model of ``server_round``: its mechanism and the ε after it.

    Raises
    ------
    RepeatedRelease
        The round was evaluated already, or the site did not train it (a site evaluates only the
        model of a round it took part in, once).
    BudgetExhausted
        It would take the site past ``max_epsilon``.
    """
    events = [(e.kind, e.run_id, e.round) for e in ledger.events]
    if ("evaluate", run_id, server_round) in events or ("train", run_id, server_round) not in events:
        raise RepeatedRelease(f"round {server_round} of run {run_id} was evaluated already or not trained here")
    delta = policy.delta_for(patients)
    mech = evaluation_mechanism(policy)
    after = epsilon([*ledger.mechanisms(), mech], delta=delta, accountant=policy.accountant)
    if after > policy.max_epsilon:
        raise BudgetExhausted(f"an evaluation would take ε to {after:.3f}, above the budget {policy.max_epsilon:g}")
    return mech, after
