"""DP-SGD accounting and calibration as pure functions of (σ, q, steps) events (Opacus)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class GaussianSteps:
    """``steps`` Poisson-subsampled Gaussian mechanism steps (like dp_accounting events)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class BudgetExhausted(Exception):
    """The remaining budget cannot pay for the requested training within the site policy."""


def _accountant(name: str, events: Sequence[GaussianSteps]) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    acc: IAccountant = RDPAccountant() if name == "rdp" else PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0]
    return acc


def epsilon(events: Sequence[GaussianSteps], *, delta: float, accountant: str = "rdp") -> float:
    """ε of the composition of ``events`` at ``delta`` (0 for no events)."""
    if not any(e.steps > 0 for e in events):
        return 0.0
    return float(_accountant(accountant, events).get_epsilon(delta=delta))


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    prior: Sequence[GaussianSteps] = (), accountant: str = "rdp",
    max_noise_multiplier: float = 50.0, tolerance: float = 0.01,
) -> float:
    """Smallest σ such that ``prior`` plus ``steps`` new steps at (σ, q) stay within ``target_epsilon``.

    Raises
    ------
    BudgetExhausted
        When even ``max_noise_multiplier`` would exceed the target (the budget that
        remains cannot pay for the plan within the site's policy).
    """
    def eps_at(sigma: float) -> float:
        return epsilon([*prior, GaussianSteps(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    if eps_at(max_noise_multiplier) > target_epsilon:
        spent = epsilon(prior, delta=delta, accountant=accountant)
        raise BudgetExhausted(
            f"ε spent {spent:.3f} of {target_epsilon:.3f}: {steps} more steps at q={sample_rate:.4f} "
            f"would exceed the budget even at the policy's maximum noise multiplier {max_noise_multiplier}"
        )
    lo, hi = 0.0, max_noise_multiplier
    while hi - lo > tolerance * hi:  # bisection: hi always satisfies the target
        mid = (lo + hi) / 2
        if mid > 0 and eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def auto_delta(patients: int) -> float:
    """Default δ, well below 1/patients: the largest power of ten ≤ 1/(10·patients), at most 1e-5."""
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10.0 * max(patients, 1)))))


class UnsupportedModelError(ValueError):
    """The model has layers DP-SGD cannot handle (e.g. BatchNorm mixes patients in a batch)."""


def make_private(*, module: Any, optimizer: Any, data_loader: Any, noise_multiplier: float, max_grad_norm: float,
                 grad_sample_mode: str = "hooks") -> tuple[Any, Any, Any]:
    """Wrap model, optimizer and loader with Opacus DP-SGD (Poisson sampling, per-sample clipping).

    Raises
    ------
    UnsupportedModelError
        Naming each unsupported layer and the fix, before anything is trained.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(module, strict=False)
    if problems:
        detail = "; ".join(str(p) for p in problems)
        raise UnsupportedModelError(
            f"model cannot be trained with DP-SGD: {detail}. Fix: replace BatchNorm with "
            "GroupNorm (opacus.validators.ModuleValidator.fix does this) and avoid layers "
            "that mix samples"
        )
    dp_loader = DPDataLoader.from_data_loader(data_loader, distributed=False)
    gs_module = GradSampleModule(module, batch_first=True, loss_reduction="mean",
                                 force_functorch=grad_sample_mode == "functorch")
    expected = max(1, round(len(data_loader.dataset) * dp_loader.sample_rate))
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=expected, loss_reduction="mean")
    return gs_module, dp_optimizer, dp_loader
