"""A site's side of one SecAgg+ round: four stages, each a pure step on a small state.

1. ``advertise``: fresh X25519 pairs (mask agreement ``c``, share encryption ``s``), signed
   with the site's Ed25519 identity key.
2. ``share_keys``: verify every advertisement against the locally pinned roster (a key the
   server substituted, or a changed roster, aborts); Shamir-share the self-mask seed ``b``
   and ``c``'s private key among the neighbours (and itself); seal each share for its holder.
3. ``masked_input``: open the shares addressed to this site; send
   ``encode([w·x, w]) + PRG(b) + Σ ±PRG(agree(c_i, c_j))`` over the neighbours that shared.
4. ``unmask``: reveal, per neighbour, the share of ``b`` (it survived) or of ``c`` (it
   dropped), never both for the same neighbour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.secagg.crypto import agree, expand_mask, hkdf, new_x25519, open_sealed, seal, split_secret
from privacy.secagg.params import SecAggParams, encode_input, round_context


class VerificationError(RuntimeError):
    """A protocol check failed at this site (forged or substituted key, inconsistent request):
    the site refuses the round. The message says what, never any secret."""


@dataclass(frozen=True)
class KeyAdvert:
    """A site's public keys for one round, signed with its identity key."""

    site: str
    c_pub: bytes
    s_pub: bytes
    sig: bytes

    @staticmethod
    def message(context: str, site: str, c_pub: bytes, s_pub: bytes) -> bytes:
        return f"medfed-secagg-advert|{context}|{site}|".encode() + c_pub + s_pub

    def verify(self, params: SecAggParams, key: Ed25519PublicKey) -> None:
        try:
            key.verify(self.sig, self.message(params.context(), self.site, self.c_pub, self.s_pub))
        except InvalidSignature:
            raise VerificationError(f"the key advertisement of {self.site} is not signed by its enrolled identity "
                                    "key: keys were substituted; round aborted") from None


