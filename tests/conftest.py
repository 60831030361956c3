"""Shared fixtures: small seeded synthetic hospitals generated in temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic hospital with 24 patients (DICOM + labels.csv)."""
    from client.synth import generate_site, site_profile

    out = tmp_path_factory.mktemp("site") / "data"
    generate_site(out, site_profile(0, patients=24), seed=7)
    return out


def make_workspace(root: Path, name: str, data: Path, **privacy: object) -> Path:
    """A site workspace pointing at ``data``."""
    from client.config import DataConfig, PrivacyPolicy, SiteConfig, write_site_config

    ws = root / name
    write_site_config(SiteConfig(workspace=ws.resolve(), name=name,
                                 data=DataConfig(dicom=str(data), labels=str(data / "labels.csv")),
                                 privacy=PrivacyPolicy(**privacy)))  # type: ignore[arg-type]
    return ws
