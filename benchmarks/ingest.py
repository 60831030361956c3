"""DICOM ingest throughput: raw pydicom vs medfed's first pass (1 and 2 workers) and cached pass.

Same files for every contender, measured side by side in one process, page cache warm
for all (each contender reads the files once before timing starts). Each repeat runs every
contender once and raw twice (before and after medfed's passes); a contender's ratio is the
median over repeats of raw's mean time divided by its time in the same repeat (this
machine's speed drifts by tens of percent between seconds):

- ``raw``: ``pydicom.dcmread(path).pixel_array`` for every file (decode only: no
  modality LUT, window, resize, hashing, header scan or cache);
- ``medfed first pass``: :func:`client.dicom.ingest.ingest` into an empty cache (decode,
  modality LUT, window, resize, content hash, PS3.15 header scan, cache write);
- ``medfed cached``: the same call again (no DICOM file opened);
- ``monai``: MONAI ``LoadImage(reader="PydicomReader")`` when MONAI is installed (run in a
  child process, so that torch is not loaded into this one).

Files: generated CT-like 512x512 12-bit slices (``client.synth`` at matrix 512) plus every
image pydicom bundles that pydicom itself can decode. Usage::

    python benchmarks/ingest.py [--patients 300] [--repeats 3] [--json]

Ends with one JSON line (``--json``: only that line).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom

from client.dicom import Preprocessing
from client.dicom.ingest import ingest
from client.synth import generate_site, site_profile


def build_corpus(root: Path, patients: int) -> Path:
    data = root / "data"
    generate_site(data / "ct512", dataclasses.replace(site_profile(0, patients=patients), size=512), seed=1)
    bundled = Path(pydicom.__file__).parent / "data" / "test_files"
    (data / "pydicom").mkdir()
    for i, path in enumerate(sorted(p for p in bundled.rglob("*") if p.is_file())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _ = pydicom.dcmread(path).pixel_array
            except Exception:
                continue  # raw pydicom must decode every file of the corpus
        shutil.copy(path, data / "pydicom" / f"{i:03d}.dcm")
    for extra in ("labels.csv", "synth.json"):
        (data / "ct512" / extra).unlink()
    return data


def raw_pass(files: list[Path]) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            _ = pydicom.dcmread(path).pixel_array
    return time.perf_counter() - start


MONAI_CHILD = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from monai.transforms import LoadImage
files = sys.argv[1:]
loader = LoadImage(reader="PydicomReader", image_only=True)
failed = 0
start = time.perf_counter()
for path in files:
    try:
        loader(path)
    except Exception:
        failed += 1
print(json.dumps({"seconds": time.perf_counter() - start, "failed": failed}))
"""
MONAI_FAILED: set[int] = set()


def monai_pass(files: list[Path]) -> float | None:
    """MONAI in its own process (it loads torch, which would make our worker pool spawn)."""
    if importlib.util.find_spec("monai") is None:
        return None
    out = subprocess.run([sys.executable, "-c", MONAI_CHILD, *map(str, files)], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        return None
    got = json.loads(out.stdout.strip().splitlines()[-1])
    MONAI_FAILED.add(int(got["failed"]))
    return float(got["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medfed-ingest-") as tmp:
        root = Path(tmp)
        data = build_corpus(root, args.patients)
        files = sorted(p for p in data.rglob("*.dcm"))
        pre = Preprocessing(image_size=64)
        raw_pass(files)  # warm the page cache for everyone
        times: dict[str, list[float]] = {"raw": [], "first_1": [], "first_2": [], "cached": [], "monai": []}
        for r in range(args.repeats):
            raw_before = raw_pass(files)
            for workers in (1, 2):
                cache = root / f"cache-{r}-{workers}"
                got = ingest(data, pre, cache_dir=cache, workers=workers)
                assert got.decoded == len(files)
                times[f"first_{workers}"].append(got.seconds)
            again = ingest(data, pre, cache_dir=root / f"cache-{r}-2", workers=2)
            assert again.decoded == 0
            times["cached"].append(again.seconds)
            times["raw"].append((raw_before + raw_pass(files)) / 2)  # raw on both sides of medfed's passes
            monai = monai_pass(files)
            if monai is not None:
                times["monai"].append(monai)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    # paired: each repeat's raw time over that repeat's contender time, then the median
    ratios = {k: statistics.median(r / c for r, c in zip(times["raw"], v, strict=True))
              for k, v in times.items() if v and k != "raw"}
    n = len(files)
    result = {
        "files": n, "generated_512": sum(1 for f in files if "ct512" in f.parts), "repeats": args.repeats,
        "images_per_s": {k: round(n / v, 1) for k, v in med.items()},
        "ratio_vs_raw": {k: round(v, 2) for k, v in ratios.items()},
        "ratio_per_repeat": {k: [round(r / c, 2) for r, c in zip(times["raw"], v, strict=True)]
                             for k, v in times.items() if v and k != "raw"},
        "monai_failed_files": max(MONAI_FAILED, default=0),
        "targets": {"first_2 >= 1.5x raw": ratios["first_2"] >= 1.5, "cached >= 30x raw": ratios["cached"] >= 30},
    }
    line = {"benchmark": "ingest", "ratios": result["ratio_vs_raw"],
            "targets": {"first_2_vs_raw": 1.5, "cached_vs_raw": 30.0}, "pass": all(result["targets"].values()),
            **result}
    if args.json:
        print(json.dumps(line))
        return
    print(f"{n} files ({result['generated_512']} generated 512x512 CT, rest pydicom's bundled images), "
          f"median of {args.repeats} (ratios: median of each repeat's ratio)")
    for k, v in result["images_per_s"].items():
        ratio = result["ratio_vs_raw"].get(k, 1.0)
        each = " ".join(f"{x:.2f}" for x in result["ratio_per_repeat"].get(k, []))
        print(f"  {k:9s} {v:9.1f} images/s   {ratio:6.2f}x raw pydicom" + (f"   (repeats: {each})" if each else ""))
    if "monai" in med:
        print(f"  (MONAI could not load {max(MONAI_FAILED, default=0)} of the files; their time is included)")
    for name, ok in result["targets"].items():
        print(f"  target {name}: {'met' if ok else 'NOT met'}")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
