"""`table --ledger` and the leaderboard's ledger section on hand-written records and the planted ledger
(tests/conftest.py): every verdict's mark in Markdown, LaTeX and HTML, the sources and reasons as footnotes,
a row per released checkpoint that the records measure."""

from __future__ import annotations

import re

import pytest

from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.ledger import load_ledger
from vlpbench.report.ledger_table import ledger_grid, render_ledger
from vlpbench.report.leaderboard import leaderboard_html
from vlpbench.report.verdicts import checkpoint_rows
from vlpbench.results import write_record

MGCA = "c" * 64
# Dice per seed and the bootstrap half-width: reproduced (1 %), below (10 %), above (100 %); see
# tests/test_reproduce.py for the CIs worked out by hand.
PLAN = {0.01: ([0.49, 0.50, 0.51], 0.02), 0.1: ([0.50, 0.52, 0.54], 0.02), 1.0: ([0.70, 0.71, 0.72], 0.01)}


@pytest.fixture
def measured(tmp_path, planted_ledger, ledger_record):
    """(results folder, ledger folder): MGCA's three SIIM fractions × 3 seeds, and one G2D seed of the user's
    ``mine_encoder.pth`` (0.626 ± 0.02: reproduces G2D's 62.6)."""
    folder = tmp_path / "results"
    for frac, (values, half) in PLAN.items():
        for seed, value in enumerate(values):
            write_record(ledger_record(value, seed, frac=frac, half=half, sha256=MGCA), folder)
    write_record(ledger_record(0.626, 0, sha256="d" * 64, name="g2d", adapter="g2d", path="mine_encoder.pth"), folder)
    return folder, planted_ledger()


