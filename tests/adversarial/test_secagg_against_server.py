"""Secure aggregation against a malicious server: the server drives the sites' real SecAgg+
ClientApp mod (real Flower messages, real protocol core, real site workspaces, keys and pinned
roster) and deviates at will. Each attack is scored by what it recovers of the victim's update:
the correlation of the server's best estimate with the truth must stay below 0.05, and every
refusal is in the victim's audit log with its reason."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from client.audit_trail import site_key_path
from client.config import load_site_config, write_site_config
from client.secagg_mod import SECAGG_REFUSED, roster_path, secagg_mod
from privacy import egress as K
from privacy.audit.log import read_entries
from privacy.files import atomic_write_bytes
from privacy.keys import load_or_create_key, public_pem
from privacy.secagg.crypto import agree, combine_secret, expand_mask
from privacy.secagg.params import FRACTION_BITS, SecAggParams, default_k, required_threshold
from privacy.secagg.server import Aggregator
from privacy.secagg.site import (
    KeyAdvert,
    SiteSession,
    VerificationError,
    adverts_digest,
    graph_seed,
    holders,
    pair_context,
    self_context,
    transcript,
    vouchers_needed,
)
from privacy.secagg.wire import (
    adverts_from_bytes,
    adverts_to_bytes,
    boxes_from_bytes,
    boxes_to_bytes,
    load_roster,
    params_from_json,
    params_to_json,
    reveals_from_bytes,
    roster_bytes,
    session_from_bytes,
)
from tests.conftest import make_workspace

RUN, ROUND, DIM = "run-evil", 4, 4000
VICTIM = "site-1"


def stage_request(round_: int, stage: str, extra: dict[str, object]) -> Message:
    """The server's request for one SecAgg+ stage of round ``round_`` (``extra``: its config entries)."""
    conf = ConfigRecord({K.RUN_ID: RUN, K.SERVER_ROUND: round_, K.SECAGG_STAGE: stage})
    for k, v in extra.items():
        conf[k] = v  # type: ignore[assignment]
    md = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                  message_type=MessageType.TRAIN)
    return Message(RecordDict({K.CONFIG: conf}), metadata=md)


class Federation:
    """``n`` site workspaces with the real SecAgg+ mod; each site's "training" returns a known
    update, so what a server recovers can be compared with the truth."""

    def __init__(self, root: Path, data: Path, n: int = 5, **secagg: object) -> None:
        rng = np.random.default_rng(n)
        self.names = [f"site-{i + 1}" for i in range(n)]
        self.configs = {}
        for name in self.names:
            ws = make_workspace(root, name, data)
            config = load_site_config(ws)
            if secagg:
                config = replace(config, secagg=replace(config.secagg, **secagg))  # type: ignore[arg-type]
                write_site_config(config)
            load_or_create_key(site_key_path(config))
            self.configs[name] = config
        self.roster_doc = roster_bytes({c.name: public_pem(load_or_create_key(site_key_path(c)).public_key()).decode()
                                        for c in self.configs.values()})
        for config in self.configs.values():  # pinned out of band (the consortium's roster)
            atomic_write_bytes(roster_path(config), self.roster_doc)
        self.mods = {name: secagg_mod(lambda _, c=c: c) for name, c in self.configs.items()}
        self.contexts = {name: Context(run_id=1, node_id=i + 1, node_config={}, state=RecordDict(), run_config={})
                         for i, name in enumerate(self.names)}
        self.updates = {name: rng.normal(0, 0.05, DIM) for name in self.names}
        self.weights = {name: int(rng.integers(20, 200)) for name in self.names}
        self.trained: list[str] = []  # sites whose train handler ran, in order

    def _train(self, name: str):  # type: ignore[no-untyped-def]
        def train(msg: Message, ctx: Context) -> Message:
            self.trained.append(name)
            return Message(RecordDict({
                K.METRICS: MetricRecord({K.NUM_EXAMPLES: self.weights[name]}),
                K.SITE: ConfigRecord({K.SITE_NAME: name}),
                K.ARRAYS: ArrayRecord({"w": Array(self.updates[name].astype(np.float32))})}), reply_to=msg)
        return train

    def send(self, name: str, stage: str, **extra: object) -> Message:
        return self.mods[name](stage_request(ROUND, stage, extra), self.contexts[name], self._train(name))

    def refusal(self, name: str) -> str:
        entries = [e for e in read_entries(self.configs[name].workspace / "audit.jsonl") if e.event == "secagg-refused"]
        return str(entries[-1].data["reason"]) if entries else ""


def _secagg(reply: Message, key: str) -> bytes:
    assert not reply.has_error(), reply.error.reason
    return reply.content.config_records[K.SECAGG][key]  # type: ignore[return-value]


