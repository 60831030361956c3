"""DP against a malicious server: each test plays the attack on the site's real ClientApp (real
Flower messages, real Opacus, real DICOM) and asserts on what the attacker learns."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from client.budget import evaluation_mechanism
from client.config import PrivacyPolicy, load_site_config
from client.models import build_model, get_arrays
from client.site_ledger import commit, open_ledger
from privacy import egress as K
from privacy.audit.log import read_entries
from privacy.dp import epsilon
from privacy.dp_metrics import BINS, LOSS_CLIP, SENSITIVITY, binned_auroc, release
from privacy.ledger import LedgerCorruptError, LedgerEvent, now_utc
from privacy.quantise import quantise
from tests.adversarial.harness import MaliciousServer, metrics, request, update
from tests.conftest import make_workspace
from tests.helpers import site_ledger

ROOT = Path(__file__).parents[2]
OPEN = {"require_secure_aggregation": False}  # the attacker sees the update in the clear


def _site(tmp_path: Path, data: Path, name: str = "site-a", **policy: object) -> Path:
    return make_workspace(tmp_path, name, data, **{**OPEN, **policy})


def _twin(tmp_path: Path, data: Path, **policy: object) -> tuple[Path, Path]:
    """The victim and the attacker's replica of it: same data, same ledger, same model, same code."""
    return _site(tmp_path / "victim", data, **policy), _site(tmp_path / "replica", data, **policy)


def _flat(arrays: OrderedDict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()])


def test_server_cannot_replay_noise(tmp_path: Path, small_site: Path) -> None:
    """The server knows the request, the model, the patient count, even the images (its replica
    holds the site's own data): with randomness the site draws from its CSPRNG, the replica's
    update differs from the site's in every round, by as much as two independent DP draws."""
    victim, replica = _twin(tmp_path, small_site)
    for rnd in (1, 2):
        req = request(server_round=rnd)
        site_update = _flat(update(MaliciousServer(victim).train(req)))
        guess = _flat(update(MaliciousServer(replica).train(req)))
        again = _flat(update(MaliciousServer(replica).train(request(server_round=rnd, run_id="run-evil-2"))))
        assert not np.array_equal(site_update, guess), rnd
        # the attacker's guess is no closer to the site's update than another independent draw
        assert np.linalg.norm(site_update - guess) > 0.5 * np.linalg.norm(again - guess), rnd
    # with the site's own seed the noise is reproducible, and every entry says so
    seeded_victim, seeded_replica = _twin(tmp_path / "seeded", small_site, seed=1234)
    req = request(server_round=1)
    a = _flat(update(MaliciousServer(seeded_victim).train(req)))
    b = _flat(update(MaliciousServer(seeded_replica).train(req)))
    np.testing.assert_array_equal(a, b)  # exact: same seed, same data, same operations
    trained = [e for e in read_entries(seeded_victim / "audit.jsonl") if e.event == "round-trained"]
    joined = [e for e in read_entries(seeded_victim / "audit.jsonl") if e.event == "run-joined"]
    assert trained[-1].data["deterministic_noise"] is True and joined[-1].data["deterministic_noise"] is True
    plain = [e for e in read_entries(victim / "audit.jsonl") if e.event == "round-trained"]
    assert [e.data["deterministic_noise"] for e in plain] == [False, False]