def _cells(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_markdown_gives_each_cell_reported_measured_and_its_mark(measured, capsys):
    results, ledger = measured
    assert main(["table", "--ledger", "--results", str(results), "--reference", str(ledger)]) == 0
    out = capsys.readouterr().out
    head = [cell.strip() for cell in out.splitlines()[0].strip("|").split("|")]
    assert head == ["Model (checkpoint)", "siim_seg 1%", "siim_seg 10%", "siim_seg 100%", "rsna_seg 1%",
                    "rsna_seg 10%"]
    # 1 %: 50.0 reproduces 49.7; 10 %: 52.0 below 59.3; 100 %: 71.0 above 64.2 and, against Table 2's 70.1 (a
    # setting no profile reproduces), not comparable; RSNA has no record: not run at 1 %, not comparable at 10 %.
    assert _cells(out, "mgca (resnet_50.ckpt)") == [
        "49.7 / 50.0 ✓ [1]", "59.3 / 52.0 ↓ [1]", "64.2 / 71.0 ↑ [1]; 70.1 / 71.0 ≁ [2] (a)", "63.0 / – [1]",
        "68.0 / – ≁ [2] (a)"]
    assert _cells(out, "g2d ({name}_encoder.pth)") == ["62.6 / 62.6 ✓ [1]", "·", "·", "·", "·"]
    assert "[1] Paper P, Table 1 (https://example.org/p)" in out and "[2] Paper P, Table 2" in out
    assert "(a) not comparable: a 640 px UperNet" in out
    assert "g2d ({name}_encoder.pth): the authors published no weights (nobody: no weights)" in out
    assert f"mgca (resnet_50.ckpt): measured by the records of checkpoint sha256 {MGCA}." in out
    # third-party values are reproduce's, not the paper table's
    assert "48.1" not in out and "issue #3" not in out


def test_latex_and_html_render_every_mark(measured):
    results, ledger = measured
    from vlpbench.results import load_records

    rows = checkpoint_rows(load_ledger(ledger), load_records(results))
    latex = render_ledger(rows, "latex")
    assert "\\providecommand{\\vlpReproduced}{\\ensuremath{\\surd}}" in latex
    row = next(line for line in latex.splitlines() if line.startswith("mgca (resnet\\_50.ckpt)"))
    assert row == ("mgca (resnet\\_50.ckpt) & 49.7 / 50.0 \\vlpReproduced{}\\textsuperscript{1} & 59.3 / 52.0 "
                   "\\vlpBelow{}\\textsuperscript{1} & 64.2 / 71.0 \\vlpAbove{}\\textsuperscript{1}; 70.1 / 71.0 "
                   "\\vlpNotComparable{}\\textsuperscript{2}\\textsuperscript{a} & 63.0 / \\vlpNotRun{}"
                   "\\textsuperscript{1} & 68.0 / \\vlpNotRun{} \\vlpNotComparable{}\\textsuperscript{2}"
                   "\\textsuperscript{a} \\\\")
    assert "\\textsuperscript{a} not comparable: a 640 px UperNet\\par}" in latex
    # no mark left as a raw character a pdflatex font may lack; the legend uses the commands too
    assert not re.search("[✓↓↑≁–·]", latex)
    assert "\\vlpNotComparable{} not comparable" in latex

    html = render_ledger(rows, "html")
    for kind, mark in (("reproduced", "✓"), ("below", "↓"), ("above", "↑"), ("not-comparable", "≁")):
        assert f'<span class="verdict {kind}">{mark}</span>' in html
    assert '<td title="not run; Paper P, Table 1, row MGCA">63.0 / <span class="verdict not-run">–</span>' \
           '<sup>1</sup></td>' in html
    assert "measured 50.00 ± 1.00 over 3 seed(s), 95% CI 47.70–52.30" in html
    assert "<sup>a</sup> not comparable: a 640 px UperNet" in html
    assert "g2d ({name}_encoder.pth)" in html


def test_models_show_their_published_cells_without_records(tmp_path, planted_ledger, capsys):
    ledger = planted_ledger()
    assert main(["table", "--ledger", "--models", "g2d", "--results", str(tmp_path / "none"), "--reference",
                 str(ledger)]) == 0
    assert _cells(capsys.readouterr().out, "g2d") == ["62.6 / – [1]"]
    assert main(["table", "--ledger", "--models", "medklip", "--results", str(tmp_path), "--reference",
                 str(ledger)]) == 2
    assert "--models medklip: no ledger cell; the ledger's models are mgca, g2d" in capsys.readouterr().err


def test_ledger_table_options_are_checked(measured, capsys):
    results, ledger = measured
    base = ["table", "--ledger", "--results", str(results), "--reference", str(ledger)]
    assert main([*base, "--format", "csv"]) == 2
    assert "table --ledger writes md, latex, html" in capsys.readouterr().err
    assert main([*base, "--tasks", "siim_seg"]) == 2
    assert "table --ledger takes --models, --format and --reference only" in capsys.readouterr().err


def test_no_measured_cell_is_an_error_naming_the_way_out(tmp_path, planted_ledger, ledger_record):
    # a canonical-profile record (the ledger's cells are paper) measures nothing
    record = ledger_record(0.5, 0)
    record["task"]["profile"] = "canonical"
    with pytest.raises(ConfigError, match="no result record measures a ledger cell: run `vlpbench reproduce`"):
        ledger_grid(checkpoint_rows(load_ledger(planted_ledger()), [record]))


def test_the_leaderboard_has_a_ledger_section_when_records_measure_cells(measured, ledger_record):
    results, ledger = measured
    from vlpbench.results import load_records

    cells = load_ledger(ledger)
    page = leaderboard_html(load_records(results), plots=False, ledger=cells)
    section = page[page.index('<section id="ledger">'):]
    assert '<a href="#ledger">Reproduction ledger</a>' in page and "<h2>Reproduction ledger</h2>" in section
    assert '<span class="verdict below">↓</span>' in section and "mgca (resnet_50.ckpt)" in section
    unmeasured = ledger_record(0.5, 0, task="rsna_seg", adapter="random", name="random")
    assert "Reproduction ledger" not in leaderboard_html([unmeasured], plots=False, ledger=cells)
    # records of one cell from two task versions: the section says why, the rest of the page stays
    other = ledger_record(0.5, 1)
    other["task"]["version"] = 2
    page = leaderboard_html([ledger_record(0.5, 0), other], plots=False, ledger=cells)
    assert "The ledger table cannot be built: the records of mgca siim_seg frac 0.01 (paper) come from several " \
           "task versions" in page and "<h2>Segmentation</h2>" in page
