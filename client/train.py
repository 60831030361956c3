"""Local training and evaluation at a site: one sampled record = one patient."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.dicom.cohort import Cohort
from privacy.dp import make_private


@dataclass(frozen=True)
class LocalPlan:
    """What one round of local training does."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    optimizer: str = "adam"

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam, or SGD with momentum 0.9 (``optimizer = "sgd"``)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.learning_rate, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=self.learning_rate)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training (numbers only); ``seconds`` and ``peak_mib`` (training memory:
    CUDA's peak allocation, or on CPU the process' peak resident size) stay in the site's log."""

    train_loss: float
    num_examples: int
    steps: int
    seconds: float = 0.0
    peak_mib: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.num_examples / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Validation numbers on the site's own held-out patients (multi-label: ``auroc`` is the macro
    AUROC over the findings that have both classes, ``findings_auroc`` each finding's)."""

    loss: float
    auroc: float | None
    num_examples: int
    findings_auroc: tuple[float | None, ...] = ()


class PatientImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Index = patient. Each access draws one of that patient's images (seeded).

    Sampling one image per patient per step bounds every patient's contribution to a
    step by one example, however many images the patient has (the DP unit is the patient).
    """

    def __init__(self, cohort: Cohort, *, seed: int) -> None:
        self.images = torch.from_numpy(cohort.images)
        self.labels = torch.from_numpy(cohort.labels)
        self.groups = cohort.patient_images()
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.groups[index]
        j = int(group[self.rng.integers(len(group))])
        image = self.images[j]
        return (image[None] if image.dim() == 2 else image), self.labels[j]  # (1, S, S) or (C, S, S)


def patient_loader(cohort: Cohort, *, batch_size: int, seed: int, device: torch.device | None = None) -> DataLoader:
    """Shuffled batches of patients (DP replaces this with Poisson sampling). The images are in
    memory already, so no worker processes; batches bound for a GPU are pinned (asynchronous copies)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(PatientImages(cohort, seed=seed), batch_size=min(batch_size, cohort.n_patients),
                      shuffle=True, generator=gen, pin_memory=device is not None and device.type == "cuda")


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def run_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, steps: int,
    device: torch.device, summed: bool = False,
) -> TrainResult:
    """Run ``steps`` optimizer steps over ``loader`` (cycled); mean loss over examples.

    ``summed``: backpropagate the batch's summed loss (what :func:`privacy.dp.make_private`
    expects; its optimizer divides by the expected batch size).
    """
    model.train()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum" if summed else "mean")
    total, count = 0.0, 0
    batches = _cycle(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        if len(y) == 0 and not summed:  # a plain step on nothing: skip it
            continue
        # DP (summed): Poisson sampling can draw an empty batch; the step still counts and its noise is still
        # added. Not every network runs on zero samples (MONAI's ResNet flattens with view(0, -1)), so an empty
        # batch runs as one blank image whose loss is multiplied by 0: its per-sample gradient is exactly zero,
        # the clipped sum is the empty sum, and the step adds the noise alone
        weight = 1.0
        if len(y) == 0:
            x, y, weight = x.new_zeros((1, *x.shape[1:])), y.new_zeros((1, *y.shape[1:])), 0.0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = weight * loss_fn(model(x).reshape(y.shape), y)  # a network's (B, 1) logits are the binary (B,)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * (1 if summed else len(y))
        count += len(y) if weight else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return TrainResult(train_loss=total / max(count, 1), num_examples=count, steps=steps,
                       seconds=time.perf_counter() - started, peak_mib=peak)


def train_plain(model: nn.Module, cohort: Cohort, plan: LocalPlan, device: torch.device) -> TrainResult:
    """Non-private local SGD (for ``--no-dp`` comparisons and benchmarks)."""
    model.to(device)
    optimizer = plan.make_optimizer(model)
    loader = patient_loader(cohort, batch_size=plan.batch_size, seed=plan.seed, device=device)
    return run_steps(model, optimizer, loader, steps=plan.steps, device=device)


def train_private(
    model: nn.Module, cohort: Cohort, plan: LocalPlan, device: torch.device, *,
    noise_multiplier: float, max_grad_norm: float, noise_seed: int, secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
) -> TrainResult:
    """DP-SGD (Opacus): Poisson sampling over patients, per-patient clipping, Gaussian noise.

    Sampling (and each sampled patient's image) draws from ``plan.seed``, the noise from its
    own generator on ``device`` seeded with ``noise_seed``; nothing touches torch's global
    generator, so no other code's seeding can make the noise predictable.
    """
    model.to(device)
    optimizer = plan.make_optimizer(model)
    loader = patient_loader(cohort, batch_size=plan.batch_size, seed=plan.seed, device=device)
    noise = torch.Generator(device=device)
    noise.manual_seed(noise_seed)
    dp_model, dp_optimizer, dp_loader = make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, noise_generator=noise, secure_mode=secure_mode, grad_sample_mode=grad_sample_mode,
    )
    result = run_steps(dp_model, dp_optimizer, dp_loader, steps=plan.steps, device=device, summed=True)
    dp_model.to_standard_module()  # Opacus removes its hooks; the caller's module is trained in place
    return result


@torch.no_grad()
def logits(model: nn.Module, cohort: Cohort, device: torch.device, *, batch: int = 256) -> np.ndarray:
    """The model's logits for every image of ``cohort`` (float64): shape (N,), or (N, findings)."""
    model.to(device).eval()
    def inputs(i: int) -> torch.Tensor:
        x = torch.from_numpy(cohort.images[i : i + batch])
        return (x[:, None] if x.dim() == 3 else x).to(device)

    out = [model(inputs(i)).cpu().numpy() for i in range(0, len(cohort.labels), batch)]
    shape = cohort.labels.shape
    return np.concatenate(out).astype(np.float64).reshape(shape) if out else np.zeros(shape)


def image_losses(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each logit against its 0/1 label (numerically stable)."""
    return np.maximum(scores, 0) - scores * labels + np.log1p(np.exp(-np.abs(scores)))


def evaluate(model: nn.Module, cohort: Cohort, device: torch.device, *, batch: int = 256) -> EvalResult:
    """Mean BCE loss and AUROC over every image of the given (validation) patients (exact)."""
    n = len(cohort.labels)
    if n == 0:
        return EvalResult(loss=math.nan, auroc=None, num_examples=0)
    s = logits(model, cohort, device, batch=batch)
    loss = float(image_losses(s, cohort.labels).mean())
    if cohort.labels.ndim == 1:
        return EvalResult(loss=loss, auroc=_auroc(cohort.labels, s), num_examples=n)
    per = tuple(_auroc(cohort.labels[:, j], s[:, j]) for j in range(cohort.labels.shape[1]))
    return EvalResult(loss=loss, auroc=macro(per), num_examples=n, findings_auroc=per)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def macro(values: tuple[float | None, ...]) -> float | None:
    """The mean of the findings' AUROCs that exist (a finding with one class in the data has none)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None
