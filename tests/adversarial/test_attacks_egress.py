"""The attack path at a site (``medfed-audit attack``) lets only its closed schema of numbers out.

Played with the real code on a site whose export folder and headers name a patient (John Doe,
as in the egress attacks): membership inference, gradient inversion and the canary audit run
against a run directory the server wrote, including a crafted final model; the result, the only
thing meant to leave, holds no name, ID, date, path or canary identifier, the image grid stays in
the workspace, and nothing is written into the server's run directory.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from client.attacks import ATTACKS_DIR, run_attacks
from client.canaries import plant
from client.config import SiteConfig, load_site_config, write_site_config
from client.models import build_model, get_arrays
from privacy.attacks.result import AttackResultError, attack_result
from tests.adversarial.test_egress_against_server import BIRTH, FOLDER, NUMBERS, PID, TEXTS, doe  # noqa: F401

RUN_ID = "run-7"


def _run_dir(root: Path, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """What a server leaves: metrics.json with its config, and model-final.npz."""
    run = root / "run"
    run.mkdir()
    config = {"model": "slicenet", "image_size": 16, "window": "", "findings": "", "num_server_rounds": 1,
              "local_steps": 3, "batch_size": 4, "learning_rate": 0.01, "optimizer": "sgd", "seed": 0}
    (run / "metrics.json").write_text(json.dumps({"run_id": RUN_ID, "config": config, "rounds": [{"round": 1}]}))
    np.savez(run / "model-final.npz", **(arrays or get_arrays(build_model("slicenet", seed=0))))
    return run


def _numbers(doc: object) -> list[float]:
    if isinstance(doc, dict):
        return [n for v in doc.values() for n in _numbers(v)]
    if isinstance(doc, list):
        return [n for v in doc for n in _numbers(v)]
    return [float(doc)] if isinstance(doc, int | float) and not isinstance(doc, bool) else []


def test_the_attack_result_holds_only_numbers_and_nothing_identifying(doe: SiteConfig, tmp_path: Path) -> None:  # noqa: F811
    config = plant(doe, 8, seed=3)
    run = _run_dir(tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = run_attacks(config, run, references=2, reference_steps=3, inversion_iterations=5, seed=0)
    text = json.dumps(result)
    for value in [*TEXTS, FOLDER, str(config.workspace), str(config.dicom_dir), "CANARY", "P00000",
                  *(str(n) for n in NUMBERS)]:
        assert value not in text, value
    for v in _numbers(result):
        digits = repr(abs(v)).replace(".", "").lstrip("0")
        assert {int(v), round(v)}.isdisjoint(NUMBERS) and BIRTH not in digits and PID not in digits, v
    assert set(result) == {"schema", "site", "run_id", "model_sha256", "utility", "membership", "canary", "inversion"}
    assert result["site"] == "site-a" and result["run_id"] == RUN_ID
    assert result["membership"]["loss"]["members"] + result["membership"]["loss"]["non_members"] == 24
    assert result["canary"]["canaries"] == 8 and result["canary"]["accountant_epsilon"] is None  # no training here
    # the grid of patient images stays at the site, private; the server's run directory is untouched
    grid = config.workspace / ATTACKS_DIR / f"inversion-{RUN_ID}.png"
    assert grid.is_file() and grid.stat().st_mode & 0o077 == 0
    assert json.loads((config.workspace / ATTACKS_DIR / f"{RUN_ID}.json").read_text()) == result
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_crafted_final_model_gets_a_clear_error_and_no_result(doe: SiteConfig, tmp_path: Path) -> None:  # noqa: F811
    """A server's model of NaN weights is refused as a round's model would be; nothing is written."""
    arrays = OrderedDict((k, np.full_like(v, np.nan) if v.dtype.kind == "f" else v)
                         for k, v in get_arrays(build_model("slicenet", seed=0)).items())
    run = _run_dir(tmp_path, arrays)
    with pytest.raises(ValueError, match="is not finite floating point"):
        run_attacks(doe, run, kinds=("membership",), references=0, seed=0)
    assert not (doe.workspace / ATTACKS_DIR / f"{RUN_ID}.json").exists()


@pytest.mark.parametrize("doc, field", [
    ({"utility": {"val_auroc": "4821397"}}, "utility.val_auroc"),  # a string where a number belongs
    ({"utility": {"val_auroc": float("nan")}}, "finite"),
    ({"utility": {"patient": 1.0}}, "unknown field"),
    ({"utility": {"val_auroc": 0.5}}, r"utility lacks \['val_loss'\]"),
    ({"patients": [4821397]}, "unknown field"),
    ({"site": "DOE^JOHN"}, "site"),
    ({"model_sha256": "19620314"}, "model_sha256"),
    ({"membership": {"loss": {"roc_tpr": [0.5] * 3}}}, "41 numbers"),
    ({"canary": {"correct": -1}}, "count"),
])
def test_the_schema_refuses_anything_but_its_numbers(doc: dict, field: str) -> None:
    with pytest.raises(AttackResultError, match=field if "lacks" in field else field.replace(".", r"\.").replace("^", r"\^")):
        attack_result(doc)


def test_a_run_id_that_walks_out_of_the_workspace_is_refused(doe: SiteConfig, tmp_path: Path) -> None:  # noqa: F811
    """The run id names the site's result and grid files: a server's ``../..`` never becomes a path."""
    run = _run_dir(tmp_path)
    doc = json.loads((run / "metrics.json").read_text())
    for bad in ("../../../etc/medfed", "..", "a/b", ""):
        (run / "metrics.json").write_text(json.dumps({**doc, "run_id": bad}))
        with pytest.raises(ValueError, match="run_id must be"):
            run_attacks(doe, run, kinds=("inversion",), seed=0)
    assert not (doe.workspace / ATTACKS_DIR).exists() and not list(tmp_path.rglob("*.png"))


def test_a_workspace_the_server_wrote_is_not_attacked_from(doe: SiteConfig, tmp_path: Path) -> None:  # noqa: F811
    """The server ships RUN_DIR/sites/NAME/site.toml pointing at the hospital's export: attacking
    "from" it would put the hospital's cache, identifier key and image grid in the server's directory."""
    run = _run_dir(tmp_path)
    planted = SiteConfig(workspace=(run / "sites" / doe.name).resolve(), name=doe.name, data=doe.data)
    write_site_config(planted)
    with pytest.raises(ValueError, match="lies inside the run directory"):
        run_attacks(load_site_config(planted.workspace), run, seed=0)
    assert sorted(p.name for p in (run / "sites" / doe.name).iterdir()) == ["site.toml"]


def test_a_task_the_site_does_not_offer_is_not_run(doe: SiteConfig, tmp_path: Path) -> None:  # noqa: F811
    run = _run_dir(tmp_path)
    doc = json.loads((run / "metrics.json").read_text())
    doc["config"]["findings"] = "nodule"
    (run / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="does not offer"):
        run_attacks(doe, run, seed=0)
    doc["config"] |= {"findings": "", "local_steps": 100_000, "num_server_rounds": 5}
    doc["rounds"] = []
    (run / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="at most 100000 steps"):
        run_attacks(doe, run, seed=0)


def test_a_result_missing_its_fields_is_refused() -> None:
    with pytest.raises(AttackResultError, match=r"membership\.loss lacks"):
        attack_result({"membership": {"loss": {}}})
    with pytest.raises(AttackResultError, match="canary lacks"):
        attack_result({"canary": {"canaries": 3}})
