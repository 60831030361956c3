"""Egress against a malicious server: nothing identifying leaves a site. The server drives the
site's real ClientApp (the egress guard and the SecAgg+ mod, real Flower messages) on a real
generated DICOM export whose folder and first patient are identifying; where a leak needs a
defect below the guard (a handler that puts a header value in a metric, an image in an
array, a file in the masked record), the ClientApp's handler is that defect. Each test
asserts what the server receives: no name, ID, date or path, in any numeric form, and an
``egress-blocked`` entry in the site's audit log for every stopped reply."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import NODE_SITE_KEY, resolve_site
from client.audit_trail import site_key_path
from client.config import SiteConfig, load_site_config
from client.dicom.identifiers import KEY_FILE, PRINTS_FILE
from client.guard import FINGERPRINTS_UNAVAILABLE, egress_guard
from client.models import manifest
from client.secagg_mod import roster_path, secagg_mod
from client.site import load_site_data
from privacy import egress as K
from privacy.audit.log import read_entries
from privacy.files import atomic_write_bytes
from privacy.keys import load_or_create_key, public_pem
from privacy.model_arrays import arrays_sha256, arrays_to_record, record_to_arrays
from privacy.quantise import quantise
from privacy.reply_schema import ReplySchema
from privacy.secagg.wire import adverts_from_bytes, adverts_to_bytes, boxes_from_bytes, boxes_to_bytes, roster_bytes
from tests.adversarial.harness import MaliciousServer, request
from tests.conftest import make_workspace
from tests.helpers import site_ledger

FOLDER = "DOE_JOHN_19620314"
NAME, PID, BIRTH, STUDY, STUDY_TIME = "DOE^JOHN", "4821397", "19620314", "20190611", "083015"
DAYS_TO_STUDY = (dt.date(2019, 6, 11) - dt.date(1970, 1, 1)).days
TEXTS = [NAME, "DOE_JOHN", PID, BIRTH, STUDY, "1962.0314", "196.20314"]
NUMBERS = {int(PID) - 1, int(PID), int(PID) + 1, int(BIRTH), int(STUDY), DAYS_TO_STUDY,
           (dt.date(1962, 3, 14) - dt.date(1970, 1, 1)).days}
OPEN = {"require_secure_aggregation": False}


def _plant(export: Path) -> None:
    """Patient P00000 becomes John Doe: name, a digit-string ID, birth date, study date and time."""
    for f in sorted((export / "P00000").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
        ds.StudyDate, ds.StudyTime, ds.PatientIdentityRemoved = STUDY, STUDY_TIME, "NO"
        ds.save_as(f)


@pytest.fixture()
def doe(tmp_path: Path, small_site: Path) -> SiteConfig:
    """A site whose export folder is named after a patient, ingested once (as a site does)."""
    export = tmp_path / FOLDER / "export"
    shutil.copytree(small_site, export)
    _plant(export)
    config = load_site_config(make_workspace(tmp_path / FOLDER, "site-a", export, **OPEN))
    load_site_data(config, image_size=16)
    return config


def _wire(reply: Message) -> tuple[bytes, list[float]]:
    """Everything the server can read of a reply: error code and text, every record's keys and
    values (arrays as raw bytes, numbers as text and as their float64/float32/int64 bytes)."""
    parts: list[bytes] = []
    numbers: list[float] = []
    if reply.has_error():
        return f"{reply.error.code} {reply.error.reason}".encode(), []
    for name, record in reply.content.metric_records.items():
        for k, v in record.items():
            numbers.append(float(v))  # type: ignore[arg-type]
            parts += [f"{name}.{k}={v!r}".encode(), struct.pack("<d", float(v)), struct.pack("<f", float(v))]  # type: ignore[arg-type]
    for name, config in reply.content.config_records.items():
        for k, v in config.items():
            parts += [f"{name}.{k}=".encode(), v if isinstance(v, bytes) else repr(v).encode()]
    for name, arrays in reply.content.array_records.items():
        for k, a in arrays.items():
            parts += [f"{name}.{k}{a.shape}{a.dtype}".encode(), a.numpy().tobytes()]
    return b"\n".join(parts), numbers


def assert_nothing_identifying(reply: Message, site: SiteConfig) -> None:
    data, numbers = _wire(reply)
    for text in [*TEXTS, str(site.dicom_dir), FOLDER, *(str(n) for n in NUMBERS)]:
        assert text.encode() not in data, text
    for n in NUMBERS:
        for packed in (struct.pack("<d", float(n)), struct.pack("<q", n), struct.pack("<f", float(n))):
            assert packed not in data, n
    for v in numbers:
        digits = repr(abs(v)).replace(".", "").lstrip("0")
        assert {int(v), round(v), abs(int(v))}.isdisjoint(NUMBERS) and BIRTH not in digits and PID not in digits, v


def blocked(site: SiteConfig) -> list[dict[str, object]]:
    return [e.data for e in read_entries(site.workspace / "audit.jsonl") if e.event == "egress-blocked"]


def incoming(kind: str = MessageType.TRAIN, conf: ConfigRecord | None = None) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=7,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(RecordDict({K.CONFIG: conf or ConfigRecord({K.SERVER_ROUND: 1})}), metadata=md)


def defective_app(content: Callable[[], RecordDict]) -> ClientApp:
    """The site's mods (guard outermost, then SecAgg+) around a handler with a defect that
    puts ``content`` in its reply."""
    def resolve(context: Context) -> SiteConfig:
        return resolve_site(context, ())

    app = ClientApp(mods=[egress_guard(resolve), secagg_mod(resolve)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(content(), reply_to=msg)

    return app


def send(app: ClientApp, site: SiteConfig, kind: str = MessageType.TRAIN, conf: ConfigRecord | None = None) -> Message:
    context = Context(run_id=1, node_id=7, node_config={NODE_SITE_KEY: str(site.workspace)}, state=RecordDict(),
                      run_config={})
    return app(incoming(kind, conf), context)


def _site_record(site: SiteConfig) -> ConfigRecord:
    return ConfigRecord({K.SITE_NAME: site.name, K.AUDIT_HEAD: "ab" * 32})


def _metrics(**values: float) -> Callable[[SiteConfig], RecordDict]:
    return lambda site: RecordDict({K.METRICS: MetricRecord(dict(values)), K.SITE: _site_record(site)})  # type: ignore[arg-type]


def test_error_text_with_the_export_path_never_leaves(doe: SiteConfig) -> None:
    """A missing labels file raises an error naming the full path of the export (the patient's
    folder); in train and evaluate the server gets the numeric code and its fixed text only."""
    doe.labels_file.rename(doe.labels_file.with_suffix(".moved"))
    shutil.rmtree(doe.cache_dir)
    server = MaliciousServer(doe.workspace)
    for reply in (server.train(request()), server.evaluate(request())):
        assert reply.has_error() and (reply.error.code, reply.error.reason) == (463, "site data unusable")
        assert_nothing_identifying(reply, doe)
    assert [(e["reason"], e["code"]) for e in blocked(doe)] == [("error-detail-withheld", 463)] * 2
    # an error reply a handler built with its own text leaves rebuilt, any unknown code as 469
    texts = iter([(463, f"labels file {doe.labels_file} does not exist"), (4711, f"{NAME} {BIRTH}"),
                  (K.SECAGG_REFUSED, f"secure aggregation refused at the {FOLDER} stage (malformed)")])

    def resolve(context: Context) -> SiteConfig:
        return resolve_site(context, ())

    app = ClientApp(mods=[egress_guard(resolve)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from flwr.app import Error

        code, text = next(texts)
        return Message(Error(code=code, reason=text), reply_to=msg)

    got = [send(app, doe) for _ in range(3)]
    assert [(r.error.code, r.error.reason) for r in got] == [
        (463, "site data unusable"), (469, "internal error at the site"),
        (K.SECAGG_REFUSED, "secure aggregation refused")]  # the stage named is not one of the five
    for reply in got:
        assert_nothing_identifying(reply, doe)
    assert [e["reason"] for e in blocked(doe)][-3:] == ["error-text-rebuilt"] * 3


def test_exception_inside_the_guard_leaves_as_a_code(doe: SiteConfig, caplog: pytest.LogCaptureFixture) -> None:
    """A site configuration that fails to load while the guard checks a reply (here: after the
    handler ran) is answered with 460 and its fixed text; the detail is in the site's log."""
    (doe.workspace / "site.toml").write_text(f"[site]\nname = '{FOLDER}^'\n")
    caplog.set_level(logging.ERROR, logger="medfed.site")
    reply = send(defective_app(lambda: RecordDict({K.METRICS: MetricRecord({K.NUM_EXAMPLES: 3})})), doe)
    assert (reply.error.code, reply.error.reason) == (460, "site configuration invalid")
    assert_nothing_identifying(reply, doe)
    assert "site.toml" in caplog.text and "code 460" in caplog.text


