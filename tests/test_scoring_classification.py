"""`vlpbench score` for classification CSVs: values against scikit-learn, thresholds only from validation rows."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, matthews_corrcoef, roc_auc_score

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.chexpert import COMPETITION_5, ChexpertSource, ChexpertTestSet
from vlpbench.data.covidx import CovidxSource
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.splits import dataset_split, load_split
from vlpbench.errors import DataError
from vlpbench.protocols import SplitIds
from vlpbench.protocols.linear import PROTOCOL as LINEAR


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("scoring")
    api.synth("rsna", base / "rsna", n=80, size=32, progress=False)
    api.synth("chexpert", base / "chexpert", n=40, size=32, progress=False)
    api.synth("covidx", base / "covidx", n=20, size=64, progress=False)
    return {"rsna": base / "rsna", "chexpert": base / "chexpert", "covidx": base / "covidx"}


@pytest.fixture(scope="module")
def rsna(roots):
    source = RsnaSource(roots["rsna"])
    split = load_split("rsna")
    present = set(source.image_ids)
    ids = {part: [i for i in split.ids(part) if i in present] for part in ("val", "test")}
    rng = np.random.default_rng(0)
    # Probabilities that rank positives higher on average, on a coarse grid so that some tie.
    probs = {i: round(float(np.clip(0.35 * source.label(i) + rng.random() * 0.7, 0, 1)), 1)
             for part in ids.values() for i in part}
    return source, ids, probs


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, row)) for row in rows)]) + "\n")
    return path


def test_zero_shot_scores_from_the_cli_equal_the_metrics_computed_directly(rsna, roots, tmp_path, capsys):
    source, ids, probs = rsna
    csv_path = write_csv(tmp_path / "predictions.csv", ["image_id", "pneumonia"],
                         [(i, probs[i]) for part in ("test", "val") for i in ids[part]])
    assert main(["score", "--task", "rsna_zs", "--predictions", str(csv_path), "--data-root", str(roots["rsna"]),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    y_test = np.array([source.label(i) for i in ids["test"]])
    s_test = np.array([probs[i] for i in ids["test"]])
    y_val = np.array([source.label(i) for i in ids["val"]])
    s_val = np.array([probs[i] for i in ids["val"]])
    assert result["n"]["test"] == len(ids["test"])
    assert result["metrics"]["auc"] == pytest.approx(roc_auc_score(y_test, s_test), abs=1e-12)
    f1_by_cut = {t: f1_score(y_val, (s_val >= t).astype(int)) for t in np.unique(s_val)}
    best = max(f1_by_cut.values())
    threshold = max(t for t, v in f1_by_cut.items() if v >= best - 1e-12)
    assert result["scoring"]["thresholds"] == {"pneumonia": threshold}
    predicted = (s_test >= threshold).astype(int)
    assert result["metrics"]["f1"] == pytest.approx(f1_score(y_test, predicted), abs=1e-12)
    assert result["metrics"]["acc"] == pytest.approx(accuracy_score(y_test, predicted), abs=1e-12)
    assert result["metrics"]["mcc"] == pytest.approx(matthews_corrcoef(y_test, predicted), abs=1e-12)
    for name in ("auc", "f1", "acc", "mcc"):
        assert result["ci"][name]["low"] <= result["metrics"][name] <= result["ci"][name]["high"]


def test_test_rows_only_leave_threshold_metrics_out_with_a_note(rsna, roots, tmp_path, capsys):
    source, ids, probs = rsna
    # A binary task takes a single probability column whatever its name.
    test_only = write_csv(tmp_path / "test_only.csv", ["image_id", "p"], [(i, probs[i]) for i in ids["test"]])
    result = api.score("rsna_zs", test_only, data_root=roots["rsna"], overrides={"bootstrap_resamples": 50})
    assert set(result["metrics"]) == {"auc"} and result["scoring"]["thresholds"] is None
    assert "f1, acc, mcc left out" in result["scoring"]["notes"][0]
    assert main(["score", "--task", "rsna_zs", "--predictions", str(test_only), "--data-root", str(roots["rsna"])]) == 0
    printed = capsys.readouterr().out
    assert f"rsna_zs (test, n={len(ids['test'])}): auc = {result['metrics']['auc']:.4f} (95% CI " in printed
    assert "note: f1, acc, mcc left out" in printed
    partial = write_csv(tmp_path / "partial.csv", ["image_id", "pneumonia"],
                        [(i, probs[i]) for i in ids["test"] + ids["val"][:2]])
    with pytest.raises(DataError, match=f"rows for 2 of the {len(ids['val'])} threshold images"):
        api.score("rsna_zs", partial, data_root=roots["rsna"], overrides={"bootstrap_resamples": 50})


def test_linear_tasks_score_auc_or_top1_accuracy(rsna, roots, tmp_path):
    source, ids, probs = rsna
    csv_path = write_csv(tmp_path / "linear.csv", ["image_id", "pneumonia"], [(i, probs[i]) for i in ids["test"]])
    config = {"classes": ["pneumonia"], "label_kind": "binary", "bootstrap_resamples": 50}
    result = LINEAR.score(csv_path, source, SplitIds([], [], ids["test"]), config)
    y_test = [source.label(i) for i in ids["test"]]
    s_test = [probs[i] for i in ids["test"]]
    # Calibration is added to every classification evaluation (tests/metrics/test_calibration.py).
    assert set(result["metrics"]) == {"auc", "ece", "adaptive_ece", "brier"}
    assert result["metrics"]["auc"] == pytest.approx(roc_auc_score(y_test, s_test))
    assert result["metrics"]["brier"] == pytest.approx(brier_score_loss(y_test, s_test))

    covidx = CovidxSource(roots["covidx"])
    test_ids = dataset_split("covidx", covidx).ids("test")
    classes = ["normal", "pneumonia", "COVID-19"]
    rng = np.random.default_rng(1)
    table = rng.dirichlet(np.ones(3), size=len(test_ids)).round(3)
    csv_path = write_csv(tmp_path / "covidx.csv", ["image_id", "COVID-19", "normal", "pneumonia"],
                         [(i, row[2], row[0], row[1]) for i, row in zip(test_ids, table)])
    result = LINEAR.score(csv_path, covidx, SplitIds([], [], test_ids),
                          {"classes": classes, "label_kind": "multiclass", "bootstrap_resamples": 50})
    truth = [classes.index(covidx.class_name(i)) for i in test_ids]
    assert result["metrics"]["acc"] == pytest.approx(accuracy_score(truth, table.argmax(axis=1)))
    one_vs_rest = [roc_auc_score(np.equal(truth, k), table[:, k]) for k in range(3) if 0 < truth.count(k) < len(truth)]
    assert result["metrics"]["auc"] == pytest.approx(np.mean(one_vs_rest))


def test_multilabel_chexpert_zero_shot_scores_per_class(roots, tmp_path):
    source = ChexpertTestSet(roots["chexpert"])
    ids = source.image_ids
    rng = np.random.default_rng(2)
    table = rng.random((len(ids), 5)).round(2)
    csv_path = write_csv(tmp_path / "chexpert.csv", ["image_id", *COMPETITION_5],
                         [(i, *row) for i, row in zip(ids, table)])
    result = api.score("chexpert_zs", csv_path, data_root=roots["chexpert"], overrides={"bootstrap_resamples": 50})
    truth = np.array([[source.labels(i)[c] for c in COMPETITION_5] for i in ids])
    expected = {c: roc_auc_score(truth[:, k], table[:, k]) for k, c in enumerate(COMPETITION_5)
                if 0 < truth[:, k].sum() < len(ids)}
    assert expected
    for name, value in expected.items():
        assert result["metrics"][f"auc_{name.lower().replace(' ', '_')}"] == pytest.approx(value)
    assert result["metrics"]["auc"] == pytest.approx(np.mean(list(expected.values())))
    assert "f1" not in result["metrics"] and "CheXpert valid.csv" in result["scoring"]["notes"][0]


@pytest.mark.parametrize("rows, message", [
    (lambda ids: [(i, 0.5) for i in ids[1:]], "1 of {n} test images have no row"),
    (lambda ids: [(i, 0.5) for i in ids] + [("not-a-patient", 0.5)], "neither test images of the split nor threshold images"),
    (lambda ids: [(ids[0], "high")] + [(i, 0.5) for i in ids[1:]], "line 2 column 'pneumonia': 'high' is not"),
    (lambda ids: [(i, 0.5) for i in ids[:-1]] + [(ids[-1], 1.5)], "line {last} column 'pneumonia': '1.5'"),
    (lambda ids: [(i, 0.5) for i in ids] + [(ids[0], 0.5)], "line {dup}: image_id .* repeats line 2"),
])
def test_malformed_csvs_name_the_file_row_and_column(rsna, roots, tmp_path, rows, message):
    _, ids, _ = rsna
    test = ids["test"]
    csv_path = write_csv(tmp_path / "bad.csv", ["image_id", "pneumonia"], rows(test))
    expected = message.format(n=len(test), last=len(test) + 1, dup=len(test) + 2)
    with pytest.raises(DataError, match=expected) as error:
        api.score("rsna_zs", csv_path, data_root=roots["rsna"], overrides={"bootstrap_resamples": 10})
    assert str(csv_path) in str(error.value)


def test_a_multilabel_csv_needs_every_class_column(roots, tmp_path):
    source = ChexpertTestSet(roots["chexpert"])
    csv_path = write_csv(tmp_path / "bad.csv", ["image_id", "Atelectasis", "Edema", "Pneumonia"],
                         [(i, 0.1, 0.2, 0.3) for i in source.image_ids])
    with pytest.raises(DataError, match="lacks 'Cardiomegaly', 'Consolidation', 'Pleural Effusion'; has unknown "
                                        "'Pneumonia'"):
        api.score("chexpert_zs", csv_path, data_root=roots["chexpert"], overrides={"bootstrap_resamples": 10})


def test_chexpert_zs_takes_thresholds_from_the_valid_csv_rows_of_the_same_csv(roots, tmp_path):
    test_set = ChexpertTestSet(roots["chexpert"])
    chexpert = ChexpertSource(roots["chexpert"])
    test_ids, valid_ids = test_set.image_ids, chexpert.frontal_ids("valid")
    assert test_ids and valid_ids
    rng = np.random.default_rng(3)
    probs = {i: rng.random(5).round(2) for i in test_ids + valid_ids}
    csv_path = write_csv(tmp_path / "chexpert.csv", ["image_id", *COMPETITION_5],
                         [(i, *probs[i]) for i in test_ids + valid_ids])
    result = api.score("chexpert_zs", csv_path, data_root=roots["chexpert"], overrides={"bootstrap_resamples": 20})
    assert result["scoring"]["threshold_source"] == "val" and result["n"]["val"] == len(valid_ids)

    y_valid = np.array([[chexpert.labels(i, COMPETITION_5, "mgca")[c] for c in COMPETITION_5] for i in valid_ids])
    y_test = np.array([[test_set.labels(i)[c] for c in COMPETITION_5] for i in test_ids])
    s_valid = np.stack([probs[i] for i in valid_ids])
    s_test = np.stack([probs[i] for i in test_ids])
    f1s, accs, mccs = [], [], []
    for k, name in enumerate(COMPETITION_5):
        if not y_valid[:, k].any():
            assert result["scoring"]["thresholds"][name] is None
            continue
        by_cut = {t: f1_score(y_valid[:, k], (s_valid[:, k] >= t).astype(int)) for t in np.unique(s_valid[:, k])}
        threshold = max(t for t, v in by_cut.items() if v >= max(by_cut.values()) - 1e-12)
        assert result["scoring"]["thresholds"][name] == pytest.approx(threshold)
        predicted = (s_test[:, k] >= threshold).astype(int)
        f1s.append(f1_score(y_test[:, k], predicted, zero_division=0))
        accs.append(accuracy_score(y_test[:, k], predicted))
        mccs.append(matthews_corrcoef(y_test[:, k], predicted))
    assert f1s
    assert result["metrics"]["f1"] == pytest.approx(np.mean(f1s), abs=1e-12)
    assert result["metrics"]["acc"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert result["metrics"]["mcc"] == pytest.approx(np.mean(mccs), abs=1e-12)
