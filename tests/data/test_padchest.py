"""PadChest: the Labels parser on the real syntax, the reader against its synthetic copy, split v1, and
padchest_zs from the CLI with an aligned test model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.cache import resize_image
from vlpbench.data.padchest import LABEL_FILE, PadchestSource, build_split_v1, parse_labels, read_label_csv
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols.labels import class_slug
from vlpbench.registry import ADAPTERS
from vlpbench.synthetic.padchest import COVER
from vlpbench.testing.weightless import BrightnessPair

HEADER = ",ImageID,ImageDir,StudyID,PatientID,PatientBirth,PatientSex_DICOM,Projection,MethodLabel,Labels,Report"


@pytest.mark.parametrize("cell, expected", [
    ("['pleural effusion', 'cardiomegaly']", ("pleural effusion", "cardiomegaly")),
    ("['infiltrates', ' interstitial pattern']", ("infiltrates", "interstitial pattern")),
    ("['COPD signs', ' pulmonary fibrosis']", ("copd signs", "pulmonary fibrosis")),
    ("['cardiomegaly', '', 'unchanged']", ("cardiomegaly", "unchanged")),
    ("['']", ()),
    ("[]", ()),
    ("['normal']", ("normal",)),
    ("['pneumonia','pneumonia ']", ("pneumonia",)),
    ("", None),
    ("nan", None),
])
def test_labels_parser_reads_the_real_variants(cell, expected):
    assert parse_labels(cell, "f line 2") == expected


@pytest.mark.parametrize("cell, message", [
    ("'pneumonia'", "is not a list"),
    ("['pneumonia' 'effusion']", "expected ',' at character 13"),
    ("[pneumonia]", "expected a quoted label at character 2"),
    ("['pneumonia', ]", "expected a quoted label"),
    ("[\"pneumonia\"]", "expected a quoted label"),
    ("['a', __import__('os')]", "expected a quoted label at character 7"),
])
def test_malformed_labels_name_file_and_line(cell, message):
    with pytest.raises(DataError, match=f"labels.csv line 7: Labels .*{message}"):
        parse_labels(cell, "labels.csv line 7")


def write_csv(path, rows):
    path.write_text(HEADER + "\n" + "".join(f"{k},{row}\n" for k, row in enumerate(rows)))
    return path


def test_reader_keeps_frontal_physician_rows_and_names_bad_lines(tmp_path):
    rows = ['a.png,0,s1,p1,1950.0,M,PA,Physician,"[\'pneumonia\', \' COPD signs\']","x, y"',
            'b.png,1,s2,p2,1950.0,F,L,Physician,"[\'pneumonia\']",r',
            'c.png,1,s3,p3,1950.0,F,AP_horizontal,Physician,"[\'normal\']",r',
            'd.png,2,s4,p4,1950.0,F,PA,RNN_model,"[\'pneumonia\']",r',
            'e.png,2,s5,p5,1950.0,F,AP,Physician,"[\'exclude\']",r',
            'f.png,2,s6,p6,1950.0,F,PA,Physician,nan,r']
    write_csv(tmp_path / LABEL_FILE, rows)
    source = PadchestSource(tmp_path)
    assert source.test_ids() == ["a.png", "c.png"]
    assert source.labels("a.png") == ("pneumonia", "copd signs") and source.labels("f.png") == ()
    assert source.path("b.png") == tmp_path / "1" / "b.png"
    assert source.class_labels("a.png", ["copd signs", "cardiomegaly"], {}) == [1, 0]
    with pytest.raises(ConfigError, match="'Pneumonia'"):
        source.class_labels("a.png", ["Pneumonia"], {})
    bad = write_csv(tmp_path / "bad.csv", [*rows[:2], 'g.png,0,s,p,1950.0,M,PA,Physician,"[\'a\' \'b\']",r'])
    with pytest.raises(DataError, match="bad.csv line 4: Labels"):
        read_label_csv(bad)
    write_csv(bad, [rows[0], 'a.png,0,s,p,1950.0,M,PA,Physician,"[]",r'])
    with pytest.raises(DataError, match="bad.csv line 3: ImageID a.png appears twice"):
        read_label_csv(bad)
    write_csv(bad, ['h.png,0,s,p,1950.0,M,PA,Doctor,"[]",r'])
    with pytest.raises(DataError, match="bad.csv line 2: MethodLabel 'Doctor'"):
        read_label_csv(bad)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("padchest") / "padchest"
    api.synth("padchest", root, n=260, size=32, progress=False)
    return root


def test_synthetic_copy_is_read_in_the_real_format(synthetic):
    source = PadchestSource(synthetic)
    assert source.synthetic and len(source.image_ids) == 260 and len(source.test_ids()) == 208
    assert (synthetic / LABEL_FILE).read_text().startswith(",ImageID,ImageDir,StudyDate_DICOM,")
    committed = set(load_split("padchest").ids("test"))
    assert set(source.test_ids()) <= committed
    image_id = source.test_ids()[0]
    with Image.open(source.path(image_id)) as image:
        assert image.mode == "I;16" and image.size == (32, 32)
    pixels = source.image(image_id)
    assert pixels.dtype == np.uint8 and pixels.max() == 255  # 16 bits scaled by the maximum
    split = load_split("padchest")
    table = split.label_table("test")
    for i in source.test_ids():
        assert {c for c, v in table[i].items() if v} == {c for c in source.labels(i) if c in split.columns}


def test_split_v1_is_deterministic_and_matches_the_committed_one(tmp_path, synthetic):
    first = build_split_v1(synthetic / LABEL_FILE, tmp_path / "a")
    second = build_split_v1(synthetic / LABEL_FILE, tmp_path / "b")
    assert first == second
    assert (tmp_path / "a" / "test.csv").read_bytes() == (tmp_path / "b" / "test.csv").read_bytes()
    manifest = load_split("padchest").manifest
    assert manifest["files"]["test.csv.gz"]["rows"] == 26373 and len(load_split("padchest").columns) == 136
    assert min(manifest["files"]["test.csv.gz"]["positives"].values()) >= 20


def test_synthetic_test_images_hold_every_finding_as_positive_and_negative(synthetic):
    source, split = PadchestSource(synthetic), load_split("padchest")
    labels = np.array([source.class_labels(i, split.columns, {}) for i in source.test_ids()])
    assert labels.shape == (208, 136) and labels.sum(axis=0).min() >= COVER
    assert (labels == 0).sum(axis=0).min() > 0


class BrightnessModel(BrightnessPair):
    """Brightness as every finding's evidence: the synthetic copy draws one opacity per finding."""

    name = "padchest-test-brightness"
    description = "test model: image brightness as the finding's evidence"


