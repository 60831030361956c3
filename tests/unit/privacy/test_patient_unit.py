"""The DP unit is the patient: one record per patient per step, clipped as a whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from client.dicom.cohort import Cohort
from client.models import build_model
from client.train import PatientImages
from privacy.dp import UnsupportedModelError, make_private


def _cohort(images_per_patient: list[int], seed: int = 0) -> Cohort:
    rng = np.random.default_rng(seed)
    n = sum(images_per_patient)
    patient = np.repeat(np.arange(len(images_per_patient)), images_per_patient)
    return Cohort(rng.uniform(size=(n, 16, 16)).astype(np.float32), (patient % 2).astype(np.float32),
                  patient.astype(np.int64), len(images_per_patient))


def test_dataset_has_one_record_per_patient() -> None:
    c = _cohort([50, 1, 3])
    ds = PatientImages(c, seed=0)
    assert len(ds) == 3
    seen = set()
    for _ in range(200):  # a patient's record is always one of *its* images
        x, _ = ds[0]
        idx = int(np.flatnonzero((c.images == x.numpy()[0]).all(axis=(1, 2)))[0])
        assert c.patient[idx] == 0
        seen.add(idx)
    assert len(seen) > 20  # and draws vary over that patient's images


def _update_norm(cohort: Cohort, clip: float) -> tuple[float, float]:
    """One DP-SGD step (no noise, SGD lr=1) over a loader holding only ``cohort``."""
    model = build_model(seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loader = DataLoader(PatientImages(cohort, seed=0), batch_size=cohort.n_patients,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_model, dp_opt, dp_loader = make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=0.0, max_grad_norm=clip,
                                               noise_generator=torch.Generator().manual_seed(1))
    x, y = next(b for b in dp_loader if len(b[1]))
    assert len(y) <= cohort.n_patients  # never more records than patients
    loss = nn.BCEWithLogitsLoss(reduction="sum")(dp_model(x[:, None] if x.dim() == 3 else x), y)
    loss.backward()
    raw = max(float(torch.cat([p.grad_sample[i].flatten() for p in dp_model.parameters()]).norm())
              for i in range(len(y)))
    dp_opt.expected_batch_size = 1
    dp_opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    dp_model.to_standard_module()
    return float((after - before).norm()), raw


@pytest.mark.parametrize("images", [1, 40])
def test_a_patient_moves_the_model_by_at_most_the_clip_norm(images: int) -> None:
    clip = 1e-3
    moved, raw = _update_norm(_cohort([images]), clip)
    assert raw > 10 * clip  # clipping was active
    assert moved <= clip * (1 + 1e-4)


def test_many_image_patient_contributes_no_more_than_single_image_patient() -> None:
    clip = 1e-3
    many, _ = _update_norm(_cohort([40], seed=1), clip)
    one, _ = _update_norm(_cohort([1], seed=1), clip)
    assert many <= clip * (1 + 1e-4) and one <= clip * (1 + 1e-4)
    assert many == pytest.approx(one, rel=1e-3)  # both saturate the same bound


def test_batchnorm_model_is_rejected_with_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    loader = DataLoader(PatientImages(_cohort([1, 1]), seed=0), batch_size=2, generator=torch.Generator())
    with pytest.raises(UnsupportedModelError, match="GroupNorm"):
        make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=torch.Generator())
