"""`compare` verdicts on constructed results (numbers worked out in the comments), exit codes, JUnit
XML, per-task tolerances, and `baseline update`."""

from __future__ import annotations

import dataclasses
from xml.etree import ElementTree

import numpy as np
import pytest

from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.report.compare import (IMPROVEMENT, NEW, NOT_COMPARABLE, REGRESSION, WITHIN, compare_records,
                                     exit_code, junit_xml, markdown_summary, task_tolerance)
from vlpbench.results import load_records, write_record

from .conftest import SPLIT_B, with_former_names


def _seeds(make, model, values, **kwargs):
    return [make(model, v, seed=s, **kwargs) for s, v in enumerate(values)]


def _verdicts(comparisons):
    return {(c.task, c.frac): c.verdict for c in comparisons}


def test_seed_rule_uses_max_of_abs_tol_and_k_pooled_std(make):
    # Baseline 0.60/0.62/0.64: mean 0.62, std 0.02 at every fraction.
    base = [r for f in (0.01, 0.1, 1.0) for r in _seeds(make, "g2d", [0.60, 0.62, 0.64], frac=f)]
    cand = (_seeds(make, "g2d-new", [0.55, 0.57, 0.59], frac=0.01)    # -0.05; pooled 0.02 → allowed 0.04: regression
            + _seeds(make, "g2d-new", [0.59, 0.60, 0.61], frac=0.1)   # -0.02; pooled sqrt((2·4e-4 + 2·1e-4)/4) = 0.0158 → 0.0316: within
            + _seeds(make, "g2d-new", [0.66, 0.68, 0.70], frac=1.0))  # +0.06 > 0.04: improvement
    comparisons = compare_records(base, cand)
    assert _verdicts(comparisons) == {("siim_seg", 0.01): REGRESSION, ("siim_seg", 0.1): WITHIN,
                                      ("siim_seg", 1.0): IMPROVEMENT}
    by_frac = {c.frac: c for c in comparisons}
    assert by_frac[0.01].delta == pytest.approx(-0.05) and by_frac[0.01].allowed == pytest.approx(0.04)
    assert by_frac[0.1].allowed == pytest.approx(2 * np.sqrt((2 * 4e-4 + 2 * 1e-4) / 4))
    assert exit_code(comparisons) == 1
    # A large abs_tol dominates the seed spread.
    assert _verdicts(compare_records(base, cand, abs_tol=0.1)) == dict.fromkeys(_verdicts(comparisons), WITHIN)


def test_lower_is_better_flips_the_sign(make, error_metric):
    base = _seeds(make, "m", [0.20, 0.21, 0.22], primary=error_metric)
    worse = _seeds(make, "m", [0.30, 0.31, 0.32], primary=error_metric)  # +0.10 on an error metric: worse
    better = _seeds(make, "m", [0.10, 0.11, 0.12], primary=error_metric)
    assert compare_records(base, worse)[0].verdict == REGRESSION
    assert compare_records(base, better)[0].verdict == IMPROVEMENT


def test_directions_come_from_the_metric_spec_not_the_record(make):
    # Dice is higher-is-better whatever a record's task says: 0.60 → 0.50 is a regression.
    base, cand = make("m", 0.60), make("m", 0.50)
    base["task"]["higher_is_better"] = cand["task"]["higher_is_better"] = False
    result = compare_records([base], [cand])[0]
    assert result.verdict == REGRESSION and result.baseline.higher_is_better and result.delta == pytest.approx(-0.1)


def test_a_record_under_the_former_metric_name_compares_with_a_current_one(make, tmp_path):
    ids = [f"img{i}" for i in range(40)]
    correct = {i: float(k % 10 != 0) for k, i in enumerate(ids)}  # 36 of 40 right: 0.90
    new = make("m", {"acc": 0.90, "auc": 0.95}, task="covidx_cls", primary="acc", ci=0.02, per_image=correct)
    write_record(with_former_names(new, {"acc": "accuracy"}), tmp_path / "old")
    old = load_records(tmp_path / "old")
    assert old[0]["primary_metric"] == "accuracy"  # the file keeps what was written
    candidate = make("m", {"acc": 0.85, "auc": 0.95}, task="covidx_cls", primary="acc")
    result = compare_records(old, [candidate])[0]
    assert (result.baseline.metric, result.candidate.metric) == ("acc", "acc")
    assert result.verdict == REGRESSION and result.delta == pytest.approx(-0.05)
    assert "| covidx_cls | 1% | ACC ↑ | 0.9000 (n=1) | 0.8500 (n=1) | −0.0500 |" in markdown_summary([result])
    assert compare_records(old, [new])[0].verdict == WITHIN


