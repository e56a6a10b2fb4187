"""Leaderboard tables: numbers worked out by hand, bolding, and what may never share a cell."""

from __future__ import annotations

import csv
import io

import pytest

from vlpbench.errors import ConfigError, DataError
from vlpbench.report.table import build_tables, markdown_table, parse_fraction, select_records, table_rows

SPLIT_A = "a" * 8 + "1" * 56
SPLIT_B = "b" * 8 + "2" * 56


def _record(model: str, value: float, *, seed: int = 0, frac: float = 0.01, task: str = "siim_seg",
            version: int = 1, split: str = SPLIT_A, metric: str = "dice", overrides: dict | None = None,
            synthetic: bool = False, sha: str = "c" * 64) -> dict:
    return {
        "schema": 1,
        "model": {"name": model, "adapter": model, "checkpoint": {"path": "x.pth", "sha256": sha}},
        "task": {"name": task, "version": version},
        "frac": frac, "seed": seed,
        "split": {"dataset": "siim", "version": "v1", "sha256": split},
        "metrics": {metric: value}, "primary_metric": metric,
        "n": {"train": 93, "val": 10, "test": 10},
        "config": {"overrides": overrides or {}},
        "timing": {}, "env": {}, "data": {"synthetic": synthetic}, "created": "2025-01-01T00:00:00+00:00",
    }


def _seeds(model: str, values: list[float], **kwargs) -> list[dict]:
    return [_record(model, v, seed=s, **kwargs) for s, v in enumerate(values)]


