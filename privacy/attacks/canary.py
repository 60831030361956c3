"""One-run DP audit with canaries (Steinke, Nasr, Jagielski, NeurIPS 2023, "Privacy auditing
with one (1) training run").

m canaries are each put in the training set with probability 1/2, independently. After training
the auditor ranks them by score, guesses "in" for the ``guesses_in`` highest and "out" for the
``guesses_out`` lowest, abstains on the rest, and counts its correct guesses. If training is
(ε, δ)-DP per canary, the number of correct guesses among r is (up to a δ term) no larger than
Binomial(r, e^ε / (1 + e^ε)) would make it (their Theorem 3). The largest ε that this count
rejects at the chosen confidence is an empirical LOWER bound on the true ε: it can never
(except with probability 1 - confidence) exceed the ε the accountant states. A bound above the
accountant's ε means the training is not as private as claimed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
_BISECTIONS = 40


@dataclass(frozen=True)
class CanaryAudit:
    """The audit's outcome (numbers only). ``epsilon_lower_bound`` holds with probability ``confidence``."""

    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    delta: float

    def as_dict(self) -> dict[str, float | int]:
        return {"canaries": self.canaries, "included": self.included, "guesses": self.guesses,
                "correct": self.correct, "epsilon_lower_bound": self.epsilon_lower_bound,
                "confidence": self.confidence, "delta": self.delta}


def draw_inclusion(m: int, rng: np.random.Generator) -> np.ndarray:
    """(m,) bool: each canary is in the training set with probability 1/2, independently (the
    audit's secret, drawn and kept at the site)."""
    return rng.random(m) < 0.5


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability, under (ε, δ)-DP, of at least ``v`` correct guesses among ``r`` on ``m`` canaries.

    Pure ε-DP: the count is dominated by Binomial(r, q), q = e^ε / (1 + e^ε). The δ term is the
    paper's: the worst average, over the i guesses an adversary could be "given" by δ, of the
    binomial mass just below v, times 2 m δ.
    """
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"canary audit: need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}), ε >= 0, δ in [0, 1]")
    from scipy.stats import binom  # on first use: every site process imports this module, scipy.stats takes ~0.5 s

    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v - i] for i = 1..v
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + worst * delta * 2 * m, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest ε that ``v`` correct out of ``r`` guesses rejects at ``confidence`` (0 if none)."""
    alpha = 1.0 - confidence
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return lo
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def audit(scores: np.ndarray, included: np.ndarray, *, delta: float, guesses_in: int, guesses_out: int,
          confidence: float = CONFIDENCE) -> CanaryAudit:
    """Guess "in" for the ``guesses_in`` highest-scoring canaries and "out" for the ``guesses_out``
    lowest (fixed before scoring), and bound ε from the number of right guesses. Ties are broken
    by canary order, which the inclusion draw does not depend on."""
    s = np.asarray(scores, float)
    inc = np.asarray(included, bool)
    m = len(s)
    if len(inc) != m or guesses_in < 0 or guesses_out < 0 or guesses_in + guesses_out > m:
        raise ValueError(f"canary audit: {m} scores, {len(inc)} inclusion flags, {guesses_in}+{guesses_out} guesses")
    order = np.argsort(-s, kind="stable")
    correct = int(inc[order[:guesses_in]].sum()) + int((~inc[order[m - guesses_out :]]).sum() if guesses_out else 0)
    r = guesses_in + guesses_out
    return CanaryAudit(canaries=m, included=int(inc.sum()), guesses=r, correct=correct,
                       epsilon_lower_bound=epsilon_lower_bound(m=m, r=r, v=correct, delta=delta,
                                                               confidence=confidence),
                       confidence=confidence, delta=delta)