def test_a_metric_that_is_not_a_mean_of_per_image_scores_is_never_paired(make):
    scores = {f"img{i}": 1.0 for i in range(50)}
    base = make("m", 0.80, task="chexpert_cls", per_image=scores)
    result = compare_records([base], [make("m", 0.795, task="chexpert_cls", per_image=scores)])[0]
    assert result.verdict == WITHIN and result.rule == "abs_tol 0.01"
    assert "auc is not a mean of per-image scores: abs_tol rule" in result.notes


def test_single_seeds_without_per_image_scores_use_abs_tol(make):
    base = [make("m", 0.600)]
    assert compare_records(base, [make("m", 0.585)])[0].verdict == REGRESSION  # -0.015 < -0.01
    within = compare_records(base, [make("m", 0.595)])[0]
    assert within.verdict == WITHIN and "no per-image scores on both sides: abs_tol rule" in within.notes


def test_paired_bootstrap_over_per_image_scores(make):
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(200)]
    base_scores = rng.uniform(0.3, 0.9, size=200)
    base = [make("m", float(base_scores.mean()), per_image=dict(zip(ids, base_scores)))]

    def candidate(shift, noise):
        scores = base_scores + shift + rng.normal(0, noise, size=200)
        return [make("m", float(scores.mean()), per_image=dict(zip(ids, scores)))], scores

    # A consistent drop of 0.03 per image: mean gain ≈ -0.03 < -0.01 and the upper bound is far below 0.
    drop, scores = candidate(-0.03, 0.01)
    result = compare_records(base, drop)[0]
    gains = scores - base_scores
    assert result.verdict == REGRESSION and f"mean gain {gains.mean():+.4f}" in result.rule
    # The same mean drop with huge per-image noise: the abs_tol rule alone would flag it, the paired
    # interval (SE ≈ 0.5/√200 ≈ 0.035) contains 0, so it is within tolerance.
    noisy, scores = candidate(-0.02, 0.5)
    assert (scores - base_scores).mean() < -0.01 and compare_records(base, noisy)[0].verdict == WITHIN
    # A significant but tiny drop (0.005 < abs_tol) is within tolerance; a clear gain is an improvement.
    assert compare_records(base, candidate(-0.005, 0.001)[0])[0].verdict == WITHIN
    assert compare_records(base, candidate(0.04, 0.01)[0])[0].verdict == IMPROVEMENT
    # Different image sets: no pairing, the abs_tol rule decides (-0.03 → regression).
    other = [make("m", float(base_scores.mean()) - 0.03,
                  per_image={f"x{i}": float(score) - 0.03 for i, score in enumerate(base_scores)})]
    fallback = compare_records(base, other)[0]
    assert fallback.verdict == REGRESSION and "per-image scores cover different images: abs_tol rule" in fallback.notes