def _cells(markdown: str) -> dict[tuple[str, str], str]:
    """{(row label, column header): cell text} of the table part of ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    header, body = split[0], split[2:]  # split[1] is the alignment row
    return {(row[0], header[i]): row[i] for row in body for i in range(1, len(header))}


def test_mean_and_sample_std_over_three_seeds():
    # g2d: 61, 63, 65 → mean 63, deviations -2, 0, 2 → variance (4 + 0 + 4) / 2 = 4 → std 2.
    # mgca: 50, 55, 57 → mean 54, deviations -4, 1, 3 → variance (16 + 1 + 9) / 2 = 13 → std 3.606.
    records = _seeds("g2d", [0.61, 0.63, 0.65]) + _seeds("mgca", [0.50, 0.55, 0.57])
    rows = {r["model"]: r for r in table_rows(records)}
    assert rows["g2d"]["mean"] == pytest.approx(0.63) and rows["g2d"]["std"] == pytest.approx(0.02)
    assert rows["mgca"]["mean"] == pytest.approx(0.54)
    assert rows["mgca"]["std"] == pytest.approx(0.13 ** 0.5 / 10)
    assert (rows["g2d"]["n_seeds"], rows["g2d"]["seeds"], rows["g2d"]["metric"]) == (3, [0, 1, 2], "dice")

    markdown = markdown_table(records)
    cells = _cells(markdown)
    assert cells[("", "siim_seg 1%")] == "Dice ↑"
    assert cells[("g2d", "siim_seg 1%")] == "**63.0 ± 2.0**"
    assert cells[("mgca", "siim_seg 1%")] == "54.0 ± 3.6"
    assert "over 3 seeds" in markdown
    assert f"- siim_seg 1%: task v1; split siim v1, sha256 {SPLIT_A[:12]}" in markdown

    raw = _cells(markdown_table(records, percent=False, decimals=3))
    assert raw[("mgca", "siim_seg 1%")] == "0.540 ± 0.036"


def test_best_follows_the_metric_direction(error_metric):
    records = [_record("a", 0.2, metric=error_metric), _record("b", 0.3, metric=error_metric)]
    cells = _cells(markdown_table(records))
    assert cells[("", "siim_seg 1%")] == "Error ↓"
    assert (cells[("a", "siim_seg 1%")], cells[("b", "siim_seg 1%")]) == ("**20.0**", "30.0")
    # Equal at the printed precision: both are best.
    tied = _cells(markdown_table([_record("a", 0.70001), _record("b", 0.69999)]))
    assert tied[("a", "siim_seg 1%")] == tied[("b", "siim_seg 1%")] == "**70.0**"


def test_versions_and_splits_never_share_a_cell():
    records = (_seeds("g2d", [0.60, 0.62]) + _seeds("g2d", [0.40, 0.42], version=2)
               + _seeds("g2d", [0.20, 0.22], split=SPLIT_B))
    rows = table_rows(records)
    assert sorted((r["version"], r["split_sha256"][:8], round(r["mean"], 6)) for r in rows) == [
        (1, "aaaaaaaa", 0.61), (1, "bbbbbbbb", 0.21), (2, "aaaaaaaa", 0.41)]
    markdown = markdown_table(records)
    cells = _cells(markdown)
    assert cells[("g2d", "siim_seg v1 (aaaaaaaa) 1%")] == "61.0 ± 1.4"
    assert cells[("g2d", "siim_seg v1 (bbbbbbbb) 1%")] == "21.0 ± 1.4"
    assert cells[("g2d", "siim_seg v2 (aaaaaaaa) 1%")] == "41.0 ± 1.4"
    assert f"- siim_seg v2 (aaaaaaaa) 1%: task v2; split siim v1, sha256 {SPLIT_A[:12]}" in markdown
    assert f"- siim_seg v1 (bbbbbbbb) 1%: task v1; split siim v1, sha256 {SPLIT_B[:12]}" in markdown


def test_missing_cells_and_seed_counts():
    records = (_seeds("g2d", [0.60, 0.62, 0.64]) + _seeds("g2d", [0.70, 0.72, 0.74], frac=1.0)
               + [_record("mgca", 0.5)])
    markdown = markdown_table(records)
    cells = _cells(markdown)
    assert cells[("mgca", "siim_seg 100%")] == "–"
    assert cells[("mgca", "siim_seg 1%")] == "50.0 (n=1)"  # one seed: the mean alone
    assert cells[("g2d", "siim_seg 1%")] == "**62.0 ± 2.0** (n=3)"
    assert cells[("g2d", "siim_seg 100%")] == "72.0 ± 2.0 (n=3)"  # alone in its column: not bold
    assert "- siim_seg 1%, 100%: task v1" in markdown


def test_overrides_synthetic_and_checkpoint_labels():
    records = [_record("g2d", 0.6), _record("g2d", 0.3, overrides={"image_size": 64, "epochs": 2}),
               _record("g2d", 0.1, synthetic=True, overrides={"betas": [0.9, 0.99]}),
               _record("mgca", 0.5, sha="d" * 64), _record("mgca", 0.55, sha="e" * 64)]
    assert [r["model"] for r in table_rows(records)] == [
        "g2d", "g2d (betas=[0.9, 0.99]) [synthetic]", "g2d (epochs=2, image_size=64)",
        "mgca @dddddddd", "mgca @eeeeeeee"]  # two checkpoints of one model are never averaged


def test_records_under_the_former_metric_name_fill_the_current_column(make, tmp_path):
    from vlpbench.report.table import render_table
    from vlpbench.results import load_records, write_record

    from .conftest import with_former_names

    old = make("mgca", {"acc": 0.80, "auc": 0.90}, task="covidx_cls", primary="acc", ci=0.02)
    write_record(with_former_names(old, {"acc": "accuracy"}), tmp_path)
    records = load_records(tmp_path) + [make("g2d", {"acc": 0.85, "auc": 0.91}, task="covidx_cls", primary="acc")]
    cells = _cells(markdown_table(records))
    assert (cells[("", "covidx_cls 1%")], cells[("g2d", "covidx_cls 1%")], cells[("mgca", "covidx_cls 1%")]) == (
        "ACC ↑", "**85.0**", "80.0")
    # --metrics takes either name; the CSV names the metric as it is called today, with the old record's CI.
    assert _cells(markdown_table(records, metrics=["accuracy", "auc"])) == _cells(
        markdown_table(records, metrics=["acc", "auc"]))
    lines = {row["model"]: row for row in csv.DictReader(io.StringIO(render_table(records, "csv")))}
    assert [(m, lines[m]["metric"], lines[m]["mean"], lines[m]["ci_low"]) for m in ("g2d", "mgca")] == [
        ("g2d", "acc", "0.85", ""), ("mgca", "acc", "0.8", "0.78")]
    # One metric under both names with different values cannot be read.
    both = with_former_names(old, {})
    both["metrics"]["accuracy"] = 0.5
    with pytest.raises(DataError, match="metrics holds acc under its current and its former name"):
        table_rows([both])


def test_unknown_metric_names_are_errors():
    with pytest.raises(ConfigError, match="--metrics acuracy: unknown metric 'acuracy'"):
        table_rows([_record("g2d", 0.6)], metrics=["acuracy"])
    record = _record("g2d", 0.6, metric="hd95")
    with pytest.raises(DataError, match="the record of g2d, siim_seg v1, frac 0.01, seed 0: unknown metric 'hd95'"):
        table_rows([record])


def test_duplicate_seed_is_an_error():
    with pytest.raises(DataError, match="two records for g2d, siim_seg v1, frac 0.01, seed 0"):
        table_rows([_record("g2d", 0.6), _record("g2d", 0.7)])
    with pytest.raises(DataError, match="no result records"):
        markdown_table([])


def test_second_best_is_underlined_ties_share_a_mark_and_last_is_never_second(make, error_metric):
    records = [make("a", 0.70), make("b", 0.70), make("c", 0.60), make("d", 0.50),
               # lower is better: 20 best, 30 second, 40 worst
               *(make(m, v, task="rsna_seg", primary=error_metric) for m, v in (("a", 0.4), ("b", 0.2), ("c", 0.3))),
               # two distinct values over three entries: the worse one is both second and last, so unmarked
               *(make(m, v, frac=1.0) for m, v in (("a", 0.9), ("b", 0.9), ("c", 0.8)))]
    cells = _cells(markdown_table(records))
    assert [cells[(m, "siim_seg 1%")] for m in "abcd"] == ["**70.0**", "**70.0**", "<u>60.0</u>", "50.0"]
    assert [cells[(m, "rsna_seg 1%")] for m in "abc"] == ["40.0", "**20.0**", "<u>30.0</u>"]
    assert [cells[(m, "siim_seg 100%")] for m in "abc"] == ["**90.0**", "**90.0**", "80.0"]
    assert cells[("d", "rsna_seg 1%")] == cells[("d", "siim_seg 100%")] == "–"


def test_reported_rows_come_first_and_are_never_marked(make):
    from vlpbench.report.reference import ReferenceRow

    paper = ReferenceRow("G2D (encoder)", "A paper", values={("siim_seg", 0.01, "dice"): 0.99},
                         tables={("siim_seg", 0.01, "dice"): "Table 1"}, profile="canonical")
    other = ReferenceRow("Unrelated", "A paper", values={("rsna_det", 0.01, "map"): 0.5},
                         tables={("rsna_det", 0.01, "map"): "Table 1"}, profile="canonical")
    text = markdown_table([make("g2d", 0.6), make("mgca", 0.5)], references=[paper, other])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[3].startswith("| *G2D (encoder)*† |") and table[3].rstrip(" |").endswith("99.0")
    cells = _cells(text)
    assert cells[("g2d", "siim_seg 1%")] == "**60.0**"  # the reported 99.0 does not take "best"
    assert not any("Unrelated" in line for line in table)  # fills no shown column
    assert "† Reported in A paper (Table 1); published numbers, not reproduced by vlpbench, never marked best." in text


def test_filters_pick_rows_columns_and_paper_groups_in_the_given_order(make):
    records = [make(m, 0.5 + i / 10, task=t, frac=f) for i, m in enumerate(("g2d", "mgca", "random"))
               for t in ("siim_seg", "rsna_det", "chexpert_cls") for f in (0.01, 1.0)]
    rows = table_rows(select_records(records, group="det"))
    assert {r["task"] for r in rows} == {"rsna_det"} and {r["group"] for r in rows} == {"det"}
    cells = _cells(markdown_table(records, models=["random", "g2d"], tasks=["chexpert_cls", "siim_seg"],
                                  fracs=[1.0]))
    header = list(dict.fromkeys(column for _, column in cells))
    assert header == ["chexpert_cls 100%", "siim_seg 100%"]
    lines = [line for line in markdown_table(records, models=["random", "g2d"]).splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["random", "g2d"]
    # Without --tasks, columns follow the paper's groups: seg, det, cls.
    default = list(dict.fromkeys(column for _, column in _cells(markdown_table(records, fracs=[0.01]))))
    assert default == ["siim_seg 1%", "rsna_det 1%", "chexpert_cls 1%"]
    with pytest.raises(ConfigError, match="--models medklip: no such result record; the records hold g2d, mgca, random"):
        select_records(records, models=["medklip"])
    with pytest.raises(ConfigError, match="--fracs 10%"):
        select_records(records, fracs=[0.1])
    with pytest.raises(ConfigError, match="--group zs"):
        select_records(records, group="zs")
    with pytest.raises(DataError, match="no result record passes all of the filters"):
        select_records(records, models=["g2d"], tasks=["siim_seg"], group="det")
    assert parse_fraction("10%") == pytest.approx(0.1) and parse_fraction("0.01") == 0.01
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        parse_fraction("150%")


def test_several_metrics_become_sub_columns_and_tasks_without_them_keep_their_primary(make):
    zs = {"auc": 0.81, "f1": 0.62, "acc": 0.75, "mcc": 0.4}
    records = [make("g2d", zs, task="rsna_zs", frac=1.0), make("g2d", 0.6)]
    text = markdown_table(records, metrics=["auc", "f1", "acc"])
    lines = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("|")]
    header, metric_row, g2d = lines[0], lines[2], lines[3]
    assert header[1:] == ["siim_seg 1%", "rsna_zs 100%", "rsna_zs 100%", "rsna_zs 100%"]
    assert metric_row[1:] == ["Dice ↑", "AUC ↑", "F1 ↑", "ACC ↑"]
    assert g2d[1:] == ["60.0", "81.0", "62.0", "75.0"]
    assert "Cells: each metric (×100) of a single seed." in text


def test_a_missing_cell_says_where_the_models_record_is(make):
    records = [make("g2d", 0.6, version=2), make("mgca", 0.5), make("mgca", 0.55, version=2)]
    text = markdown_table(records)
    assert _cells(text)[("g2d", "siim_seg v1 (aaaaaaaa) 1%")] == "–"
    assert ("- g2d has no record in siim_seg v1 (aaaaaaaa) 1%: its record is task v2 on split sha256 aaaaaaaa "
            "(column siim_seg v2 (aaaaaaaa)); different task versions or splits never share a cell") in text
    assert "– no record." in text


def test_markdown_keeps_hostile_names_literal(make):
    text = markdown_table([make("<script>|*x*`", 0.6), make("ok", 0.5)])
    assert "| \\<script\\>\\|\\*x\\*\\` " in text


def test_a_head_trained_over_a_neck_is_named_under_the_table(make):
    vit = make("mrm", 0.6)
    vit["config"]["training"] = {"head": "unet over feature2pyramid(3,5,7,11)"}
    resnet = make("g2d", 0.7)
    resnet["config"]["training"] = {"head": "unet"}
    [(_, grid)] = build_tables([vit, resnet])
    notes = [n for n in grid.provenance if "feature2pyramid" in n]
    assert notes == ["mrm: unet over feature2pyramid(3,5,7,11) (the neck trains with the head; the transformer "
                     "stays frozen)"]
    assert "g2d:" not in " ".join(grid.provenance)
