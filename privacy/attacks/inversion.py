"""Gradient inversion (Geiping et al., NeurIPS 2020, "Inverting Gradients"): how much of a training
image the server could rebuild from one site's update.

The update is computed at the site by the product's own training code (``client.inversion_at_site``,
Opacus DP-SGD) for one local SGD step: ``update = new_weights - global_weights``. With SGD (momentum
0.9) the first step is ``-lr * gradient``, so ``-update`` points along the batch's gradient. The
attack optimises a dummy image ``x`` (a sigmoid keeps it in [0, 1]) so that its gradient has the same
direction as ``-update`` (cosine distance over the trained parameters) plus a total-variation prior,
with Adam on signed gradients and a step-decay schedule.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from privacy.files import atomic_write_bytes


@dataclass(frozen=True)
class DpSetting:
    """The DP-SGD noise a site trains with: Gaussian noise ``noise_multiplier * max_grad_norm``
    on the sum of per-patient gradients clipped to ``max_grad_norm``."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class InversionResult:
    """The best reconstruction over the restarts (shape of one input image, float32 in [0, 1]), its
    final objective (``1 - cosine + tv_weight * TV``), the label it was attacked with, each restart's
    objective and the seconds the attack took."""

    image: np.ndarray
    objective: float
    label: int
    objectives: tuple[float, ...]
    seconds: float


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _infer_label(params: Sequence[tuple[str, nn.Parameter]], update: Mapping[str, np.ndarray]) -> int | None:
    """The binary label from the sign of the output bias' update (the last one-element parameter):
    d BCE / d bias = sigmoid(logit) - y is negative for y = 1, so the first SGD step is positive.
    ``None`` when the network has no one-element parameter (then both labels are tried)."""
    for name, p in reversed(params):
        if p.numel() == 1:
            return int(float(np.asarray(update[name]).reshape(())) > 0)
    return None


