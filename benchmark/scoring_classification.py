"""Score classification probabilities made by any framework (``vlpbench score`` for linear, fine-tuning
and zero-shot tasks).

The predictions are a CSV with a header: ``image_id`` and one probability column per class, named as
the task YAML names its classes (``config["classes"]``); a binary task also accepts a single
probability column of any name. Values are probabilities in [0, 1]; a multi-class task's columns are
the class probabilities, and its decision is the highest one.

Which metrics: ``config["metrics"]``, else ``acc`` for a multi-class task and ``auc`` otherwise
(the linear protocol's). ``f1`` / ``acc`` / ``mcc`` of a binary or multi-label task need one threshold
per class, chosen by ``best_threshold`` on the validation rows: they are reported only when the CSV
also holds every validation image of the split; otherwise they are left out with a note. Thresholds
are never tuned on the rows being scored.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.classification import CRITERIA
from vlpbench.protocols.labels import class_names, label_kind, task_labels
from vlpbench.protocols.zero_shot import THRESHOLD_METRICS, class_thresholds, evaluate_statistics, metric_statistics

ID_COLUMN = "image_id"


def read_probabilities(path: Path, classes: list[str], *, single_column: bool) -> dict[str, np.ndarray]:
    """``{image_id: probabilities in classes order}`` from a predictions CSV.

    ``single_column``: a header of ``image_id`` and one other column is that one class's probability,
    whatever the column is called.

    Raises:
        DataError: naming the file, and the line and column where it applies, for an unreadable file,
            a header without ``image_id`` or with missing or unknown class columns, a row with the
            wrong number of fields, an empty or repeated id, or a value that is not a number in [0, 1].
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the predictions CSV ({type(e).__name__}: {e})") from e
    reader = csv.reader(text.splitlines())
    header = [name.strip() for name in next(reader, [])]
    expected = ", ".join([ID_COLUMN, *classes])
    if ID_COLUMN not in header:
        raise DataError(f"{path} line 1: no {ID_COLUMN!r} column; expected the columns {expected}")
    others = [name for name in header if name != ID_COLUMN]
    if single_column and len(others) == 1:
        columns = {classes[0]: header.index(others[0])}
    else:
        missing = [c for c in classes if c not in header]
        unknown = [name for name in others if name not in classes]
        repeated = sorted({name for name in header if header.count(name) > 1})
        if missing or unknown or repeated:
            problems = [f"{what} {', '.join(map(repr, names))}" for what, names in
                        (("lacks", missing), ("has unknown", unknown), ("repeats", repeated)) if names]
            raise DataError(f"{path} line 1: the header {'; '.join(problems)}; expected the columns {expected}")
        columns = {c: header.index(c) for c in classes}
    id_at = header.index(ID_COLUMN)
    rows: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataError(f"{path} line {line}: {len(fields)} fields, the header has {len(header)}")
        image_id = fields[id_at].strip()
        if not image_id:
            raise DataError(f"{path} line {line}: empty {ID_COLUMN}")
        if image_id in first_line:
            raise DataError(f"{path} line {line}: {ID_COLUMN} {image_id} repeats line {first_line[image_id]}")
        first_line[image_id] = line
        values = []
        for name, at in columns.items():
            text = fields[at].strip()
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not 0.0 <= value <= 1.0:  # also false for NaN
                raise DataError(f"{path} line {line} column {header[at]!r}: {text!r} is not a probability "
                                "(a number in [0, 1])")
            values.append(value)
        rows[image_id] = np.array(values)
    return rows


def _metric_names(config: dict[str, Any], kind: str) -> list[str]:
    names = config.get("metrics", ["acc"] if kind == "multiclass" else ["auc"])
    if not isinstance(names, list) or not names or not all(isinstance(m, str) for m in names):
        raise ConfigError(f"config key metrics must be a list of metric names, got {names!r}")
    return list(dict.fromkeys(names))


def score_classification(predictions: Path, source, ids: list[str], config: dict[str, Any], *,
                         val_ids: list[str] | None = None, bootstrap_resamples: int = 1000) -> dict[str, Any]:
    """The task's metrics of the probabilities in ``predictions`` on the images ``ids``.

    Returns ``{"metrics", "ci", "n", "thresholds", "notes"}``: ``thresholds`` per class (from the
    validation rows) or None, ``notes`` lists what was left out and why.

    Raises:
        DataError: a malformed CSV (see :func:`read_probabilities`), an image of ``ids`` without a row,
            a row for an image outside the split part (and its validation part), or validation rows for
            only some of the validation images.
        ConfigError: a bad task config.
    """
    predictions = Path(predictions)
    kind = label_kind(config)
    classes = class_names(config)
    wanted = _metric_names(config, kind)
    rows = read_probabilities(predictions, classes, single_column=kind == "binary")
    known = set(ids) | set(val_ids or ())
    if unknown := [i for i in rows if i not in known]:
        raise DataError(f"{predictions}: {len(unknown)} row(s) for images outside the split part scored "
                        f"(and its validation part), e.g. {', '.join(unknown[:3])}")
    if missing := [i for i in ids if i not in rows]:
        raise DataError(f"{predictions}: {len(missing)} of {len(ids)} images of the split part have no row, "
                        f"e.g. {', '.join(missing[:3])}")
    if not ids:
        raise DataError(f"{predictions}: the split part holds no images to score")

    labels = task_labels(source, ids, config)
    scores = np.stack([rows[i] for i in ids])
    notes: list[str] = []
    thresholds = None
    threshold_wanted = kind != "multiclass" and any(m in THRESHOLD_METRICS for m in wanted)
    if threshold_wanted:
        given = [i for i in (val_ids or ()) if i in rows]
        if val_ids and len(given) == len(val_ids):
            criterion = config.get("threshold_criterion", "f1")
            if criterion not in CRITERIA:
                raise ConfigError(f"config key threshold_criterion is {criterion!r}; expected one of "
                                  f"{', '.join(CRITERIA)}")
            val_labels = task_labels(source, val_ids, config)
            thresholds = class_thresholds(val_labels, np.stack([rows[i] for i in val_ids]), classes, criterion)
        elif given:
            raise DataError(f"{predictions}: rows for {len(given)} of the {len(val_ids)} validation images; give "
                            "all of them (thresholds come from validation) or none")
        else:
            left_out = [m for m in wanted if m in THRESHOLD_METRICS]
            wanted = [m for m in wanted if m not in THRESHOLD_METRICS]
            notes.append(f"{', '.join(left_out)} left out: they need thresholds chosen on validation images, and "
                         f"the CSV holds no validation rows{'' if val_ids else ' (the split has no val part)'}; "
                         "thresholds are never tuned on the images scored")
    statistics = metric_statistics(kind, labels, scores, classes, wanted, thresholds)
    metrics, ci = evaluate_statistics(statistics, len(ids), n_resamples=bootstrap_resamples, seed=0)
    return {"metrics": metrics, "ci": ci, "n": len(ids),
            "thresholds": None if thresholds is None else dict(zip(classes, thresholds)), "notes": notes}
