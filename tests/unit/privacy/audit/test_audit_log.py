"""The signed, hash-chained audit log on its own: chain, signatures, concurrency, rotation,
crash mid-append, and refusal of free text."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.audit import AuditLog, AuditLogError, load_or_create_key, read_entries
from privacy.audit.log import GENESIS, body_hash
from privacy.audit.verify import check_chain, segment_files
from privacy.keys import load_public_key

ROOT = Path(__file__).parents[4]


def _chain(path: Path, key: Ed25519PrivateKey, actor: str = "site-a"):  # type: ignore[no-untyped-def]
    return check_chain(segment_files(path), key.public_key(), actor)


def test_entries_chain_and_verify(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "keys" / "audit.key")
    assert (tmp_path / "keys" / "audit.key").stat().st_mode & 0o777 == 0o600
    assert load_public_key(tmp_path / "keys" / "audit.pub").public_bytes_raw() == key.public_key().public_bytes_raw()
    log = AuditLog(tmp_path / "audit.jsonl", "site-a", key)
    first = log.append("run-joined", {"run_id": "r1", "round": 0})
    second = log.append("round-trained", {"run_id": "r1", "round": 1, "epsilon_after": 1.5})
    assert first.seq == 0 and first.prev == GENESIS and second.seq == 1 and second.prev == first.hash
    assert second.hash == body_hash(second.body()) and log.head() == second.hash
    chain = _chain(log.path, key)
    assert chain.problems == [] and [e.event for e in chain.entries] == ["run-joined", "round-trained"]
    foreign = Ed25519PrivateKey.generate()
    assert "signature does not verify" in check_chain([log.path], foreign.public_key(), "site-a").problems[0].what
    with pytest.raises(AuditLogError, match="identifiers"):
        log.append("note", {"comment": "John Smith was here"})
    with pytest.raises(AuditLogError, match="non-finite"):
        log.append("note", {"x": float("nan")})
    assert len(read_entries(log.path)) == 2  # refused entries wrote nothing


def test_concurrent_appenders_are_serialized(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    logs = [AuditLog(tmp_path / "audit.jsonl", "site-a", key) for _ in range(2)]  # two instances, one file

    def work(i: int) -> None:
        for j in range(40):
            logs[i % 2].append("tick", {"thread": i, "j": j})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    chain = _chain(tmp_path / "audit.jsonl", key)
    assert chain.problems == [] and len(chain.entries) == 160
    assert [e.seq for e in chain.entries] == list(range(160))


def test_rotation_continues_the_chain(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path / "audit.jsonl", "site-a", key)
    for i in range(5):
        log.append("tick", {"i": i})
    closed = log.rotate()
    log.append("tick", {"i": 5})
    files = segment_files(log.path)
    assert files == [closed, log.path]
    chain = _chain(log.path, key)
    assert chain.problems == [] and [e.event for e in chain.entries][5:] == ["segment-close", "segment-open", "tick"]
    assert check_chain([log.path], key.public_key(), "site-a").problems  # the live segment alone does not start at 0


CHILD = """
import sys
from privacy.audit import AuditLog, load_or_create_key
log = AuditLog(sys.argv[1], "site-a", load_or_create_key(sys.argv[2]))
i = 0
while True:
    log.append("tick", {"i": i, "pad": "x" * 150, "list": list(range(400))})
    i += 1
"""


def test_writer_killed_mid_append_leaves_a_verifiable_log(tmp_path: Path) -> None:
    path, key_path = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    torn_seen = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(key_path)], cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 20000 * (attempt + 1)):
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        key = load_or_create_key(key_path)
        chain = _chain(path, key)
        assert chain.problems == [], chain.problems[0]
        torn_seen += chain.torn_tail
    # a torn line as a crash leaves it (written without its newline), then the next append
    data = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(data[: data.index(b"\n")][:-40])
    chain = _chain(path, key)
    assert chain.problems == [] and chain.torn_tail
    n = len(chain.entries)
    AuditLog(path, "site-a", key).append("after-crash", {"n": n})
    chain = _chain(path, key)
    assert chain.problems == [] and not chain.torn_tail and chain.entries[-1].seq == n
    assert chain.entries[-1].prev == chain.entries[-2].hash
    assert json.loads(path.read_bytes().splitlines()[-1])["event"] == "after-crash"
