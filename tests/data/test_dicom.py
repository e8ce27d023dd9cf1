"""DICOM input: real files written with pydicom, read through every image loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage

from dist_ft.data.dicom import is_dicom, read_dicom
from dist_ft.data.images import ImageError, load_gray, load_gray_resized, load_rgb


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None, slope: float | None = None,
                intercept: float = 0.0, bits_stored: int = 12) -> Path:
    """Write ``pixels`` (uint16 [H, W]) as a real, uncompressed DICOM Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h: int = 32, w: int = 48, top: int = 4000) -> np.ndarray:
    """A horizontal ramp 0..top (left dark in MONOCHROME2)."""
    return np.tile(np.linspace(0, top, w).round().astype(np.uint16), (h, 1))


def test_monochrome2_min_max(tmp_path: Path) -> None:
    img = read_dicom(write_dicom(tmp_path / "a.dcm", ramp()))
    arr = np.asarray(img)
    assert img.mode == "L" and arr.shape == (32, 48)
    assert arr[:, 0].max() == 0 and arr[:, -1].min() == 255
    assert np.all(np.diff(arr[0].astype(int)) >= 0)  # monotone: no wrap-around of 16 bits


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    two = np.asarray(read_dicom(write_dicom(tmp_path / "m2.dcm", ramp())))
    one = np.asarray(read_dicom(write_dicom(tmp_path / "m1.dcm", ramp(), "MONOCHROME1")))
    np.testing.assert_array_equal(one, 255 - two)
    assert one[0, 0] == 255 and one[0, -1] == 0  # low stored value is white in MONOCHROME1


def test_window_center_width(tmp_path: Path) -> None:
    # Window 1000..2000 on a 0..4000 ramp: everything below is black, above white, and the
    # centre is mid-gray; a min-max stretch would put the centre near 95, not 128.
    pixels = ramp(top=4000)
    arr = np.asarray(read_dicom(write_dicom(tmp_path / "w.dcm", pixels, window=(1500, 1000))))
    values = pixels[0].astype(float)
    assert np.all(arr[0][values <= 1000] == 0)
    assert np.all(arr[0][values >= 2000] == 255)
    inside = (values > 1000) & (values < 2000)
    expected = (values[inside] - 1000) / 1000 * 255  # linear over the window
    assert inside.sum() >= 5 and np.abs(arr[0][inside] - expected).max() <= 3


def test_rescale_before_window(tmp_path: Path) -> None:
    # Stored 0..2000, slope 2 intercept -1000: values -1000..3000; window centre 1000 width
    # 400 selects stored 900..1100 only.
    pixels = ramp(top=2000)
    arr = np.asarray(read_dicom(write_dicom(tmp_path / "r.dcm", pixels, window=(1000, 400),
                                            slope=2.0, intercept=-1000.0)))
    stored = pixels[0].astype(float)
    assert np.all(arr[0][stored <= 900] == 0) and np.all(arr[0][stored >= 1100] == 255)
    assert 0 < arr[0][np.argmin(np.abs(stored - 1000))] < 255


def test_windowed_monochrome1_inverted(tmp_path: Path) -> None:
    arr = np.asarray(read_dicom(write_dicom(tmp_path / "w1.dcm", ramp(), "MONOCHROME1",
                                            window=(1500, 1000))))
    assert arr[0, 0] == 255 and arr[0, -1] == 0


def test_every_loader_reads_dicom(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "scan.dcm", ramp(64, 64))
    gray = load_gray(path)
    assert gray.shape == (64, 64) and gray.dtype == np.uint8
    rgb = load_rgb(path)
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], gray)
    assert load_gray_resized(path, 32).shape == (32, 32)
    # No suffix: recognised by the DICM magic after PIL gives up.
    bare = tmp_path / "scan_without_suffix"
    bare.write_bytes(path.read_bytes())
    assert is_dicom(bare)
    np.testing.assert_array_equal(load_gray(bare), gray)


def test_no_pixel_data_is_named(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "report.dcm", ramp())
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageError, match=r"report\.dcm: DICOM file has no pixel data"):
        load_gray(path)


def test_compressed_without_decoder_is_named(tmp_path: Path) -> None:
    try:  # with a JPEG-LS decoder installed this case cannot occur
        import libjpeg  # noqa: F401

        pytest.skip("a JPEG-LS decoder is installed")
    except ImportError:
        pass
    path = write_dicom(tmp_path / "jls.dcm", ramp())
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # a JPEG-LS-looking stream
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(ImageError, match=r"jls\.dcm: .*compressed .*install pylibjpeg"):
        load_gray(path)


def test_not_dicom_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(ImageError, match=r"fake\.dcm: cannot read as DICOM"):
        load_gray(path)
