"""Where the public keys an audit is verified with come from.

Keys found next to the logs prove nothing: whoever can rewrite a log can replace the key
beside it. medfed-audit verifies with keys obtained out of band: the federation roster a
site pinned (``SITE/trust/roster.json``, the sites' identity keys and the server's audit
key), any copy of the roster whose SHA-256 equals the fingerprint the consortium handed out,
or a folder of keys the auditor vouches for. The run directory's own keys are used only when
the auditor says so (``--trust-run-keys``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.audit.events import SERVER_ACTOR
from privacy.errors import InputError
from privacy.keys import KeyFileError, load_public_key, public_key_from_pem
from privacy.secagg.wire import canonical_roster, roster_fingerprint

ROSTER_IN_RUN = Path("keys") / "roster.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TrustError(InputError, ValueError):
    """No out-of-band keys, or a roster that is not the one the auditor expects."""


@dataclass(frozen=True)
class Trust:
    """Public keys by actor (``server`` and site names) and a sentence saying where they came from."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    source: str = ""
    out_of_band: bool = True

    def key(self, actor: str) -> Ed25519PublicKey | None:
        return self.keys.get(actor)


def from_roster(path: Path, fingerprint: str | None = None, *, out_of_band: bool = True) -> Trust:
    """The keys of a federation roster; when ``fingerprint`` is given the file must hash to it."""
    path = Path(path)
    try:
        data = path.read_bytes()
        actual = roster_fingerprint(data)
    except FileNotFoundError:
        raise TrustError(f"{path}: no roster there; pass a site's pinned roster (SITE/trust/roster.json)") from None
    except ValueError:
        raise TrustError(f"{path}: not a federation roster (JSON {{\"sites\": {{name: PEM}}, \"server\": PEM}})") \
            from None
    if fingerprint is not None:
        expected = fingerprint.strip().lower()
        if not _HEX64.match(expected):
            raise TrustError(f"--roster-fingerprint {fingerprint!r} is not 64 hex characters (as `medfed-server "
                             "roster` prints it)")
        if actual != expected:
            raise TrustError(f"{path}: roster sha256 {actual[:16]}… is not the fingerprint given ({expected[:16]}…): "
                             "the roster was replaced, or the fingerprint belongs to another federation")
    doc = json.loads(canonical_roster(data))
    try:
        keys = {str(name): public_key_from_pem(str(pem).encode(), f"{path}: {name}") for name, pem in doc["sites"].items()}
        if "server" in doc:
            keys[SERVER_ACTOR] = public_key_from_pem(str(doc["server"]).encode(), f"{path}: server")
    except KeyFileError as exc:
        raise TrustError(str(exc)) from None
    how = "matches the fingerprint given" if fingerprint is not None else "given as pinned"
    return Trust(keys, f"federation roster {path} (sha256 {actual[:16]}…, {how})", out_of_band)


def from_keys_dir(folder: Path, *, out_of_band: bool = True) -> Trust:
    """Every ``<actor>.pub`` of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrustError(f"{folder}: no such keys folder; pass a folder of <actor>.pub files you obtained out of band")
    keys = {}
    for pub in sorted(folder.glob("*.pub")):
        try:
            keys[pub.stem] = load_public_key(pub)
        except KeyFileError:
            continue
    return Trust(keys, f"public keys in {folder}", out_of_band)


def resolve(run_dirs: list[Path], *, roster: Path | None = None, roster_fingerprint: str | None = None,
            keys: Path | None = None, trust_run_keys: bool = False) -> Trust:
    """The trust the auditor asked for, in this order: a roster (pinned, or checked against its
    fingerprint), a keys folder, the run directory's keys on request; none of them: an error."""
    if roster is not None or roster_fingerprint is not None:
        if roster is None:
            copies = [d / ROSTER_IN_RUN for d in run_dirs if (d / ROSTER_IN_RUN).is_file()]
            if not copies:
                raise TrustError("--roster-fingerprint needs a copy of the roster: pass --roster FILE (any copy: it "
                                 f"is checked against the fingerprint); none at RUN_DIR/{ROSTER_IN_RUN}")
            roster = copies[0]
        return from_roster(roster, roster_fingerprint)
    if keys is not None:
        return from_keys_dir(keys)
    if trust_run_keys:
        folders = [d / "keys" for d in run_dirs if (d / "keys").is_dir()]
        if not folders:
            raise TrustError("--trust-run-keys: the run directory has no keys/ folder")
        found = from_keys_dir(folders[0], out_of_band=False)
        return Trust(found.keys, f"the run directory's own keys ({folders[0]}): NOT out of band, whoever could edit "
                                 "the logs could have replaced them", out_of_band=False)
    raise TrustError("no out-of-band keys: pass --roster SITE/trust/roster.json (a site's pinned roster), "
                     "--roster-fingerprint FP (the roster fingerprint your consortium gave you; the run's copy is "
                     "checked against it) or --keys DIR; --trust-run-keys uses the keys found in the run directory "
                     "(an operator who can edit the logs can replace those too)")
