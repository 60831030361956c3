"""The reader over every file pydicom ships: read, or skipped/rejected with a reason; equal
to pydicom's own decode for grayscale; never any exception but DicomReadError (fuzz)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut, apply_modality_lut

from client.dicom import CorruptFileError, DicomReadError, NotAnImageError, read_pixels
from client.dicom.reader import LUMA, _palette_luma, decode, parse

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ALL_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())


def _pydicom_reference(path: Path) -> np.ndarray | None:
    """pydicom's own grayscale decode in modality units, or None when it cannot decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            if not str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME"):
                return None
            ref = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        except Exception:
            return None
    ref = ref.reshape(-1, int(ds.Rows), int(ds.Columns))
    return -ref if ds.PhotometricInterpretation == "MONOCHROME1" else ref


def test_every_bundled_file_is_read_or_refused_with_a_reason() -> None:
    assert len(ALL_FILES) > 150
    read: list[str] = []
    skipped: list[str] = []
    rejected: list[str] = []
    compared: list[str] = []
    for path in ALL_FILES:
        try:
            out = read_pixels(path)
        except DicomReadError as exc:
            assert exc.reason and str(path) in str(exc)
            (skipped if isinstance(exc, NotAnImageError) else rejected).append(path.name)
            continue
        assert out.dtype == np.float32 and out.ndim == 3 and np.isfinite(out).all()
        read.append(path.name)
        ref = _pydicom_reference(path)
        if ref is not None:
            np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-3, err_msg=path.name)
            compared.append(path.name)
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm", "JPEG2000.dcm",
                 "JPGExtended.dcm", "693_J2KI.dcm", "JPEGLSNearLossless_16.dcm", "rtdose_rle.dcm", "6154"):
        assert name in compared, name
    assert "MR_truncated.dcm" in rejected and "DICOMDIR" in skipped and "README.txt" in skipped
    assert len(read) >= 85 and len(compared) >= 55 and len(skipped) >= 75


def test_lossless_variants_decode_to_the_same_pixels() -> None:
    base = read_pixels(TEST_FILES / "MR_small.dcm")
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"):
        # exact: every lossless syntax decodes to the same integers, then the same element-wise conversion
        np.testing.assert_array_equal(read_pixels(TEST_FILES / name), base, err_msg=name)


def test_monochrome1_is_negated_and_colour_becomes_luma() -> None:
    cr = next(p for p in ALL_FILES if p.name == "6154")
    ds = pydicom.dcmread(cr)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_allclose(read_pixels(cr)[0], -np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float32),
                               rtol=1e-6)
    rgb = TEST_FILES / "SC_rgb_rle.dcm"
    expected = pydicom.dcmread(rgb).pixel_array.astype(np.float32) @ LUMA
    np.testing.assert_allclose(read_pixels(rgb)[0], expected, rtol=1e-6)
    assert read_pixels(TEST_FILES / "SC_rgb_rle_2frame.dcm").shape == (2, 100, 100)


def test_one_frame_decodes_to_that_frame_of_the_whole_object() -> None:
    """The ingest decodes only the frame its multi-frame policy keeps: for every bundled
    multi-frame image (native little and big endian, RLE, JPEG baseline; grayscale and
    colour) that frame equals the same frame of the full decode."""
    checked = []
    for path in ALL_FILES:
        try:
            whole = read_pixels(path)
        except DicomReadError:
            continue
        if len(whole) < 2:
            continue
        ds = parse(path, path.name)
        colour = ds.get("SamplesPerPixel", 1) > 1 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
        for index in (0, len(whole) // 2, len(whole) - 1):
            one = decode(ds, path.name, index)
            if colour:  # luma is a 3-term float32 dot product whose summation order depends on the BLAS
                # kernel chosen for the stack's shape and the CPU: equal to float32 rounding of 3 terms
                np.testing.assert_allclose(one, whole[index : index + 1], rtol=1e-6, atol=0, err_msg=path.name)
            else:  # grey: the same element-wise integer -> float32 conversion on both paths, exact everywhere
                np.testing.assert_array_equal(one, whole[index : index + 1], err_msg=path.name)
        checked.append(path.name)
    for name in ("rtdose.dcm", "rtdose_rle.dcm", "examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm"):
        assert name in checked, name
    with pytest.raises(ValueError, match="frame index 2 outside"):
        decode(parse(TEST_FILES / "SC_rgb_rle_2frame.dcm", "x"), "x", 2)


def test_palette_luma_by_table_equals_luma_of_the_expanded_palette() -> None:
    path = TEST_FILES / "examples_palette.dcm"
    ds = pydicom.dcmread(path)
    expected = apply_color_lut(ds.pixel_array, ds).astype(np.float32) @ LUMA
    np.testing.assert_allclose(read_pixels(path)[0], expected, rtol=1e-6)  # float32 sums of 3 terms, in any order
    rng = np.random.default_rng(3)
    for dtype, first_map in ((np.uint8, 0), (np.uint16, 0), (np.uint16, 40), (np.int16, -100), (np.uint32, 0)):
        desc = list(ds.RedPaletteColorLookupTableDescriptor)
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [desc[0], first_map, desc[2]])
        info = np.iinfo(dtype)
        stored = rng.integers(max(info.min, -300), min(info.max, 70_000), (2, 9, 11), endpoint=True).astype(dtype)
        expected = apply_color_lut(stored, ds).astype(np.float32) @ LUMA  # includes values beyond the palette
        np.testing.assert_allclose(_palette_luma(stored, ds), expected, rtol=1e-6, err_msg=str(dtype))


