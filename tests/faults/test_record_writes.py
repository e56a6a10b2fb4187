"""Fault injection: records that reading would refuse are refused when they are made or written.

Each case breaks one number of a valid segmentation record (per-image Dice of 8 images, their mean and its
halves, a CI around it) before ``make_record`` or ``write_record`` sees it: both raise a ConfigError naming the
key, and nothing is written. A NaN metric is an undefined one and is written as null; a record that passes
is read back with the values it was written with.
"""

from __future__ import annotations

import copy
import math
from unittest import mock

import numpy as np
import pytest

from vlpbench import results
from vlpbench.errors import ConfigError

ENV = {"vlpbench": "test", "git": None, "python": "3", "torch": "2", "cuda": None, "device": "cpu"}
SCORES = [0.2, 1.0, 0.6, 1.0, 0.4, 0.0, 0.8, 1.0]  # the even images positive, the odd ones empty


def fields() -> dict:
    """The arguments of a consistent segmentation record."""
    positive = np.arange(len(SCORES)) % 2 == 0
    scores = np.array(SCORES)
    dice = float(scores.mean())
    return dict(
        model={"name": "alpha", "adapter": "alpha", "checkpoint": None},
        task={"name": "siim_seg", "version": 1, "protocol": "segmentation", "profile": "canonical"},
        frac=0.01, seed=0, split={"dataset": "siim", "version": "v1", "sha256": "a" * 64},
        metrics={"dice": dice, "dice_positive": float(scores[positive].mean()),
                 "empty_correct": float(scores[~positive].mean()), "all_empty_baseline": 0.5},
        primary_metric="dice", n={"train": 4, "val": 4, "test": len(SCORES)},
        config={"overrides": {}, "batch_size": 4, "dice_average": "image"}, timing={},
        ci={"dice": {"low": dice - 0.1, "high": dice + 0.1}},
        per_image={f"img{i}": s for i, s in enumerate(SCORES)}, data={"synthetic": True})


def make(**changes) -> dict:
    with mock.patch.object(results, "environment", lambda: dict(ENV)):
        return results.make_record(**{**fields(), **changes})


def changed(name: str, change) -> dict:
    """``fields()[name]`` after ``change`` edited a copy of it."""
    value = copy.deepcopy(fields()[name])
    change(value)
    return {name: value}


# (change to make_record's arguments, the start of the refusal)
CASES = {
    "out_of_range": (changed("metrics", lambda m: m.update(dice=1.2)),
                     "invalid key 'metrics.dice': 1.2 is outside the range of dice [0, 1]"),
    "negative": (changed("metrics", lambda m: m.update(all_empty_baseline=-0.5)),
                 "invalid key 'metrics.all_empty_baseline': -0.5 is outside the range"),
    "infinite": (changed("metrics", lambda m: m.update(dice_positive=math.inf)),
                 "invalid key 'metrics.dice_positive': inf is not a finite number"),
    "numpy_infinite": (changed("metrics", lambda m: m.update(dice_positive=np.float32(-np.inf))),
                       "invalid key 'metrics.dice_positive': -inf is not a finite number"),
    "string": (changed("metrics", lambda m: m.update(dice="0.55")),
               "invalid key 'metrics.dice': expected a finite number or null, got '0.55'"),
    "bool": (changed("metrics", lambda m: m.update(dice_positive=True)),
             "invalid key 'metrics.dice_positive': expected a finite number or null, got True"),
    "aggregate_edited": (changed("metrics", lambda m: m.update(dice=0.7)),
                         "invalid key 'metrics.dice': 0.7 is not the mean of the record's 8 per_image scores"),
    "aggregate_nan": (changed("metrics", lambda m: m.update(dice=math.nan)),
                      "invalid key 'metrics.dice': null, but the record's 8 per_image scores average 0.625000"),
    "halves_edited": (changed("metrics", lambda m: m.update(empty_correct=0.5)),
                      "invalid key 'metrics': dice_positive and empty_correct weighted by all_empty_baseline"),
    "per_image_nan": (changed("per_image", lambda p: p.update(img3=math.nan)),
                      "invalid key 'per_image.img3': nan is not a finite number"),
    "per_image_string": (changed("per_image", lambda p: p.update(img3="1.0")),
                         "invalid key 'per_image.img3': expected a finite number, got '1.0'"),
    "ci_reversed": (changed("ci", lambda c: c["dice"].update(low=0.9, high=0.1)),
                    "invalid key 'ci.dice': low 0.9 is above high 0.1"),
    "ci_out_of_range": (changed("ci", lambda c: c["dice"].update(high=1.05)),
                        "invalid key 'ci.dice.high': 1.05 is outside the range of dice [0, 1]"),
    "ci_infinite": (changed("ci", lambda c: c["dice"].update(low=-math.inf)),
                    "invalid key 'ci.dice.low': -inf is not a finite number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_make_record_refuses_what_reading_would_refuse(case):
    change, expected = CASES[case]
    with pytest.raises(ConfigError) as error:
        make(**change)
    assert str(error.value).startswith(f"result record: {expected}")


@pytest.mark.parametrize("case", sorted(CASES) + ["no_provenance", "empty_provenance"])
def test_write_record_refuses_an_edited_record_and_writes_nothing(case, tmp_path):
    record = make()
    if case == "no_provenance":
        record["env"].pop("vlpbench")
        expected = "invalid key 'env.vlpbench': expected the version of vlpbench that wrote the record, got None"
    elif case == "empty_provenance":
        record["env"]["vlpbench"] = ""
        expected = "invalid key 'env.vlpbench': expected the version of vlpbench that wrote the record, got ''"
    else:
        change, expected = CASES[case]
        record.update(change)
    with pytest.raises(ConfigError) as error:
        results.write_record(record, tmp_path)
    assert str(error.value).startswith(f"result record: {expected}")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_replacement_leaves_the_old_record_as_it_was(tmp_path):
    path = results.write_record(make(), tmp_path)
    before = path.read_bytes()
    bad = make()
    bad["metrics"]["dice"] = 0.9
    with pytest.raises(ConfigError, match="invalid key 'metrics.dice': 0.9 is not the mean"):
        results.write_record(bad, tmp_path, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_an_undefined_metric_is_written_as_null_and_read_back(tmp_path):
    """NaN is how protocols say "undefined" (an AP without positives): null on disk, which reading accepts."""
    record = make(metrics={**fields()["metrics"], "ap50": math.nan},
                  ci={"dice": {"low": math.nan, "high": 0.7}})
    back = results.load_record(results.write_record(record, tmp_path))
    assert back["metrics"]["ap50"] is None and back["ci"]["dice"] == {"low": None, "high": 0.7}
    assert back["metrics"]["dice"] == 0.625 and back["per_image"] == record["per_image"]


def test_rounding_on_write_is_not_mistaken_for_an_edit(tmp_path):
    """Values are rounded to 6 decimals on write: a mean of unrounded scores stays consistent."""
    scores = np.random.default_rng(0).uniform(0, 1, 1000)
    record = make(metrics={"dice": float(scores.mean())}, ci=None,
                  per_image={f"img{i}": float(s) for i, s in enumerate(scores)})
    back = results.load_record(results.write_record(record, tmp_path))
    assert back["metrics"]["dice"] == round(float(scores.mean()), 6)
