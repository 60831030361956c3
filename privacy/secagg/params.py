"""Protocol parameters: neighbourhood size k, Shamir threshold, fixed-point format, graph."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from privacy.errors import InputError

FRACTION_BITS = 24  # fixed point: resolution 2^-24 ≈ 6e-8
MODULUS_BITS = 64  # arithmetic mod 2^64 (numpy uint64 wraps)
COMPLETE_GRAPH_MAX = 64  # up to this many sites every site neighbours every other (nothing to steer)


def round_context(run_id: str, round_: int) -> str:
    """What binds keys, masks and shares to one round of one run."""
    return f"run={run_id}|round={round_}"


class SecAggConfigError(InputError, ValueError):
    """Invalid secure-aggregation parameters; the message names the parameter."""


def default_k(n: int) -> int:
    """Neighbourhood size (self included, odd): the complete graph up to ``COMPLETE_GRAPH_MAX``
    sites (hospital consortia), then 2·⌈log2 n⌉ + 3 (Bell et al.: O(log n) neighbours keep the
    failure probability negligible)."""
    if n <= COMPLETE_GRAPH_MAX:
        return max(3, n if n % 2 else n + 1)
    return min(n if n % 2 else n - 1, 2 * math.ceil(math.log2(n)) + 3)


def required_threshold(holders: int, colluders: int = 0) -> int:
    """The smallest Shamir threshold a site accepts for ``holders`` share holders (its
    neighbours and itself) when up to ``colluders`` sites may side with a malicious server:
    t > (holders + colluders) / 2. Two different survivor sets then cannot both collect t
    signatures (honest sites sign one set), and colluders alone never hold t shares."""
    return (holders + colluders) // 2 + 1


@dataclass(frozen=True)
class SecAggFloors:
    """What a site accepts, whatever the server asks (``[secagg]`` of ``site.toml``)."""

    min_sites: int = 3  # distinct roster sites in a round
    min_neighbours: int = 2  # neighbours that hold this site's shares
    assumed_colluders: int = 0  # sites that may side with the server (raises the threshold floor)
    update_bound: float = 1.0  # the round's clipping range must cover updates up to this (no silent clipping)
    max_abandoned_reveals: int = 8  # sparse graphs: of the site's last 64 nonce reveals (any run), those never
    # followed by its masked input; beyond it the site reveals no more (each is one more random graph for a server
    # that abandons the draws it dislikes)


@dataclass(frozen=True)
class SecAggParams:
    """Agreed for one round by every party (the server sends them, sites check them)."""

    run_id: str
    round: int
    sites: tuple[str, ...]  # the round's participants (sorted site names)
    k: int  # neighbourhood size, self included, odd
    threshold: int  # shares needed to reconstruct a neighbour's secret
    update_clip: float = 1.0  # each update element is clipped to ±update_clip before weighting
    max_weight: int = 1 << 20  # weights (examples) above this are refused
    graph_seed: str = ""  # sparse graphs only: site.graph_seed of the round's revealed nonces
    request: str = ""  # RoundRequest.digest of what every site of the round trains (checked at the input stage)
    colluders: int = 0  # the colluders the round is sized for: every site counts its majority with the same
    # number, and refuses a round sized for fewer than it assumes (mixed floors let one view carry two vouched sets)

    def __post_init__(self) -> None:
        n = len(self.sites)
        if not all(isinstance(s, str) for s in self.sites) or not isinstance(self.run_id, str):
            raise SecAggConfigError("site names and the run id must be strings")
        for name in ("round", "k", "threshold", "max_weight", "colluders"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise SecAggConfigError(f"secagg {name} must be an integer")
        if not isinstance(self.update_clip, int | float) or not math.isfinite(self.update_clip) or self.update_clip <= 0:
            raise SecAggConfigError("secagg update_clip must be a finite number > 0")
        if self.max_weight < 1:
            raise SecAggConfigError("secagg max_weight must be >= 1")
        if self.colluders < 0:
            raise SecAggConfigError("secagg colluders must be >= 0")
        if not isinstance(self.request, str) or not isinstance(self.graph_seed, str):
            raise SecAggConfigError("secagg request and graph_seed must be strings")
        if n < 2:
            raise SecAggConfigError("secure aggregation needs at least 2 sites")
        if list(self.sites) != sorted(set(self.sites)):
            raise SecAggConfigError("sites must be unique and sorted")
        if self.k % 2 == 0 or self.k < 3:
            raise SecAggConfigError(f"secagg k={self.k} must be odd and >= 3 (neighbourhood size, self included)")
        if not 1 <= self.threshold <= self.degree + 1:
            raise SecAggConfigError(f"secagg threshold={self.threshold} must be in 1..{self.degree + 1} (a site's "
                                    "share holders: its neighbours and itself)")
        bound = n * self.max_weight * self.update_clip * 2**FRACTION_BITS
        if bound >= 2 ** (MODULUS_BITS - 1):
            raise SecAggConfigError(f"{n} sites x weight {self.max_weight} x update_clip {self.update_clip} overflow "
                                    f"2^63 at {FRACTION_BITS} fraction bits: lower update_clip or max_weight")

    @property
    def degree(self) -> int:
        """Neighbours per site (all other sites when k >= n)."""
        return min(self.k - 1, len(self.sites) - 1)

    @property
    def max_dropouts(self) -> int:
        """Sites that may drop (per neighbourhood) while every needed secret stays reconstructable."""
        return self.degree + 1 - self.threshold

    @classmethod
    def for_sites(cls, run_id: str, round_: int, sites: list[str], k: int = 0, threshold: int = 0,
                  **kw: float) -> SecAggParams:
        """Defaults: k = :func:`default_k`, threshold = the sites' floor for ``colluders``: more than
        half of a site's share holders and the colluders."""
        names = tuple(sorted(sites))
        k = k or default_k(len(names))
        holders = min(k - 1, len(names) - 1) + 1  # neighbours and the site itself
        colluders = int(kw.get("colluders", 0))
        return cls(run_id, round_, names, k, threshold or required_threshold(holders, colluders),
                   **kw)  # type: ignore[arg-type]

    def context(self) -> str:
        return round_context(self.run_id, self.round)

    @property
    def complete(self) -> bool:
        return self.k >= len(self.sites)

    def neighbours(self, site: str) -> list[str]:
        """The (k-1) neighbours of ``site``: every other site when k >= n; otherwise (k-1)/2 on
        each side on a ring ordered by a permutation derived from ``graph_seed``: the hash of every
        advertised site's nonce, committed in its signed advertisement and revealed only once the
        server had fixed the round's parameters and advertisements (``privacy.secagg.site``), so
        the server cannot choose it, only abandon the round; every site recomputes it."""
        n = len(self.sites)
        if self.complete:
            return [s for s in self.sites if s != site]
        if not self.graph_seed:
            raise SecAggConfigError("a sparse neighbour graph needs the revealed nonces' seed (graph_seed)")
        order = sorted(self.sites, key=lambda s: hashlib.sha256(f"{self.graph_seed}|{s}".encode()).digest())
        i = order.index(site)
        half = (self.k - 1) // 2
        return sorted({order[(i + d) % n] for d in range(-half, half + 1) if d})