def test_truncated_and_non_image_files_say_why() -> None:
    with pytest.raises(CorruptFileError, match="truncated"):
        read_pixels(TEST_FILES / "MR_truncated.dcm")
    with pytest.raises(NotAnImageError, match="DICOMDIR"):
        read_pixels(TEST_FILES / "dicomdirtests" / "DICOMDIR")
    with pytest.raises(NotAnImageError, match="without pixel data"):
        read_pixels(TEST_FILES / "rtplan.dcm")
    with pytest.raises(NotAnImageError, match="not a DICOM file"):
        read_pixels(TEST_FILES / "README.txt")


FUZZ_SOURCES = ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                "SC_rgb_rle.dcm", "rtdose.dcm", "JPGExtended.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm")


def fuzzed_files(out: Path, count: int, seed: int = 0) -> list[Path]:
    """Seeded byte-level mutations and truncations of real files."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        data = bytearray((TEST_FILES / FUZZ_SOURCES[i % len(FUZZ_SOURCES)]).read_bytes())
        kind = i % 4
        if kind == 0:  # flip a few bytes anywhere
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # mutate the header region (tags, VRs, lengths)
            for pos in rng.integers(128, min(len(data), 1200), size=int(rng.integers(1, 6))):
                data[pos] = int(rng.integers(0, 256))
        else:  # splice random bytes in
            pos = int(rng.integers(0, len(data)))
            data[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        path = out / f"fuzz{i:04d}.dcm"
        path.write_bytes(bytes(data))
        files.append(path)
    return files


def test_fuzzed_files_raise_only_dicom_read_errors(tmp_path: Path) -> None:
    outcomes = {"read": 0, "refused": 0}
    for path in fuzzed_files(tmp_path / "fuzz", 320):
        try:
            out = read_pixels(path)
            assert out.dtype == np.float32 and out.ndim == 3
            outcomes["read"] += 1
        except DicomReadError as exc:
            assert exc.reason
            outcomes["refused"] += 1
    assert outcomes["read"] > 20 and outcomes["refused"] > 50, outcomes


def test_decode_failures_are_classified_from_pydicom_not_from_its_error_text(tmp_path: Path) -> None:
    """A truncated native file is corrupt (its bytes against its header); a transfer syntax pydicom
    has no decoder for is unsupported (pydicom's decoder registry, ``get_decoder``)."""
    from client.dicom import UnsupportedImageError
    from client.synth import generate_site, site_profile

    generate_site(tmp_path / "site", site_profile(0, patients=4), seed=1)
    source = sorted((tmp_path / "site").rglob("*.dcm"))[0]
    (tmp_path / "cut.dcm").write_bytes(source.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError, match="pixel data shorter than the header says"):
        read_pixels(tmp_path / "cut.dcm")
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.1143.99"  # a private syntax no decoder knows
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=False)
    with pytest.raises(UnsupportedImageError, match="pydicom has no pixel decoder for"):
        read_pixels(tmp_path / "odd.dcm")
    np.testing.assert_array_equal(read_pixels(source), _pydicom_reference(source))
