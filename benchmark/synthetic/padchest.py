"""Synthetic PadChest dataset in the real on-disk format, built from the label CSV torchxrayvision ships.

:func:`synth_padchest` picks real rows of ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``
(mostly physician-labelled frontal ones, so that a copy has test images, plus lateral and
RNN-labelled rows that the test set leaves out), writes them with the shipped header and the real
Labels strings (stray spaces, empty entries and all), and one 16-bit greyscale PNG per row under
``<ImageDir>/<ImageID>``. The test rows start with a fixed cover of split v1's findings
(:func:`covering_rows`), so that a copy of 260 images or more has at least 5 positive test images for
every finding, enough for a macro AUC over all of them and its bootstrap; the rest are drawn at random.
An image carries one soft opacity in a lung per finding label, so that a model reading brightness scores
an image with a finding above one without it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.padchest import (
    FRONTAL, LABEL_FILE, NON_FINDINGS, PHYSICIAN, XRV_LABEL_FILE, PadchestEntry, evaluated, findings, parse_labels,
)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.synthetic.chest import blur, pick_lung, prepare_output, render, resize_field, write_marker
from vlpbench.synthetic.chest import lungs as lung_masks

NATIVE = 512  # vlpbench's default side; the real PNGs vary (about 2,000-4,000 pixels)
FOLDERS = 55  # ImageDir runs 0-50 and 54 in the real file
TEST_SHARE = 0.8  # of the sample: physician-labelled frontal rows
# Test images per finding: a bootstrap resample that drops every positive of a finding leaves the macro AUC
# undefined and is skipped; with 5 positives for each of 136 findings about 60 % of resamples keep them all.
COVER = 5


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[list[str], list[list[str]]]:
    """The shipped header and rows, parsed as CSV (once per process)."""
    text = gzip.decompress(xrv_data_file(XRV_LABEL_FILE).read_bytes()).decode("utf-8")
    header, *rows = csv.reader(io.StringIO(text, newline=""))
    return header, rows


def _entry(row: list[str], at: dict[str, int], k: int) -> PadchestEntry:
    """The fields of a shipped row that the synthetic copy needs (line numbers count the header)."""
    return PadchestEntry(image_id=row[at["ImageID"]], image_dir=row[at["ImageDir"]], study_id="", patient_id="",
                         sex="", birth="", projection=row[at["Projection"]], method=row[at["MethodLabel"]],
                         labels=parse_labels(row[at["Labels"]], f"{XRV_LABEL_FILE} row {k + 1}"), line=k + 2)


def covering_rows(entries: dict[int, PadchestEntry], times: int = COVER) -> list[int]:
    """Keys of ``entries`` (test rows) whose labels together hold every finding of :func:`findings` on them
    at least ``times`` times, chosen greedily: each next row holds the most findings still short (ties: the
    earliest row), so that a prefix covers as many as a greedy choice can. With the shipped CSV and
    ``times`` 5 these are 208 rows."""
    keys = list(entries)
    columns = findings({str(k): entries[k] for k in keys}, [str(k) for k in keys])
    column = {c: j for j, c in enumerate(columns)}
    held = np.zeros((len(keys), len(columns)), dtype=np.int32)
    for i, k in enumerate(keys):
        held[i, [column[c] for c in entries[k].labels or () if c in column]] = 1
    short = np.full(len(columns), times, dtype=np.int32)
    free = np.ones(len(keys), dtype=bool)
    # held @ (short > 0), kept up to date as findings stop being short (cheaper than the product each round).
    holds_short = held @ (short > 0).astype(np.int32)
    chosen: list[int] = []
    while (short > 0).any():
        gain = np.where(free, holds_short, -1)
        best = int(np.argmax(gain))  # argmax: the first row among equals
        if gain[best] <= 0:
            break  # fewer than ``times`` rows hold some finding
        chosen.append(keys[best])
        free[best] = False
        was_short = short > 0
        short -= held[best]
        holds_short -= held[:, was_short & (short <= 0)].sum(axis=1, dtype=np.int32)
    return chosen


def _lesion(rng: np.random.Generator, lung: np.ndarray, count: int) -> np.ndarray:
    """One soft blob inside the lung field per finding, so that the opacified area grows with the number of
    findings (an image with a finding is then brighter, on average, than one without it)."""
    g = lung.shape[0]
    ys, xs = np.nonzero(lung > 0.5)
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32)
    field = np.zeros((g, g), dtype=np.float32)
    for k in rng.integers(len(ys), size=count):
        radius = g * rng.uniform(0.07, 0.12)
        field += np.exp(-(((xx - xs[k]) ** 2 + (yy - ys[k]) ** 2) / (2 * radius ** 2)))
    return np.clip(field, 0, 1).astype(np.float32)


def synth_padchest(out: str | Path, n: int = 200, seed: int = 0, *, size: int = NATIVE, progress: bool = True) -> dict:
    """Write a synthetic PadChest dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (the shipped header and the
    chosen rows, in shipped order), ``out/<ImageDir>/<ImageID>`` (16-bit grey PNGs of ``size`` x
    ``size``) and ``out/VLPBENCH_SYNTHETIC.json``. About 80 % of the rows are test rows (physician-
    labelled, frontal), the rest other rows of the real file. The test rows are the first of
    :func:`covering_rows` and, beyond its 208 rows, random ones: from ``n`` = 260 on every finding of split v1
    has at least :data:`COVER` positive test images (and negative ones: no finding is in a fifth of them).
    Deterministic given ``seed``.

    Returns:
        ``{"n", "test" (test rows written), "path"}``.

    Raises:
        DataError: ``out`` holds other data, or the shipped label file is missing.
        ValueError: ``n`` below 1 or above the shipped rows, or ``size`` below 32.
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    header, rows = _shipped()
    if not 1 <= n <= len(rows):
        raise ValueError(f"n must be between 1 and {len(rows)} (the rows of the label CSV), got {n}")
    at = {name: header.index(name) for name in ("ImageID", "ImageDir", "Projection", "MethodLabel", "Labels")}
    # Only frontal physician rows can be test rows; their Labels decide (parsing all 160k rows is slow).
    candidates = [k for k, row in enumerate(rows) if row[at["Projection"]] in FRONTAL
                  and row[at["MethodLabel"]] == PHYSICIAN]
    test = {k: entry for k in candidates if evaluated(entry := _entry(rows[k], at, k))}
    other = sorted(set(range(len(rows))) - set(test))
    rng = np.random.default_rng(seed)
    n_test = min(round(n * TEST_SHARE), len(test))
    cover = covering_rows(test)[:n_test]
    rest = sorted(set(test) - set(cover))
    chosen = sorted([*cover, *rng.choice(rest, n_test - len(cover), replace=False),
                     *rng.choice(other, n - n_test, replace=False)])
    chosen_rows = [rows[k] for k in chosen]
    entries = [_entry(rows[k], at, k) for k in chosen]
    folders = sorted({entry.image_dir for entry in entries})

    prepare_output(out, (LABEL_FILE, *(str(k) for k in range(FOLDERS))))
    for folder in folders:
        if (out / folder).exists():
            shutil.rmtree(out / folder)
    (out / LABEL_FILE).unlink(missing_ok=True)
    write_marker(out, "padchest", n, seed)

    lungs = lung_masks()
    for index, entry in enumerate(tqdm(entries, desc="synth padchest", unit="image", disable=not progress)):
        image_rng = np.random.default_rng([seed, index])
        count = sum(label not in NON_FINDINGS for label in entry.labels or ())
        lung = pick_lung(image_rng, lungs, None)
        opacity = resize_field(blur(_lesion(image_rng, lung, count), 1.0), size) if count else None
        pixels = render(image_rng, lung, size, opacity=opacity).astype(np.uint16) * 257
        (out / entry.image_dir).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out / entry.image_dir / entry.image_id, format="PNG", compress_level=1)

    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows([header, *chosen_rows])
    (out / LABEL_FILE).write_bytes(buffer.getvalue().encode())
    return {"n": n, "test": n_test, "path": str(out)}
