"""DICOM scaling cost: the float64 path versus the lookup table of the stored values, per image, in one run.

``read_dicom`` decodes the pixel data, then scales it by ``255 / max`` to uint8 (and inverts MONOCHROME1).
For each image this times, on the same decoded array (best of ``--repeat`` after one warm-up):

- decode: ``pydicom.dcmread`` + ``pixel_array``, for scale;
- float:  ``scale_float64``, float64 arithmetic per pixel (the path for float pixel data);
- table:  ``scale_to_uint8``, a table indexed by the stored values (integer pixel data);

and prints milliseconds per image, float / table, and the scaling's share of decode + scaling on each path.
The two outputs are checked to be byte-identical. Images: a SIIM-style 8-bit JPEG (``--size``²), and
uncompressed 12-bit unsigned and 16-bit signed ones (``--native-size``², smooth anatomy-like values plus
noise over the whole range), MONOCHROME2 and MONOCHROME1; plus any ``--file``.

    python perf/dicom_decode.py [--size 1024] [--native-size 2048] [--repeat 7] [--file some.dcm ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom

from vlpbench.data.dicom import scale_float64, scale_to_uint8, stored_value_lut, write_dicom
from vlpbench.testing.dicom import write_native_dicom


def best_ms(function: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` calls after one warm-up call, in milliseconds."""
    function()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def smooth_values(side: int, low: int, high: int, dtype, seed: int = 0) -> np.ndarray:
    """A smooth ``side``² field spanning ``low``..``high`` with a little noise, as ``dtype``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    field = 0.5 + 0.35 * np.sin(6 * x) * np.cos(4 * y) + rng.normal(0, 0.03, (side, side))
    values = low + np.clip(field, 0, 1) * (high - low)
    return np.rint(values).astype(dtype)


def write_images(folder: Path, size: int, native_size: int) -> dict[str, Path]:
    """The synthetic test files, by label."""
    picture = smooth_values(size, 0, 255, np.uint8)
    uids = {"sop_instance_uid": "1.2.3.1", "study_instance_uid": "1.2.3.2", "series_instance_uid": "1.2.3.3",
            "patient_id": "p", "patient_sex": "F", "patient_age": 50, "view_position": "PA"}
    images = {f"SIIM JPEG 8-bit {size}²": write_dicom(folder / "siim.dcm", picture, **uids)}
    for label, dtype, bits, low, high in (("12-bit unsigned", np.uint16, 12, 0, 4095),
                                          ("16-bit signed", np.int16, 16, -32768, 32767)):
        values = smooth_values(native_size, low, high, dtype)
        for photometric in ("MONOCHROME2", "MONOCHROME1"):
            name = f"{label} {photometric} {native_size}²"
            images[name] = write_native_dicom(folder / f"{bits}{photometric}.dcm", values, bits_stored=bits,
                                              photometric=photometric, rescale=(1.0, -1024.0), window=(40, 400))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="side of the SIIM-style JPEG DICOM")
    parser.add_argument("--native-size", type=int, default=2048, help="side of the uncompressed DICOMs")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per path; the best is reported")
    parser.add_argument("--file", type=Path, action="append", default=[], help="also time this DICOM (repeatable)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vlpbench-dicom-bench-") as tmp:
        images = {**write_images(Path(tmp), args.size, args.native_size), **{p.name: p for p in args.file}}
        print(f"{'image':<44} {'decode':>8} {'float':>8} {'table':>8} {'float/table':>11} "
              f"{'share: float':>12} {'table':>6}  (ms per image)")
        for label, path in images.items():
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
            invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
            if stored_value_lut(pixels, invert) is None:
                print(f"{label:<44} {pixels.dtype} pixels: no table, the float path serves it")
                continue
            if not np.array_equal(scale_to_uint8(pixels, invert), scale_float64(pixels, invert)):
                raise SystemExit(f"{label}: the table and the float path differ")
            decode = best_ms(lambda: pydicom.dcmread(path).pixel_array, args.repeat)
            floats = best_ms(lambda: scale_float64(pixels, invert), args.repeat)
            table = best_ms(lambda: scale_to_uint8(pixels, invert), args.repeat)
            print(f"{label:<44} {decode:8.2f} {floats:8.2f} {table:8.2f} {floats / table:10.1f}x "
                  f"{floats / (decode + floats):12.0%} {table / (decode + table):6.0%}")
        print("table and float outputs are byte-identical on every image")


if __name__ == "__main__":
    main()
