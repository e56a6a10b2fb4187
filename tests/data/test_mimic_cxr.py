"""MIMIC-CXR-JPG reader, reports and split v1 on a synthetic release (never the real data)."""

from __future__ import annotations

import csv
import gzip
import io
import re
import shutil
import zipfile

import numpy as np
import pytest

from vlpbench.data.mimic_cxr import LABELS, MimicCxrSource, build_split_v1, parse_sections, split_v1
from vlpbench.errors import DataError
from vlpbench.synthetic.mimic_cxr import FILES, PATTERNS, synth_mimic_cxr


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic") / "release"
    facts = synth_mimic_cxr(root, n=40, seed=3, size=96, progress=False)
    return root, facts


def _rows(path):
    return list(csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))


def _copy(synth, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth[0], root)
    return root


def test_reader_matches_what_was_written(synth):
    root, facts = synth
    source = MimicCxrSource(root)
    metadata = _rows(root / FILES["metadata"])
    assert source.image_ids == [row["dicom_id"] for row in metadata] == list(facts["images"])
    assert source.synthetic
    labels = {(r["subject_id"], r["study_id"]): r for r in _rows(root / FILES["chexpert"])}
    splits = {r["dicom_id"]: r["split"] for r in _rows(root / FILES["split"])}
    for row in metadata:
        image_id = row["dicom_id"]
        assert source.subject_id(image_id) == row["subject_id"] and source.study_id(image_id) == row["study_id"]
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", image_id)
        assert source.path(image_id) == root / "files" / f"p{row['subject_id'][:2]}" / f"p{row['subject_id']}" / \
            f"s{row['study_id']}" / f"{image_id}.jpg"
        assert source.view_position(image_id) == row["ViewPosition"] == facts["images"][image_id]["view"]
        assert source.official_split(image_id) == splits[image_id]
        assert source.image(image_id).shape == source.image_size(image_id) == facts["images"][image_id]["size"]
        written = labels.get((row["subject_id"], row["study_id"]))
        if written is None:
            assert row["study_id"] in facts["unlabelled"]
            with pytest.raises(DataError, match="has no row in"):
                source.labels(image_id)
        else:
            expected = {name: float(written[name]) if written[name] else None for name in LABELS}
            assert source.labels(image_id) == expected
    assert set(splits.values()) == {"train", "validate", "test"}
    assert source.frontal_ids() == [r["dicom_id"] for r in metadata if r["ViewPosition"] in ("PA", "AP")]
    # Quirks: StudyTime floats without the leading zero; empty ViewPosition on some laterals.
    assert all(re.fullmatch(r"[1-9][0-9]*\.[0-9]+|0\.[0-9]+", r["StudyTime"]) for r in metadata)
    assert len(metadata[0]["StudyTime"].split(".")[0]) < 6
    assert any(r["ViewPosition"] == "" and r["PatientOrientationCodeSequence_CodeMeaning"] == "" for r in metadata)


def test_reports_sections_and_findings(synth):
    root, facts = synth
    source = MimicCxrSource(root)
    assert source.reports_zip == root / "mimic-cxr-reports.zip"
    seen = set()
    for image_id in source.image_ids:
        study = source.study_id(image_id)
        expected = facts["reports"][study]
        text = source.report(image_id)
        assert all(line.startswith(" ") and len(line) <= 79 for line in text.splitlines()[1:])
        assert text.splitlines()[0].strip() in ("FINAL REPORT", "ADDENDUM")
        assert source.sections(image_id) == {k: expected[k] for k in ("FINDINGS", "IMPRESSION")}
        seen.add(expected["variant"])
        for finding in facts["images"][image_id]["findings"]:
            assert re.search(PATTERNS[finding], text, re.IGNORECASE), (finding, text)
    assert {"both", "findings"} <= seen


def test_parse_sections_rule():
    text = (" " * 36 + "ADDENDUM\n ADDENDUM:  Discussed with Dr. ___.\n IMPRESSION:  old\n \n " + "_" * 78 + "\n"
            + " " * 33 + "FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n FINDINGS: \n \n Small left\n"
            " effusion.\n \n CONCLUSION: \n \n Effusion.\n")
    assert parse_sections(text) == {"FINDINGS": "Small left effusion.", "IMPRESSION": "Effusion."}
    assert parse_sections(" CHEST, PA LATERAL:  Clear lungs.\n") == {"FINDINGS": "", "IMPRESSION": ""}


def test_variants_plain_csv_unpacked_reports_and_210_folder(synth, tmp_path):
    root, facts = synth
    release = tmp_path / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.1.0"
    shutil.copytree(root, release)
    for name in FILES.values():  # gunzipped copies, as many users keep them
        (release / name[:-3]).write_bytes(gzip.decompress((release / name).read_bytes()))
        (release / name).unlink()
    with zipfile.ZipFile(release / "mimic-cxr-reports.zip") as archive:
        archive.extractall(release)
    (release / "mimic-cxr-reports.zip").unlink()
    source, original = MimicCxrSource(tmp_path), MimicCxrSource(root)
    assert source.folder == release and source.reports_zip is None
    assert source.image_ids == original.image_ids
    for image_id in source.image_ids:
        assert source.report(image_id) == original.report(image_id)
        assert source.official_split(image_id) == original.official_split(image_id)
    assert MimicCxrSource(root, labeler="negbio").labels(source.frontal_ids()[0]) == original.labels(source.frontal_ids()[0])


