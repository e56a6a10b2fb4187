"""``vlpbench sweep --plan``: the runs a sweep would launch, each with an estimate of its device time, and the
totals in device-hours, before anything is launched.

A run's estimate is the batches it will run, counted from the split files as its protocol selects the images
(:mod:`vlpbench.sweep.workload`; a split derived from an absent data folder by its declared sizes on the
official release, the run's row marked :data:`RELEASE_MARK`), times the seconds per batch of each kind of step,
measured on this machine's device with the real adapter on random inputs (:mod:`vlpbench.sweep.calibrate`),
plus the decoding of the images it is first to need where the data folder is there (a per-image time measured
on 3 of its images).
Work the sweep shares (a linear probe's features, cached on disk per checkpoint, preprocessing and image list;
images decoded into the image cache) is charged to the first run in plan order that needs it. Training is
counted at ``max_epochs``: early stopping makes each such time an upper bound.

Example::

    from vlpbench.sweep import build_spec
    from vlpbench.sweep.estimate import plan_sweep

    plan = plan_sweep(build_spec({"models": ["random"], "tasks": ["rsna_cls"], "fracs": [0.01, 1.0],
                                  "seeds": [0, 1]}))
    print(plan.format())
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.sweep import expand, run_command, run_threads, runs_to_launch
from vlpbench.sweep.calibrate import Adapters, Calibrator, decode_seconds, device_name
from vlpbench.sweep.plan import Run
from vlpbench.sweep.report import RunOutcome
from vlpbench.sweep.spec import SweepSpec
from vlpbench.sweep.workload import ImageRead, Measure, RunContext, Step, StepTiming, Unknown, Workload, workload

log = logging.getLogger("vlpbench")

DEFAULT_CALIBRATE_BATCHES = 3
RELEASE_MARK = "sizes of the official release; no data folder"  # rows counted from DatasetSpec.release_sizes
DECODE_SAMPLE = 3  # images whose decoding is timed per dataset
SWEEP_PRECISION = "fp32"  # a sweep's runs take no --precision
# What a CUDA process holds before its first tensor (context, cuBLAS/cuDNN handles): about 0.5 GiB on current GPUs.
CUDA_CONTEXT_BYTES = 2**29
# Share of a GPU's memory that runs placed side by side may plan to fill: the rest for fragmentation.
SHARED_DEVICE_SHARE = 0.9


@dataclass
class RunEstimate:
    """One run to launch: its images per role as its protocol uses them, ``max_epochs`` (None where nothing
    trains), its estimated device seconds (None: not estimated, ``unknown`` says why), of which
    ``decode_seconds`` decode images into the cache, the shared work an earlier run of the sweep does for it
    (``reused``), its command, ``release_sizes``: the split whose declared sizes on the official release
    stand for the ids (``"object_cxr split mgca"``; empty where the ids were counted), and ``peak_bytes``: the
    device memory it needs at its peak, its largest step's plus what it keeps on the device (None: not
    measured, as on a CPU)."""

    run: Run
    images: dict[str, int] = field(default_factory=dict)
    epochs: int | None = None
    seconds: float | None = None
    decode_seconds: float = 0.0
    reused: list[str] = field(default_factory=list)
    unknown: str = ""
    command: list[str] = field(default_factory=list)
    release_sizes: str = ""
    peak_bytes: int | None = None


@dataclass
class Decoding:
    """Image decoding of one dataset: seconds per image in one process (measured on ``sample`` images), and
    the images of the sweep it decodes; ``excluded``: why it is not counted (no data folder)."""

    dataset: str
    seconds: float | None = None
    sample: int = 0
    images: int = 0
    excluded: str = ""


@dataclass
class SweepPlan:
    """A sweep's runs with their estimates, the runs it would skip, and what the estimates rest on: the
    device, the batches timed per step (``measured``: each distinct step and its time), image decoding per
    dataset, the processes decoding shares, the calibration's own wall time, and the device's memory
    (``device_bytes``, a GPU's; None on a CPU)."""

    runs: list[RunEstimate]
    skipped: list[RunOutcome]
    notes: list[str]
    device: str
    calibrate_batches: int
    measured: list[tuple[Step, StepTiming]]
    decoding: dict[str, Decoding]
    decode_processes: int
    calibration_seconds: float
    spec: SweepSpec
    device_bytes: int | None = None

    @property
    def seconds(self) -> float:
        """Estimated device seconds of every run that has an estimate."""
        return sum(r.seconds for r in self.runs if r.seconds is not None)

    def by_task(self) -> dict[str, tuple[int, float]]:
        """``{task: (runs estimated, device seconds)}`` in plan order."""
        totals: dict[str, tuple[int, float]] = {}
        for estimate in self.runs:
            if estimate.seconds is not None:
                count, seconds = totals.get(estimate.run.task, (0, 0.0))
                totals[estimate.run.task] = (count + 1, seconds + estimate.seconds)
        return totals

    def format(self, *, commands: bool = False) -> str:
        """The table of runs (images per role, epochs, estimated time), totals per task and overall in
        device-hours, the runs skipped, and the assumptions in words; ``commands``: each run's command too."""
        lines = [f"note: {note}" for note in self.notes]
        lines.append(f"plan: {len(self.runs)} run(s) to launch, {len(self.skipped)} skipped; estimates for "
                     f"{self.device}")
        if self.runs:
            header = ("run", "train", "val", "test", "epochs", "est. time", "")
            lines += _table([header] + [_row(r) for r in self.runs], right=(1, 2, 3, 4, 5))
        held = [o for o in self.skipped if not o.reason.startswith("record exists")]
        if len(self.skipped) > len(held):
            lines.append(f"skipped: {len(self.skipped) - len(held)} run(s) whose records exist")
        if held:
            lines.append("skipped, held by another live process:")
            lines += [f"  {o.run.describe()}: {o.reason}" for o in held]
        unknown = [r for r in self.runs if r.seconds is None]
        if unknown:
            lines.append("not estimated (left out of the totals):")
            reasons: dict[tuple[str, str, str], int] = {}
            for estimate in unknown:
                key = (estimate.run.model.label, estimate.run.task, estimate.unknown)
                reasons[key] = reasons.get(key, 0) + 1
            lines += [f"  {model} {task} ({count} run(s)): {reason}"
                      for (model, task, reason), count in reasons.items()]
        if self.by_task():
            lines.append("device-hours per task:")
            lines += _table([(task, f"{count} run(s)", _hours(seconds), f"({_duration(seconds)})")
                             for task, (count, seconds) in self.by_task().items()], right=(1, 2, 3))
        if self.runs:
            lines.append(f"total: {_hours(self.seconds)} device-hours ({_duration(self.seconds)}) on {self.device}, "
                         f"{len(self.runs) - len(unknown)} of {len(self.runs)} run(s) estimated")
            if self.measured:
                lines.append("seconds per batch, measured:")
                lines += _table([(step.describe(), f"{timing.seconds:.4f} s") for step, timing in self.measured],
                                right=(1,))
            lines += self.memory_lines()
            lines.append("assumptions:")
            lines += [f"  - {line}" for line in self.assumptions()]
        if commands and self.runs:
            lines.append(f"{len(self.runs)} run(s) to launch:")
            lines += [f"  {shlex.join(r.command)}" for r in self.runs]
        return "\n".join(lines)

    def memory_lines(self) -> list[str]:
        """Each model and task's peak device memory per run and how many such runs one device holds at once
        (``sweep --workers``); nothing where no peak was measured (a CPU)."""
        peaks: dict[tuple[str, str], int] = {}
        for estimate in self.runs:
            if estimate.peak_bytes is not None:
                key = (estimate.run.model.label, estimate.run.task)
                peaks[key] = max(peaks.get(key, 0), estimate.peak_bytes)
        if not peaks or not self.device_bytes:
            return []
        largest = max(peaks.values())
        fit = max(1, int(SHARED_DEVICE_SHARE * self.device_bytes // (largest + CUDA_CONTEXT_BYTES)))
        lines = ["device memory per run at its peak, measured (its largest step, model and optimiser state "
                 "included, plus features it keeps on the device):"]
        lines += _table([(f"{model} {task}", f"{peak / 2**30:.2f} GiB") for (model, task), peak in peaks.items()],
                        right=(1,))
        lines.append(f"one {self.device_bytes / 2**30:.0f} GiB device holds about {fit} run(s) of the largest at "
                     f"once ({largest / 2**30:.2f} GiB + {CUDA_CONTEXT_BYTES / 2**30:.1f} GiB of CUDA context "
                     f"each, within {SHARED_DEVICE_SHARE:.0%} of the memory): `sweep --workers N` with N above "
                     "the GPU count puts several runs on each GPU, each planning its automatic inference batches "
                     "within its share; how fast they run together is not measured here")
        return lines

    def assumptions(self) -> list[str]:
        """What the estimates rest on, in words."""
        lines = ["each run's time is the batches it runs (images counted from the split files as its protocol "
                 "selects them) times the seconds per batch measured for each kind of step; a last incomplete "
                 "inference batch counts as a full one"]
        released = sorted({r.release_sizes for r in self.runs if r.release_sizes and r.images})
        if released:
            lines.append(f"runs marked \"{RELEASE_MARK}\" count the images of {', '.join(released)} by the sizes "
                         "its rule gives on the dataset's official release (declared, not read from files): a copy "
                         "that differs from the release runs on other counts")
        if self.device_bytes:
            lines.append("inference passes whose batch is `auto` (eval_batch_size, feature_batch_size) are timed at "
                         "the batch auto gives on a CPU (the training batch; 128 for features): on this GPU a run "
                         "picks one at least as large where memory allows, so their times are upper bounds")
        if any(r.epochs is not None for r in self.runs):
            lines.append("upper bounds: training is counted at max_epochs (the epochs column, ≤); early stopping "
                         "on the validation set (patience) ends most runs sooner")
        lines.append(f"measured on {self.device}: {len(self.measured)} distinct step(s) (model, protocol, step, "
                     f"batch size, image size, precision {SWEEP_PRECISION}, the precision of sweep runs), each "
                     f"{self.calibrate_batches} timed batch(es) after 1 warm-up batch of the protocol's own step "
                     "on random inputs of its input shape, with the adapter built from the checkpoint as `vlpbench "
                     f"run` builds it ({_duration(self.calibration_seconds)} of calibration)")
        reusing = [r for r in self.runs if r.reused]
        if reusing or any(step.protocol == "linear" for step, _ in self.measured):
            lines.append("a linear probe computes each part's features once per checkpoint, preprocessing and "
                         "image list and caches them: the first run that needs them pays for them, later runs of "
                         "the sweep pay only for the head" + (f" ({len(reusing)} run(s) reuse features)" if reusing
                                                               else ""))
        for decoding in self.decoding.values():
            if decoding.excluded:
                lines.append(f"image decoding of {decoding.dataset} is excluded: {decoding.excluded}")
            else:
                lines.append(f"image decoding of {decoding.dataset}: {decoding.seconds * 1000:.1f} ms per image "
                             f"(measured on {decoding.sample} of its images in one process) for the "
                             f"{decoding.images} image(s) the sweep decodes, shared by "
                             f"{self.decode_processes} decoding process(es)")
        lines.append("not counted, being small beside the device work: bootstrap CIs and metrics, reading batches "
                     "from the image cache, writing records; the image and feature caches are taken as empty (what "
                     "an earlier sweep cached makes runs cheaper)")
        if self.spec.launcher == "slurm":
            lines.append("calibrated on this machine: the slurm jobs run on the cluster's nodes, whose devices may "
                         "be faster or slower")
        elif self.spec.launcher == "torchrun" and self.spec.nproc_per_node > 1:
            lines.append(f"torchrun shares each run among {self.spec.nproc_per_node} processes, one device each: "
                         "its device-hours stay about the same, its wall time is about that many times shorter")
        elif (self.spec.workers or 1) > 1:
            lines.append(f"device-hours add up every run: {self.spec.workers} local workers run at once, so the "
                         "sweep's wall time is about that many times shorter")
        return lines


def plan_sweep(spec: SweepSpec, *, force: bool = False, calibrate_batches: int = DEFAULT_CALIBRATE_BATCHES,
               measure: Measure | None = None) -> SweepPlan:
    """The runs :func:`vlpbench.sweep.run_sweep` would launch for ``spec`` (``force``: those whose records
    exist too), each with an estimate of its device time; launches nothing.

    ``calibrate_batches``: timed batches per distinct step, after one warm-up batch. ``measure``: the timer of a
    step (default: :class:`~vlpbench.sweep.calibrate.Calibrator` on ``spec.device``, with the runs' threads).

    Raises:
        ConfigError / RegistryError: as :func:`vlpbench.sweep.expand`, or ``calibrate_batches`` below 1.
    """
    from vlpbench.api import resolve_device
    from vlpbench.data.cache import MAX_WORKERS

    if isinstance(calibrate_batches, bool) or not isinstance(calibrate_batches, int) or calibrate_batches < 1:
        raise ConfigError(f"--calibrate-batches {calibrate_batches!r}: expected a positive integer")
    plan = expand(spec)
    to_run, skipped = runs_to_launch(plan, force=force)
    threads = run_threads(spec)
    adapters = Adapters()
    device = resolve_device(spec.device)
    calibrator = Calibrator(device, batches=calibrate_batches, threads=threads, adapters=adapters)
    timer = _Memo(measure or calibrator)
    contexts = _Contexts(spec, adapters)
    processes = min(MAX_WORKERS, _usable_cpus())
    charged = _Charged(processes)
    estimates = []
    for run in to_run:
        estimate = RunEstimate(run=run, command=run_command(spec, run.arguments(
            spec.results, spec.device, overwrite=force, threads=threads)))
        try:
            context = contexts(run)
            estimate.release_sizes = context.release_sizes
            charged.estimate(estimate, workload(context, timer), timer)
        except (Unknown, VlpbenchError) as error:
            estimate.unknown = str(error)
        estimates.append(estimate)
    device_bytes = None
    if device.type == "cuda":
        from vlpbench.protocols.batch_fill import CudaMemory

        device_bytes = CudaMemory(device).total()
    return SweepPlan(runs=estimates, skipped=skipped, notes=plan.notes, device=device_name(device, threads),
                     calibrate_batches=calibrate_batches, measured=timer.measured, decoding=charged.decoding,
                     decode_processes=processes,
                     calibration_seconds=calibrator.seconds + charged.decode_timing, spec=spec,
                     device_bytes=device_bytes)


class _Memo:
    """Each distinct step timed once (its failure too), in the order first asked for."""

    def __init__(self, measure: Measure) -> None:
        self.measure = measure
        self.measured: list[tuple[Step, StepTiming]] = []
        self._done: dict[tuple, StepTiming | Unknown] = {}

    def __call__(self, step: Step) -> StepTiming:
        if step.key not in self._done:
            try:
                self._done[step.key] = self.measure(step)
                self.measured.append((step, self._done[step.key]))
            except Unknown as error:
                self._done[step.key] = error
        done = self._done[step.key]
        if isinstance(done, Unknown):
            raise done
        return done


class _Charged:
    """Charges work the sweep shares to the first run that does it: shared work by its key, decoded images by
    dataset, cache key and id; and times decoding per dataset on first need, the image cache sharing it
    among ``processes`` decoding processes."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.work: set[tuple] = set()
        self.images: set[tuple] = set()
        self.decoding: dict[str, Decoding] = {}
        self.decode_timing = 0.0

    def estimate(self, estimate: RunEstimate, load: Workload, measure: Measure) -> None:
        """Fill ``estimate`` from ``load``; nothing is charged where a step cannot be timed (Unknown)."""
        seconds, work, reused, peaks = 0.0, set(), [], []
        for item in load.work:
            if item.batches == 0:
                continue
            if item.shared is not None and (item.shared in self.work or item.shared in work):
                reused.append(item.what)
                continue
            timing = measure(item.step)
            seconds += item.batches * timing.seconds
            peaks.append(timing.peak_bytes)
            if item.shared is not None:
                work.add(item.shared)
        images, decode = self._decode(load.reads)
        self.work |= work
        self.images |= images
        estimate.images, estimate.epochs, estimate.reused = load.images, load.epochs, reused
        estimate.decode_seconds = decode
        estimate.seconds = seconds + decode
        if peaks and None not in peaks:
            estimate.peak_bytes = max(peaks) + load.kept_bytes

    def _decode(self, reads: list[ImageRead]) -> tuple[set[tuple], float]:
        """The images ``reads`` decode first in the sweep, and their decoding's wall seconds."""
        new: set[tuple] = set()
        seconds = 0.0
        for read in reads:
            fresh = [i for i in dict.fromkeys(read.ids) if (read.dataset, read.cache, i) not in self.images]
            if not fresh:
                continue
            decoding = self._timed(read)
            if decoding.seconds is None:
                continue
            new |= {(read.dataset, read.cache, i) for i in fresh}
            decoding.images += len(fresh)
            seconds += len(fresh) * decoding.seconds / self.processes
        return new, seconds

    def _timed(self, read: ImageRead) -> Decoding:
        import time

        if read.dataset in self.decoding:
            return self.decoding[read.dataset]
        decoding = self.decoding[read.dataset] = Decoding(read.dataset)
        if read.reader is None:
            decoding.excluded = "no data folder (estimates leave its decoding out)"
            return decoding
        sample = list(dict.fromkeys(read.ids))[:DECODE_SAMPLE]
        started = time.perf_counter()
        try:
            decoding.seconds, decoding.sample = decode_seconds(read.reader, sample, read.cache), len(sample)
        except (VlpbenchError, OSError) as error:
            decoding.excluded = f"decoding {', '.join(sample)} failed: {error}"
        self.decode_timing += time.perf_counter() - started
        return decoding


class _SplitLabels:
    """The split files' first label column as a reader's ``label``: without the data folder, what segmentation
    balances and grounding selects by (SIIM's pneumothorax, RSNA's pneumonia column)."""

    def __init__(self, split: Any) -> None:
        self._labels = {image_id: value for part in split.parts for image_id, value in split.labels(part).items()}

    def label(self, image_id: str) -> int:
        return self._labels[image_id]


class _Contexts:
    """A :class:`RunContext` per run, with each task, data folder and split part read once."""

    def __init__(self, spec: SweepSpec, adapters: Adapters) -> None:
        self.spec, self.adapters = spec, adapters
        self._sources: dict[tuple, tuple[Any, str]] = {}
        self._parts: dict[tuple, tuple[dict[str, list[str]], Any, str]] = {}
        self._splits: dict[tuple, Any] = {}

    def __call__(self, run: Run) -> RunContext:
        from vlpbench.tasks import load_task, load_task_file

        task = load_task_file(run.task_file, run.profile) if run.task_file else load_task(run.task, run.profile)
        source, missing = self._source(task, run.data_root)
        parts, labels, released = self._split_parts(task, source, run)
        return RunContext(run=run, task=task, config=task.resolve(run.overrides), source=source, missing=missing,
                          parts=parts, labels=labels, adapter=lambda: self.adapters(run.model),
                          precision=SWEEP_PRECISION, release_sizes=released)

    def _source(self, task: Any, data_root: str | None) -> tuple[Any, str]:
        from vlpbench.api import open_dataset

        key = (task.dataset, data_root)
        if key not in self._sources:
            try:
                self._sources[key] = (open_dataset(task, data_root), "")
            except (ConfigError, DataError) as error:
                self._sources[key] = (None, str(error))
        return self._sources[key]

    def _split_parts(self, task: Any, source: Any, run: Run) -> tuple[dict[str, list[str]], Any, str]:
        """The ids of each role as :func:`vlpbench.api.run_parts` gives them, with the label reader; without a
        data folder, the committed split's parts (a role the split does not hold stays unknown), else the
        declared sizes of the derived split on the official release (:func:`release_parts`, no labels; the third
        item names that split)."""
        from vlpbench.api import run_parts, task_splits
        from vlpbench.registry import DATASETS, load_target

        key = (task.dataset, task.split, run.data_root, run.frac)
        if key not in self._parts:
            if source is not None:
                split, test_split = task_splits(task, source)
                self._parts[key] = (run_parts(split, test_split, run.frac, source)[0], source, "")
            elif (committed := self._committed(task)) is None:
                sizes = load_target(DATASETS.get(task.dataset).release_sizes).get(task.split)
                self._parts[key] = (release_parts(sizes, run.frac), None, f"{task.dataset} split {task.split}") \
                    if sizes else ({}, None, "")
            else:
                split, labels = committed
                roles = {"train": split.part_for_fraction(run.frac), "val": "val", "test": "test",
                         "train_all": "train"}
                self._parts[key] = ({role: split.ids(part) for role, part in roles.items() if part in split.parts},
                                    labels, "")
        return self._parts[key]

    def _committed(self, task: Any) -> tuple[Any, _SplitLabels] | None:
        """The task's committed split and its label column, or None where the split derives from the user's
        files (nothing to count without them)."""
        from vlpbench.data.splits import load_split

        key = (task.dataset, task.split)
        if key not in self._splits:
            try:
                split = load_split(task.dataset, task.split)
            except ConfigError:
                self._splits[key] = None
            else:
                self._splits[key] = (split, _SplitLabels(split))
        return self._splits[key]


def release_parts(sizes: dict[str, int], frac: float) -> dict[str, list[str]]:
    """Ids standing for the images of each role (``train`` at ``frac``, ``val``, ``test``, ``train_all``) of a
    split whose part sizes on the official release are ``sizes``: the names are unknown without the folder, so
    the protocols' counting rules run on placeholders (``"train 0"`` …); a fraction's ids are the first of
    train's, as its subset lies inside train."""
    from vlpbench.data.splits import Split

    roles = {"train": Split.part_for_fraction(frac), "val": "val", "test": "test", "train_all": "train"}
    return {role: [f"{part.split('_')[0]} {i}" for i in range(sizes[part])] for role, part in roles.items()
            if part in sizes}


def _usable_cpus() -> int:
    """The CPUs the image cache decodes on: the affinity mask (a SLURM job's share), else every CPU."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _row(estimate: RunEstimate) -> tuple[str, ...]:
    images = [str(estimate.images[role]) if role in estimate.images else "?" for role in ("train", "val", "test")]
    epochs = f"≤{estimate.epochs}" if estimate.epochs is not None else "-"
    time = _duration(estimate.seconds) if estimate.seconds is not None else "unknown"
    mark = f"({RELEASE_MARK})" if estimate.release_sizes and estimate.images else ""
    return (estimate.run.describe(), *images, epochs if estimate.images else "?", time, mark)


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """``rows`` as lines of columns, those in ``right`` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"``, ``"2.1 h"``."""
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _hours(seconds: float) -> str:
    """Device-hours: two decimals below 10 (``<0.01`` under that), one up to 100, none above."""
    hours = seconds / 3600
    if hours >= 100:
        return f"{hours:.0f}"
    if hours >= 10:
        return f"{hours:.1f}"
    return f"{hours:.2f}" if hours >= 0.01 or hours == 0 else "<0.01"
