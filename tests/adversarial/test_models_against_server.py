"""A malicious server picks the network: the site trains only networks its own policy allows,
built from its own installed code, and refuses (audited, nothing trained or charged) the rest."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from client.config import ModelPolicy, load_site_config, write_site_config
from client.models import build_model, get_arrays
from privacy import egress as K
from privacy.audit.events import E
from privacy.audit.log import read_entries
from tests.adversarial.harness import MaliciousServer, metrics, request, update
from tests.conftest import make_workspace
from tests.helpers import site_ledger


def _site(tmp_path: Path, data: Path, **models: object) -> Path:
    ws = make_workspace(tmp_path, "site-a", data, require_secure_aggregation=False)
    if models:
        config = load_site_config(ws)
        write_site_config(replace(config, models=ModelPolicy(**models)))  # type: ignore[arg-type]
    return ws


def _refused(reply, ws: Path) -> None:  # type: ignore[no-untyped-def]
    m = metrics(reply)
    assert m[K.REFUSED] == 1 and m[K.REFUSAL_CODE] == K.REFUSED_MODEL
    assert K.ARRAYS not in reply.content.array_records
    assert site_ledger(ws).events == ()  # nothing trained, nothing charged
    entries = read_entries(ws / "audit.jsonl")
    assert entries[-1].event == E.REFUSED and entries[-1].data["reason"] == "model-not-approved"


def test_a_factory_in_the_servers_bundle_is_never_imported(tmp_path: Path, small_site: Path, monkeypatch) -> None:
    """The server names a module it shipped (first on sys.path, as Flower puts a FAB): refused, never run."""
    bundle = tmp_path / "fab"
    bundle.mkdir()
    (bundle / "evil_nets.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
                                         "def net(**kw):\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(bundle))
    ws = _site(tmp_path, small_site)
    server = MaliciousServer(ws)
    _refused(server.train(request(model="evil_nets:net")), ws)
    assert not (bundle / "RAN").exists() and "evil_nets" not in sys.modules
    # the site listed it, but no installed distribution provides it: still refused, still not run
    ws2 = _site(tmp_path / "b", small_site, factories=("evil_nets:net",))
    _refused(MaliciousServer(ws2).train(request(model="evil_nets:net")), ws2)
    assert not (bundle / "RAN").exists() and "evil_nets" not in sys.modules


def test_a_network_the_site_does_not_allow_is_refused(tmp_path: Path, small_site: Path) -> None:
    ws = _site(tmp_path, small_site, allowed=("slicenet",))
    server = MaliciousServer(ws)
    arrays = get_arrays(build_model("resnet18"))
    _refused(server.train(request(model="resnet18"), arrays), ws)
    reply = server.evaluate(request(model="resnet18"), arrays)
    assert metrics(reply)[K.REFUSAL_CODE] == K.REFUSED_MODEL
    assert set(update(server.train(request(model="slicenet")))) == set(get_arrays(build_model()))  # allowed: trains


def test_oversized_inputs_are_refused_by_the_site_cap(tmp_path: Path, small_site: Path) -> None:
    ws = _site(tmp_path, small_site, max_image_size=32)
    _refused(MaliciousServer(ws).train(request(image_size=512)), ws)


def test_the_update_may_hold_only_the_requested_networks_arrays(tmp_path: Path, small_site: Path) -> None:
    """The egress manifest follows the request: a DenseNet round's reply is DenseNet's arrays, exactly."""
    ws = _site(tmp_path, small_site)
    arrays = get_arrays(build_model("densenet121", outputs=2))
    reply = MaliciousServer(ws).train(request(model="densenet121", findings="label,other", image_size=32,
                                              local_steps=1), arrays)
    _refused(reply, ws)  # the site offers no label columns for multi-label runs ([data] findings is empty)
    sent = update(MaliciousServer(ws).train(request(model="densenet121", image_size=32, local_steps=1),
                                            get_arrays(build_model("densenet121"))))
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in get_arrays(build_model("densenet121")).items()}


@pytest.mark.parametrize("name", ["os:system", "../../etc:passwd", "x" * 300])
def test_malformed_network_names_are_refused(tmp_path: Path, small_site: Path, name: str) -> None:
    ws = _site(tmp_path, small_site)
    reply = MaliciousServer(ws).train(request(model=name)) if len(name) <= 200 and "/" not in name else None
    if reply is None:  # the request itself does not parse: a malformed-request code, nothing else
        from privacy.protocol import RoundRequestError

        with pytest.raises(RoundRequestError):
            request(model=name)
        return
    _refused(reply, ws)


def test_the_server_cannot_pick_which_label_columns_the_site_trains_on(tmp_path: Path, small_site: Path) -> None:
    """A column the site keeps in its labels CSV but did not offer (here: an extra 0/1 column) is not trained
    on, and whether it exists is not told: the refusal is the same for a column that does not exist."""
    import csv

    rows = list(csv.DictReader(open(small_site / "labels.csv", newline="")))
    data = tmp_path / "data"
    import shutil

    shutil.copytree(small_site, data)
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["SOPInstanceUID", "label", "sensitive", "nodule"])
        w.writerows([r["SOPInstanceUID"], r["label"], r["label"], r["label"]] for r in rows)
    ws = make_workspace(tmp_path, "site-a", data, require_secure_aggregation=False)
    write_site_config(replace(load_site_config(ws), data=replace(load_site_config(ws).data, findings=("nodule",))))
    server = MaliciousServer(ws)
    arrays = get_arrays(build_model(outputs=1))
    for columns in ("sensitive", "no-such-column", "nodule,sensitive"):
        reply = server.train(request(findings=columns), get_arrays(build_model(outputs=len(columns.split(",")))))
        m = metrics(reply)
        assert m[K.REFUSED] == 1 and m[K.REFUSAL_CODE] == K.REFUSED_MODEL and set(m) == {K.REFUSED, K.REFUSAL_CODE}
    assert site_ledger(ws).events == ()
    assert set(update(server.train(request(findings="nodule"), arrays))) == set(arrays)  # offered: trains
