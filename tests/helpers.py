"""Test helpers shared by unit and end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.audit.log import Entry
    from privacy.ledger import PrivacyLedger


def site_ledger(workspace: Path) -> PrivacyLedger:
    """A site workspace's ledger, verified with the site's public identity key (in its keys folder)."""
    import tomllib

    from privacy.keys import load_public_key
    from privacy.ledger import PrivacyLedger

    # [site] keys read directly: the tests also read ledgers of sites whose site.toml they made invalid
    keys = workspace / tomllib.loads((workspace / "site.toml").read_text()).get("site", {}).get("keys", "keys")
    return PrivacyLedger.load(workspace / "ledger.json", load_public_key(keys / "audit.pub"))


def resign_log(path: Path, entries: list[Entry], key: Ed25519PrivateKey) -> None:
    """Rewrite a log as a valid chain of ``entries`` signed with ``key`` (what a forger with that key can do)."""
    from privacy.audit.log import GENESIS, body_hash, canonical

    prev, lines = GENESIS, []
    for seq, e in enumerate(entries):
        body = {**e.body(), "seq": seq, "prev": prev}
        digest = body_hash(body)
        lines.append(canonical({**body, "hash": digest, "sig": key.sign(bytes.fromhex(digest)).hex()}) + b"\n")
        prev = digest
    path.write_bytes(b"".join(lines))


PLANTED = {"PatientName": "ZEBRA^QUOKKA", "PatientBirthDate": "19230405", "InstitutionName": "Xylophone General",
           "OperatorsName": "MARMADUKE^PIP", "PatientAddress": "17 Wombat Lane"}
PLANTED_ID = "PLANT-987654"
PLANTED_NESTED = "OKAPI^NESTOR"  # RequestingPhysician inside a RequestAttributesSequence item
PLANTED_STRINGS = [*PLANTED.values(), PLANTED_ID, "ZEBRA", "QUOKKA", "Wombat", "19230405", "Xylophone", "MARMADUKE",
                   PLANTED_NESTED, "OKAPI", "NESTOR"]


def plant_identifiers(data: Path) -> int:
    """Plant identifying values in every file of two patients; return how many files."""
    files = sorted((data / "P00000").glob("*.dcm")) + sorted((data / "P00001").glob("*.dcm"))
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for k, v in PLANTED.items():
            setattr(ds, k, v)
        ds.PatientID = PLANTED_ID
        ds.ImageComments = f"scan of {PLANTED['PatientName']}"
        request = Dataset()
        request.RequestingPhysician = PLANTED_NESTED
        ds.RequestAttributesSequence = Sequence([request])
        if i == 0:
            ds.BurnedInAnnotation = "YES"
        ds.save_as(f)
    (data / "cut.dcm").write_bytes(files[0].read_bytes()[:-300])  # an error path that read planted headers
    return len(files)


def shared_with_others(root: Path) -> list[str]:
    """Files and folders under ``root`` (itself included) that another account could read, write
    or enter: medfed keeps everything 0600/0700."""
    paths = [root, *root.rglob("*")]
    return [f"{p.relative_to(root.parent)} {p.stat().st_mode & 0o777:o}" for p in paths
            if not p.is_symlink() and p.stat().st_mode & 0o077]
