"""Uncompressed grayscale DICOMs of any stored bit depth, for tests and perf scripts of the DICOM reader.

The SIIM and RSNA releases hold 8-bit JPEG files (``vlpbench.data.dicom.write_dicom`` writes those); other
chest X-ray DICOMs store 10 to 16 bits, unsigned or signed, often with a rescale and a VOI window. This
writer makes such files: Explicit VR Little Endian, a Computed Radiography object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_native_dicom(path: str | Path, stored: np.ndarray, *, bits_stored: int,
                       photometric: str = "MONOCHROME2", rescale: tuple[float, float] | None = None,
                       window: tuple[float, float] | None = None) -> Path:
    """Write the stored values ``stored`` (uint16, or int16 for signed pixel data) as an uncompressed
    DICOM and return its path.

    Args:
        path: the file to write (parent folders are created).
        stored: (H, W) uint16 or int16 values, within ``bits_stored`` bits.
        bits_stored: BitsStored (BitsAllocated is 16, HighBit ``bits_stored - 1``).
        photometric: ``"MONOCHROME2"`` or ``"MONOCHROME1"``.
        rescale: ``(RescaleSlope, RescaleIntercept)``, or None to leave both out.
        window: ``(WindowCenter, WindowWidth)``, or None to leave both out.

    Raises:
        ValueError: ``stored`` is not a 2-D uint16 / int16 array, or holds values outside ``bits_stored``.
    """
    if stored.ndim != 2 or stored.dtype not in (np.uint16, np.int16):
        raise ValueError(f"stored must be a uint16 or int16 (H, W) array, got {stored.dtype} {stored.shape}")
    signed = stored.dtype == np.int16
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if not 1 <= bits_stored <= 16 or stored.min() < low or stored.max() > high:
        raise ValueError(f"stored values {stored.min()}..{stored.max()} do not fit {bits_stored} "
                         f"{'signed' if signed else 'unsigned'} bits")
    path = Path(path)
    uid = generate_uid(entropy_srcs=[str(path)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{value:g}" for value in window)
    if rescale is not None:
        ds.RescaleIntercept, ds.RescaleSlope = f"{rescale[1]:g}", f"{rescale[0]:g}"
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
