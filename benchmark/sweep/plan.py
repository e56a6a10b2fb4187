"""A sweep expanded into runs (model × task × allowed fraction × seed), and which of them are done.

A run is done when its record exists at the path ``vlpbench run`` would write it to: that path holds
the model label, the checkpoint's sha256, the task version, the fraction, the seed and a hash of the
overrides, so an existing record means the same resolved configuration has already run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.registry import DATASETS
from vlpbench.results import record_path
from vlpbench.sweep.spec import ModelSpec, SweepSpec, set_arguments
from vlpbench.tasks import DEFAULT_PROFILE, load_task, load_task_file

LOG_FOLDER = "sweep_logs"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Run:
    """One ``vlpbench run`` of a sweep, with where its record and its log go.

    ``record`` is None when the checkpoint cannot be read now (the run is then attempted, and its
    log says why it fails).
    """

    model: ModelSpec
    task: str
    frac: float
    seed: int
    overrides: dict[str, Any]
    data_root: str | None
    record: Path | None
    log: Path
    profile: str = DEFAULT_PROFILE
    task_file: str | None = None  # the task's file, for a task of the user's own (``--task-file``)

    def describe(self) -> str:
        """``"g2d siim_seg 1% seed 0"``, for progress lines and tables."""
        profile = "" if self.profile == DEFAULT_PROFILE else f" ({self.profile})"
        return f"{self.model.label} {self.task}{profile} {self.frac:.0%} seed {self.seed}"

    def arguments(self, results: Path, device: str, *, overwrite: bool, threads: int | None = None) -> list[str]:
        """The arguments of ``vlpbench`` that perform this run (``run --model ...``); ``threads``: its
        ``--threads`` (None: the run chooses, ``vlpbench.threads``)."""
        task = ["--task-file", self.task_file] if self.task_file is not None else ["--task", self.task]
        argv = ["run", "--model", self.model.adapter, *task, "--frac", repr(self.frac),
                "--seed", str(self.seed), "--results", str(results), "--device", device, "--no-progress"]
        if threads is not None:
            argv += ["--threads", str(threads)]
        if self.model.checkpoint is not None:
            argv += ["--checkpoint", self.model.checkpoint]
        if self.model.name is not None:
            argv += ["--name", self.model.name]
        for setting in set_arguments(self.model.options):
            argv += ["--model-option", setting]
        if self.data_root is not None:
            argv += ["--data-root", self.data_root]
        for setting in set_arguments(self.overrides):
            argv += ["--set", setting]
        if self.profile != DEFAULT_PROFILE:
            argv += ["--profile", self.profile]
        if overwrite:
            argv.append("--overwrite")
        return argv


@dataclass
class Plan:
    """The runs of a sweep, in order, and notes on combinations left out (disallowed fractions)."""

    runs: list[Run]
    notes: list[str]


def expand(spec: SweepSpec) -> Plan:
    """Every (model, task, fraction, seed) run of ``spec``; a fraction a task does not allow is left out
    with a note. Tasks, adapters and overrides are checked here, before anything runs.

    Raises:
        ConfigError / RegistryError: an unknown task or adapter, or an override the task rejects.
    """
    from vlpbench.adapters import adapter_names, get_adapter

    for model in spec.models:
        if model.adapter not in adapter_names():
            get_adapter(model.adapter)  # raises, suggesting the closest names
    identities = {model.label: checkpoint_sha256(model) for model in spec.models}
    runs, notes = [], []
    for task_name in spec.tasks:
        task_file = spec.task_files.get(task_name)
        task = load_task_file(task_file, spec.profile) if task_file else load_task(task_name, spec.profile)
        overrides = spec.overrides_for(task_name)
        try:
            task.resolve(overrides)
        except ConfigError as error:
            raise ConfigError(f"{error} (in a sweep, TASK:KEY=VALUE sets an option of one task only)") from None
        # A split set of another dataset's download (chexpert_test) also takes that dataset's folder.
        dataset_root = spec.data_roots.get(task.dataset) or spec.data_roots.get(DATASETS.get(task.dataset).folder)
        fracs = [f for f in spec.fracs if f in task.fractions]
        left_out = [f for f in spec.fracs if f not in task.fractions]
        if left_out:
            notes.append(f"{task_name} allows fractions {', '.join(f'{f:g}' for f in task.fractions)}: "
                         f"{', '.join(f'{f:g}' for f in left_out)} left out")
        for model in spec.models:
            for frac in fracs:
                for seed in spec.seeds:
                    stub = {"model": {"name": model.label, "checkpoint": _checkpoint(identities[model.label])},
                            "task": {"name": task.name, "version": task.version, "profile": task.profile},
                            "frac": frac, "seed": seed,
                            "config": {"overrides": overrides}}
                    path = record_path(spec.results, stub)
                    runs.append(Run(model=model, task=task_name, frac=frac, seed=seed, overrides=overrides,
                                    data_root=dataset_root,
                                    record=None if identities[model.label] is False else path,
                                    log=log_path(spec.results, task_name, path, task.profile),
                                    profile=task.profile, task_file=task_file))
    return Plan(runs=runs, notes=notes)


def pending(runs: list[Run], *, force: bool = False) -> tuple[list[Run], list[Run]]:
    """``(runs to launch, runs skipped because their record exists)``; ``force`` launches all."""
    if force:
        return list(runs), []
    exists = [run.record is not None and run.record.is_file() for run in runs]
    return [run for run, e in zip(runs, exists) if not e], [run for run, e in zip(runs, exists) if e]


def log_path(results: Path, task: str, record: Path, profile: str = DEFAULT_PROFILE) -> Path:
    """``<results>/sweep_logs/<model>/<task>[-<profile>]/frac<f>-seed<s>[-<overrides hash>].log`` for the run
    whose record goes to ``record`` (``runs/<model>/<checkpoint>/<task>.v<version>[-<profile>]/<stem>.json``)."""
    folder = task if profile == DEFAULT_PROFILE else f"{task}-{profile}"
    return Path(results) / LOG_FOLDER / record.parents[2].name / folder / f"{record.stem}.log"


def checkpoint_sha256(model: ModelSpec) -> str | None | bool:
    """The sha256 a record of ``model`` will carry: None without a checkpoint, False when it cannot be
    read now. A file is hashed whole, as ``load_state_dict_file`` does (here without importing torch:
    the sweep process plans, its run processes import the models); anything else, such as a model
    folder, is read by the adapter itself."""
    if model.checkpoint is None:
        return None
    path = Path(model.checkpoint)
    try:
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
            return digest.hexdigest()
        if not path.exists():
            return False
        from vlpbench.adapters import get_adapter

        return get_adapter(model.adapter)._read(path)[2]
    except (OSError, VlpbenchError):
        return False


def _checkpoint(sha256: str | None | bool) -> dict[str, str] | None:
    return {"path": "", "sha256": sha256} if isinstance(sha256, str) else None
