"""SecAgg+ protocol core: correct sums, dropouts at every stage, abort beyond the threshold,
masked vectors indistinguishable from uniform, pinned mask expansion, key substitution."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.secagg.crypto import expand_mask
from privacy.secagg.params import FRACTION_BITS, SecAggFloors, SecAggParams
from privacy.secagg.server import Aggregator, RoundAborted
from privacy.secagg.site import SiteSession, VerificationError

FLOORS = SecAggFloors(min_sites=3)


class Federation:
    """n sites with identity keys and pinned roster, and the server, for one round."""

    def __init__(self, n: int, dim: int = 500, seed: int = 0, **kw: int) -> None:
        rng = np.random.default_rng(seed)
        self.names = [f"site-{i:02d}" for i in range(n)]
        self.ids = {s: Ed25519PrivateKey.generate() for s in self.names}
        self.roster = {s: k.public_key() for s, k in self.ids.items()}
        self.params = SecAggParams.for_sites("run-7", 3, self.names, **kw)
        self.updates = {s: rng.normal(0, 0.05, dim) for s in self.names}
        self.weights = {s: int(rng.integers(20, 2000)) for s in self.names}

    def run(self, drop: dict[str, set[str]] | None = None) -> tuple[np.ndarray, int, list[str], dict]:  # type: ignore[type-arg]
        """The five stages (and the reveal of a sparse graph); ``drop[stage]`` = sites that vanish after that stage."""
        drop = drop or {}
        agg = Aggregator(self.params)
        sessions, adverts = {}, {}
        for s in self.names:
            sessions[s], adverts[s] = SiteSession.start("run-7", 3, s, self.ids[s])
        alive = [s for s in self.names if s not in drop.get("advertise", set())]
        round_params, relay = agg.collect_adverts({s: adverts[s] for s in alive})
        nonces = {}
        if not round_params.complete:  # sparse graphs: every advertised site reveals its nonce for this set
            nonces = {s: sessions[s].reveal(round_params, relay, self.roster, FLOORS) for s in alive
                      if s not in drop.get("reveal", set())}
            round_params = agg.collect_nonces(nonces)
        outboxes = {s: sessions[s].share_keys(round_params, relay, self.roster, FLOORS, nonces) for s in alive}
        alive = [s for s in alive if s not in drop.get("share", set())]
        inboxes, sharers = agg.route_shares({s: outboxes[s] for s in alive})
        masked = {s: sessions[s].masked_input(self.updates[s], self.weights[s], inboxes[s], sharers) for s in alive}
        alive = [s for s in alive if s not in drop.get("input", set())]
        survivors = agg.collect_inputs({s: masked[s] for s in alive})
        signed = {s: sessions[s].consistency(survivors, self.ids[s]) for s in survivors}
        signatures = agg.collect_signatures({s: signed[s] for s in survivors if s not in drop.get("consistency", set())})
        reveals = {s: sessions[s].unmask(signatures, self.roster) for s in signatures
                   if s not in drop.get("unmask", set())}
        total, weight = agg.finish(reveals)
        return total, weight, survivors, masked

    def expected(self, survivors: list[str]) -> tuple[np.ndarray, int]:
        return sum(self.weights[s] * self.updates[s] for s in survivors), sum(self.weights[s] for s in survivors)


@pytest.mark.parametrize("n", [3, 5, 10, 20, 80])
def test_unmasked_sum_equals_the_weighted_average(n: int) -> None:
    fed = Federation(n, dim=500 if n < 80 else 50, seed=n)
    total, weight, survivors, _ = fed.run()
    exp_total, exp_weight = fed.expected(fed.names)
    assert survivors == fed.names and weight == exp_weight
    bound = n / (2 ** (FRACTION_BITS + 1) * exp_weight)  # documented quantization bound of the mean
    assert np.abs(total / weight - exp_total / exp_weight).max() <= bound
    # the complete graph at consortium scale (nothing for a server to steer), sparse above 64 sites
    assert (fed.params.degree == n - 1) == (n <= 64)


@pytest.mark.parametrize("stage", ["advertise", "share", "input", "consistency", "unmask"])
def test_dropouts_up_to_the_tolerance_are_recovered(stage: str) -> None:
    fed = Federation(10, seed=1)
    gone = set(fed.names[: fed.params.max_dropouts])
    assert len(gone) == 4
    total, weight, survivors, _ = fed.run({stage: gone})
    exp_total, exp_weight = fed.expected(survivors)
    # sites that vanish after their masked input (consistency, unmask) are still in the sum
    alive = set(fed.names) - gone if stage in ("advertise", "share", "input") else set(fed.names)
    assert set(survivors) == alive and weight == exp_weight
    assert np.abs(total / weight - exp_total / exp_weight).max() <= 10 / (2 ** (FRACTION_BITS + 1) * exp_weight)


def test_one_dropout_too_many_abandons_the_round() -> None:
    fed = Federation(5, seed=2)
    gone = set(fed.names[: fed.params.max_dropouts + 1])
    with pytest.raises(RoundAborted, match="threshold"):
        fed.run({"input": gone})


def test_masked_input_is_uniform_and_uncorrelated_with_the_update() -> None:
    fed = Federation(5, dim=20000, seed=3)
    fed.updates["site-02"] = np.full(20000, 0.3)  # a constant, maximally structured update
    _, _, _, masked = fed.run()
    vec = masked["site-02"]
    bins = np.bincount((vec >> np.uint64(60)).astype(np.int64), minlength=16)  # top 4 bits
    expected = len(vec) / 16
    chi2 = float(((bins - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001
    low = (vec & np.uint64(0xFF)).astype(np.int64)
    assert abs(low.mean() - 127.5) < 3
    plain = fed.updates["site-01"][:20000]
    as_float = masked["site-01"][:-1].astype(np.float64)
    assert abs(np.corrcoef(plain, as_float)[0, 1]) < 0.05


def test_mask_expansion_known_answer() -> None:
    words = expand_mask(bytes(range(32)), "run=kat|round=1", 4)
    assert [int(w) for w in words] == [0x626DCE3ED40F0075, 0x46F938005E4729B1, 0x1CA60A45CEF20C48, 0x4312C5CD92967844]
    assert expand_mask(bytes(range(32)), "run=kat|round=2", 1)[0] != words[0]  # the context binds run and round


def test_substituted_key_is_detected_by_the_other_sites() -> None:
    fed = Federation(5, seed=4)
    sessions, adverts = {}, {}
    for s in fed.names:
        sessions[s], adverts[s] = SiteSession.start("run-7", 3, s, fed.ids[s])
    server_key = Ed25519PrivateKey.generate()
    forged, _ = SiteSession.start("run-7", 3, "site-01", server_key)  # the server's own keys for site-01
    relay = dict(adverts)
    relay["site-01"] = replace(adverts["site-01"], c_pub=forged.c_pub, s_pub=forged.s_pub)
    for s in fed.names:
        with pytest.raises(VerificationError, match="substituted|different key advertisement"):
            sessions[s].share_keys(fed.params, relay, fed.roster, FLOORS)
    # ... even when the server also relays a forged roster: sites use their pinned one
    _, forged_advert = SiteSession.start("run-7", 3, "site-01", server_key)
    relay["site-01"] = forged_advert
    with pytest.raises(VerificationError, match="substituted"):
        sessions["site-00"].share_keys(fed.params, relay, fed.roster, FLOORS)


def test_a_site_never_reveals_both_secrets_of_one_peer() -> None:
    fed = Federation(5, seed=5)
    agg = Aggregator(fed.params)
    sessions, adverts = {}, {}
    for s in fed.names:
        sessions[s], adverts[s] = SiteSession.start("run-7", 3, s, fed.ids[s])
    round_params, relay = agg.collect_adverts(adverts)
    inboxes, sharers = agg.route_shares({s: sessions[s].share_keys(round_params, relay, fed.roster, FLOORS)
                                         for s in fed.names})
    for s in fed.names:
        sessions[s].masked_input(fed.updates[s], fed.weights[s], inboxes[s], sharers)
    sigs = {s: sessions[s].consistency(fed.names, fed.ids[s]) for s in fed.names}
    first = sessions["site-00"].unmask(sigs, fed.roster)
    assert {k for k, _ in first.values()} == {"b"}
    with pytest.raises(VerificationError, match="second, different survivor set"):
        sessions["site-00"].consistency([s for s in fed.names if s != "site-03"], fed.ids["site-00"])
    # which secret is revealed follows from the signed set alone: asking again reveals the same
    assert sessions["site-00"].unmask(sigs, fed.roster) == first


def test_parameters_refuse_overflow_and_bad_thresholds() -> None:
    from privacy.secagg.params import SecAggConfigError

    with pytest.raises(SecAggConfigError, match="overflow"):
        SecAggParams.for_sites("r", 1, [f"s{i}" for i in range(5)], update_clip=1e9)
    with pytest.raises(SecAggConfigError, match="odd"):
        SecAggParams.for_sites("r", 1, ["a", "b", "c", "d"], k=4)
    with pytest.raises(SecAggConfigError, match="threshold"):
        SecAggParams.for_sites("r", 1, ["a", "b", "c"], threshold=4)
    assert math.isclose(SecAggParams.for_sites("r", 1, [f"s{i}" for i in range(100)]).k, 17)
    assert SecAggParams.for_sites("r", 1, [f"s{i}" for i in range(64)]).complete


def test_sparse_graph_recovers_dropped_sites_masks() -> None:
    fed = Federation(80, dim=50, seed=9)
    assert fed.params.degree < 79
    gone = {"site-03", "site-11", "site-17"}
    total, weight, survivors, _ = fed.run({"input": gone})
    exp_total, exp_weight = fed.expected(survivors)
    assert len(survivors) == 77 and weight == exp_weight
    assert np.abs(total / weight - exp_total / exp_weight).max() <= 80 / (2 ** (FRACTION_BITS + 1) * exp_weight)


def test_the_drivers_round_parameters_above_the_complete_graph_pass_every_sites_checks() -> None:
    """Regression (100-site simulation): the server's round parameters for more sites than the
    complete graph's maximum, seeded by the revealed nonces, pass every site's share-stage checks."""
    from privacy.secagg.params import COMPLETE_GRAPH_MAX
    from server.secagg_driver import round_params

    names = [f"site-{i}" for i in range(COMPLETE_GRAPH_MAX + 6)]
    keys = {n: Ed25519PrivateKey.generate() for n in names}
    started = {n: SiteSession.start("run-1", 2, n, keys[n]) for n in names}
    adverts = {n: advert for n, (_, advert) in started.items()}
    agg = Aggregator(round_params("run-1", 2, adverts))
    _, relay = agg.collect_adverts(adverts)
    agg.params = params = round_params("run-1", 2, relay)
    assert not params.complete and params.graph_seed == ""  # no seed before the nonces
    roster = {n: k.public_key() for n, k in keys.items()}
    nonces = {n: started[n][0].reveal(params, relay, roster) for n in names}
    params = agg.collect_nonces(nonces)
    assert len(params.graph_seed) == 64
    for n in names[:3]:
        outbox = started[n][0].share_keys(params, adverts, roster, nonces=nonces)
        assert sorted(outbox) == sorted(set(params.neighbours(n)))  # a sealed share for each neighbour
    small = round_params("run-1", 2, dict(list(adverts.items())[:5]))
    assert small.complete and small.graph_seed == ""


def test_a_sparse_round_needs_every_advertised_sites_nonce_and_each_must_open_its_commitment() -> None:
    """A site that leaves between advertise and reveal abandons a sparse round (a seed over the
    others' nonces would let the server pick the subset after seeing them); a nonce that does not
    open its site's signed commitment is refused by the server and by every site."""
    fed = Federation(70, dim=20, seed=11)
    with pytest.raises(RoundAborted, match="did not reveal"):
        fed.run({"reveal": {"site-05"}})
    sessions, adverts = {}, {}
    for s in fed.names:
        sessions[s], adverts[s] = SiteSession.start("run-7", 3, s, fed.ids[s])
    agg = Aggregator(fed.params)
    fixed, relay = agg.collect_adverts(adverts)
    nonces = {s: sessions[s].reveal(fixed, relay, fed.roster, FLOORS) for s in fed.names}
    forged = {**nonces, "site-07": bytes(32)}
    with pytest.raises(RoundAborted, match="does not open"):
        agg.collect_nonces(forged)
    params = agg.collect_nonces(nonces)
    from privacy.secagg.site import graph_seed

    with pytest.raises(VerificationError, match="different nonce|does not open") as err:
        sessions["site-00"].share_keys(replace(params, graph_seed=graph_seed(params.context(), relay, nonces)),
                                       relay, fed.roster, FLOORS, {**nonces, "site-00": bytes(32)})
    assert err.value.code == "graph-seed"
    with pytest.raises(VerificationError, match="does not open") as err:
        sessions["site-01"].share_keys(params, relay, fed.roster, FLOORS, forged)
    assert err.value.code == "graph-seed"
    with pytest.raises(VerificationError, match="not seeded") as err:
        sessions["site-02"].share_keys(replace(params, graph_seed="0" * 64), relay, fed.roster, FLOORS, nonces)
    assert err.value.code == "graph-seed"
    assert sorted(sessions["site-03"].share_keys(params, relay, fed.roster, FLOORS, nonces)) == \
        sorted(params.neighbours("site-03"))
    fresh, advert = SiteSession.start("run-7", 4, "site-00", fed.ids["site-00"])
    ten = {**dict(list(relay.items())[1:10]), "site-00": advert}
    with pytest.raises(VerificationError, match="only for a sparse graph"):  # nothing to reveal at consortium scale
        fresh.reveal(SecAggParams.for_sites("run-7", 4, list(ten)), ten, fed.roster, FLOORS)
