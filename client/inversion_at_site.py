"""Gradient inversion at the site: what a server could rebuild of a patient's image from the
update this site would send (plain, with the site's DP, and inside a secure aggregate).

The updates are computed by the site's real training code (``client.train``: one local SGD
step at batch 1, DP-SGD through Opacus with the site's own σ and clipping); the attack itself is
``privacy.attacks.inversion``. The image grid is written in the site's workspace only.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.config import SiteConfig
from client.dicom.cohort import Cohort
from client.models import get_arrays
from client.run_task import RunTask
from client.site import SiteData
from client.site_ledger import open_ledger
from client.train import LocalPlan, train_plain, train_private
from privacy.attacks.inversion import DpSetting, InversionResult, best_match_ssim, invert, save_grid, scores, ssim

AGGREGATE_OF = 5
REFERENCE = 10
DEFAULT_ITERATIONS = 400
DP_FALLBACK_SIGMA = 1.0  # a site that trained without DP: what σ = 1 would have done


def inversion(config: SiteConfig, task: RunTask, final: dict[str, np.ndarray], data: SiteData, *, iterations: int,
              grid: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Attack one training patient's image of ``data`` (and, for the aggregate, four more patients'
    beside it) through the final global model; numbers in the result, the grid at ``grid``."""
    train = data.train
    if train.n_patients < AGGREGATE_OF:
        raise ValueError(f"gradient inversion needs {AGGREGATE_OF} training patients at {config.name}; it has "
                         f"{train.n_patients}")
    groups = train.patient_images()
    # the target, four more for the aggregate, and up to REFERENCE others: what any patient's image scores
    chosen = rng.choice(train.n_patients, size=min(train.n_patients, AGGREGATE_OF + REFERENCE), replace=False)
    rows = [int(groups[p][0]) for p in chosen]
    images, labels = train.images[rows], train.labels[rows]
    sigma = _site_sigma(config)
    dp = DpSetting(noise_multiplier=sigma, max_grad_norm=config.privacy.max_grad_norm)
    model = task.network(final, factories=config.models.factories).to(torch.device("cpu"))
    n = iterations or DEFAULT_ITERATIONS
    found = run_inversion(model, images, labels, learning_rate=task.learning_rate, dp=dp, aggregate_of=AGGREGATE_OF,
                          seed=int(rng.integers(2**31)), iterations=n, grid=grid)

    def scored(case: str, **extra: float | int) -> dict[str, float | int]:
        return {"ssim": float(found[case]["ssim"]), "psnr": float(min(found[case]["psnr"], 99.0)), "batch_size": 1,
                **extra}

    return {"plain": scored("plain"),
            "dp": scored("dp", noise_multiplier=sigma, max_grad_norm=config.privacy.max_grad_norm),
            "aggregate": scored("aggregate", sites=AGGREGATE_OF), "iterations": n, "image_size": task.image_size,
            **({"reference": {k: found["reference"][k] for k in ("ssim", "median_ssim", "images")}}
               if "reference" in found else {})}


def _site_sigma(config: SiteConfig) -> float:
    """The σ this site trained with last (its ledger), else the fallback for a site without DP."""
    trained = [e for e in open_ledger(config).events if e.kind == "train"]
    return float(trained[-1].noise_multiplier) if trained else DP_FALLBACK_SIGMA


