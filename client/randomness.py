"""The site's randomness for one round: drawn from the operating system's CSPRNG, never from a
value the server sent; a site-local seed in ``site.toml`` makes it reproducible (warned, audited)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

from client.config import PrivacyPolicy

log = logging.getLogger("medfed.site")
PURPOSES = ("sampling", "noise", "evaluation")


@dataclass(frozen=True)
class RoundSeeds:
    """One 64-bit seed per use of randomness in a round (independent streams)."""

    sampling: int  # which patients a step samples (Poisson with DP) and which of their images
    noise: int  # the Gaussian noise DP-SGD adds to the clipped gradient sum
    evaluation: int  # the noise of a metered evaluation release
    deterministic: bool  # the site chose reproducible noise (privacy.seed): the server may know it


def round_seeds(policy: PrivacyPolicy, *, site: str, release: str) -> RoundSeeds:
    """Fresh CSPRNG seeds, or, when the site set ``privacy.seed``, seeds derived from it and
    ``release``: the ledger position of the release (``train:7``), which never repeats at a
    site, so no two releases share noise even when the server reuses run ids and round numbers
    (two fresh sites with the same seed draw the same noise, for reproducible research)."""
    if policy.seed is None:
        fresh = [secrets.randbits(64) for _ in PURPOSES]
        return RoundSeeds(sampling=fresh[0], noise=fresh[1], evaluation=fresh[2], deterministic=False)
    log.warning("site %s draws DETERMINISTIC noise (privacy.seed is set in site.toml): anyone who knows the "
                "seed can reproduce and subtract it; use only for tests and research", site)
    derived = [int.from_bytes(hashlib.sha256(f"medfed|{policy.seed}|{release}|{p}".encode()).digest()[:8], "big")
               for p in PURPOSES]
    return RoundSeeds(sampling=derived[0], noise=derived[1], evaluation=derived[2], deterministic=True)