def test_a_request_claiming_one_round_spends_no_more_than_the_per_round_cap(tmp_path: Path, small_site: Path) -> None:
    ws = _site(tmp_path, small_site, max_epsilon=8.0, max_epsilon_per_round=2.0, metrics="exact")
    server = MaliciousServer(ws)
    spent = 0.0
    for run in ("run-a", "run-b", "run-c"):  # a fresh "1-round run" every time
        reply = metrics(server.train(request(run_id=run, num_rounds=1, server_round=1)))
        ledger = site_ledger(ws)
        now = ledger.epsilon(delta=ledger.events[-1].delta)
        assert now - spent <= 2.0 + 1e-9 and reply[K.EPSILON] == quantise(K.EPSILON, now)  # 4 digits, rounded up
        spent = now
    assert spent <= 6.0 + 1e-9
    # the same attack on a site without a per-round cap would have spent its whole budget at once
    loose = _site(tmp_path / "loose", small_site, max_epsilon=8.0, max_epsilon_per_round=100.0, metrics="exact")
    assert metrics(MaliciousServer(loose).train(request(num_rounds=1)))[K.EPSILON] > 7.9
    # and a run may not exceed the site's own number of rounds, whatever the server says
    capped = _site(tmp_path / "capped", small_site, max_rounds_per_run=2, metrics="exact")
    cs = MaliciousServer(capped)
    for rnd in (1, 2):
        assert K.REFUSED not in metrics(cs.train(request(server_round=rnd, num_rounds=50)))
    third = metrics(cs.train(request(server_round=3, num_rounds=50)))
    assert third[K.REFUSED] == 1 and third[K.REFUSAL_CODE] == 3
    assert read_entries(capped / "audit.jsonl")[-1].data["reason"] == "round-cap"


def _crafted(bias: float = 1.0) -> OrderedDict[str, np.ndarray]:
    """Weights 0, head bias 1: every image gets the same score, so the loss counts the positives."""
    arrays = get_arrays(build_model(seed=0))
    crafted = OrderedDict((k, np.zeros_like(v)) for k, v in arrays.items())
    crafted["head.bias"] = np.full_like(arrays["head.bias"], bias)
    return crafted


def _positive_fraction(loss: float) -> float:
    """The attack: with score z = 1 everywhere, loss = f·log(1+e^-1) + (1-f)·log(1+e^1), so the
    loss gives the fraction f of positive labels."""
    lp, ln = np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))
    return float((ln - loss) / (ln - lp))


def test_crafted_model_evaluation_learns_only_through_metered_noise(tmp_path: Path, small_site: Path) -> None:
    config = load_site_config(_site(tmp_path / "exact", small_site, metrics="exact"))
    from client.site import load_site_data

    val = load_site_data(config, image_size=16).val
    # against exact metrics the attack works: it reads the share of positive validation images
    exact = metrics(MaliciousServer(config.workspace).evaluate(request(), _crafted()))
    # to 1e-4: the loss leaves with 4 significant digits (privacy.quantise)
    assert _positive_fraction(exact[K.VAL_LOSS]) == pytest.approx(val.labels.mean(), abs=1e-4)

    # the default, metered; seeded only to make the test repeatable; a larger budget for eight rounds
    ws = _site(tmp_path / "dp", small_site, seed=99, max_epsilon=50.0)
    server = MaliciousServer(ws)
    guesses = []
    for rnd in range(1, 9):
        assert K.REFUSED not in metrics(server.train(request(server_round=rnd)))  # it evaluates rounds it trained
        reply = metrics(server.evaluate(request(server_round=rnd), _crafted()))
        guesses.append(_positive_fraction(reply[K.VAL_LOSS]))
        ledger = site_ledger(ws)
        assert ledger.events[-1].kind == "evaluate" and ledger.events[-1].noise_multiplier == 10.0
        assert reply[K.EPSILON] == quantise(K.EPSILON, ledger.epsilon(delta=ledger.events[-1].delta))
    # every evaluation was charged: 8 events of (σ=10, q=1, 1 step), composed with the 8 training rounds
    assert [e.kind for e in site_ledger(ws).events] == ["train", "evaluate"] * 8
    # a second evaluation of the same round is refused and audited
    again = metrics(server.evaluate(request(server_round=8), _crafted()))
    assert again[K.REFUSED] == 1 and again[K.REFUSAL_CODE] == K.REFUSED_METRICS
    assert read_entries(ws / "audit.jsonl")[-1].data["refused"] == "not-trained-or-evaluated"
    # what the attacker learned: the metered loss is per patient; its guesses of the patients' mean positive
    # share miss by more than one whole patient on average (noise std in loss: 10·√2·4/patients); the
    # formal bound is the next test's
    truth = float(np.mean([val.labels[g].mean() for g in val.patient_images()]))
    errors = np.abs(np.array(guesses) - truth)
    assert np.mean(errors) > 1.0 / val.n_patients, (guesses, truth)


