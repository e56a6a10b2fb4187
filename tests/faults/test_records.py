"""Fault injection: result records edited or corrupted after they were written (issue 17, item 3).

Each case runs through the CLI on a results folder of three valid segmentation records (models alpha, beta,
gamma) with beta's record broken: the readers skip it with a warning naming the file and the key, still show
alpha and gamma with their true values, and write nothing into the results folder; ``compare --strict`` (the
default where CI=true) fails on it and names it in the JUnit XML. A property test edits records at random: each
edit either loads and tabulates its true value or is skipped with a named reason.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from unittest import mock
from xml.etree import ElementTree

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlpbench import api, results
from vlpbench.cli import main

ENV = {"vlpbench": "test", "git": None, "python": "3", "torch": "2", "cuda": None, "device": "cpu"}
N_IMAGES = 20


def segmentation_record(model: str, seed: int, *, task: str = "siim_seg", batch: int | None = None) -> dict:
    """A valid record as the segmentation protocol writes it: per-image Dice of 20 images (the even ones
    positive), their mean and its halves, a CI around it; ``batch``: MGCA's batch-averaged Dice."""
    scores = np.round(np.random.default_rng(seed).uniform(0.2, 0.8, N_IMAGES), 6)
    positive = np.arange(N_IMAGES) % 2 == 0
    dice = float(scores.mean()) if batch is None else float(np.mean([scores[i:i + batch].mean()
                                                                     for i in range(0, N_IMAGES, batch)]))
    metrics = {"dice": dice, "dice_positive": float(scores[positive].mean()),
               "empty_correct": float(scores[~positive].mean()), "all_empty_baseline": float((~positive).mean())}
    config = {"overrides": {}, "batch_size": batch or 8, "dice_average": "image" if batch is None else "batch"}
    with mock.patch.object(results, "environment", lambda: dict(ENV)):
        return results.make_record(
            model={"name": model, "adapter": model, "checkpoint": None},
            task={"name": task, "version": 1, "protocol": "segmentation", "profile": "canonical",
                  "higher_is_better": True},
            frac=0.01, seed=0, split={"dataset": "siim", "version": "v1", "sha256": "a" * 64},
            metrics=metrics, primary_metric="dice", n={"train": 4, "val": 4, "test": N_IMAGES},
            config=config, timing={}, ci={"dice": {"low": dice - 0.05, "high": dice + 0.05}},
            per_image={f"img{i:02d}": float(s) for i, s in enumerate(scores)}, data={"synthetic": True})


def write_folder(folder: Path) -> dict[str, Path]:
    """alpha, beta, gamma on siim_seg: each model's record path."""
    return {model: results.write_record(segmentation_record(model, seed), folder)
            for seed, model in enumerate(("alpha", "beta", "gamma"))}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2))  # NaN is written as the NaN token, as a careless tool would


def lower_by(amount: float):
    return lambda r: r["metrics"].update(dice=round(r["metrics"]["dice"] - amount, 6))


def cell(value: float) -> str:
    return f"{100 * value:.1f}"


def row(text: str, model: str) -> str | None:
    return next((line for line in text.splitlines() if line.startswith(f"| {model} ")), None)


# (edit of beta's record, what the warning says after "<path>: ")
CASES = {
    "string": (lambda r: r["metrics"].update(dice="0.9"),
               "invalid key 'metrics.dice': expected a finite number or null, got '0.9'"),
    "out_of_range": (lambda r: r["metrics"].update(dice=7.5),
                     "invalid key 'metrics.dice': 7.5 is outside the range of dice [0, 1]"),
    "nan": (lambda r: r["metrics"].update(dice=math.nan),
            "invalid key 'metrics.dice': expected a finite number or null, got nan"),
    "bool": (lambda r: r["metrics"].update(dice=True),
             "invalid key 'metrics.dice': expected a finite number or null, got True"),
    "aggregate_lowered": (lower_by(0.30), "invalid key 'metrics.dice': "),
    "ci_reversed": (lambda r: r["ci"]["dice"].update(low=0.9, high=0.1),
                    "invalid key 'ci.dice': low 0.9 is above high 0.1"),
    "ci_infinite": (lambda r: r["ci"]["dice"].update(high=math.inf),
                    "invalid key 'ci.dice.high': expected a finite number or null, got inf"),
    "per_image_string": (lambda r: r["per_image"].update(img03="0.5"),
                         "invalid key 'per_image.img03': expected a finite number, got '0.5'"),
    "half_edited": (lambda r: r["metrics"].update(dice_positive=round(r["metrics"]["dice_positive"] - 0.2, 6)),
                    "invalid key 'metrics': dice_positive and empty_correct weighted by all_empty_baseline"),
    "null_aggregate": (lambda r: r["metrics"].update(dice=None),
                       "invalid key 'metrics.dice': null, but the record's 20 per_image scores average"),
    "future_schema": (lambda r: r.update(schema=2),
                      "invalid key 'schema': version 2 is not known to vlpbench"),
    "schema_true": (lambda r: r.update(schema=True), "invalid key 'schema': version True is not known"),
    "no_provenance": (lambda r: r["env"].pop("vlpbench"), "invalid key 'env.vlpbench'"),
    "unknown_metric": (lambda r: r["metrics"].update(dcie=0.5), "invalid key 'metrics.dcie': unknown metric"),
}


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "results"
    return root, write_folder(root)