def site_update(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, learning_rate: float,
    dp: DpSetting | None = None, seed: int,
) -> OrderedDict[str, np.ndarray]:
    """The update one site sends after one local SGD step on these patients (one image each).

    Parameters
    ----------
    model
        The global model; it is not changed (a deep copy is trained).
    images
        ``(k, S, S)`` or ``(k, C, S, S)`` float32 in [0, 1]: patient ``i`` has image ``i``.
    labels
        ``(k,)`` 0/1.
    learning_rate
        The SGD learning rate of :class:`client.train.LocalPlan` (``optimizer="sgd"``, batch ``k``).
    dp
        ``None``: :func:`client.train.train_plain`; else :func:`client.train.train_private` (Poisson
        sampling at rate 1, per-patient clipping, Gaussian noise seeded by ``seed``).
    seed
        The plan's seed (sampling) and the DP noise seed.

    Returns
    -------
    OrderedDict
        ``state_dict`` name -> ``new - old`` (float arrays; buffers that did not change are zero).
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    k = len(images)
    cohort = Cohort(images, np.asarray(labels, dtype=np.float32).reshape(k), np.arange(k, dtype=np.int64), k)
    plan = LocalPlan(steps=1, batch_size=k, learning_rate=learning_rate, seed=seed, optimizer="sgd")
    local = copy.deepcopy(model).train()  # Opacus wraps training-mode modules only (run_steps trains in it anyway)
    device = next(model.parameters()).device
    if dp is None:
        train_plain(local, cohort, plan, device)
    else:
        train_private(local, cohort, plan, device, noise_multiplier=dp.noise_multiplier,
                      max_grad_norm=dp.max_grad_norm, noise_seed=seed)
    before, after = get_arrays(model), get_arrays(local)
    return OrderedDict((name, after[name] - before[name]) for name in before)


def run_inversion(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, learning_rate: float, dp: DpSetting,
    aggregate_of: int = 5, seed: int, iterations: int, grid: Path | None = None, **attack: Any,
) -> dict[str, dict[str, float | int]]:
    """Attack the same target image (``images[0]``) three ways and score each reconstruction.

    ``plain``: one site's plain update at batch 1; ``dp``: its DP-SGD update (``dp``); ``aggregate``:
    the sum of ``aggregate_of`` one-patient plain updates (``images[:aggregate_of]``, one site each; the
    secure aggregate equals that sum up to quantisation) attacked as one image, scored against the best
    match among those images. Further keywords go to :func:`invert` (``tv_weight``, ``lr``, ``restarts``).

    Returns
    -------
    dict
        Numbers only: ``{"plain": {"ssim", "psnr", "objective", "seconds"}, "dp": {...}, "aggregate":
        {..., "ssim_target", "sites"}}`` and, when there are images beyond the aggregate's, ``"reference"``: the
        best and median SSIM of the target to those other patients' images (the score of an attack that
        learns nothing about the target). The reconstructions go to the PNG ``grid`` (target | reconstruction per
        case: plain, dp, aggregate) when it is given.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    if len(images) < aggregate_of:
        raise ValueError(f"run_inversion needs at least aggregate_of = {aggregate_of} images, got {len(images)}")
    shape = tuple(images.shape[1:])
    target = images[:1]

    def attack_of(update: Mapping[str, np.ndarray]) -> InversionResult:
        return invert(model, update, shape=shape, iterations=iterations, seed=seed, **attack)

    plain = attack_of(site_update(model, target, labels[:1], learning_rate=learning_rate, seed=seed))
    private = attack_of(site_update(model, target, labels[:1], learning_rate=learning_rate, dp=dp, seed=seed))
    updates = [site_update(model, images[i : i + 1], labels[i : i + 1], learning_rate=learning_rate, seed=seed + i)
               for i in range(aggregate_of)]
    summed = OrderedDict((k, np.sum([u[k] for u in updates], axis=0)) for k in updates[0])
    aggregate = attack_of(summed)
    if grid is not None:
        save_grid(grid, [images[0]] * 3, [plain.image, private.image, aggregate.image])
    numbers: dict[str, dict[str, float | int]] = {
        "plain": scores(target, plain), "dp": scores(target, private),
        "aggregate": {**scores(images[:aggregate_of], aggregate), "ssim_target": ssim(images[0], aggregate.image),
                      "sites": aggregate_of}}
    others = images[aggregate_of:]
    if len(others):  # what an attacker scores by answering with another patient's image: the data's own similarity
        numbers["reference"] = {"ssim": best_match_ssim(others, images[0]),
                                "median_ssim": float(np.median([ssim(images[0], o) for o in others])), "images": len(others)}
    return numbers
