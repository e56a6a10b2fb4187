"""What a sweep runs and how: models, tasks, fractions, seeds, overrides and launcher settings.

A sweep comes from a YAML file (``vlpbench sweep --config sweep.yaml``), from command-line options,
or both; options given on the command line replace the file's value of the same field. Paths are
taken as written (relative to the current directory), with ``~`` expanded. Unquoted values read as on the
command line (``vlpbench.options``): ``lr: 1e-3`` is a number, ``yes`` and ``no`` are text.

Fields (YAML keys; the command-line option in brackets)::

    models        list of {adapter, checkpoint?, options?, name?}, or adapter names   [--models a,b]
    tasks         task names, or {task_file: PATH} for a task file of your own   [--tasks t1,t2]
    fracs         training fractions                                [--fracs 0.01,0.1,1]
    seeds         seeds                                             [--seeds 0,1]
    set           {option: value} for every task, {"task:option": value} for one    [--set]
    profile       protocol profile of every run: canonical or paper (default canonical)   [--profile]
    data_roots    {dataset: folder}                                 [--data-root DATASET=DIR]
    results       results folder (default results)                  [--results]
    device        auto, cpu or cuda (default auto)                  [--device]
    threads       torch threads of each run (default: OMP_NUM_THREADS, else the usable CPUs, shared
                  among the local launcher's workers on CPU; vlpbench.threads)   [--threads]
    launcher      local, slurm or torchrun (default local)          [--launcher]
    workers       local launcher: parallel runs                     [--workers]
    slurm         {partition, timeout_min, gpus_per_node, array_parallelism, cpus_per_task, mem_gb, cluster}
    nproc_per_node  torchrun launcher: processes (GPUs) per run     [--nproc-per-node]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlpbench.errors import ConfigError
from vlpbench.options import load_yaml, parse_options, parse_value
from vlpbench.tasks import DEFAULT_PROFILE, PROFILES, load_task_file

LAUNCHERS = ("local", "slurm", "torchrun")
SLURM_KEYS = ("partition", "timeout_min", "gpus_per_node", "array_parallelism", "cpus_per_task", "mem_gb", "cluster")
MODEL_KEYS = ("adapter", "checkpoint", "options", "name")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a sweep: an adapter, its checkpoint and options, and its row label in tables."""

    adapter: str
    checkpoint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    @property
    def label(self) -> str:
        """The model's name in records and tables (see ``vlpbench.api.model_label``)."""
        from vlpbench.api import model_label

        return model_label(self.adapter, self.checkpoint, self.name)


@dataclass
class SweepSpec:
    """A validated sweep; see the module docstring for the fields."""

    models: list[ModelSpec]
    tasks: list[str]
    fracs: list[float]
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The tasks of ``tasks`` that come from a task file, by name: the file's absolute path.
    task_files: dict[str, str] = field(default_factory=dict)
    profile: str = DEFAULT_PROFILE
    data_roots: dict[str, str] = field(default_factory=dict)
    results: Path = Path("results")
    device: str = "auto"
    threads: int | None = None
    launcher: str = "local"
    workers: int | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    nproc_per_node: int = 1

    def overrides_for(self, task: str) -> dict[str, Any]:
        """The ``--set`` values a run of ``task`` gets: the sweep-wide ones, then the task's own."""
        return {**self.overrides, **self.task_overrides.get(task, {})}


