"""Validation metrics released with differential privacy (a Gaussian mechanism over patients).

Each validation patient contributes a vector of norm at most √2: a histogram of its images'
predicted probabilities, split by label, with weight 1/k per image for a patient with k
images (total weight 1), and its mean loss clipped to [0, ``LOSS_CLIP``] divided by
``LOSS_CLIP``. Adding or removing one patient therefore moves the summed vector by at
most √2 in L2, and Gaussian noise of standard deviation σ·√2 per coordinate is the
Gaussian mechanism with noise multiplier σ: one ledger event ``(σ, q = 1, steps = 1)``,
composed by the same accountant as DP-SGD. Loss, AUROC and the patient count are computed
from the noisy sums only (post-processing keeps the guarantee), so a model the server
crafted to read labels through the metrics learns them only through that noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 10  # equal-width bins of the predicted probability
LOSS_CLIP = 4.0  # per-patient mean BCE is clipped to [0, LOSS_CLIP] (chance is log 2 ≈ 0.69)
LOGIT_CLIP = 50.0  # every logit is mapped into [-50, 50] first (NaN -> 0): a crafted model cannot make a
# loss or a bin non-finite, so nothing about one patient changes whether the release succeeds
SENSITIVITY = float(np.sqrt(2.0))


@dataclass(frozen=True)
class NoisyMetrics:
    """What a metered evaluation releases (all derived from the noisy sums)."""

    loss: float
    auroc: float | None
    patients: float  # the noisy patient count (the weight of this site's metrics)


def bounded_logits(logits: np.ndarray) -> np.ndarray:
    """Per image: NaN -> 0, then clipped to ±``LOGIT_CLIP`` (a function of that image's score only)."""
    return np.clip(np.nan_to_num(np.asarray(logits, dtype=np.float64), nan=0.0, posinf=LOGIT_CLIP,
                                 neginf=-LOGIT_CLIP), -LOGIT_CLIP, LOGIT_CLIP)


def patient_sums(logits: np.ndarray, labels: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """The exact summed vector ``[negatives histogram (BINS), positives histogram (BINS), loss]``.

    ``logits`` and ``labels`` (0/1) are per image; ``groups`` lists each patient's image
    indices. Each patient's contribution has L2 norm at most √2, whatever the logits.
    """
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("validation labels must be 0 or 1")
    z = bounded_logits(logits)
    probabilities = 1.0 / (1.0 + np.exp(-z))
    losses = np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))  # BCE with logits, finite here
    total = np.zeros(2 * BINS + 1)
    bins = np.minimum((np.clip(probabilities, 0.0, 1.0) * BINS).astype(np.int64), BINS - 1)
    for group in groups:
        if len(group) == 0:
            continue
        w = 1.0 / len(group)
        np.add.at(total, labels[group].astype(np.int64) * BINS + bins[group], w)
        total[-1] += min(float(np.mean(losses[group])), LOSS_CLIP) / LOSS_CLIP
    return total


def release(sums: np.ndarray, *, noise_multiplier: float, rng: np.random.Generator, parts: int = 1) -> NoisyMetrics:
    """Add the Gaussian noise and derive loss, AUROC and count from the noisy sums only.

    ``parts``: the release is one of ``parts`` vectors of the same patients (one per finding of a
    multi-label task). Their concatenation moves by at most √2·√parts per patient, so each gets
    noise σ·√2·√parts: together they are one Gaussian mechanism with noise multiplier σ, the
    same single ledger event as a binary release."""
    noisy = sums + rng.normal(0.0, noise_multiplier * SENSITIVITY * np.sqrt(parts), size=sums.shape)
    neg, pos = np.clip(noisy[:BINS], 0.0, None), np.clip(noisy[BINS:2 * BINS], 0.0, None)
    count = float(neg.sum() + pos.sum())
    loss = LOSS_CLIP * float(np.clip(noisy[-1], 0.0, None)) / max(count, 1.0)
    return NoisyMetrics(loss=min(loss, LOSS_CLIP), auroc=binned_auroc(neg, pos), patients=count)


def binned_auroc(neg: np.ndarray, pos: np.ndarray) -> float | None:
    """AUROC of two score histograms over the same ordered bins (ties within a bin count half)."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos <= 0 or n_neg <= 0:
        return None
    below = np.cumsum(neg) - neg
    return float(np.clip((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg), 0.0, 1.0))
