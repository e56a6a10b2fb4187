"""The reproduction ledger: does a released checkpoint give the paper's number?

Every number of a reference file (:mod:`vlpbench.report.reference`) in a row with a ``checkpoint`` is a
:class:`LedgerCell`: the published (or third-party, ``kind: reproduction``) value, its source, the protocol
profile, and the released file it came from, an entry of ``checkpoints.json`` in the same folder::

    {"schema": 1,
     "checkpoints": {"medklip": {"model": "medklip", "file": "checkpoint_final.pth",
                                 "published_by": "MediaBrain-SJTU/MedKLIP README (Google Drive / Baidu)",
                                 "url": "https://github.com/MediaBrain-SJTU/MedKLIP", "released": true,
                                 "sha256": null, "size": null, "note": "optional"}}}

``model`` is a registered adapter; ``released`` is false where the authors published no weights;
``sha256`` (64 lowercase hex digits) and ``size`` (bytes) only where the authors publish them, else null or
absent, as are ``url`` and ``note``. ``overrides`` (optional): task options every run of the entry's cells
takes, as ``--set`` gives them (G2D's encoder+decoder file is the ``init_decoder: true`` run); only records with
exactly these overrides measure its cells.

:func:`measured_cell` summarises a user's records of a cell (:class:`Measured`) and :func:`verdict` sets it
beside the published number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vlpbench.errors import ConfigError, DataError
from vlpbench.report.layout import version_label, version_sort_key
from vlpbench.report.reference import (CHECKPOINTS_FILE, KINDS, REFERENCE_SCHEMA, ReferenceTable, check_keys,
                                       key_error, read_json, read_reference_table, reference_files,
                                       shipped_reference_dir)
from vlpbench.report.table import ci_bounds, current_names, split_identity, table_rows
from vlpbench.results import record_path, record_profile

__all__ = ["CheckpointEntry", "LedgerCell", "Measured", "Verdict", "VERDICTS", "ledger_cells", "load_checkpoints",
           "load_ledger", "measured_cell", "shipped_reference_dir", "verdict"]

VERDICTS = ("reproduced", "below", "above", "not comparable", "not run")
# Two-sided 95 % normal quantile: the training-randomness half-width of the seed mean (measured_cell).
_Z95 = 1.96
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = {"model": True, "file": True, "published_by": True, "url": False, "released": True,
               "sha256": False, "size": False, "note": False, "overrides": False}


@dataclass(frozen=True)
class CheckpointEntry:
    """A released checkpoint file: which adapter loads it, who published it where, and its published hash and
    size (None where the authors publish none)."""

    id: str
    model: str
    file: str
    published_by: str
    url: str | None
    released: bool
    sha256: str | None
    size: int | None
    note: str | None
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def options(self) -> dict[str, object]:
        """The task options every run of this entry's cells takes (``--set``)."""
        return dict(self.overrides)


@dataclass(frozen=True)
class LedgerCell:
    """One published (or third-party) number that a vlpbench task and profile reproduce.

    ``value`` and ``half_ulp`` (half the last printed digit: 49.7 % → 0.0005) are in metric units, like
    records; ``row`` and ``column`` are the method and the column's ``paper`` label in the reference file;
    ``not_comparable`` is why the profile cannot reproduce the cell's setting, or None.
    """

    model: str
    checkpoint: CheckpointEntry
    task: str
    frac: float
    metric: str
    profile: str
    value: float
    half_ulp: float
    citation: str
    table: str
    row: str
    column: str
    url: str | None
    kind: str
    not_comparable: str | None


@dataclass(frozen=True)
class Measured:
    """A user's measurement of a cell: the seed mean, its sample std (ddof=1; None for one seed), the seeds,
    the CI of the mean (:func:`measured_cell`), the checkpoint's sha256 and the records' paths under the
    results folder."""

    mean: float
    std: float | None
    n_seeds: int
    seeds: tuple[int, ...]
    ci_low: float
    ci_high: float
    checkpoint_sha256: str
    records: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """How a measurement stands to the published number (:func:`verdict`).

    ``kind`` is one of :data:`VERDICTS`; ``difference`` is measured mean − published value; ``widths`` the
    distance from the CI's nearest bound to the published value in CI widths (0 when reproduced); ``reason``
    the cell's ``not_comparable`` reason.
    """

    kind: str
    difference: float | None
    widths: float | None
    reason: str | None


