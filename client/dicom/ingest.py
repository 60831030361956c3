"""Walk a DICOM export, decode and preprocess every file once (in parallel worker
processes), and serve later passes from the ingest cache without opening the files."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from pydicom.dataset import Dataset
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from threadpoolctl import threadpool_limits

from client.dicom import header
from client.dicom.deid import DeidScan, scan
from client.dicom.errors import DicomReadError, SiteDataError
from client.dicom.identifiers import KEY_FILE as KEY_FILE  # where a standalone check keeps its key
from client.dicom.identifiers import identifier_key, key_id, save_fingerprints
from client.dicom.preprocess import Preprocessing, frame_index, prepare, prepare_linear, window_for
from client.dicom.reader import check_image, decode, decode_linear, parse, syntax_name
from client.dicom.store import FileRecord, IngestStore, Processed
from privacy.egress import fingerprint
from privacy.files import atomic_write_bytes

KEY_ID_FILE = "key-id"  # in a store: which identifier key its records' hashes were made with
CHUNK = 8  # files per task at the end of a parallel pass, and per step of a serial one
GUIDED = 4  # a parallel task takes 1/(GUIDED * workers) of the files not yet handed out...
MAX_CHUNK = 64  # ...but at most this many (bounds a worker's held results, e.g. all frames of cine loops)
BATCH = 512  # at most this many files per cache commit (shard + journal line)
MIN_BATCH = 64  # parallel passes: at least this many, else an eighth of the pass (a short last commit)
MIN_PARALLEL = 64  # below this many files to decode, worker start-up costs more than it saves
# What a cached record holds; a new version is a new store, so no record is reused that an
# older scan made (2: identifying values inside sequence items are scanned as well; 3: every
# DA/DT/TM value and the numeric forms of identifiers are fingerprinted).
RECORD_VERSION = 3


@dataclass(frozen=True)
class Ingested:
    """Every file of a folder with its record; image frames concatenated in file order."""

    rels: list[str]
    records: list[FileRecord]
    frames: np.ndarray  # (M, size, size) float32 in [0, 1]
    offsets: np.ndarray  # (len(rels) + 1,) row range of each file in ``frames``
    decoded: int  # files opened and decoded in this pass (0 = all from the cache)
    seconds: float
    key: bytes  # the site's identifier-hashing key (to match labels keyed by UID)
    digests: list[str]  # content hash of each file (xxh3-128), in ``rels`` order


def default_workers() -> int:
    """Worker processes for decoding: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def candidate_files(folder: Path, exclude: Iterable[Path] = ()) -> list[tuple[str, os.stat_result]]:
    """``(relative posix path, stat)`` of every regular, non-hidden file under ``folder``,
    sorted by path, minus ``exclude`` (one ``stat`` per file, no path resolution)."""
    folder = require_folder(folder)
    root = os.path.realpath(folder)
    skip = set()
    for ex in exclude:
        real = os.path.realpath(ex)
        if real.startswith(root + os.sep):
            skip.add(os.path.relpath(real, root).replace(os.sep, "/"))
    found: list[tuple[str, os.stat_result]] = []
    stack = [(str(folder), "")]
    while stack:  # scandir walk: relative paths built by prefix, not by relpath/join per file
        path, prefix = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue  # an unreadable sub-folder is passed over, as os.walk does
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):  # like os.walk: no loops through linked folders
                stack.append((entry.path, rel + "/"))
            elif rel not in skip:
                st = entry.stat()
                if stat.S_ISREG(st.st_mode):
                    found.append((rel, st))
    found.sort(key=lambda item: item[0])
    return found