FIELDS = ("models", "tasks", "fracs", "seeds", "set", "profile", "data_roots", "results", "device", "threads",
          "launcher", "workers", "slurm", "nproc_per_node")


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """The fields of a sweep YAML file, unvalidated (``build_spec`` checks them)."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"sweep file {path}: cannot be read ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping with keys {', '.join(FIELDS)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return data


def build_spec(values: dict[str, Any], origin: str = "sweep") -> SweepSpec:
    """Validate ``values`` (the fields of the module docstring) into a SweepSpec.

    ``origin`` names where the values come from (a file, or "command line") in error messages.

    Raises:
        ConfigError: a missing or malformed field, naming it and what was expected.
    """
    for key in ("models", "tasks", "fracs", "seeds"):
        if not values.get(key):
            raise ConfigError(f"{origin}: no {key} given (--{key} or the sweep file's {key!r} key)")
    overrides, task_overrides = _split_set(_mapping(values.get("set"), f"{origin}: 'set'"), origin)
    launcher = values.get("launcher") or "local"
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{origin}: launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    profile = values.get("profile") or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError(f"{origin}: profile {profile!r} is not one of {', '.join(PROFILES)}")
    tasks, task_files = _tasks(values["tasks"], origin)
    slurm = _mapping(values.get("slurm"), f"{origin}: 'slurm'")
    unknown = sorted(set(slurm) - set(SLURM_KEYS))
    if unknown:
        raise ConfigError(f"{origin}: unknown slurm option(s) {', '.join(unknown)}; known: {', '.join(SLURM_KEYS)}")
    spec = SweepSpec(
        models=_models(values["models"], origin),
        tasks=tasks,
        task_files=task_files,
        fracs=list(dict.fromkeys(_fraction(f, origin)
                                 for f in _list(values["fracs"], (int, float, str), f"{origin}: 'fracs'"))),
        seeds=list(dict.fromkeys(_list(values["seeds"], int, f"{origin}: 'seeds'"))),
        overrides=overrides,
        task_overrides=task_overrides,
        profile=profile,
        data_roots={str(k): str(Path(str(v)).expanduser())
                    for k, v in _mapping(values.get("data_roots"), f"{origin}: 'data_roots'").items()},
        results=Path(str(values.get("results") or "results")).expanduser(),
        device=str(values.get("device") or "auto"),
        threads=_positive(values.get("threads"), f"{origin}: 'threads'"),
        launcher=launcher,
        workers=_positive(values.get("workers"), f"{origin}: 'workers'"),
        slurm=slurm,
        nproc_per_node=_positive(values.get("nproc_per_node"), f"{origin}: 'nproc_per_node'") or 1,
    )
    labels = [model.label for model in spec.models]
    clashes = sorted({label for label in labels if labels.count(label) > 1})
    if clashes:
        raise ConfigError(f"{origin}: more than one model is labelled {', '.join(clashes)}; "
                          "give each a distinct 'name'")
    for task in spec.task_overrides:
        if task not in spec.tasks:
            raise ConfigError(f"{origin}: 'set' names task {task!r}, which the sweep does not run "
                              f"(tasks: {', '.join(spec.tasks)})")
    return spec


def merge(file_values: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The sweep file's fields with ``given`` ones replacing them; ``slurm`` options merge key by key."""
    merged = {**file_values, **given}
    if "slurm" in file_values and "slurm" in given:
        merged["slurm"] = {**(file_values["slurm"] or {}), **given["slurm"]}
    return merged


def cli_values(*, models: list[str] | None, checkpoints: list[str] | None, model_options: list[str] | None,
               tasks: list[str] | None, fracs: list[float] | None, seeds: list[int] | None,
               overrides: list[str] | None, data_roots: list[str] | None, **rest: Any) -> dict[str, Any]:
    """Sweep fields from command-line strings; only the options given appear in the result.

    ``checkpoints`` are ``MODEL=PATH``, ``model_options`` ``MODEL:KEY=VALUE``, ``overrides``
    ``KEY=VALUE`` or ``TASK:KEY=VALUE``, ``data_roots`` ``DATASET=DIR``; ``rest`` (profile, results, device,
    threads, launcher, workers, slurm, nproc_per_node) is taken as given, None meaning "not given".
    """
    values: dict[str, Any] = {key: value for key, value in rest.items() if value not in (None, {}, [])}
    if models:
        values["models"] = _cli_models(models, checkpoints or [], model_options or [])
    elif checkpoints or model_options:
        raise ConfigError("--checkpoint and --model-option need --models on the command line "
                          "(in a sweep file, give them in each model's entry)")
    for key, value in (("tasks", tasks), ("fracs", fracs), ("seeds", seeds)):
        if value:
            values[key] = value
    if overrides:
        values["set"] = parse_options(overrides, "--set", form="KEY=VALUE or TASK:KEY=VALUE")
    if data_roots:
        values["data_roots"] = dict(_pair(item, "=", "--data-root", "DATASET=DIR") for item in data_roots)
    return values


def set_arguments(overrides: dict[str, Any]) -> list[str]:
    """``KEY=VALUE`` strings that ``vlpbench.options.parse_options`` reads back as ``overrides``.

    A value is written as is where that reads back the same (``lr=0.001``, ``arch=resnet18``), else as
    JSON, which reads back unchanged (``name="1e-3"``, a string that would read as a number).
    """
    return [f"{key}={_argument_value(value)}" for key, value in overrides.items()]


def _argument_value(value: Any) -> str:
    if isinstance(value, str):
        try:
            back = parse_value(value)
        except ValueError:  # e.g. "[unclosed": written quoted
            back = None
        if type(back) is str and back == value:
            return value
    return json.dumps(value)