def load_checkpoints(path: str | Path) -> dict[str, CheckpointEntry]:
    """The entries of a ``checkpoints.json`` (module docstring), by id, every key checked.

    Raises:
        DataError: the file is unreadable, not JSON, or breaks the schema; the message names the file and
            the key (``checkpoints.medklip.sha256``). An unregistered adapter name is such an error.
    """
    from vlpbench.adapters import adapter_names

    path = Path(path)
    data = read_json(path, "checkpoint list")
    check_keys(path, "", data, {"schema": True, "checkpoints": True})
    if data["schema"] != REFERENCE_SCHEMA:
        raise key_error(path, "schema", f"{REFERENCE_SCHEMA}", data["schema"])
    if not isinstance(data["checkpoints"], dict):
        raise key_error(path, "checkpoints", "an object {id: entry}", data["checkpoints"])
    models = adapter_names()
    entries = {}
    for name, entry in data["checkpoints"].items():
        where = f"checkpoints.{name}"
        if not _ID.fullmatch(name):
            raise key_error(path, where, "an id of letters, digits, '.', '_' and '-'", name)
        check_keys(path, where, entry, _ENTRY_KEYS)
        for key in ("model", "file", "published_by"):
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise key_error(path, f"{where}.{key}", "a non-empty string", entry[key])
        if entry["model"] not in models:
            raise key_error(path, f"{where}.model", f"a registered model ({', '.join(models)})", entry["model"])
        for key in ("url", "note"):
            if entry.get(key) is not None and (not isinstance(entry[key], str) or not entry[key].strip()):
                raise key_error(path, f"{where}.{key}", "null or a non-empty string", entry[key])
        if entry.get("url") is not None and not entry["url"].startswith(("https://", "http://")):
            raise key_error(path, f"{where}.url", "null or an http(s) address", entry["url"])
        if not isinstance(entry["released"], bool):
            raise key_error(path, f"{where}.released", "true or false", entry["released"])
        sha256, size = entry.get("sha256"), entry.get("size")
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
            raise key_error(path, f"{where}.sha256", "null or 64 lowercase hex digits", sha256)
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise key_error(path, f"{where}.size", "null or the file's size in bytes (a positive integer)", size)
        if not entry["released"] and (sha256 is not None or size is not None):
            raise DataError(f"{path}: key '{where}.{'sha256' if sha256 is not None else 'size'}': expected null, "
                            f"the checkpoint is not released")
        overrides = entry.get("overrides", {})
        if not isinstance(overrides, dict) or not all(isinstance(key, str) and key for key in overrides):
            raise key_error(path, f"{where}.overrides", "an object {task option: value}", overrides)
        entries[name] = CheckpointEntry(name, entry["model"], entry["file"], entry["published_by"], entry.get("url"),
                                        entry["released"], sha256, size, entry.get("note"),
                                        tuple(sorted(overrides.items())))
    return entries


def load_ledger(folder: str | Path | None = None) -> list[LedgerCell]:
    """Every ledger cell of the reference files in ``folder`` (default: :func:`shipped_reference_dir`), in file,
    row and column order; a number printed identically in two tables of one source is listed once (a
    not-comparable cell stays with its own table).

    Raises:
        DataError: a reference file or ``checkpoints.json`` breaks its schema, a row names a checkpoint id that
            ``checkpoints.json`` lacks, a cell's task is unknown or lacks the file's profile (a task whose
            ``paper`` profile is unavailable holds no paper cell), or two tables of one source disagree on a
            comparable cell; each message names the file and the key.
    """
    folder = shipped_reference_dir() if folder is None else Path(folder)
    checkpoints_path = folder / CHECKPOINTS_FILE
    checkpoints = load_checkpoints(checkpoints_path) if checkpoints_path.is_file() else {}
    profiles: dict[str, dict[str, str | None]] = {}
    cells: dict[tuple, LedgerCell] = {}
    for path in reference_files(folder):
        table = read_reference_table(path)
        for i, row in enumerate(table.rows):
            if row.checkpoint is None:
                continue
            if row.checkpoint not in checkpoints:
                known = ", ".join(checkpoints) if checkpoints else f"none: {checkpoints_path} holds none or is missing"
                raise key_error(path, f"rows[{i}].checkpoint", f"an id of {checkpoints_path} ({known})",
                                row.checkpoint)
            entry = checkpoints[row.checkpoint]
            for value in row.values:
                _check_profile(table, i, value.column, value.task, profiles)
                cell = LedgerCell(entry.model, entry, value.task, value.frac, value.metric, table.profile, value.value,
                                  value.half_ulp, table.citation, table.table, row.method, value.paper, table.url,
                                  table.kind, row.not_comparable.get(value.paper))
                # A cell the profile cannot reproduce keeps its own table: one source may print the same cell
                # under another setting (G2D Table 7 fine-tunes on MedKLIP's split, Table 3 on KAD's). Each row
                # of a thread is its own measurement (two users of one checkpoint in KAD#19).
                key = (cell.citation, cell.kind, entry.id, cell.task, cell.frac, cell.metric, cell.profile,
                       cell.table if cell.not_comparable else None,
                       cell.row if cell.kind == "reproduction" else None)
                if key in cells and cells[key].value != cell.value:
                    raise DataError(f"{path}: key 'rows[{i}].values[{value.column}]': {cell.row} {cell.task} "
                                    f"{cell.frac:g} {cell.metric} = {cell.value} but {cells[key].table} of the same "
                                    f"source gives {cells[key].value} for checkpoint {entry.id}")
                cells.setdefault(key, cell)
    return list(cells.values())