@pytest.mark.parametrize("case", sorted(CASES) + ["truncated"])
def test_table_skips_the_broken_record_names_it_and_shows_the_others(case, folder, capsys, caplog):
    root, paths = folder
    if case == "truncated":
        paths["beta"].write_text(paths["beta"].read_text()[:300])
        expected = "not a JSON result record"
    else:
        change, expected = CASES[case]
        edit(paths["beta"], change)
    before = snapshot(root)
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert main(["table", "--results", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"skipping invalid result record {paths['beta']}: {expected}" in caplog.text
    assert row(out, "beta") is None
    for model in ("alpha", "gamma"):
        true_value = json.loads(paths[model].read_text())["metrics"]["dice"]
        assert cell(true_value) in row(out, model)
    assert snapshot(root) == before  # nothing written, nothing lost


def test_before_the_fix_the_lowered_aggregate_was_shown_as_is(folder, capsys):
    """The lowered record's own per-image scores average 0.30 more than its dice: the table shows neither."""
    root, paths = folder
    honest = json.loads(paths["beta"].read_text())["metrics"]["dice"]
    edit(paths["beta"], lower_by(0.30))
    assert main(["table", "--results", str(root)]) == 0
    out = capsys.readouterr().out
    assert cell(honest - 0.30) not in out and row(out, "beta") is None


def test_a_record_with_mgca_batch_averaged_dice_loads_and_an_edited_one_is_refused(tmp_path, capsys, caplog):
    """dice_average: batch: dice is the mean of batch means, not the per-image mean; both are checked."""
    record = segmentation_record("mgca", 7, batch=8)
    per_image_mean = float(np.mean(list(record["per_image"].values())))
    assert abs(record["metrics"]["dice"] - per_image_mean) > 1e-4  # 20 images in batches of 8, 8, 4
    path = results.write_record(record, tmp_path)
    assert results.load_record(path)["metrics"]["dice"] == round(record["metrics"]["dice"], 6)
    edit(path, lambda r: r["metrics"].update(dice=round(per_image_mean, 6)))
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert main(["table", "--results", str(tmp_path)]) == 2
    assert "is not the mean of the means of batches of 8 of the record's per_image scores" in caplog.text
    assert "no result records under" in capsys.readouterr().err


def _as(record: dict, metrics: dict, per_image: dict, **config) -> dict:
    """``record`` with other metrics, per-image scores and config: another protocol's record."""
    changed = copy.deepcopy(record)
    changed.update(metrics=metrics, primary_metric=next(iter(metrics)), per_image=per_image, ci=None)
    changed["config"].update(config)
    return changed


@pytest.mark.parametrize("metrics, per_image, config, problem", [
    # Multi-class classification: per_image is top-1 correctness, acc its mean (MCC may be negative).
    ({"acc": 0.75, "auc": 0.8, "mcc": -0.2}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}, {}, None),
    ({"acc": 0.45, "auc": 0.8}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}, {},
     "invalid key 'metrics.acc': 0.45 is not the mean of the record's 4 per_image scores (0.750000)"),
    ({"accuracy": 0.45}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}, {}, "invalid key 'metrics.accuracy': 0.45 is not"),
    ({"mcc": -1.5}, {}, {}, "invalid key 'metrics.mcc': -1.5 is outside the range of mcc [-1, 1]"),
    # Retrieval: per_image holds config.per_image_metric per query image; ranks are >= 1, unbounded above.
    ({"i2t_r5": 0.5, "i2t_medr": 4.0, "i2t_meanr": 17.5}, {"a": 1.0, "b": 0.0}, {"per_image_metric": "i2t_r5"}, None),
    ({"i2t_r5": 0.2}, {"a": 1.0, "b": 0.0}, {"per_image_metric": "i2t_r5"}, "invalid key 'metrics.i2t_r5': 0.2 is not"),
    ({"i2t_medr": 0.5}, {}, {}, "invalid key 'metrics.i2t_medr': 0.5 is outside the range of i2t_medr [1, inf)"),
    # Grounding: CNR is >= 0 and unbounded; Dice per query.
    ({"dice": 0.5, "cnr": 3.2, "pointing_game": 1.0}, {"q1": 0.4, "q2": 0.6}, {}, None),
    ({"dice": 0.5, "cnr": -0.1}, {"q1": 0.4, "q2": 0.6}, {}, "invalid key 'metrics.cnr': -0.1 is outside the range"),
    ({"brier": 1.6, "brier_covid_19": 0.4}, {}, {}, None),
    ({"auc_pleural_effusion": 1.2}, {}, {}, "invalid key 'metrics.auc_pleural_effusion': 1.2 is outside the range"),
])
def test_each_protocols_numbers_are_checked(metrics, per_image, config, problem):
    from vlpbench.record_values import values_problem

    record = _as(json.loads(json.dumps(segmentation_record("alpha", 0))), metrics, per_image, **config)
    found = values_problem(record)
    assert found == problem if problem is None else found.startswith(problem)