def require_folder(folder: Path) -> Path:
    """``folder`` if it is a directory, else the error that says how to fix it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteDataError(f"data folder {folder} does not exist or is not a folder: point --data at the "
                            "folder of the site's DICOM export")
    return folder


def store_dir(cache_dir: Path, pre: Preprocessing) -> Path:
    """The cache folder of one preprocessing (and record version) under ``cache_dir``."""
    return cache_dir / f"ingest-{pre.key()}-v{RECORD_VERSION}"


def _store(cache_dir: Path | None, pre: Preprocessing, key: bytes) -> IngestStore:
    """The cache store of this preprocessing; a store made with another identifier key (its
    records' hashes and fingerprints could not be compared any more) is discarded."""
    if cache_dir is None:
        return IngestStore(None)
    root = store_dir(Path(cache_dir), pre)
    marker = root / KEY_ID_FILE
    if root.is_dir() and not (marker.is_file() and marker.read_text().strip() == key_id(key)):
        shutil.rmtree(root)
    store = IngestStore(root)
    if not marker.is_file():
        atomic_write_bytes(marker, key_id(key).encode(), mode=0o600)
    return store


def process_file(path: Path, rel: str, pre: Preprocessing, key: bytes) -> Processed:
    """Decode, scan and preprocess one file; never raises for bad content."""
    st = path.stat()
    raw = path.read_bytes()
    digest = xxhash.xxh3_128_hexdigest(raw)
    ds = None
    try:
        ds = parse(raw, rel)
        deid = scan(ds, key)
        frames, total = _preprocess(ds, rel, pre)
        status, reason = "image", ""
    except DicomReadError as exc:
        frames, status, reason = None, "skipped" if exc.skipped else "error", exc.reason
    except Exception as exc:  # a defect in a third-party decoder must not stop the ingest
        frames, status, reason = None, "error", f"unexpected failure ({type(exc).__name__})"
    if ds is None:
        return Processed(rel, st.st_size, st.st_mtime_ns, digest, FileRecord(status, reason))
    if status != "image":
        deid = _safe_scan(ds, key)
    ident = {k: (_hash(key, ds, k)) for k in ("SOPInstanceUID", "StudyInstanceUID", "PatientID")}
    record = FileRecord(
        status, reason, frames=0 if frames is None else len(frames),
        total_frames=total if status == "image" else 0,
        sop=ident["SOPInstanceUID"], study=ident["StudyInstanceUID"], patient=ident["PatientID"],
        modality=_text(ds, "Modality"), syntax=syntax_name(ds),
        phi=deid.phi, burned_in=deid.burned_in, identity_removed=deid.identity_removed,
        fingerprints=deid.fingerprints,
    )
    return Processed(rel, st.st_size, st.st_mtime_ns, digest, record, frames)


def _preprocess(ds: Dataset, rel: str, pre: Preprocessing) -> tuple[np.ndarray, int]:
    """Model inputs of one dataset and its frame count. Only the frames the multi-frame
    policy keeps are decoded; linear grayscale takes the fast path."""
    geometry = check_image(ds, rel)
    index = frame_index(geometry[0], pre.frames, rel)
    window = window_for(ds, pre)
    linear = decode_linear(ds, rel, index, geometry)
    if linear is not None:
        return prepare_linear(linear, window, pre.image_size), geometry[0]
    return prepare(decode(ds, rel, index, geometry), window, pre.image_size), geometry[0]


def _safe_scan(ds: Dataset, key: bytes) -> DeidScan:
    try:
        return scan(ds, key)
    except Exception:
        return DeidScan((), False, False, ())


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = header.text(ds, keyword)
    except Exception:
        return ""
    return value if value.replace("_", "").isalnum() and len(value) <= 16 else ""


def _hash(key: bytes, ds: Dataset, keyword: str) -> str:
    try:
        value = header.text(ds, keyword)
    except Exception:
        value = ""
    return fingerprint(key, value) if value else ""


def _process_chunk(items: list[tuple[Path, str]], pre: Preprocessing, key: bytes) -> list[Processed]:
    return [process_file(path, rel, pre, key) for path, rel in items]


def _one_thread() -> None:
    """Worker processes are the parallelism: no BLAS/OpenMP thread pools inside them."""
    threadpool_limits(1)


def _parallel(todo: list[tuple[Path, str]], workers: int) -> bool:
    return workers > 1 and len(todo) >= MIN_PARALLEL


def _run(todo: list[tuple[Path, str]], pre: Preprocessing, key: bytes, workers: int) -> Iterator[list[Processed]]:
    if not _parallel(todo, workers):
        with threadpool_limits(1):  # tiny matrices: BLAS threads cost more than they give (~1 ms to set)
            for i in range(0, len(todo), CHUNK):
                yield _process_chunk(todo[i : i + CHUNK], pre, key)
        return
    # fork is fast; but never fork a process that has loaded torch (its thread pools do not survive it)
    ctx = multiprocessing.get_context("spawn" if "torch" in sys.modules else "fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_one_thread) as pool:
        futures = [pool.submit(_process_chunk, todo[i:j], pre, key) for i, j in guided_chunks(len(todo), workers)]
        for fut in as_completed(futures):
            yield fut.result()


def guided_chunks(n: int, workers: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each task over ``n`` files (guided self-scheduling): a task takes
    1/(GUIDED * workers) of the files not yet handed out, at least CHUNK and at most
    MAX_CHUNK. Early tasks are large, so that hand-offs (each ~0.7 ms of the parent's time)
    are few; late ones are small, so that the workers finish together."""
    start = 0
    while start < n:
        stop = min(n, start + min(MAX_CHUNK, max(CHUNK, (n - start) // (GUIDED * workers))))
        yield start, stop
        start = stop


def ingest(
    folder: Path, pre: Preprocessing, *, cache_dir: Path | None = None, keys_dir: Path | None = None,
    workers: int = 0, progress: bool = False, exclude: Iterable[Path] = (),
) -> Ingested:
    """Ingest every file under ``folder``; files already in the cache are not opened.

    ``keys_dir`` (a site's ``keys/``) holds the identifier key, made before any worker
    hashes, and receives the fingerprints of the identifying values this pass saw (the
    egress guard's set). Without it the key is kept in ``cache_dir`` (a standalone check of
    a folder), or is random for this pass when there is neither.
    """
    start = time.perf_counter()
    folder = Path(folder)
    listing = candidate_files(folder, exclude)
    key_folder = keys_dir if keys_dir is not None else cache_dir
    key = identifier_key(Path(key_folder)) if key_folder is not None else secrets.token_bytes(32)
    store = _store(cache_dir, pre, key)
    rels = [rel for rel, _ in listing]
    digests: dict[str, str] = {}
    todo = []
    for rel, st in listing:
        hit = store.lookup(rel, st.st_size, st.st_mtime_ns)
        if hit is None:
            todo.append((st.st_size, folder / rel, rel))
        else:
            digests[rel] = hit
    if todo:
        # largest files first: the costly ones start early and small ones fill the workers'
        # last gaps, instead of a multi-frame or JPEG 2000 file sorted last decoding alone
        todo.sort(key=lambda item: -item[0])
        _decode_all(store, [item[1:] for item in todo], pre, key, workers or default_workers(), progress,
                    digests)
    records = [store.records[digests[rel]] for rel in rels]
    if keys_dir is not None:
        save_fingerprints(Path(keys_dir), key, {p for r in records for p in r.fingerprints})
    counts = np.array([0] + [r.frames if r.status == "image" else 0 for r in records])
    offsets = np.cumsum(counts)
    frames = store.gather([digests[rel] for rel, n in zip(rels, counts[1:], strict=True) if n],
                          (pre.image_size, pre.image_size))
    return Ingested(rels, records, frames, offsets, len(todo), time.perf_counter() - start, key,
                    [digests[rel] for rel in rels])


def _decode_all(store: IngestStore, todo: list[tuple[Path, str]], pre: Preprocessing, key: bytes,
                workers: int, progress: bool, digests: dict[str, str]) -> None:
    console = Console(stderr=True)
    bar = Progress(TextColumn("decoding DICOM"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (progress and console.is_terminal))
    pending: list[Processed] = []
    batch = BATCH
    if _parallel(todo, workers):  # the last commit, which no worker's decoding overlaps, stays short
        batch = min(BATCH, max(MIN_BATCH, len(todo) // 8))
    with bar:
        task = bar.add_task("decode", total=len(todo))
        for chunk in _run(todo, pre, key, workers):
            pending.extend(chunk)
            bar.advance(task, len(chunk))
            if len(pending) >= batch:
                store.commit(pending)
                pending = []
            digests.update((p.rel, p.digest) for p in chunk)
        if pending:
            store.commit(pending)
