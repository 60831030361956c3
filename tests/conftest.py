"""Shared fixtures: small seeded synthetic hospitals generated in temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# The slow tier: real processes, real simulations and deployments. `pytest -m "not slow"` is the
# contributors' fast tier (under 3 minutes on 2 cores); CI runs everything.
SLOW_MODULES = frozenset({"test_audit_against_operator.py", "test_control_plane_firewall.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "e2e" in item.path.parts or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


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
