"""The site's ClientApp mods with real Flower messages: the egress guard blocks undeclared
or identifying output and passes normal replies unchanged; the SecAgg+ mod refuses a
round whose key advertisement the server substituted, and logs it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from client.audit_trail import SiteAudit, site_key_path
from client.config import load_site_config
from client.guard import BLOCKED_REASON, EGRESS_BLOCKED, egress_guard
from client.models import manifest
from client.secagg_mod import SECAGG_REFUSED, roster_path, secagg_mod
from client.site import load_site_data
from privacy import egress as K
from privacy.audit.log import read_entries
from privacy.files import atomic_write_json
from privacy.keys import load_or_create_key, public_pem
from privacy.model_arrays import arrays_to_record, record_to_arrays
from privacy.reply_schema import ReplySchema
from privacy.secagg.site import SiteSession
from privacy.secagg.wire import adverts_from_bytes, adverts_to_bytes
from tests.conftest import make_workspace
from tests.helpers import PLANTED_STRINGS, plant_identifiers


def incoming(content: RecordDict, node: int = 5) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                  message_type=MessageType.TRAIN)
    return Message(content, metadata=md)


def context(node: int = 5) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


@pytest.fixture()
def planted_site(tmp_path: Path, small_site: Path):  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    shutil.copytree(small_site, data)
    plant_identifiers(data)
    ws = make_workspace(tmp_path, "site-a", data, require_secure_aggregation=False)
    config = load_site_config(ws)
    load_site_data(config, image_size=16)  # the ingest scans headers: the guard's fingerprints
    return config


def _reply(msg: Message, **records: object) -> Message:
    content = RecordDict({K.SITE: ConfigRecord({K.SITE_NAME: "site-a", K.AUDIT_HEAD: "ab" * 32})})
    for name, record in records.items():
        content[name] = record  # type: ignore[assignment]
    return Message(content, reply_to=msg)


def test_egress_guard_passes_normal_replies_and_blocks_the_rest(planted_site, caplog) -> None:  # type: ignore[no-untyped-def]
    guard = egress_guard(lambda _: planted_site)
    msg = incoming(RecordDict({K.CONFIG: ConfigRecord({K.SERVER_ROUND: 1})}))
    delta = {k: np.full(shape, 0.25, dtype=dtype) for k, (shape, dtype) in manifest().items()}
    good = _reply(msg, **{K.METRICS: MetricRecord({K.NUM_EXAMPLES: 12, K.TRAIN_LOSS: 0.4}),
                          K.ARRAYS: arrays_to_record(delta)})
    out = guard(msg, context(), lambda m, c: good)
    assert not out.has_error() and dict(out.content.metric_records[K.METRICS]) == {K.NUM_EXAMPLES: 12, K.TRAIN_LOSS: 0.4}
    sent = record_to_arrays(out.content.array_records[K.ARRAYS])
    assert list(sent) == list(delta) and all(np.array_equal(sent[k], delta[k]) for k in delta)
    assert dict(out.content.config_records[K.SITE]) == dict(good.content.config_records[K.SITE])
    layout = np.frombuffer(os.urandom(8 * ReplySchema("site-a", manifest()).masked_length), dtype=np.uint64)
    masked = _reply(msg, **{K.METRICS: MetricRecord({K.NUM_EXAMPLES: 12}),
                            K.MASKED: ArrayRecord({K.MASKED: Array(layout)})})
    out = guard(msg, context(), lambda m, c: masked)
    assert not out.has_error() and np.array_equal(out.content.array_records[K.MASKED][K.MASKED].numpy(), layout)
    bad_replies = {
        "an array outside the manifest": _reply(msg, **{K.ARRAYS: ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})}),
        "a string": _reply(msg, notes=ConfigRecord({"text": "hello"})),
        "an extra array": _reply(msg, **{K.ARRAYS: arrays_to_record(delta),
                                         "debug": ArrayRecord({"x": Array(np.ones(2, dtype=np.float32))})}),
        "NaN": _reply(msg, **{K.METRICS: MetricRecord({K.TRAIN_LOSS: float("nan")})}),
        "an undeclared metric": _reply(msg, **{K.METRICS: MetricRecord({"age": 42})}),
        "a planted PatientID": Message(RecordDict({K.SITE: ConfigRecord({K.SITE_NAME: "PLANT-987654"})}), reply_to=msg),
        "a planted birth date as a number": _reply(msg, **{K.METRICS: MetricRecord({K.PATIENTS: 19230405})}),  # > counts
        "a planted birth date in a real's digits": _reply(msg, **{K.METRICS: MetricRecord({K.EPSILON: 192.30405})}),
    }
    caplog.set_level(logging.WARNING, logger="medfed.site")
    for what, reply in bad_replies.items():
        out = guard(msg, context(), lambda m, c, r=reply: r)
        assert out.has_error() and out.error.code == EGRESS_BLOCKED and out.error.reason == BLOCKED_REASON, what
    entries = [e for e in read_entries(planted_site.workspace / "audit.jsonl") if e.event == "egress-blocked"]
    assert len(entries) == len(bad_replies)
    logged = caplog.text + "".join(json.dumps(e.data) for e in entries)
    assert "egress guard blocked" in caplog.text and "matches an identifying header value" in caplog.text
    assert "undeclared metric 'age'" in caplog.text  # the detail stays in the site's log
    assert not any(v in logged for v in PLANTED_STRINGS)


def _secagg_sites(tmp_path: Path, small_site: Path, n: int = 3) -> list:  # type: ignore[type-arg]
    configs = []
    for i in range(n):
        ws = make_workspace(tmp_path, f"site-{i + 1}", small_site)
        config = load_site_config(ws)
        load_or_create_key(site_key_path(config))
        configs.append(config)
    roster = {"sites": {c.name: public_pem(load_or_create_key(site_key_path(c)).public_key()).decode()
                        for c in configs}}
    for c in configs:
        atomic_write_json(roster_path(c), roster)
    return configs


def _conf(stage: str, **extra: object) -> ConfigRecord:
    conf = ConfigRecord({K.RUN_ID: "run-9", K.SERVER_ROUND: 2, K.SECAGG_STAGE: stage})
    for k, v in extra.items():
        conf[k] = v  # type: ignore[assignment]
    return conf


def _never(msg: Message, ctx: Context) -> Message:
    raise AssertionError("train must not run outside the input stage")


def test_secagg_mod_refuses_a_substituted_key_and_logs_it(tmp_path: Path, small_site: Path) -> None:
    configs = _secagg_sites(tmp_path, small_site)
    mods = {c.name: secagg_mod(lambda _, c=c: c) for c in configs}
    contexts = {c.name: context(i + 1) for i, c in enumerate(configs)}
    adverts = {}
    for c in configs:
        reply = mods[c.name](incoming(RecordDict({K.CONFIG: _conf("advertise")})), contexts[c.name], _never)
        assert not reply.has_error()
        adverts |= adverts_from_bytes(reply.content.config_records[K.SECAGG][K.ADVERT])  # type: ignore[arg-type]
    params = {"run_id": "run-9", "round": 2, "sites": sorted(adverts), "k": 3, "threshold": 2,
              "update_clip": 1.0, "max_weight": 1 << 20}
    # honest relay: every site answers with sealed shares for its neighbours
    honest = _conf("share", **{K.SECAGG_PARAMS: json.dumps(params), K.SECAGG_ADVERTS: adverts_to_bytes(adverts)})
    ok = mods["site-1"](incoming(RecordDict({K.CONFIG: honest})), contexts["site-1"], _never)
    assert not ok.has_error() and K.OUTBOX in ok.content.config_records[K.SECAGG]
    # the server swaps site-2's keys for its own (signed with its own key)
    _, forged = SiteSession.start("run-9", 2, "site-2", Ed25519PrivateKey.generate())
    swapped = _conf("share", **{K.SECAGG_PARAMS: json.dumps(params),
                                K.SECAGG_ADVERTS: adverts_to_bytes({**adverts, "site-2": forged})})
    for name, code in (("site-3", "substituted-key"), ("site-1", "out-of-order")):  # site-1 shared already
        out = mods[name](incoming(RecordDict({K.CONFIG: swapped})), contexts[name], _never)
        assert out.has_error() and out.error.code == SECAGG_REFUSED and f"({code})" in out.error.reason
        log = read_entries(SiteAudit(next(c for c in configs if c.name == name)).log.path)
        assert log[-1].event == "secagg-refused" and log[-1].data["reason"] == f"secagg-{code}"


def test_roster_is_pinned_only_from_an_out_of_band_fingerprint_and_a_changed_one_waits(tmp_path: Path,
                                                                                      small_site: Path) -> None:
    from client.config import SiteConfigError
    from client.roster import EXPECTED, PENDING, PINNED, accept_pending, check_delivered, expect
    from privacy.secagg.site import VerificationError
    from privacy.secagg.wire import roster_bytes, roster_fingerprint

    config = load_site_config(make_workspace(tmp_path, "site-a", small_site))
    keys = {n: public_pem(Ed25519PrivateKey.generate().public_key()).decode() for n in ("site-a", "site-b")}
    first = roster_bytes(keys)
    sybils = roster_bytes({**keys, "sybil-1": public_pem(Ed25519PrivateKey.generate().public_key()).decode()})
    with pytest.raises(VerificationError, match="none is expected") as info:  # no trust on first use
        check_delivered(config, first)
    assert info.value.code == "roster-not-pinned" and not (config.workspace / PINNED).exists()
    expect(config, roster_fingerprint(first))  # the fingerprint the consortium gave the operator
    assert (config.workspace / EXPECTED).read_text().strip() == roster_fingerprint(first)
    with pytest.raises(VerificationError, match="not the one this site expects") as info:
        check_delivered(config, sybils)  # the server's own roster (with its sybils) is refused
    assert info.value.code == "roster-mismatch" and not (config.workspace / PINNED).exists()
    check_delivered(config, first)
    assert (config.workspace / PINNED).read_bytes() == first
    check_delivered(config, json.dumps({"sites": dict(reversed(list(keys.items())))}).encode())  # same, other order
    changed = roster_bytes({**keys, "site-b": public_pem(Ed25519PrivateKey.generate().public_key()).decode()})
    with pytest.raises(VerificationError, match="roster changed") as info:
        check_delivered(config, changed)
    assert roster_fingerprint(changed)[:16] in str(info.value) and "--accept" in str(info.value)
    assert (config.workspace / PINNED).read_bytes() == first and (config.workspace / PENDING).is_file()
    with pytest.raises(SiteConfigError, match="changed since you compared"):
        accept_pending(config, roster_fingerprint(sybils))  # the operator compared another roster
    assert accept_pending(config, roster_fingerprint(changed)) == roster_fingerprint(changed)
    check_delivered(config, changed)  # now pinned
    events = [e.event for e in read_entries(config.workspace / "audit.jsonl")]
    assert events == ["roster-expected", "roster-pinned", "roster-accepted"]