def _label_attack(noise_multiplier: float, trials: int = 4000) -> float:
    """The DP adversary knows every other patient exactly and guesses one patient's label from
    one release; the only label-dependent output is the AUROC, so it picks the hypothesis whose
    AUROC is nearer the released one. Returns its accuracy."""
    rng = np.random.default_rng(0)
    others = np.zeros(2 * BINS + 1)  # overlapping classes, so the target's label moves the AUROC
    others[:BINS] = [0, 0, 5, 8, 8, 8, 6, 5, 0, 0]
    others[BINS:2 * BINS] = [0, 0, 0, 4, 6, 8, 8, 6, 3, 0]
    others[-1] = 20.0
    target = 5  # the target's score bin; its loss term is the same under both hypotheses
    hypotheses = []
    for label in (0, 1):
        sums = others.copy()
        sums[label * BINS + target] += 1.0
        sums[-1] += 0.5 / LOSS_CLIP
        hypotheses.append(sums)
    auc = [binned_auroc(h[:BINS], h[BINS:2 * BINS]) for h in hypotheses]
    right = 0
    for i in range(trials):
        label = i % 2
        released = release(hypotheses[label], noise_multiplier=noise_multiplier, rng=rng).auroc
        guess = int(abs(released - auc[1]) < abs(released - auc[0])) if released is not None else 0
        right += guess == label
    return right / trials


def test_one_patients_label_is_hidden_within_the_accounted_epsilon() -> None:
    assert _label_attack(1e-6) == 1.0  # without the noise the attack reads the label every time
    eps = epsilon([evaluation_mechanism(PrivacyPolicy())], delta=1e-5)  # what the ledger charges
    bound = np.exp(eps) / (1 + np.exp(eps)) + 1e-5  # the most any test can get right from an (ε, δ)-DP release
    accuracy = _label_attack(PrivacyPolicy().eval_noise_multiplier)
    assert accuracy <= bound + 0.024, (accuracy, bound)  # 0.024: 3 standard errors of 4,000 trials
    assert SENSITIVITY == pytest.approx(np.sqrt(2.0))


CONCURRENT = """
import sys
from pathlib import Path
from client.audit_trail import RoundIds, SiteAudit
from client.config import load_site_config
from client.site_ledger import commit
from privacy.ledger import LedgerEvent, now_utc

site = load_site_config(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):  # as a training round does: the ledger event, then the audit entry
    _, event = commit(site, lambda ledger: LedgerEvent(round=i + 1, run_id=sys.argv[2], noise_multiplier=1.0 + 0.01 * i,
                                                       sample_rate=0.25, steps=10, accountant="rdp",
                                                       epsilon_after=0.0, delta=1e-5, timestamp=now_utc()))
    SiteAudit(site).trained(RoundIds(sys.argv[2], i + 1, "0" * 64), event, patients=20, deterministic=False)
"""


def test_concurrent_runs_lose_no_ledger_event(tmp_path: Path, small_site: Path) -> None:
    ws = _site(tmp_path, small_site)
    config = load_site_config(ws)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(ws), run, "25"], cwd=ROOT)
             for run in ("run-x", "run-y")]
    try:
        reads = 0
        while any(p.poll() is None for p in procs) and reads < 10_000:
            open_ledger(config)  # a third process reading meanwhile never sees a false "rolled back"
            reads += 1
        assert [p.wait(timeout=300) for p in procs] == [0, 0] and reads > 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ledger = site_ledger(ws)
    assert sorted((e.run_id, e.round) for e in ledger.events) == sorted(
        (run, r) for run in ("run-x", "run-y") for r in range(1, 26))
    expected = epsilon([e.mechanism() for e in ledger.events], delta=1e-5)
    assert ledger.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-12) and expected > 0


