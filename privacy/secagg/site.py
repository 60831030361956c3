"""A site's side of one SecAgg+ round against a malicious server: five stages (six for sparse
graphs), each a pure step on a small state (Bonawitz et al. 2017 §6 with SecAgg+'s neighbour graph, Bell et al. 2020).

1. ``advertise``: fresh X25519 pairs (mask agreement ``c``, share encryption ``s``) and a
   commitment to a fresh 32-byte graph nonce, signed with the site's Ed25519 identity key.
1b. ``reveal`` (sparse graphs only, above ``COMPLETE_GRAPH_MAX`` sites): once the server has
   fixed the round's parameters (k, threshold, sites: checked against the site's floors here)
   and its advertisements, the site reveals its nonce, once per round and only for that round.
   The neighbour graph is seeded by every advertised site's nonce, so when the server fixes the
   round it cannot know the graph (this site's nonce is still secret), and the share stage must
   name that same round: once the nonces are known nothing the graph depends on can change.
   The server can still abandon the round and try another (each site caps that, `max_abandoned_reveals`).
2. ``share_keys``: check the round against the site's own floors (distinct roster sites,
   neighbours, a threshold above (holders + colluders) / 2, the complete graph at consortium
   scale or a graph seeded by the revealed nonces of the very set this site revealed for, a
   clipping range that covers the site's update bound) and every neighbour's advertisement
   against the pinned roster; then Shamir-share the self-mask seed ``b`` and ``c``'s private
   key among the holders.
3. ``masked_input``: only with a share from **every** neighbour the server says shared
   (``U2``), and enough holders left: ``encode([w·x, w]) + PRG(b) + Σ ±PRG(agree(c_i, c_j))``.
4. ``consistency``: sign the survivor set ``U3`` the server announces (a subset of ``U2``
   holding this site, at least :func:`vouchers_needed` sites); one set per round, never a second.
5. ``unmask``: only with at least :func:`vouchers_needed` valid signatures of distinct
   survivors on that same set (the threshold, and a majority of the round's sites beyond the
   round's colluders); then reveal, per peer whose shares it holds, the share of ``b`` (it survived) or of
   ``c`` (it shared and dropped), derived from the signed set, never both for one peer.

Every refusal raises :class:`VerificationError` with a short ``code`` the site audits.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.errors import RefusedError
from privacy.secagg.crypto import agree, expand_mask, hkdf, new_x25519, open_sealed, seal, split_secret
from privacy.secagg.params import (
    COMPLETE_GRAPH_MAX,
    SecAggFloors,
    SecAggParams,
    clipped,
    default_k,
    encode_input,
    required_threshold,
    round_context,
)


class VerificationError(RefusedError, RuntimeError):
    """A protocol check failed at this site (forged or substituted key, parameters below the
    site's floors, an inconsistent request): the site refuses the round. ``code`` names the
    check for the audit log; the message says what, never any secret."""

    def __init__(self, message: str, code: str = "verification") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class KeyAdvert:
    """A site's public keys and graph-nonce commitment for one round, signed with its identity key."""

    site: str
    c_pub: bytes
    s_pub: bytes
    commit: bytes  # nonce_commitment(context, site, nonce): binds the nonce revealed later
    sig: bytes

    @staticmethod
    def message(context: str, site: str, c_pub: bytes, s_pub: bytes, commit: bytes) -> bytes:
        return f"medfed-secagg-advert-v2|{context}|{site}|".encode() + c_pub + s_pub + commit

    def verify(self, params: SecAggParams, key: Ed25519PublicKey) -> None:
        try:
            key.verify(self.sig, self.message(params.context(), self.site, self.c_pub, self.s_pub, self.commit))
        except InvalidSignature:
            raise VerificationError(f"the key advertisement of {self.site} is not signed by its enrolled identity "
                                    "key: keys were substituted; round aborted", "substituted-key") from None


NONCE_BYTES = 32


def nonce_commitment(context: str, site: str, nonce: bytes) -> bytes:
    """What a site's advertisement commits to: SHA-256 of its round, name and graph nonce."""
    return hashlib.sha256(f"medfed-secagg-nonce|{context}|{site}|".encode() + nonce).digest()


def adverts_digest(adverts: dict[str, KeyAdvert]) -> str:
    """The digest of the round's signed advertisements: every field length-prefixed, so no two
    different sets share it (an unframed digest let a server move one site's entry into the
    previous one's signature field and keep the digest)."""
    h = hashlib.sha256(b"medfed-secagg-adverts-v2")
    for name in sorted(adverts):
        a = adverts[name]
        for part in (name.encode(), a.c_pub, a.s_pub, a.commit, a.sig):
            h.update(len(part).to_bytes(4, "big") + part)
    return h.hexdigest()


def reveal_binding(params: SecAggParams, adverts: dict[str, KeyAdvert]) -> str:
    """What a site's nonce is revealed for: the round's whole parameters but the graph's seed (k,
    threshold, sites, bounds) and its set of advertisements. The share stage must match it, so
    nothing the graph depends on can change once the nonces are known."""
    return view_digest(replace(params, graph_seed=""), adverts)


def graph_seed(context: str, adverts: dict[str, KeyAdvert], nonces: dict[str, bytes]) -> str:
    """A sparse graph's seed: every advertised site's revealed nonce, each checked against the
    commitment in its signed advertisement (:class:`VerificationError` ``graph-seed`` otherwise)."""
    if set(nonces) != set(adverts):
        raise VerificationError(f"{len(set(adverts) - set(nonces))} advertised site(s) without a revealed nonce (or "
                                "nonces of sites that did not advertise): the graph's seed needs every one",
                                "graph-seed")
    h = hashlib.sha256(b"medfed-secagg-graph-v3|" + adverts_digest(adverts).encode())
    for name in sorted(adverts):
        nonce = nonces[name]
        if len(nonce) != NONCE_BYTES or nonce_commitment(context, name, nonce) != adverts[name].commit:
            raise VerificationError(f"the nonce revealed for {name} does not open its advertised commitment",
                                    "graph-seed")
        h.update(name.encode() + b"\0" + nonce)
    return h.hexdigest()


def transcript(params: SecAggParams, adverts: dict[str, KeyAdvert], sharers: tuple[str, ...] | list[str],
               survivors: tuple[str, ...] | list[str]) -> bytes:
    """What a survivor signs in the consistency round: the whole round as this site saw it (its
    parameters, every advertisement, U2 and U3). Two sites' signatures count for each other only
    when they saw the very same round, so a server cannot tell sites different parameters, replay
    signatures from an earlier session of the round, or show two groups different sets."""
    h = hashlib.sha256(b"medfed-secagg-consistency-v2")
    h.update(json.dumps({"params": params_json(params), "adverts": adverts_digest(adverts),
                         "sharers": sorted(sharers), "survivors": sorted(survivors)},
                        sort_keys=True, separators=(",", ":")).encode())
    return h.digest()


def params_json(params: SecAggParams) -> dict[str, object]:
    return {"run_id": params.run_id, "round": params.round, "sites": list(params.sites), "k": params.k,
            "threshold": params.threshold, "update_clip": params.update_clip, "max_weight": params.max_weight,
            "graph_seed": params.graph_seed, "colluders": params.colluders, "request": params.request}


def pair_context(params: SecAggParams, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"pair|{lo}|{hi}|{params.context()}"


def self_context(params: SecAggParams, site: str) -> str:
    return f"self|{site}|{params.context()}"


def view_digest(params: SecAggParams, adverts: dict[str, KeyAdvert]) -> str:
    """The round as one site sees it at the share stage: its whole parameters (sites, k,
    threshold, bounds, graph seed) and its advertisements. Shares are sealed to it, so a share
    made in one view opens in no other (a third red-team review combined shares across views
    with different site lists, each vouched by a majority of its own list)."""
    return hashlib.sha256(json.dumps({"params": params_json(params), "adverts": adverts_digest(adverts)},
                                     sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def share_aad(params: SecAggParams, view: str, sender: str, receiver: str) -> str:
    return f"medfed-secagg-share-v2|{sender}|{receiver}|{params.context()}|{view}"


def share_key(params: SecAggParams, view: str, private: bytes, public: bytes, sender: str, receiver: str) -> bytes:
    return hkdf(agree(private, public), share_aad(params, view, sender, receiver))


def holders(params: SecAggParams, site: str, present: set[str]) -> list[str]:
    """Who holds shares of ``site``'s secrets: its present neighbours and itself (sorted; x = index + 1)."""
    return sorted({site, *(n for n in params.neighbours(site) if n in present)})


def vouchers_needed(params: SecAggParams) -> int:
    """Signatures on one survivor set a site requires before it reveals: the threshold, and a
    majority of the round's sites beyond the colluders the round is sized for (``params.colluders``,
    the same for every site of the view and at least each one's own floor). Two different survivor
    sets then always share an honest signer, who signs one only. On the complete graph the
    threshold floor implies it; a sparse graph's threshold (about k/2) does not: two sets, each
    signed by t sites, let a server take a victim's self-mask seed from one and its neighbours'
    keys from the other (red-team attacks, 2026-12-04)."""
    return max(params.threshold, (len(params.sites) + params.colluders) // 2 + 1)


def check_floors(params: SecAggParams, site: str, floors: SecAggFloors, roster: dict[str, Ed25519PublicKey],
                 adverts: dict[str, KeyAdvert]) -> None:
    """The round as the server set it, against what this site accepts."""
    n = len(params.sites)
    strangers = [s for s in params.sites if s not in roster]
    if strangers:
        raise VerificationError(f"{len(strangers)} site(s) of the round are not in the pinned federation roster",
                                "not-in-roster")
    if params.colluders < floors.assumed_colluders:
        raise VerificationError(f"the round is sized for {params.colluders} colluding site(s); this site assumes "
                                f"{floors.assumed_colluders} (set the run's secagg-colluders)", "colluders-below-floor")
    if n < max(floors.min_sites, params.colluders + 2):
        raise VerificationError(f"the round has {n} sites; this site requires at least "
                                f"{max(floors.min_sites, params.colluders + 2)} distinct roster sites (more "
                                "than the colluders and itself)", "too-few-sites")
    if n <= COMPLETE_GRAPH_MAX and not params.complete:
        raise VerificationError(f"a sparse neighbour graph (k={params.k}) for {n} sites: at this scale only the "
                                "complete graph is accepted (a server-chosen graph could surround a site)",
                                "graph-not-complete")
    if not params.complete and params.k < default_k(n):
        raise VerificationError(f"a sparse neighbour graph with k={params.k} for {n} sites: the site requires at "
                                f"least {default_k(n)} (2*ceil(log2 n)+3)", "k-below-floor")
    held = params.degree + 1  # its neighbours and itself (every site of the round advertised: checked before)
    if held - 1 < floors.min_neighbours:
        raise VerificationError(f"{held - 1} neighbour(s) would hold this site's shares; the site requires "
                                f"{floors.min_neighbours}", "too-few-neighbours")
    need = required_threshold(held, params.colluders)
    if params.threshold < need:
        raise VerificationError(f"threshold {params.threshold} for {held} share holders is below the site's "
                                f"floor {need} (a strict majority of holders plus {params.colluders} "
                                "colluding sites)", "threshold-below-floor")
    if params.update_clip < floors.update_bound:
        raise VerificationError(f"the round clips updates to ±{params.update_clip:g}, below the site's update bound "
                                f"{floors.update_bound:g}", "clip-below-bound")


@dataclass
class SiteSession:
    """One site's state for one round (kept in the ClientApp's ``context.state`` between stages)."""

    run_id: str
    round: int
    site: str
    c_priv: bytes
    c_pub: bytes
    s_priv: bytes
    s_pub: bytes
    nonce: bytes = b""  # the graph nonce this site committed to in its advertisement
    revealed_for: str = ""  # adverts_digest of the one set this site revealed its nonce for
    b: bytes = b""
    adverts: dict[str, KeyAdvert] = field(default_factory=dict)
    own_shares: tuple[bytes, bytes] = (b"", b"")  # this site's own share of (b, c_priv)
    shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (b share, c share)
    revealed: dict[str, str] = field(default_factory=dict)  # owner -> "b" | "c"
    params_: SecAggParams | None = None  # fixed by the server in stage 2 (the sites that advertised)
    sharers: tuple[str, ...] = ()  # U2 as the server announced it in stage 3
    survivors: tuple[str, ...] = ()  # U3 as this site signed it in stage 4
    clipped: tuple[int, float] = (0, 0.0)  # elements the clip changed, largest magnitude (stage 3)

    @property
    def params(self) -> SecAggParams:
        if self.params_ is None:
            raise VerificationError("protocol stage out of order: no share-keys stage for this round", "out-of-order")
        return self.params_

    @classmethod
    def start(cls, run_id: str, round_: int, site: str, identity: Ed25519PrivateKey) -> tuple[SiteSession, KeyAdvert]:
        """Stage 1: fresh keys, a fresh graph nonce and the signed advertisement."""
        c_priv, c_pub = new_x25519()
        s_priv, s_pub = new_x25519()
        nonce = os.urandom(NONCE_BYTES)
        context = round_context(run_id, round_)
        commit = nonce_commitment(context, site, nonce)
        sig = identity.sign(KeyAdvert.message(context, site, c_pub, s_pub, commit))
        return (cls(run_id, round_, site, c_priv, c_pub, s_priv, s_pub, nonce=nonce),
                KeyAdvert(site, c_pub, s_pub, commit, sig))

    def _check_own_advert(self, adverts: dict[str, KeyAdvert]) -> None:
        mine = adverts.get(self.site)
        if mine is None or (mine.c_pub, mine.s_pub, mine.commit) != \
                (self.c_pub, self.s_pub, nonce_commitment(round_context(self.run_id, self.round), self.site, self.nonce)):
            raise VerificationError("the server relayed a different key advertisement for this site; round aborted",
                                    "substituted-key")
        for name, advert in adverts.items():
            if name != advert.site:
                raise VerificationError(f"advertisement for {name!r} is not from a site of this round", "params")

    def _check_round(self, params: SecAggParams, adverts: dict[str, KeyAdvert]) -> None:
        if (params.run_id, params.round) != (self.run_id, self.round) or self.site not in params.sites:
            raise VerificationError("the round parameters do not match this site's round; round aborted", "params")
        if set(adverts) != set(params.sites):
            raise VerificationError("the advertised sites differ from the round's sites; round aborted", "params")
        self._check_own_advert(adverts)

    def reveal(self, params: SecAggParams, adverts: dict[str, KeyAdvert], roster: dict[str, Ed25519PublicKey],
               floors: SecAggFloors | None = None) -> bytes:
        """Stage 1b (sparse graphs): this site's nonce, for the one round the server fixed: its
        parameters (all but the graph's seed, checked against ``floors`` now) and its set of
        advertisements (this site's own unchanged in it); never for a second one."""
        if self.params_ is not None or self.revealed_for:
            raise VerificationError("a second nonce request in one round: the round's graph is fixed once",
                                    "equivocation")
        self._check_round(params, adverts)
        if params.complete or params.graph_seed:
            raise VerificationError(f"a nonce is revealed only for a sparse graph (more than {COMPLETE_GRAPH_MAX} "
                                    "sites), before its seed exists", "graph-not-complete")
        check_floors(params, self.site, floors or SecAggFloors(), roster, adverts)
        self.revealed_for = reveal_binding(params, adverts)
        return self.nonce

    def share_keys(self, params: SecAggParams, adverts: dict[str, KeyAdvert],
                   roster: dict[str, Ed25519PublicKey], floors: SecAggFloors | None = None,
                   nonces: dict[str, bytes] | None = None) -> dict[str, bytes]:
        """Stage 2: check the round's parameters (against ``floors``) and every neighbour's
        advertisement, then sealed shares for each holder (``receiver -> bytes``). A sparse
        graph needs ``nonces``: every advertised site's, for the set this site revealed for."""
        if self.params_ is not None:
            raise VerificationError("a second share-keys request in one round", "out-of-order")
        self._check_round(params, adverts)
        check_floors(params, self.site, floors or SecAggFloors(), roster, adverts)
        if self.revealed_for or not params.complete:  # after a reveal, only the round revealed for (complete or not)
            self._check_seed(params, adverts, nonces or {})
        # only the neighbours' keys are used: their advertisements are the ones to verify
        # (per-site cost grows with k, not with the number of sites)
        who = holders(params, self.site, set(adverts))
        for name in who:
            adverts[name].verify(params, roster[name])
        self.params_ = params
        self.adverts = dict(adverts)
        self.b = os.urandom(32)
        b_shares = split_secret(self.b, params.threshold, len(who))
        c_shares = split_secret(self.c_priv, params.threshold, len(who))
        out = {}
        view = view_digest(params, adverts)
        for holder, sb, sc in zip(who, b_shares, c_shares, strict=True):
            if holder == self.site:
                self.own_shares = (sb, sc)
                continue
            sealing = share_key(params, view, self.s_priv, adverts[holder].s_pub, self.site, holder)
            out[holder] = seal(sealing, sb + sc, share_aad(params, view, self.site, holder))
        return out

    def _check_seed(self, params: SecAggParams, adverts: dict[str, KeyAdvert], nonces: dict[str, bytes]) -> None:
        if not self.revealed_for:
            raise VerificationError("a sparse graph before this site revealed its nonce: the server could have "
                                    "chosen it", "graph-seed")
        if reveal_binding(params, adverts) != self.revealed_for:
            raise VerificationError("the parameters or advertisements differ from the round this site revealed its "
                                    "nonce for", "graph-seed")
        if nonces.get(self.site) != self.nonce:
            raise VerificationError("the server relayed a different nonce for this site", "graph-seed")
        if params.graph_seed != graph_seed(params.context(), adverts, nonces):
            raise VerificationError("the neighbour graph is not seeded by the round's revealed nonces", "graph-seed")

    def check_inbox(self, inbox: dict[str, bytes], sharers: list[str]) -> dict[str, tuple[bytes, bytes]]:
        """The stage-3 checks (the ClientApp runs them before it trains): the inbox holds a share
        from every neighbour in ``sharers`` (U2), enough holders remain, and every share opens.
        Returns the opened shares.

        Without them a server that withholds a site's inbox gets ``x + PRG(b)`` and then, with
        the honest unmask of ``b``, the site's update."""
        params = self.params
        u2 = set(sharers)
        if self.sharers:
            raise VerificationError("a second masked-input request in one round", "out-of-order")
        if not u2 <= set(params.sites) or self.site not in u2:
            raise VerificationError("the announced sharers are not sites of this round (or lack this site)",
                                    "ghost-site")
        expected = set(params.neighbours(self.site)) & u2
        if set(inbox) != expected:
            missing, extra = len(expected - set(inbox)), len(set(inbox) - expected)
            raise VerificationError(f"incomplete inbox: {missing} share(s) of neighbours that shared were withheld"
                                    + (f", {extra} from sites that did not share" if extra else "")
                                    + "; the update would leave without their masks", "incomplete-inbox")
        if len(expected) + 1 < params.threshold:
            raise VerificationError(f"{len(expected) + 1} share holder(s) left, fewer than the threshold "
                                    f"{params.threshold}", "too-few-holders")
        opened = {}
        view = view_digest(params, self.adverts)
        for sender, sealed in inbox.items():
            key = share_key(params, view, self.s_priv, self.adverts[sender].s_pub, sender, self.site)
            try:
                plain = open_sealed(key, sealed, share_aad(params, view, sender, self.site))
            except (InvalidTag, ValueError):
                raise VerificationError(f"the share from {sender} does not decrypt: tampered in transit, or sealed "
                                        "in another view of the round", "tampered-share") from None
            if len(plain) != 66:
                raise VerificationError(f"the share from {sender} is malformed", "tampered-share")
            opened[sender] = (plain[:33], plain[33:])
        return opened

    def masked_input(self, update: np.ndarray, weight: int, inbox: dict[str, bytes], sharers: list[str]) -> np.ndarray:
        """Stage 3: :meth:`check_inbox`, keep the shares; return the masked ``[w·x, w]`` (uint64)."""
        self.shares = self.check_inbox(inbox, sharers)
        params = self.params
        self.sharers = tuple(sorted(set(sharers)))
        self.clipped = clipped(update, params)
        masked = encode_input(update, weight, params)
        masked += expand_mask(self.b, self_context(params, self.site), len(masked))
        for peer in self.shares:
            mask = expand_mask(agree(self.c_priv, self.adverts[peer].c_pub), pair_context(params, self.site, peer),
                               len(masked))
            if self.site < peer:
                masked += mask
            else:
                masked -= mask
        return masked

    def consistency(self, survivors: list[str], identity: Ed25519PrivateKey) -> bytes:
        """Stage 4: sign the survivor set (U3); refuse ghosts, a set without this site, a set
        smaller than :func:`vouchers_needed`, or a second, different set in the same round."""
        params = self.params
        u3 = tuple(sorted(set(survivors)))
        if not self.sharers:
            raise VerificationError("protocol stage out of order: no masked input in this round", "out-of-order")
        if self.survivors and self.survivors != u3:
            raise VerificationError("the server announced a second, different survivor set; refused", "equivocation")
        if not set(u3) <= set(self.sharers) or self.site not in u3:
            raise VerificationError("the survivor set names sites that did not share keys in this round (or lacks "
                                    "this site)", "ghost-site")
        need = vouchers_needed(params)
        if len(u3) < need:
            raise VerificationError(f"only {len(u3)} survivors of {len(params.sites)} sites, fewer than the {need} "
                                    "(the threshold, and a majority beyond the assumed colluders) that must sign "
                                    "one survivor set", "too-few-survivors")
        self.survivors = u3
        return identity.sign(transcript(params, self.adverts, self.sharers, u3))

    def unmask(self, signatures: dict[str, bytes], roster: dict[str, Ed25519PublicKey]) -> dict[str, tuple[str, bytes]]:
        """Stage 5: ``owner -> ("b" | "c", share)`` once at least :func:`vouchers_needed`
        distinct survivors signed the same survivor set this site signed; which secret is
        revealed for a peer follows from that set, never from the server's say-so, and never
        both for one peer."""
        params = self.params
        if not self.survivors:
            raise VerificationError("protocol stage out of order: this site signed no survivor set", "out-of-order")
        u3, message = set(self.survivors), transcript(params, self.adverts, self.sharers, self.survivors)
        valid = 0
        for signer, sig in signatures.items():
            if signer not in u3 or signer not in roster:
                raise VerificationError("a consistency signature from a site outside the survivor set", "equivocation")
            try:
                roster[signer].verify(sig, message)
            except InvalidSignature:
                raise VerificationError("a consistency signature does not verify: the survivors were told different "
                                        "sets; refused", "equivocation") from None
            valid += 1
        need = vouchers_needed(params)
        if valid < need:
            raise VerificationError(f"{valid} survivor signature(s) on the survivor set, {need} needed: the server may "
                                    "have told other sites a different set; refused", "equivocation")
        out: dict[str, tuple[str, bytes]] = {}
        for owner in sorted({self.site, *self.shares}):
            kind = "b" if owner in u3 else "c"
            if owner == self.site:
                share = self.own_shares[0] if kind == "b" else b""
            else:
                share = self.shares[owner][0 if kind == "b" else 1]
            if not share:
                continue
            if self.revealed.get(owner, kind) != kind:
                raise VerificationError(f"asked for both secrets of {owner}; refused (consistency rule)", "equivocation")
            self.revealed[owner] = kind
            out[owner] = (kind, share)
        return out