def refused(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == SECAGG_REFUSED


class Server:
    """The malicious server's view: everything it received, and its best estimate of one site's update."""

    def __init__(self, fed: Federation, **params: int) -> None:
        self.fed = fed
        self.params = SecAggParams.for_sites(RUN, ROUND, fed.names, **params)
        self.adverts: dict[str, KeyAdvert] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.reveals: dict[str, dict[str, tuple[str, bytes]]] = {}
        self.outboxes: dict[str, dict[str, bytes]] = {}

    def advertise(self, names: list[str] | None = None) -> None:
        for n in names or self.fed.names:
            self.adverts |= adverts_from_bytes(_secagg(self.fed.send(n, "advertise"), K.ADVERT))

    def share(self, params_for: dict[str, SecAggParams] | None = None) -> dict[str, Message]:
        replies = {}
        for n in self.fed.names:
            p = (params_for or {}).get(n, self.params)
            replies[n] = self.fed.send(n, "share", **{K.SECAGG_PARAMS: json.dumps(params_to_json(p)),
                                                      K.SECAGG_ADVERTS: adverts_to_bytes(self.adverts)})
            if not replies[n].has_error():
                self.outboxes[n] = boxes_from_bytes(_secagg(replies[n], K.OUTBOX))
        return replies

    def inbox(self, name: str) -> dict[str, bytes]:
        return {s: box[name] for s, box in self.outboxes.items() if name in box}

    def send_input(self, name: str, inbox: dict[str, bytes], sharers: list[str], **request: object) -> Message:
        """The input stage (``request``: the training request's config entries, none by default)."""
        reply = self.fed.send(name, "input", **{K.SECAGG_INBOX: boxes_to_bytes(inbox), K.SECAGG_SHARERS: sharers},
                              **request)
        if not reply.has_error():
            self.masked[name] = reply.content.array_records[K.MASKED][K.MASKED].numpy()
        return reply

    def consistency(self, name: str, survivors: list[str]) -> Message:
        return self.fed.send(name, "consistency", **{K.SECAGG_SURVIVORS: survivors})

    def unmask(self, name: str, signatures: dict[str, bytes]) -> Message:
        reply = self.fed.send(name, "unmask", **{K.SECAGG_SIGNATURES: boxes_to_bytes(signatures)})
        if not reply.has_error():
            self.reveals[name] = reveals_from_bytes(_secagg(reply, K.REVEALS))
        return reply

    def _secret(self, owner: str, kind: str) -> bytes | None:
        shares = [got[owner][1] for got in self.reveals.values() if owner in got and got[owner][0] == kind]
        return combine_secret(shares[: self.params.threshold]) if len(shares) >= self.params.threshold else None

    def estimate(self, victim: str, extra: dict[str, bytes] | None = None) -> np.ndarray:
        """The best the server can do: the victim's masked input minus every mask whose seed it
        can reconstruct from what it was sent (``extra``: secrets handed to it, for the control)."""
        if victim not in self.masked:
            return np.zeros(DIM)
        vec = self.masked[victim].copy()
        secrets = dict(extra or {})
        b = secrets.get("b") or self._secret(victim, "b")
        if b is not None:
            vec -= expand_mask(b, self_context(self.params, victim), len(vec))
        c_victim = secrets.get("c") or self._secret(victim, "c")
        for peer in self.params.neighbours(victim):
            if peer not in self.adverts:
                continue
            c_peer = self._secret(peer, "c")
            if c_victim is not None:
                key = agree(c_victim, self.adverts[peer].c_pub)
            elif c_peer is not None:
                key = agree(c_peer, self.adverts[victim].c_pub)
            else:
                continue
            mask = expand_mask(key, pair_context(self.params, victim, peer), len(vec))
            vec = vec - mask if victim < peer else vec + mask
        return vec.view(np.int64)[:-1].astype(np.float64) / 2.0**FRACTION_BITS / self.fed.weights[victim]


def correlation(estimate: np.ndarray, truth: np.ndarray) -> float:
    if not np.any(estimate):
        return 0.0
    return float(np.corrcoef(estimate, truth)[0, 1])


@pytest.fixture
def fed(tmp_path: Path, small_site: Path) -> Federation:
    return Federation(tmp_path, small_site)


def _honest_until_input(server: Server) -> None:
    server.advertise()
    server.share()


def _honest_until_consistency(fed: Federation) -> Server:
    """A server that ran advertise, share and input honestly with every site."""
    server = Server(fed)
    _honest_until_input(server)
    sharers = sorted(server.outboxes)
    for n in fed.names:
        assert not server.send_input(n, server.inbox(n), sharers).has_error()
    return server


def test_the_estimator_recovers_an_update_from_its_secrets_control(fed: Federation) -> None:
    """Control: handed the victim's own seeds, the estimator reads its update (r > 0.99)."""
    server = _honest_until_consistency(fed)
    session = fed.contexts[VICTIM].state.config_records["secagg"]["session"]
    raw = json.loads(bytes(session))  # type: ignore[arg-type]
    est = server.estimate(VICTIM, {"b": bytes.fromhex(raw["b"]), "c": bytes.fromhex(raw["c_priv"])})
    assert correlation(est, fed.updates[VICTIM]) > 0.99
    assert abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05  # without them: nothing


def test_withheld_inbox_reveals_nothing(fed: Federation) -> None:
    server = Server(fed)
    _honest_until_input(server)
    sharers = sorted(server.outboxes)
    assert refused(server.send_input(VICTIM, {}, sharers))  # every neighbour's share withheld
    assert fed.refusal(VICTIM) == "secagg-incomplete-inbox"
    partial = dict(list(server.inbox(VICTIM).items())[:1])
    assert refused(server.send_input(VICTIM, partial, sharers))  # all but one withheld
    # or: claim the neighbours never shared; the victim then has too few share holders
    assert refused(server.send_input(VICTIM, {}, [VICTIM]))
    assert fed.refusal(VICTIM) == "secagg-too-few-holders"
    for n in fed.names[1:]:
        server.send_input(n, server.inbox(n), sharers)
    survivors = sorted(server.masked)
    sigs = {n: _secagg(server.consistency(n, survivors), K.CONSISTENCY) for n in survivors}
    for n in survivors:
        server.unmask(n, sigs)
    assert VICTIM not in server.masked and abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05


def test_a_threshold_below_the_site_floor_is_refused(tmp_path: Path, small_site: Path) -> None:
    fed = Federation(tmp_path, small_site, n=7)
    server = Server(fed)
    server.advertise()
    replies = server.share({VICTIM: replace(server.params, threshold=1)})  # t = 1 told to the victim only
    assert refused(replies[VICTIM]) and fed.refusal(VICTIM) == "secagg-threshold-below-floor"
    assert all(not replies[n].has_error() for n in fed.names[1:])
    low = Server(Federation(tmp_path / "t2", small_site, n=7))
    low.advertise()
    replies = low.share({n: replace(low.params, threshold=2) for n in low.fed.names})  # t = 2 of 7 (floor 4)
    assert all(refused(r) for r in replies.values())
    assert low.fed.refusal(VICTIM) == "secagg-threshold-below-floor"
    assert VICTIM not in server.outboxes and abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05


def test_ghost_survivors_are_refused(fed: Federation) -> None:
    server = _honest_until_consistency(fed)
    ghosts = [*sorted(server.masked), "ghost-1"]
    assert refused(server.consistency(VICTIM, ghosts)) and fed.refusal(VICTIM) == "secagg-ghost-site"
    assert refused(server.consistency(VICTIM, [n for n in fed.names if n != VICTIM]))  # a set without the victim
    # unmask before any signed set, or with forged signatures, reveals nothing
    forged = {n: Ed25519PrivateKey.generate().sign(b"x") for n in fed.names}
    assert refused(server.unmask(VICTIM, forged)) and fed.refusal(VICTIM) == "secagg-out-of-order"
    assert abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05


def test_server_cannot_steer_the_neighbour_graph(fed: Federation) -> None:
    """At consortium scale only the complete graph is accepted: no run id or round number a server
    grinds leaves a victim surrounded by chosen sites."""
    server = Server(fed)
    server.advertise()
    sparse = SecAggParams(RUN, ROUND, tuple(fed.names), k=3, threshold=2)
    replies = server.share({n: sparse for n in fed.names})
    assert all(refused(r) for r in replies.values()) and fed.refusal(VICTIM) == "secagg-graph-not-complete"
    assert abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05


def test_sybil_rosters_and_two_site_rounds_are_refused(tmp_path: Path, small_site: Path) -> None:
    fed = Federation(tmp_path, small_site, n=3)
    victim = fed.configs[VICTIM]
    roster_path(victim).unlink()  # a site that has pinned nothing yet
    sybils = {f"sybil-{i}": public_pem(Ed25519PrivateKey.generate().public_key()).decode() for i in (1, 2)}
    theirs = roster_bytes({VICTIM: public_pem(load_or_create_key(site_key_path(victim)).public_key()).decode(), **sybils})
    reply = fed.send(VICTIM, "advertise", **{K.SECAGG_ROSTER: theirs})
    assert refused(reply) and fed.refusal(VICTIM) == "secagg-roster-not-pinned"  # no trust on first use
    from client.roster import expect
    from privacy.secagg.wire import roster_fingerprint

    expect(victim, roster_fingerprint(fed.roster_doc))  # the consortium's fingerprint, out of band
    assert refused(fed.send(VICTIM, "advertise", **{K.SECAGG_ROSTER: theirs}))
    assert fed.refusal(VICTIM) == "secagg-roster-mismatch"
    assert not fed.send(VICTIM, "advertise", **{K.SECAGG_ROSTER: fed.roster_doc}).has_error()
    # a 2-site round (the victim and one other) is refused, whoever the other is (a fresh federation: a site
    # never advertises twice in one round)
    fed = Federation(tmp_path / "pair", small_site, n=3)
    server = Server(fed)
    server.advertise()
    pair = SecAggParams(RUN, ROUND, (VICTIM, "site-2"), k=3, threshold=2)
    pair_adverts = {n: server.adverts[n] for n in pair.sites}
    reply = fed.send(VICTIM, "share", **{K.SECAGG_PARAMS: json.dumps(params_to_json(pair)),
                                         K.SECAGG_ADVERTS: adverts_to_bytes(pair_adverts)})
    assert refused(reply) and fed.refusal(VICTIM) == "secagg-too-few-sites"


def test_telling_half_the_sites_that_the_victim_dropped_reveals_nothing(fed: Federation) -> None:
    server = _honest_until_consistency(fed)
    full = sorted(server.masked)
    without = [n for n in full if n != VICTIM]
    told_dropped, told_alive = ["site-2", "site-3"], [VICTIM, "site-4", "site-5"]
    sigs_dropped = {n: _secagg(server.consistency(n, without), K.CONSISTENCY) for n in told_dropped}
    sigs_alive = {n: _secagg(server.consistency(n, full), K.CONSISTENCY) for n in told_alive}
    for n in told_dropped:  # 2 signatures on "victim dropped": below the threshold of 3
        assert refused(server.unmask(n, sigs_dropped)) and fed.refusal(n) == "secagg-equivocation"
        assert refused(server.unmask(n, {**sigs_dropped, **sigs_alive}))  # signatures on the other set fail
    for n in told_alive:
        assert not server.unmask(n, sigs_alive).has_error()  # they reveal the victim's b only
    assert abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05
    assert all(kind == "b" for got in server.reveals.values() for kind, _ in got.values())


def test_honest_server_gets_the_exact_sum_through_the_mods(fed: Federation) -> None:
    agg = Aggregator(SecAggParams.for_sites(RUN, ROUND, fed.names))
    server = Server(fed)
    server.advertise()
    params, relay = agg.collect_adverts(server.adverts)
    server.params = params
    server.share()
    inboxes, sharers = agg.route_shares(server.outboxes)
    for n in fed.names:
        server.send_input(n, inboxes[n], sharers)
    survivors = agg.collect_inputs(server.masked)
    sigs = agg.collect_signatures({n: _secagg(server.consistency(n, survivors), K.CONSISTENCY) for n in survivors})
    for n in survivors:
        server.unmask(n, sigs)
    total, weight = agg.finish(server.reveals)
    exact = sum(fed.weights[n] * fed.updates[n].astype(np.float32).astype(np.float64) for n in fed.names)
    assert weight == sum(fed.weights.values())
    assert np.abs(total / weight - exact / weight).max() <= len(fed.names) / (2 ** (FRACTION_BITS + 1) * weight)
    assert len(holders(params, VICTIM, set(server.adverts))) == 5


def test_a_round_is_never_restarted_and_stages_are_bound_to_it(fed: Federation) -> None:
    """The red team restarted a round (a second advertise gave fresh keys) and mixed per-site
    rounds, so signatures from one session counted in another: a site now advertises once per
    round (audited), refuses a stage that names another run or round, and a signature counts only
    for the very round (parameters, advertisements, U2, U3) the signer saw."""
    server = Server(fed)
    _honest_until_input(server)
    again = fed.send(VICTIM, "advertise")
    assert refused(again) and fed.refusal(VICTIM) == "secagg-re-advertise"
    sharers = sorted(server.outboxes)
    wrong = fed.send(VICTIM, "input", **{K.SECAGG_INBOX: boxes_to_bytes(server.inbox(VICTIM)), K.SECAGG_SHARERS: sharers,
                                          K.RUN_ID: "another-run"})
    assert refused(wrong) and fed.refusal(VICTIM) == "secagg-wrong-round"
    for n in fed.names:
        assert not server.send_input(n, server.inbox(n), sharers).has_error()
    survivors = sorted(server.masked)
    sigs = {n: _secagg(server.consistency(n, survivors), K.CONSISTENCY) for n in survivors}
    # the same sites' signatures on the same survivor set, but over another view of the round (another U2, as a
    # server would show a second group), do not count
    session = json.loads(bytes(fed.contexts[VICTIM].state.config_records["secagg"]["session"]))  # type: ignore[arg-type]
    params = params_from_json(session["params"])
    view = transcript(params, server.adverts, [n for n in sharers if n != "site-5"], survivors)
    keys = {n: load_or_create_key(site_key_path(c)) for n, c in fed.configs.items()}
    mixed = {**{n: sigs[n] for n in survivors[:2]}, **{n: keys[n].sign(view) for n in survivors[2:]}}
    assert refused(server.unmask(VICTIM, mixed)) and fed.refusal(VICTIM) == "secagg-equivocation"
    assert not server.unmask(VICTIM, sigs).has_error()


LARGE_DIM = 20000  # |r| of an unrelated vector stays below 0.05 by 7 standard deviations


class LargeFederation:
    """A round above the complete graph's size (100 sites): the victim is a real site workspace
    behind the real mod (with a known update); the 99 others run the real protocol core, and the
    server holds the secrets of ``colluders`` of them."""

    def __init__(self, root: Path, data: Path, n: int = 100, colluders: int = 30, **secagg: object) -> None:
        ws = make_workspace(root, VICTIM, data)
        self.victim = load_site_config(ws)
        if secagg:
            self.victim = replace(self.victim, secagg=replace(self.victim.secagg, **secagg))  # type: ignore[arg-type]
            write_site_config(self.victim)
        victim_key = load_or_create_key(site_key_path(self.victim))
        self.names = [VICTIM, *(f"site-{i:03d}" for i in range(2, n + 1))]
        self.ids = {name: Ed25519PrivateKey.generate() for name in self.names[1:]}
        pems = {VICTIM: public_pem(victim_key.public_key()).decode(),
                **{name: public_pem(key.public_key()).decode() for name, key in self.ids.items()}}
        atomic_write_bytes(roster_path(self.victim), roster_bytes(pems))
        self.roster = load_roster(roster_path(self.victim))
        self.colluders = set(self.names[-colluders:]) if colluders else set()
        self.mod = secagg_mod(lambda _: self.victim)
        self.context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        self.update = np.random.default_rng(5).normal(0, 0.05, LARGE_DIM)

    def _train(self, msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({K.METRICS: MetricRecord({K.NUM_EXAMPLES: 50}), K.SITE: ConfigRecord({K.SITE_NAME: VICTIM}),
                                   K.ARRAYS: ArrayRecord({"w": Array(self.update.astype(np.float32))})}), reply_to=msg)

    def send(self, round_: int, stage: str, **extra: object) -> Message:
        return self.mod(stage_request(round_, stage, extra), self.context, self._train)

    def advertise(self, round_: int) -> tuple[dict[str, KeyAdvert], dict[str, SiteSession]]:
        adverts = adverts_from_bytes(_secagg(self.send(round_, "advertise"), K.ADVERT))
        sessions = {}
        for name, key in self.ids.items():
            sessions[name], adverts[name] = SiteSession.start(RUN, round_, name, key)
        return adverts, sessions

    def reveal(self, round_: int, params: SecAggParams, adverts: dict[str, KeyAdvert] | bytes) -> Message:
        raw = adverts if isinstance(adverts, bytes) else adverts_to_bytes(adverts)
        return self.send(round_, "reveal", **{K.SECAGG_PARAMS: json.dumps(params_to_json(params)), K.SECAGG_ADVERTS: raw})

    def share(self, round_: int, params: SecAggParams, adverts: dict[str, KeyAdvert] | bytes,
              nonces: dict[str, bytes]) -> Message:
        """The share request; ``nonces`` are those of the sites in ``params``."""
        raw = adverts if isinstance(adverts, bytes) else adverts_to_bytes(adverts)
        return self.send(round_, "share", **{K.SECAGG_PARAMS: json.dumps(params_to_json(params)), K.SECAGG_ADVERTS: raw,
                                             K.SECAGG_NONCES: boxes_to_bytes({n: nonces[n] for n in params.sites})})

    def colluding_holders(self, params: SecAggParams) -> int:
        return len(set(params.neighbours(VICTIM)) & self.colluders)

    def refusal(self) -> str:
        entries = [e for e in read_entries(self.victim.workspace / "audit.jsonl") if e.event == "secagg-refused"]
        return str(entries[-1].data["reason"]) if entries else ""

    def events(self, kind: str) -> list[int]:
        return [int(e.data["round"]) for e in read_entries(self.victim.workspace / "audit.jsonl") if e.event == kind]


def _seeded(params: SecAggParams, adverts: dict[str, KeyAdvert], nonces: dict[str, bytes]) -> SecAggParams:
    return replace(params, graph_seed=graph_seed(params.context(), adverts, {n: nonces[n] for n in adverts}))


def _unchecked_seed(adverts: dict[str, KeyAdvert], nonces: dict[str, bytes]) -> str:
    """The seed formula without the commitment check: what a server computes for a guessed nonce."""
    h = hashlib.sha256(b"medfed-secagg-graph-v3|" + adverts_digest(adverts).encode())
    for name in sorted(adverts):
        h.update(name.encode() + b"\0" + nonces[name])
    return h.hexdigest()


def test_the_server_cannot_grind_a_sparse_neighbour_graph(tmp_path: Path, small_site: Path) -> None:
    """Above 64 sites the graph is seeded by nonces each site committed to in its signed
    advertisement and revealed once the server fixed the round (parameters and advertisements),
    for that round only. The red team's attack (choose, offline, the subset of advertisements
    whose graph surrounds the victim with colluders) needs the nonces before the round is fixed:
    it gets them only after, and a round changed after them is refused."""
    big = LargeFederation(tmp_path, small_site)
    # round A: the server knows every other site's nonce and grinds the victim's set before the victim
    # reveals, guessing its nonce; the victim's real nonce makes the graph another one
    adverts, sessions = big.advertise(ROUND)
    honest = [n for n in adverts if n != VICTIM and n not in big.colluders]
    full = SecAggParams.for_sites(RUN, ROUND, list(adverts))
    nonces = {n: s.reveal(full, adverts, big.roster) for n, s in sessions.items()}
    guess = {**nonces, VICTIM: bytes(32)}
    with pytest.raises(VerificationError, match="does not open"):  # a guessed nonce opens no commitment, so the
        _seeded(full, adverts, guess)  # server can only grind on the graph as it would be with its guess:
    rng, predicted = np.random.default_rng(3), None
    for _ in range(20000):
        drop = set(rng.choice(honest, size=2, replace=False))
        subset = {n: a for n, a in adverts.items() if n not in drop}
        params = SecAggParams.for_sites(RUN, ROUND, list(subset))
        fake = replace(params, graph_seed=_unchecked_seed(subset, guess))
        if big.colluding_holders(fake) >= fake.threshold:
            predicted = (subset, params, set(fake.neighbours(VICTIM)))
            break
    assert predicted is not None, "control: with every nonce known the grind finds a surrounding set"
    subset, params, expected_neighbours = predicted
    nonce = _secagg(big.reveal(ROUND, params, subset), K.NONCE)
    real = _seeded(params, subset, {**nonces, VICTIM: nonce})
    assert set(real.neighbours(VICTIM)) != expected_neighbours  # the victim's nonce moved it
    outbox = boxes_from_bytes(_secagg(big.share(ROUND, real, subset, {**nonces, VICTIM: nonce}), K.OUTBOX))
    assert sorted(outbox) == sorted(real.neighbours(VICTIM))  # the honest continuation works through the mod
    assert big.events("secagg-revealed") == [ROUND] and big.events("secagg-masked") == []  # no input yet

    # round B: a sparse graph before the victim revealed is refused (whatever seed the server picked) ...
    round_b = ROUND + 1
    adverts, sessions = big.advertise(round_b)
    full = SecAggParams.for_sites(RUN, round_b, list(adverts))
    others = {n: s.reveal(full, adverts, big.roster) for n, s in sessions.items()}
    assert refused(big.share(round_b, replace(full, graph_seed="ab" * 32), adverts, {**others, VICTIM: bytes(32)}))
    assert big.refusal() == "secagg-graph-seed"
    # ... and once it revealed for the full round, the server, now holding every nonce, grinds a subset
    nonce = _secagg(big.reveal(round_b, full, adverts), K.NONCE)
    nonces = {**others, VICTIM: nonce}
    ground = None
    for _ in range(20000):
        drop = set(rng.choice(honest, size=int(rng.integers(1, 4)), replace=False))
        subset = {n: a for n, a in adverts.items() if n not in drop}
        candidate = _seeded(SecAggParams.for_sites(RUN, round_b, list(subset)), subset, nonces)
        if big.colluding_holders(candidate) >= candidate.threshold:
            ground = (subset, candidate)
            break
    assert ground is not None, "control: knowing the nonces, a surrounding subset exists and is found"
    subset, candidate = ground
    assert refused(big.share(round_b, candidate, subset, nonces)) and big.refusal() == "secagg-graph-seed"
    # a second reveal for the ground subset is refused too (the round is fixed once)
    assert refused(big.reveal(round_b, SecAggParams.for_sites(RUN, round_b, list(subset)), subset))
    assert big.refusal() == "secagg-equivocation"
    session = session_from_bytes(bytes(big.context.state.config_records["secagg"]["session"]))  # type: ignore[arg-type]
    assert session.params_ is None  # nothing of the victim's left in round B: no share, so no masked input


def test_a_sparse_round_cannot_change_after_the_reveal(tmp_path: Path, small_site: Path) -> None:
    """Red-team review of the commit-and-reveal design: (1) an unframed advertisement digest let
    the server move a site's entry into the previous entry's signature field, dropping it from the
    set with the digest unchanged; (2) k was chosen in the share stage, after the nonces were
    known, so the server picked the k whose ring window around the victim held a colluder
    majority (k = 5: 3 of 4 neighbours). Both recovered the victim's update (r = 1.000). Now field
    lengths are exact, the digest is length-prefixed, the reveal names the whole round's
    parameters (checked against the site's floors, k at least 2*ceil(log2 n)+3), and the share
    stage must name the same ones."""
    big = LargeFederation(tmp_path, small_site)
    adverts, sessions = big.advertise(ROUND)
    full = SecAggParams.for_sites(RUN, ROUND, list(adverts))
    # (2) k below the sparse floor at the reveal
    assert refused(big.reveal(ROUND, replace(full, k=5, threshold=3), adverts))
    assert big.refusal() == "secagg-k-below-floor"
    nonce = _secagg(big.reveal(ROUND, full, adverts), K.NONCE)
    nonces = {**{n: s.reveal(full, adverts, big.roster) for n, s in sessions.items()}, VICTIM: nonce}
    # (2) the server, knowing the ring, asks for another k (the red team's k = 5, or a larger one): refused
    order = _seeded(full, adverts, nonces)
    assert refused(big.share(ROUND, replace(order, k=5, threshold=3), adverts, nonces))
    assert big.refusal() == "secagg-k-below-floor"
    assert refused(big.share(ROUND, replace(order, k=21, threshold=11), adverts, nonces))
    assert big.refusal() == "secagg-graph-seed"
    assert refused(big.share(ROUND, replace(order, threshold=order.threshold + 1), adverts, nonces))
    assert big.refusal() == "secagg-graph-seed"
    # ... or the complete graph after a sparse reveal (third review: the binding was checked for sparse graphs only)
    complete = replace(order, k=len(order.sites) + 1, threshold=len(order.sites) // 2 + 1, graph_seed="")
    assert complete.complete and refused(big.share(ROUND, complete, adverts, nonces))
    assert big.refusal() == "secagg-graph-seed"
    # (1) an advertisement that absorbs the next site's entry: wrong field length, refused as malformed
    names = sorted(adverts)
    absorber, absorbed = next((a, b) for a, b in zip(names, names[1:], strict=False) if VICTIM not in (a, b))
    merged = json.loads(adverts_to_bytes(adverts))
    entry = adverts[absorbed]
    merged[absorber]["sig"] += (absorbed.encode() + b"\0" + entry.c_pub + entry.s_pub + entry.commit + entry.sig).hex()
    del merged[absorbed]
    raw = json.dumps(merged, sort_keys=True, separators=(",", ":")).encode()
    smaller = _seeded(SecAggParams.for_sites(RUN, ROUND, list(merged)), {n: adverts[n] for n in merged}, nonces)
    assert refused(big.share(ROUND, smaller, raw, nonces)) and big.refusal() == "secagg-malformed"
    # framing: the digest of the honest set differs from that of any set without one of its sites
    assert adverts_digest(adverts) != adverts_digest({n: adverts[n] for n in merged})
    # the honest round still goes on through the mod
    outbox = boxes_from_bytes(_secagg(big.share(ROUND, order, adverts, nonces), K.OUTBOX))
    assert sorted(outbox) == sorted(order.neighbours(VICTIM)) and len(outbox) == order.k - 1


def test_abandoned_sparse_rounds_are_capped_across_runs(tmp_path: Path, small_site: Path) -> None:
    """Red-team reviews: abandoning a sparse round after the reveal costs the server nothing (no
    training, no budget) and gives it a fresh random graph each time (10 rounds in 0.2 s found one
    with 9 colluders among the victim's 16 neighbours); a cap counted per run and up to the share
    stage was sidestepped by new run ids and by abandoning after the share. Every reveal and every
    masked input that follows one is audited, and of a site's last 64 reveals in any run at most
    ``max_abandoned_reveals`` may lack its masked input; a run id outside the identifier pattern
    is refused at every stage."""
    big = LargeFederation(tmp_path, small_site, max_abandoned_reveals=3)
    runs = iter(["run-a", "run-b", "run-a", "run-c"])  # new run ids do not reset the count
    for rnd in range(1, 5):
        run = next(runs)
        adverts = adverts_from_bytes(_secagg(big.send(rnd, "advertise", **{K.RUN_ID: run}), K.ADVERT))
        sessions = {}
        for name, key in big.ids.items():
            sessions[name], adverts[name] = SiteSession.start(run, rnd, name, key)
        params = SecAggParams(run, rnd, tuple(sorted(adverts)), k=default_k(len(adverts)),
                              threshold=default_k(len(adverts)) // 2 + 1)
        reply = big.send(rnd, "reveal", **{K.RUN_ID: run, K.SECAGG_PARAMS: json.dumps(params_to_json(params)),
                                           K.SECAGG_ADVERTS: adverts_to_bytes(adverts)})
        if rnd == 4:
            assert refused(reply) and big.refusal() == "secagg-too-many-abandoned"
            break
        nonces = {**{n: sess.reveal(params, adverts, big.roster) for n, sess in sessions.items()},
                  VICTIM: _secagg(reply, K.NONCE)}
        seeded = _seeded(params, adverts, nonces)
        shared = big.send(rnd, "share", **{K.RUN_ID: run, K.SECAGG_PARAMS: json.dumps(params_to_json(seeded)),
                                           K.SECAGG_ADVERTS: adverts_to_bytes(adverts),
                                           K.SECAGG_NONCES: boxes_to_bytes(nonces)})
        assert not shared.has_error()  # ... then the server abandons the round after the share
    assert big.events("secagg-revealed") == [1, 2, 3] and big.events("secagg-masked") == []
    last = [e for e in read_entries(big.victim.workspace / "audit.jsonl") if e.event == "secagg-refused"][-1]
    assert last.data["stage"] == "reveal"
    assert refused(big.send(9, "advertise", **{K.RUN_ID: "evil run"})) and big.refusal() == "secagg-malformed"
    assert 9 not in big.events("secagg-advertised")


def test_two_views_of_a_sparse_round_cannot_unmask_a_site(tmp_path: Path, small_site: Path) -> None:
    """Red-team attack (2026-12-04), no colluding site at all: above 64 sites the server shows the
    victim and its t-1 farthest ring neighbours X one view (X shared, the near neighbours did not:
    the victim masks with X only; the t sites sign and reveal the victim's self-mask seed) and
    everyone else another (X dropped: X's holders there reveal X's keys). With t of about k/2 both
    views collected t signatures and the victim's update came back exactly (r = 1.000). A site
    now signs and unmasks only a survivor set of a majority of the round's sites (beyond the
    colluders it assumes): two views cannot both have one."""
    big = LargeFederation(tmp_path, small_site, colluders=0)
    adverts, sessions = big.advertise(ROUND)
    full = SecAggParams.for_sites(RUN, ROUND, list(adverts))
    nonce = _secagg(big.reveal(ROUND, full, adverts), K.NONCE)
    nonces = {**{n: s.reveal(full, adverts, big.roster) for n, s in sessions.items()}, VICTIM: nonce}
    params = _seeded(full, adverts, nonces)
    t = params.threshold
    outboxes = {n: s.share_keys(params, adverts, big.roster, nonces=nonces) for n, s in sessions.items()}
    outboxes[VICTIM] = boxes_from_bytes(_secagg(big.share(ROUND, params, adverts, nonces), K.OUTBOX))
    ring = sorted(params.sites, key=lambda s: hashlib.sha256(f"{params.graph_seed}|{s}".encode()).digest())
    here = ring.index(VICTIM)
    distance = {s: min((ring.index(s) - here) % len(ring), (here - ring.index(s)) % len(ring)) for s in ring}
    by_distance = sorted(params.neighbours(VICTIM), key=lambda s: -distance[s])
    far, near = set(by_distance[: t - 1]), set(by_distance[t - 1 :])
    view_a, view_b = {VICTIM} | far, set(params.sites) - {VICTIM} - far
    sharers_a, sharers_b = sorted(set(params.sites) - near), sorted(params.sites)

    def inbox(n: str, sharers: list[str]) -> dict[str, bytes]:
        return {s: outboxes[s][n] for s in sharers if s != n and n in outboxes[s]}

    reply = big.send(ROUND, "input", **{K.SECAGG_INBOX: boxes_to_bytes(inbox(VICTIM, sharers_a)),
                                        K.SECAGG_SHARERS: sharers_a})
    masked = reply.content.array_records[K.MASKED][K.MASKED].numpy()  # the victim's inbox check passes: |X| + 1 = t
    for n in far:
        sessions[n].masked_input(np.zeros(LARGE_DIM), 10, inbox(n, sharers_a), sharers_a)
    for n in view_b:
        sessions[n].masked_input(np.zeros(LARGE_DIM), 10, inbox(n, sharers_b), sharers_b)
    # view A: the victim and X are asked to sign their t-site survivor set: refused (a majority is 51 of 100)
    assert refused(big.send(ROUND, "consistency", **{K.SECAGG_SURVIVORS: sorted(view_a)}))
    assert big.refusal() == "secagg-too-few-survivors"
    for n in far:
        with pytest.raises(VerificationError, match="fewer than the"):
            sessions[n].consistency(sorted(view_a), big.ids[n])
    # ... and signatures of t sites on it do not open the victim's unmask either
    assert refused(big.send(ROUND, "unmask", **{K.SECAGG_SIGNATURES: boxes_to_bytes({})}))
    # view B is a majority: X's keys come back, the victim's self-mask seed does not
    sig_b = {n: sessions[n].consistency(sorted(view_b), big.ids[n]) for n in view_b}
    revealed = [sessions[n].unmask(sig_b, big.roster) for n in view_b]
    vec = masked.copy()
    for j in far:
        shares = [got[j][1] for got in revealed if j in got and got[j][0] == "c"]
        assert len(shares) >= t  # control: the attack's second half works
        mask = expand_mask(agree(combine_secret(shares[:t]), adverts[VICTIM].c_pub), pair_context(params, VICTIM, j),
                           len(vec))
        vec = vec - mask if VICTIM < j else vec + mask
    b_shares = [got[VICTIM][1] for got in revealed if VICTIM in got and got[VICTIM][0] == "b"]
    assert b_shares == []  # nobody in view B reveals the victim's b (it "dropped" there)
    estimate = vec.view(np.int64)[:-1].astype(np.float64) / 2.0**FRACTION_BITS / 50
    assert abs(correlation(estimate, big.update)) < 0.05


def test_a_split_survivor_set_in_a_sparse_round_reveals_nothing(tmp_path: Path, small_site: Path) -> None:
    """Red-team review: in a sparse round the server splits the victim's share holders into a
    group told the victim survived (they reveal its self-mask seed) and one told it dropped (they
    reveal its mask key); with t of about k/2 both groups could sign. Now a survivor set needs a
    majority of the round beyond the assumed colluders, so at most one group signs; and t shares
    of both secrets would also need holders + colluding holders >= 2t, more colluders among the
    victim's holders than it assumes. A victim assuming 1 colluder, with 1 colluding neighbour:
    the minority group refuses, the mask key stays short of t shares, nothing is recovered."""
    big = LargeFederation(tmp_path, small_site, colluders=0, assumed_colluders=1)
    adverts, sessions = big.advertise(ROUND)
    full = SecAggParams.for_sites(RUN, ROUND, list(adverts), colluders=1)  # sized for the victim's assumption
    assert full.threshold == required_threshold(full.degree + 1, 1) == 10  # the victim's floor (10 of 17)
    nonce = _secagg(big.reveal(ROUND, full, adverts), K.NONCE)
    nonces = {**{n: s.reveal(full, adverts, big.roster) for n, s in sessions.items()}, VICTIM: nonce}
    params = _seeded(full, adverts, nonces)
    holders_ = sorted(params.neighbours(VICTIM))
    big.colluders = {holders_[0]}  # one colluding neighbour (what the victim assumes)
    outboxes = {n: s.share_keys(params, adverts, big.roster, nonces=nonces) for n, s in sessions.items()}
    outboxes[VICTIM] = boxes_from_bytes(_secagg(big.share(ROUND, params, adverts, nonces), K.OUTBOX))
    sharers = sorted(adverts)

    def inbox(n: str) -> dict[str, bytes]:
        return {s: box[n] for s, box in outboxes.items() if n in box}

    for n, s in sessions.items():
        s.masked_input(np.zeros(LARGE_DIM), 10, inbox(n), sharers)
    reply = big.send(ROUND, "input", **{K.SECAGG_INBOX: boxes_to_bytes(inbox(VICTIM)), K.SECAGG_SHARERS: sharers})
    masked = reply.content.array_records[K.MASKED][K.MASKED].numpy()
    honest = [h for h in holders_ if h not in big.colluders]
    t = params.threshold
    # the second barrier: no split of the honest holders gives t shares of both secrets (the victim and the
    # colluder on one side, the colluder on the other)
    assert max(min(1 + a + 1, len(honest) - a + 1) for a in range(len(honest) + 1)) < t
    # the split the server would pick: the victim's side is a majority of the round, the other side not
    a_side, b_side = honest[: t - 2], honest[t - 2 :]
    rest = [n for n in sharers if n not in holders_ and n != VICTIM]
    colluder = next(iter(big.colluders))
    group_a = sorted({VICTIM, *a_side, colluder, *rest[:45]})
    group_b = sorted({*b_side, colluder, *rest[45:]})
    assert len(group_a) >= 51 > len(group_b)
    sig_a = {VICTIM: _secagg(big.send(ROUND, "consistency", **{K.SECAGG_SURVIVORS: group_a}), K.CONSISTENCY)}
    sig_a |= {n: sessions[n].consistency(group_a, big.ids[n]) for n in group_a if n not in (VICTIM, colluder)}
    sig_a[colluder] = big.ids[colluder].sign(transcript(params, adverts, sharers, group_a))
    for n in b_side:  # the minority group refuses to sign its set
        with pytest.raises(VerificationError, match="fewer than the"):
            sessions[n].consistency(group_b, big.ids[n])
    reveals = {n: sessions[n].unmask(sig_a, big.roster) for n in a_side}
    reveals[VICTIM] = reveals_from_bytes(_secagg(big.send(ROUND, "unmask", **{K.SECAGG_SIGNATURES: boxes_to_bytes(
        sig_a)}), K.REVEALS))
    own_b, own_c = sessions[colluder].shares[VICTIM]  # the colluder's own shares of the victim's secrets
    b_shares = [got[VICTIM][1] for got in reveals.values() if VICTIM in got and got[VICTIM][0] == "b"] + [own_b]
    c_shares = [got[VICTIM][1] for got in reveals.values() if VICTIM in got and got[VICTIM][0] == "c"] + [own_c]
    assert len(b_shares) >= t and len(c_shares) < t  # the self-mask seed, never the mask key
    # the server's best estimate: the self mask and the colluder's pairwise mask removed; the honest
    # neighbours' pairwise masks stay on the victim's input
    vec = masked - expand_mask(combine_secret(b_shares[:t]), self_context(params, VICTIM), len(masked))
    mask = expand_mask(agree(sessions[colluder].c_priv, adverts[VICTIM].c_pub), pair_context(params, VICTIM, colluder),
                       len(masked))
    vec = vec - mask if VICTIM < colluder else vec + mask
    estimate = vec.view(np.int64)[:-1].astype(np.float64) / 2.0**FRACTION_BITS / 50
    assert abs(correlation(estimate, big.update)) < 0.05




def test_a_share_sealed_in_one_view_of_a_round_opens_in_no_other(fed: Federation) -> None:
    """Third red-team review: shares were sealed to sender, receiver, run and round only, so a
    server showing groups different site lists (each view vouched by a majority of its own
    list) moved shares between views: with no colluder, small complete views next to a sparse
    one gave a victim's self-mask seed and its neighbours' keys (r = 1.000 at 65, 100 and 200
    sites). Shares are now sealed to the sender's whole view (parameters, seed, advertisements):
    the victim, shown a 4-site view, cannot open the shares of sites shown the 5-site one."""
    server = Server(fed)
    server.advertise()
    five, four = server.params, SecAggParams.for_sites(RUN, ROUND, [n for n in fed.names if n != "site-5"])
    for n in fed.names:
        view = four if n == VICTIM else five
        reply = fed.send(n, "share", **{K.SECAGG_PARAMS: json.dumps(params_to_json(view)), K.SECAGG_ADVERTS:
                                        adverts_to_bytes({k: v for k, v in server.adverts.items() if k in view.sites})})
        server.outboxes[n] = boxes_from_bytes(_secagg(reply, K.OUTBOX))
    inbox = {s: box[VICTIM] for s, box in server.outboxes.items() if VICTIM in box and s in four.sites}
    assert len(inbox) == 3
    assert refused(server.send_input(VICTIM, inbox, list(four.sites)))
    assert fed.refusal(VICTIM) == "secagg-tampered-share"
    # control: shares made in one view open in it (site-3 with the other sites of the 5-site view)
    without_victim = [n for n in fed.names if n != VICTIM]
    same_view = {s: box["site-3"] for s, box in server.outboxes.items() if s in without_victim and "site-3" in box}
    assert len(same_view) == 3 and not server.send_input("site-3", same_view, without_victim).has_error()
    assert VICTIM not in server.masked and abs(correlation(server.estimate(VICTIM), fed.updates[VICTIM])) < 0.05


def test_a_round_of_the_victim_and_its_assumed_colluders_is_refused(tmp_path: Path, small_site: Path) -> None:
    """Third red-team review: with assumed_colluders = 2 and min_sites = 3, a round of the victim
    and two colluders passed every floor, and its honest sum minus the colluders' updates is the
    victim's (r = 1.000). A site now needs more sites than its assumed colluders and itself, in
    site.toml (refused with the fix) and in every round."""
    from client.config import SiteConfigError

    with pytest.raises(SiteConfigError, match="min_sites = 3 with assumed_colluders = 2"):
        Federation(tmp_path / "bad", small_site, n=3, assumed_colluders=2)
    fed = Federation(tmp_path / "ok", small_site, n=3, assumed_colluders=2, min_sites=4)
    server = Server(fed, colluders=2)  # a round sized for the victim's 2 colluders, of 3 sites
    server.advertise()
    replies = server.share()
    assert refused(replies[VICTIM]) and fed.refusal(VICTIM) == "secagg-too-few-sites"
    assert VICTIM not in server.outboxes


def test_a_round_is_sized_for_the_colluders_its_most_cautious_site_assumes(tmp_path: Path, small_site: Path) -> None:
    """Fourth red-team review: each site counted the survivor-set majority with its own
    assumed_colluders. A victim assuming 1 among peers assuming 0 (one colluder, within the
    victim's assumption): the peers' majority of 33 of 65 let one view carry two vouched sets,
    and the victim's update came back (r = 1.000 at 65 and 100 sites). The colluder count is now
    a round parameter (bound into the reveal, the view and the transcript): every site counts
    with it, and a site refuses a round sized for fewer colluders than it assumes."""
    big = LargeFederation(tmp_path, small_site, colluders=1, assumed_colluders=1)
    adverts, sessions = big.advertise(ROUND)
    low = SecAggParams.for_sites(RUN, ROUND, list(adverts))  # sized for 0 colluders
    assert refused(big.reveal(ROUND, low, adverts)) and big.refusal() == "secagg-colluders-below-floor"
    adverts, sessions = big.advertise(ROUND + 1)
    sized = SecAggParams.for_sites(RUN, ROUND + 1, list(adverts), colluders=1)
    nonce = _secagg(big.reveal(ROUND + 1, sized, adverts), K.NONCE)
    nonces = {**{n: s.reveal(sized, adverts, big.roster) for n, s in sessions.items()}, VICTIM: nonce}
    params = _seeded(sized, adverts, nonces)
    need = vouchers_needed(params)
    assert need == (100 + 1) // 2 + 1 == 51
    assert 2 * need - 1 > len(params.sites)  # two sets would need 2 * 51 signers with one colluder signing both
    # a peer at the default floor (0 colluders assumed) now counts with the round's 1: it refuses a set of 50
    peer = next(n for n in sessions if n not in big.colluders)
    outboxes = {n: s.share_keys(params, adverts, big.roster, nonces=nonces) for n, s in sessions.items()}
    outboxes[VICTIM] = boxes_from_bytes(_secagg(big.share(ROUND + 1, params, adverts, nonces), K.OUTBOX))
    sharers = sorted(adverts)
    inbox = {s: box[peer] for s, box in outboxes.items() if peer in box}
    sessions[peer].masked_input(np.zeros(LARGE_DIM), 10, inbox, sharers)
    fifty = sorted({peer, *[n for n in sharers if n != peer][:49]})
    with pytest.raises(VerificationError, match="fewer than the 51"):
        sessions[peer].consistency(fifty, big.ids[peer])


def test_sites_of_one_view_train_one_request(fed: Federation) -> None:
    """Fifth red-team review (the model-inconsistency attack, Pasquini et al. 2022): the training
    request came with the input stage, per site, bound to nothing; a server that sent every other
    site learning_rate = 1e-12 made their updates encode to 0, and the honest sum was the
    victim's update (r = 1.000 at 3 and 5 sites, no colluder). The round's view now fixes the
    digest of the request and the global model (``SecAggParams.request``); a site trains only
    that request, so every site whose shares it accepted trained the same."""
    from tests.adversarial.harness import request

    honest = request(server_round=ROUND, run_id=RUN)
    vanishing = replace(honest, learning_rate=1e-12)
    server = Server(fed, request=honest.digest(""))  # (this harness sends no model arrays: their hash is "")
    _honest_until_input(server)
    sharers = sorted(server.outboxes)
    for n in fed.names[1:]:  # the other sites get the vanishing request: refused before training
        reply = server.send_input(n, server.inbox(n), sharers, **dict(vanishing.to_record()))
        assert refused(reply) and fed.refusal(n) == "secagg-request-mismatch"
    assert fed.trained == []
    ok = server.send_input(VICTIM, server.inbox(VICTIM), sharers, **dict(honest.to_record()))
    assert not ok.has_error() and fed.trained == [VICTIM]  # the request the view fixed trains
    assert refused(server.send_input("site-2", server.inbox("site-2"), sharers))  # no request: nothing trains
    assert fed.refusal("site-2") == "secagg-request-mismatch"
