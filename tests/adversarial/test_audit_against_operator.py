"""A central operator rewrites the evidence of a real simulated run, consistently, holding its
own audit key (as it does): `medfed-audit verify` with out-of-band keys catches every rewrite,
naming the file, the entry and the reason.

The attacker here holds the run directory and the server's private key, not the sites' keys
(those stay at the sites: a simulation keeps them outside the run directory). Each attack works
on a copy of the run; the auditor holds the roster (or its fingerprint) from before the attack.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.config import load_site_config
from privacy.audit.log import Entry, body_hash, read_entries
from privacy.audit.trust import from_roster
from privacy.audit.verify import Verdict, run_logs, verify_paths
from privacy.keys import load_private_key, public_pem
from privacy.secagg.wire import roster_bytes, roster_fingerprint
from tests.helpers import resign_log

ROOT = Path(__file__).parents[2]
SITES = ("site-1", "site-2")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privacy.audit.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("operator")
    r = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--sites", "2", "--rounds", "2", "--patients",
                        "20", "--local-steps", "3", "--batch-size", "8", "--out", str(root / "run")],
                       capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    pinned = root / "auditor-roster.json"  # the auditor's copy, obtained out of band before any attack
    shutil.copy(root / "run" / "keys" / "roster.json", pinned)
    fingerprint = r.stderr.split("--roster-fingerprint ", 1)[1].split()[0]
    assert fingerprint == roster_fingerprint(pinned.read_bytes())
    return {"run": root / "run", "keys": root / "run.keys", "roster": pinned, "fingerprint": fingerprint}


def _copy(run: dict[str, Path | str], dest: Path) -> Path:
    shutil.copytree(Path(run["run"]), dest, ignore=shutil.ignore_patterns("cache", "data", "checkpoints"))
    return dest


def _verdict(run_dir: Path, run: dict[str, Path | str], **kw: bool) -> Verdict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return verify_paths(run_logs(run_dir), from_roster(Path(run["roster"])), metrics, **kw)


def _server_key(run: dict[str, Path | str]) -> Ed25519PrivateKey:
    return load_private_key(Path(run["keys"]) / "server.key")


def _rewrite_server(run_dir: Path, key: Ed25519PrivateKey, edit: dict[str, float] | None = None,
                    drop_last: int = 0) -> None:
    """The operator's consistent rewrite: edit ε it recorded for sites, drop entries from the
    end, re-sign its whole log, and patch metrics.json (rows, their signed digests, the head)."""
    log = run_dir / "audit.jsonl"
    entries = read_entries(log)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    edited: list[Entry] = []
    for e in entries[: len(entries) - drop_last]:
        data = dict(e.data)
        if edit and e.event == "site-reply" and data.get("site") in edit and data.get("epsilon") is not None:
            data["epsilon"] = data["epsilon"] * edit[data["site"]]
        edited.append(Entry(e.seq, e.time, e.actor, e.event, data, e.prev, e.hash, e.sig))
    for row in metrics["rounds"]:
        for site, factor in (edit or {}).items():
            if site in row["epsilon"]:
                row["epsilon"][site] = row["epsilon"][site] * factor
    digests = {row["round"]: body_hash(row) for row in metrics["rounds"]}
    edited = [Entry(e.seq, e.time, e.actor, e.event, {**e.data, "metrics_sha256": digests[e.data["round"]]}, e.prev,
                    e.hash, e.sig) if e.event == "round-end" else e for e in edited]
    resign_log(log, edited, key)
    metrics["audit"]["server_head"] = read_entries(log)[-1].hash
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_the_untouched_run_verifies_and_no_private_key_is_in_the_run_directory(run: dict[str, Path | str]) -> None:
    run_dir = Path(run["run"])
    v = _verdict(run_dir, run)
    assert v.ok, v.problems[:3]
    assert v.checked == ["server", *SITES] and v.out_of_band and v.metrics_checked
    assert v.counter_signed > 0  # the sites counter-signed the server's log
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and (p.suffix == ".key" or b"PRIVATE KEY" in p.read_bytes())]
    assert leaked == []
    keys = Path(run["keys"])
    assert (keys / "server.key").stat().st_mode & 0o777 == 0o600
    for site in SITES:  # each virtual site's key is in the keys folder its site.toml names
        assert load_site_config(run_dir / "sites" / site).keys_dir == (keys / "sites" / site).resolve()
        assert (keys / "sites" / site / "audit.key").is_file()


def test_a_resigned_server_log_with_edited_epsilon_and_patched_metrics_is_caught(
        run: dict[str, Path | str], tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "resigned")
    _rewrite_server(run_dir, _server_key(run), edit={"site-1": 0.5})
    v = _verdict(run_dir, run)
    assert not v.ok
    whats = [p.what for p in v.problems]
    # the site's own log (signed with a key the operator lacks) says what ε it reported
    assert any("is not the site's" in w and "site site-1" in w for w in whats), whats
    # and the heads the sites counter-signed are no longer in the re-signed chain
    assert any("counter-signed" in w and "not in the server's log" in w for w in whats), whats
    counter = next(p for p in v.problems if "counter-signed" in p.what)
    assert counter.file.endswith("audit.jsonl") and "/sites/" in counter.file and counter.seq is not None
    # the same through the CLI, with the fingerprint the consortium handed out
    r = _cli("verify", str(run_dir), "--roster-fingerprint", str(run["fingerprint"]))
    assert r.returncode == 1 and "FAILED" in r.stderr and "seq" in r.stderr and "audit.jsonl" in r.stderr


def test_a_resigned_server_log_alone_is_caught_by_the_counter_signatures(
        run: dict[str, Path | str], tmp_path: Path) -> None:
    """No value changed, only re-signed (new timestamps would do the same): every head a site
    counter-signed must be in the chain."""
    run_dir = _copy(run, tmp_path / "resign-only")
    log = run_dir / "audit.jsonl"
    entries = read_entries(log)
    shifted = [Entry(e.seq, e.time.replace("Z", "1Z") if e.seq == 1 else e.time, e.actor, e.event, e.data, e.prev,
                     e.hash, e.sig) for e in entries]  # entry 1 "happened" at another time
    resign_log(log, shifted, _server_key(run))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["audit"]["server_head"] = read_entries(log)[-1].hash
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    v = _verdict(run_dir, run)
    assert not v.ok and all("counter-signed" in p.what for p in v.problems), [p.what for p in v.problems]
    # each honest site's log catches it
    assert {Path(p.file).parent.name for p in v.problems if "/sites/" in p.file} == set(SITES)


@pytest.mark.parametrize("drop", [1, 2, 3, 5, 9, 14])
def test_a_truncated_server_chain_is_caught(run: dict[str, Path | str], tmp_path: Path, drop: int) -> None:
    """Entries removed from the end (the chain stays valid, metrics.json is patched to the new
    head): the sites' logs show rounds the server's log no longer has, or the run has no end."""
    run_dir = _copy(run, tmp_path / f"trunc-{drop}")
    log = run_dir / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-drop]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["audit"]["server_head"] = read_entries(log)[-1].hash
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    v = _verdict(run_dir, run)
    assert not v.ok
    whats = " | ".join(p.what for p in v.problems)
    assert "no run-end entry" in whats
    if drop >= 3:  # past the run's and the last round's end: sites' entries of that round have no server reply
        assert "has no such reply from this site" in whats or "not in the server's log" in whats, whats


def test_a_substituted_site_key_and_forged_site_log_are_caught_with_out_of_band_keys(
        run: dict[str, Path | str], tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "substituted")
    forger = Ed25519PrivateKey.generate()
    pem = public_pem(forger.public_key())
    (run_dir / "keys" / "site-2.pub").write_bytes(pem)
    doc = json.loads((run_dir / "keys" / "roster.json").read_text())
    doc["sites"]["site-2"] = pem.decode()
    (run_dir / "keys" / "roster.json").write_bytes(roster_bytes(doc["sites"], doc["server"]))
    log = run_dir / "sites" / "site-2" / "audit.jsonl"
    resign_log(log, read_entries(log), forger)  # site-2's log, now "signed by site-2"
    # control: trusting the keys beside the logs, the forgery passes; that is why verify refuses to by default
    control = _cli("verify", str(run_dir), "--trust-run-keys", "--json")
    assert control.returncode == 0 and json.loads(control.stdout)["keys"]["out_of_band"] is False
    assert _cli("verify", str(run_dir)).returncode == 2  # no out-of-band keys: refused, not verified
    # the auditor's roster (pinned before): site-2's log does not verify
    v = _verdict(run_dir, run)
    assert not v.ok and v.problems[0].file == str(log) and v.problems[0].seq == 0
    assert "signature does not verify with site-2's key" in v.problems[0].what
    # the fingerprint handed out of band: the run's roster copy was replaced
    r = _cli("verify", str(run_dir), "--roster-fingerprint", str(run["fingerprint"]))
    assert r.returncode == 2 and "is not the fingerprint given" in r.stderr


def test_edited_metrics_json_is_caught(run: dict[str, Path | str], tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "metrics")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row in metrics["rounds"]:
        row["epsilon"] = {site: eps / 4 for site, eps in row["epsilon"].items()}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    v = _verdict(run_dir, run)
    assert not v.ok
    assert {p.file for p in v.problems} == {"metrics.json"}
    assert any("round 1 differs from the row the server signed (server seq" in p.what for p in v.problems)
    assert any("ε per site is not the last ε each site released" in p.what for p in v.problems)


def test_missing_site_logs_fail_unless_server_only(run: dict[str, Path | str], tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "no-sites")
    (run_dir / "sites" / "site-2" / "audit.jsonl").unlink()
    v = _verdict(run_dir, run)
    assert not v.ok and any("site site-2 took part in run" in p.what and "its log was not given" in p.what
                            for p in v.problems)
    shutil.rmtree(run_dir / "sites")  # a deployment's run directory: the sites keep their logs
    r = _cli("verify", str(run_dir), "--roster", str(run["roster"]))
    assert r.returncode == 1 and "no site log was given" in r.stderr
    r = _cli("verify", str(run_dir), "--roster", str(run["roster"]), "--server-only", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and sorted(out["logs"]) == ["server"] and out["unchecked_sites"] == list(SITES)
    report = _cli("report", str(run_dir), "--roster", str(run["roster"]), "--server-only", "--out",
                  str(tmp_path / "r.html"))
    assert report.returncode == 0
    html = (tmp_path / "r.html").read_text()
    assert "NO site log was checked" in html and "Logs checked: server." in html


def _resign_server(run_dir: Path, entries: list[Entry], key: Ed25519PrivateKey, metrics: dict) -> None:  # type: ignore[type-arg]
    """Re-sign ``entries`` as the server's log and patch metrics.json to match it (digests, head)."""
    for e in entries:
        if e.event == "round-end":
            row = next((r for r in metrics["rounds"] if r["round"] == e.data["round"]), None)
            if row is not None:
                e.data["metrics_sha256"] = body_hash(row)
    log = run_dir / "audit.jsonl"
    resign_log(log, entries, key)
    metrics["audit"]["server_head"] = read_entries(log)[-1].hash
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def _entries(run_dir: Path) -> list[Entry]:
    return [Entry(e.seq, e.time, e.actor, e.event, dict(e.data), e.prev, e.hash, e.sig)
            for e in read_entries(run_dir / "audit.jsonl")]


