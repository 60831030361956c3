"""The ingest cache: a warm pass opens no DICOM file and returns identical arrays; a changed
file or config re-decodes only its entries; a process killed mid-ingest leaves a usable cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

import client.dicom.ingest as ingest_mod
from client.dicom import Preprocessing
from client.dicom.ingest import ingest, store_dir
from client.dicom.store import JOURNAL

_OPENED: list[str] = []
_WATCH: list[str] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _WATCH and isinstance(args[0], str | bytes | os.PathLike):
        path = os.fsdecode(args[0])
        if path.startswith(_WATCH[0]) and path.endswith(".dcm"):
            _OPENED.append(path)


sys.addaudithook(_audit)


def _copy(small_site: Path, dest: Path) -> Path:
    shutil.copytree(small_site, dest)
    return dest


def test_warm_pass_opens_no_dicom_file_and_returns_identical_arrays(
    tmp_path: Path, small_site: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, cache = _copy(small_site, tmp_path / "data"), tmp_path / "cache"
    pre = Preprocessing(image_size=16)
    n = len(list(data.rglob("*.dcm")))
    first = ingest(data, pre, cache_dir=cache, workers=2)  # > MIN_PARALLEL files: worker processes
    assert n >= ingest_mod.MIN_PARALLEL and first.decoded == n + 2  # + synth.json and labels.csv (skipped: not DICOM)
    (tmp_path / "serial").mkdir()  # same identifier key: same keyed hashes in the records
    shutil.copy(cache / ingest_mod.KEY_FILE, tmp_path / "serial" / ingest_mod.KEY_FILE)
    serial = ingest(data, pre, cache_dir=tmp_path / "serial", workers=1)  # file order, one process
    # exact: the same process_file on the same bytes with one BLAS thread in both, i.e. the same float32
    # operations in the same order; only the process that runs them differs
    np.testing.assert_array_equal(first.frames, serial.frames)
    assert first.records == serial.records and first.digests == serial.digests

    def no_dicom(*_: object, **__: object) -> None:
        raise AssertionError("pydicom was called although the cache is warm")

    monkeypatch.setattr(pydicom, "dcmread", no_dicom)
    _WATCH[:] = [str(data)]
    try:
        second = ingest(data, pre, cache_dir=cache, workers=2)
    finally:
        _WATCH.clear()
    assert _OPENED == [] and second.decoded == 0
    np.testing.assert_array_equal(first.frames, second.frames)  # exact: a replay of the stored shard bytes
    assert first.records == second.records and first.rels == second.rels
    monkeypatch.undo()

    # a changed file re-decodes that file only; its new pixels are served
    victim = sorted(data.rglob("*.dcm"))[3]
    ds = pydicom.dcmread(victim)
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=ds.pixel_array.dtype).tobytes()
    ds.save_as(victim)
    third = ingest(data, pre, cache_dir=cache, workers=1)
    assert third.decoded == 1
    i = third.rels.index(victim.relative_to(data).as_posix())
    assert not np.array_equal(third.frames[i], first.frames[i])
    mask = np.ones(len(first.frames), dtype=bool)
    mask[i] = False
    np.testing.assert_array_equal(third.frames[mask], first.frames[mask])  # exact: replayed from the cache

    # another preprocessing config is another set of entries
    assert ingest(data, Preprocessing(image_size=8), cache_dir=cache, workers=1).decoded == n + 2


def test_guided_chunks_cover_every_file_once_large_first() -> None:
    for n, workers in ((993, 2), (64, 2), (10_000, 8), (7, 3)):
        chunks = list(ingest_mod.guided_chunks(n, workers))
        assert [i for i, _ in chunks] == [0] + [j for _, j in chunks[:-1]] and chunks[-1][1] == n
        sizes = [j - i for i, j in chunks]
        assert sizes == sorted(sizes, reverse=True) and min(sizes[:-1], default=ingest_mod.CHUNK) >= ingest_mod.CHUNK
        assert max(sizes) <= ingest_mod.MAX_CHUNK
        guided = max(ingest_mod.CHUNK, n // (ingest_mod.GUIDED * workers))
        assert sizes[0] == min(ingest_mod.MAX_CHUNK, guided) or n < ingest_mod.CHUNK
    assert len(list(ingest_mod.guided_chunks(993, 2))) == 32  # instead of 125 tasks of 8


def test_a_store_of_an_older_record_version_is_not_reused(tmp_path: Path, small_site: Path) -> None:
    data, cache = _copy(small_site, tmp_path / "data"), tmp_path / "cache"
    pre = Preprocessing(image_size=16)
    first = ingest(data, pre, cache_dir=cache, workers=1)
    store_dir(cache, pre).rename(cache / f"ingest-{pre.key()}")  # as version 1 named its store
    again = ingest(data, pre, cache_dir=cache, workers=1)
    assert again.decoded == first.decoded == len(first.rels)  # every file scanned anew
    np.testing.assert_array_equal(again.frames, first.frames)  # exact: the same serial pass on the same bytes


def test_torn_journal_line_and_orphan_shard_are_ignored_and_repaired(tmp_path: Path, small_site: Path) -> None:
    data, cache = _copy(small_site, tmp_path / "data"), tmp_path / "cache"
    pre = Preprocessing(image_size=16)
    first = ingest(data, pre, cache_dir=cache, workers=1)
    store = store_dir(cache, pre)
    good = (store / JOURNAL).read_bytes()
    with open(store / JOURNAL, "ab") as fh:
        fh.write(b'{"shard":"shard-dead.npy","records":{"ab')  # crash mid-append
    (store / "shard-dead.npy").write_bytes(b"\x93NUMPY partial")  # shard whose line never landed
    again = ingest(data, pre, cache_dir=cache, workers=1)
    assert again.decoded == 0
    np.testing.assert_array_equal(again.frames, first.frames)  # exact: a replay of the stored shards
    assert not (store / "shard-dead.npy").exists()
    # the next append cuts the torn line off and continues the journal
    new = data / "extra.dcm"
    shutil.copy(sorted(data.rglob("*.dcm"))[0], new)
    assert ingest(data, pre, cache_dir=cache, workers=1).decoded == 1
    text = (store / JOURNAL).read_bytes()
    assert text.startswith(good) and text.endswith(b"\n") and b'"records":{"ab' not in text


def test_killed_mid_ingest_leaves_a_usable_cache(tmp_path: Path, small_site: Path) -> None:
    data, cache = _copy(small_site, tmp_path / "data"), tmp_path / "cache"
    for i in range(3):  # enough files for several batches
        shutil.copytree(small_site, data / f"copy{i}", ignore=shutil.ignore_patterns("*.csv", "*.json"))
        for f in (data / f"copy{i}").rglob("*.dcm"):
            f.write_bytes(f.read_bytes() + bytes([i + 1]) * 2)  # distinct content (trailing padding)
    pre = Preprocessing(image_size=16)
    journal = store_dir(cache, pre) / JOURNAL
    child = (
        "import sys, time, client.dicom.ingest as m\n"
        "from client.dicom import Preprocessing\n"
        "m.BATCH = 8\n"
        "orig = m.process_file\n"
        "def slow(*a, **k):\n    time.sleep(0.02)\n    return orig(*a, **k)\n"
        "m.process_file = slow\n"
        "m.ingest(sys.argv[1], Preprocessing(image_size=16), cache_dir=sys.argv[2], workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, str(data), str(cache)], cwd=Path(__file__).parents[4])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not journal.exists() or journal.read_bytes().count(b"\n") < 3):
            time.sleep(0.05)
        assert journal.exists(), "the child never committed a batch"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    total = len([p for p in data.rglob("*") if p.is_file() and p.name != "labels.csv"])
    resumed = ingest(data, pre, cache_dir=cache, workers=1)
    assert 0 < resumed.decoded < total
    clean = ingest(data, pre, cache_dir=None, workers=1)
    # exact: shards the killed child stored and frames decoded now both come from the same serial pass (one
    # BLAS thread, same machine and environment), so the same float32 operations in the same order
    np.testing.assert_array_equal(resumed.frames, clean.frames)
    assert [r.status for r in resumed.records] == [r.status for r in clean.records]


def test_commit_state_equals_journal_replay(tmp_path: Path) -> None:
    """What a commit puts in memory is exactly what replaying its journal line gives."""
    from client.dicom.store import FileRecord, IngestStore, Processed

    img = FileRecord("image", frames=2, total_frames=3, sop="s1", study="t", patient="p", modality="CT",
                     syntax="Explicit VR Little Endian", phi=("PatientName",), fingerprints=("f1", "f2"))
    batch = [Processed("a/1.dcm", 10, 111, "d1", img, np.ones((2, 4, 4), np.float32)),
             Processed("a/2.dcm", 11, 112, "d2", FileRecord("skipped", "not a DICOM file")),
             Processed("b/3.dcm", 12, 113, "d3", FileRecord("image", frames=1, total_frames=1),
                       np.full((1, 4, 4), 2.0, np.float32))]
    store = IngestStore(tmp_path / "store")
    store.commit(batch)
    replayed = IngestStore.read_only(tmp_path / "store")
    assert store.records == replayed.records and store.location == replayed.location
    assert store.files == replayed.files == {"a/1.dcm": (10, 111, "d1"), "a/2.dcm": (11, 112, "d2"),
                                             "b/3.dcm": (12, 113, "d3")}
    assert replayed.records["d1"].phi == ("PatientName",) and replayed.location["d3"][1] == 2
    np.testing.assert_array_equal(IngestStore(tmp_path / "store").gather(["d3", "d1"], (4, 4))[0], 2.0)