def canonical(overrides: dict[str, Any], what: str) -> dict[str, Any]:
    """``overrides`` exactly as a ``vlpbench run`` process parses them back from ``set_arguments``.

    A record's path hashes its overrides, so the sweep must predict them exactly (a tuple, for one,
    comes back a list).
    """
    try:
        return parse_options(set_arguments(overrides), what)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{what}: values must be numbers, strings, booleans or lists ({error})") from error


def _models(raw: Any, origin: str) -> list[ModelSpec]:
    models = []
    for i, entry in enumerate(_list(raw, (str, dict), f"{origin}: 'models'")):
        where = f"{origin}: models[{i}]"
        if isinstance(entry, str):
            entry = {"adapter": entry}
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(MODEL_KEYS)}")
        if not isinstance(entry.get("adapter"), str) or not entry["adapter"]:
            raise ConfigError(f"{where}: 'adapter' must name an adapter (see `vlpbench models`)")
        checkpoint = entry.get("checkpoint")
        models.append(ModelSpec(
            adapter=entry["adapter"],
            checkpoint=str(Path(str(checkpoint)).expanduser()) if checkpoint is not None else None,
            options=canonical(_mapping(entry.get("options"), f"{where}: 'options'"), f"{where}: 'options'"),
            name=str(entry["name"]) if entry.get("name") is not None else None,
        ))
    return models


def _tasks(raw: Any, origin: str) -> tuple[list[str], dict[str, str]]:
    """The task names of a sweep's ``tasks`` entries (each once, in the order of first mention: a task given
    twice would plan the same runs twice), and the file of each ``{task_file: PATH}`` entry by its task's name;
    a task file is loaded and validated here, before anything runs."""
    names: list[str] = []
    files: dict[str, str] = {}
    for i, entry in enumerate(_list(raw, (str, dict), f"{origin}: 'tasks'")):
        if isinstance(entry, dict):
            if set(entry) != {"task_file"} or not isinstance(entry["task_file"], str) or not entry["task_file"]:
                raise ConfigError(f"{origin}: tasks[{i}]: expected a task name or {{task_file: PATH}}, got {entry!r}")
            task = load_task_file(entry["task_file"])
            if files.get(task.name, str(task.path)) != str(task.path):
                raise ConfigError(f"{origin}: tasks[{i}]: task files {files[task.name]} and {task.path} both "
                                  f"name their task {task.name!r}")
            files[task.name] = str(task.path)
            entry = task.name
        names.append(entry)
    return list(dict.fromkeys(names)), files


def _cli_models(names: list[str], checkpoints: list[str], options: list[str]) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {name: {"adapter": name} for name in names}

    def entry(model: str, option: str) -> dict[str, Any]:
        if model not in entries:
            raise ConfigError(f"{option}: model {model!r} is not in --models ({', '.join(names)})")
        return entries[model]

    for item in checkpoints:
        model, path = _pair(item, "=", "--checkpoint", "MODEL=PATH")
        entry(model, "--checkpoint")["checkpoint"] = path
    for item in options:
        model, setting = _pair(item, ":", "--model-option", "MODEL:KEY=VALUE")
        entry(model, "--model-option").setdefault("options", {}).update(parse_options([setting], "--model-option"))
    return list(entries.values())


def _split_set(values: dict[str, Any], origin: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``{key: v, "task:key": v}`` into the sweep-wide overrides and the per-task ones."""
    common: dict[str, Any] = {}
    per_task: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        task, sep, option = str(key).rpartition(":")
        if sep and not (task and option):
            raise ConfigError(f"{origin}: set key {key!r}: expected OPTION or TASK:OPTION")
        (per_task.setdefault(task, {}) if sep else common)[option] = value
    common = canonical(common, f"{origin}: 'set'")
    return common, {task: canonical(v, f"{origin}: 'set'") for task, v in per_task.items()}


def _pair(item: str, separator: str, option: str, form: str) -> tuple[str, str]:
    left, sep, right = item.partition(separator)
    if not sep or not left.strip() or not right.strip():
        raise ConfigError(f"{option} {item!r}: expected {form}")
    return left.strip(), right.strip()


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping, got {value!r}")
    return dict(value)


def _list(value: Any, kinds: type | tuple[type, ...], what: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, kinds) or isinstance(item, bool):
            raise ConfigError(f"{what}: expected a list of {_kind_names(kinds)}, got {item!r}")
    return items


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {int: "integers", float: "numbers", str: "strings", dict: "mappings"}
    return " or ".join(names.get(k, k.__name__) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def _fraction(value: Any, origin: str) -> float:
    from vlpbench.report.table import parse_fraction

    try:
        return parse_fraction(str(value))
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None


def _positive(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what}: expected a positive integer, got {value!r}")
    return value
