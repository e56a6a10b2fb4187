"""Read chest X-ray DICOMs into 8-bit arrays, and write SIIM-style DICOMs for synthetic datasets.

The reader scales and inverts like the reference downstream code (MGCA's
``cv2.convertScaleAbs(x, alpha=255 / x.max())``, then ``255 - x`` for MONOCHROME1), through a lookup table
indexed by the stored values for integer pixel data (:func:`scale_to_uint8`). The writer
reproduces the files of the SIIM-ACR and RSNA Kaggle releases (DCMTK-made Secondary Capture
objects with one JPEG Baseline fragment), tag for tag; see docs/datasets.md, "SIIM DICOM files".
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from vlpbench.data import attributes
from vlpbench.errors import DataError

# What DCMTK 3.6.0 wrote into every SIIM and RSNA file.
IMPLEMENTATION_CLASS_UID = "1.2.276.0.7230010.3.0.3.6.0"
IMPLEMENTATION_VERSION_NAME = "OFFIS_DCMTK_360"

PATIENT_AGE = 0x00101010
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
VIEW_POSITIONS = ("PA", "AP")


def read_dicom(path: str | Path) -> np.ndarray:
    """Decode a single-frame grayscale DICOM into a uint8 (H, W) array, bright = dense.

    The pixels are scaled by ``255 / max`` (rounded, saturated to 0..255; an all-zero image stays
    zero) and MONOCHROME1 images are inverted, as in the reference downstream code.

    Raises:
        DataError: the file is missing, is not DICOM, has no pixel data, or its pixels cannot be
            decoded (for example a truncated JPEG stream). The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: DICOM file not found")
    # pydicom only warns when a file ends early (and then drops the pixel data): keep the
    # warnings so that the error can say why the pixel data is missing.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError as exc:
            raise DataError(f"{path}: not a DICOM file ({exc})") from exc
        except Exception as exc:  # pydicom reports damaged headers with many exception types
            raise DataError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        reasons = "".join(f"; pydicom: {w.message}" for w in caught)
        raise DataError(f"{path}: DICOM file has no pixel data (7FE0,0010){reasons}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoder plugins (Pillow, pylibjpeg, gdcm) raise their own types
        raise DataError(f"{path}: cannot decode the pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected a single-frame grayscale image, got pixel array shape {pixels.shape}")

    return scale_to_uint8(pixels, invert=str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1")


# A lookup table covers the stored values from min(0, lowest) to the highest: up to 2^16 entries (every 8- to
# 16-bit image), and only where it has fewer entries than the image has pixels, else building it costs more
# than it saves.
MAX_LUT_ENTRIES = 1 << 16


def scale_to_uint8(pixels: np.ndarray, invert: bool = False) -> np.ndarray:
    """``pixels`` scaled by ``255 / max`` to uint8 (rounded half to even, saturated to 0..255; no scaling
    where the maximum is 0 or below), then ``255 - x`` where ``invert`` (MONOCHROME1).

    Integer pixels go through a lookup table indexed by the stored values (:func:`stored_value_lut`),
    byte for byte what :func:`scale_float64` computes, in a fraction of its time: one table entry per
    stored value instead of float64 arithmetic per pixel.
    """
    lut = stored_value_lut(pixels, invert)
    if lut is None:
        return scale_float64(pixels, invert)
    # The same look-up either way: np.take measured faster on 8-bit values, indexing on 16-bit ones
    # (perf/dicom_decode.py).
    return np.take(lut, pixels) if pixels.itemsize == 1 else lut[pixels]


def scale_float64(pixels: np.ndarray, invert: bool = False) -> np.ndarray:
    """:func:`scale_to_uint8` computed in float64 per pixel: the path for float pixel data (Float Pixel
    Data) and for integer values too many or too spread for a lookup table (:data:`MAX_LUT_ENTRIES`)."""
    scaled = pixels.astype(np.float64)
    return _to_uint8(scaled, scaled.max(), invert)


def stored_value_lut(pixels: np.ndarray, invert: bool = False) -> np.ndarray | None:
    """The uint8 output of :func:`scale_to_uint8` for every integer value from ``min(0, lowest)`` to the
    highest value of ``pixels``, indexed by the value itself: non-negative values from the front,
    negative ones (signed pixel data) from the back, as numpy's negative indices count; None for float
    pixels, or where the table would need more than :data:`MAX_LUT_ENTRIES` entries or more entries than
    ``pixels`` has elements.

    The table holds :func:`scale_float64`'s computation on the values themselves, so ``lut[pixels]`` is
    byte-identical to ``scale_float64(pixels, invert)``.
    """
    if pixels.dtype.kind not in "iu":
        return None
    high = int(pixels.max())
    low = min(int(pixels.min()), 0) if pixels.dtype.kind == "i" else 0
    above = max(high + 1, 0)  # entries for 0..high
    if above - low > min(MAX_LUT_ENTRIES, pixels.size):
        return None
    values = np.concatenate([np.arange(0, above), np.arange(low, 0)]).astype(np.float64)
    # The float path's maximum is the same integer, exactly representable in float64.
    return _to_uint8(values, float(high), invert)


def _to_uint8(scaled: np.ndarray, peak: float, invert: bool) -> np.ndarray:
    """The float64 ``scaled`` (changed in place) as uint8, by ``255 / peak`` where ``peak > 0``."""
    if peak > 0:
        scaled *= 255.0 / peak
    image = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return 255 - image if invert else image


# DICOM PatientSex (0010,0040): M, F, O (other) or empty.
DICOM_SEXES = {"M": "M", "F": "F", "O": "O", "": attributes.UNKNOWN}
ATTRIBUTE_TAGS = ("PatientSex", "PatientAge", "ViewPosition")


def read_dicom_attributes(path: str | Path) -> dict[str, Any]:
    """``sex``, ``age`` and ``view`` of a DICOM from ``PatientSex``, ``PatientAge`` and ``ViewPosition``
    (:mod:`vlpbench.data.attributes`), reading the header only (stops before the pixel data). An absent or
    empty element is ``unknown``; ``PatientAge`` may be a bare number (``62``, as SIIM and RSNA write it)
    or the standard ``062Y`` / ``006M`` form.

    Raises:
        DataError: the file is missing or unreadable, or a value is in no accepted form; names the file.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(ATTRIBUTE_TAGS))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: DICOM file not found") from exc
    except Exception as exc:  # pydicom reports damaged headers with many exception types
        raise DataError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    text = {tag: str(ds.get(tag, "") or "") for tag in ATTRIBUTE_TAGS}
    return {"sex": attributes.sex(text["PatientSex"], f"{path}: PatientSex", DICOM_SEXES),
            "age": attributes.age_years(text["PatientAge"], f"{path}: PatientAge"),
            "view": attributes.view(text["ViewPosition"], f"{path}: ViewPosition")}


def _jpeg_baseline(pixels: np.ndarray, quality: int) -> bytes:
    """Encode a uint8 (H, W) array as a baseline 8-bit 1-component JPEG without a JFIF header."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
    stream = buffer.getvalue()
    # DCMTK's streams start SOI, DQT: drop the APP0 (JFIF) segment that libjpeg adds after SOI.
    if stream[2:4] == b"\xff\xe0":
        segment_length = int.from_bytes(stream[4:6], "big")
        stream = stream[:2] + stream[4 + segment_length :]
    return stream


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    patient_id: str,
    patient_sex: str,
    patient_age: int | str,
    view_position: str,
    photometric: str = "MONOCHROME2",
    jpeg_quality: int = 90,
    pixel_spacing: float = 0.168,
) -> Path:
    """Write ``pixels`` as a SIIM-ACR style DICOM file and return its path.

    The file matches the Kaggle release byte layout: 128-byte preamble and ``DICM``, Explicit VR Little
    Endian meta with DCMTK's implementation UID, transfer syntax JPEG Baseline (1.2.840.10008.1.2.4.50)
    with the pixels encapsulated as an empty Basic Offset Table plus one fragment, Secondary Capture SOP
    class, and the dataset elements of docs/datasets.md, "SIIM DICOM files", in file order (StudyDate
    19010101, Modality CR, ConversionType WSD, SeriesDescription ``view: PA|AP``, PatientName =
    PatientID, a bare-number PatientAge, ...).

    Args:
        path: the file to write (parent folders are created).
        pixels: uint8 (H, W) image, bright = dense.
        sop_instance_uid, study_instance_uid, series_instance_uid: the three UIDs.
        patient_id: also written as PatientName, as in SIIM.
        patient_sex: ``"M"`` or ``"F"``.
        patient_age: years, written as a bare number (``62``, not ``062Y``), as in SIIM.
        view_position: ``"PA"`` or ``"AP"``.
        photometric: ``"MONOCHROME2"``, or ``"MONOCHROME1"`` to store ``255 - pixels`` so that
            :func:`read_dicom` returns the same picture.
        jpeg_quality: Pillow JPEG quality (1-95).
        pixel_spacing: mm per pixel, both directions.

    Raises:
        ValueError: ``pixels`` is not a uint8 2-D array, or an enumerated argument is invalid.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"pixels must be a uint8 (H, W) array, got {pixels.dtype} {pixels.shape}")
    if photometric not in PHOTOMETRIC:
        raise ValueError(f"photometric must be one of {PHOTOMETRIC}, got {photometric!r}")
    if view_position not in VIEW_POSITIONS:
        raise ValueError(f"view_position must be one of {VIEW_POSITIONS}, got {view_position!r}")
    if patient_sex not in ("M", "F"):
        raise ValueError(f"patient_sex must be 'M' or 'F', got {patient_sex!r}")
    stored = 255 - pixels if photometric == "MONOCHROME1" else pixels
    rows, columns = pixels.shape

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view_position}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient_sex
    # SIIM stores a bare number, which breaks the standard's "062Y" form: skip pydicom's check.
    ds[PATIENT_AGE] = DataElement(PATIENT_AGE, "AS", str(int(patient_age)), validation_mode=config.IGNORE)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    # DS values are limited to 16 characters; round like the real files (0.168, 0.143).
    ds.PixelSpacing = [f"{pixel_spacing:.6g}"] * 2
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    # has_bot=False still writes the Basic Offset Table item, but empty, as DCMTK did.
    ds.PixelData = encapsulate([_jpeg_baseline(stored, jpeg_quality)], has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
