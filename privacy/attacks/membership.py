"""Patient-level membership inference scores: the loss attack and a calibrated attack in the
style of LiRA offline (Carlini et al. 2022) / RMIA (Zarifzadeh et al. 2024).

The unit is the patient, as in the site's DP guarantee: a patient's score pools all of their
images. Higher score = more likely a member.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-6


def per_patient(values: np.ndarray, patient: np.ndarray, n_patients: int) -> np.ndarray:
    """The mean of per-image ``values`` (over findings too, for a multi-label task) per patient."""
    v = np.asarray(values, float)
    v = v.reshape(len(v), -1).mean(axis=1)
    sums = np.bincount(patient, weights=v, minlength=n_patients)
    counts = np.bincount(patient, minlength=n_patients)
    if (counts == 0).any():
        raise ValueError("a patient has no image: the cohort is malformed")
    return sums / counts


def loss_scores(image_losses: np.ndarray, patient: np.ndarray, n_patients: int) -> np.ndarray:
    """Yeom et al. 2018: members have lower loss. Score = minus the patient's mean loss."""
    return -per_patient(image_losses, patient, n_patients)


def confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's logit-scaled confidence in the true label, per image: log(p / (1 - p)) of the
    probability the model gives the true label. For a sigmoid output that is ``±logit`` (the sign
    of the label), which is exactly Gaussian-friendly: no clipping needed."""
    z = np.asarray(logits, float)
    y = np.asarray(labels, float)
    return np.where(y > 0.5, z, -z)


def calibrated_scores(target: np.ndarray, reference: Sequence[np.ndarray], reference_out: np.ndarray) -> np.ndarray:
    """LiRA offline with a global variance: how far above what reference models that did NOT train
    on a patient give that patient the target model's confidence lies, in standard deviations.

    ``target``: (P,) the final model's patient confidence; ``reference``: K arrays (P,), the same
    for K reference models; ``reference_out``: (K, P) bool, True where reference model k did not
    train on patient p. Each patient needs at least one reference model that left it out.
    Calibration removes what makes a patient easy or hard for any model, which the loss attack
    confuses with membership. Each model's confidences are first standardised over the patients
    scored: reference models train on fewer patients than the federation's model and are far more
    confident, and only the ranking within a model carries over.
    """
    ref = np.stack([standardised(r) for r in reference])  # (K, P)
    out = np.asarray(reference_out, bool)
    if ref.shape != out.shape or ref.shape[1] != len(target):
        raise ValueError(f"reference scores {ref.shape} and their out-mask {out.shape} must be (K, {len(target)})")
    n_out = out.sum(axis=0)
    if (n_out == 0).any():
        raise ValueError(f"{int((n_out == 0).sum())} patient(s) are in every reference model's training set: "
                         "train more reference models (or on smaller halves)")
    mean = np.where(out, ref, 0.0).sum(axis=0) / n_out
    resid = np.where(out, ref - mean, 0.0)
    dof = max(int(out.sum()) - out.shape[1], 1)
    sd = float(np.sqrt((resid**2).sum() / dof)) + EPS  # one variance for all patients (few reference models)
    return (standardised(target) - mean) / sd


def standardised(values: np.ndarray) -> np.ndarray:
    """``values`` shifted and scaled to mean 0 and standard deviation 1 (constant: all 0)."""
    v = np.asarray(values, float)
    sd = float(v.std())
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def reference_halves(n: int, models: int, rng: np.random.Generator) -> np.ndarray:
    """(models, n) bool: which of ``n`` held-out patients each reference model trains on. Every model
    takes a random half; the halves come in complementary pairs, so every patient is left out by
    at least half of the models (an odd last model draws a fresh half)."""
    mask = np.zeros((models, n), bool)
    for k in range(0, models, 2):
        perm = rng.permutation(n)
        mask[k, perm[: n // 2]] = True
        if k + 1 < models:
            mask[k + 1, perm[n // 2 :]] = True
    return mask
