"""The server's side of one SecAgg+ round: relay, then recover only the sum.

The server sees advertisements (public keys), sealed shares it cannot open, masked
vectors, the survivors' signatures on the one survivor set, and in the last stage for each
survivor the shares of its self-mask seed and for each site that shared but dropped the
shares of its mask-agreement key: enough to remove the masks of the sum, never one site's
update. A server that deviates is refused by the sites' own checks (their floors, a withheld
inbox, a ghost survivor, a survivor set without a majority's signatures, a second set), within
the assumptions of ``docs/secagg.md`` (at most the round's ``colluders`` colluding sites).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace

import numpy as np

from privacy.errors import ServiceError
from privacy.secagg.crypto import agree, combine_secret, expand_mask
from privacy.secagg.params import SecAggParams, decode_sum
from privacy.secagg.site import (
    KeyAdvert,
    VerificationError,
    graph_seed,
    holders,
    pair_context,
    self_context,
    vouchers_needed,
)


class RoundAborted(ServiceError, RuntimeError):
    """Too few sites at a stage, or a secret could not be reconstructed: no update is applied."""


@dataclass
class Aggregator:
    """Server state for one round. ``params`` are provisional (k, threshold, bounds) until
    stage 1 fixes the round's sites: those that advertised."""

    params: SecAggParams
    adverts: dict[str, KeyAdvert] = field(default_factory=dict)  # U1
    sharers: set[str] = field(default_factory=set)  # U2
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # U3
    signatures: dict[str, bytes] = field(default_factory=dict)  # U4: survivors that signed U3

    def _need(self, who: Collection[str], stage: str) -> None:
        if len(who) < self.params.threshold:
            raise RoundAborted(f"{stage}: {len(who)} site(s) left, the threshold is {self.params.threshold}")

    def collect_adverts(self, adverts: dict[str, KeyAdvert]) -> tuple[SecAggParams, dict[str, KeyAdvert]]:
        """Stage 1 replies -> the round's parameters (its sites are those that advertised) and
        all advertisements: what every site receives next (a sparse graph: in the reveal stage,
        then with the graph's seed from :meth:`collect_nonces`; otherwise in the share stage)."""
        self.adverts = {k: v for k, v in adverts.items() if k == v.site}
        self._need(self.adverts, "advertise keys")
        if len(self.adverts) < 2:
            raise RoundAborted("advertise keys: secure aggregation needs at least 2 sites")
        self.params = replace(self.params, sites=tuple(sorted(self.adverts)), graph_seed="")
        return self.params, dict(self.adverts)

    def collect_nonces(self, nonces: dict[str, bytes]) -> SecAggParams:
        """Stage 1b replies (sparse graphs) -> the parameters with the graph's seed. Every advertised
        site's nonce is needed: a site that left after advertising abandons the round (sites revealed
        for that set of advertisements only, and a seed over a subset would let the server choose)."""
        missing = set(self.adverts) - set(nonces)
        if missing:
            raise RoundAborted(f"reveal: {len(missing)} advertised site(s) did not reveal their graph nonce; a sparse "
                               "graph's seed needs every one (the round is abandoned, the next one starts afresh)")
        try:
            seed = graph_seed(self.params.context(), self.adverts, {s: nonces[s] for s in self.adverts})
        except VerificationError as exc:
            raise RoundAborted(f"reveal: {exc}") from None
        self.params = replace(self.params, graph_seed=seed)
        return self.params

    def route_shares(self, outboxes: dict[str, dict[str, bytes]]) -> tuple[dict[str, dict[str, bytes]], list[str]]:
        """Stage 2 replies (``sender -> receiver -> sealed``) -> stage 3 inboxes (``receiver ->
        sender -> sealed``) and the sharers U2 every site is told."""
        self.sharers = {s for s in outboxes if s in self.adverts}
        self._need(self.sharers, "share keys")
        inboxes: dict[str, dict[str, bytes]] = {s: {} for s in self.sharers}
        for sender in self.sharers:
            for receiver, sealed in outboxes[sender].items():
                if receiver in self.sharers:
                    inboxes[receiver][sender] = sealed
        return inboxes, sorted(self.sharers)

    def collect_inputs(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """Stage 3 replies -> the survivor set U3 every survivor is asked to sign (sites sign only
        a set of at least :func:`vouchers_needed`: the threshold and a majority of the round)."""
        self.inputs = {s: v for s, v in inputs.items() if s in self.sharers}
        self._need(self.inputs, "masked input")
        if len(self.inputs) < vouchers_needed(self.params):
            raise RoundAborted(f"masked input: {len(self.inputs)} of {len(self.params.sites)} sites left; a survivor set "
                               f"needs {vouchers_needed(self.params)} (a majority of the round)")
        lengths = {len(v) for v in self.inputs.values()}
        if len(lengths) != 1:
            raise RoundAborted("masked inputs differ in length")
        return sorted(self.inputs)

    def collect_signatures(self, signatures: dict[str, bytes]) -> dict[str, bytes]:
        """Stage 4 replies -> the signatures every survivor checks before it reveals anything."""
        self.signatures = {s: v for s, v in signatures.items() if s in self.inputs}
        self._need(self.signatures, "consistency check")
        return dict(self.signatures)

    def finish(self, reveals: dict[str, dict[str, tuple[str, bytes]]]) -> tuple[np.ndarray, int]:
        """Stage 5 replies -> ``(Σ w·x, Σ w)`` over the survivors."""
        self._need(reveals, "unmask")
        survivors, dropped = set(self.inputs), self.sharers - set(self.inputs)
        total = np.zeros(len(next(iter(self.inputs.values()))), dtype=np.uint64)
        for vec in self.inputs.values():
            total += vec
        for owner in sorted(survivors):
            b = self._reconstruct(owner, "b", reveals)
            total -= expand_mask(b, self_context(self.params, owner), len(total))
        for owner in sorted(dropped):
            c_priv = self._reconstruct(owner, "c", reveals)
            for peer in self.params.neighbours(owner):
                if peer not in survivors:
                    continue
                mask = expand_mask(agree(c_priv, self.adverts[peer].c_pub), pair_context(self.params, peer, owner),
                                   len(total))
                if peer < owner:  # the survivor added +mask for a higher-named peer, -mask otherwise
                    total -= mask
                else:
                    total += mask
        return decode_sum(total)

    def _reconstruct(self, owner: str, kind: str, reveals: dict[str, dict[str, tuple[str, bytes]]]) -> bytes:
        valid = set(holders(self.params, owner, set(self.adverts)))
        shares = [share for holder, got in reveals.items() if holder in valid
                  for o, (k, share) in got.items() if o == owner and k == kind]
        if len(shares) < self.params.threshold:
            raise RoundAborted(f"only {len(shares)} share(s) of {owner}'s {'self-mask seed' if kind == 'b' else 'key'}"
                               f", {self.params.threshold} needed")
        return combine_secret(shares[: self.params.threshold])