def test_cells_that_are_not_comparable_and_new_cells(make):
    base = [make("m", 0.6), make("m", 0.6, frac=0.1), make("m", 0.6, frac=1.0), make("m", 0.6, task="rsna_seg"),
            make("m", 0.6, task="rsna_det")]
    cand = [make("m", 0.6, version=2), make("m", 0.6, frac=0.1, split=SPLIT_B),
            make("m", 0.6, frac=1.0, overrides={"lr": 0.01}), make("m", 0.6, task="chexpert_cls"),
            make("m", 0.6, task="rsna_det"), make("other", 0.6, task="rsna_det", seed=0, sha="d" * 64)]
    comparisons = {(c.task, c.frac): c for c in compare_records(base, cand)}
    assert comparisons["siim_seg", 0.01].notes == ["task version v1 (baseline) vs v2 (candidate)"]
    assert comparisons["siim_seg", 0.1].notes == ["split sha256 aaaaaaaa (baseline) vs bbbbbbbb (candidate)"]
    assert comparisons["siim_seg", 1.0].notes == ['task overrides {} (baseline) vs {"lr": 0.01} (candidate)']
    assert comparisons["rsna_seg", 0.01].notes == ["the baseline has this cell and the candidate does not"]
    assert "the candidate holds 2 cells for it (m, task v1" in comparisons["rsna_det", 0.01].notes[0]
    assert comparisons["chexpert_cls", 0.01].verdict == NEW
    assert {c.verdict for key, c in comparisons.items() if key[0] != "chexpert_cls"} == {NOT_COMPARABLE}
    assert exit_code(list(comparisons.values())) == 2
    # A regression elsewhere decides the exit code: 1.
    regressed = compare_records(base + [make("m", 0.6, task="cxr14_ft")], cand + [make("m", 0.5, task="cxr14_ft")])
    assert exit_code(regressed) == 1
    assert exit_code(compare_records([make("m", 0.6)], [make("m", 0.6), make("m", 0.6, task="rsna_seg")])) == 0
    # A test set derived from the user's files (CheXpert valid.csv) must be the same one.
    derived = make("m", 0.6, task="chexpert_zs", frac=1.0)
    derived["split"]["test_sha256"] = "f" * 64
    other = compare_records([make("m", 0.6, task="chexpert_zs", frac=1.0)], [derived])[0]
    assert other.notes == ["test set sha256 None (baseline) vs ffffffff (candidate)"]


def test_task_yaml_tolerances_override_the_defaults(make, monkeypatch):
    import vlpbench.tasks as tasks

    shipped = tasks.load_task("siim_seg")
    spec = {"siim_seg": {"abs_tol": {0.01: 0.05, 1.0: 0.002}, "k": 3, "rationale": "1% runs vary a lot"}}
    monkeypatch.setattr(tasks, "load_task", lambda name: dataclasses.replace(shipped, compare=spec[name]))
    assert (task_tolerance("siim_seg", 0.01).abs_tol, task_tolerance("siim_seg", 0.01).k) == (0.05, 3.0)
    assert task_tolerance("siim_seg", 0.1).abs_tol == 0.01  # no entry for 10%: the default
    assert task_tolerance("siim_seg", 0.01, abs_tol=0.2).abs_tol == 0.2
    # -0.03 with single seeds: within the 1% tolerance (0.05), a regression at 100% (0.002).
    verdicts = _verdicts(compare_records([make("m", 0.6), make("m", 0.6, frac=1.0)],
                                         [make("m", 0.57), make("m", 0.57, frac=1.0)]))
    assert verdicts == {("siim_seg", 0.01): WITHIN, ("siim_seg", 1.0): REGRESSION}
    spec["siim_seg"] = {"abs_tol": -1}
    with pytest.raises(ConfigError, match="siim_seg.yaml: compare.abs_tol: expected a number >= 0, got -1"):
        task_tolerance("siim_seg", 0.01)
    spec["siim_seg"] = {"tolerance": 1}
    with pytest.raises(ConfigError, match="compare.tolerance: unknown key"):
        task_tolerance("siim_seg", 0.01)


def test_every_shipped_task_compare_mapping_is_valid():
    from vlpbench.tasks import load_task, task_names

    for name in task_names():
        for frac in load_task(name).fractions:
            assert task_tolerance(name, frac).abs_tol >= 0


