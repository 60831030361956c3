"""The code digest sites compare: equal for the bundle `medfed-server run` submits and the
installed medfed, independent of zip timestamps and compression, different for one changed
byte; malformed bundles are refused; approvals are validated and audited."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from client.approvals import approve, approved, revoke
from client.config import SiteConfigError, load_site_config
from privacy.audit.log import read_entries
from privacy.bundle import CONTENT, BundleError, bundle_code, bundle_digest, installed_code, installed_digest
from server.bundle import app_dir
from tests.conftest import make_workspace


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bundle Flower builds (`flwr build`) from the app directory `medfed-server run` submits."""
    out = tmp_path_factory.mktemp("fab")
    with app_dir() as (app, _):
        env = dict(os.environ, FLWR_HOME=str(out / "home"), FLWR_TELEMETRY_ENABLED="0")
        r = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)], capture_output=True,
                           text=True, timeout=300, cwd=out, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    return next(out.glob("*.fab")).read_bytes()


def _rezip(members: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED, date: tuple = (2030, 1, 2, 3, 4, 6)) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in reversed(sorted(members)):  # another member order too
            info = zipfile.ZipInfo(name, date_time=date)
            info.compress_type = compression
            z.writestr(info, members[name])
    return buf.getvalue()


def _members(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _with_content(members: dict[str, bytes]) -> dict[str, bytes]:
    body = {k: v for k, v in members.items() if k != CONTENT}
    lines = [f"{k},{hashlib.sha256(v).hexdigest()},{len(v) * 8}" for k, v in sorted(body.items())]
    return {**body, CONTENT: ("\n".join(lines) + "\n").encode()}


def test_submitted_bundle_has_the_installed_digest_whatever_the_zip(fab: bytes) -> None:
    assert bundle_digest(fab) == installed_digest()
    files, clientapp = bundle_code(fab)
    assert clientapp == "client.app:app" and set(files) == set(installed_code())
    assert bundle_digest(_rezip(_members(fab))) == installed_digest()  # stored, other timestamps and order


def test_one_changed_byte_or_an_extra_file_is_another_digest_or_refused(fab: bytes) -> None:
    members = _members(fab)
    changed = dict(members)
    changed["client/train.py"] = changed["client/train.py"].replace(b"patient", b"Patient", 1)
    with pytest.raises(BundleError, match="does not match its listed SHA-256"):
        bundle_digest(_rezip(changed))  # CONTENT still lists the old hash
    assert bundle_digest(_rezip(_with_content(changed))) != installed_digest()
    extra = {**members, "client/extra.py": b"print('hi')\n"}
    with pytest.raises(BundleError, match="differ from its .info/CONTENT"):
        bundle_digest(_rezip(extra))  # Flower's installer would accept an unlisted member
    assert bundle_digest(_rezip(_with_content(extra))) != installed_digest()
    other_app = dict(members)
    other_app["pyproject.toml"] = members["pyproject.toml"].replace(b"client.app:app", b"client.cli:main")
    assert bundle_digest(_rezip(_with_content(other_app))) != installed_digest()  # the ClientApp is covered
    for bad in (b"not a zip", _rezip({"a.py": b"x"})):
        with pytest.raises(BundleError):
            bundle_digest(bad)


def test_ambiguous_or_dangerous_bundles_are_refused(fab: bytes) -> None:
    """The red team made two bundles share a digest by hiding a file entry inside a clientapp
    string with a NUL; names with '..', duplicates and zip bombs are refused before use."""
    members = _members(fab)
    nul = dict(members)
    nul["pyproject.toml"] = members["pyproject.toml"].replace(b'"client.app:app"', b'"client.app:app\\u0000x.py"')
    with pytest.raises(BundleError, match="package.module:attribute"):
        bundle_digest(_rezip(_with_content(nul)))
    for name in ("../evil.py", "client/../../x.py", "/abs.py", "a,b.py", "client/\nx.py", "./client/x.py"):
        with pytest.raises(BundleError, match="member name"):
            bundle_digest(_rezip(_with_content({**members, name: b"x"})))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in _with_content(members).items():
            z.writestr(name, data)
        z.writestr("client/app.py", b"# a second, hidden copy")
    with pytest.raises(BundleError, match="twice"):
        bundle_digest(buf.getvalue())
    bomb = _with_content({**members, "client/zeros.py": b"0" * (17 * 2**20)})
    with pytest.raises(BundleError, match="expands beyond"):
        bundle_digest(_rezip(bomb, compression=zipfile.ZIP_DEFLATED))


def test_approvals_are_validated_and_audited(tmp_path: Path, small_site: Path) -> None:
    site = load_site_config(make_workspace(tmp_path, "site-a", small_site))
    with pytest.raises(SiteConfigError, match="not a code digest"):
        approve(site, "abc")
    digest = "ab" * 32
    approve(site, digest.upper(), note="consortium build")
    approve(site, digest)  # idempotent
    assert list(approved(site)) == [digest] and approved(site)[digest]["note"] == "consortium build"
    assert (site.workspace / "trust" / "approved-code.json").stat().st_mode & 0o777 == 0o600
    assert revoke(site, digest) and not revoke(site, digest) and approved(site) == {}
    events = [(e.event, e.data["code_sha256"]) for e in read_entries(site.workspace / "audit.jsonl")]
    assert events == [("code-approved", digest), ("code-approved", digest), ("code-revoked", digest)]