def _attack(model: nn.Module, params: list[nn.Parameter], target: torch.Tensor, *, shape: tuple[int, ...],
            label: int, iterations: int, tv_weight: float, lr: float, init_scale: float,
            generator: torch.Generator) -> tuple[np.ndarray, float]:
    device = target.device
    z = (init_scale * torch.randn((1, *shape), generator=generator)).to(device).requires_grad_(True)
    y = torch.full((1,), float(label), device=device)
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam([z], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    target_norm = target.norm()

    def objective() -> torch.Tensor:
        x = torch.sigmoid(z)
        inputs = x if len(shape) == 3 else x[:, None]
        loss = loss_fn(model(inputs).reshape(1), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = torch.cat([t.reshape(-1) for t in grads])
        cosine = (g @ target) / (g.norm() * target_norm + 1e-12)
        return 1.0 - cosine + tv_weight * _total_variation(x)

    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        value = objective()
        (z.grad,) = torch.autograd.grad(value, [z])
        z.grad.sign_()
        optimizer.step()
        schedule.step()
    final = float(objective().detach())
    return torch.sigmoid(z).detach().cpu().numpy()[0].astype(np.float32), final


def invert(
    model: nn.Module, update: Mapping[str, np.ndarray], *, shape: tuple[int, ...], label: int | None = None,
    iterations: int = 400, tv_weight: float = 0.05, lr: float = 0.1, restarts: int = 1, init_scale: float = 0.1,
    seed: int = 0,
) -> InversionResult:
    """Geiping's attack: the image whose gradient best matches the update's direction.

    Parameters
    ----------
    model
        The global model the update was computed from (not changed).
    update
        ``new - old`` weights, as :func:`site_update` returns; only parameters that require grad
        and appear in it are matched.
    shape
        One input image: ``(S, S)`` or ``(C, S, S)``.
    label
        The image's binary label; ``None``: inferred from the output bias' update, or, for a network
        without a one-element bias, both labels are tried and the lower objective kept.
    iterations, tv_weight, lr
        Adam steps on the signed gradient (learning rate ``lr``, divided by 10 at 3/8, 5/8 and 7/8 of
        them) and the weight of the total-variation prior.
    restarts, init_scale, seed
        Independent random starts per label (the lowest objective wins), the spread of their logits
        (``x = sigmoid(z)``, ``z ~ N(0, init_scale^2)``: a start near grey) and their seed.

    Returns
    -------
    InversionResult
    """
    started = time.perf_counter()
    attacked = copy.deepcopy(model).train()
    named = [(n, p) for n, p in attacked.named_parameters() if p.requires_grad and n in update]
    if not named:
        raise ValueError("the update holds none of the model's trainable parameters")
    device = _device(attacked)
    target = torch.cat([-torch.as_tensor(np.asarray(update[n]), dtype=torch.float32).reshape(-1) for n, _ in named])
    target = target.to(device)
    params = [p for _, p in named]
    inferred = _infer_label(named, update) if label is None else int(label)
    labels = (0, 1) if inferred is None else (inferred,)
    generator = torch.Generator().manual_seed(seed)
    runs = [(_attack(attacked, params, target, shape=tuple(shape), label=y, iterations=iterations, tv_weight=tv_weight,
                     lr=lr, init_scale=init_scale, generator=generator), y) for y in labels for _ in range(restarts)]
    (image, objective), best_label = min(runs, key=lambda r: r[0][1])
    return InversionResult(image=image, objective=objective, label=best_label,
                           objectives=tuple(r[0][1] for r in runs), seconds=time.perf_counter() - started)


def _channel_axis(image: np.ndarray) -> int | None:
    return 0 if image.ndim == 3 else None


def psnr(true: np.ndarray, recon: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (images in [0, 1]); ``inf`` for identical images."""
    return float(peak_signal_noise_ratio(np.asarray(true, np.float64), np.asarray(recon, np.float64), data_range=1.0))


def ssim(true: np.ndarray, recon: np.ndarray) -> float:
    """Structural similarity (images in [0, 1]; ``(C, S, S)``: mean over channels)."""
    true = np.asarray(true, np.float64)
    return float(structural_similarity(true, np.asarray(recon, np.float64), data_range=1.0,
                                       channel_axis=_channel_axis(true)))


def best_match_ssim(trues: Sequence[np.ndarray] | np.ndarray, recon: np.ndarray) -> float:
    """The highest SSIM of ``recon`` to any of ``trues`` (an aggregate's attacker is credited with
    resembling any one of the aggregated images)."""
    return max(ssim(t, recon) for t in trues)


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float64)
    image = image.mean(axis=0) if image.ndim == 3 else image
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def save_grid(path: Path, originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], *,
              pad: int = 2) -> None:
    """Write a grayscale PNG grid atomically: one row per pair, original | reconstruction, separated by
    ``pad`` white pixels; ``n`` pairs of ``S x S`` images give ``n*S + (n-1)*pad`` by ``2*S + pad``
    pixels (channels are averaged)."""
    from PIL import Image

    if len(originals) != len(reconstructions) or not originals:
        raise ValueError("save_grid needs as many reconstructions as originals, at least one")
    size = _gray(originals[0]).shape[0]
    rows = len(originals)
    grid = np.full((rows * size + (rows - 1) * pad, 2 * size + pad), 255, dtype=np.uint8)
    for i, (a, b) in enumerate(zip(originals, reconstructions, strict=True)):
        top = i * (size + pad)
        grid[top : top + size, :size] = _gray(a)
        grid[top : top + size, size + pad :] = _gray(b)
    buffer = io.BytesIO()
    Image.fromarray(grid, mode="L").save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def scores(trues: np.ndarray, recon: InversionResult) -> dict[str, float]:
    """SSIM and PSNR of ``recon`` to the best matching of ``trues``, the attack's objective and seconds."""
    return {"ssim": best_match_ssim(trues, recon.image), "psnr": max(psnr(t, recon.image) for t in trues),
            "objective": recon.objective, "seconds": recon.seconds}
