"""The Python API behind the ``vlpbench`` command: run, reproduce, score, table, significance, inspect, synth, demo.

>>> from vlpbench import api
>>> api.task_table()[0]["task"]
'siim_seg'
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlpbench.config import resolve_data_root
from vlpbench.data.attributes import read_attributes
from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.subgroups import check_attributes, resolve_age_bins
from vlpbench.protocols import SplitIds
from vlpbench.protocols.base import Protocol, protocol_named
from vlpbench.registry import DATASETS, PROTOCOLS
from vlpbench.tasks import Task, load_task, task_names

log = logging.getLogger("vlpbench")

DEFAULT_RESULTS = Path("results")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is a GPU; ``cuda`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def model_label(model: str, checkpoint: str | Path | None, name: str | None = None) -> str:
    """Row label of a model in tables: ``--name`` if given, else ``adapter:checkpoint-stem``."""
    if name:
        return name
    return f"{model}:{Path(checkpoint).stem}" if checkpoint else model


def open_dataset(task: Task, data_root: str | Path | None = None):
    """The task's dataset reader over the user's folder."""
    return DATASETS.get(task.dataset).open(dataset_folder(task.dataset, data_root))


def dataset_folder(dataset: str, data_root: str | Path | None = None) -> Path:
    """The data folder of ``dataset``: ``data_root`` if given, else the one configured for the dataset (see
    :func:`vlpbench.config.resolve_data_root`), else, for a split set of another dataset's download
    (``DatasetSpec.folder``, e.g. ``chexpert_test``), the one configured for that dataset."""
    folder = DATASETS.get(dataset).folder
    if data_root is not None or folder is None:
        return resolve_data_root(dataset, data_root)
    try:
        return resolve_data_root(dataset)
    except ConfigError:
        return resolve_data_root(folder)


def split_ids(split, part: str, source) -> tuple[list[str], int]:
    """Ids of ``part`` that the data folder holds, and how many it lacks.

    A real dataset must hold every image of the split; a synthetic one (``vlpbench synth``) holds a
    sample of the split's real image ids, and only those are used.
    """
    return _present(split, part, source, source.missing, "are not in the data folder")


def labelled_ids(split, part: str, source) -> tuple[list[str], int]:
    """Ids of ``part`` that the label files cover, and how many they lack: what ``score`` needs, since it
    reads labels, masks and boxes from the label files and never opens an image."""
    return _present(split, part, source, source.unlabelled, "have no row in the label files")


def _present(split, part: str, source, absent_of, what: str) -> tuple[list[str], int]:
    ids = split.ids(part)
    missing = absent_of(ids)
    if missing and not source.synthetic:
        raise DataError(f"{len(missing)} of {len(ids)} images of split {split.dataset}/{split.version} "
                        f"{part} {what}, e.g. {', '.join(missing[:3])}")
    absent = set(missing)
    return [i for i in ids if i not in absent], len(missing)


def task_splits(spec: Task, source):
    """``(split, test_split)`` of a task on ``source``: the task's split, and the split holding its test
    part (the same one, or the test set derived from the user's files where the split has none)."""
    from vlpbench.data.splits import dataset_split, test_part_split

    split = dataset_split(spec.dataset, source, spec.split)
    test_split = split if "test" in split.parts else test_part_split(spec.dataset, source) or split
    return split, test_split


def run_parts(split, test_split, frac: float, source) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The ids a run at ``frac`` gets of each role (``train``: the fraction's part, ``val``, ``test``, and
    ``train_all``: the whole training part, for protocols that draw the fraction themselves,
    ``SplitIds.train_all``), and how many of each role's part the data folder lacks (:func:`split_ids`)."""
    parts: dict[str, list[str]] = {}
    absent: dict[str, int] = {}
    for role, part, holder in (("train", split.part_for_fraction(frac), split), ("val", "val", split),
                               ("test", "test", test_split)):
        # A part the split lacks (an evaluation-only set has only test) gives no ids.
        parts[role], absent[role] = split_ids(holder, part, source) if part in holder.parts else ([], 0)
    parts["train_all"] = parts["train"] if split.part_for_fraction(frac) == "train" else (
        split_ids(split, "train", source)[0] if "train" in split.parts else [])
    return parts, absent


def run(model: str, task: str, frac: float, *, device: str = "auto", threads: int | None = None,
        **options: Any) -> tuple[dict[str, Any], Path | None]:
    """Run one (model, task, fraction, seed) and write its result record; the options are those of
    :func:`run_in_process`.

    ``threads``: torch's intra-op threads during the run (default: ``OMP_NUM_THREADS``, else the CPUs this
    process may run on; see :mod:`vlpbench.threads`); the caller's own count is set back afterwards.

    Under torchrun (``WORLD_SIZE`` > 1) the processes join one process group for the run and share
    it, for a protocol that supports it (``Protocol.distributed``; others are refused with a
    ConfigError before anything starts); rank 0 writes the record and the other ranks return
    ``(record, None)``.
    """
    from vlpbench import distributed
    from vlpbench.threads import torch_threads

    with torch_threads(threads):
        if distributed.requested_world_size() > 1:
            check_distributed(task_spec(task).protocol)
        torch_device = resolve_device(device)
        with distributed.session(torch_device):
            return run_in_process(model, task, frac, device=str(distributed.local_device(torch_device)), **options)


def task_spec(task: str | Task, profile: str = "canonical") -> Task:
    """``task`` resolved for ``profile``: a shipped task's name (:func:`vlpbench.tasks.load_task`), or a task
    loaded from a user's file (:func:`vlpbench.tasks.load_task_file`)."""
    return task.with_profile(profile) if isinstance(task, Task) else load_task(task, profile)


def check_distributed(protocol_name: str) -> None:
    """ConfigError unless protocol ``protocol_name`` can share a run among torchrun's processes."""
    if protocol_named(protocol_name).distributed:
        return
    able = [name for name in PROTOCOLS.names() if protocol_named(name).distributed]
    raise ConfigError(f"WORLD_SIZE>1 (torchrun): protocol {protocol_name!r} does not share a run among processes "
                      f"and would repeat it on every rank; the protocols that do: {', '.join(able)}. "
                      "Run it without torchrun (--nproc-per-node 1)")


def run_in_process(
    model: str,
    task: str | Task,
    frac: float,
    *,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    name: str | None = None,
    model_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    results: str | Path = DEFAULT_RESULTS,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    precision: str = "fp32",
    skip_corrupt: bool = False,
    save_predictions: str | Path | None = None,
    profile: str = "canonical",
    by: list[str] | None = None,
    age_bins: list[float] | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """Run one (model, task, fraction, seed) in this process (and its process group, if one is
    initialised: then only rank 0 writes the record, and the others return ``(record, None)``).

    ``task``: a shipped task's name, or a :class:`vlpbench.tasks.Task` loaded from a user's task file
    (:func:`vlpbench.tasks.load_task_file`; its record names the file and its sha256).

    Everything that can fail fast (task, fraction, overrides, checkpoint, data folder, an existing
    record, an unwritable results folder) is checked before any training starts. Returns the record
    and its path. ``precision``: ``fp32`` or ``bf16`` (autocast; see :mod:`vlpbench.protocols.runtime`),
    recorded as ``config.precision``. ``skip_corrupt``: run without the images whose files cannot be
    decoded (listed in the record as ``data.skipped_corrupt``) instead of stopping with an error naming them.
    ``save_predictions``: a new or empty folder for the test predictions in the format ``score`` reads
    (every protocol; see :mod:`vlpbench.predictions`), recorded as ``data.predictions``.
    ``profile``: ``canonical`` (vlpbench's defaults) or ``paper`` (the reference code's settings, each with
    its source in the task file; see :meth:`vlpbench.tasks.Task.with_profile`), recorded as ``task.profile``.
    The record's ``subgroups`` hold the primary metric per subgroup of every attribute the dataset carries
    (:func:`subgroups_of`), with ``age_bins`` (else the task's, else the default); ``by``: attributes the
    caller will show, checked against the dataset's before anything runs.
    """
    from vlpbench import distributed
    from vlpbench.adapters import build_adapter
    from vlpbench.protocols.runtime import resolve_precision
    from vlpbench.results import check_writable, existing_record, make_record, write_record

    spec = task_spec(task, profile)
    frac = float(frac)
    if frac not in spec.fractions:
        raise ConfigError(f"--frac {frac}: task {spec.name} allows {', '.join(map(str, spec.fractions))}")
    config = spec.resolve(overrides)
    torch_device = resolve_device(device)
    config["precision"] = resolve_precision(precision, torch_device)

    adapter = build_adapter(model, checkpoint, **(model_options or {}))
    model_info = {"name": model_label(model, checkpoint, name), **adapter.describe()}
    if (overlap := pretraining_overlap(adapter, spec.dataset)) is not None:
        model_info["pretraining_overlap"] = overlap
        log.warning("%s pre-trained on %s, where the test images of %s come from: its number may be "
                    "optimistic (recorded as model.pretraining_overlap)", model, overlap, spec.name)
    stub = {"model": model_info, "task": {"name": spec.name, "version": spec.version, "profile": spec.profile},
            "frac": frac,
            "seed": seed, "config": {"overrides": dict(overrides or {}), "precision": config["precision"]}}
    if not overwrite and (path := existing_record(results, stub)) is not None:
        raise ConfigError(f"a record for this run already exists: {path} (pass --overwrite to replace it; "
                          "the old record is kept as a .bak file)")
    check_writable(results)

    source = open_dataset(spec, data_root)
    check_attributes(by, source.attribute_names, spec.dataset)
    edges = resolve_age_bins(age_bins, config)
    split, test_split = task_splits(spec, source)
    parts, absent = run_parts(split, test_split, frac, source)
    # Read before training, so that a header in no accepted form stops the run before it costs anything.
    attributes = read_attributes(source, parts["test"])
    if source.synthetic:
        log.warning("synthetic dataset at %s: using the %d/%d/%d split images it holds",
                    getattr(source, "root", data_root), len(parts["train"]), len(parts["val"]), len(parts["test"]))

    protocol = protocol_named(spec.protocol)
    hooks = {}
    if save_predictions is not None:
        from vlpbench.predictions import prepare_folder

        # Rank 0 checks and creates the folder; every rank then writes its own test images' files there.
        folder = prepare_folder(save_predictions) if distributed.is_main() else None
        hooks["predictions"] = distributed.broadcast_object(folder)

    log.info("run %s on %s (%s profile) at %g%% (seed %d) on %s", model_info["name"], spec.name, spec.profile,
             frac * 100, seed, torch_device)
    started = time.perf_counter()
    outcome, skipped = _run_protocol(protocol, adapter, source, parts, frac, config, seed=seed, device=torch_device,
                                     progress=progress, skip_corrupt=skip_corrupt, hooks=hooks)
    outcome["timing"]["wall_s"] = time.perf_counter() - started
    subgroups = subgroups_of(outcome.get("evidence"), attributes, source.attribute_names, spec.primary_metric,
                             edges=edges, n_resamples=int(config["bootstrap_resamples"]), seed=seed)

    record = make_record(
        model=model_info,
        task=spec.record_fields(),
        frac=frac,
        seed=seed,
        split={"dataset": split.dataset, "version": split.version, "sha256": split.manifest_sha256,
               "part": split.part_for_fraction(frac),
               **({} if test_split is split else {"test_sha256": test_split.manifest_sha256})},
        metrics=outcome["metrics"],
        primary_metric=spec.primary_metric,
        n=outcome["n"],
        config={**config, "overrides": dict(overrides or {}), "device": str(torch_device),
                "training": outcome["training"]},
        timing=outcome["timing"],
        ci=outcome["ci"],
        per_image=outcome["per_image"],
        calibration=outcome.get("calibration"),
        data={"root": str(getattr(source, "root", data_root)), "synthetic": bool(source.synthetic),
              "absent_from_split": absent, "skipped_corrupt": skipped,
              **({"predictions": str(hooks["predictions"])} if hooks else {})},
        subgroups=subgroups,
    )
    if not distributed.is_main():
        return record, None
    if (evidence := outcome.get("evidence")) is not None:
        from vlpbench.evidence import write_evidence
        from vlpbench.results import record_path

        # The sidecar first, so the record can name its sha256 (vlpbench.evidence).
        record["evidence"] = write_evidence(evidence, record, record_path(results, record))
    path = write_record(record, results, overwrite=overwrite)
    log.info("%s = %.4f → %s", spec.primary_metric, outcome["metrics"][spec.primary_metric], path)
    return record, path


def subgroups_of(evidence, attributes: dict[str, dict], names, metric: str, *, edges, n_resamples: int,
                 seed: int) -> dict[str, Any] | None:
    """``metric`` per subgroup of each attribute of ``names`` (:func:`vlpbench.metrics.subgroups.subgroup_report`)
    from a protocol's ``evidence``; None where the dataset carries no attribute, the protocol gives no evidence,
    or its evidence holds no statistic of ``metric`` (a retrieval metric whose queries are texts)."""
    from vlpbench.metrics.subgroups import subgroup_report

    if evidence is None or not names:
        return None
    if metric not in evidence.statistics():
        log.warning("no subgroup metrics: %s cannot be recomputed on a subset of the test images", metric)
        return None
    return subgroup_report(evidence, attributes, names, metric, edges=edges, n_resamples=n_resamples, seed=seed)


def _run_protocol(protocol: Protocol, adapter, source, parts: dict[str, list[str]], frac: float,
                  config: dict[str, Any], *, seed: int, device: torch.device, progress: bool, skip_corrupt: bool,
                  hooks: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The protocol's outcome on ``parts``, and the ids skipped as corrupt (sorted).

    With ``skip_corrupt``, images whose files cannot be decoded are dropped from every part and the
    protocol starts again, until none is left; protocols load their images before training, and the
    image cache keeps what it decoded, so a restart repeats little. A CUDA out-of-memory error
    becomes a message naming the batch size (``runtime.out_of_memory_hint``).
    """
    from vlpbench.data.cache import CorruptImagesError
    from vlpbench.protocols.runtime import out_of_memory_hint

    skipped: dict[str, str] = {}
    while True:
        torch.manual_seed(seed)
        np.random.seed(seed)
        kept = {role: [i for i in ids if i not in skipped] for role, ids in parts.items()}
        try:
            with out_of_memory_hint(config):
                outcome = protocol.run(adapter, source, SplitIds(**kept, fraction=frac), config, seed=seed,
                                       device=device, progress=progress, **hooks)
            return outcome, sorted(skipped)
        except CorruptImagesError as error:
            new = {image_id: message for image_id, message in error.failures.items() if image_id not in skipped}
            if not skip_corrupt or not new:
                raise
            for image_id, message in new.items():
                log.warning("--skip-corrupt: running without image %s (%s)", image_id, message)
            skipped.update(new)


def sweep(config: str | Path | None = None, *, force: bool = False, dry_run: bool = False, progress: bool = True,
          **fields: Any):
    """Run a sweep of models × tasks × fractions × seeds, each run in its own process; a SweepReport.

    ``config`` is a sweep YAML file; ``fields`` (models, tasks, fracs, seeds, set, data_roots, results,
    device, threads, launcher, workers, slurm, nproc_per_node, as in :mod:`vlpbench.sweep.spec`) replace its
    values. Runs whose records exist are skipped unless ``force``; ``dry_run`` only lists the commands.
    See :func:`vlpbench.sweep.run_sweep`.
    """
    from vlpbench.sweep import run_sweep

    return run_sweep(_sweep_spec(config, fields), force=force, dry_run=dry_run, progress=progress)


def sweep_plan(config: str | Path | None = None, *, force: bool = False, calibrate_batches: int | None = None,
               **fields: Any):
    """The runs ``sweep`` would launch (``config`` and ``fields`` as there), each with an estimate of its device
    time from a short calibration on this machine's device, and the totals in device-hours; a
    :class:`vlpbench.sweep.estimate.SweepPlan` (``format()`` prints it). Launches nothing.

    ``calibrate_batches``: timed batches per distinct step, after one warm-up batch (default 3). See
    :func:`vlpbench.sweep.estimate.plan_sweep`.
    """
    from vlpbench.sweep.estimate import DEFAULT_CALIBRATE_BATCHES, plan_sweep

    return plan_sweep(_sweep_spec(config, fields), force=force,
                      calibrate_batches=DEFAULT_CALIBRATE_BATCHES if calibrate_batches is None else calibrate_batches)


def _sweep_spec(config: str | Path | None, fields: dict[str, Any]):
    """The sweep of file ``config`` with ``fields`` replacing its values."""
    from vlpbench.sweep import build_spec, load_sweep_file
    from vlpbench.sweep.spec import merge

    values = merge(load_sweep_file(config) if config is not None else {}, fields)
    return build_spec(values, origin=f"sweep file {config}" if config is not None else "sweep")


def table(results: str | Path = DEFAULT_RESULTS, *, fmt: str = "md", models: list[str] | None = None,
          tasks: list[str] | None = None, fracs: list[float] | None = None, group: str | None = None,
          metrics: list[str] | None = None, reference: bool | str | Path = False, profile: str | None = None,
          by: str | None = None, ledger: bool = False) -> str:
    """The leaderboard of the records under ``results`` in ``fmt`` (md, latex, csv or html).

    ``ledger``: instead, the reproduction ledger's "reported / measured" table (:func:`ledger_table`).

    ``by`` (``sex``, ``age``, ``view``, ``site``): instead, the Markdown table of the primary metric per subgroup
    (:func:`vlpbench.report.subgroups.subgroup_table`), filtered by ``models``, ``tasks``, ``fracs``, ``group``,
    ``profile``.

    ``models`` / ``tasks`` / ``fracs`` / ``group`` / ``profile`` filter the records (records of two
    protocol profiles give one table each), ``metrics`` picks the metrics
    shown per task (default: the primary one), and ``reference`` adds the published rows of a
    folder of reference files (True: ``<results>/reference``, else the checkout's
    ``results/reference``). See :func:`vlpbench.report.table.render_table`.
    """
    from vlpbench.report.reference import default_reference_dir, load_references
    from vlpbench.report.table import render_table

    if ledger:
        if by is not None or tasks or fracs or group or metrics or profile:
            raise ConfigError("table --ledger takes --models, --format and --reference only: its columns are the "
                              "published cells of each model")
        return ledger_table(results, fmt=fmt, models=models, reference=reference)
    records = _records(results)
    if by is not None:
        from vlpbench.report.subgroups import subgroup_table

        if fmt != "md" or metrics or reference:
            raise ConfigError("table --by prints a Markdown table of the primary metric: it takes no --format other "
                              "than md, no --metrics and no --reference")
        return subgroup_table(records, by, models=models, tasks=tasks, fracs=fracs, group=group, profile=profile)
    references = []
    if reference:
        references = load_references(default_reference_dir(results) if reference is True else reference)
    return render_table(records, fmt, models=models, tasks=tasks, fracs=fracs, group=group, metrics=metrics,
                        references=references, profile=profile, evidence_root=results)


def ledger_table(results: str | Path = DEFAULT_RESULTS, *, fmt: str = "md", models: list[str] | None = None,
                 reference: bool | str | Path = False) -> str:
    """The reproduction ledger as a paper table in ``fmt`` (md, latex or html): a row per released checkpoint
    whose published cells the records under ``results`` measure (``models``: those adapters, with or without
    records), each cell "reported / measured" with its verdict's mark and footnotes for sources and reasons.
    ``reference``: the ledger folder (True or False: ``<results>/reference``, else the shipped one). See
    :mod:`vlpbench.report.ledger_table`."""
    from vlpbench.ledger import load_ledger
    from vlpbench.report.ledger_table import render_ledger
    from vlpbench.report.reference import default_reference_dir
    from vlpbench.report.verdicts import checkpoint_rows

    from vlpbench.results import scan_records

    cells = load_ledger(default_reference_dir(results) if reference in (True, False) else reference)
    if not models:
        records = _records(results)
    elif Path(results).is_dir():  # named models show their published cells with or without records
        records, invalid = scan_records(results)
        _warn_invalid(invalid)
    else:
        records = []
    return render_ledger(checkpoint_rows(cells, records, models=models), fmt)


def reproduction_plan(model: str, checkpoint: str | Path, *, tasks: list[str] | None = None, seeds: int = 3,
                      data_roots: dict[str, str] | None = None, results: str | Path = DEFAULT_RESULTS,
                      reference: str | Path | None = None, entry: str | None = None,
                      model_options: dict[str, Any] | None = None, device: str = "auto"):
    """What ``vlpbench reproduce`` will do, checked before anything runs: the model's ledger cells, the checkpoint
    file against the ledger's entry (sha256), the data each task finds, and the runs (those already recorded
    marked done). A :class:`vlpbench.reproduce.ReproductionPlan`; see :func:`vlpbench.reproduce.plan_reproduction`."""
    from vlpbench.reproduce import plan_reproduction

    return plan_reproduction(model, checkpoint, tasks=tasks, seeds=seeds, data_roots=data_roots, results=results,
                             reference=reference, entry=entry, model_options=model_options, device=device)


def reproduce(plan, *, progress: bool = True):
    """Run the plan's pending runs (each through :func:`run`; a failing run is listed and the others go on) and
    judge every cell on the records of the checkpoint file: a :class:`vlpbench.reproduce.ReproductionReport`
    (``format()``: the paper-vs-measured table; ``exit_code``)."""
    from vlpbench.reproduce import execute, judge_plan

    return judge_plan(plan, execute(plan, progress=progress))


def compare(baseline: str | Path, candidate: str | Path, *, tasks: list[str] | None = None,
            fracs: list[float] | None = None, abs_tol: float | None = None, k: float | None = None,
            junit: str | Path | None = None, profile: str | None = None, strict: bool = False,
            against_ledger: bool = False, reference: str | Path | None = None) -> tuple[str, int]:
    """Compare the candidate's records with the baseline's (each a results folder or one record);
    ``profile`` keeps only the records of that protocol profile on both sides.

    ``against_ledger``: also judge every ledger cell either side measures on both sides, from the ledger in
    ``reference`` (default: the shipped one); a cell reproduced on the baseline and no longer on the candidate is
    a regression (:mod:`vlpbench.report.compare_ledger`).

    An invalid record (:func:`vlpbench.results.read_record`) is skipped with a warning naming it, and listed in
    the summary and the JUnit XML; with ``strict`` it fails the comparison (exit 2 unless a cell regressed).

    Returns the Markdown summary and the exit code (0 no regression, 1 regression, 2 not
    comparable or, ``strict``, an invalid record); writes JUnit XML to ``junit`` when given. The rules are in
    :mod:`vlpbench.report.compare`.
    """
    from vlpbench.report.compare import compare_records, exit_code, junit_xml, markdown_summary, read_side

    (base, base_invalid), (cand, cand_invalid) = read_side(baseline), read_side(candidate)
    invalid = base_invalid + cand_invalid
    _warn_invalid(invalid)
    comparisons = compare_records(base, cand, tasks=tasks, fracs=fracs, abs_tol=abs_tol, k=k, profile=profile)
    changes = None
    if against_ledger:
        from vlpbench.ledger import load_ledger
        from vlpbench.report.compare_ledger import ledger_changes

        changes = ledger_changes(load_ledger(reference), base, cand, tasks=tasks, fracs=fracs, profile=profile)
    if junit is not None:
        Path(junit).parent.mkdir(parents=True, exist_ok=True)
        Path(junit).write_text(junit_xml(comparisons, invalid, strict=strict, ledger=changes or ()), encoding="utf-8")
    return (markdown_summary(comparisons, baseline=str(baseline), candidate=str(candidate), invalid=invalid,
                             strict=strict, ledger=changes),
            exit_code(comparisons, invalid, strict=strict, ledger=changes or ()))


def significance(task: str, frac: float, models: list[str], *, results: str | Path = DEFAULT_RESULTS,
                 metrics: list[str] | None = None, seed: int | None = None, profile: str | None = None,
                 alpha: float = 0.05, n_resamples: int = 2000):
    """Paired tests between ``models`` on ``task`` at ``frac`` from the records (and their evidence sidecars)
    under ``results``: a :class:`vlpbench.report.significance.SignificanceReport` (``.text()``, ``.as_dict()``).
    See :mod:`vlpbench.report.significance` for the tests, the seed rule and the correction."""
    from vlpbench.report.significance import significance_report

    return significance_report(_records(results), task=task, frac=frac, models=models, results_dir=results,
                               metrics=metrics, seed=seed, profile=profile, alpha=alpha, n_resamples=n_resamples)


def _records(results: str | Path) -> list[dict]:
    """The valid records under ``results``; each invalid one is skipped with a warning naming the file and
    what is wrong, so one bad file hides no other (:func:`vlpbench.results.scan_records`).

    Raises:
        DataError: ``results`` does not exist or holds no valid record.
    """
    from vlpbench.results import scan_records

    records, invalid = scan_records(results)
    _warn_invalid(invalid)
    if not records:
        skipped = f" ({len(invalid)} invalid record(s) skipped, named above)" if invalid else ""
        raise DataError(f"no result records under {Path(results) / 'runs'}{skipped} (run `vlpbench run` first)")
    return records


def _warn_invalid(invalid) -> None:
    for bad in invalid:
        log.warning("skipping invalid result record %s", bad)


def plot(results: str | Path = DEFAULT_RESULTS, out: str | Path = "plots", *, tasks: list[str] | None = None,
         formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write a metric-versus-fraction plot per task (log x, one line per model, CI band) into ``out``, and a
    reliability diagram per task and fraction whose records hold calibration bins; the files written. See
    :mod:`vlpbench.report.plots` and :mod:`vlpbench.report.reliability`."""
    from vlpbench.report.plots import plot_fraction_curves
    from vlpbench.report.reliability import plot_reliability

    records = _records(results)
    return (plot_fraction_curves(records, out, tasks=tasks, formats=formats)
            + plot_reliability(records, out, tasks=tasks, formats=formats))


def plot_subgroups(results: str | Path, out: str | Path, by: str, *, tasks: list[str] | None = None,
                   formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write one figure per model × task × fraction: the primary metric per ``by`` subgroup with CI bars
    (``<task>.<model>.frac<f>.by_<by>.<format>``); the files written. See :mod:`vlpbench.report.subgroups`."""
    from vlpbench.report.subgroups import plot_subgroups as plot

    return plot(_records(results), out, by, tasks=tasks, formats=formats)


def plot_panels(task: str, predictions: str | Path, out: str | Path = "plots", *, data_root: str | Path | None = None,
                n: int = 4, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``<out>/<task>_panels.<format>``: image, ground truth and prediction (segmentation masks) or
    heat map (grounding ``.npz``, or the folder ``run --save-predictions`` wrote) for ``n`` test images."""
    from vlpbench.report.plots import grounding_panels, panel_figure, save_figure, segmentation_panels

    spec = load_task(task)
    builders = {"segmentation": segmentation_panels, "grounding": grounding_panels}
    if spec.protocol not in builders:
        raise ConfigError(f"--panels: task {spec.name} (protocol {spec.protocol}) has no image-level predictions "
                          "to draw; segmentation and grounding tasks do")
    if n < 1:
        raise ConfigError(f"--n {n}: expected at least one image")
    source = open_dataset(spec, data_root)
    ids, _ = split_ids(task_splits(spec, source)[1], "test", source)
    panels = builders[spec.protocol](source, ids, Path(predictions), spec.config, n)
    return save_figure(panel_figure(panels), Path(out) / f"{spec.name}_panels", formats)


def leaderboard(results: str | Path = DEFAULT_RESULTS, out: str | Path = "site", *,
                reference: bool | str | Path = False) -> Path:
    """Write the self-contained leaderboard page ``<out>/index.html`` (sortable tables per task group,
    plots, provenance per cell, and the reproduction ledger's table where records measure its cells);
    ``reference`` as for :func:`table`, and the ledger's folder (default: ``<results>/reference``, else the
    shipped one). See :mod:`vlpbench.report.leaderboard`."""
    from vlpbench.report.leaderboard import write_leaderboard
    from vlpbench.report.reference import default_reference_dir, load_references

    from vlpbench.ledger import load_ledger

    records = _records(results)
    references = []
    if reference:
        references = load_references(default_reference_dir(results) if reference is True else reference)
    if reference in (True, False):
        try:
            folder = default_reference_dir(results)
        except ConfigError:  # no ledger here: the page has no ledger section
            folder = None
    else:
        folder = reference
    ledger = load_ledger(folder) if folder is not None else []
    return write_leaderboard(records, out, references=references, evidence_root=results, ledger=ledger)


def baseline_update(results: str | Path = DEFAULT_RESULTS, baseline_dir: str | Path = DEFAULT_RESULTS / "baselines",
                    *, force: bool = False):
    """Copy the records under ``results`` into ``baseline_dir`` (a BaselineUpdate); refuses to
    replace baseline records unless ``force`` (then the old ones are kept as .bak). See
    :mod:`vlpbench.report.baseline`."""
    from vlpbench.report.baseline import update_baseline

    return update_baseline(results, baseline_dir, force=force)


def score(task: str | Task, predictions: str | Path, *, data_root: str | Path | None = None, split: str = "test",
          seed: int = 0, overrides: dict[str, Any] | None = None, profile: str = "canonical",
          by: list[str] | None = None, age_bins: list[float] | None = None,
          threads: int | None = None) -> dict[str, Any]:
    """Score predictions made by any framework (or saved by ``run --save-predictions``) on a task.

    ``predictions``: the folder ``run --save-predictions`` wrote, or the protocol's file (see
    :mod:`vlpbench.predictions`). The data folder needs the label files only, no image. ``split``: the part
    scored (``test``, or ``val``). ``seed`` seeds the bootstrap as ``run --seed`` does, so predictions saved by
    a run give its metrics, CIs and thresholds exactly. ``overrides``: task options as ``run --set`` takes them.
    ``profile``: the protocol profile whose settings (split, metric, options) score the predictions. ``task``: a
    shipped task's name or a task loaded from a user's file (:func:`task_spec`).

    Returns ``task``, ``version``, ``profile``, ``task_file`` ({path, sha256}; a task file's only), ``split``,
    ``split_sha256``, ``config`` (the overrides and seed used) and the protocol's outcome: ``metrics``, ``ci``, ``per_image``, ``n``, ``scoring`` (thresholds, notes), for
    classification ``calibration`` (reliability bins, or why they are left out), and ``subgroups`` as ``run``
    records them where the data folder's files carry attributes (a DICOM dataset's live in the image headers).
    ``by`` and ``age_bins`` as for :func:`run_in_process`; ``threads`` as for :func:`run`.
    """
    from vlpbench.threads import torch_threads

    with torch_threads(threads):
        spec = task_spec(task, profile)
        protocol = protocol_named(spec.protocol)
        config = spec.resolve(overrides)
        source = open_dataset(spec, data_root)
        task_split, test_split = task_splits(spec, source)
        holder = test_split if split == "test" else task_split
        if split not in holder.parts:
            raise ConfigError(f"--split {split}: split {holder.dataset}/{holder.version} has the parts "
                              f"{', '.join(holder.parts)}")
        ids, _ = labelled_ids(holder, split, source)
        val_ids: list[str] = []
        if protocol.uses_val and split != "val" and "val" in task_split.parts:
            val_ids, _ = labelled_ids(task_split, "val", source)
        check_attributes(by, source.attribute_names, spec.dataset)
        edges = resolve_age_bins(age_bins, config)
        attributes = read_attributes(source, ids)
        outcome = protocol.score(Path(predictions), source, SplitIds([], val_ids, ids), config, seed=seed)
        # The evidence: arrays for a record's sidecar (`score` writes no record), and what subgroups come from.
        subgroups = subgroups_of(outcome.pop("evidence", None), attributes, source.attribute_names, spec.primary_metric,
                                 edges=edges, n_resamples=int(config["bootstrap_resamples"]), seed=seed)
        if subgroups is not None:
            outcome["subgroups"] = subgroups
        task_file = {"task_file": spec.record_fields()["file"]} if spec.file_sha256 else {}
        return {"task": spec.name, "version": spec.version, "profile": spec.profile, **task_file, "split": split,
                "split_sha256": holder.manifest_sha256,
                "config": {"overrides": dict(overrides or {}), "seed": seed}, **outcome}


def inspect(model: str, checkpoint: str | Path | None, **options: Any):
    """Key accounting of ``checkpoint`` for adapter ``model`` (never raises on missing keys)."""
    from vlpbench.adapters import get_adapter

    return get_adapter(model).inspect(checkpoint, **options)


# Datasets whose images are drawn from another dataset that models pre-train on.
_DRAWN_FROM = {"chexpert5x200": "chexpert", "ms_cxr": "mimic_cxr", "chexlocalize": "chexpert",
               "mimic5x200": "mimic_cxr"}


def pretraining_overlap(adapter: Any, dataset: str) -> str | None:
    """The pre-training dataset of ``adapter`` (its ``card``) that ``dataset``'s images come from, or None."""
    card = getattr(adapter, "card", None)
    if card is None:
        return None
    for name in (dataset, _DRAWN_FROM.get(dataset)):
        if name is not None and name in card.pretraining_data:
            return name
    return None


def model_table() -> list[dict[str, Any]]:
    """Built-in and plug-in adapters, one dict each, sorted by name.

    Keys: ``model``, ``description``, ``capabilities`` (sorted list), ``checkpoint_forms`` (the adapter's
    ``checkpoint_forms``; empty when it declares none), ``input`` (image size, channels, mean, std),
    ``card`` (the adapter's ``ModelCard`` as a dict, or None), ``package`` (``"<distribution> <version>"`` for a
    plug-in, None for a built-in) and ``error`` (None, or why the adapter cannot be imported; the
    description, capabilities and forms are then None, [] and []). Imports every adapter module.

    Raises:
        PluginError: two installed adapters claim the same name.
    """
    from vlpbench.adapters import adapter_names, get_adapter, plugins

    found = plugins()
    rows = []
    for name in adapter_names():
        plugin = found.get(name)
        row: dict[str, Any] = {"model": name, "description": None, "capabilities": [], "checkpoint_forms": [],
                               "input": None, "card": None,
                               "package": f"{plugin.package} {plugin.version}" if plugin else None, "error": None}
        try:
            cls = get_adapter(name)
        except Exception as e:  # one adapter that cannot be imported must not hide the others from the list
            row["error"] = f"{type(e).__name__}: {e}"
        else:
            card = getattr(cls, "card", None)
            row.update(description=cls.description, capabilities=sorted(cls.capabilities),
                       checkpoint_forms=list(getattr(cls, "checkpoint_forms", ())),
                       input={"image_size": cls.image_size, "channels": getattr(cls, "in_channels", 3),
                              # None: each checkpoint folder gives its own (preprocessor_config.json)
                              "mean": None if cls.mean is None else list(cls.mean),
                              "std": None if cls.std is None else list(cls.std)},
                       card=asdict(card) if card is not None else None)
        rows.append(row)
    return rows


def task_table(tasks: list[Task] | None = None) -> list[dict[str, Any]]:
    """Shipped tasks (or ``tasks``, e.g. loaded from task files) with their protocol, metric and fractions."""
    rows = []
    for spec in tasks if tasks is not None else [load_task(name) for name in task_names()]:
        rows.append({"task": spec.name, "version": spec.version, "dataset": f"{spec.dataset}/{spec.split}",
                     "protocol": spec.protocol, "metric": spec.primary_metric,
                     "fractions": ", ".join(f"{f:g}" for f in spec.fractions), "description": spec.description})
    return rows


def data_check(dataset: str, root: str | Path | None = None, *, decode: bool = True, progress: bool = True):
    """Validate a dataset folder (layout, labels, split coverage, every image decodable); a CheckReport."""
    from vlpbench.data.check import check_dataset

    return check_dataset(dataset, dataset_folder(dataset, root), decode=decode, progress=progress)


def splits_verify(dataset: str, root: str | Path | None = None):
    """Check a split against its manifest and, given a data folder, against the data; a CheckReport."""
    from vlpbench.data.check import verify_split

    return verify_split(dataset, root)


def synth(dataset: str, out: str | Path, *, n: int = 200, seed: int = 0, size: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Write a synthetic dataset in the real on-disk format of ``dataset`` (``size``: image side;
    None keeps the dataset's own default)."""
    from vlpbench.registry import load_target

    spec = DATASETS.get(dataset)
    if spec.synthesizer is None:
        able = [name for name in DATASETS if DATASETS.get(name).synthesizer is not None]
        raise ConfigError(f"dataset {dataset!r} has no synthetic copy; `vlpbench synth` writes {', '.join(able)}")
    options = {} if size is None else {"size": size}
    return load_target(spec.synthesizer)(Path(out), n=n, seed=seed, progress=progress, **options)


def pseudo_mask(checkpoint: str | Path, images: list[str | Path], out: str | Path, *, sentence: str | None = None,
                model: str = "g2d", model_options: dict[str, Any] | None = None, variant: str = "paper",
                options: dict[str, Any] | None = None, batch_size: int = 8, device: str = "auto",
                progress: bool = True) -> dict[str, Any]:
    """G2D's pseudo masks of ``images`` (files or folders) written to ``out``; returns the summary record.

    Per image: ``<stem>_mask.png``, ``<stem>_attention.npy``, ``<stem>_overlay.png`` and, with ``sentence``,
    ``<stem>_similarity.npy``; ``out/pseudo_masks.json`` holds the model, the options and each image's
    threshold and mask fraction. ``variant`` and ``options`` are those of
    :func:`vlpbench.tools.pseudo_mask.pseudo_mask_options`; see :mod:`vlpbench.tools.pseudo_mask` for the pipeline.
    """
    from tqdm.auto import tqdm

    from vlpbench.adapters import build_adapter
    from vlpbench.tools import pseudo_mask as pm

    settings = pm.pseudo_mask_options(variant, **(options or {}))
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected a positive number of images")
    files = pm.collect_images(images)
    torch_device = resolve_device(device)
    adapter = build_adapter(model, checkpoint, **(model_options or {}))
    out = Path(out)
    entries = []
    # One batch of images is read at a time, so memory does not grow with the number of images.
    for start in tqdm(range(0, len(files), batch_size), desc="pseudo masks", disable=not progress, unit="batch"):
        chunk = files[start:start + batch_size]
        results = pm.pseudo_masks(adapter, [pm.load_image(path) for path in chunk], sentence=sentence,
                                  options=settings, batch_size=batch_size, device=torch_device)
        for path, result in zip(chunk, results):
            entries.append({"image": str(path), "threshold": result.threshold,
                            "mask_fraction": float(result.mask.mean()), "body_fraction": float(result.body.mean()),
                            "files": pm.write_outputs(result, path.stem, out, heads=settings.heads)})
    record = {"model": {"name": model, **adapter.describe()}, "sentence": sentence,
              "input_size": int(adapter.image_size), "options": pm.options_record(settings), "images": entries}
    pm.write_summary(out, record)
    return record


def finetune_clip(data: str | Path, checkpoint: str | Path, out: str | Path, *, config=None,
                  mimic_parts: tuple[str, ...] = ("train",), device: str = "auto", resume: bool = False,
                  stop_at_step: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the CLIP in ``checkpoint`` on the image–report pairs in ``data``; return the run's metadata.

    ``data`` is a MIMIC-CXR-JPG folder with reports (its frontal images of ``mimic_parts``) or a CSV with
    columns ``image_path,report``. ``config`` is a :class:`vlpbench.tools.clip_finetune.FinetuneConfig` (None: the
    defaults). Writes ``model.pt`` (loads in the ``clip`` adapter), ``latest.pt`` (resume state),
    ``metadata.json`` and the loss curve to ``out``; see :mod:`vlpbench.tools.clip_finetune`.
    """
    from vlpbench.tools.clip_finetune import FinetuneConfig, finetune, load_pairs

    pairs = load_pairs(data, mimic_parts)
    return finetune(pairs, checkpoint, out, config or FinetuneConfig(), device=resolve_device(device),
                    resume=resume, stop_at_step=stop_at_step, progress=progress)


# The demo is the real pipeline on a small synthetic set: only the data size, image size and epoch
# budget differ from a full run, and they differ through task overrides that the records carry.
DEMO_OVERRIDES = {"image_size": 64, "max_epochs": 30, "patience": 10, "lr": 1e-3}
DEMO_FRACTIONS = (0.1, 1.0)


def demo(out: str | Path = "vlpbench-demo", *, n: int = 500, seed: int = 0, device: str = "auto",
         progress: bool = True) -> str:
    """Synthesize SIIM, write a random-init checkpoint in G2D's encoder layout, run ``siim_seg`` at
    two fractions through ``run`` and return the Markdown table."""
    from vlpbench.testing import write_g2d_checkpoint

    out = Path(out)
    data = out / "siim"
    if not (data / "VLPBENCH_SYNTHETIC.json").is_file():
        synth("siim", data, n=n, seed=seed, progress=progress)
    checkpoint = out / "g2d_random_encoder.pth"
    if not checkpoint.is_file():
        write_g2d_checkpoint(checkpoint, layout="encoder", seed=seed)
    notes = []
    for frac in DEMO_FRACTIONS:
        record, _ = run("g2d", "siim_seg", frac, seed=seed, checkpoint=checkpoint, name="g2d-random-init",
                        data_root=data, results=out / "results", overrides=DEMO_OVERRIDES, device=device,
                        overwrite=True, progress=progress)
        m = record["metrics"]
        notes.append(f"- {frac:.0%} ({record['n']['train']} training images): Dice {m['dice']:.3f}; "
                     f"positives only {m['dice_positive']:.3f}; negatives left empty {m['empty_correct']:.3f}; "
                     f"an all-empty prediction would score {m['all_empty_baseline']:.3f}")
    return table(out / "results") + "\n" + "\n".join(notes)
