"""How well scores separate members from non-members: AUROC, TPR at low FPR, a compact ROC curve."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROC_POINTS = 41  # the curve as it leaves the site: TPR at these evenly spaced FPRs (numbers only)


@dataclass(frozen=True)
class Separation:
    """An attack's power. ``members``/``non_members``: how many patients each side had (the
    resolution of the figures: TPR at 0.1% FPR means nothing below 1000 non-members)."""

    auroc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    members: int
    non_members: int
    roc_fpr: tuple[float, ...]
    roc_tpr: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        return {"auroc": self.auroc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                "tpr_at_01pct_fpr": self.tpr_at_01pct_fpr, "members": self.members,
                "non_members": self.non_members, "roc_fpr": list(self.roc_fpr), "roc_tpr": list(self.roc_tpr)}


def separation(member_scores: np.ndarray, non_member_scores: np.ndarray) -> Separation:
    """Higher score = "member". TPR at a given FPR is the largest TPR any threshold reaches
    without exceeding that FPR (a conservative reading: no interpolation above the FPR)."""
    a, b = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"membership attack needs members and non-members (got {len(a)} and {len(b)} patients): "
                         "raise the site's validation share (simulate --val-share) or its patient count")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("membership scores are not finite: the model's outputs overflow (check the model file)")
    from sklearn.metrics import roc_auc_score, roc_curve  # on first use: scikit-learn takes ~0.7 s to import

    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    s = np.r_[a, b]
    fpr, tpr, _ = roc_curve(y, s)
    grid = np.linspace(0.0, 1.0, ROC_POINTS)
    return Separation(auroc=float(roc_auc_score(y, s)), tpr_at_1pct_fpr=tpr_at(fpr, tpr, 0.01),
                      tpr_at_01pct_fpr=tpr_at(fpr, tpr, 0.001), members=len(a), non_members=len(b),
                      roc_fpr=tuple(float(x) for x in grid),
                      roc_tpr=tuple(tpr_at(fpr, tpr, float(x)) for x in grid))


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR of a threshold whose FPR is at most ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0
