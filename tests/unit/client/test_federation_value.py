"""The generator's sites are worth federating: pooled training beats one hospital alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from client.dicom import Preprocessing, load_cohort, split_patients
from client.dicom.cohort import Cohort
from client.models import build_model
from client.synth import generate_site, site_profile
from client.train import LocalPlan, evaluate, train_plain

HARD = 2.0  # fainter lesions than the default, so that one small hospital is clearly not enough


def _concat(parts: list[Cohort]) -> Cohort:
    offsets = np.cumsum([0] + [c.n_patients for c in parts])
    return Cohort(np.concatenate([c.images for c in parts]), np.concatenate([c.labels for c in parts]),
                  np.concatenate([c.patient + o for c, o in zip(parts, offsets, strict=False)]), int(offsets[-1]))


@pytest.fixture
def two_threads() -> Iterator[None]:
    """At most two torch threads for this test (many-core hosts), restored afterwards so that no
    other test inherits the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_central_training_beats_a_single_site(tmp_path: Path, two_threads: None) -> None:
    train, val = [], []
    for i in range(3):
        folder = tmp_path / f"site-{i}"
        generate_site(folder, site_profile(i, patients=40, difficulty=HARD), seed=11)
        c = load_cohort(folder, folder / "labels.csv", Preprocessing(image_size=64))
        a, b = split_patients(c, val_fraction=0.3, seed=0)
        train.append(a)
        val.append(b)
    pooled_val = _concat(val)
    central: list[float] = []
    single: list[float] = []
    for seed in (0, 1, 2):
        for data, out in ((_concat(train), central), (train[0], single)):
            model = build_model(seed=seed)
            steps = 40 * data.n_patients // 16  # same number of epochs for both
            train_plain(model, data, LocalPlan(steps=steps, batch_size=16, learning_rate=2e-3, seed=seed),
                        torch.device("cpu"))
            auroc = evaluate(model, pooled_val, torch.device("cpu")).auroc
            assert auroc is not None
            out.append(auroc)
    assert np.mean(central) >= np.mean(single) + 0.1, (central, single)
    assert np.mean(central) >= 0.8


def test_radiograph_findings_need_the_federation(tmp_path: Path, two_threads: None) -> None:
    """Multi-label radiographs: a model trained on the pooled sites beats one site's on every finding's
    macro AUROC (the generator's findings are learnable and one small site is not enough)."""
    from client.synth_radiograph import FINDINGS, generate_radiograph_site, radiograph_profile

    train, val = [], []
    for i in range(3):
        folder = tmp_path / f"dx-{i}"
        generate_radiograph_site(folder, radiograph_profile(i, patients=40, difficulty=HARD), seed=11)
        c = load_cohort(folder, folder / "labels.csv", Preprocessing(image_size=64), findings=FINDINGS)
        a, b = split_patients(c, val_fraction=0.3, seed=0)
        train.append(a)
        val.append(b)
    pooled_val = _concat(val)
    central: list[float] = []
    single: list[float] = []
    for seed in (0, 1):
        for data, out in ((_concat(train), central), (train[0], single)):
            model = build_model(seed=seed, outputs=len(FINDINGS))
            steps = 40 * data.n_patients // 16
            train_plain(model, data, LocalPlan(steps=steps, batch_size=16, learning_rate=2e-3, seed=seed),
                        torch.device("cpu"))
            res = evaluate(model, pooled_val, torch.device("cpu"))
            assert res.auroc is not None and len(res.findings_auroc) == len(FINDINGS)
            out.append(res.auroc)
    assert np.mean(central) >= np.mean(single) + 0.05, (central, single)
    assert np.mean(central) >= 0.75, central
