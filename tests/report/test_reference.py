"""Reference files: the shipped G2D / CheXzero numbers as printed, and schema errors naming file and key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlpbench.errors import DataError
from vlpbench.report.reference import default_reference_dir, load_reference_file, load_references

SHIPPED = Path(__file__).resolve().parents[2] / "results" / "reference"


def _rows(name: str) -> dict:
    return {row.method: row.values for row in load_reference_file(SHIPPED / name)}


def test_shipped_tables_hold_the_papers_numbers_as_fractions():
    t1 = _rows("g2d_table1.json")
    assert len(t1) == 10
    assert t1["G2D (encoder)"][("siim_seg", 0.01, "dice")] == pytest.approx(0.626)
    # G2D's detection columns are MGCA's image-skipping mAP, computed under the paper profile
    assert t1["G2D (encoder)"][("object_cxr_det", 0.01, "map_mgca")] == pytest.approx(0.038)
    assert t1["MedKLIP*"][("rsna_seg", 1.0, "dice")] == pytest.approx(0.719)
    assert ("object_cxr_det", 0.01, "map_mgca") not in t1["MGCA"]  # "-" in the paper
    assert set(t1["G2D (enc+dec)"]) == {(t, f, "dice") for t in ("siim_seg", "rsna_seg") for f in (0.01, 0.1, 1.0)}

    t2a = _rows("g2d_table2a.json")
    assert t2a["G2D"] == pytest.approx({("siim_ground", 1.0, "recall"): 0.377, ("siim_ground", 1.0, "iou"): 0.039,
                                        ("siim_ground", 1.0, "dice"): 0.051, ("rsna_ground", 1.0, "recall"): 0.884,
                                        ("rsna_ground", 1.0, "iou"): 0.335, ("rsna_ground", 1.0, "dice"): 0.477})
    t2b = _rows("g2d_table2b.json")
    assert len(t2b) == 7 and t2b["G2D"][("chexpert_zs", 1.0, "f1")] == pytest.approx(0.656)
    assert t2b["BioViL"][("cxr14_zs", 1.0, "f1")] == pytest.approx(0.662)
    # KAD's F1 / ACC come from a max-MCC cut, not the max-F1 cut of the other rows: left out
    assert not any(k[0] == "cxr14_zs" for k in t2b["CheXzero*"])
    assert set(t2b["KAD*"]) == {("cxr14_zs", 1.0, "auc"), ("chexpert_zs", 1.0, "auc")}
    t3 = _rows("g2d_table3.json")
    assert [t3["KAD*"][("cxr14_ft", f, "auc")] for f in (0.01, 0.1, 1.0)] == pytest.approx([0.787, 0.807, 0.825])
    t4 = _rows("g2d_table4.json")
    assert len(t4) == 9 and t4["MRM"][("covidx_cls", 1.0, "acc")] == pytest.approx(0.908)
    assert t4["G2D"][("chexpert_cls", 0.01, "auc")] == pytest.approx(0.897)

    radiologists = load_reference_file(SHIPPED / "chexzero_radiologists.json")
    assert radiologists[0].values == pytest.approx({("chexpert_zs", 1.0, "f1"): 0.619,
                                                    ("chexpert_zs", 1.0, "mcc"): 0.530})
    assert "Expert-level detection of pathologies" in radiologists[0].citation


def test_rows_of_one_method_and_paper_merge_across_tables():
    merged = {(row.method, row.citation[:4], row.profile): row for row in load_references(SHIPPED)}
    g2d = merged["G2D", "Liu ", "paper"]
    assert len(g2d.values) == 6 + 11 + 9  # Tables 2a, 2b, 4
    assert g2d.tables[("rsna_zs", 1.0, "acc")] == "Table 2b"
    # Table 3 has no reference code to reproduce (KAD publishes no fine-tuning code): canonical
    assert merged["G2D", "Liu ", "canonical"].tables[("cxr14_ft", 0.1, "auc")] == "Table 3"
    assert ("Radiologists", "Tiu ", "canonical") in merged


def test_default_folder_falls_back_to_the_checkouts_reference_files(tmp_path):
    assert default_reference_dir(tmp_path) == SHIPPED
    (tmp_path / "reference").mkdir()
    assert default_reference_dir(tmp_path) == tmp_path / "reference"


GOOD = {"schema": 1, "citation": "P", "table": "Table 9", "unit": "percent",
        "columns": [{"paper": "A", "task": "siim_seg", "frac": 0.01, "metric": "dice"},
                    {"paper": "B", "task": "siim_seg", "frac": 1.0, "metric": "dice"}],
        "rows": [{"method": "M", "values": [50.0, None]}]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("citation"), "missing key 'citation'"),
    (lambda d: d.update(colour=1), "unknown key 'colour'"),
    (lambda d: d.update(unit="points"), "key 'unit': expected 'percent' or 'fraction'"),
    (lambda d: d.update(url=3), "key 'url': expected a string, got 3"),
    (lambda d: d["columns"][1].update(frac=10), "key 'columns[1].frac': expected a training fraction"),
    (lambda d: d["columns"][1].update(frac=0.01), "key 'columns[1]': siim_seg 0.01 dice is already column 0"),
    (lambda d: d["columns"][0].pop("metric"), "missing key 'columns[0].metric'"),
    (lambda d: d["columns"][0].update(metric="top1"), "key 'columns[0].metric': unknown metric 'top1'"),
    (lambda d: d["rows"][0].update(values=[50.0]), "key 'rows[0].values': expected a list of 2 entries"),
    (lambda d: d["rows"][0].update(values=[150.0, None]), "key 'rows[0].values[0]': expected null or a number in [0, 100]"),
    (lambda d: d["rows"][0].update(values=["50", None]), "key 'rows[0].values[0]'"),
    (lambda d: d["rows"].append({"method": "M", "values": [1, 2]}), "key 'rows[1].method': 'M' appears twice"),
    (lambda d: d.update(schema=2), "key 'schema': expected 1, got 2"),
])
def test_schema_errors_name_the_file_and_the_key(tmp_path, change, message):
    data = json.loads(json.dumps(GOOD))
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {message}")):
        load_reference_file(path)


def test_a_column_under_the_former_metric_name_reads_as_the_current_one(tmp_path):
    data = json.loads(json.dumps(GOOD))
    data["columns"] = [{"paper": "ACC", "task": "covidx_cls", "frac": 1.0, "metric": "accuracy"}]
    data["rows"] = [{"method": "M", "values": [90.8]}]
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert load_reference_file(tmp_path / "t.json")[0].values == {("covidx_cls", 1.0, "acc"): pytest.approx(0.908)}


def test_two_files_disagreeing_on_a_cell_is_an_error_and_bad_json_names_the_file(tmp_path):
    for name, value in (("a.json", 50.0), ("b.json", 51.0)):
        data = json.loads(json.dumps(GOOD))
        data["rows"][0]["values"][0] = value
        data["table"] = name
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(DataError, match="b.json: M siim_seg 0.01 dice = 0.51 but a.json of the same citation gives 0.5"):
        load_references(tmp_path)
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(DataError, match="b.json: not a JSON reference file"):
        load_references(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no \\*.json reference file"):
        load_references(tmp_path / "empty")
    with pytest.raises(DataError, match="missing does not exist"):
        load_references(tmp_path / "missing")


def test_every_reference_column_names_a_shipped_task_fraction_and_its_metric():
    from vlpbench.tasks import load_task, task_names

    shipped = set(task_names())
    for row in load_references(SHIPPED):
        for task, frac, metric in row.values:
            assert task in shipped, (row.method, task)
            spec = load_task(task)
            assert frac in spec.fractions, (task, frac)
            # Fine-tuned and frozen-encoder tables report the primary metric of their profile; zero-shot
            # and grounding tables report several (AUC / F1 / ACC, Recall / IoU / Dice).
            if spec.protocol not in ("zero_shot", "grounding"):
                assert metric == spec.with_profile(row.profile).primary_metric, (task, row.profile, metric)
