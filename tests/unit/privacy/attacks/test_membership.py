"""Membership inference scores and their separation: pinned on constructed scores and on a
deliberately overfit toy model (the attack must find its memorised members)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client.dicom.cohort import Cohort
from client.train import LocalPlan, image_losses, logits, train_plain
from privacy.attacks.membership import calibrated_scores, confidence, loss_scores, per_patient, reference_halves
from privacy.attacks.roc import ROC_POINTS, separation


def test_separation_of_perfect_and_of_equal_scores() -> None:
    perfect = separation(np.arange(10, 20), np.arange(10))
    assert (perfect.auroc, perfect.tpr_at_1pct_fpr, perfect.tpr_at_01pct_fpr) == (1.0, 1.0, 1.0)
    assert len(perfect.roc_fpr) == len(perfect.roc_tpr) == ROC_POINTS and perfect.roc_tpr[-1] == 1.0
    rng = np.random.default_rng(0)
    coin = separation(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(coin.auroc - 0.5) < 0.03 and coin.tpr_at_1pct_fpr < 0.03
    inverted = separation(np.arange(10), np.arange(10, 20))
    assert inverted.auroc == 0.0 and inverted.tpr_at_1pct_fpr == 0.0
    with pytest.raises(ValueError, match="val-share"):
        separation(np.arange(3), np.array([]))


def test_tpr_at_low_fpr_never_reads_above_the_fpr() -> None:
    # 100 non-members: one non-member outscores every member, so at FPR 0 no member is found
    members, non = np.full(50, 5.0), np.r_[np.zeros(99), 10.0]
    s = separation(members, non)
    assert s.tpr_at_01pct_fpr == 0.0 and s.tpr_at_1pct_fpr == 1.0


def test_patient_scores_pool_their_images() -> None:
    patient = np.array([0, 0, 1, 2, 2, 2])
    assert per_patient(np.array([1.0, 3.0, 5.0, 0.0, 0.0, 3.0]), patient, 3).tolist() == [2.0, 5.0, 1.0]
    assert loss_scores(np.array([1.0, 3.0, 5.0, 0.0, 0.0, 3.0]), patient, 3).tolist() == [-2.0, -5.0, -1.0]
    assert confidence(np.array([2.0, 2.0]), np.array([1.0, 0.0])).tolist() == [2.0, -2.0]


def test_calibration_removes_patient_difficulty() -> None:
    """Patients differ in how easy they are far more than membership moves them: the loss attack is
    near a coin, the calibrated attack (reference models that left each patient out) sees membership."""
    rng = np.random.default_rng(1)
    p = 400
    difficulty = rng.normal(0, 3.0, size=p)
    member = np.arange(p) < p // 2
    target = difficulty + 0.8 * member + rng.normal(0, 0.2, size=p)
    refs = [difficulty + rng.normal(0, 0.2, size=p) for _ in range(4)]
    out = np.ones((4, p), bool)
    out[:2, p // 2 : p // 2 + 50] = False  # some non-members were in two reference models: ignored for them
    refs[0][p // 2 : p // 2 + 50] += 5.0
    refs[1][p // 2 : p // 2 + 50] += 5.0
    plain = separation(target[member], target[~member]).auroc
    calibrated = calibrated_scores(target, refs, out)
    cal = separation(calibrated[member], calibrated[~member]).auroc
    assert plain < 0.65 and cal > 0.95
    with pytest.raises(ValueError, match="every reference model"):
        calibrated_scores(target, refs, np.zeros((4, p), bool))


def test_reference_halves_leave_every_patient_out_of_half_the_models() -> None:
    mask = reference_halves(11, 4, np.random.default_rng(0))
    assert mask.shape == (4, 11) and ((~mask).sum(axis=0) >= 2).all()
    assert mask.sum(axis=1).tolist() == [5, 6, 5, 6]


def _noise_cohort(n: int, seed: int) -> Cohort:
    rng = np.random.default_rng(seed)
    return Cohort(rng.uniform(size=(n, 8, 8)).astype(np.float32), rng.integers(0, 2, n).astype(np.float32),
                  np.arange(n, dtype=np.int64), n)


def test_the_loss_attack_finds_the_members_of_an_overfit_toy_model() -> None:
    """Random images with random labels: a model can only fit the members by memorising them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1), nn.Flatten(0))
    members, non = _noise_cohort(40, 1), _noise_cohort(40, 2)
    train_plain(model, members, LocalPlan(steps=300, batch_size=40, learning_rate=0.01, seed=0), torch.device("cpu"))
    cpu = torch.device("cpu")
    sm = loss_scores(image_losses(logits(model, members, cpu), members.labels), members.patient, 40)
    sn = loss_scores(image_losses(logits(model, non, cpu), non.labels), non.patient, 40)
    s = separation(sm, sn)
    # members are fitted (loss ~0); a non-member's confident random guess is right half the time,
    # so a loss threshold cannot reach 1.0 here
    assert -sm.mean() < 0.05 < 1.0 < -sn.mean()
    assert s.auroc > 0.75
