"""``vlpbench reproduce``: does the released checkpoint give the paper's number?

:func:`plan_reproduction` does everything that needs no training, before any run: it takes the ledger cells
of the model (published and third-party, :mod:`vlpbench.ledger`), sets the user's checkpoint file beside the
ledger's entry for it (its sha256 against the published one, where the authors publish one), finds the data
folder of each task as ``run`` finds it, and lists the runs (task × fraction × seed under the cell's profile)
with those whose record already exists marked done, and those the adapter cannot serve (its zero-shot,
grounding or retrieval capability is missing as configured, e.g. without a text encoder) listed as such, with the
adapter's own message, instead of as runs that would fail. :func:`execute` runs the rest through
:func:`vlpbench.api.run`; :func:`judge_plan` measures every cell in the records and gives its verdict.

A run serves every cell of its task, fraction and profile (each metric, each source). A run whose cells are
all not comparable (the source's setting is one no profile reproduces) is left out: its verdict could not
say anything. Records of the file's checkpoint (its sha256) are the only ones measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.ledger import CheckpointEntry, LedgerCell, ledger_cells, load_ledger, measured_cell, verdict
from vlpbench.report.layout import percent_label
from vlpbench.report.reference import CHECKPOINTS_FILE
from vlpbench.report.verdicts import Judged, judge, match_entries, model_entries

log = logging.getLogger("vlpbench")

RunKey = tuple[str, float, str]  # (task, fraction, profile): the runs one set of seeds repeats


def describe_key(key: RunKey) -> str:
    """``cxr14_zs 100% (paper)``."""
    task, frac, profile = key
    return f"{task} {percent_label(frac)} ({profile})"


@dataclass(frozen=True)
class PlannedRun:
    """One run of a reproduction: where its record goes, and whether a record of it exists already."""

    task: str
    frac: float
    profile: str
    seed: int
    record: Path
    done: bool

    def describe(self) -> str:
        """``siim_seg 1% (paper) seed 0``."""
        return f"{describe_key((self.task, self.frac, self.profile))} seed {self.seed}"


@dataclass
class ReproductionPlan:
    """What a reproduction of ``model`` with ``checkpoint`` will do; see :func:`plan_reproduction`.

    ``notes`` and ``warnings`` are what the checkpoint check found; ``folders`` maps each task that can run to
    its data folder, ``missing`` each task whose data was not found to why; ``left_out`` are the (task, fraction,
    profile) whose cells are all not comparable; ``cannot_run`` maps each (task, fraction, profile) whose protocol
    needs a capability the adapter lacks to the adapter's message (its runs are not in ``runs``).
    """

    model: str
    checkpoint: Path
    sha256: str
    size: int | None
    reference: Path
    cells: list[LedgerCell]
    entries: list[CheckpointEntry]
    notes: list[str]
    warnings: list[str]
    folders: dict[str, Path]
    missing: dict[str, str]
    left_out: list[RunKey]
    runs: list[PlannedRun]
    results: Path
    model_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    cannot_run: dict[RunKey, str] = field(default_factory=dict)

    @property
    def pending(self) -> list[PlannedRun]:
        """The runs without a record yet."""
        return [run for run in self.runs if not run.done]

    def format(self, *, dry_run: bool = False) -> str:
        """The plan as the command prints it before anything runs."""
        published = sum(cell.kind == "published" for cell in self.cells)
        size = "" if self.size is None else f"{self.size:,} bytes, "
        lines = [f"reproduce {self.model}: {len(self.cells)} ledger cells ({published} published, "
                 f"{len(self.cells) - published} third-party) of {self.reference}",
                 f"checkpoint {self.checkpoint} ({size}sha256 {self.sha256})"]
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  WARNING: {warning}" for warning in self.warnings]
        lines.append("data:")
        lines += [f"  {task}: {folder}" for task, folder in self.folders.items()]
        for task, reason in self.missing.items():
            fracs = ", ".join(dict.fromkeys(percent_label(c.frac) for c in self.cells
                                            if c.task == task and c.not_comparable is None))
            lines.append(f"  skipped {task} ({fracs}): {reason}")
        if self.left_out:
            by_task: dict[tuple[str, str], list[str]] = {}
            for task, frac, profile in self.left_out:
                by_task.setdefault((task, profile), []).append(percent_label(frac))
            runs = "; ".join(f"{task} {', '.join(fracs)} ({profile})" for (task, profile), fracs in by_task.items())
            lines.append(f"  left out, every cell not comparable (the source's setting is one no profile reproduces): "
                         f"{runs}")
        done = [run for run in self.runs if run.done]
        cannot = f", {len(self.cannot_run)} cannot run" if self.cannot_run else ""
        lines.append(f"runs under {self.results}: {len(self.pending)} to run, {len(done)} recorded already{cannot}"
                     + (" (--dry-run: nothing is run)" if dry_run else ""))
        lines += [f"  {'would run' if dry_run else 'to run'}: {run.describe()}" for run in self.pending]
        lines += [f"  recorded: {run.describe()}" for run in done]
        lines += [f"  cannot run: {describe_key(key)}: {message}" for key, message in self.cannot_run.items()]
        return "\n".join(lines) + "\n"


@dataclass
class ReproductionReport:
    """A reproduction's outcome: every cell judged on the records of the file's checkpoint, the runs that failed,
    the cells whose records could not be measured (why), and the exit code (:func:`judge_plan`)."""

    plan: ReproductionPlan
    judged: list[Judged]
    failures: list[tuple[PlannedRun, str]]
    errors: dict[LedgerCell, str]
    exit_code: int

    def why_not_run(self) -> dict[RunKey, str]:
        """(task, fraction, profile) → why no record measures it: no data, the adapter cannot serve its protocol,
        or a failed run."""
        why = {(c.task, c.frac, c.profile): "no data" for c in self.plan.cells if c.task in self.plan.missing}
        why.update(dict.fromkeys(self.plan.cannot_run, "adapter cannot"))
        why.update({(run.task, run.frac, run.profile): "run failed" for run, _ in self.failures})
        return why

    def format(self) -> str:
        """The paper-vs-measured table (:func:`vlpbench.report.reproduction.reproduction_table`), the cells the
        adapter cannot serve (its message), the failed runs and the errors."""
        from vlpbench.report.reproduction import reproduction_table

        lines = [reproduction_table(self.judged, why_not_run=self.why_not_run(), errors=self.errors)]
        lines += [f"cannot run: {describe_key(key)}: {message}" for key, message in self.plan.cannot_run.items()]
        lines += [f"run failed: {run.describe()}: {message}" for run, message in self.failures]
        return "\n".join(lines).rstrip("\n") + "\n"


def checkpoint_messages(entries: Sequence[CheckpointEntry], path: Path, sha256: str, size: int | None,
                        ledger_file: Path) -> tuple[list[str], list[str]]:
    """What the ledger says of the file at ``path``: (notes, warnings), one or two per entry.

    The file is the released one where its sha256 equals the entry's; a published sha256 (or size) that differs is
    a warning naming both and the ledger file and entry; where the authors publish no hash the note gives the
    file's; for weights never released (G2D), the note says that the run measures the user's file.
    """
    notes, warnings = [], []
    for entry in entries:
        where = f"{ledger_file} entry {entry.id!r} ({entry.file}; {entry.published_by})"
        if not entry.released:
            notes.append(f"{where}: the paper's weights were never published, so this measures your file "
                         f"(sha256 {sha256}), not the checkpoint behind the published numbers")
        elif entry.sha256 == sha256:
            notes.append(f"{where}: sha256 {sha256} equals the published one: this is the released file")
        elif entry.sha256 is not None:
            warnings.append(f"{path} has sha256 {sha256}, but {where} publishes sha256 {entry.sha256}: this is not "
                            "the released file, and the numbers below measure yours")
        else:
            notes.append(f"{where}: the authors publish no hash; this file's sha256 is {sha256}")
        if entry.size is not None and size is not None and entry.size != size:
            warnings.append(f"{path} is {size} bytes, but {where} publishes {entry.size} bytes")
    return notes, warnings


def _file_identity(model: str, path: Path) -> tuple[str, int | None]:
    """The sha256 the records of ``path`` will carry (as a sweep predicts it) and its size (files only)."""
    from vlpbench.sweep.plan import checkpoint_sha256
    from vlpbench.sweep.spec import ModelSpec

    sha256 = checkpoint_sha256(ModelSpec(model, str(path)))
    if not isinstance(sha256, str):
        raise ConfigError(f"--checkpoint {path}: cannot be read (no such file, or not a checkpoint of {model})")
    return sha256, path.stat().st_size if path.is_file() else None


def _data_folder(task: str, profile: str, roots: dict[str, str]) -> tuple[Path | None, str | None]:
    """The task's data folder as ``run`` finds it (``roots``: the ``--data-root DATASET=DIR`` given), or why
    there is none usable: not found (the message says where it was looked for), or a synthetic copy."""
    from vlpbench.api import dataset_folder
    from vlpbench.data import SYNTHETIC_MARKER, is_synthetic
    from vlpbench.registry import DATASETS
    from vlpbench.tasks import load_task

    dataset = load_task(task, profile).dataset
    root = roots.get(dataset) or roots.get(DATASETS.get(dataset).folder or "")
    try:
        folder = dataset_folder(dataset, root)
    except ConfigError as error:
        return None, str(error)
    if is_synthetic(folder):
        return None, (f"{folder} is a synthetic copy ({SYNTHETIC_MARKER}): records of synthetic data are no "
                      "reproduction")
    return folder, None


def lacking_capabilities(model: str, checkpoint: Path, model_options: dict[str, Any],
                         keys: Sequence[RunKey]) -> dict[RunKey, str]:
    """Each of ``keys`` whose protocol needs a capability (:attr:`vlpbench.protocols.base.Protocol.needs`) that
    adapter ``model``, built on ``checkpoint`` with ``model_options`` as ``run`` builds it, lacks, mapped to the
    adapter's message (what the run would fail with, :meth:`~vlpbench.protocols.base.Protocol.require`).

    Capabilities are an instance's (its checkpoint form and options decide them), so the adapter is built: once,
    and only where a protocol needs more than the image encoder every adapter has.

    Raises:
        ConfigError: a bad model option; CheckpointError: a file the adapter cannot load (as every run would).
    """
    from vlpbench.adapters import build_adapter
    from vlpbench.adapters.base import CapabilityError
    from vlpbench.protocols.base import protocol_named
    from vlpbench.tasks import load_task

    protocols = {key: protocol_named(load_task(key[0], key[2]).protocol) for key in keys}
    if not any(protocol.needs for protocol in protocols.values()):
        return {}
    adapter = build_adapter(model, checkpoint, **model_options)
    lacking = {}
    for key, protocol in protocols.items():
        try:
            protocol.require(adapter)
        except CapabilityError as error:
            lacking[key] = str(error)
    return lacking


def plan_reproduction(model: str, checkpoint: str | Path, *, tasks: Sequence[str] | None = None, seeds: int = 3,
                      data_roots: dict[str, str] | None = None, results: str | Path = "results",
                      reference: str | Path | None = None, entry: str | None = None,
                      model_options: dict[str, Any] | None = None, device: str = "auto") -> ReproductionPlan:
    """Check everything a reproduction of ``model`` needs, and list its runs, without running any.

    ``reference``: the ledger folder (default: ``<results>/reference``, else the shipped one, as ``table
    --reference``); ``data_roots``: ``{dataset: folder}``, else each dataset's folder as ``run`` finds it;
    ``entry``: the id of the file's entry in ``checkpoints.json`` (default: the entries whose sha256, else whose
    file name, the file matches; else every entry of the model); ``seeds``: seeds 0 … N−1 per run (seed 0 alone where the
    protocol trains nothing: zero-shot, grounding, retrieval). The runs still to do whose protocol needs a
    capability the adapter lacks with ``model_options`` are not listed but kept in ``cannot_run``
    (:func:`lacking_capabilities`).

    Raises:
        ConfigError: no ledger cell of ``model`` (or of ``tasks``), an unknown ``entry`` or dataset, fewer than
            one seed, a checkpoint that cannot be read, or a bad model option.
        CheckpointError: the adapter cannot load the file, where a run's protocol needs its capabilities.
        DataError: a malformed ledger (:func:`vlpbench.ledger.load_ledger`).
    """
    from vlpbench.api import model_label
    from vlpbench.registry import DATASETS
    from vlpbench.report.reference import default_reference_dir
    from vlpbench.results import existing_record, record_path, scan_records
    from vlpbench.protocols.base import protocol_named
    from vlpbench.tasks import load_task

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least one seed")
    roots = dict(data_roots or {})
    unknown = [name for name in roots if name not in DATASETS]
    if unknown:
        raise ConfigError(f"--data-root {unknown[0]}=...: no such dataset; known: {', '.join(DATASETS.names())}")
    folder = Path(reference) if reference is not None else default_reference_dir(results)
    every = load_ledger(folder)
    cells = ledger_cells(every, model=model)
    if not cells:
        models = ", ".join(dict.fromkeys(cell.model for cell in every)) or "none"
        raise ConfigError(f"--model {model}: the ledger in {folder} has no cell of it (models with cells: {models})")
    if tasks:
        known = list(dict.fromkeys(cell.task for cell in cells))
        missing = [task for task in tasks if task not in known]
        if missing:
            raise ConfigError(f"--tasks {', '.join(missing)}: no ledger cell of {model}; its tasks: {', '.join(known)}")
        cells = ledger_cells(cells, tasks=tasks)

    path = Path(checkpoint).expanduser()
    sha256, size = _file_identity(model, path)
    entries = model_entries(cells, model)
    if entry is not None:
        chosen = [e for e in entries if e.id == entry]
        if not chosen:
            raise ConfigError(f"--entry {entry}: not an entry of {model}'s cells; its entries: "
                              f"{', '.join(e.id for e in entries)}")
        matched = "--entry"
    else:
        chosen, matched = match_entries(entries, path.name, sha256)
    notes, warnings = checkpoint_messages(chosen, path, sha256, size, folder / CHECKPOINTS_FILE)
    left = [e for e in entries if e not in chosen]
    if left:
        notes.append(f"left out: the cells of {', '.join(f'{e.id} ({e.file})' for e in left)}; this file is "
                     f"{', '.join(e.id for e in chosen)} by its {matched}")
    cells = [cell for cell in cells if cell.checkpoint in chosen]
    options = [dict(o) for o in dict.fromkeys(e.overrides for e in chosen)]
    if len(options) > 1:
        raise ConfigError(f"{path.name}: the entries {', '.join(e.id for e in chosen)} run with different task options "
                          f"({'; '.join(map(str, options))}): pick one with --entry")
    overrides = options[0] if options else {}
    if overrides:
        notes.append("every run takes the entry's task options: "
                     + " ".join(f"--set {key}={json.dumps(value)}" for key, value in overrides.items()))

    keys = list(dict.fromkeys((cell.task, cell.frac, cell.profile) for cell in cells))
    comparable = {(c.task, c.frac, c.profile): c for c in cells if c.not_comparable is None}
    folders: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for task, _, profile in comparable:
        if task not in folders and task not in missing:
            found, why = _data_folder(task, profile, roots)
            if found is None:
                missing[task] = why
            else:
                folders[task] = found
    results = Path(results)
    records = scan_records(results)[0] if results.is_dir() else []
    label = model_label(model, path)
    runs = []
    for key in (k for k in keys if k in comparable and k[0] in folders):
        task, frac, profile = key
        recorded = _recorded_seeds(records, comparable[key], sha256)
        spec = load_task(task, profile)
        version = spec.version
        # Nothing trained, nothing a seed changes but the bootstrap's resamples: one run measures the cell.
        for seed in range(seeds if protocol_named(spec.protocol).trains else 1):
            stub = {"model": {"name": label, "checkpoint": {"path": str(path), "sha256": sha256}},
                    "task": {"name": task, "version": version, "profile": profile}, "frac": frac, "seed": seed,
                    "config": {"overrides": overrides}}
            done = seed in recorded or existing_record(results, stub) is not None
            runs.append(PlannedRun(task, frac, profile, seed, record_path(results, stub), done))
    pending = dict.fromkeys((run.task, run.frac, run.profile) for run in runs if not run.done)
    cannot = lacking_capabilities(model, path, dict(model_options or {}), list(pending))
    runs = [run for run in runs if run.done or (run.task, run.frac, run.profile) not in cannot]
    return ReproductionPlan(model, path, sha256, size, folder, cells, chosen, notes, warnings, folders, missing,
                            [key for key in keys if key not in comparable], runs, results, dict(model_options or {}),
                            device, overrides, cannot)


def _recorded_seeds(records: list[dict], cell: LedgerCell, sha256: str) -> set[int]:
    """The seeds the records already measure ``cell`` with (under any ``--name``: a second record of a seed
    would make its measurement ambiguous); none where they cannot be read as a measurement (the verdict says
    why)."""
    try:
        measured = measured_cell(records, cell, checkpoint_sha256=sha256)
    except DataError:
        return set()
    return set(measured.seeds) if measured is not None else set()


def execute(plan: ReproductionPlan, *, progress: bool = True) -> list[tuple[PlannedRun, str]]:
    """Run the plan's pending runs through :func:`vlpbench.api.run`, one after the other; a run that fails with
    a vlpbench error is logged and listed, and the others go on. Returns the failed runs and their errors."""
    from vlpbench import api

    failures = []
    for run in plan.pending:
        log.info("reproduce %s: %s", plan.model, run.describe())
        try:
            api.run(plan.model, run.task, run.frac, seed=run.seed, checkpoint=plan.checkpoint,
                    model_options=plan.model_options, data_root=plan.folders[run.task], results=plan.results,
                    device=plan.device, progress=progress, profile=run.profile, overrides=plan.overrides or None)
        except VlpbenchError as error:
            log.error("reproduce %s: %s failed: %s", plan.model, run.describe(), error)
            failures.append((run, str(error)))
    return failures


def judge_plan(plan: ReproductionPlan, failures: Sequence[tuple[PlannedRun, str]] = ()) -> ReproductionReport:
    """Every cell of the plan judged on the records of the file's checkpoint under ``plan.results``.

    Exit code: 2 when nothing could run (no cell's data was found, every cell is not comparable, or the adapter
    cannot serve the protocol of any), 1 when a run failed or the records of a cell that ran cannot be measured,
    else 0: every comparable cell whose data was found and whose protocol the adapter can serve ran, whatever its
    verdict (verdicts are findings, not failures; a cell the adapter cannot serve is listed with why, not run).
    """
    from vlpbench.results import scan_records

    records = scan_records(plan.results)[0] if plan.results.is_dir() else []
    judged, errors = [], {}
    for cell in plan.cells:
        try:
            judged.append(judge(cell, records, plan.sha256))
        except DataError as error:
            errors[cell] = str(error)
            judged.append(Judged(cell, None, verdict(cell, None)))
    ran = {(run.task, run.frac, run.profile) for run in plan.runs}
    unmeasured = [j for j in judged if j.measured is None and j.cell.not_comparable is None
                  and (j.cell.task, j.cell.frac, j.cell.profile) in ran]
    code = 2 if not plan.runs else 1 if failures or unmeasured else 0
    return ReproductionReport(plan, judged, list(failures), errors, code)
