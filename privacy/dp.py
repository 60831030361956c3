"""DP-SGD accounting and calibration as pure functions of (σ, q, steps) events (Opacus)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

from privacy.errors import InputError, RefusedError

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class GaussianSteps:
    """``steps`` Poisson-subsampled Gaussian mechanism steps (like dp_accounting events)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class BudgetExhausted(RefusedError):
    """The remaining budget cannot pay for the requested training within the site policy."""


def _require_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")


def _accountant(name: str, events: Sequence[GaussianSteps]) -> IAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant  # imported on first use: opacus takes ~2 s

    _require_accountant(name)
    acc: IAccountant = RDPAccountant() if name == "rdp" else PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0]
    return acc


@functools.cache
def _orders() -> tuple[float, ...]:
    """Opacus' RDP orders (opacus is imported on first use: a process that never accounts, such as a
    run without DP, does not pay its import)."""
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.cache
def _integer_orders() -> tuple[float, ...]:
    return tuple(a for a in _orders() if float(a).is_integer())


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one subsampled Gaussian step at each order (Opacus' ``compute_rdp`` with steps=1).

    Opacus computes ``steps`` steps as this vector times ``steps``, so caching it per (q, σ)
    gives bit-identical results while every ledger event and candidate σ costs one
    computation instead of one per call.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))
    rdp.setflags(write=False)
    return rdp


def _rdp_total(events: Sequence[GaussianSteps], orders: tuple[float, ...]) -> np.ndarray | int:
    # summed in history order, exactly as RDPAccountant.get_privacy_spent does
    return sum([_rdp_per_step(e.sample_rate, e.noise_multiplier, orders) * e.steps for e in events if e.steps > 0])


