"""Subgroups end to end: `run --by sex` on a tiny synthetic RSNA zero-shot task prints and records the AUC per
sex (each equal to scikit-learn's AUC on that subset), `score --by` gives the same, `table --by sex` tabulates
the records, `plot --by sex` draws them, the leaderboard shows them, and old records without subgroups still
load and tabulate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.rsna import RsnaSource
from vlpbench.errors import ConfigError, DataError
from vlpbench.registry import ADAPTERS
from vlpbench.report.subgroups import leaderboard_section, subgroup_table
from vlpbench.report.table import render_table
from vlpbench.results import load_records
from vlpbench.testing.weightless import BrightnessClip


class BrightClip(BrightnessClip):
    """Image embeddings from mean brightness against two fixed text directions: scores vary per image."""

    name = "subgroups-test-bright-clip"
    description = "test model: brightness embeddings"


ADAPTERS.register(BrightClip.name, BrightClip)

FAST = ["--set", "bootstrap_resamples=100"]
N_PER_SEX = 24  # test images per sex, half of them positive; 20 validation images for the thresholds


def _write_rsna(root):
    """An RSNA folder in the real format (label file, DICOMs with PatientSex / PatientAge / ViewPosition) over
    real patient ids of split v1, whose brightness plants a gap: a woman's positive image is bright and her
    negative dark (BrightClip ranks them perfectly), a man's brightness is random (AUC near 0.5)."""
    from vlpbench.data.dicom import write_dicom
    from vlpbench.data.splits import load_split

    split = load_split("rsna", "v1")
    rng = np.random.default_rng(0)
    test, val = split.ids("test")[:2 * N_PER_SEX], split.ids("val")[:20]
    rows, image_dir = [], root / "stage_2_train_images"
    for index, patient in enumerate(test + val):
        sex = "F" if index % 2 == 0 else "M"
        positive = (index // 2) % 2 == 1
        level = (200 if positive else 60) if sex == "F" else int(rng.integers(40, 220))
        pixels = np.full((32, 32), level, dtype=np.uint8)
        pixels[0, 0] = 255  # read_dicom scales by 255 / max: keep the max fixed
        write_dicom(image_dir / f"{patient}.dcm", pixels, sop_instance_uid=f"1.2.3.{index + 1}",
                    study_instance_uid=f"1.2.4.{index + 1}", series_instance_uid=f"1.2.5.{index + 1}",
                    patient_id=patient, patient_sex=sex, patient_age=25 + index, view_position="PA")
        rows.append(f"{patient},8.0,8.0,10.0,10.0,1" if positive else f"{patient},,,,,0")
    (root / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n" + "\n".join(rows) + "\n")
    (root / "VLPBENCH_SYNTHETIC.json").write_text("{}")
    return test


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """(data folder, test ids, results folder, predictions folder) of one tiny RSNA zero-shot setup."""
    base = tmp_path_factory.mktemp("subgroups")
    root = base / "rsna"
    root.mkdir()
    test = _write_rsna(root)
    return root, test, base / "results", base / "predictions"


def test_run_by_sex_prints_and_records_the_auc_of_each_sex(ran, capsys):
    root, test, results, predictions = ran
    assert main(["run", "--model", BrightClip.name, "--task", "rsna_zs", "--frac", "1", "--data-root", str(root),
                 "--results", str(results), "--device", "cpu", "--no-progress", "--save-predictions",
                 str(predictions), "--by", "sex", "--by", "age,view", "--age-bins", "50", *FAST]) == 0
    out = capsys.readouterr().out
    assert "auc by sex" in out and "auc by age" in out and "gap F − M" in out
    (record,) = load_records(results)
    by_sex = record["subgroups"]["sex"]
    assert [(row["group"], row["n"], row["positives"]) for row in by_sex["groups"]] == [
        ("F", N_PER_SEX, {"pneumonia": N_PER_SEX // 2}), ("M", N_PER_SEX, {"pneumonia": N_PER_SEX // 2})]
    assert record["subgroups"]["age"]["age_bins"] == [50.0]
    assert [(row["group"], row["n"]) for row in record["subgroups"]["age"]["groups"]] == [("<50", 25), (">=50", 23)]
    assert [row["group"] for row in record["subgroups"]["view"]["groups"]] == ["PA"]

    # Each subgroup's AUC is scikit-learn's on the saved probabilities of that subset (records keep 6 decimals).
    source = RsnaSource(root)
    lines = [line.split(",") for line in (predictions / "predictions.csv").read_text().splitlines()[1:]]
    scores = {image_id: float(p) for image_id, p in lines}
    for row in by_sex["groups"]:
        ids = [i for i in test if source.attributes(i)["sex"] == row["group"]]
        expected = roc_auc_score([source.label(i) for i in ids], [scores[i] for i in ids])
        assert row["value"] == pytest.approx(expected, abs=1e-6)
        assert row["ci"]["low"] <= row["value"] <= row["ci"]["high"]
    assert by_sex["groups"][0]["value"] == 1.0  # the planted gap: perfect for women
    gap = by_sex["gap"]
    assert (gap["high"], gap["low"]) == ("F", "M") and gap["ci"]["low"] > 0


def test_score_by_sex_gives_the_records_subgroups(ran, capsys):
    root, _, results, predictions = ran
    (record,) = load_records(results)
    assert main(["score", "--task", "rsna_zs", "--predictions", str(predictions), "--data-root", str(root),
                 "--by", "sex", "--age-bins", "50", "--json", *FAST]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert _rounded(scored["subgroups"]) == record["subgroups"]  # records keep 6 decimals


def _rounded(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return [_rounded(item) for item in value] if isinstance(value, list) else value


def test_table_and_plot_by_sex_and_the_leaderboard_section(ran, tmp_path, capsys):
    _, _, results, _ = ran
    assert main(["table", "--results", str(results), "--by", "sex"]) == 0
    table = capsys.readouterr().out
    (record,) = load_records(results)
    header, rule, row, *_ = table.splitlines()
    assert "| F " in header and "Gap (best − worst)" in header
    by_sex = record["subgroups"]["sex"]
    first = by_sex["groups"][0]
    shown = f"{first['value'] * 100:.1f} [{first['ci']['low'] * 100:.1f}, {first['ci']['high'] * 100:.1f}]" \
        if first["value"] is not None else "n/a [1]"
    assert shown in row and f"(n={first['n']})" in row
    if by_sex["gap"] is not None:
        assert f"{by_sex['gap']['value'] * 100:.1f}" in row

    assert main(["plot", "--results", str(results), "--out", str(tmp_path), "--by", "sex", "--format", "svg"]) == 0
    (figure,) = tmp_path.glob("rsna_zs.*.by_sex.svg")
    assert figure.stat().st_size > 1000
    assert "By sex" in leaderboard_section([record]) and leaderboard_section([{**record, "subgroups": {}}]) == ""

    with pytest.raises(ConfigError, match="no site attribute"):
        api.run(BrightClip.name, "rsna_zs", 1.0, data_root=ran[0], results=tmp_path, by=["site"], device="cpu")


def test_old_records_without_subgroups_load_and_tabulate(make):
    old = make("m", 0.8)
    assert "subgroups" not in old
    assert "| m " in render_table([old])
    with pytest.raises(DataError, match="no record holds subgroup results for sex"):
        subgroup_table([old], "sex")