def encode_input(update: np.ndarray, weight: int, params: SecAggParams) -> np.ndarray:
    """``[w·clip(x), w]`` in fixed point mod 2^64 (two's complement): what a site masks
    (:func:`clipped` counts what the clip changed; the site logs and audits it).

    Error bound of the recovered weighted mean, per element, for |x| <= update_clip:
    |mean_hat - mean| <= n_sites / (2^(FRACTION_BITS + 1) · Σw) (rounding only; no overflow
    by construction, see :class:`SecAggParams`)."""
    if not 0 < weight <= params.max_weight:
        raise SecAggConfigError(f"weight {weight} outside 1..{params.max_weight}")
    if not bool(np.isfinite(update).all()):
        raise SecAggConfigError("the update holds a non-finite value: it is not masked or sent")
    x = np.clip(update.astype(np.float64).ravel(), -params.update_clip, params.update_clip)
    q = np.rint(x * weight * 2.0**FRACTION_BITS).astype(np.int64)
    return np.concatenate([q, np.array([weight], dtype=np.int64)]).view(np.uint64)


def decode_sum(total: np.ndarray) -> tuple[np.ndarray, int]:
    """``(Σ w·x as float64, Σ w)`` from the unmasked sum of :func:`encode_input` vectors."""
    signed = total.view(np.int64)
    return signed[:-1].astype(np.float64) / 2.0**FRACTION_BITS, int(signed[-1])


def clipped(update: np.ndarray, params: SecAggParams) -> tuple[int, float]:
    """How many elements of ``update`` exceed ±``update_clip``, and the largest magnitude."""
    mag = np.abs(np.asarray(update, dtype=np.float64))
    return int((mag > params.update_clip).sum()), float(mag.max(initial=0.0))
