"""Result records: one JSON file per (model, checkpoint, task, fraction, seed).

A record is the only thing tables, plots and comparisons read. Its fields (schema version 1)::

    schema          int, SCHEMA_VERSION of the code that wrote it
    model           {name, adapter, checkpoint: {path, sha256} | null, layout, ...}
    task            {name, version, protocol?, profile?, higher_is_better?, file?, ...}; profile is the protocol
                    profile the run resolved (``canonical`` where absent, as in records written before profiles
                    existed); higher_is_better is the primary metric's direction, kept for readers of
                    the file (tables read it from the metric's spec); file is {path, sha256} of a user's task
                    file (``--task-file``), whose records always carry their protocol, so that readers need
                    neither the file nor a shipped task of that name
    frac, seed      training-data fraction in (0, 1] and the seed (split draw and head init)
    split           {dataset, version, sha256} of the split files the run used
    metrics         {name: value | null}; primary_metric names the headline one. Every name is a
                    metric of vlpbench.metrics (metric_spec); a record written under a former name
                    (``accuracy``, now ``acc``) still loads, and tables and compare read it as the
                    current name (vlpbench.report.table.table_rows)
    ci              {metric: bootstrap_ci(...) result} | null
    n               {train, val, test} image counts actually used
    config          the fully resolved protocol config; config["overrides"] holds what the user set
    timing          wall-clock seconds per phase
    env             {vlpbench, git, python, torch, cuda, device, torch_threads?}; torch_threads is torch's
                    intra-op thread count (vlpbench.threads), absent in records written before it existed
    data            {synthetic, ...} | null, facts about the data the run saw
    per_image       per-image scores | null, so CIs and new aggregates need no re-run
    calibration?    classification only: {n_bins, binning, confidence, curves: {class | top_label: {lower,
                    upper, confidence, frequency, count}}}, the equal-width reliability bins of the test
                    probabilities (vlpbench.protocols.calibration), or {left_out: why} where the scores are
                    no probabilities; absent in older records and for other protocols
    subgroups?      {attribute (sex|age|view|site): {metric, groups: [{group, n, positives?,
                    value, ci {low, high, skipped} | null} or {group, n, positives?, value: null, reason}],
                    gap: {high, low, value, ci} | null, gap_reason?, n_resamples, level, seed, min_items,
                    min_positives, age_bins? (age), note?} or {metric, reason}}: the primary metric per
                    subgroup of the test images (vlpbench.metrics.subgroups); absent where the dataset's
                    files carry no attribute, and in records written before subgroups existed
    evidence?       {file, sha256}: the sidecar ``<record stem>.evidence.npz`` beside the record, from which
                    every metric it does not list as untestable is recomputed on any weighting of the test
                    items (paired tests between models, subgroups; vlpbench.evidence); absent in records
                    written before it existed
    created         UTC ISO-8601 time of make_record

Files live at ``<results>/runs/<model>/<sha256[:8] | nockpt>/<task>.v<version>[-<profile>]/frac<f>-seed<s>.json``
(the profile only where it is not ``canonical``),
are written atomically and are never overwritten silently.

Writing refuses a record that reading would refuse (:func:`written_problem`), so vlpbench never writes what it
cannot read back. Reading validates a record against this schema (its ``schema`` version first: a newer one is refused with a
message saying so) and then every number in it (:mod:`vlpbench.record_values`: finite, in the metric's range,
CI bounds ordered, aggregates equal to the mean of the per-image scores they summarise). :func:`load_record`
and :func:`load_records` raise on an invalid record; :func:`scan_records` returns the valid records and the
invalid ones (:class:`InvalidRecord`), so readers can skip a bad file with a warning and show the rest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import vlpbench
from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.files import atomic_write, backup_path
from vlpbench.metrics.calibration import check_calibration_entry
from vlpbench.metrics.specs import metric_spec
from vlpbench.metrics.subgroups import record_problem as subgroups_problem
from vlpbench.record_values import values_problem
from vlpbench.tasks import DEFAULT_PROFILE, PROFILES

SCHEMA_VERSION = 1

_ROUND_DECIMALS = 6
_GIT_TIMEOUT_S = 5.0
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def make_record(*, model: dict, task: dict, frac: float, seed: int, split: dict, metrics: dict,
                primary_metric: str, n: dict, config: dict, timing: dict, ci: dict | None = None,
                per_image: dict | None = None, data: dict | None = None, calibration: dict | None = None,
                subgroups: dict | None = None) -> dict:
    """Assemble a result record, adding ``schema``, ``env`` and ``created``.

    The arguments are stored as given (see the module docstring for their shapes; ``calibration`` and
    ``subgroups`` only when not None); rounding to 6
    decimals and conversion of numpy values happen when the record is written.

    Raises:
        ConfigError: a required field is missing or invalid (e.g. ``primary_metric`` not in
            ``metrics``, ``frac`` outside (0, 1]), a metric is not named as its spec names it, or the record
            holds what reading it back would refuse (:func:`written_problem`: a number outside its metric's
            range or not finite, an aggregate that is not the mean of its per-image scores, no
            ``env.vlpbench``); the message names the key.
    """
    record = {
        "schema": SCHEMA_VERSION,
        "model": model,
        "task": task,
        "frac": frac,
        "seed": seed,
        "split": split,
        "metrics": metrics,
        "primary_metric": primary_metric,
        "ci": ci,
        "n": n,
        "config": config,
        "timing": timing,
        "env": environment(),
        "data": data,
        "per_image": per_image,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if calibration is not None:
        record["calibration"] = calibration
    if subgroups is not None:
        record["subgroups"] = subgroups
    problem = _problem(record) or _metric_name_problem(record) or written_problem(record)
    if problem:
        raise ConfigError(f"result record: {problem}")
    return record


def written_problem(record: dict) -> str | None:
    """What reading ``record`` back would refuse, as a message naming the key, or None; ``record`` has passed
    :func:`_problem`.

    The numbers are checked as they will be written (:func:`_jsonable`: rounded, a NaN metric or CI bound as
    null, meaning undefined) by :func:`vlpbench.record_values.values_problem`, so vlpbench never writes a
    record it would refuse to read. Before that, an infinite metric or CI bound, or a per-image score that is
    not finite, is refused under its own value: writing it as null would change its meaning silently.
    """
    return _non_finite_problem(record) or values_problem(_jsonable(record))


def _non_finite_problem(record: dict) -> str | None:
    ci = record["ci"] if isinstance(record["ci"], dict) else {}
    numbers = [(f"metrics.{name}", value, math.isinf) for name, value in record["metrics"].items()]
    numbers += [(f"ci.{name}.{bound}", entry[bound], math.isinf) for name, entry in ci.items()
                if isinstance(entry, dict) for bound in ("low", "high") if bound in entry]
    per_image = record.get("per_image")
    if isinstance(per_image, dict):
        numbers += [(f"per_image.{key}", value, lambda v: not math.isfinite(v)) for key, value in per_image.items()]
    for key, value, bad in numbers:
        if isinstance(value, (float, np.floating)) and bad(value):
            return f"invalid key {key!r}: {float(value)!r} is not a finite number"
    return None


def _metric_name_problem(record: dict) -> str | None:
    """Why a metric name of a new record is not the current name of a registered metric, or None."""
    ci = record["ci"] if isinstance(record["ci"], dict) else {}
    for where, names in (("metrics", record["metrics"]), ("ci", ci)):
        for name in names:
            try:
                current = metric_spec(name).name
            except ConfigError as error:
                return f"invalid key '{where}.{name}': {error}"
            if current != name:
                return f"invalid key '{where}.{name}': {name!r} is the former name of {current!r}"
    return None


def environment() -> dict[str, Any]:
    """What produced a record: package version, source commit, Python, torch, CUDA, device and torch's
    intra-op thread count."""
    import torch

    device = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return {
        "vlpbench": vlpbench.__version__,
        "git": _git_commit(Path(vlpbench.__file__).resolve().parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }


def _git(source: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_commit(source: Path) -> str | None:
    """HEAD of the checkout holding ``source`` (+ "-dirty" if it has changes), else None."""
    commit = _git(source, "rev-parse", "HEAD")
    # An installed copy can sit inside some unrelated repository (a venv in a project folder):
    # only trust HEAD if git actually tracks our own files.
    if not commit or _git(source, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    status = _git(source, "status", "--porcelain")
    return commit.strip() + ("-dirty" if status is None or status.strip() else "")


def _safe(name: Any) -> str:
    """``name`` reduced to path-safe characters; never empty, never starting with a dot."""
    return _UNSAFE_PATH_CHARS.sub("_", str(name)).lstrip(".") or "_"


def _format_frac(frac: float) -> str:
    # Rounded as on write, so a record read back maps to the same file; repr is the shortest
    # round-tripping form: 0.01, 0.1, 1.0.
    return repr(round(float(frac), _ROUND_DECIMALS))


def record_profile(record: dict) -> str:
    """The protocol profile a record ran (``canonical`` for records that do not say)."""
    return record["task"].get("profile") or DEFAULT_PROFILE


def record_path(results_dir: str | os.PathLike, record: dict) -> Path:
    """Where ``record`` lives: ``runs/<model>/<sha256[:8]|nockpt>/<task>.v<version>[-<profile>]/frac<f>-seed<s>[-<o>].json``.

    ``<profile>`` appears for a profile other than ``canonical``, so a ``paper`` run never replaces a
    canonical one.

    ``<o>`` is a short hash of ``config.overrides`` (and of ``config.precision`` unless fp32) when there
    are any, so a run with non-default task options or precision never replaces the canonical one.
    Only ``model.name``, ``model.checkpoint``, ``task.name``, ``task.version``, ``task.profile``, ``frac``, ``seed``,
    ``config.overrides`` and ``config.precision`` are read, so a stub with those fields is enough. Names are reduced to ``[A-Za-z0-9._-]``.
    """
    model, task = record["model"], record["task"]
    checkpoint = model.get("checkpoint") or {}
    sha = checkpoint.get("sha256")
    config = record.get("config") or {}
    overrides = dict(config.get("overrides") or {})
    if config.get("precision", "fp32") != "fp32":
        # A reduced-precision run is a variant too; fp32 paths stay as they were before precision existed.
        overrides["(precision)"] = config["precision"]
    variant = ""
    if overrides:
        canonical = json.dumps(overrides, sort_keys=True, default=str).encode()
        variant = "-" + hashlib.sha256(canonical).hexdigest()[:8]
    profile = record_profile(record)
    task_folder = f"{task['name']}.v{task['version']}" + ("" if profile == DEFAULT_PROFILE else f"-{profile}")
    return (Path(results_dir) / "runs" / _safe(model["name"]) / (_safe(sha[:8]) if sha else "nockpt")
            / _safe(task_folder)
            / f"frac{_safe(_format_frac(record['frac']))}-seed{int(record['seed'])}{variant}.json")


def existing_record(results_dir: str | os.PathLike, record_stub: dict) -> Path | None:
    """The path of the record ``record_stub`` would be written to, if it already exists.

    Call this before training, so a run whose result would be refused is not run at all.
    """
    path = record_path(results_dir, record_stub)
    return path if path.exists() else None


def write_record(record: dict, results_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``record`` as JSON under ``results_dir`` and return its path.

    The JSON goes to a temporary file in the target folder, is flushed and fsynced, and is then
    renamed over the target, so a crash leaves either no record or a complete one. Floats are
    rounded to 6 decimals; NaN and infinities are written as ``null``.

    Raises:
        VlpbenchError: the record exists and ``overwrite`` is False. With ``overwrite`` the old file
            is kept as ``<name>.replaced-<UTC time>.json.bak`` next to the new one.
        ConfigError: the record is malformed, or holds what reading it back would refuse
            (:func:`written_problem`); nothing is written then.
        VlpbenchError: the folder cannot be written (full disk, read-only file system, no permission);
            the message says which, and a record being replaced is left in place.
    """
    problem = _problem(record) or written_problem(record)
    if problem:
        raise ConfigError(f"result record: {problem}")
    path = record_path(results_dir, record)
    if path.exists() and not overwrite:
        raise VlpbenchError(f"{path} already exists; pass --overwrite to replace it "
                            f"(the old record is then kept as a .bak file)")
    text = json.dumps(_jsonable(record), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name is hidden and does not end in .json, so load_records never sees it.
        atomic_write(path, text, backup=backup_path)
    except OSError as error:
        raise write_error(error, path.parent, "the record was not written") from error
    return path


# errno → what a user can do about it; anything else is reported with the system's own words.
_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_error(error: OSError, folder: str | os.PathLike, consequence: str) -> VlpbenchError:
    """A VlpbenchError for ``error`` raised while writing under ``folder``: what went wrong (full disk,
    read-only file system, no permission, ...), the folder, and ``consequence``."""
    reason = _DISK_ERRORS.get(error.errno, error.strerror or type(error).__name__)
    return VlpbenchError(f"cannot write to results folder {folder}: {reason} ({error.strerror or error}); "
                         f"{consequence}, and records written earlier are unchanged. Free space, fix the "
                         "permissions, or pass another --results folder")


def check_writable(results_dir: str | os.PathLike) -> None:
    """Check, before a run starts, that records can be written under ``results_dir``.

    Writes and removes an empty hidden probe file in ``<results_dir>/runs``, or in its nearest existing
    parent folder where it does not exist yet; creates nothing.

    Raises:
        VlpbenchError: that folder cannot be written (full disk, read-only file system, missing
            permission), saying which.
    """
    folder = Path(results_dir) / "runs"
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    probe = folder / f".write-probe-{uuid.uuid4().hex}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as error:
        raise write_error(error, folder, "nothing was run") from error


def _jsonable(value: Any) -> Any:
    """``value`` with numpy/torch values made plain, floats rounded to 6 decimals, NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), _ROUND_DECIMALS) if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return _jsonable(value.tolist())
    return value


class InvalidRecord(NamedTuple):
    """A record file that cannot be read as a record: its path and what is wrong, naming the key."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def read_record(path: Path) -> dict | InvalidRecord:
    """The record in ``path`` if it is valid (structure, :func:`_problem`, and numbers,
    :func:`vlpbench.record_values.values_problem`), else what is wrong with it."""
    try:
        # Python's reader takes NaN and Infinity as numbers; values_problem names the key holding one.
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        return InvalidRecord(path, f"cannot read result record ({error.strerror})")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return InvalidRecord(path, f"not a JSON result record ({error})")
    problem = _problem(record) or values_problem(record)
    return InvalidRecord(path, problem) if problem else record


def load_record(path: str | os.PathLike) -> dict:
    """Read and validate one record (structure, provenance, and every number: :mod:`vlpbench.record_values`).

    Raises:
        DataError: the file is unreadable, not JSON, lacks / has an invalid required key, holds a number out
            of place (a string, NaN, a value outside the metric's range) or contradicts itself (an aggregate
            that is not the mean of its per-image scores); the message names the file and the key.
    """
    record = read_record(Path(path))
    if isinstance(record, InvalidRecord):
        raise DataError(str(record))
    return record


def scan_records(results_dir: str | os.PathLike) -> tuple[list[dict], list[InvalidRecord]]:
    """The valid records under ``<results_dir>/runs`` and the invalid ones, each in path order
    (``.json`` files; backups and temp files are not records). A folder without ``runs/`` holds none.

    Readers that tabulate (table, plot, leaderboard, significance, compare) use the valid ones and warn of
    each invalid one, so that one bad file hides nothing else.

    Raises:
        DataError: ``results_dir`` does not exist.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DataError(f"results folder {results_dir} does not exist")
    runs = results_dir / "runs"
    read = [read_record(path) for path in sorted(runs.rglob("*.json")) if path.is_file()] if runs.is_dir() else []
    return ([r for r in read if not isinstance(r, InvalidRecord)],
            [r for r in read if isinstance(r, InvalidRecord)])


def load_records(results_dir: str | os.PathLike) -> list[dict]:
    """Every record under ``<results_dir>/runs``, all of them valid (:func:`scan_records`).

    Raises:
        DataError: ``results_dir`` does not exist, or a record is invalid (see :func:`load_record`).
    """
    records, invalid = scan_records(results_dir)
    if invalid:
        raise DataError(str(invalid[0]))
    return records


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(re.fullmatch(r"[0-9a-f]{64}", value))


def _is_version(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, str) and bool(value))


# (dotted key, test, what is expected); a record with any failing entry is rejected.
_CHECKS: list[tuple[str, Any, str]] = [
    ("model", lambda v: isinstance(v, dict), "an object"),
    ("model.name", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    ("model.checkpoint", lambda v: v is None or (isinstance(v, dict) and "sha256" in v and "path" in v),
     "null or an object with path and sha256"),
    ("task", lambda v: isinstance(v, dict), "an object"),
    ("task.name", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    ("task.version", _is_version, "an integer or a non-empty string"),
    ("task.profile", lambda v: v in PROFILES, f"one of {', '.join(PROFILES)}"),
    ("task.file", lambda v: (isinstance(v, dict) and isinstance(v.get("path"), str) and bool(v["path"])
                             and _is_sha256(v.get("sha256"))),
     "an object {path: the task file, sha256: 64 hex digits}"),
    ("frac", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("seed", _is_int, "an integer"),
    ("split", lambda v: isinstance(v, dict), "an object"),
    ("split.dataset", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    ("split.version", _is_version, "an integer or a non-empty string"),
    ("split.sha256", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    ("metrics", lambda v: isinstance(v, dict), "an object"),
    ("primary_metric", lambda v: isinstance(v, str), "a string"),
    ("n", lambda v: isinstance(v, dict), "an object"),
    ("config", lambda v: isinstance(v, dict), "an object"),
    ("timing", lambda v: isinstance(v, dict), "an object"),
    ("env", lambda v: isinstance(v, dict), "an object"),
    ("created", lambda v: isinstance(v, str), "a string"),
    ("calibration", check_calibration_entry,
     "{left_out: reason} or {n_bins, binning, confidence, curves: {name: {lower, upper, confidence, frequency, "
     "count} of n_bins entries each}}"),
    ("subgroups", lambda v: subgroups_problem(v) is None, "subgroup results (see vlpbench.metrics.subgroups)"),
    ("evidence", lambda v: (isinstance(v, dict) and isinstance(v.get("file"), str) and bool(v["file"])
                            and "/" not in v["file"] and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64),
     "an object {file: a file name beside the record, sha256: 64 hex digits}"),
]


# task.profile: absent in records written before profiles existed (canonical); task.file: in records of shipped
# tasks; calibration: before calibration
# metrics existed, and in records of protocols other than classification; subgroups: where the dataset carries
# no attribute, and in records written before subgroups existed; evidence: before evidence files existed.
_OPTIONAL = {"task.profile", "task.file", "calibration", "subgroups", "evidence"}


def _problem(record: Any) -> str | None:
    """The first thing wrong with ``record``, as a message naming the key, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "schema" not in record:
        return "missing key 'schema'"
    if not _is_int(record["schema"]) or record["schema"] != SCHEMA_VERSION:
        # Older versions get an upgrade step here when the schema changes; newer ones need newer code.
        # The type first: true == 1 and 1.0 == 1 in Python, but neither is a schema version.
        newer = " (written by a newer vlpbench: upgrade to read it)" if (
            _is_int(record["schema"]) and record["schema"] > SCHEMA_VERSION) else ""
        return (f"invalid key 'schema': version {record['schema']!r} is not known to vlpbench "
                f"{vlpbench.__version__} (knows {SCHEMA_VERSION}){newer}")
    for dotted, test, expected in _CHECKS:
        parent, _, key = dotted.rpartition(".")
        holder = record[parent] if parent else record
        if key not in holder:
            if dotted in _OPTIONAL:
                continue
            return f"missing key {dotted!r}"
        if not test(holder[key]):
            return f"invalid key {dotted!r}: expected {expected}, got {holder[key]!r}"
    if "file" in record["task"] and not isinstance(record["task"].get("protocol"), str):
        return (f"invalid key 'task.protocol': a record of task file {record['task']['file']['path']} carries "
                f"the task's protocol, got {record['task'].get('protocol')!r}")
    if record["primary_metric"] not in record["metrics"]:
        return (f"invalid key 'primary_metric': {record['primary_metric']!r} is not among the metrics "
                f"({', '.join(map(repr, record['metrics'])) or 'none'})")
    return None