def test_every_record_invalid_is_an_error_naming_them(folder, capsys, caplog):
    root, paths = folder
    for path in paths.values():
        edit(path, lambda r: r.update(schema=3))
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert main(["table", "--results", str(root)]) == 2
    assert f"error: no result records under {root / 'runs'} (3 invalid record(s) skipped, named above)" in \
        capsys.readouterr().err
    assert all(f"skipping invalid result record {path}: invalid key 'schema'" in caplog.text for path in paths.values())


def _compare_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Baseline and candidate: alpha on siim_seg, seed 0; the candidate also holds a seed-1 record whose
    aggregate was lowered by 0.30 (the broken one)."""
    base, cand = tmp_path / "base", tmp_path / "cand"
    results.write_record(segmentation_record("alpha", 0), base)
    results.write_record(segmentation_record("alpha", 0), cand)
    broken = segmentation_record("alpha", 1)
    broken["seed"] = 1
    path = results.write_record(broken, cand)
    edit(path, lower_by(0.30))
    return base, cand, path


@pytest.mark.parametrize("ci, flag, code", [
    (None, [], 0), ("false", [], 0), ("true", [], 2), ("true", ["--no-strict"], 0), (None, ["--strict"], 2),
])
def test_compare_skips_an_invalid_record_and_strict_fails_on_it(ci, flag, code, tmp_path, monkeypatch, capsys,
                                                                caplog):
    base, cand, broken = _compare_folders(tmp_path)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    before = snapshot(tmp_path)
    junit = tmp_path / "report" / "junit.xml"
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert main(["compare", "--baseline", str(base), "--candidate", str(cand), "--junit", str(junit),
                     *flag]) == code
    out = capsys.readouterr().out
    problem = "invalid key 'metrics.dice': "
    assert f"skipping invalid result record {broken}: {problem}" in caplog.text
    assert "| siim_seg | 1% | Dice ↑ |" in out and "| within tolerance |" in out
    assert f"**invalid record** ({'fails --strict' if code else 'skipped'}) {broken}: {problem}" in out
    case = ElementTree.parse(junit).find(".//testcase[@classname='vlpbench.compare.invalid_record']")
    assert case.get("name") == str(broken)
    outcome = case.find("error" if code else "skipped")
    assert outcome is not None and problem in outcome.get("message")
    assert snapshot(tmp_path) == {**before, "report/junit.xml": junit.read_bytes()}  # only the JUnit file


def test_compare_of_one_lowered_record_is_no_longer_within_tolerance(tmp_path, monkeypatch, capsys, caplog):
    """The issue's case: aggregate −0.30, per-image scores unchanged; compare said "within tolerance", exit 0."""
    monkeypatch.delenv("CI", raising=False)
    base = results.write_record(segmentation_record("beta", 1), tmp_path / "base")
    cand = results.write_record(segmentation_record("beta", 1), tmp_path / "cand")
    edit(cand, lower_by(0.30))
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert main(["compare", "--baseline", str(base), "--candidate", str(cand)]) == 2
    out = capsys.readouterr().out
    assert "| within tolerance |" not in out and "the baseline has this cell and the candidate does not" in out
    assert f"skipping invalid result record {cand}: invalid key 'metrics.dice'" in caplog.text


