"""Every file loader fed random bytes and damaged copies of a real file (site and run config, labels
CSV, ledger, audit log, checkpoint, roster, metrics.json, simulation.json, keys): only medfed's typed
errors (``MedfedError``) come out, and the loader leaves the file and its folder exactly as they were
(nothing rewritten, truncated or half-written beside it). Seeded, so a failure reproduces."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.config import DataConfig, SiteConfig, load_site_config, write_site_config
from client.dicom.cohort import read_labels
from privacy.audit.crosscheck import load_metrics
from privacy.audit.log import AuditLog, read_entries
from privacy.audit.trust import from_roster
from privacy.errors import MedfedError
from privacy.keys import load_or_create_key, load_private_key, load_public_key, public_pem
from privacy.ledger import LedgerEvent, PrivacyLedger, now_utc
from privacy.secagg.wire import load_roster, roster_bytes
from server.config import RunConfig
from server.resume import resume_point
from server.rundir import RunDir, load_npz
from server.simulate import SimulationRecord

MUTATIONS = 120
SHAPES = [b"", b"null", b"[]", b"{}", b"0", b'"x"', b'{"sites": 1}', b'{"sites": {"a": 1}}', b'{"config": []}',
          b"\xef\xbb\xbf", b"\x00" * 64, b"[site]\nname = 1\n", b"label\n2\n"]


def _mutations(data: bytes, rng: random.Random) -> Iterator[bytes]:
    yield from SHAPES
    for _ in range(MUTATIONS):
        kind = rng.choice(["random", "truncate", "flip", "insert", "delete", "duplicate"])
        b = bytearray(data)
        if kind == "random":
            b = bytearray(os.urandom(rng.randint(1, 400)))
        elif kind == "truncate" and b:
            b = b[: rng.randrange(len(b))]
        elif kind == "flip" and b:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "insert":
            at = rng.randrange(len(b) + 1)
            b[at:at] = os.urandom(rng.randint(1, 16))
        elif kind == "delete" and b:
            at = rng.randrange(len(b))
            del b[at : at + rng.randint(1, 32)]
        elif kind == "duplicate" and b:
            at = rng.randrange(len(b))
            b[at:at] = b[at : at + rng.randint(1, 64)]
        yield bytes(b)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One valid file of each kind, made by medfed's own writers."""
    root = tmp_path_factory.mktemp("originals")
    key = load_or_create_key(root / "keys" / "audit.key")
    ws = root / "ws"
    data = ws / "data"
    data.mkdir(parents=True)
    (data / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3.4,1\n1.2.3.5,0\n")
    write_site_config(SiteConfig(workspace=ws.resolve(), name="site-1", keys=str((root / "keys").resolve()),
                                 data=DataConfig(dicom=str(data), labels=str(data / "labels.csv"))))
    ledger = PrivacyLedger.load(ws / "ledger.json", key.public_key())
    ledger.append(LedgerEvent(round=1, run_id="run-1", noise_multiplier=1.1, sample_rate=0.1, steps=20,
                              accountant="rdp", epsilon_after=0.9, delta=1e-5, timestamp=now_utc()), key)
    log = AuditLog(ws / "audit.jsonl", "site-1", key)
    log.append("run-joined", {"run_id": "run-1", "patients": 20})
    log.append("round-trained", {"run_id": "run-1", "round": 1})
    run = root / "run"
    RunDir(run).checkpoint(1, OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3)))
    other = Ed25519PrivateKey.generate()
    (run / "roster.json").write_bytes(roster_bytes({"site-1": public_pem(key.public_key()).decode(),
                                                    "site-2": public_pem(other.public_key()).decode()},
                                                   server=public_pem(other.public_key()).decode()))
    (run / "metrics.json").write_text(json.dumps({"run_id": "run-1", "config": RunConfig(run_dir=str(run)).to_dict(),
                                                  "rounds": []}))
    SimulationRecord(workspaces=(str(ws),), roster_fingerprint="ab" * 32).write(run)
    return {"site.toml": ws / "site.toml", "labels.csv": data / "labels.csv", "ledger.json": ws / "ledger.json",
            "audit.jsonl": ws / "audit.jsonl", "round-1.npz": run / "checkpoints" / "round-1.npz",
            "roster.json": run / "roster.json", "metrics.json": run / "metrics.json",
            "simulation.json": run / "simulation.json", "audit.key": root / "keys" / "audit.key",
            "audit.pub": root / "keys" / "audit.pub"}


def _loaders(originals: dict[str, Path]) -> dict[str, tuple[str, Callable[[Path], object]]]:
    """name -> (the folder copied for each trial, relative to the file's, and the loader)."""
    pub = load_public_key(originals["audit.pub"])
    return {
        "site.toml": ("..", lambda p: load_site_config(p.parent)),
        "labels.csv": (".", read_labels),
        "ledger.json": (".", lambda p: PrivacyLedger.load(p, pub)),
        "audit.jsonl": (".", read_entries),
        "round-1.npz": (".", load_npz),
        "roster.json": (".", load_roster),
        "roster (auditor)": (".", from_roster),
        "metrics.json": (".", load_metrics),
        "metrics.json (resume: the run config)": (".", lambda p: resume_point(p.parent)),
        "simulation.json": (".", lambda p: SimulationRecord.read(p.parent)),
        "audit.key": (".", load_private_key),
        "audit.pub": (".", load_public_key),
    }


def _file(case: str) -> str:
    return "roster.json" if case.startswith("roster") else case.split(" ")[0]


CASES = ["site.toml", "labels.csv", "ledger.json", "audit.jsonl", "round-1.npz", "roster.json", "roster (auditor)",
         "metrics.json", "metrics.json (resume: the run config)", "simulation.json", "audit.key", "audit.pub"]


@pytest.mark.parametrize("case", CASES)
def test_damaged_files_raise_only_typed_errors_and_are_left_as_they_were(originals: dict[str, Path],
                                                                         tmp_path: Path, case: str) -> None:
    source = originals[_file(case)]
    up, load = _loaders(originals)[case]
    folder = source.parent if up == "." else source.parent.parent
    rel = source.relative_to(folder)
    rng = random.Random(f"medfed-fuzz-{case}")
    outcomes = {"loaded": 0, "refused": 0}
    for i, data in enumerate(_mutations(source.read_bytes(), rng)):
        trial = tmp_path / f"t{i}"
        shutil.copytree(folder, trial)
        target = trial / rel
        target.write_bytes(data)
        before = _snapshot(trial)
        try:
            load(target)
            outcomes["loaded"] += 1
        except MedfedError as exc:
            assert str(exc), f"{case}: an error without a message"
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the assertion is that nothing else comes out
            pytest.fail(f"{case}, mutation {i}: {type(exc).__name__}: {exc} escaped (not a MedfedError)")
        assert _snapshot(trial) == before, f"{case}, mutation {i}: the loader changed files in the folder"
        shutil.rmtree(trial)
    assert outcomes["refused"] >= MUTATIONS // 4, outcomes  # the mutations do damage the file


def test_the_originals_load(originals: dict[str, Path]) -> None:
    """Control: the undamaged files load (so a refusal above is the damage's doing)."""
    loaders = _loaders(originals)
    for case in CASES:
        if case.startswith("metrics.json (resume"):
            continue  # a run with no audit key beside it is refused by design
        loaders[case][1](originals[_file(case)])
