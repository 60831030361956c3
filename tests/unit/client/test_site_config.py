"""site.toml: round trip, validation messages that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.config import PrivacyPolicy, SiteConfig, SiteConfigError, load_site_config, write_site_config


def test_round_trip(tmp_path: Path) -> None:
    cfg = SiteConfig(workspace=tmp_path.resolve(), name="st-marys", device="cpu",
                     privacy=PrivacyPolicy(max_epsilon=3.0, delta=1e-6))
    write_site_config(cfg)
    assert load_site_config(tmp_path) == cfg
    assert cfg.ledger_file == tmp_path.resolve() / "ledger.json"


def test_errors_name_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="medfed-site init"):
        load_site_config(tmp_path)
    (tmp_path / "site.toml").write_text('[site]\nname = "a"\n[privacy]\nmax_epsilon = -1\n')
    with pytest.raises(SiteConfigError, match=r"site\.toml: privacy\.max_epsilon = -1\.0: must be a finite number in \(0, 100\]"):
        load_site_config(tmp_path)
    (tmp_path / "site.toml").write_text('[site]\nname = "a"\n[privacy]\nmax_epsilonn = 1\n')
    with pytest.raises(SiteConfigError, match="unknown key"):
        load_site_config(tmp_path)
    (tmp_path / "site.toml").write_text('[site]\nname = "a b"\n')
    with pytest.raises(SiteConfigError, match="site.name"):
        load_site_config(tmp_path)
