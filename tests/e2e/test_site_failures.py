"""A virtual site killed at every point of a round (``simulate --fail SITE:ROUND:STAGE``), in Flower's
simulation runtime with real DP ledgers, real SecAgg+ and the real verifier: the round completes with
the survivors (or is abandoned cleanly when too few are left), the killed site's ledger counts what it
may have released, it rejoins the next round, and the audit verifies and records the failure. The
aggregate is checked exactly by replaying each survivor's training through its real ClientApp."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType, RecordDict

from client.config import load_site_config, write_site_config
from privacy import egress as K
from privacy.audit.log import read_entries
from privacy.audit.trust import from_roster
from privacy.audit.verify import run_logs, verify_paths
from privacy.dp import epsilon
from privacy.egress import EPSILON
from privacy.model_arrays import arrays_sha256, arrays_to_record, record_to_arrays
from privacy.quantise import quantise
from server.config import RunConfig
from server.initial_model import initial_model
from server.rounds import round_config
from server.rundir import load_npz
from tests.adversarial.harness import MaliciousServer, message
from tests.e2e.test_simulate import simulate
from tests.helpers import site_ledger

pytestmark = pytest.mark.e2e
SITES = [f"site-{i}" for i in range(1, 5)]
SMALL = ["--patients", "12", "--local-steps", "10", "--batch-size", "4"]
CHARGED = {"train", "reply", "consistency", "unmask"}  # killed after the ledger was charged


def _verify(run: Path) -> None:
    verdict = verify_paths(run_logs(run), from_roster(run / "keys" / "roster.json"),
                           json.loads((run / "metrics.json").read_text()))
    assert verdict.ok, verdict.problems[:3]


def _check_failures(run: Path, m: dict, kills: dict[int, tuple[str, str]]) -> None:
    """Each round r with kills[r] = (site, stage): the others' update applied, the killed site recorded
    (failed, or dropped after its input), its ledger charged iff it trained, back in round r + 1."""
    rows = {r["round"]: r for r in m["rounds"]}
    server = read_entries(run / "audit.jsonl")
    for rnd, (site, stage) in kills.items():
        row = rows[rnd]
        others = [s for s in SITES if s != site]
        included = stage in ("consistency", "unmask")  # its masked input arrived before it died
        # the server names a failed node by the site it heard from; one it never heard from is node-ID
        label = site if (rnd, stage) != (1, "advertise") else next(iter(row["secagg"]["dropped_at"]["advertise"]))
        assert label == site or label.startswith("node-")
        assert row["sites"] == (SITES if included else others), (rnd, stage, row["sites"])
        assert row["secagg"]["dropped_at"] == {stage if stage not in ("train", "reply") else "input": [label]}
        assert row["failed"] == ([] if included else [label])
        failed = [e for e in server if e.event == "site-reply" and e.data["round"] == rnd
                  and e.data["status"] == "failed"]
        assert [e.data["site"] for e in failed] == ([] if included else [label])
        assert [e.data["round"] for e in server if e.event == "aggregate-applied"].count(rnd) == 1
        if rnd + 1 in rows:
            assert site in rows[rnd + 1]["sites"]  # rejoined
        ledger = site_ledger(run / "sites" / site)
        trained = [e.round for e in ledger.events if e.kind == "train"]
        assert (rnd in trained) == (stage in CHARGED), (stage, trained)
    for site in SITES:  # each ε a site released is the composition of its ledger's events up to then
        ledger = site_ledger(run / "sites" / site)
        trained = [e.round for e in ledger.events if e.kind == "train"]
        applied = {r for r, row in rows.items() if site in row["sites"]}
        assert applied <= set(trained) and len(trained) == len(set(trained))  # every update that left, once
        for rnd, row in rows.items():
            if site in row["epsilon"]:
                upto = [e.mechanism() for e in ledger.events if e.round <= rnd]
                assert row["epsilon"][site] == quantise(EPSILON, epsilon(upto, delta=ledger.events[-1].delta))
    _verify(run)


def test_secure_rounds_survive_a_site_killed_at_each_stage(tmp_path: Path) -> None:
    a = tmp_path / "a"
    kills_a = {1: ("site-1", "share"), 2: ("site-2", "unmask"), 3: ("site-3", "train"), 4: ("site-4", "consistency")}
    m = simulate("--sites", "4", "--rounds", "4", *SMALL, "--out", str(a),
                 *[x for r, (s, st) in kills_a.items() for x in ("--fail", f"{s}:{r}:{st}")], cwd=tmp_path)
    _check_failures(a, m, kills_a)
    b = tmp_path / "b"
    kills_b = {1: ("site-1", "advertise"), 2: ("site-2", "input"), 3: ("site-3", "reply")}
    m = simulate("--sites", "4", "--rounds", "3", *SMALL, "--out", str(b),
                 *[x for r, (s, st) in kills_b.items() for x in ("--fail", f"{s}:{r}:{st}")], cwd=tmp_path)
    _check_failures(b, m, kills_b)
    site_log = read_entries(b / "sites" / "site-3" / "audit.jsonl")  # "reply": it trained, masked, was let out
    assert any(e.event == "round-trained" and e.data["round"] == 3 for e in site_log)


def test_too_few_survivors_abandon_the_round_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "c"
    m = simulate("--sites", "3", "--rounds", "2", *SMALL, "--out", str(run), "--fail", "site-2:1:advertise",
                 cwd=tmp_path)
    first, second = m["rounds"]
    assert first["sites"] == [] and first["secagg"]["aborted"] is True  # 2 sites < every site's min_sites 3
    assert first["model_sha256"] == arrays_sha256(initial_model(RunConfig(**m["config"]))[0])  # nothing applied
    entries = read_entries(run / "audit.jsonl")
    assert [e.data["round"] for e in entries if e.event == "aggregate-applied"] == [2]
    assert second["sites"] == ["site-1", "site-2", "site-3"]
    for site in ("site-1", "site-3"):  # they refused the weak round before training: nothing charged
        assert 1 not in [e.round for e in site_ledger(run / "sites" / site).events if e.kind == "train"]
    _verify(run)


def _replayed_update(run: Path, site: str, cfg: RunConfig, run_id: str, rnd: int,
                     start: dict[str, np.ndarray], tmp: Path) -> tuple[dict[str, np.ndarray], float]:
    """The site's round-``rnd`` update, trained again by its real ClientApp on a copy of its workspace
    (deterministic: no DP, the site's seed), unmasked."""
    copy = tmp / f"replay-{site}-{rnd}"
    shutil.copytree(run / "sites" / site, copy)
    config = load_site_config(copy)
    write_site_config(replace(config, privacy=replace(config.privacy, require_secure_aggregation=False)))
    server = MaliciousServer(copy)
    content = RecordDict({K.ARRAYS: arrays_to_record(start), K.CONFIG: round_config(cfg, run_id, rnd)})
    reply = server.app(message(MessageType.TRAIN, content), server.context)
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content.metric_records[K.METRICS]
    return record_to_arrays(reply.content.array_records[K.ARRAYS]), float(metrics[K.NUM_EXAMPLES])


def test_the_applied_model_is_the_survivors_aggregate(tmp_path: Path) -> None:
    run = tmp_path / "d"
    m = simulate("--sites", "4", "--rounds", "2", *SMALL, "--no-dp", "--site-seed", "7", "--out", str(run),
                 "--fail", "site-1:1:input", "--fail", "site-2:2:unmask", cwd=tmp_path)
    cfg = RunConfig(**m["config"])
    start = dict(initial_model(cfg)[0])
    for rnd, survivors in ((1, SITES[1:]), (2, SITES)):
        assert m["rounds"][rnd - 1]["sites"] == survivors
        updates = [_replayed_update(run, s, cfg, m["run_id"], rnd, start, tmp_path) for s in survivors]
        total = sum(w for _, w in updates)
        expected = {k: start[k] + sum(w * u[k] for u, w in updates) / total for k in start}
        got = load_npz(run / "checkpoints" / f"round-{rnd}.npz")
        for k in start:
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-5, err_msg=f"round {rnd}: {k}")
        first_update = np.concatenate([updates[0][0][k].ravel() for k in start])
        assert np.abs(first_update).max() > 1e-3  # the updates are not negligible beside the tolerance
        start = dict(got)
    _verify(run)
