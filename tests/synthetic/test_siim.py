"""Synthetic SIIM dataset: real on-disk format, real ids and rows, a visible lesion, safety."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFilter

from vlpbench.data.siim import SiimSource
from vlpbench.data.splits import load_split
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.errors import DataError
from vlpbench.synthetic.lungs import load_lung_masks
from vlpbench.synthetic.siim import synth_siim

N, SIZE, SEED = 12, 256, 0


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 12-image synthetic dataset at 256 px, and generate's summary."""
    out = tmp_path_factory.mktemp("synth") / "siim"
    return out, synth_siim(out, N, SEED, size=SIZE, progress=False)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_marker(synth):
    out, summary = synth
    assert summary == {"n": N, "positives": 3, "path": str(out)}
    assert sorted(p.name for p in out.iterdir()) == ["VLPBENCH_SYNTHETIC.json", "dicom-images-train", "stage_2_train.csv"]
    marker = json.loads((out / "VLPBENCH_SYNTHETIC.json").read_text())
    assert marker == {"dataset": "siim", "n": N, "seed": SEED, "generator": "vlpbench synth"}
    dicoms = sorted((out / "dicom-images-train").rglob("*.dcm"))
    assert len(dicoms) == N
    for path in dicoms:
        study, series = path.relative_to(out / "dicom-images-train").parts[:2]
        sop = path.stem.split(".")
        assert study == ".".join(sop[:7] + ["2"] + sop[8:-1] + [str(int(sop[-1]) - 1)])
        assert series == ".".join(sop[:7] + ["3"] + sop[8:-1] + [str(int(sop[-1]) - 2)])
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == path.stem and ds.StudyInstanceUID == study and ds.SeriesInstanceUID == series
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE) and ds.PatientName == ds.PatientID


def test_label_file_holds_the_real_rows_in_shipped_order(synth):
    out, _ = synth
    data = (out / "stage_2_train.csv").read_bytes()
    assert data.startswith(b"ImageId,EncodedPixels\n") and data.endswith(b"\n") and b"\r" not in data
    rows = data.decode().splitlines()[1:]
    ids = {row.split(",")[0] for row in rows}
    assert len(ids) == N
    shipped = gzip.decompress(xrv_data_file(SIIM_RLE).read_bytes()).decode().splitlines()[1:]
    assert rows == [row for row in shipped if row.split(",")[0] in ids]
    assert {p.stem for p in (out / "dicom-images-train").rglob("*.dcm")} == ids


def test_ids_come_from_every_part_of_split_v1(synth):
    out, _ = synth
    ids = set(SiimSource(out).image_ids)
    split = load_split("siim")
    sub1 = set(split.ids("train_1pct"))
    sub10 = set(split.ids("train_10pct")) - sub1
    rest = set(split.ids("train")) - sub10 - sub1
    parts = [set(split.ids("test")), set(split.ids("val")), sub1, sub10, rest]
    assert [len(ids & part) for part in parts] == [2, 2, 1, 1, 6]


def test_lesion_is_darker_than_its_surroundings(synth):
    out, _ = synth
    source = SiimSource(out)
    assert source.synthetic
    positives = [i for i in source.image_ids if source.label(i)]
    assert len(positives) == 3
    for image_id in positives:
        image = source.image(image_id).astype(float)
        lesion = np.asarray(Image.fromarray(source.mask(image_id) * 255).resize((SIZE, SIZE))) > 127
        picture = Image.fromarray(lesion.astype(np.uint8) * 255)
        grown, near = (np.asarray(picture.filter(ImageFilter.MaxFilter(k))) > 0 for k in (15, 5))
        ring = grown & ~near  # a band beyond the pleural line
        assert image[lesion].mean() < image[ring].mean() - 25, image_id
        # No lung markings inside: away from its edge the lesion is flat (grain and JPEG only).
        interior = np.asarray(picture.filter(ImageFilter.MinFilter(5))) > 0
        assert image[interior].std() < 8, image_id


def test_deterministic_and_rewrites_its_own_output(synth, tmp_path):
    out, _ = synth
    before = _files(out)
    synth_siim(tmp_path / "again", N, SEED, size=SIZE, progress=False)
    assert _files(tmp_path / "again") == before
    synth_siim(out, N, SEED, size=SIZE, progress=False)  # a previous synth output is replaced
    assert _files(out) == before
    other = tmp_path / "other"
    synth_siim(other, 4, 1, size=64, progress=False)
    assert _files(other)["stage_2_train.csv"] != before["stage_2_train.csv"]


def test_refuses_foreign_folders(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "stage_2_train.csv").write_text("precious")
    with pytest.raises(DataError, match="not a vlpbench synthetic dataset"):
        synth_siim(user, 4, size=64, progress=False)
    assert (user / "stage_2_train.csv").read_text() == "precious"
    assert sorted(p.name for p in user.iterdir()) == ["stage_2_train.csv"]

    previous = tmp_path / "previous"
    synth_siim(previous, 4, size=64, progress=False)
    (previous / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="unexpected entries notes.txt"):
        synth_siim(previous, 4, size=64, progress=False)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        synth_siim(a_file, 4, size=64, progress=False)


def test_lung_masks_are_real_binary_and_cached():
    masks = load_lung_masks(256)  # the size synth uses, so the archive is decoded once
    assert len(masks) == 435  # 517 archive images less the blank ones
    assert all(m.shape == (256, 256) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 1} for m in masks)
    coverage = np.mean([m.mean() for m in masks])
    assert 0.25 < coverage < 0.6
    assert load_lung_masks(256)[0] is masks[0]
    assert not masks[0].flags.writeable