def pair_context(params: SecAggParams, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"pair|{lo}|{hi}|{params.context()}"


def self_context(params: SecAggParams, site: str) -> str:
    return f"self|{site}|{params.context()}"


def share_aad(params: SecAggParams, sender: str, receiver: str) -> str:
    return f"medfed-secagg-share|{sender}|{receiver}|{params.context()}"


def share_key(params: SecAggParams, private: bytes, public: bytes, sender: str, receiver: str) -> bytes:
    return hkdf(agree(private, public), share_aad(params, sender, receiver))


def holders(params: SecAggParams, site: str, present: set[str]) -> list[str]:
    """Who holds shares of ``site``'s secrets: its present neighbours and itself (sorted; x = index + 1)."""
    return sorted({site, *(n for n in params.neighbours(site) if n in present)})


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
    b: bytes = b""
    adverts: dict[str, KeyAdvert] = field(default_factory=dict)
    own_shares: tuple[bytes, bytes] = (b"", b"")  # this site's own share of (b, c_priv)
    shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (b share, c share)
    revealed: dict[str, str] = field(default_factory=dict)  # owner -> "b" | "c"
    params_: SecAggParams | None = None  # fixed by the server in stage 2 (the sites that advertised)

    @property
    def params(self) -> SecAggParams:
        if self.params_ is None:
            raise VerificationError("protocol stage out of order: no share-keys stage for this round")
        return self.params_

    @classmethod
    def start(cls, run_id: str, round_: int, site: str, identity: Ed25519PrivateKey) -> tuple[SiteSession, KeyAdvert]:
        """Stage 1: fresh keys and the signed advertisement."""
        c_priv, c_pub = new_x25519()
        s_priv, s_pub = new_x25519()
        sig = identity.sign(KeyAdvert.message(round_context(run_id, round_), site, c_pub, s_pub))
        return cls(run_id, round_, site, c_priv, c_pub, s_priv, s_pub), KeyAdvert(site, c_pub, s_pub, sig)

    def share_keys(self, params: SecAggParams, adverts: dict[str, KeyAdvert],
                   roster: dict[str, Ed25519PublicKey]) -> dict[str, bytes]:
        """Stage 2: check the round's parameters and every advertisement, then sealed shares for
        each holder (``receiver -> bytes``)."""
        if (params.run_id, params.round) != (self.run_id, self.round) or self.site not in params.sites:
            raise VerificationError("the round parameters do not match this site's round; round aborted")
        if set(adverts) != set(params.sites):
            raise VerificationError("the advertised sites differ from the round's sites; round aborted")
        self.params_ = params
        mine = adverts.get(self.site)
        if mine is None or (mine.c_pub, mine.s_pub) != (self.c_pub, self.s_pub):
            raise VerificationError("the server relayed a different key advertisement for this site; round aborted")
        for name, advert in adverts.items():
            if name != advert.site or name not in self.params.sites:
                raise VerificationError(f"advertisement for {name!r} is not from a site of this round")
        # only the neighbours' keys are used: their advertisements are the ones to verify
        # (per-site cost grows with k, not with the number of sites)
        for name in holders(self.params, self.site, set(adverts)):
            advert = adverts[name]
            key = roster.get(name)
            if key is None:
                raise VerificationError(f"{name} is not in the pinned federation roster; round aborted")
            advert.verify(self.params, key)
        self.adverts = dict(adverts)
        who = holders(self.params, self.site, set(adverts))
        if len(who) < self.params.threshold:
            raise VerificationError(f"only {len(who)} share holders for threshold {self.params.threshold}")
        self.b = os.urandom(32)
        b_shares = split_secret(self.b, self.params.threshold, len(who))
        c_shares = split_secret(self.c_priv, self.params.threshold, len(who))
        out = {}
        for holder, sb, sc in zip(who, b_shares, c_shares, strict=True):
            if holder == self.site:
                self.own_shares = (sb, sc)
                continue
            sealing = share_key(self.params, self.s_priv, adverts[holder].s_pub, self.site, holder)
            out[holder] = seal(sealing, sb + sc, share_aad(self.params, self.site, holder))
        return out

    def masked_input(self, update: np.ndarray, weight: int, inbox: dict[str, bytes]) -> np.ndarray:
        """Stage 3: open the shares addressed here; return the masked ``[w·x, w]`` (uint64)."""
        for sender, sealed in inbox.items():
            advert = self.adverts.get(sender)
            if advert is None or sender not in self.params.neighbours(self.site):
                raise VerificationError(f"share from {sender!r}, which is not an advertised neighbour")
            key = share_key(self.params, self.s_priv, advert.s_pub, sender, self.site)
            try:
                plain = open_sealed(key, sealed, share_aad(self.params, sender, self.site))
            except InvalidTag:
                raise VerificationError(f"the share from {sender} does not decrypt: tampered in transit") from None
            self.shares[sender] = (plain[:33], plain[33:])
        masked = encode_input(update, weight, self.params)
        masked += expand_mask(self.b, self_context(self.params, self.site), len(masked))
        for peer in self.shares:
            mask = expand_mask(agree(self.c_priv, self.adverts[peer].c_pub), pair_context(self.params, self.site, peer),
                               len(masked))
            if self.site < peer:
                masked += mask
            else:
                masked -= mask
        return masked

    def unmask(self, survivors: list[str], dropped: list[str]) -> dict[str, tuple[str, bytes]]:
        """Stage 4: ``owner -> ("b" | "c", share)``; refuses to reveal both kinds for one owner."""
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            raise VerificationError("the server lists a site as both survived and dropped; round aborted")
        if self.site not in surv:
            raise VerificationError("this site is not listed among the survivors")
        if len(surv) < self.params.threshold:
            raise VerificationError(f"only {len(surv)} survivors, fewer than the threshold {self.params.threshold}")
        out: dict[str, tuple[str, bytes]] = {}
        for owner in sorted((surv | drop) & {self.site, *self.params.neighbours(self.site)}):
            kind = "b" if owner in surv else "c"
            if owner == self.site:
                share = self.own_shares[0] if kind == "b" else b""
            else:
                if owner not in self.shares:
                    continue
                share = self.shares[owner][0 if kind == "b" else 1]
            if not share:
                continue
            if self.revealed.get(owner, kind) != kind:
                raise VerificationError(f"asked for both secrets of {owner}; refused (consistency rule)")
            self.revealed[owner] = kind
            out[owner] = (kind, share)
        return out
