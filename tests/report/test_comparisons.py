"""Comparison sets (`table --group foundation | zero-shot-2025`): columns, rows, notes, published rows."""

from __future__ import annotations

import pytest

from vlpbench.errors import ConfigError, DataError
from vlpbench.report.comparisons import COMPARISONS
from vlpbench.report.reference import load_references, shipped_reference_dir
from vlpbench.report.table import build_tables, markdown_table, select_records
from vlpbench.tasks import task_names


def _header(markdown: str) -> list[str]:
    first = next(line for line in markdown.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in first.strip("|").split("|")][1:]


def _row_labels(markdown: str) -> list[str]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")][3:]
    return [line.split("|")[1].strip() for line in lines]


def test_every_comparison_names_shipped_tasks_and_registered_models():
    from vlpbench.adapters import adapter_names

    for chosen in COMPARISONS.values():
        assert set(chosen.tasks) <= set(task_names()), chosen.name
        assert set(chosen.models) <= set(adapter_names()), chosen.name
        assert chosen.fracs and all(0 < f <= 1 for f in chosen.fracs)
    with pytest.raises(ConfigError, match="expected one of .*, foundation, zero-shot-2025"):
        select_records([], group="foundations")


def test_foundation_columns_follow_the_comparison_and_every_model_on_its_tasks_is_a_row(make):
    records = [make("rad_dino", 0.80, task="vindr_cls", protocol="linear"),
               make("rad_dino", 0.60, task="siim_seg", frac=1.0),
               make("my_ckpt", 0.84, task="vindr_cls", protocol="linear"),
               make("my_ckpt", 0.70, task="rsna_cls", frac=0.1, protocol="linear"),
               make("g2d", 0.88, task="rsna_zs", frac=1.0)]
    text = markdown_table(records, group="foundation")
    # vindr_cls before rsna_cls before siim_seg: the comparison's order, not the paper groups' (seg first).
    assert _header(text) == ["vindr_cls 1%", "rsna_cls 10%", "siim_seg 100%"]
    assert sorted(_row_labels(text)) == ["my_ckpt", "rad_dino"]  # g2d has no record on these tasks
    assert "**84.0**" in text and "80.0" in text
    assert ("Models of the comparison without records here: medsiglip, biomedclip, ark, xraysiglip, clip, mrm, g2d"
            in text)
    assert "Tasks of the comparison without records here: chexpert_cls, tbx11k_cls" in text
    # A fraction outside the comparison's is left out; a comparison with no record is an error naming it.
    assert {r["task"]["name"] for r in select_records(records, group="foundation")} == {"vindr_cls", "rsna_cls",
                                                                                       "siim_seg"}
    with pytest.raises(DataError, match="--group zero-shot-2025: no record of the comparison's tasks"):
        select_records([records[0]], group="zero-shot-2025")


def test_zero_shot_2025_shows_mavls_published_rows_beside_paper_records_only(make):
    def paper(record: dict) -> dict:
        record["task"]["profile"] = "paper"
        return record

    records = [paper(make("mavl", {"auc": 0.7301, "f1": 0.25, "acc": 0.80}, task="cxr14_zs", frac=1.0,
                          protocol="zero_shot")),
               make("medsiglip", 0.71, task="cxr14_zs", frac=1.0, protocol="zero_shot")]
    references = load_references(shipped_reference_dir())
    tables = dict(build_tables(records, group="zero-shot-2025", references=references))
    assert set(tables) == {"canonical", "paper"}
    published = [row for row in tables["paper"].rows if row.citation is not None]
    mavl = next(row for row in published if row.label.startswith("MAVL"))
    column = next(c for c in tables["paper"].columns if c.task == "cxr14_zs" and c.metric == "auc")
    assert mavl.cells[column.key].mean == pytest.approx(0.7357)  # ChestX-ray14 AUC 73.57 as printed
    assert "MAVL" in mavl.citation.citation
    assert not any(row.citation for row in tables["canonical"].rows)