LEAKS: dict[str, Callable[[SiteConfig], RecordDict]] = {
    "birth date plus a half (off the grid)": _metrics(**{K.EPSILON: 19620314.5}),
    "negated birth date": _metrics(**{K.NUM_EXAMPLES: -19620314}),
    "birth date with a decimal point": _metrics(**{K.EPSILON: 196.20314}),
    "birth date as a fraction": _metrics(**{K.VAL_AUROC: 0.19620314}),
    "birth date as a year": _metrics(**{K.VAL_LOSS: 1962.0314}),
    "study date as days since 1970": _metrics(**{K.NUM_EXAMPLES: DAYS_TO_STUDY}),
    "study date as seconds since 1970": _metrics(**{K.NUM_EXAMPLES: DAYS_TO_STUDY * 86400 + 3600}),
    "patient ID plus one": _metrics(**{K.PATIENTS: int(PID) + 1}),
    "patient ID minus one": _metrics(**{K.NUM_EXAMPLES: int(PID) - 1}),
    "name spelled by a float64's bytes": _metrics(**{K.TRAIN_LOSS: struct.unpack("<d", NAME.encode())[0]}),
    "name spelled by an int64's bytes": _metrics(**{K.NUM_EXAMPLES: struct.unpack("<q", NAME.encode())[0]}),
}


