"""`compare --against-ledger` on hand-written records and the planted ledger (tests/conftest.py): a cell that
reproduced its published value on the baseline and no longer does on the candidate is a regression (exit 1, a
failing JUnit testcase of its own) even where the usual comparison finds the change within tolerance."""

from __future__ import annotations

from xml.etree import ElementTree

from vlpbench.cli import main
from vlpbench.ledger import load_ledger
from vlpbench.report.compare import compare_records, exit_code, junit_xml
from vlpbench.report.compare_ledger import PASS, REGRESSION, REPORTED, ledger_changes
from vlpbench.results import write_record


def _side(folder, ledger_record, plan):
    """Write MGCA records of ``plan`` ({fraction: (Dice per seed, bootstrap half-width)}) under ``folder``."""
    records = []
    for frac, (values, half) in plan.items():
        for seed, value in enumerate(values):
            records.append(ledger_record(value, seed, frac=frac, half=half))
            write_record(records[-1], folder)
    return records


# 1 %: the baseline's mean 0.50 ± √(0.005² + (1.96 · 0.01 / √3)²) = ± 0.01237 holds 49.7; the candidate's 0.482
# (CI up to 0.49437) no longer does. The usual rule: gain −0.018, allowed max(0.01, 2 × 0.01) = 0.02, within.
# 10 %: 0.593 on both sides (CI ± 0.0106), which holds 59.3.
BASELINE = {0.01: ([0.49, 0.50, 0.51], 0.005), 0.1: ([0.590, 0.593, 0.596], 0.01)}
CANDIDATE = {0.01: ([0.472, 0.482, 0.492], 0.005), 0.1: ([0.590, 0.593, 0.596], 0.01)}


def test_a_cell_that_stops_reproducing_fails_its_own_testcase(tmp_path, planted_ledger, ledger_record, capsys):
    ledger = planted_ledger()
    _side(tmp_path / "base", ledger_record, BASELINE)
    _side(tmp_path / "cand", ledger_record, CANDIDATE)
    argv = ["compare", "--baseline", str(tmp_path / "base"), "--candidate", str(tmp_path / "cand")]
    assert main(argv) == 0  # the usual comparison: within tolerance
    capsys.readouterr()
    junit = tmp_path / "report.xml"
    assert main([*argv, "--against-ledger", "--reference", str(ledger), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "0 new, 1 ledger regression → exit 1" in out and "### Reproduction ledger" in out
    # the candidate's CI ends at 0.482 + 0.01237 = 0.49437, under 0.497 by 0.00263 / 0.02475 = 0.11 CI widths
    assert "| mgca siim_seg 1% dice [Paper P, Table 1, row MGCA] | 49.7 | Table 1, row MGCA | 50.00 | 48.20 | " \
           "**regression**: baseline reproduced; candidate below by 0.11 CI widths |" in out
    assert "1 regression, 2 pass, 0 reported (ledger cells)" in out

    suite = ElementTree.parse(junit).getroot().find("testsuite")
    cases = {case.get("name"): case for case in suite.iter("testcase") if case.get("name").startswith("ledger: ")}
    published = cases["ledger: mgca siim_seg 1% dice [Paper P, Table 1, row MGCA]"]
    assert published.find("failure").get("message") == ("no longer reproduces the published value: baseline "
                                                          "reproduced; candidate below by 0.11 CI widths")
    assert cases["ledger: mgca siim_seg 10% dice"].find("failure") is None
    # the thread's 48.1 lies above the baseline's CI and in the candidate's: reproduced on the candidate, a pass
    thread = cases["ledger: mgca siim_seg 1% dice [HKU-MedAI/MGCA issue #3, first comment, row a user]"]
    assert thread.find("failure") is None and thread.find("skipped") is None
    assert suite.get("failures") == "1" and suite.get("tests") == str(2 + 3)  # two (task, fraction) cells


def test_ledger_regression_outranks_not_comparable_and_other_cells_are_reported(planted_ledger, ledger_record):
    cells = load_ledger(planted_ledger())
    base = [ledger_record(v, s, frac=f, half=h) for f, (values, h) in BASELINE.items() for s, v in enumerate(values)]
    # the candidate drops 10 % (not comparable in the usual comparison) and keeps 1 % below
    cand = [ledger_record(v, s, half=0.005) for s, v in enumerate(CANDIDATE[0.01][0])]
    changes = ledger_changes(cells, base, cand)
    assert [(c.name, c.status) for c in changes] == [
        ("ledger: mgca siim_seg 1% dice [Paper P, Table 1, row MGCA]", REGRESSION),
        ("ledger: mgca siim_seg 10% dice", REPORTED),
        ("ledger: mgca siim_seg 1% dice [HKU-MedAI/MGCA issue #3, first comment, row a user]", PASS)]
    assert changes[1].note == "baseline reproduced; candidate not run"
    comparisons = compare_records(base, cand)
    assert exit_code(comparisons) == 2 and exit_code(comparisons, ledger=changes) == 1
    suite = ElementTree.fromstring(junit_xml(comparisons, ledger=changes)).find("testsuite")
    skipped = [case.get("name") for case in suite.iter("testcase") if case.find("skipped") is not None]
    assert skipped == ["ledger: mgca siim_seg 10% dice"]
    # --tasks / --fracs keep the ledger cells they name
    assert [c.cell.frac for c in ledger_changes(cells, base, cand, fracs=[0.1])] == [0.1]
