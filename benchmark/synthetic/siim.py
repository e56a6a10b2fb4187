"""Synthetic SIIM-ACR dataset in the real on-disk format, built from the real label file.

:func:`synth_siim` picks real ImageIds from the committed split ``siim/v1``, copies their real
rows of the stage-2 label file, and writes one SIIM-style DICOM per image whose picture carries
the real pneumothorax mask as a visible, learnable lesion: a chest with a body silhouette, two
lungs from a real lung mask, ribs, lung markings and noise; each pneumothorax region is darker
than lung, has no lung markings and is rimmed by a thin bright pleural line.
"""

from __future__ import annotations

import gzip
import shutil
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlpbench.data.dicom import write_dicom
from vlpbench.data.siim import EMPTY, HEIGHT, WIDTH, decode_rle
from vlpbench.data.splits import load_split, sample_split
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.errors import DataError
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.chest import pick_lung, prepare_output, render, resize_field, write_marker

LABEL_FILE = "stage_2_train.csv"
DICOM_DIR = "dicom-images-train"
UID_PREFIX = "1.2.276.0.7230010.3.1.4."

# Share of the sample drawn from test/val/train of split v1 (see splits.sample_split).
TOP_WEIGHTS = (15, 15, 70)

PIXEL_SPACINGS = (0.139, 0.143, 0.168, 0.171)  # mm at 1024 px, values seen in the real files


def _uids(image_id: str) -> tuple[str, str]:
    """Study and series UIDs of a SIIM image, derived from its SOP Instance UID as in the real
    files: ``...3.1.2...``/``...3.1.3...`` with the same ``<n>.<t>`` part, last part - 1 / - 2."""
    if not image_id.startswith(UID_PREFIX):
        raise DataError(f"ImageId {image_id} does not start with {UID_PREFIX}")
    parts = image_id.split(".")
    last = int(parts[-1])
    study = ".".join(parts[:7] + ["2"] + parts[8:-1] + [str(last - 1)])
    series = ".".join(parts[:7] + ["3"] + parts[8:-1] + [str(last - 2)])
    return study, series












def _lesion(masks: list[str], size: int) -> np.ndarray:
    """Union of the real RLE masks (1024 x 1024) as a float mask at size x size."""
    union = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for rle in masks:
        union |= decode_rle(rle)
    return resize_field(union.astype(np.float32), size)








def synth_siim(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 1024, progress: bool = True) -> dict:
    """Write a synthetic SIIM-ACR dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/stage_2_train.csv`` (header ``ImageId,EncodedPixels``, LF, the shipped rows of
    the chosen images in shipped order), ``out/dicom-images-train/<study>/<series>/<ImageId>.dcm``
    (SIIM-style JPEG-Baseline DICOMs, ``size`` x ``size``) and ``out/VLPBENCH_SYNTHETIC.json``.
    The ImageIds are real and drawn from split siim/v1: 15/15/70 from test/val/train, and within
    train 1:9:90 from train_1pct, the rest of train_10pct and the rest of train, stratified by
    label. Deterministic given ``seed``.

    A previous synth output in ``out`` is replaced; any other non-empty folder is refused.

    Returns:
        ``{"n", "positives", "path"}``.

    Raises:
        DataError: ``out`` holds other data, or a real label file is missing.
        ValueError: ``n`` is outside 1..12,047 or ``size`` is below 32.
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    prepare_output(out, (LABEL_FILE, DICOM_DIR))
    chosen = sample_split(load_split("siim", "v1"), n, seed, top_weights=TOP_WEIGHTS)

    # The shipped rows of the chosen images, byte for byte and in shipped order (the rows of one
    # image are not always adjacent there).
    shipped = gzip.decompress(xrv_data_file(SIIM_RLE).read_bytes()).decode("utf-8").splitlines()[1:]
    wanted = set(chosen)
    rows = [row for row in shipped if row.split(",", 1)[0] in wanted]
    masks: dict[str, list[str]] = {}
    for row in rows:
        image_id, rle = row.split(",")
        masks.setdefault(image_id, []).append(rle)

    if (out / DICOM_DIR).exists():
        shutil.rmtree(out / DICOM_DIR)
    (out / LABEL_FILE).unlink(missing_ok=True)
    write_marker(out, "siim", n, seed)
    lungs = lung_masks()
    positives = 0
    for index, image_id in enumerate(tqdm(chosen, desc="synth siim", unit="image", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        lesion = None if masks[image_id][0] == EMPTY else _lesion(masks[image_id], size)
        positives += lesion is not None
        pixels = render(rng, pick_lung(rng, lungs, lesion), size, pneumothorax=lesion)
        study, series = _uids(image_id)
        write_dicom(
            out / DICOM_DIR / study / series / f"{image_id}.dcm",
            pixels,
            sop_instance_uid=image_id,
            study_instance_uid=study,
            series_instance_uid=series,
            patient_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            patient_sex=str(rng.choice(["M", "F"])),
            patient_age=int(rng.integers(18, 91)),
            view_position=str(rng.choice(["PA", "AP"], p=[0.55, 0.45])),
            pixel_spacing=float(rng.choice(PIXEL_SPACINGS)) * 1024 / size,
        )
    (out / LABEL_FILE).write_bytes(("ImageId,EncodedPixels\n" + "".join(f"{row}\n" for row in rows)).encode())
    return {"n": n, "positives": positives, "path": str(out)}

