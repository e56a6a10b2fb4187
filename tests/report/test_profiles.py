"""Records of two protocol profiles never share a table cell, a plot or a comparison."""

import json

import pytest

from vlpbench.cli import main
from vlpbench.errors import ConfigError, DataError
from vlpbench.report.compare import NOT_COMPARABLE, WITHIN, compare_records
from vlpbench.report.reference import ReferenceRow
from vlpbench.report.table import build_table, build_tables, render_table
from vlpbench.results import load_record, record_path, write_record


def _paper(record):
    record["task"]["profile"] = "paper"
    return record


def test_a_canonical_and_a_paper_record_of_one_model_give_two_rows_never_one_cell(make):
    records = [make("g2d", 0.60), _paper(make("g2d", 0.70))]
    tables = build_tables(records)
    assert [profile for profile, _ in tables] == ["canonical", "paper"]
    rows = [(profile, row.label, [cell.mean for cell in row.cells.values()]) for profile, grid in tables
            for row in grid.rows]
    assert rows == [("canonical", "g2d", [pytest.approx(0.60)]), ("paper", "g2d [paper]", [pytest.approx(0.70)])]
    text = render_table(records)
    assert "**Profile: canonical**" in text and "**Profile: paper**" in text
    assert text.index("| g2d ") < text.index("**Profile: paper**") < text.index("| g2d [paper]")
    lines = render_table(records, "csv").splitlines()
    assert lines[0].endswith(",profile") and len(lines) == 3
    assert lines[1].startswith("g2d,false,") and lines[1].endswith(",canonical")
    assert lines[2].startswith("g2d [paper],false,") and lines[2].endswith(",paper")
    # one profile picked: one table, no heading
    assert "Profile: canonical" not in render_table(records, profile="paper")
    with pytest.raises(ConfigError, match="span the profiles canonical, paper"):
        build_table(records)
    with pytest.raises(ConfigError, match="--profile paper: no such result record"):
        build_table([make("g2d", 0.6)], profile="paper")


def test_the_two_profiles_of_one_run_have_their_own_record_files(make, tmp_path):
    canonical, paper = make("g2d", 0.60), _paper(make("g2d", 0.70))
    assert record_path(tmp_path, canonical).parent.name == "siim_seg.v1"
    assert record_path(tmp_path, paper).parent.name == "siim_seg.v1-paper"
    write_record(canonical, tmp_path)
    write_record(paper, tmp_path)  # does not replace the canonical record
    assert load_record(record_path(tmp_path, paper))["task"]["profile"] == "paper"


def test_a_record_with_an_unknown_profile_is_refused(make, tmp_path):
    path = write_record(make("g2d", 0.6), tmp_path)
    record = json.loads(path.read_text())
    record["task"]["profile"] = "legacy"
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match="invalid key 'task.profile': expected one of canonical, paper"):
        load_record(path)


def test_published_rows_show_only_beside_records_of_their_profile(make):
    published = ReferenceRow("G2D", "A paper", {("siim_seg", 0.01, "dice"): 0.626},
                             {("siim_seg", 0.01, "dice"): "Table 1"}, profile="paper")
    canonical = build_table([make("g2d", 0.60)], references=[published])
    assert [row.label for row in canonical.rows] == ["g2d"]
    assert any("shown only beside records of that profile" in note for note in canonical.provenance)
    paper = build_table([_paper(make("g2d", 0.60))], references=[published])
    assert [row.label for row in paper.rows] == ["G2D", "g2d [paper]"]
    assert any(note.startswith("Profile paper:") for note in paper.provenance)
    # ... and only in the columns of their own metric
    other_metric = ReferenceRow("G2D", "A paper", {("siim_seg", 0.01, "dice_positive"): 0.5},
                                {("siim_seg", 0.01, "dice_positive"): "Table 1"}, profile="paper")
    assert [row.label for row in build_table([_paper(make("g2d", 0.6))], references=[other_metric]).rows] == [
        "g2d [paper]"]


def test_compare_across_profiles_is_not_comparable(make, tmp_path, capsys):
    base, cand = make("g2d", 0.60), _paper(make("g2d", 0.60))
    [result] = compare_records([base], [cand])
    assert result.verdict == NOT_COMPARABLE
    assert "protocol profile canonical (baseline) vs paper (candidate)" in result.notes[0]
    for record, side in ((base, "base"), (cand, "cand")):
        write_record(record, tmp_path / side)
    assert main(["compare", "--baseline", str(tmp_path / "base"), "--candidate", str(tmp_path / "cand")]) == 2
    assert "protocol profile canonical" in capsys.readouterr().out
    # both profiles on the candidate side: --profile picks the one to compare
    write_record(make("g2d", 0.605), tmp_path / "cand")
    [mixed] = compare_records([base], [make("g2d", 0.605), cand])
    assert mixed.verdict == NOT_COMPARABLE and "profile paper" in mixed.notes[0]
    assert main(["compare", "--baseline", str(tmp_path / "base"), "--candidate", str(tmp_path / "cand"),
                 "--profile", "canonical"]) == 0
    [picked] = compare_records([base], [make("g2d", 0.605), cand], profile="canonical")
    assert picked.verdict == WITHIN


def test_plots_draw_each_profile_apart(make, tmp_path):
    from vlpbench.report.plots import curves_by_column, fraction_curves

    records = [make("g2d", 0.6, frac=f) for f in (0.01, 0.1)] + [_paper(make("g2d", 0.7, frac=f)) for f in (0.01, 0.1)]
    columns = curves_by_column(fraction_curves(records))
    assert len(columns) == 2
    stems = sorted(stem for stem, _ in columns)
    assert stems[1].endswith(".paper") and not stems[0].endswith(".paper")
    labels = {curve.task_label for _, group in columns for curve in group}
    assert labels == {"siim_seg", "siim_seg [paper profile]"}


def test_leaderboard_gives_each_profile_its_own_table(make):
    from vlpbench.report.leaderboard import leaderboard_html

    html = leaderboard_html([make("g2d", 0.6), _paper(make("g2d", 0.7))], plots=False)
    assert "<h3>Profile: canonical</h3>" in html and "<h3>Profile: paper</h3>" in html
    assert 'id="table-seg-paper"' in html and 'id="table-seg"' in html