@pytest.mark.parametrize("replies", ["kept-as-errors", "removed"])
def test_a_fabricated_run_is_caught(run: dict[str, Path | str], tmp_path: Path, replies: str) -> None:
    """A whole new run in the server's log (new run id, nothing the sites ever saw): the sites it
    names never joined it, and none of its rounds is counter-signed."""
    run_dir = _copy(run, tmp_path / f"fabricated-{replies}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fake = "1111111111111111111"
    out = []
    for e in _entries(run_dir):
        e.data["run_id"] = fake
        if e.event == "site-reply":
            if replies == "removed" or e.data["status"] != "trained":
                continue
            e.data.update(status="error", site_head=None, epsilon=None)
        out.append(e)
    metrics["run_id"] = fake
    for row in metrics["rounds"]:
        row["epsilon"] = {}
    _resign_server(run_dir, out, _server_key(run), metrics)
    v = _verdict(run_dir, run)
    whats = " | ".join(p.what for p in v.problems)
    assert not v.ok
    assert "is not counter-signed by any given site log" in whats, whats
    if replies == "kept-as-errors":
        assert "has no run-joined for it (the site never took part)" in whats, whats


def test_cut_site_logs_and_a_rewritten_last_round_are_caught(run: dict[str, Path | str], tmp_path: Path) -> None:
    """Cutting a site log needs no key. The operator cuts every site log before round 2 and rewrites
    round 2 without site-2: round 2 is counter-signed by no site any more."""
    run_dir = _copy(run, tmp_path / "cut")
    for site in SITES:
        log = run_dir / "sites" / site / "audit.jsonl"
        kept = [line for line in log.read_bytes().splitlines(keepends=True) if json.loads(line)["data"].get("round", 0) < 2]
        log.write_bytes(b"".join(kept))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = []
    for e in _entries(run_dir):
        if e.data.get("round") == 2 and e.event == "site-reply" and e.data["site"] == "site-2":
            continue
        if e.data.get("round") == 2 and e.event == "site-reply":
            e.data["site_head"] = None
        out.append(e)
    metrics["rounds"][1]["epsilon"].pop("site-2")
    _resign_server(run_dir, out, _server_key(run), metrics)
    v = _verdict(run_dir, run)
    assert not v.ok
    assert any("round 2 of run" in p.what and "not counter-signed" in p.what for p in v.problems), v.problems


def test_a_swapped_final_model_or_participants_are_caught(run: dict[str, Path | str], tmp_path: Path) -> None:
    """Values the sites' logs bind indirectly: the final model is the last aggregate, which every
    site evaluated; a row's sites and refusals are the replies and the aggregate."""
    run_dir = _copy(run, tmp_path / "final")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fake = "ab" * 32
    out = _entries(run_dir)
    for e in out:
        if e.event == "run-end":
            e.data["final_sha256"] = fake
    metrics["final_model_sha256"] = fake
    metrics["rounds"][-1]["model_sha256"] = fake
    _resign_server(run_dir, out, _server_key(run), metrics)
    v = _verdict(run_dir, run)
    assert not v.ok and any("final model is not the last round's aggregate" in p.what for p in v.problems)
    run_dir = _copy(run, tmp_path / "participants")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["rounds"][-1].update(sites=["site-1"], refused=["site-2"])
    _resign_server(run_dir, _entries(run_dir), _server_key(run), metrics)
    v = _verdict(run_dir, run)
    assert not v.ok and any("round 2: sites is not what the server's log records" in p.what for p in v.problems)
    assert any("round 2: refused is not what the server's log records" in p.what for p in v.problems)


def test_a_dropped_site_workspace_and_duplicate_keys_are_caught(run: dict[str, Path | str], tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "dropped")
    shutil.rmtree(run_dir / "sites" / "site-2")  # the operator decides which site folders the run directory holds
    r = _cli("verify", str(run_dir), "--roster", str(run["roster"]))
    assert r.returncode == 1 and "site site-2 took part in run" in r.stderr and "--allow-missing site-2" in r.stderr
    r = _cli("verify", str(run_dir), "--roster", str(run["roster"]), "--allow-missing", "site-2", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["unchecked_sites"] == ["site-2"]
    run_dir = _copy(run, tmp_path / "duplicate")
    text = (run_dir / "metrics.json").read_text()
    (run_dir / "metrics.json").write_text(text.replace('"rounds":', '"run_id": "0", "rounds":', 1))
    r = _cli("verify", str(run_dir), "--roster", str(run["roster"]))
    assert r.returncode == 2 and "duplicate key 'run_id'" in r.stderr


def _like(e: Entry, event: str, **data: object) -> Entry:
    return Entry(e.seq, e.time, e.actor, event, {"run_id": e.data["run_id"], **data}, e.prev, e.hash, e.sig)


def test_a_round_declared_abandoned_to_hide_its_replies_is_caught(run: dict[str, Path | str], tmp_path: Path) -> None:
    """The operator applies round 2, drops the sites' training replies of round 2 from its log and
    declares the round abandoned (a stop and a resume) so that verify would excuse the sites'
    entries without a server reply: an abandoned round may not be applied or ended."""
    run_dir = _copy(run, tmp_path / "abandoned")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = []
    for e in _entries(run_dir):
        if e.event == "site-reply" and e.data["round"] == 2 and e.data["status"] == "trained":
            continue
        out.append(e)
        if e.event == "round-start" and e.data["round"] == 2:
            out.append(_like(e, "run-stopped", reason="SIGTERM", round=1, final_sha256=e.data["global_sha256"],
                             abandoned=2))
    _resign_server(run_dir, out, _server_key(run), metrics)
    v = _verdict(run_dir, run)
    whats = " | ".join(p.what for p in v.problems)
    assert not v.ok and "round 2 of run" in whats and "declared abandoned" in whats, whats


def test_a_resume_that_reuses_a_round_number_is_caught(run: dict[str, Path | str], tmp_path: Path) -> None:
    """A resumed run that asks for a round number again (to get a second release under it) is caught."""
    run_dir = _copy(run, tmp_path / "reused")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = []
    for e in _entries(run_dir):
        if e.event == "round-start" and e.data["round"] == 2:
            out.append(_like(e, "run-resumed", next_round=1, global_sha256=e.data["global_sha256"], abandoned=None))
        out.append(e)
    _resign_server(run_dir, out, _server_key(run), metrics)
    v = _verdict(run_dir, run)
    whats = " | ".join(p.what for p in v.problems)
    assert not v.ok and "resumes at round 1, which is not after every round it started" in whats, whats


def _relabelled_as_lost(run: dict[str, Path | str], dest: Path, label: str, *, leave_out: bool) -> Path:
    """A copy whose server log, re-signed, says site-2's round-2 reply was lost (logged as ``label``),
    its ε gone from the row; ``leave_out``: and site-2 left out of the round's aggregate."""
    run_dir = _copy(run, dest)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = _entries(run_dir)
    for e in out:
        if e.event == "site-reply" and e.data["round"] == 2 and e.data["site"] == "site-2" \
                and e.data["status"] == "trained":
            e.data.update(site=label, status="failed", site_head=None, epsilon=None)
        if leave_out and e.event == "aggregate-applied" and e.data["round"] == 2:
            e.data["sites"] = [s for s in e.data["sites"] if s != "site-2"]
    row = metrics["rounds"][1]
    row.update(failed=[label], epsilon={s: v for s, v in row["epsilon"].items() if s != "site-2"})
    if leave_out:
        row["sites"] = [s for s in row["sites"] if s != "site-2"]
    _resign_server(run_dir, out, _server_key(run), metrics)
    return run_dir


@pytest.mark.parametrize("label", ["site-2", "node-4242"])
def test_a_used_update_relabelled_as_lost_is_caught(run: dict[str, Path | str], tmp_path: Path, label: str) -> None:
    """verify excuses a site's training entry without a server reply when the server logged the site
    (or a node it could not name) as failed: a site killed after training. The operator relabels
    site-2's round-2 reply as failed (to hide its ε release) but keeps the update in the aggregate: an
    aggregate may only name sites with a trained reply."""
    run_dir = _relabelled_as_lost(run, tmp_path / f"relabelled-{label}", label, leave_out=False)
    v = _verdict(run_dir, run)
    whats = " | ".join(p.what for p in v.problems)
    assert not v.ok and "round 2: the aggregate names sites that did not train" in whats, whats
    assert "site log records round 2" not in whats  # the lost-reply excuse applied; the aggregate check did not


@pytest.mark.parametrize("label", ["site-2", "node-4242"])
def test_a_crafted_model_sent_to_a_site_relabelled_as_lost_is_caught(run: dict[str, Path | str], tmp_path: Path,
                                                                       label: str) -> None:
    """Red-team finding: the operator sends site-2 alone a crafted model in round 2, keeps site-2's
    update for itself and logs its reply as lost (by name, or as a node it could not name), leaving
    it out of the aggregate. Site-2's honest log records the hash of the model it received (emulated
    by re-signing its log with its own key: that is the log the honest site would have written). The
    lost-reply excuse must not skip the check that every site trained on the round's one model."""
    run_dir = _relabelled_as_lost(run, tmp_path / f"crafted-{label}", label, leave_out=True)
    site_log = run_dir / "sites" / "site-2" / "audit.jsonl"
    entries = [Entry(e.seq, e.time, e.actor, e.event, dict(e.data), e.prev, e.hash, e.sig) for e in read_entries(site_log)]
    for e in entries:
        if e.event == "round-trained" and e.data["round"] == 2:
            e.data["global_sha256"] = "c0ffee" * 10 + "c0ff"  # what the crafted model hashes to
    resign_log(site_log, entries, load_private_key(Path(run["keys"]) / "sites" / "site-2" / "audit.key"))
    v = _verdict(run_dir, run)
    whats = " | ".join(p.what for p in v.problems)
    assert not v.ok and "global model hash of round 2 differs from the server's" in whats, whats
