"""`medfed-site check`: what a site's DICOM export holds, what is usable, what is skipped
and why, and which identifying attributes it still carries (counts, never values)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from client.dicom.cohort import join_labels, read_labels
from client.dicom.errors import SiteDataError
from client.dicom.ingest import ingest, require_folder
from client.dicom.preprocess import Preprocessing
from client.dicom.store import FileRecord


def preflight(
    folder: Path, labels_path: Path | None, pre: Preprocessing, *, cache_dir: Path | None = None,
    keys_dir: Path | None = None, workers: int = 0, progress: bool = False,
) -> dict[str, Any]:
    """The preflight report as one JSON-able dict (schema in ``docs/data.md``).

    Raises :class:`SiteDataError` for a missing folder or an unusable labels file.
    """
    start = time.perf_counter()
    require_folder(folder)
    labels = read_labels(labels_path) if labels_path is not None else None
    data = ingest(folder, pre, cache_dir=cache_dir, keys_dir=keys_dir, workers=workers, progress=progress,
                  exclude=[labels_path] if labels_path is not None else [])
    images = [r for r in data.records if r.status == "image"]
    phi: Counter[str] = Counter()
    for r in data.records:
        phi.update(r.phi)
    joined = join_labels(data, labels) if labels is not None else None
    return {
        "files": len(data.rels),
        "images": len(images),
        "frames": sum(r.total_frames for r in images),
        "patients": len({r.patient for r in images}),
        "studies": len({r.study for r in images}),
        "skipped": _listed(data.rels, data.records, "skipped"),
        "errors": _listed(data.rels, data.records, "error"),
        "labelled": len(joined.label_of) if joined else 0,
        "unlabelled": joined.unlabelled if joined else len(images),
        "labels_without_image": joined.labels_without_image if joined else 0,
        "phi_tags": dict(sorted(phi.items())),
        "burned_in": sum(r.burned_in for r in data.records),
        "identity_removed": sum(r.identity_removed for r in images),
        "modalities": dict(sorted(Counter(r.modality or "unknown" for r in images).items())),
        "transfer_syntaxes": dict(sorted(Counter(r.syntax for r in data.records if r.syntax).items())),
        "decoded": data.decoded,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _listed(rels: list[str], records: list[FileRecord], status: str) -> list[dict[str, str]]:
    return [{"path": rel, "reason": r.reason} for rel, r in zip(rels, records, strict=True) if r.status == status]


def default_labels(folder: Path) -> Path | None:
    """``labels.csv`` in the data folder when it exists (the generator and our docs put it there)."""
    path = Path(folder) / "labels.csv"
    return path if path.is_file() else None


def usable(report: dict[str, Any]) -> bool:
    """At least one labelled image can be trained on."""
    return bool(report["labelled"])


__all__ = ["preflight", "default_labels", "usable", "SiteDataError"]