def test_deleted_or_rolled_back_ledger_is_refused_and_rebuilt(tmp_path: Path, small_site: Path) -> None:
    ws = _site(tmp_path, small_site, metrics="exact")
    server = MaliciousServer(ws)
    metrics(server.train(request(server_round=1)))
    old = (ws / "ledger.json").read_bytes()
    metrics(server.train(request(server_round=2)))
    spent = site_ledger(ws).epsilon(delta=site_ledger(ws).events[-1].delta)
    config = load_site_config(ws)
    (ws / "ledger.json").write_bytes(old)  # rolled back one round: a validly signed, older ledger
    with pytest.raises(LedgerCorruptError, match="rolled back.*--rebuild"):
        open_ledger(config)
    # training refuses too: the budget is never computed from a ledger that forgot a round
    reply = server.train(request(server_round=3))
    assert reply.has_error() and reply.error.code == 461 and str(ws) not in reply.error.reason
    (ws / "ledger.json").unlink()  # deleted
    r = subprocess.run([sys.executable, "-m", "client.cli", "budget", "--workspace", str(ws)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "does not exist" in r.stderr and "--rebuild" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "client.cli", "budget", "--workspace", str(ws), "--rebuild", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epsilon"] == pytest.approx(spent, rel=1e-9)
    assert metrics(server.train(request(server_round=3)))[K.EPSILON] > spent  # it trains again, counting on


@pytest.mark.parametrize("line", ["max_epsilon = nan", "max_epsilon = inf", "max_grad_norm = inf", "delta = nan",
                                  "max_epsilon_per_round = -inf", "eval_noise_multiplier = 0.0"])
def test_non_finite_policies_are_refused_with_the_field_named(tmp_path: Path, small_site: Path, line: str) -> None:
    ws = _site(tmp_path, small_site)
    # a prior spend far over any budget: under max_epsilon = nan the old code trained anyway
    commit(load_site_config(ws), lambda _: LedgerEvent(round=1, run_id="old", noise_multiplier=0.3, sample_rate=1.0,
                                                       steps=1000, accountant="rdp", epsilon_after=0.0, delta=1e-5,
                                                       timestamp=now_utc()))
    field = line.split(" =")[0]
    lines = [ln for ln in (ws / "site.toml").read_text().splitlines() if not ln.startswith(f"{field} =")]
    at = lines.index("[privacy]") + 1
    (ws / "site.toml").write_text("\n".join([*lines[:at], line, *lines[at:]]) + "\n")
    r = subprocess.run([sys.executable, "-m", "client.cli", "budget", "--workspace", str(ws)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and f"privacy.{field}" in r.stderr and "must be a finite number in" in r.stderr
    assert str(ws / "site.toml") in r.stderr and "Traceback" not in r.stderr + r.stdout
    reply = MaliciousServer(ws).train(request())
    assert reply.has_error() and reply.error.code == 460 and reply.error.reason == "site configuration invalid"
    assert len(site_ledger(ws).events) == 1  # nothing trained, nothing charged


def test_a_crafted_non_finite_or_huge_model_is_refused_before_anything_is_charged(tmp_path: Path,
                                                                                   small_site: Path) -> None:
    """The red team's training-label oracle sent a head weight of -3e38 so that one patient's gradient
    overflowed to inf only when its label was 1; an evaluation with a bias of -inf made the loss NaN
    only for negatives. Both models are refused as malformed (one fixed code) before any ledger event."""
    ws = _site(tmp_path, small_site)
    server = MaliciousServer(ws)
    huge = _crafted(-1e4)
    huge["head.weight"] = np.full_like(huge["head.weight"], -3e38)
    infinite = _crafted(float("-inf"))
    replies = [server.train(request(server_round=1), huge), server.train(request(server_round=1), infinite),
               server.evaluate(request(server_round=1), infinite)]
    assert [(r.error.code, r.error.reason) for r in replies] == [(462, "round request malformed or out of range")] * 3
    assert not (ws / "ledger.json").exists()


def test_extreme_bounded_models_always_get_a_metered_release(tmp_path: Path, small_site: Path) -> None:
    """Within the bounds, a logit of any size is clipped per image before the loss and the bins, so
    no model makes the release fail for one patient and not another: every reply is a release."""
    ws = _site(tmp_path, small_site, max_epsilon=50.0)
    server = MaliciousServer(ws)
    for rnd, bias in enumerate((-1e4, 1e4, 0.0, -37.0), start=1):
        assert K.REFUSED not in metrics(server.train(request(server_round=rnd, num_rounds=4)))  # rounds it trained
        model = _crafted(bias)
        model["head.weight"] = np.full_like(model["head.weight"], 1e4 if rnd % 2 else -1e4)
        m = metrics(server.evaluate(request(server_round=rnd, num_rounds=4), model))
        assert K.REFUSED not in m and np.isfinite(m[K.VAL_LOSS]) and 0 <= m[K.VAL_LOSS] <= LOSS_CLIP, (bias, m)


def test_a_requested_noise_equal_to_an_identifier_is_never_echoed(tmp_path: Path, small_site: Path) -> None:
    """The site used to echo max(own σ, requested σ); a request of 57 was blocked by the egress guard
    exactly when some patient's AccessionNumber was "57": a membership oracle on identifiers."""
    import shutil

    import pydicom

    data = tmp_path / "data"
    shutil.copytree(small_site, data)
    for f in sorted(data.rglob("*.dcm"))[:3]:
        ds = pydicom.dcmread(f)
        ds.AccessionNumber = "57"
        ds.save_as(f)
    ws = _site(tmp_path, data, metrics="exact")
    server = MaliciousServer(ws)
    got = [metrics(server.train(request(server_round=rnd, noise_multiplier=value))) for rnd, value in
           enumerate((57.0, 58.0), start=1)]
    assert all(K.REFUSED not in m for m in got)  # neither blocked: nothing tells 57 from 58
    assert all(m[K.NOISE_MULTIPLIER] < 57 and m[K.NOISE_OVERRIDDEN] == 0 for m in got)  # the site's own σ


def test_server_cannot_reuse_a_round_for_a_second_allowance(tmp_path: Path, small_site: Path) -> None:
    ws = _site(tmp_path, small_site)
    server = MaliciousServer(ws)
    assert metrics(server.evaluate(request(server_round=1), _crafted()))[K.REFUSAL_CODE] == K.REFUSED_METRICS
    assert K.REFUSED not in metrics(server.train(request(server_round=1)))
    again = metrics(server.train(request(server_round=1)))
    assert again[K.REFUSED] == 1 and again[K.REFUSAL_CODE] == 5  # one answer per round of a run
    assert K.REFUSED not in metrics(server.evaluate(request(server_round=1), _crafted()))
    assert metrics(server.evaluate(request(server_round=1), _crafted()))[K.REFUSAL_CODE] == K.REFUSED_METRICS
    assert [e.kind for e in site_ledger(ws).events] == ["train", "evaluate"]
    reasons = [e.data.get("reason") or e.data.get("refused") for e in read_entries(ws / "audit.jsonl")
               if e.event == "refused" or "refused" in e.data]
    assert reasons == ["not-trained-or-evaluated", "round-repeated", "not-trained-or-evaluated"]


def test_seeded_noise_never_repeats_when_the_server_reuses_round_numbers(tmp_path: Path, small_site: Path) -> None:
    """With privacy.seed the noise is reproducible, but two releases at one site never share it:
    a server that asks for round 1 of three runs cannot average the noise away."""
    ws = _site(tmp_path, small_site, seed=5, metrics="exact")
    server = MaliciousServer(ws)
    updates = [_flat(update(server.train(request(run_id=run, server_round=1)))) for run in ("a", "b", "c")]
    assert not np.array_equal(updates[0], updates[1]) and not np.array_equal(updates[1], updates[2])


def test_rebuild_never_lowers_the_recorded_spending(tmp_path: Path, small_site: Path) -> None:
    """A ledger whose signature no longer verifies (a damaged file, an older format) still counts:
    its events the audit log lacks are kept, so ε after the rebuild is at least the old file's."""
    import json as _json

    from client.site_ledger import rebuild

    ws = _site(tmp_path, small_site, metrics="exact")
    metrics(MaliciousServer(ws).train(request(server_round=1)))
    doc = _json.loads((ws / "ledger.json").read_text())
    doc["events"].append({**doc["events"][0], "round": 9, "noise_multiplier": 0.5})  # never audited
    doc["signature"] = "00" * 64
    (ws / "ledger.json").write_text(_json.dumps(doc))
    ledger, restored, unreadable = rebuild(load_site_config(ws))
    assert [(e.round, e.noise_multiplier) for e in ledger.events][-1] == (9, 0.5) and not unreadable
    assert len(ledger.events) == 2 and restored == 0