def test_markdown_and_junit_reports(make):
    base = _seeds(make, "g2d", [0.60, 0.62, 0.64]) + [make("g2d", 0.6, task="rsna_seg")]
    cand = _seeds(make, "g2d", [0.55, 0.57, 0.59]) + [make("g2d", 0.6, task="rsna_seg", version=2),
                                                      make("g2d", 0.7, task="rsna_det")]
    comparisons = compare_records(base, cand)
    text = markdown_summary(comparisons, baseline="base/", candidate="cand/")
    assert ("| siim_seg | 1% | Dice ↑ | 0.6200 ± 0.0200 (n=3) | 0.5700 ± 0.0200 (n=3) | −0.0500 | 0.0400 | "
            "**regression** |") in text
    assert "1 regression, 1 not comparable, 0 improvement, 0 within tolerance, 1 new → exit 1" in text
    suite = ElementTree.fromstring(junit_xml(comparisons)).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("3", "1", "1", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["siim_seg 1% dice"].find("failure").get("type") == "regression"
    assert "task version v1 (baseline) vs v2 (candidate)" in cases["rsna_seg 1% dice"].find("error").get("message")
    assert cases["rsna_det 1% map"].find("skipped") is not None


def test_cli_compare_exit_codes_and_baseline_update(make, tmp_path, capsys):
    base, cand = tmp_path / "base", tmp_path / "cand"
    for record in _seeds(make, "g2d", [0.60, 0.62, 0.64]):
        write_record(record, base)
    for record in _seeds(make, "g2d", [0.61, 0.62, 0.63], sha="e" * 64):
        write_record(record, cand)
    assert main(["compare", "--baseline", str(base), "--candidate", str(cand)]) == 0
    assert "0 regression, 0 not comparable, 0 improvement, 1 within tolerance, 0 new → exit 0" in capsys.readouterr().out
    single = next((cand / "runs").rglob("*seed0.json"))
    junit = tmp_path / "ci" / "report.xml"
    # One seed 0.61 against 0.62 ± 0.02: with k = 0 the allowed drop is abs_tol 0.001 < 0.01, a regression.
    assert main(["compare", "--baseline", str(base), "--candidate", str(single), "--abs-tol", "0.001",
                 "--k", "0", "--junit", str(junit)]) == 1
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    capsys.readouterr()

    # baseline update: the first copy writes, a rerun changes nothing, another checkpoint needs --force.
    baselines = tmp_path / "baselines"
    assert main(["baseline", "update", "--results", str(base), "--baseline-dir", str(baselines)]) == 0
    assert "wrote 3 record(s), 0 unchanged, 0 replaced" in capsys.readouterr().out
    assert main(["baseline", "update", "--results", str(base), "--baseline-dir", str(baselines)]) == 0
    assert "wrote 0 record(s), 3 unchanged, 0 replaced" in capsys.readouterr().out
    assert main(["baseline", "update", "--results", str(cand), "--baseline-dir", str(baselines)]) == 2
    assert "3 baseline record(s) would be replaced; nothing was written. Pass --force" in capsys.readouterr().err
    assert {r["model"]["checkpoint"]["sha256"][0] for r in load_records(baselines)} == {"c"}
    assert main(["baseline", "update", "--results", str(cand), "--baseline-dir", str(baselines), "--force"]) == 0
    assert "wrote 3 record(s), 0 unchanged, 3 replaced" in capsys.readouterr().out
    assert {r["model"]["checkpoint"]["sha256"][0] for r in load_records(baselines)} == {"e"}
    assert len(list(baselines.rglob("*.json.bak"))) == 3
    assert main(["compare", "--baseline", str(baselines), "--candidate", str(cand)]) == 0
    assert main(["compare", "--baseline", str(tmp_path / "nothing"), "--candidate", str(cand)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _paper(record):
    record["task"]["profile"] = "paper"
    return record


def test_cli_table_formats_filters_and_reference_rows(make, tmp_path, capsys):
    for record in [_paper(make("g2d", 0.64)), _paper(make("mgca", 0.5)),
                   make("g2d", 0.70, task="chexpert_cls", frac=1.0)]:
        write_record(record, tmp_path)
    assert main(["table", "--results", str(tmp_path), "--group", "seg", "--reference"]) == 0
    out = capsys.readouterr().out
    assert "| *G2D (encoder)*† |" in out and "62.6" in out and "chexpert_cls" not in out
    assert "**64.0**" in out  # the reported 65.6 of "G2D (enc+dec)" does not take "best"
    assert "g2d [paper]" in out and "Profile paper:" in out
    # the published rows were computed with the paper profile: never beside canonical records
    assert main(["table", "--results", str(tmp_path), "--group", "cls", "--reference"]) == 0
    out = capsys.readouterr().out
    assert "†" not in out.split("\n\n")[0] and "shown only beside records of that profile" in out
    assert main(["table", "--results", str(tmp_path), "--tasks", "chexpert_cls", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("g2d,false,,chexpert_cls,1,chexpert,v1,")
    assert main(["table", "--results", str(tmp_path), "--format", "latex", "--fracs", "1%"]) == 0
    assert "\\toprule" in capsys.readouterr().out
    assert main(["table", "--results", str(tmp_path), "--models", "medklip"]) == 2
    assert "--models medklip: no such result record" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["compare", "baseline"])
def test_help_gives_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and f"example:\n  vlpbench {name}" in capsys.readouterr().out
