"""Planted canaries: marked synthetic patients, half drawn into training (never validation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.canaries import CANARY_DIR, plant, planted
from client.config import load_site_config
from client.site import load_site_data
from tests.conftest import make_workspace


def test_planted_canaries_join_training_only(tmp_path: Path, small_site: Path) -> None:
    config = load_site_config(make_workspace(tmp_path, "site-a", small_site))
    real = load_site_data(config, image_size=16)
    updated = plant(config, 10, seed=1)
    assert load_site_config(updated.workspace).data.canaries == f"{CANARY_DIR}/in"  # written to site.toml
    found = planted(updated)
    assert found is not None and found.m == 10
    inc = int(found.included.sum())
    assert 0 < inc < 10
    with_canaries = load_site_data(updated, image_size=16)
    assert with_canaries.train.n_patients == real.train.n_patients + inc
    assert with_canaries.val.n_patients == real.val.n_patients
    np.testing.assert_array_equal(with_canaries.train.images[: len(real.train.images)], real.train.images)
    assert load_site_data(updated, image_size=16, canaries=False).train.n_patients == real.train.n_patients
    files = sorted((updated.workspace / CANARY_DIR).rglob("*.dcm"))
    assert len(files) == 10
    ds = pydicom.dcmread(files[0])
    assert str(ds.PatientID).startswith("CANARY-") and "canary" in str(ds.DeidentificationMethod)
    replanted = plant(updated, 6, seed=2)  # a new draw replaces the old one whole
    assert len(sorted((replanted.workspace / CANARY_DIR).rglob("*.dcm"))) == 6
    with pytest.raises(ValueError, match="at least 2"):
        plant(updated, 1)