def _rdp_spent(rdp: np.ndarray, delta: float, orders: tuple[float, ...], *, quiet: bool = True) -> tuple[float, float]:
    """(ε, best order). ``quiet``: over a subset of Opacus' orders the optimum may sit at the
    subset's edge, and Opacus' warning about that is noise there."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        eps, alpha = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps), float(alpha)


def _rdp_curve(prior: Sequence[GaussianSteps], sample_rate: float, steps: int, delta: float,
               orders: tuple[float, ...]) -> Callable[[float], tuple[float, float]]:
    """σ -> (ε, best order) of ``prior`` plus ``steps`` steps at (σ, q), over ``orders`` only.

    Over a subset of Opacus' orders ε is never smaller than over all of them.
    """
    base = _rdp_total(prior, orders)

    def curve(sigma: float) -> tuple[float, float]:
        return _rdp_spent(base + _rdp_per_step(sample_rate, sigma, orders) * steps, delta, orders)

    return curve


def epsilon(events: Sequence[GaussianSteps], *, delta: float, accountant: str = "rdp") -> float:
    """ε of the composition of ``events`` at ``delta`` (0 for no events).

    RDP: the same value Opacus' ``RDPAccountant(history=events).get_epsilon(delta)`` gives.
    """
    if not any(e.steps > 0 for e in events):
        return 0.0
    if accountant == "rdp":
        return _rdp_spent(_rdp_total(events, _orders()), delta, _orders(), quiet=False)[0]
    return float(_accountant(accountant, events).get_epsilon(delta=delta))


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    prior: Sequence[GaussianSteps] = (), accountant: str = "rdp",
    max_noise_multiplier: float = 50.0, tolerance: float = 0.01,
) -> float:
    """Smallest σ (within ``tolerance``, relative) such that ``prior`` plus ``steps`` new steps
    at (σ, q) stay within ``target_epsilon``, by the same exact ε as :func:`epsilon`.

    For RDP, ε over any subset of Opacus' orders is an upper bound on the exact ε, so a σ
    feasible on a subset is feasible. The search runs on the integer orders, then on the
    orders near the optimal one, and ends with one exact evaluation just below the answer
    that shows it is the smallest; two exact evaluations instead of fifteen.

    Raises
    ------
    BudgetExhausted
        When even ``max_noise_multiplier`` would exceed the target (the budget that
        remains cannot pay for the plan within the site's policy).
    """
    _require_accountant(accountant)
    if accountant == "rdp":
        exact = _rdp_curve(prior, sample_rate, steps, delta, _orders())

        def eps_at(sigma: float) -> float:
            return exact(sigma)[0]
    else:
        def eps_at(sigma: float) -> float:
            return epsilon([*prior, GaussianSteps(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    if eps_at(max_noise_multiplier) > target_epsilon:
        spent = epsilon(prior, delta=delta, accountant=accountant)
        raise BudgetExhausted(
            f"ε spent {spent:.3f} of {target_epsilon:.3f}: {steps} more steps at q={sample_rate:.4f} "
            f"would exceed the budget even at the policy's maximum noise multiplier {max_noise_multiplier}"
        )
    if accountant != "rdp":
        return _bisect(eps_at, target_epsilon, 0.0, max_noise_multiplier, tolerance)
    # 1. integer orders only (a 30x cheaper vector): a feasible σ and the optimal order near it
    integer = _rdp_curve(prior, sample_rate, steps, delta, _integer_orders())
    hi = _bisect(lambda s: integer(s)[0], target_epsilon, 0.0, max_noise_multiplier, tolerance / 4)
    alpha = integer(hi)[1]
    # 2. the orders within 1 of it: still an upper bound on ε, and in practice the exact one
    near_curve = _rdp_curve(prior, sample_rate, steps, delta, tuple(a for a in _orders() if abs(a - alpha) <= 1))

    def near(sigma: float) -> float:
        return near_curve(sigma)[0]

    lo = hi
    for _ in range(64):  # walk down until infeasible
        lo *= 0.95
        if lo < 1e-3 or near(lo) > target_epsilon:
            break
        hi = lo
    sigma = _refine(near, target_epsilon, 0.0 if lo < 1e-3 else lo, hi, tolerance / 4)
    # 3. one exact evaluation shows that σ is also the smallest within tolerance under every order
    below = sigma * (1 - tolerance / 2)
    if eps_at(below) > target_epsilon:
        return sigma
    return _refine(eps_at, target_epsilon, 0.0, below, tolerance / 4)  # the optimum moved: exact search


def _bisect(eps_at: Callable[[float], float], target: float, lo: float, hi: float, tolerance: float) -> float:
    """Bisection on σ; ``hi`` is feasible on entry and on return."""
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _refine(eps_at: Callable[[float], float], target: float, lo: float, hi: float, tolerance: float) -> float:
    """Shrink [lo, hi] (hi feasible, lo not) to ``tolerance`` relative width; return hi.

    Each step probes just above and just below the log-log interpolated root, so a
    smooth ε(σ) is bracketed in one step; bisection takes over when interpolation cannot.
    """
    e_lo, e_hi = (math.inf if lo <= 0 else eps_at(lo)), eps_at(hi)
    for _ in range(64):
        if hi - lo <= tolerance * hi:
            break
        probes = [(lo + hi) / 2]
        if lo > 0 and math.isfinite(e_lo) and e_hi > 0 and e_lo > e_hi:
            t = (math.log(e_lo) - math.log(target)) / (math.log(e_lo) - math.log(e_hi))
            root = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
            step = tolerance * hi / 3
            probes = [min(root + step, hi - step), max(root - step, lo + step)]
        for x in probes:
            if not lo < x < hi:
                continue
            e = eps_at(x)
            if e <= target:
                hi, e_hi = x, e
            else:
                lo, e_lo = x, e
    return hi


def auto_delta(patients: int) -> float:
    """Default δ, well below 1/patients: the largest power of ten ≤ 1/(10·patients), at most 1e-5."""
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10.0 * max(patients, 1)))))


class UnsupportedModelError(InputError, ValueError):
    """The model has layers DP-SGD cannot handle (e.g. BatchNorm mixes patients in a batch)."""


def _finite_sample_optimizer() -> type:
    """Opacus' ``DPOptimizer`` whose clipping first zeroes every per-sample gradient that holds a
    non-finite value (built lazily: Opacus loads torch).

    A model the server crafted can make one patient's gradient inf or NaN; Opacus' clipping
    multiplies it by a factor of 0 or NaN, the sum becomes NaN, no noise hides a NaN, and
    whether the update is finite then tells the server something about that patient. A zeroed
    sample contributes nothing; the decision depends on that sample's gradient only, so the
    per-sample sensitivity, and the guarantee, are unchanged. Implemented by overriding the
    public ``clip_and_accumulate`` step and calling Opacus' own.
    """
    import torch
    from opacus.optimizers import DPOptimizer

    class FiniteSampleDPOptimizer(DPOptimizer):
        def clip_and_accumulate(self) -> None:
            samples = self.grad_samples
            if samples and len(samples[0]):
                finite = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
                for g in samples:
                    finite &= torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(finite.device)
                if not bool(finite.all()):
                    for p in self.params:
                        if isinstance(p.grad_sample, list):  # accumulated over several backward passes
                            p.grad_sample = torch.cat(p.grad_sample)
                        p.grad_sample[~finite.to(p.grad_sample.device)] = 0
            super().clip_and_accumulate()

    return FiniteSampleDPOptimizer


def make_private(*, module: Any, optimizer: Any, data_loader: Any, noise_multiplier: float, max_grad_norm: float,
                 noise_generator: Any, secure_mode: bool = False, grad_sample_mode: str = "hooks"
                 ) -> tuple[Any, Any, Any]:
    """Wrap model, optimizer and loader with Opacus DP-SGD (Poisson sampling, per-sample clipping).

    Poisson sampling draws from ``data_loader``'s generator and the noise from
    ``noise_generator`` (a ``torch.Generator`` on the training device, seeded by the site):
    both are required so that DP randomness never comes from torch's global generator.
    ``secure_mode``: Opacus' noise sampling that resists floating-point attacks (four
    Gaussian draws per coordinate instead of one).

    The caller backpropagates the loss **summed** over the batch: each per-sample gradient
    is then the gradient of that record's own loss, with no rescaling pass over every
    layer's backprops (Opacus' ``loss_reduction="mean"`` multiplies them by the batch
    size). The optimizer divides the clipped, noised sum by the expected batch size, so
    the update is the same as with a mean loss.

    Raises
    ------
    UnsupportedModelError
        Naming each unsupported layer and the fix, before anything is trained.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.validators import ModuleValidator

    import privacy.conv_grad_sample  # noqa: F401  (registers the Conv2d per-sample gradient sampler)

    problems = ModuleValidator.validate(module, strict=False)
    if problems:
        detail = "; ".join(str(p) for p in problems)
        raise UnsupportedModelError(
            f"model cannot be trained with DP-SGD: {detail}. Fix: replace BatchNorm with "
            "GroupNorm (opacus.validators.ModuleValidator.fix does this) and avoid layers "
            "that mix samples"
        )
    if data_loader.generator is None or noise_generator is None:
        raise ValueError("make_private needs the site's generators: a seeded data_loader.generator and noise_generator")
    dp_loader = DPDataLoader.from_data_loader(data_loader, distributed=False, generator=data_loader.generator)
    gs_module = GradSampleModule(module, batch_first=True, loss_reduction="sum",
                                 force_functorch=grad_sample_mode == "functorch")
    expected = max(1, round(len(data_loader.dataset) * dp_loader.sample_rate))
    dp_optimizer = _finite_sample_optimizer()(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=expected, loss_reduction="mean", generator=noise_generator,
                               secure_mode=secure_mode)
    return gs_module, dp_optimizer, dp_loader
