"""The reproduction ledger: checkpoints.json and the ledger keys of reference files (errors name file and key),
measurements of a cell from records (the CI of the seed mean), verdicts on planted values, and the reference
files shipped in the wheel."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vlpbench import results
from vlpbench.errors import ConfigError, DataError
from vlpbench.ledger import (Measured, ledger_cells, load_checkpoints, load_ledger, measured_cell,
                             shipped_reference_dir, verdict)
from vlpbench.report.reference import load_references

REPO = Path(__file__).resolve().parents[1]
SHA_A, SHA_B = "a" * 64, "b" * 64
SPLIT = "5" * 64
CHECKPOINTS = {"schema": 1, "checkpoints": {
    "mgca_r50": {"model": "mgca", "file": "resnet_50.ckpt", "published_by": "HKU-MedAI/MGCA README",
                 "url": "https://github.com/HKU-MedAI/MGCA", "released": True, "sha256": None, "size": None},
    "g2d": {"model": "g2d", "file": "g2d_encoder.pth", "published_by": "the G2D paper", "released": False,
            "note": "no weights published"}}}
TABLE = {"schema": 1, "citation": "Paper P", "table": "Table 1", "url": "https://example.org/p", "profile": "paper",
         "unit": "percent",
         "columns": [{"paper": "SIIM 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"},
                     {"paper": "SIIM 100%", "task": "siim_seg", "frac": 1.0, "metric": "dice"}],
         "rows": [{"method": "MGCA", "checkpoint": "mgca_r50", "values": [49.7, 59.3],
                   "not_comparable": {"SIIM 100%": "a 640 px UperNet"}},
                  {"method": "Random", "values": [40, None]}]}
THREAD = {"schema": 1, "kind": "reproduction", "citation": "HKU-MedAI/MGCA issue #3", "table": "first comment",
          "profile": "paper", "unit": "fraction",
          "columns": [{"paper": "Dice 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"}],
          "rows": [{"method": "a user", "checkpoint": "mgca_r50", "values": [0.481]}]}


def _write(folder: Path, checkpoints=CHECKPOINTS, **files: dict) -> Path:
    folder.mkdir(exist_ok=True)
    if checkpoints is not None:
        (folder / "checkpoints.json").write_text(json.dumps(checkpoints))
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


def _changed(data: dict, change) -> dict:
    data = json.loads(json.dumps(data))
    change(data)
    return data


def test_rows_with_a_checkpoint_are_ledger_cells_with_their_printed_precision(tmp_path):
    folder = _write(tmp_path / "ref", t1=TABLE, thread=THREAD)
    (folder / "t1.json").write_text(json.dumps(TABLE).replace("59.3]", "59.30]"))  # as the paper prints it
    cells = load_ledger(folder)
    assert [(c.row, c.column, c.kind) for c in cells] == [
        ("MGCA", "SIIM 1%", "published"), ("MGCA", "SIIM 100%", "published"), ("a user", "Dice 1%", "reproduction")]
    first, full, third = cells
    assert (first.model, first.task, first.frac, first.metric, first.profile) == ("mgca", "siim_seg", 0.01, "dice",
                                                                                 "paper")
    assert first.value == pytest.approx(0.497) and first.half_ulp == pytest.approx(0.0005, rel=1e-12)
    assert full.half_ulp == pytest.approx(0.00005, rel=1e-12)  # printed 59.30: two decimals
    assert third.half_ulp == pytest.approx(0.0005, rel=1e-12)  # 0.481 as a fraction
    assert (first.citation, first.table, first.url, first.not_comparable) == ("Paper P", "Table 1",
                                                                              "https://example.org/p", None)
    assert full.not_comparable == "a 640 px UperNet"
    assert first.checkpoint.file == "resnet_50.ckpt" and first.checkpoint.sha256 is None
    assert load_checkpoints(folder / "checkpoints.json")["g2d"].released is False

    assert ledger_cells(cells, kind="reproduction") == [third]
    assert ledger_cells(cells, model="g2d") == [] and ledger_cells(cells, tasks=["siim_seg"]) == cells
    with pytest.raises(ConfigError, match="ledger kind 'paper'"):
        ledger_cells(cells, kind="paper")
    # tables show the published file only: the thread is the ledger's, checkpoints.json is no table
    assert sorted(row.method for row in load_references(folder)) == ["MGCA", "Random"]


def test_the_shipped_folder_loads():
    folder = shipped_reference_dir()
    assert (folder / "g2d_table1.json").is_file()
    cells = load_ledger()
    assert load_references(folder)
    # every shipped cell's task, profile, metric and checkpoint were validated on load; spot-check known cells
    by_source = {(c.model, c.task, c.frac, c.metric, c.kind, c.row): c for c in cells}
    medklip = by_source["medklip", "cxr14_zs", 1.0, "auc", "reproduction", next(
        c.row for c in cells if c.model == "medklip" and c.citation.startswith("MediaBrain-SJTU/MedKLIP issue #12"))]
    assert medklip.value == pytest.approx(0.7233) and medklip.checkpoint.file == "checkpoint_final.pth"
    g2d = [c for c in cells if c.model == "g2d" and c.task == "siim_seg" and c.frac == 0.01 and c.table == "Table 1"]
    assert g2d and all(not c.checkpoint.released for c in g2d)
    assert {c.kind for c in cells} == {"published", "reproduction"}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema=2), "key 'schema': expected 1, got 2"),
    (lambda d: d.update(checkpoints=[]), "key 'checkpoints': expected an object"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["checkpoints"].update({"a b": {}}), "key 'checkpoints.a b': expected an id"),
    (lambda d: d["checkpoints"]["g2d"].update(colour=1), "unknown key 'checkpoints.g2d.colour'"),
    (lambda d: d["checkpoints"]["g2d"].pop("file"), "missing key 'checkpoints.g2d.file'"),
    (lambda d: d["checkpoints"]["g2d"].update(model="nope"),
     "key 'checkpoints.g2d.model': expected a registered model"),
    (lambda d: d["checkpoints"]["g2d"].update(published_by=" "),
     "key 'checkpoints.g2d.published_by': expected a non-empty"),
    (lambda d: d["checkpoints"]["g2d"].update(url="ftp://x"), "key 'checkpoints.g2d.url': expected null or an http(s)"),
    (lambda d: d["checkpoints"]["g2d"].update(note=3), "key 'checkpoints.g2d.note': expected null or a non-empty"),
    (lambda d: d["checkpoints"]["g2d"].update(released="no"), "key 'checkpoints.g2d.released': expected true or false"),
    (lambda d: d["checkpoints"]["mgca_r50"].update(sha256="A" * 64),
     "key 'checkpoints.mgca_r50.sha256': expected null or 64 lowercase hex digits"),
    (lambda d: d["checkpoints"]["mgca_r50"].update(size=True), "key 'checkpoints.mgca_r50.size': expected null or the"),
    (lambda d: d["checkpoints"]["mgca_r50"].update(size=-5), "key 'checkpoints.mgca_r50.size': expected null or the"),
    (lambda d: d["checkpoints"]["g2d"].update(sha256=SHA_A),
     "key 'checkpoints.g2d.sha256': expected null, the checkpoint is not released"),
])
def test_checkpoint_list_errors_name_the_file_and_the_key(tmp_path, change, message):
    folder = _write(tmp_path / "ref", checkpoints=_changed(CHECKPOINTS, change), t1=TABLE)
    with pytest.raises(DataError, match="^" + re.escape(f"{folder / 'checkpoints.json'}: {message}")):
        load_ledger(folder)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["rows"][0].update(checkpoint="medklip"), "key 'rows[0].checkpoint': expected an id of {ckpt} "
                                                         "(mgca_r50, g2d), got 'medklip'"),
    (lambda d: d["columns"][0].update(task="siim_segment"), "key 'columns[0].task': expected a task ("),
    (lambda d: d.update(kind="thread"), "key 'kind': expected 'published' or 'reproduction'"),
    (lambda d: d["rows"][0].update(checkpoint=""), "key 'rows[0].checkpoint': expected the id of an entry of "
                                                  "checkpoints.json"),
    (lambda d: d["rows"][0].update(not_comparable=["x"]), "key 'rows[0].not_comparable': expected an object"),
    (lambda d: d["rows"][0].update(not_comparable={"SIIM 10%": "x"}),
     "key 'rows[0].not_comparable.SIIM 10%': expected a column's paper label ('SIIM 1%', 'SIIM 100%')"),
    (lambda d: d["rows"][0].update(not_comparable={"SIIM 1%": ""}),
     "key 'rows[0].not_comparable.SIIM 1%': expected the reason as a non-empty string"),
    (lambda d: d["rows"][1].update(not_comparable={"SIIM 100%": "x"}),
     "key 'rows[1].not_comparable.SIIM 100%': the row has no value in column 'SIIM 100%'"),
    (lambda d: d["columns"][1].update(paper="SIIM 1%"), "key 'columns[1].paper': 'SIIM 1%' is already the label of "
                                                       "column 0"),
])
def test_ledger_keys_of_a_reference_file_are_checked(tmp_path, change, message):
    folder = _write(tmp_path / "ref", t1=_changed(TABLE, change))
    message = message.format(ckpt=folder / "checkpoints.json")
    with pytest.raises(DataError, match="^" + re.escape(f"{folder / 't1.json'}: {message}")):
        load_ledger(folder)


def test_a_checkpoint_id_needs_a_checkpoint_list(tmp_path):
    folder = _write(tmp_path / "ref", checkpoints=None, t1=TABLE)
    with pytest.raises(DataError, match=re.escape(f"{folder / 't1.json'}: key 'rows[0].checkpoint': expected an id "
                                                  f"of {folder / 'checkpoints.json'} (none: ")):
        load_ledger(folder)


def test_a_paper_cell_needs_a_task_with_a_paper_profile(tmp_path):
    table = _changed(TABLE, lambda d: [c.update(task="cxr14_ft", metric="auc") for c in d["columns"]])
    folder = _write(tmp_path / "ref", t1=table)
    message = "key 'profile': rows[0].values[0] is a paper ledger cell, but task cxr14_ft has no 'paper' profile: no"
    with pytest.raises(DataError, match=re.escape(f"{folder / 't1.json'}: {message}")):
        load_ledger(folder)
    table["profile"] = "canonical"
    _write(folder, t1=table)
    assert [c.profile for c in load_ledger(folder)] == ["canonical", "canonical"]


def test_two_tables_of_one_source_disagreeing_on_a_cell_is_an_error(tmp_path):
    other = _changed(TABLE, lambda d: d.update(table="Table 5") or d["rows"][0]["values"].__setitem__(0, 49.9))
    folder = _write(tmp_path / "ref", t1=TABLE, t5=other)
    with pytest.raises(DataError, match=re.escape(f"{folder / 't5.json'}: key 'rows[0].values[0]': MGCA siim_seg 0.01 "
                                                  "dice = 0.499 but Table 1 of the same source gives 0.497")):
        load_ledger(folder)
    _write(folder, t5=_changed(TABLE, lambda d: d.update(table="Table 5")))
    cells = load_ledger(folder)
    # The comparable number printed twice is one cell; the not-comparable one stays with each table.
    assert [(c.frac, c.table) for c in cells] == [(0.01, "Table 1"), (1.0, "Table 1"), (1.0, "Table 5")]


def test_two_users_in_one_thread_are_two_cells(tmp_path):
    thread = _changed(THREAD, lambda d: d["rows"].append({"method": "another user", "checkpoint": "mgca_r50",
                                                          "values": [0.475]}))
    cells = load_ledger(_write(tmp_path / "ref", t=thread))
    assert [(c.row, c.value) for c in cells] == [("a user", 0.481), ("another user", 0.475)]


# --- measurements and verdicts --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch):
    monkeypatch.setattr(results, "environment", lambda: {"vlpbench": "test", "git": None, "python": "3",
                                                         "torch": "2", "cuda": None, "device": "cpu"})


@pytest.fixture
def cell(tmp_path):
    """The published cell MGCA siim_seg 1 % Dice = 49.7 (paper profile)."""
    return load_ledger(_write(tmp_path / "ref", t1=TABLE))[0]


def _record(seed: int, dice: float, low: float, high: float, *, adapter="mgca", sha=SHA_A, version=1,
            profile="paper", frac=0.01, overrides=None, synthetic=False, name=None) -> dict:
    return results.make_record(
        model={"name": name or adapter, "adapter": adapter, "checkpoint": {"path": "m.ckpt", "sha256": sha}},
        task={"name": "siim_seg", "version": version, "protocol": "segmentation", "profile": profile},
        frac=frac, seed=seed, split={"dataset": "siim", "version": "v1", "sha256": SPLIT},
        metrics={"dice": dice}, primary_metric="dice", n={"train": 10, "val": 5, "test": 20},
        config={"overrides": overrides or {}}, timing={}, ci={"dice": {"low": low, "high": high}},
        data={"synthetic": synthetic})


def test_one_seed_is_its_bootstrap_ci_and_other_runs_are_left_out(cell):
    others = [_record(1, 0.9, 0.8, 0.95, adapter="g2d"), _record(1, 0.9, 0.8, 0.95, profile="canonical"),
              _record(1, 0.9, 0.8, 0.95, frac=0.1), _record(1, 0.9, 0.8, 0.95, overrides={"lr": 0.1}),
              _record(1, 0.9, 0.8, 0.95, synthetic=True)]
    measured = measured_cell([_record(0, 0.49, 0.46, 0.51), *others], cell)
    assert measured == Measured(0.49, None, 1, (0,), 0.46, 0.51, SHA_A,
                                (f"runs/mgca/{SHA_A[:8]}/siim_seg.v1-paper/frac0.01-seed0.json",))
    assert measured_cell(others, cell) is None


def test_an_entry_with_overrides_is_measured_by_records_with_exactly_those(tmp_path):
    checkpoints = _changed(CHECKPOINTS, lambda d: d["checkpoints"]["mgca_r50"].update(overrides={"init_decoder": True}))
    cell = load_ledger(_write(tmp_path / "ref", checkpoints=checkpoints, t1=TABLE))[0]
    assert cell.checkpoint.options == {"init_decoder": True}
    plain, decoded = _record(0, 0.45, 0.42, 0.48), _record(0, 0.49, 0.46, 0.51, overrides={"init_decoder": True})
    more = _record(1, 0.49, 0.46, 0.51, overrides={"init_decoder": True, "lr": 0.1})
    assert measured_cell([plain, decoded, more], cell).mean == 0.49
    bad = _changed(CHECKPOINTS, lambda d: d["checkpoints"]["mgca_r50"].update(overrides=["init_decoder"]))
    with pytest.raises(DataError, match=r"key 'checkpoints.mgca_r50.overrides': expected an object"):
        load_ledger(_write(tmp_path / "bad", checkpoints=bad, t1=TABLE))


def test_several_seeds_combine_test_sampling_and_training_randomness(cell):
    values, lows, highs = [0.50, 0.52, 0.54], [0.46, 0.49, 0.50], [0.53, 0.56, 0.57]
    # one checkpoint under two --name labels is one measurement
    records = [_record(seed, v, lo, hi, name="mgca" if seed else "mine") for seed, (v, lo, hi)
               in enumerate(zip(values, lows, highs))]
    measured = measured_cell(records, cell)
    # by hand: mean 0.52, std 0.02; test-set half-widths 0.52 - 0.4833.. = 0.03667 (low), 0.55333.. - 0.52 =
    # 0.03333 (high), not divided by n; training 1.96 * 0.02 / sqrt(3) = 0.022632
    training = 1.96 * 0.02 / math.sqrt(3)
    assert measured.mean == pytest.approx(0.52) and measured.std == pytest.approx(0.02)
    assert measured.ci_low == pytest.approx(0.52 - math.sqrt((0.11 / 3) ** 2 + training ** 2))
    assert measured.ci_high == pytest.approx(0.52 + math.sqrt((0.10 / 3) ** 2 + training ** 2))
    assert (measured.ci_low, measured.ci_high) == pytest.approx((0.47691, 0.56029), abs=1e-5)
    assert measured.seeds == (0, 1, 2) and measured.n_seeds == 3 and len(measured.records) == 3
    assert np.std(values, ddof=1) == pytest.approx(measured.std)


def test_records_of_two_task_versions_or_checkpoints_are_an_error(cell):
    with pytest.raises(DataError, match=re.escape(f"siim_seg v1 split {SPLIT[:8]} and siim_seg v2 split {SPLIT[:8]}")):
        measured_cell([_record(0, 0.5, 0.4, 0.6), _record(1, 0.5, 0.4, 0.6, version=2)], cell)
    two = [_record(0, 0.5, 0.4, 0.6), _record(1, 0.7, 0.6, 0.8, sha=SHA_B)]
    with pytest.raises(DataError, match=f"2 checkpoints \\({SHA_A[:8]}, {SHA_B[:8]}\\): give the sha256"):
        measured_cell(two, cell)
    assert measured_cell(two, cell, checkpoint_sha256=SHA_B).mean == pytest.approx(0.7)
    with pytest.raises(DataError, match="seed0.json: no bootstrap CI of dice"):
        measured_cell([{**_record(0, 0.5, 0.4, 0.6), "ci": None}], cell)


def _measured(low: float, high: float) -> Measured:
    return Measured((low + high) / 2, 0.01, 3, (0, 1, 2), low, high, SHA_A, ())


def test_verdicts_on_planted_values(cell):
    inside = verdict(cell, _measured(0.48, 0.52))
    assert (inside.kind, inside.widths, inside.reason) == ("reproduced", 0.0, None)
    assert inside.difference == pytest.approx(0.50 - 0.497)
    # the paper's 49.7 lies 3 CI widths under a CI [50.3, 50.5]: the measurement is above the paper
    above = verdict(cell, _measured(0.503, 0.505))
    assert above.kind == "above" and above.widths == pytest.approx(3.0) and above.difference == pytest.approx(0.007)
    below = verdict(cell, _measured(0.489, 0.491))
    assert below.kind == "below" and below.widths == pytest.approx(3.0) and below.difference == pytest.approx(-0.007)


def test_a_value_printed_497_reaches_the_ci_within_its_rounding(cell):
    assert verdict(cell, _measured(0.4974, 0.51)).kind == "reproduced"  # 49.7 may be 49.74
    assert verdict(cell, _measured(0.4876, 0.4966)).kind == "reproduced"  # or 49.65
    assert verdict(cell, _measured(0.4976, 0.51)).kind == "above"
    printed_4970 = replace(cell, half_ulp=0.00005)
    assert verdict(printed_4970, _measured(0.4974, 0.51)).kind == "above"


def test_not_comparable_keeps_the_measurement_and_names_the_reason_and_no_records_is_not_run(cell, tmp_path):
    full = load_ledger(tmp_path / "ref")[1]
    measured = measured_cell([_record(0, 0.62, 0.58, 0.66, frac=1.0)], full)
    result = verdict(full, measured)
    assert (result.kind, result.reason, result.widths) == ("not comparable", "a 640 px UperNet", None)
    assert measured.mean == 0.62 and result.difference == pytest.approx(0.62 - 0.593)
    assert measured_cell([], cell) is None
    assert verdict(cell, None).kind == "not run"


# --- shipping -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_built_wheel_ships_every_reference_file(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without build isolation needs setuptools "
                                             "(the test extras install it)")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no source tree to build a wheel from")
    # A copy of the checkout's files, so that no build folder of earlier builds slips stale files in.
    source = tmp_path / "source"
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("vlpbench-*.whl")
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist()
               if name.startswith("vlpbench/reference_data/")}
    assert shipped == {path.name for path in (REPO / "results" / "reference").glob("*.json")}
    assert "checkpoints.json" in shipped
    # Imported from the unpacked wheel, vlpbench finds its reference files there, not in this checkout.
    zipfile.ZipFile(wheel).extractall(tmp_path / "installed")
    probe = ("from vlpbench.ledger import load_ledger, shipped_reference_dir\n"
             "from vlpbench.report.reference import load_references\n"
             "load_ledger(), load_references(shipped_reference_dir())\n"
             "print(shipped_reference_dir())")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")})
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == tmp_path / "installed" / "vlpbench" / "reference_data"
