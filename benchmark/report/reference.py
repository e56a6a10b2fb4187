"""Published numbers as reported rows of a table: ``results/reference/*.json``.

One file per paper table. Schema (version 1)::

    schema       1
    kind         optional: ``published`` (numbers printed in a paper, the default) or ``reproduction`` (a
                 third-party measurement from a public thread: ``citation`` names the thread, ``table``
                 where in it). Reproduction files are read by the ledger (:mod:`vlpbench.ledger`) only,
                 never shown as reported rows
    citation     the publication, as the footnote prints it
    table        where in it the numbers are ("Table 1")
    url          optional link
    description  optional: what the table measured and how vlpbench tasks relate to it
    profile      the protocol profile whose records the numbers compare with: ``paper`` (the
                 reference code's settings, the default for a published table) or ``canonical``
    unit         "percent" (values as printed, divided by 100 on load) or "fraction"
    columns      [{"paper": "SIIM 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"}, ...]
                 (``paper``: the column's label, unique in the file; ``metric``: the vlpbench metric the
                 published column is, computed as the paper's code computed it under ``profile`` — e.g.
                 ``map_mgca`` for MGCA's image-skipping mAP; see :func:`vlpbench.metrics.metric_spec`; a
                 former name such as ``accuracy`` is read as the current one, ``acc``)
    rows         [{"method": "MGCA", "values": [49.7, 59.3, ...], "note": optional,
                   "checkpoint": optional, "not_comparable": optional}, ...]

(``note`` documents a row in the file, e.g. what a paper's asterisk means; tables do not print it.
``checkpoint`` is the id of the released file the row's numbers came from, an entry of
``checkpoints.json`` in the same folder (checked by the ledger); ``not_comparable`` maps a column's
``paper`` label to why the profile cannot reproduce that cell, for columns where the row has a value.)

``values`` has one entry per column, in column order: a number, or null where the paper prints "-"
or "/" (not reported). Each number keeps the precision it is printed with: half its last digit is the
rounding the ledger allows. Rows of one method and one citation are merged across files into one
reported row. A published row is shown only in the table of its profile, in the columns of its metric.
``checkpoints.json`` in the folder is no table: :func:`reference_files` skips it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.specs import metric_spec
from vlpbench.tasks import PROFILES

REFERENCE_SCHEMA = 1
CHECKPOINTS_FILE = "checkpoints.json"
KINDS = ("published", "reproduction")
_UNITS = {"percent": 100, "fraction": 1}
_TOP_KEYS = {"schema": True, "kind": False, "citation": True, "table": True, "url": False, "description": False,
             "profile": False, "unit": True, "columns": True, "rows": True}
DEFAULT_REFERENCE_PROFILE = "paper"
_COLUMN_KEYS = {"paper", "task", "frac", "metric"}
_ROW_KEYS = {"method": True, "values": True, "note": False, "checkpoint": False, "not_comparable": False}


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


@dataclass(frozen=True)
class PrintedValue:
    """One number of a reference file's row, with the column it stands in.

    ``value`` and ``half_ulp`` (half the last printed digit: 49.7 % → 0.0005) are in metric units.
    """

    column: int
    paper: str
    task: str
    frac: float
    metric: str
    value: float
    half_ulp: float


@dataclass(frozen=True)
class PublishedRow:
    """One row of a reference file: its non-null numbers, and the ledger's keys (``checkpoint`` id,
    ``not_comparable`` reasons by column ``paper`` label)."""

    method: str
    values: tuple[PrintedValue, ...]
    checkpoint: str | None = None
    not_comparable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceTable:
    """One reference file as read: ``rows`` in file order (``rows[i]`` is the file's ``rows[i]``)."""

    path: Path
    kind: str
    citation: str
    table: str
    url: str | None
    profile: str
    rows: tuple[PublishedRow, ...]


class _Printed(float):
    """A JSON number that remembers how it was printed, so its last printed digit is known."""

    text: str

    def __new__(cls, text: str) -> "_Printed":
        number = super().__new__(cls, text)
        number.text = text
        return number


def key_error(path: Path, key: str, expected: str, got: Any) -> DataError:
    """``DataError`` ``"<path>: key '<key>': expected <expected>, got <got>"``."""
    return DataError(f"{path}: key {key!r}: expected {expected}, got {got!r}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_keys(path: Path, where: str, obj: Any, spec: dict[str, bool]) -> None:
    """``obj`` (at key ``where`` of ``path``; ``""`` for the top level) is an object with every required key of
    ``spec`` ({key: required}) and no other.

    Raises:
        DataError: naming the file and the key.
    """
    if not isinstance(obj, dict):
        raise key_error(path, where or "(top level)", "an object", obj)
    prefix = f"{where}." if where else ""
    for key, required in spec.items():
        if required and key not in obj:
            raise DataError(f"{path}: missing key {prefix + key!r}")
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise DataError(f"{path}: unknown key {prefix + unknown[0]!r} (known: {', '.join(spec)})")


def read_json(path: Path, what: str, parse_float: Any = float) -> Any:
    """The JSON in ``path``.

    Raises:
        DataError: unreadable or not JSON; the message names the file and calls it ``what``.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_float=parse_float)
    except OSError as error:
        raise DataError(f"{path}: cannot read {what} ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON {what} ({error})") from error


def _half_ulp(value: int | float, scale: int) -> float:
    """Half the last digit ``value`` is printed with, divided by ``scale`` (exact in decimal, then rounded)."""
    exponent = Decimal(getattr(value, "text", str(value))).as_tuple().exponent
    return float(Decimal(5).scaleb(exponent - 1) / scale)


def read_reference_table(path: str | Path) -> ReferenceTable:
    """One reference file, every key checked (module docstring); rows keep their non-null values.

    Raises:
        DataError: the file is unreadable, not JSON, or breaks the schema (the message names the
            file and the key, e.g. ``rows[2].values``).
    """
    path = Path(path)
    data = read_json(path, "reference file", parse_float=_Printed)
    check_keys(path, "", data, _TOP_KEYS)
    if data["schema"] != REFERENCE_SCHEMA:
        raise key_error(path, "schema", f"{REFERENCE_SCHEMA}", data["schema"])
    kind = data.get("kind", KINDS[0])
    if kind not in KINDS:
        raise key_error(path, "kind", " or ".join(map(repr, KINDS)), kind)
    for key in ("citation", "table"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise key_error(path, key, "a non-empty string", data[key])
    if data.get("url") is not None and not isinstance(data["url"], str):
        raise key_error(path, "url", "a string", data["url"])
    profile = data.get("profile", DEFAULT_REFERENCE_PROFILE)
    if profile not in PROFILES:
        raise key_error(path, "profile", " or ".join(map(repr, PROFILES)), profile)
    if data["unit"] not in _UNITS:
        raise key_error(path, "unit", " or ".join(map(repr, _UNITS)), data["unit"])
    columns = _columns(path, data["columns"])
    labels = [column[0] for column in columns]

    if not isinstance(data["rows"], list) or not data["rows"]:
        raise key_error(path, "rows", "a non-empty list", data["rows"])
    rows: list[PublishedRow] = []
    for i, row in enumerate(data["rows"]):
        where = f"rows[{i}]"
        check_keys(path, where, row, _ROW_KEYS)
        if not isinstance(row["method"], str) or not row["method"].strip():
            raise key_error(path, f"{where}.method", "a non-empty string", row["method"])
        if any(seen.method == row["method"] for seen in rows):
            raise DataError(f"{path}: key '{where}.method': {row['method']!r} appears twice")
        if "note" in row and not isinstance(row["note"], str):
            raise key_error(path, f"{where}.note", "a string", row["note"])
        checkpoint = row.get("checkpoint")
        if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
            raise key_error(path, f"{where}.checkpoint", f"the id of an entry of {CHECKPOINTS_FILE}", checkpoint)
        values = _row_values(path, where, row["values"], columns, data["unit"])
        not_comparable = row.get("not_comparable", {})
        if not isinstance(not_comparable, dict):
            raise key_error(path, f"{where}.not_comparable", "an object {column paper label: reason}",
                            not_comparable)
        for label, reason in not_comparable.items():
            at = f"{where}.not_comparable.{label}"
            if label not in labels:
                raise key_error(path, at, f"a column's paper label ({', '.join(map(repr, labels))})", label)
            if not any(value.paper == label for value in values):
                raise DataError(f"{path}: key {at!r}: the row has no value in column {label!r}")
            if not isinstance(reason, str) or not reason.strip():
                raise key_error(path, at, "the reason as a non-empty string", reason)
        rows.append(PublishedRow(row["method"], values, checkpoint, dict(not_comparable)))
    return ReferenceTable(path, kind, data["citation"], data["table"], data.get("url"), profile, tuple(rows))


def _columns(path: Path, columns: Any) -> list[tuple[str, str, float, str]]:
    """The file's columns as (paper label, task, fraction, current metric name)."""
    if not isinstance(columns, list) or not columns:
        raise key_error(path, "columns", "a non-empty list", columns)
    checked: list[tuple[str, str, float, str]] = []
    for i, column in enumerate(columns):
        where = f"columns[{i}]"
        check_keys(path, where, column, dict.fromkeys(_COLUMN_KEYS, True))
        for key in ("paper", "task", "metric"):
            if not isinstance(column[key], str) or not column[key]:
                raise key_error(path, f"{where}.{key}", "a non-empty string", column[key])
        if not is_number(column["frac"]) or not 0 < column["frac"] <= 1:
            raise key_error(path, f"{where}.frac", "a training fraction in (0, 1]", column["frac"])
        try:
            metric = metric_spec(column["metric"]).name  # a former name reads as the current one
        except ConfigError as error:
            raise DataError(f"{path}: key '{where}.metric': {error}") from None
        key = (column["task"], float(column["frac"]), metric)
        for j, other in enumerate(checked):
            if other[1:] == key:
                raise DataError(f"{path}: key {where!r}: {key[0]} {key[1]:g} {key[2]} is already column {j}")
            if other[0] == column["paper"]:
                raise DataError(f"{path}: key '{where}.paper': {column['paper']!r} is already the label of "
                                f"column {j}")
        checked.append((column["paper"], *key))
    return checked


def _row_values(path: Path, where: str, values: Any, columns: list[tuple[str, str, float, str]],
                unit: str) -> tuple[PrintedValue, ...]:
    """The non-null numbers of one row's ``values``, in metric units."""
    scale = _UNITS[unit]
    if not isinstance(values, list) or len(values) != len(columns):
        raise key_error(path, f"{where}.values", f"a list of {len(columns)} entries (one per column)", values)
    printed = []
    for j, value in enumerate(values):
        if value is None:
            continue
        if not is_number(value) or not 0 <= value <= scale:
            raise key_error(path, f"{where}.values[{j}]", f"null or a number in [0, {scale}] ({unit})", value)
        paper, task, frac, metric = columns[j]
        printed.append(PrintedValue(j, paper, task, frac, metric, float(value) / scale, _half_ulp(value, scale)))
    return tuple(printed)


def load_reference_file(path: str | Path) -> list[ReferenceRow]:
    """The reported rows of one reference file, each with its non-null values.

    Raises:
        DataError: the file is unreadable, not JSON, or breaks the schema (the message names the
            file and the key, e.g. ``rows[2].values``).
    """
    return _reported_rows(read_reference_table(path))


def _reported_rows(table: ReferenceTable) -> list[ReferenceRow]:
    rows = []
    for row in table.rows:
        reported = ReferenceRow(row.method, table.citation, profile=table.profile)
        for value in row.values:
            key = (value.task, value.frac, value.metric)
            reported.values[key] = value.value
            reported.tables[key] = table.table
        rows.append(reported)
    return rows


def reference_files(folder: str | Path) -> list[Path]:
    """The reference files (``*.json`` but ``checkpoints.json``) of ``folder``, in name order.

    Raises:
        DataError: the folder does not exist or holds no reference file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"reference folder {folder} does not exist")
    files = sorted(path for path in folder.glob("*.json") if path.name != CHECKPOINTS_FILE)
    if not files:
        raise DataError(f"reference folder {folder} holds no *.json reference file")
    return files


def load_references(folder: str | Path) -> list[ReferenceRow]:
    """Reported rows of every published reference file in ``folder`` (files in name order; ``kind``
    ``reproduction`` files are left to the ledger), merged per (method, citation, profile).

    Raises:
        DataError: the folder does not exist or holds no reference file, a file breaks the schema,
            or two files give one method different numbers for the same cell.
    """
    merged: dict[tuple[str, str, str], ReferenceRow] = {}
    for path in reference_files(folder):
        table = read_reference_table(path)
        if table.kind != "published":
            continue
        for row in _reported_rows(table):
            into = merged.setdefault((row.method, row.citation, row.profile),
                                     ReferenceRow(row.method, row.citation, profile=row.profile))
            for key, value in row.values.items():
                if key in into.values and into.values[key] != value:
                    raise DataError(f"{path}: {row.method} {key[0]} {key[1]:g} {key[2]} = {value} but "
                                    f"{into.tables[key]} of the same citation gives {into.values[key]}")
                into.values[key] = value
                into.tables.setdefault(key, row.tables[key])
    return list(merged.values())


def shipped_reference_dir() -> Path:
    """The reference files shipped with vlpbench: the package ``vlpbench.reference_data`` (a wheel or an
    editable install), else the ``results/reference`` folder of the source checkout vlpbench runs from.

    Raises:
        ConfigError: neither exists.
    """
    import vlpbench

    spec = importlib.util.find_spec("vlpbench.reference_data")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location).is_dir():
            return Path(location)
    # An editable install cannot import vlpbench.reference_data: setuptools maps a folder without __init__.py
    # as a namespace package, which imports under the regular package vlpbench never look up.
    checkout = Path(vlpbench.__file__).resolve().parent.parent / "results" / "reference"
    if checkout.is_dir():
        return checkout
    raise ConfigError(f"vlpbench ships no reference files here: neither the package vlpbench.reference_data "
                      f"nor {checkout} exists (reinstall vlpbench)")


def default_reference_dir(results: str | Path) -> Path:
    """``<results>/reference`` when it exists, else the shipped reference files
    (:func:`shipped_reference_dir`).

    Raises:
        ConfigError: neither exists; pass a folder.
    """
    local = Path(results) / "reference"
    if local.is_dir():
        return local
    try:
        return shipped_reference_dir()
    except ConfigError as error:
        raise ConfigError(f"--reference: {local} does not exist and {error}; pass the folder of "
                          f"reference files (--reference DIR)") from None