def _check_profile(table: ReferenceTable, row: int, column: int, task: str,
                   profiles: dict[str, dict[str, str | None]]) -> None:
    """DataError unless ``task`` is a shipped task with the file's profile; ``profiles`` caches each task's
    profiles ({name: why unavailable, or None})."""
    from vlpbench.tasks import DEFAULT_PROFILE, load_task, task_names

    if task not in profiles:
        if task not in task_names():
            raise key_error(table.path, f"columns[{column}].task", f"a task ({', '.join(task_names())})", task)
        profiles[task] = {name: spec.unavailable for name, spec in load_task(task).profiles.items()}
        profiles[task][DEFAULT_PROFILE] = None
    if table.profile not in profiles[task]:
        why = f"task {task} declares no {table.profile!r} profile"
    elif profiles[task][table.profile] is not None:
        why = f"task {task} has no {table.profile!r} profile: {profiles[task][table.profile]}"
    else:
        return
    raise DataError(f"{table.path}: key 'profile': rows[{row}].values[{column}] is a {table.profile} ledger cell, "
                    f"but {why}")


def ledger_cells(cells: Iterable[LedgerCell], *, model: str | None = None, tasks: Iterable[str] | None = None,
                 kind: str | None = None) -> list[LedgerCell]:
    """The cells of one adapter (``model``), of some ``tasks`` and of one ``kind`` (``published`` or
    ``reproduction``); None keeps every one.

    Raises:
        ConfigError: ``kind`` is neither.
    """
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"ledger kind {kind!r}: expected {' or '.join(map(repr, KINDS))}")
    wanted = None if tasks is None else {tasks} if isinstance(tasks, str) else set(tasks)
    return [cell for cell in cells if (model is None or cell.model == model)
            and (wanted is None or cell.task in wanted) and (kind is None or cell.kind == kind)]


def _sha256(record: dict) -> str | None:
    return (record["model"].get("checkpoint") or {}).get("sha256")


def _measures(record: dict, cell: LedgerCell) -> bool:
    """``record`` is a run of the cell's adapter, task, fraction and profile, with a checkpoint, as the profile
    defines the protocol: no ``--set`` overrides but the checkpoint entry's own, fp32, real data."""
    config = record.get("config") or {}
    return (record["model"].get("adapter") == cell.model and record["task"]["name"] == cell.task
            and float(record["frac"]) == cell.frac and record_profile(record) == cell.profile
            and _sha256(record) is not None and (config.get("overrides") or {}) == cell.checkpoint.options
            and config.get("precision", "fp32") == "fp32" and not (record.get("data") or {}).get("synthetic"))