@pytest.mark.parametrize("command", ["leaderboard", "significance", "plot"])
def test_other_readers_skip_the_broken_record(command, folder, tmp_path, capsys, caplog):
    root, paths = folder
    edit(paths["beta"], lambda r: r["metrics"].update(dice=7.5))
    before = snapshot(root)
    out = tmp_path / "out"
    argv = {"leaderboard": ["leaderboard", "--results", str(root), "--out", str(out)],
            "significance": ["significance", "--task", "siim_seg", "--frac", "0.01", "--models", "alpha,gamma",
                             "--results", str(root), "--json"],
            "plot": ["plot", "--results", str(root), "--out", str(out), "--format", "svg"]}[command]
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert main(argv) == 0
    assert f"skipping invalid result record {paths['beta']}: invalid key 'metrics.dice': 7.5 is outside" in caplog.text
    if command == "significance":
        assert "alpha" in capsys.readouterr().out
    else:
        text = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.suffix in (".html", ".svg"))
        assert "alpha" in text and "beta" not in text
    assert snapshot(root) == before


# Random edits: a key path of the record and a value that replaces it (or deletes it).
_KEYS = [("metrics", "dice"), ("metrics", "dice_positive"), ("metrics", "empty_correct"),
         ("metrics", "all_empty_baseline"), ("ci", "dice", "low"), ("ci", "dice", "high"), ("ci", "dice"), ("ci",),
         ("per_image", "img05"), ("per_image",), ("schema",), ("frac",), ("seed",), ("primary_metric",),
         ("env", "vlpbench"), ("config", "dice_average"), ("config", "batch_size"), ("task", "version")]
_DELETE = object()
_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.integers(-3, 3), st.booleans(),
    st.none(), st.text(max_size=4), st.sampled_from(["0.9", "batch", "image", "dice"]),
    st.lists(st.floats(0, 1), max_size=2), st.builds(dict), st.just(_DELETE))


def _apply(record: dict, keys: tuple, value) -> None:
    holder = record
    for key in keys[:-1]:
        holder = holder.get(key)
        if not isinstance(holder, dict):
            return  # an earlier edit replaced the parent: nothing left to edit here
    if value is _DELETE:
        holder.pop(keys[-1], None)
    else:
        holder[keys[-1]] = value


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=2))
def test_random_edits_load_with_their_true_values_or_are_skipped_with_a_reason(edits):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _property_folder(root)
        record = json.loads(paths["beta"].read_text())
        edited = copy.deepcopy(record)
        for keys, value in edits:
            _apply(edited, keys, value)
        paths["beta"].write_text(json.dumps(edited))
        valid, invalid = results.scan_records(root)
        warnings = _Collect()
        logging.getLogger("vlpbench").addHandler(warnings)
        try:
            text = api.table(root)
        finally:
            logging.getLogger("vlpbench").removeHandler(warnings)
        for model in ("alpha", "gamma"):
            assert cell(json.loads(paths[model].read_text())["metrics"]["dice"]) in row(text, model)
        if invalid:
            [bad] = invalid
            assert bad.path == paths["beta"] and row(text, "beta") is None
            assert bad.problem.startswith(("invalid key '", "missing key '", "not a JSON", "expected a JSON"))
            assert f"skipping invalid result record {bad}" in warnings.text
            return
        # Loaded: its numbers are what the file says, and they are numbers a Dice record can hold.
        assert len(valid) == 3 and not warnings.text
        dice = edited["metrics"]["dice"]
        scores = list(edited["per_image"].values()) if edited.get("per_image") else []
        if dice is None:  # undefined, as a record may say where it has no per-image scores: no number shown
            assert not scores and not re.search(r"\d", row(text, "beta").split("|")[2])
            return
        assert type(dice) in (int, float) and 0 <= dice <= 1
        if scores and edited["config"].get("dice_average") != "batch":
            assert abs(dice - sum(scores) / len(scores)) <= 1e-5
        assert cell(dice) in row(text, "beta")


_TEMPLATE: dict[str, str] = {}


def _property_folder(root: Path) -> dict[str, Path]:
    """:func:`write_folder`'s files under ``root``, built once and copied (hypothesis runs many examples)."""
    if not _TEMPLATE:
        with tempfile.TemporaryDirectory() as tmp:
            for model, path in write_folder(Path(tmp)).items():
                _TEMPLATE[model] = str(path.relative_to(tmp)) + "\n" + path.read_text()
    paths = {}
    for model, entry in _TEMPLATE.items():
        relative, text = entry.split("\n", 1)
        paths[model] = root / relative
        paths[model].parent.mkdir(parents=True, exist_ok=True)
        paths[model].write_text(text)
    return paths


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"