@pytest.mark.parametrize("what", list(LEAKS))
def test_numeric_encodings_of_identifiers_are_blocked(doe: SiteConfig, what: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="medfed.site")
    reply = send(defective_app(lambda: LEAKS[what](doe)), doe)
    assert reply.has_error() and (reply.error.code, reply.error.reason) == (K.EGRESS_BLOCKED, K.BLOCKED_REASON), what
    assert_nothing_identifying(reply, doe)
    assert [(e["reason"], e["code"]) for e in blocked(doe)] == [("schema", K.EGRESS_BLOCKED)], what
    assert "egress guard blocked" in caplog.text and BIRTH not in caplog.text and PID not in caplog.text


def test_in_grid_numeric_forms_are_caught_by_the_fingerprints(doe: SiteConfig,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Those of the encodings that fit the metric grid are caught by the fingerprints, not the grid."""
    caplog.set_level(logging.WARNING, logger="medfed.site")
    for key, value in ((K.EPSILON, 196.20314), (K.VAL_AUROC, 0.19620314), (K.NUM_EXAMPLES, DAYS_TO_STUDY),
                       (K.PATIENTS, int(PID) + 1), (K.NUM_EXAMPLES, int(PID) - 1)):
        quantise(key, value)  # on the grid
        assert send(defective_app(lambda k=key, v=value: _metrics(**{k: v})(doe)), doe).error.code == K.EGRESS_BLOCKED
    assert caplog.text.count("matches an identifying header value") == 5


def test_patient_named_array_image_and_blob_views_are_blocked(doe: SiteConfig) -> None:
    first = sorted((doe.dicom_dir / "P00000").glob("*.dcm"))[0]
    pixels = pydicom.dcmread(first).pixel_array.astype(np.float32)  # the patient's 512x512 (or smaller) image
    image = np.zeros((512, 512), dtype=np.float32)
    image[: pixels.shape[0], : pixels.shape[1]] = pixels
    blob = first.read_bytes()
    delta = {k: np.zeros(shape, dtype=dtype) for k, (shape, dtype) in manifest().items()}
    length = ReplySchema(doe.name, manifest()).masked_length
    fitted = (blob * (8 * length // len(blob) + 1))[: 8 * length]  # the file repeated to the layout length
    head = next(iter(delta))
    cases = {
        "array named after the patient": {K.ARRAYS: ArrayRecord({FOLDER: Array(image)})},
        "the model's arrays plus the patient's": {K.ARRAYS: arrays_to_record({**delta, FOLDER: image})},
        "an image in a model array's place": {K.ARRAYS: arrays_to_record({**delta, head: image})},
        "the model's arrays as raw float64": {K.ARRAYS: arrays_to_record({k: v.astype(np.float64) for k, v in delta.items()})},
        "uint64 view of the DICOM file": {K.MASKED: ArrayRecord({K.MASKED: Array(np.frombuffer(
            blob[: len(blob) // 8 * 8], dtype=np.uint64).copy())})},
        "uint64 view of the file at the layout length": {K.MASKED: ArrayRecord({K.MASKED: Array(
            np.frombuffer(fitted, dtype=np.uint64).copy())})},
    }
    for what, records in cases.items():
        reply = send(defective_app(lambda r=records: RecordDict({**r, K.SITE: _site_record(doe)})), doe)  # type: ignore[arg-type]
        assert reply.has_error() and reply.error.code == K.EGRESS_BLOCKED, what
        assert_nothing_identifying(reply, doe)
    assert len(blocked(doe)) == len(cases)


def _pin_roster(doe: SiteConfig, peers: int = 3) -> list[str]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {doe.name: public_pem(load_or_create_key(site_key_path(doe)).public_key()).decode()}
    keys |= {f"site-{i}": public_pem(Ed25519PrivateKey.generate().public_key()).decode() for i in range(1, peers)}
    atomic_write_bytes(roster_path(doe), roster_bytes(keys))
    return sorted(keys)


def test_raw_oversize_or_malformed_secagg_records_are_blocked(doe: SiteConfig) -> None:
    names = _pin_roster(doe)
    honest_box = os.urandom(12 + 66 + 16)
    cases = {
        "raw bytes in the advert": b"DOE^JOHN 19620314 " + bytes(64),
        "a file in the outbox": (doe.dicom_dir / "P00000" / "001.dcm").read_bytes(),
        "an outbox to a site outside the roster": boxes_to_bytes({FOLDER: honest_box}),
        "an outbox box of the wrong size": boxes_to_bytes({names[1]: honest_box + NAME.encode()}),
        "an outbox padded with spaces": boxes_to_bytes({names[1]: honest_box}) + b" " * 8,
        "an oversize outbox": boxes_to_bytes({f"site-{i}": honest_box for i in range(1, 60)}),
        "a consistency signature carrying text": NAME.encode() * 9,
        "a graph nonce carrying text": NAME.encode() * 5,
        "a graph nonce with a name appended": os.urandom(32) + NAME.encode(),
    }
    keys = {"raw bytes in the advert": K.ADVERT, "a consistency signature carrying text": K.CONSISTENCY,
            "a graph nonce carrying text": K.NONCE, "a graph nonce with a name appended": K.NONCE}
    for what, data in cases.items():
        key = keys.get(what, K.OUTBOX)
        reply = send(defective_app(lambda k=key, d=data: RecordDict({  # type: ignore[misc]
            K.SECAGG: ConfigRecord({k: d}), K.SITE: ConfigRecord({K.SITE_NAME: doe.name})})), doe)
        assert reply.has_error() and reply.error.code == K.EGRESS_BLOCKED, what
        assert_nothing_identifying(reply, doe)
    assert len(blocked(doe)) == len(cases)


def test_deleting_the_cache_does_not_turn_matching_off(doe: SiteConfig) -> None:
    leak = _metrics(**{K.NUM_EXAMPLES: DAYS_TO_STUDY})
    shutil.rmtree(doe.cache_dir)
    assert send(defective_app(lambda: leak(doe)), doe).error.code == K.EGRESS_BLOCKED
    assert not doe.cache_dir.exists()  # matched from keys/, nothing rebuilt
    # fingerprints gone too: rebuilt from the DICOM scan before anything is sent
    (doe.keys_dir / PRINTS_FILE).unlink()
    assert send(defective_app(lambda: leak(doe)), doe).error.code == K.EGRESS_BLOCKED
    assert (doe.keys_dir / PRINTS_FILE).stat().st_mode & 0o777 == 0o600
    # a new identifier key: the old set cannot be compared, so it is rebuilt with the new key
    (doe.keys_dir / KEY_FILE).unlink()
    assert send(defective_app(lambda: leak(doe)), doe).error.code == K.EGRESS_BLOCKED
    assert (doe.keys_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert [e["reason"] for e in blocked(doe)] == ["schema"] * 3


def test_missing_fingerprints_that_cannot_be_rebuilt_refuse_every_reply(doe: SiteConfig,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    (doe.keys_dir / PRINTS_FILE).unlink()
    doe.dicom_dir.rename(doe.dicom_dir.with_name("moved"))  # the export is offline
    caplog.set_level(logging.ERROR, logger="medfed.site")
    honest = _metrics(**{K.NUM_EXAMPLES: 12, K.TRAIN_LOSS: 0.25})
    reply = send(defective_app(lambda: honest(doe)), doe)
    assert (reply.error.code, reply.error.reason) == (FINGERPRINTS_UNAVAILABLE, "site identifier fingerprints unavailable")
    assert_nothing_identifying(reply, doe)
    assert str(doe.keys_dir / PRINTS_FILE) in caplog.text and "medfed-site check" in caplog.text
    assert blocked(doe) == [{"message_type": "train", "reason": "fingerprints-unavailable",
                             "code": FINGERPRINTS_UNAVAILABLE}]


def test_honest_dp_train_and_evaluate_pass_quantised_only(tmp_path: Path, doe: SiteConfig) -> None:
    server = MaliciousServer(doe.workspace)
    reply = server.train(request())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = reply.content.metric_records[K.METRICS]
    event = site_ledger(doe.workspace).events[-1]
    assert sent[K.EPSILON] == quantise(K.EPSILON, event.epsilon_after) >= event.epsilon_after
    assert sent[K.DELTA] == quantise(K.DELTA, event.delta) >= event.delta
    assert sent[K.NUM_EXAMPLES] == sent[K.PATIENTS] == load_site_data(doe, image_size=16).train.n_patients
    update = record_to_arrays(reply.content.array_records[K.ARRAYS])
    assert {k: (a.shape, a.dtype.name) for k, a in update.items()} == dict(manifest())
    assert float(np.abs(np.concatenate([a.ravel() for a in update.values()])).max()) > 0  # a real update
    assert_nothing_identifying(reply, doe)
    evaluated = server.evaluate(request())
    assert not evaluated.has_error()
    m = evaluated.content.metric_records[K.METRICS]
    assert m[K.EPSILON] == quantise(K.EPSILON, site_ledger(doe.workspace).epsilon(delta=event.delta))
    assert all(float(v) == quantise(k, v) for k, v in m.items())  # on the grid: 4 significant digits at most
    assert_nothing_identifying(evaluated, doe)
    assert blocked(doe) == []


def test_honest_secure_aggregation_stages_pass(tmp_path: Path, small_site: Path) -> None:
    """Three sites run the five SecAgg+ stages through their real ClientApp (guard and SecAgg+
    mod); every stage reply passes the guard as the protocol wrote it."""
    from client.app import build_client_app

    export = tmp_path / FOLDER
    shutil.copytree(small_site, export)
    _plant(export)
    configs = [load_site_config(make_workspace(tmp_path, f"site-{i}", export, max_epsilon=50.0)) for i in (1, 2, 3)]
    doc = roster_bytes({c.name: public_pem(load_or_create_key(site_key_path(c)).public_key()).decode() for c in configs})
    for c in configs:
        atomic_write_bytes(roster_path(c), doc)
    app = build_client_app()
    contexts = {c.name: Context(run_id=1, node_id=i, node_config={NODE_SITE_KEY: str(c.workspace)},
                                state=RecordDict(), run_config={}) for i, c in enumerate(configs)}
    base = request(server_round=2, run_id="run-sa")

    def stage(name: str, stage_: str, **extra: object) -> Message:
        conf = ConfigRecord(dict(base.to_record()))
        conf[K.SECAGG_STAGE] = stage_
        for k, v in extra.items():
            conf[k] = v  # type: ignore[assignment]
        content = RecordDict({K.CONFIG: conf, K.ARRAYS: arrays_to_record(
            {k: np.zeros(s, dtype=d) for k, (s, d) in manifest().items()})})
        md = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=1,
                      reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                      message_type=MessageType.TRAIN)
        reply = app(Message(content, metadata=md), contexts[name])
        assert not reply.has_error(), (name, stage_, reply.error.reason if reply.has_error() else "")
        return reply

    names = [c.name for c in configs]
    adverts = {}
    for n in names:
        adverts |= adverts_from_bytes(stage(n, "advertise").content.config_records[K.SECAGG][K.ADVERT])  # type: ignore[arg-type]
    model = arrays_sha256({k: np.zeros(s, dtype=d) for k, (s, d) in manifest().items()})
    params = json.dumps({"run_id": "run-sa", "round": 2, "sites": names, "k": 3, "threshold": 2,
                         "update_clip": 1.0, "max_weight": 1 << 20, "request": base.digest(model)})
    outboxes = {n: boxes_from_bytes(stage(n, "share", **{K.SECAGG_PARAMS: params,
                                                          K.SECAGG_ADVERTS: adverts_to_bytes(adverts)})
                                    .content.config_records[K.SECAGG][K.OUTBOX])  # type: ignore[arg-type]
                for n in names}
    masked = {}
    for n in names:
        inbox = {s: box[n] for s, box in outboxes.items() if n in box}
        reply = stage(n, "input", **{K.SECAGG_INBOX: boxes_to_bytes(inbox), K.SECAGG_SHARERS: names})
        masked[n] = reply.content.array_records[K.MASKED][K.MASKED].numpy()
        assert len(masked[n]) == ReplySchema(n, manifest()).masked_length and K.ARRAYS not in reply.content.array_records
        assert_nothing_identifying(reply, configs[0])
    signatures = {n: stage(n, "consistency", **{K.SECAGG_SURVIVORS: names}).content.config_records[K.SECAGG][K.CONSISTENCY]
                  for n in names}
    for n in names:
        reveals = stage(n, "unmask", **{K.SECAGG_SIGNATURES: boxes_to_bytes(signatures)})  # type: ignore[arg-type]
        assert K.REVEALS in reveals.content.config_records[K.SECAGG]
    assert len({m.tobytes() for m in masked.values()}) == 3  # three masked vectors, none the other's
    for c in configs:
        assert blocked(c) == []


@pytest.fixture()
def guarded(tmp_path: Path, small_site: Path) -> SiteConfig:
    """A site with the default policy: DP on, secure aggregation required."""
    export = tmp_path / FOLDER / "export"
    shutil.copytree(small_site, export)
    _plant(export)
    config = load_site_config(make_workspace(tmp_path / FOLDER, "site-a", export))
    load_site_data(config, image_size=16)
    return config


def test_a_train_action_cannot_skip_secure_aggregation(guarded: SiteConfig) -> None:
    """The red team sent ``train.default`` (Flower routes it to the train handler, with the mods)
    with ``secagg-stage = input``: the SecAgg+ mod stepped aside (it looked for "train" exactly), the
    handler trusted the server's stage string, and the site's unmasked update left although its
    policy requires secure aggregation. Now only the exact message types are answered, the handler
    trusts only the site's own mod, and an unmasked update never leaves such a site."""
    server = MaliciousServer(guarded.workspace)
    for kind in ("train.default", "evaluate.default"):  # (an unregistered "query" fails in Flower, before the mods)
        reply = server.send(kind, request(), extra={K.SECAGG_STAGE: "input"})
        assert reply.has_error() and (reply.error.code, reply.error.reason) == (462, K.SITE_ERRORS[462]), kind
        assert not reply.has_content()  # an error reply: no records at all
    assert [(e["reason"], e["message_type"]) for e in blocked(guarded)] == [("message-type", "other")] * 2
    # the exact type with the stage alone (no advertised session): the SecAgg+ mod refuses it
    reply = server.send(MessageType.TRAIN, request(), extra={K.SECAGG_STAGE: "input"})
    assert reply.has_error() and reply.error.code == K.SECAGG_REFUSED
    # without a stage: the site's policy refuses to train unmasked
    reply = server.train(request())
    assert not reply.has_error() and not reply.content.array_records
    assert reply.content.metric_records[K.METRICS][K.REFUSED] == 1
    assert not (guarded.workspace / "ledger.json").exists()  # nothing charged, nothing trained
    # and a handler defect that returns the update anyway is stopped by the schema
    update = {k: np.zeros(shape, dtype=dtype) for k, (shape, dtype) in manifest().items()}
    app = defective_app(lambda: RecordDict({K.ARRAYS: arrays_to_record(update), K.SITE: _site_record(guarded),
                                            K.METRICS: MetricRecord({K.NUM_EXAMPLES: 3})}))
    reply = send(app, guarded)
    assert reply.has_error() and reply.error.code == 451
    assert blocked(guarded)[-1]["reason"] == "schema"


@pytest.mark.parametrize("value", [3141962, 14031962, 620314, 31462])
def test_a_birth_date_in_other_orders_is_caught(doe: SiteConfig, value: int) -> None:
    """MMDDYYYY, DDMMYYYY, YYMMDD and MMDDYY forms of the birth date in a count (counts hold 7 digits)."""
    reply = send(defective_app(lambda: _metrics(**{K.NUM_EXAMPLES: value})(doe)), doe)
    assert reply.has_error() and reply.error.code == 451, value
    assert blocked(doe)[-1]["reason"] == "schema"
