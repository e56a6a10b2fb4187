"""MIMIC-5x200: the committed BenchX ids and classes, the split made from them, and the reader's classes.

The BenchX file itself is not shipped (its Report column is credentialed text); where a clone of BenchX is at hand
($VLPBENCH_BENCHX_REPO, a git dir) the committed id list must regenerate from its file byte for byte.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter

import numpy as np
import pytest

from vlpbench.data.mimic_5x200 import (
    BENCHX_COMMIT,
    BENCHX_FILE,
    CLASSES,
    SOURCE_FILE,
    Mimic5x200Source,
    generate_split_v1,
    read_benchx_rows,
    read_source_ids,
    write_source_ids,
)
from vlpbench.data.mimic_cxr import parse_sections
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols.retrieval_sets import report_text
from vlpbench.splits import SPLITS_DIR
from vlpbench.synthetic.mimic_cxr import write_report
from vlpbench.testing.clones import file_at_commit

DICOM = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")


def test_the_committed_ids_are_1000_distinct_images_200_per_class():
    with SOURCE_FILE.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1000 and len({r["dicom_id"] for r in rows}) == 1000
    assert Counter(r["class"] for r in rows) == {name: 200 for name in CLASSES}
    assert all(DICOM.fullmatch(r["dicom_id"]) and re.fullmatch(r"1\d{7}", r["subject_id"])
               and re.fullmatch(r"5\d{7}", r["study_id"]) for r in rows)
    assert len({r["study_id"] for r in rows}) == 987  # 13 studies bring two images, each of one class
    by_study = {}
    for r in rows:
        by_study.setdefault(r["study_id"], set()).add(r["class"])
    assert all(len(classes) == 1 for classes in by_study.values())
    assert [tuple(r.values()) for r in rows] == read_source_ids()
    # No report text: four fields a line, nothing beyond ids and the class.
    assert {len(line.split(",")) for line in SOURCE_FILE.read_text().splitlines()} == {4}


def test_the_split_regenerates_byte_identically_and_holds_the_committed_classes(tmp_path):
    manifest = generate_split_v1(tmp_path)
    committed = SPLITS_DIR / "mimic5x200" / "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in committed.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert manifest["reference"]["commit"].startswith("6fa71fe") and manifest["reference"]["official_split"] == {
        "train": 975, "validate": 14, "test": 11}
    split = load_split("mimic5x200", "v1")
    assert split.parts == ("test",)
    assert split.labels("test") == {row[0]: CLASSES.index(row[3]) for row in read_source_ids()}


def test_the_id_list_regenerates_from_benchx_file(tmp_path):
    """Where a BenchX clone is at hand: its file at the cited commit (deleted later) gives the committed ids."""
    data = file_at_commit("VLPBENCH_BENCHX_REPO", BENCHX_COMMIT, BENCHX_FILE)
    if data is None:
        pytest.skip("no BenchX clone (set VLPBENCH_BENCHX_REPO)")
    archive = tmp_path / "mimic_5x200.csv.zip"
    archive.write_bytes(data)
    out = write_source_ids(archive, tmp_path / "ids.csv")
    assert out.read_bytes() == SOURCE_FILE.read_bytes()
    with zipfile.ZipFile(archive) as opened:
        benchx = list(csv.DictReader(io.StringIO(opened.read("mimic_5x200.csv").decode())))
    assert Counter(r["split"] for r in benchx) == {"train": 975, "validate": 14, "test": 11}


def test_a_file_other_than_benchx_is_refused(tmp_path):
    other = tmp_path / "mimic_5x200.csv"
    other.write_text("Path,dicom_id,subject_id,study_id,Report,split\n")
    with pytest.raises(DataError, match=r"mimic_5x200.csv: the CSV's sha256 is .* expected 06b14234"):
        read_benchx_rows(other)
    bad = tmp_path / "ids.csv"
    bad.write_text("dicom_id,subject_id,study_id,class\na,1,5,Pneumonia\n")
    with pytest.raises(DataError, match=r"ids.csv line 2: expected .* one of Atelectasis"):
        read_source_ids(bad)


def test_the_reader_gives_the_committed_class_and_knows_only_the_listed_images(tmp_path):
    reader = Mimic5x200Source.__new__(Mimic5x200Source)  # the label methods need no folder
    image_id, _, _, name = read_source_ids()[0]
    reader._images, reader._jpgs = {image_id: None, "elsewhere": None}, {image_id}
    assert reader.image_ids == [image_id]
    assert reader.class_labels(image_id, list(CLASSES), {}) == [int(c == name) for c in CLASSES]
    assert reader.class_labels(image_id, [name], {}) == [1]
    assert reader.unlabelled([image_id, "elsewhere", "unknown"]) == ["elsewhere", "unknown"]
    assert reader.missing([image_id, "elsewhere"]) == ["elsewhere"]
    with pytest.raises(ConfigError, match="'No Finding' not in dataset reader Mimic5x200Source"):
        reader.class_labels(image_id, ["No Finding"], {})
    with pytest.raises(DataError, match="not in split mimic5x200/v1"):
        reader.class_labels("elsewhere", list(CLASSES), {})


def test_findings_then_impression_is_benchx_report_form():
    """BenchX's Report is the findings, a space, the impression, sentences split by a literal backslash-n;
    vlpbench's findings_impression text of the same report equals it with those separators read as spaces."""
    for seed in range(6):
        text, facts = write_report(np.random.default_rng(seed), ["Edema"], exam="CHEST (PORTABLE AP)", sex="F")
        sections = parse_sections(text)
        benchx = " ".join("\\n".join(re.split(r"(?<=\.) ", facts[name])) for name in ("FINDINGS", "IMPRESSION")
                          if facts[name])
        assert report_text(sections, "findings_impression") == benchx.replace("\\n", " ")