def test_missing_and_bad_images(synth, tmp_path):
    root = _copy(synth, tmp_path)
    source = MimicCxrSource(root)
    gone, broken = source.image_ids[1], source.image_ids[2]
    source.path(gone).unlink()
    source.path(broken).write_bytes(b"not a jpeg")
    unlabelled = [i for i in source.image_ids if source.study_id(i) in synth[1]["unlabelled"]]
    source = MimicCxrSource(root)
    assert source.missing(source.image_ids) == [i for i in source.image_ids if i == gone or i in unlabelled]
    with pytest.raises(DataError, match=f"expected .*{gone}.jpg"):
        source.image(gone)
    with pytest.raises(DataError, match=broken):
        source.image(broken)
    (root / "mimic-cxr-reports.zip").unlink()
    with pytest.raises(DataError, match="mimic-cxr-reports.zip"):
        MimicCxrSource(root).report(broken)


def _rewrite(path, edit):
    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    edit(lines)
    path.write_bytes(gzip.compress("\n".join(lines).encode()))


@pytest.mark.parametrize("kind, edit, message", [
    ("split", lambda lines: lines.__setitem__(2, lines[2].rsplit(",", 1)[0] + ",val"),
     r"split.csv.gz line 3: split 'val'; expected train, validate or test"),
    ("chexpert", lambda lines: lines.__setitem__(3, lines[3].rsplit(",", 1)[0] + ",yes"),
     r"chexpert.csv.gz line 4: column 'Support Devices' is 'yes'"),
    ("metadata", lambda lines: lines.__setitem__(2, "x" + lines[2]), r"metadata.csv.gz line 3: dicom_id"),
    ("metadata", lambda lines: lines.__setitem__(4, lines[4] + ",extra"), r"metadata.csv.gz line 5: expected 12 fields"),
    ("chexpert", lambda lines: lines.__setitem__(0, lines[0].replace("Edema,", "")), r"chexpert.csv.gz line 1: header lacks 'Edema'"),
])
def test_malformed_label_files(synth, tmp_path, kind, edit, message):
    root = _copy(synth, tmp_path)
    _rewrite(root / FILES[kind], edit)
    with pytest.raises(DataError, match=message):
        MimicCxrSource(root)


def test_missing_files(synth, tmp_path):
    with pytest.raises(DataError, match="expected mimic-cxr-2.0.0-metadata.csv.gz"):
        MimicCxrSource(tmp_path)
    root = _copy(synth, tmp_path)
    (root / FILES["split"]).unlink()
    with pytest.raises(DataError, match=f"expected mimic-cxr-2.0.0-split.csv.gz .* in {root}"):
        MimicCxrSource(root)


def test_split_v1(synth, tmp_path):
    root, _ = synth
    source = MimicCxrSource(root)
    split = split_v1(source)
    labelled = [i for i in source.image_ids if i not in source.missing([i])]
    official = {part: sorted(i for i in labelled if source.official_split(i) == name)
                for part, name in (("train", "train"), ("val", "validate"), ("test", "test"))}
    for part, ids in official.items():
        assert split.ids(part) == ids
    train = set(split.ids("train"))
    assert not train & set(split.ids("val")) and not train & set(split.ids("test"))
    assert set(split.ids("train_1pct")) <= set(split.ids("train_10pct")) <= train
    assert len(split.ids("train_10pct")) == round(len(train) * 0.1)
    assert len(split.ids("train_1pct")) == round(len(train) * 0.01)
    assert split.columns == LABELS
    for image_id, row in split.label_table("train").items():  # U-zeros
        assert row == {k: int(v == 1.0) for k, v in source.labels(image_id).items()}
    assert split_v1(source).manifest_sha256 == split.manifest_sha256
    build_split_v1(source, tmp_path / "a")
    build_split_v1(source, tmp_path / "b")
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()


def test_synth_is_deterministic_and_refuses_foreign_folders(synth, tmp_path):
    facts = synth_mimic_cxr(tmp_path / "again", n=40, seed=3, size=96, progress=False)
    for name in (*FILES.values(), "mimic-cxr-reports.zip"):
        assert (tmp_path / "again" / name).read_bytes() == (synth[0] / name).read_bytes()
    image_id = next(iter(facts["images"]))
    first, second = MimicCxrSource(synth[0]), MimicCxrSource(tmp_path / "again")
    assert np.array_equal(first.image(image_id), second.image(image_id))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        synth_mimic_cxr(tmp_path / "foreign", n=5, progress=False)