def measured_cell(records: list[dict], cell: LedgerCell, *, checkpoint_sha256: str | None = None) -> Measured | None:
    """The measurement of ``cell`` in ``records`` (valid records, as :func:`vlpbench.results.scan_records` reads
    them), or None when none measures it.

    A record measures the cell when its adapter (``model.adapter``), task, fraction and profile are the cell's,
    it ran a checkpoint (``checkpoint_sha256``'s, if given) and the protocol as the profile defines it: records
    with ``--set`` overrides other than the checkpoint entry's ``overrides``, another precision than fp32 or synthetic data are no reproduction and are left
    out. Metrics are read under their current names, as tables read them
    (:func:`vlpbench.report.table.table_rows`, which also gives the seed mean and std).

    The CI of the seed mean is a normal approximation over two sources: test-set sampling, the mean over seeds
    of each seed's bootstrap half-width (value − low, and high − value, kept apart; every seed tests on the same
    images, so it does not shrink with n), and training randomness, 1.96 × std / √n; each side is their root sum
    of squares. One seed: its bootstrap CI.

    Raises:
        DataError: the records come from several checkpoints (and no ``checkpoint_sha256`` picks one), from
            several task versions or splits (naming each), lack the metric, hold it as null or without a
            bootstrap CI, or repeat a seed.
    """
    chosen = [current_names(r) for r in records if _measures(r, cell)]
    if checkpoint_sha256 is not None:
        chosen = [r for r in chosen if _sha256(r) == checkpoint_sha256]
    if not chosen:
        return None
    what = f"{cell.model} {cell.task} frac {cell.frac:g} ({cell.profile})"
    shas = sorted({_sha256(r) for r in chosen})
    if len(shas) > 1:
        raise DataError(f"the records of {what} come from {len(shas)} checkpoints ({', '.join(s[:8] for s in shas)}): "
                        f"give the sha256 of the one to measure")
    identities = sorted({(r["task"]["version"], split_identity(r["split"])) for r in chosen},
                        key=lambda ident: (version_sort_key(ident[0]), ident[1]))
    if len(identities) > 1:
        named = " and ".join(f"{cell.task} {version_label(v)} split {s[:8]}" for v, s in identities)
        raise DataError(f"the records of {what} come from several task versions or splits: {named}; keep the "
                        f"records of one")
    for record in chosen:
        if record["metrics"].get(cell.metric) is None:
            held = "holds a null" if cell.metric in record["metrics"] else "holds no"
            raise DataError(f"{record_path('', record)}: {held} {cell.metric}, the metric of the ledger cell")
        if ci_bounds(record, cell.metric) is None:
            raise DataError(f"{record_path('', record)}: no bootstrap CI of {cell.metric}: a verdict needs one")
    # One checkpoint under several --name labels is one measurement: tabulate under the adapter's name.
    same_name = [{**r, "model": {**r["model"], "name": cell.model}} for r in chosen]
    (row,) = [row for row in table_rows(same_name, [cell.metric]) if row["metric"] == cell.metric]
    mean, n = row["mean"], row["n_seeds"]
    if n == 1:
        low, high = row["ci_low"], row["ci_high"]
    else:
        training = _Z95 * row["std"] / math.sqrt(n)
        low = mean - math.hypot(mean - row["ci_low"], training)
        high = mean + math.hypot(row["ci_high"] - mean, training)
    paths = sorted(chosen, key=lambda r: r["seed"])
    return Measured(mean, row["std"], n, tuple(row["seeds"]), low, high, shas[0],
                    tuple(str(record_path("", r)) for r in paths))


def verdict(cell: LedgerCell, measured: Measured | None) -> Verdict:
    """How ``measured`` stands to the published ``cell``.

    ``reproduced`` when the published value, widened by its rounding (± ``half_ulp``), overlaps the measured CI;
    ``below`` / ``above`` when the CI lies entirely under / over it (the measurement is below / above the
    paper; ``widths`` is infinite for a zero-width CI); ``not comparable`` when the cell has a ``not_comparable``
    reason (with the difference when measured; no widths: the distance judges nothing); ``not run`` when nothing
    measured it.
    """
    if cell.not_comparable is not None:
        difference = None if measured is None else measured.mean - cell.value
        return Verdict("not comparable", difference, None, cell.not_comparable)
    if measured is None:
        return Verdict("not run", None, None, None)
    difference = measured.mean - cell.value
    low, high = measured.ci_low, measured.ci_high
    if low <= cell.value + cell.half_ulp and high >= cell.value - cell.half_ulp:
        return Verdict("reproduced", difference, 0.0, None)
    width = high - low
    distance = cell.value - high if high < cell.value else low - cell.value
    widths = distance / width if width > 0 else math.inf
    return Verdict("below" if high < cell.value else "above", difference, widths, None)