def test_padchest_zs_runs_from_the_cli_and_beats_chance(synthetic, tmp_path, monkeypatch):
    monkeypatch.setitem(ADAPTERS._targets, BrightnessModel.name, BrightnessModel)
    assert main(["-q", "run", "--model", BrightnessModel.name, "--task", "padchest_zs", "--frac", "1.0",
                 "--data-root", str(synthetic), "--results", str(tmp_path), "--device", "cpu",
                 "--set", "bootstrap_resamples=20"]) == 0
    (path,) = tmp_path.rglob("padchest_zs.v1/*.json")
    record = json.loads(path.read_text())
    source, split = PadchestSource(synthetic), load_split("padchest")
    test = [i for i in split.ids("test") if i in set(source.test_ids())]
    assert record["n"]["test"] == len(test) == 208 and record["n"]["train"] == 0
    assert record["config"]["training"]["thresholds"] is None and set(record["metrics"]) >= {"auc"}
    labels = np.array([source.class_labels(i, split.columns, {}) for i in test])
    assert record["n"]["test_positives"] == dict(zip(split.columns, labels.sum(axis=0).tolist()))
    model = BrightnessModel()
    pixels = torch.from_numpy(np.stack([resize_image(source.image(i), model.image_size) for i in test]))
    scores = model.zero_shot_scores(model.preprocess(pixels[:, None]), list(split.columns)).numpy()
    reference = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    assert [record["metrics"][f"auc_{class_slug(c)}"] for c in split.columns] == pytest.approx(reference, abs=1e-5)
    assert record["metrics"]["auc"] == pytest.approx(np.mean(reference), abs=1e-5)
    assert record["metrics"]["auc"] > 0.55 and record["ci"]["auc"]["low"] > 0.5  # chance: 0.5
    assert record["ci"]["auc"]["skipped"] < 20  # resamples that lost every positive of a finding
