"""Task labels per dataset, checked against the committed split files and the raw label files."""

import csv

import numpy as np
import pytest

from vlpbench import api
from vlpbench.data.chexpert import COMPETITION_5, ChexpertSource, ChexpertTestSet
from vlpbench.data.covidx import CovidxSource
from vlpbench.data.cxr14 import LABELS, Cxr14Source
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.siim import SiimSource
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols.labels import class_names, class_slug, dataset_classes, task_labels


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("labels")
    sizes = {"rsna": 12, "siim": 12, "chexpert": 40, "cxr14": 12, "covidx": 12}
    for dataset, n in sizes.items():
        api.synth(dataset, base / dataset, n=n, size=64 if dataset == "covidx" else 32, progress=False)
    return {dataset: base / dataset for dataset in sizes}


def split_labels(dataset, ids, columns):
    """Labels of ``ids`` as the committed split files record them."""
    split = load_split(dataset)
    table = {i: row for part in split.parts for i, row in split.label_table(part).items()}
    return np.array([[table[i][c] for c in columns] for i in ids])


@pytest.mark.parametrize("reader, dataset, name", [(RsnaSource, "rsna", "pneumonia"),
                                                   (SiimSource, "siim", "pneumothorax")])
def test_binary_labels_equal_the_split_files(roots, reader, dataset, name):
    source = reader(roots[dataset])
    ids = source.image_ids
    labels = task_labels(source, ids, {"label_kind": "binary", "classes": [name]})
    assert labels.shape == (len(ids), 1) and labels.dtype == np.int64
    assert labels.tolist() == split_labels(dataset, ids, [name]).tolist()
    assert 0 < labels.sum() < len(ids)
    assert dataset_classes(source) == (name,)


def test_chexpert_multilabel_under_the_mgca_policy_equals_split_v1(roots):
    source = ChexpertSource(roots["chexpert"])
    split = load_split("chexpert")
    in_split = set(split.ids("train")) | set(split.ids("val"))
    ids = [i for i in source.frontal_ids("train") if i in in_split]
    config = {"label_kind": "multilabel", "classes": list(COMPETITION_5), "label_policy": "mgca"}
    labels = task_labels(source, ids, config)
    assert labels.shape == (len(ids), 5)
    assert labels.tolist() == split_labels("chexpert", ids, COMPETITION_5).tolist()
    # Reordered classes give reordered columns.
    reordered = task_labels(source, ids, {**config, "classes": ["Edema", "Atelectasis"]})
    assert reordered.tolist() == labels[:, [3, 0]].tolist()
    with pytest.raises(ConfigError, match="label_policy"):
        task_labels(source, ids, {"label_kind": "multilabel", "classes": ["Edema"]})
    with pytest.raises(ConfigError, match="'mgca' maps uncertain labels"):
        task_labels(source, ids, {**config, "classes": ["Pneumothorax"]})


def test_chexpert_5x200_multiclass_equals_the_split_class_column(roots):
    source = ChexpertSource(roots["chexpert"])
    five = load_split("chexpert5x200").labels("test", "class")
    ids = [i for i in source.image_ids if i in five]
    assert len(ids) >= 5
    config = {"label_kind": "multiclass", "classes": list(COMPETITION_5), "label_policy": "mgca"}
    labels = task_labels(source, ids, config)
    assert labels.shape == (len(ids),)
    assert labels.tolist() == [five[i] for i in ids]
    train_multi = [i for i in source.frontal_ids("train")
                   if sum(source.labels(i, COMPETITION_5, "mgca").values()) > 1]
    with pytest.raises(DataError, match="exactly one of"):
        task_labels(source, train_multi[:1], config)


def test_chexpert_test_set_labels_equal_groundtruth_csv(roots):
    source = ChexpertTestSet(roots["chexpert"])
    rows = list(csv.DictReader(open(source.label_file, newline="")))
    ids = [row["Study"] for row in rows]
    labels = task_labels(source, ids, {"label_kind": "multilabel", "classes": list(COMPETITION_5)})
    assert labels.tolist() == [[int(row[c]) for c in COMPETITION_5] for row in rows]


def test_cxr14_labels_equal_the_finding_labels_column(roots):
    source = Cxr14Source(roots["cxr14"])
    findings = {}
    with open(source.label_file, newline="") as f:
        for fields in list(csv.reader(f))[1:]:
            findings[fields[0]] = fields[1].split("|")
    ids = source.image_ids
    labels = task_labels(source, ids, {"label_kind": "multilabel", "classes": list(LABELS)})
    assert labels.tolist() == [[int(c in findings[i]) for c in LABELS] for i in ids]
    assert labels.sum() > 0


def test_covidx_multiclass_equals_the_label_files(roots):
    source = CovidxSource(roots["covidx"])
    written = {}
    for path in source.label_files.values():
        for line in path.read_text().splitlines():
            fields = line.split()
            written[fields[1]] = fields[2]
    classes = ["normal", "pneumonia", "COVID-19"]
    ids = source.image_ids
    labels = task_labels(source, ids, {"label_kind": "multiclass", "classes": classes})
    assert labels.tolist() == [classes.index(written[i]) for i in ids]
    # A task may order the classes its own way.
    reordered = task_labels(source, ids, {"label_kind": "multiclass", "classes": classes[::-1]})
    assert reordered.tolist() == (2 - labels).tolist()


def test_configuration_errors_name_what_was_expected(roots):
    source = RsnaSource(roots["rsna"])
    ids = source.image_ids[:2]
    with pytest.raises(ConfigError, match="'Pneumonia' not in dataset reader RsnaSource; its classes: pneumonia"):
        task_labels(source, ids, {"label_kind": "binary", "classes": ["Pneumonia"]})
    with pytest.raises(ConfigError, match="binary takes one class"):
        task_labels(Cxr14Source(roots["cxr14"]), ids, {"label_kind": "binary", "classes": ["Mass", "Nodule"]})
    with pytest.raises(ConfigError, match="label_kind is 'multi'"):
        task_labels(source, ids, {"label_kind": "multi", "classes": ["pneumonia"]})
    with pytest.raises(ConfigError, match="distinct class names"):
        class_names({"classes": ["a", "a"]})
    with pytest.raises(ConfigError, match="no classification labels for dataset reader str"):
        task_labels("not a reader", ids, {"label_kind": "binary", "classes": ["pneumonia"]})
    with pytest.raises(DataError, match="not-a-patient"):
        task_labels(source, ["not-a-patient"], {"label_kind": "binary", "classes": ["pneumonia"]})
    assert class_slug("Pleural Effusion") == "pleural_effusion" and class_slug("COVID-19") == "covid_19"
