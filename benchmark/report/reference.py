"""Published numbers as reported rows of a table: ``results/reference/*.json``.

One file per paper table. Schema (version 1)::

    schema       1
    citation     the publication, as the footnote prints it
    table        where in it the numbers are ("Table 1")
    url          optional link
    description  optional: what the table measured and how vlpbench tasks relate to it
    profile      the protocol profile whose records the numbers compare with: ``paper`` (the
                 reference code's settings, the default for a published table) or ``canonical``
    unit         "percent" (values as printed, divided by 100 on load) or "fraction"
    columns      [{"paper": "SIIM 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"}, ...]
                 (``metric``: the vlpbench metric the published column is, computed as the paper's code
                 computed it under ``profile`` — e.g. ``map_mgca`` for MGCA's image-skipping mAP; see
                 :func:`vlpbench.metrics.metric_spec`; a former name such as ``accuracy`` is read as
                 the current one, ``acc``)
    rows         [{"method": "MGCA", "values": [49.7, 59.3, ...], "note": optional}, ...]

(``note`` documents a row in the file, e.g. what a paper's asterisk means; tables do not print it.)

``values`` has one entry per column, in column order: a number, or null where the paper prints "-"
or "/" (not reported). Rows of one method and one citation are merged across files into one
reported row. A published row is shown only in the table of its profile, in the columns of its metric.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.specs import metric_spec
from vlpbench.tasks import PROFILES

REFERENCE_SCHEMA = 1
_UNITS = {"percent": 100.0, "fraction": 1.0}
_TOP_KEYS = {"schema": True, "citation": True, "table": True, "url": False, "description": False,
             "profile": False, "unit": True, "columns": True, "rows": True}
DEFAULT_REFERENCE_PROFILE = "paper"
_COLUMN_KEYS = {"paper", "task", "frac", "metric"}
_ROW_KEYS = {"method": True, "values": True, "note": False}


@dataclass
class ReferenceRow:
    """One method's published numbers from one publication (possibly several of its tables).

    ``values`` and ``tables`` are keyed by (task, fraction, metric); values are in metric units
    (fractions, like result records).
    """

    method: str
    citation: str
    values: dict[tuple[str, float, str], float] = field(default_factory=dict)
    tables: dict[tuple[str, float, str], str] = field(default_factory=dict)
    profile: str = DEFAULT_REFERENCE_PROFILE


def _fail(path: Path, key: str, expected: str, got: Any) -> DataError:
    return DataError(f"{path}: key {key!r}: expected {expected}, got {got!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(path: Path, where: str, obj: Any, spec: dict[str, bool]) -> None:
    if not isinstance(obj, dict):
        raise _fail(path, where or "(top level)", "an object", obj)
    prefix = f"{where}." if where else ""
    for key, required in spec.items():
        if required and key not in obj:
            raise DataError(f"{path}: missing key {prefix + key!r}")
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise DataError(f"{path}: unknown key {prefix + unknown[0]!r} (known: {', '.join(spec)})")


def load_reference_file(path: str | Path) -> list[ReferenceRow]:
    """The reported rows of one reference file, each with its non-null values.

    Raises:
        DataError: the file is unreadable, not JSON, or breaks the schema (the message names the
            file and the key, e.g. ``rows[2].values``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(f"{path}: cannot read reference file ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON reference file ({error})") from error
    _check_keys(path, "", data, _TOP_KEYS)
    if data["schema"] != REFERENCE_SCHEMA:
        raise _fail(path, "schema", f"{REFERENCE_SCHEMA}", data["schema"])
    for key in ("citation", "table"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _fail(path, key, "a non-empty string", data[key])
    profile = data.get("profile", DEFAULT_REFERENCE_PROFILE)
    if profile not in PROFILES:
        raise _fail(path, "profile", " or ".join(map(repr, PROFILES)), profile)
    if data["unit"] not in _UNITS:
        raise _fail(path, "unit", " or ".join(map(repr, _UNITS)), data["unit"])
    scale = _UNITS[data["unit"]]

    if not isinstance(data["columns"], list) or not data["columns"]:
        raise _fail(path, "columns", "a non-empty list", data["columns"])
    columns = []
    for i, column in enumerate(data["columns"]):
        where = f"columns[{i}]"
        _check_keys(path, where, column, dict.fromkeys(_COLUMN_KEYS, True))
        for key in ("paper", "task", "metric"):
            if not isinstance(column[key], str) or not column[key]:
                raise _fail(path, f"{where}.{key}", "a non-empty string", column[key])
        if not _is_number(column["frac"]) or not 0 < column["frac"] <= 1:
            raise _fail(path, f"{where}.frac", "a training fraction in (0, 1]", column["frac"])
        try:
            metric = metric_spec(column["metric"]).name  # a former name reads as the current one
        except ConfigError as error:
            raise DataError(f"{path}: key '{where}.metric': {error}") from None
        key = (column["task"], float(column["frac"]), metric)
        if key in columns:
            raise DataError(f"{path}: key {where!r}: {key[0]} {key[1]:g} {key[2]} is already column "
                            f"{columns.index(key)}")
        columns.append(key)

    if not isinstance(data["rows"], list) or not data["rows"]:
        raise _fail(path, "rows", "a non-empty list", data["rows"])
    rows: dict[str, ReferenceRow] = {}
    for i, row in enumerate(data["rows"]):
        where = f"rows[{i}]"
        _check_keys(path, where, row, _ROW_KEYS)
        if not isinstance(row["method"], str) or not row["method"].strip():
            raise _fail(path, f"{where}.method", "a non-empty string", row["method"])
        if row["method"] in rows:
            raise DataError(f"{path}: key '{where}.method': {row['method']!r} appears twice")
        values = row["values"]
        if not isinstance(values, list) or len(values) != len(columns):
            raise _fail(path, f"{where}.values", f"a list of {len(columns)} entries (one per column)",
                        values)
        if "note" in row and not isinstance(row["note"], str):
            raise _fail(path, f"{where}.note", "a string", row["note"])
        reported = ReferenceRow(row["method"], data["citation"], profile=profile)
        for j, value in enumerate(values):
            if value is None:
                continue
            if not _is_number(value) or not 0 <= value <= scale:
                raise _fail(path, f"{where}.values[{j}]", f"null or a number in [0, {scale:g}] ({data['unit']})",
                            value)
            reported.values[columns[j]] = value / scale
            reported.tables[columns[j]] = data["table"]
        rows[row["method"]] = reported
    return list(rows.values())


def load_references(folder: str | Path) -> list[ReferenceRow]:
    """Reported rows of every ``*.json`` file in ``folder`` (files in name order), merged per
    (method, citation, profile).

    Raises:
        DataError: the folder does not exist or holds no reference file, a file breaks the schema,
            or two files give one method different numbers for the same cell.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"reference folder {folder} does not exist")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"reference folder {folder} holds no *.json reference file")
    merged: dict[tuple[str, str, str], ReferenceRow] = {}
    for path in files:
        for row in load_reference_file(path):
            into = merged.setdefault((row.method, row.citation, row.profile),
                                     ReferenceRow(row.method, row.citation, profile=row.profile))
            for key, value in row.values.items():
                if key in into.values and into.values[key] != value:
                    raise DataError(f"{path}: {row.method} {key[0]} {key[1]:g} {key[2]} = {value} but "
                                    f"{into.tables[key]} of the same citation gives {into.values[key]}")
                into.values[key] = value
                into.tables.setdefault(key, row.tables[key])
    return list(merged.values())


def default_reference_dir(results: str | Path) -> Path:
    """``<results>/reference`` when it exists, else the ``results/reference`` folder of the
    vlpbench source checkout.

    Raises:
        ConfigError: neither exists (e.g. an installed wheel without the checkout); pass a folder.
    """
    import vlpbench

    local = Path(results) / "reference"
    if local.is_dir():
        return local
    shipped = Path(vlpbench.__file__).resolve().parent.parent / "results" / "reference"
    if shipped.is_dir():
        return shipped
    raise ConfigError(f"--reference: neither {local} nor {shipped} exists; pass the folder of "
                      f"reference files (--reference DIR)")
