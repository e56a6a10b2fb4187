"""Task specifications: one versioned YAML file per task in this folder.

A task file holds the ``canonical`` protocol (``split``, ``primary_metric``, ``config``) and, under
``profiles:``, the settings another profile changes, each with the source it follows::

    profiles:
      paper:
        description: MGCA's downstream code, the code behind the published numbers
        split: {value: mgca, source: "HKU-MedAI/MGCA mgca/preprocess/rsna.py:110-113"}
        primary_metric: {value: map_mgca, source: "..."}
        config:
          freeze_bn: {value: false, source: "HKU-MedAI/MGCA mgca/models/mgca/mgca_detector.py:69-71"}

or, where no reference code exists, ``paper: {unavailable: "why"}``. :func:`load_task` returns the
task with one profile resolved; records carry the profile, and tables never mix two profiles in a cell.

A user-written task file (``--task-file PATH``) is loaded from that path by :func:`load_task_file` and validated
exactly as a shipped task is; its name is its file's name and no shipped task's, and records of it carry its
protocol and the file's path and sha256 (:meth:`Task.record_fields`), so readers need no file.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vlpbench.errors import ConfigError
from vlpbench.metrics.specs import metric_spec
from vlpbench.tasks.domains import CountOrAuto, OutOfDomain, check_option, domain_of

TASKS_DIR = Path(__file__).resolve().parent
_REQUIRED = ("name", "version", "description", "dataset", "split", "protocol", "primary_metric",
             "fractions", "config", "sources")
_OPTIONAL = ("compare", "profiles")
PROFILES = ("canonical", "paper")
DEFAULT_PROFILE = "canonical"
PROFILE_HELP = {
    "canonical": "vlpbench's sound defaults (BatchNorm frozen, every image counted, thresholds tuned on validation)",
    "paper": "the reference code that produced the published numbers, setting by setting, each with its source",
}


@dataclass(frozen=True)
class Setting:
    """One setting a profile changes: ``key`` is ``split``, ``primary_metric`` or a config key."""

    key: str
    value: Any
    source: str


@dataclass(frozen=True)
class Profile:
    """A profile as a task file declares it: the settings it changes, or why it is unavailable."""

    name: str
    description: str = ""
    settings: tuple[Setting, ...] = ()
    unavailable: str | None = None


@dataclass(frozen=True)
class Task:
    """A task as its YAML file declares it; ``config`` holds the protocol hyper-parameters."""

    name: str
    version: int
    description: str
    dataset: str
    split: str
    protocol: str
    primary_metric: str  # a metric's name as vlpbench.metrics registers it
    fractions: tuple[float, ...]
    config: dict[str, Any]
    sources: dict[str, str]
    path: Path = field(compare=False)
    # Optional `compare:` mapping, regression tolerances for `vlpbench compare`: abs_tol (a number,
    # or {fraction: number}), k, rationale; validated by vlpbench.report.compare.task_tolerance.
    compare: dict[str, Any] | None = field(default=None, compare=False)
    profile: str = DEFAULT_PROFILE
    profiles: dict[str, Profile] = field(default_factory=dict, compare=False)
    # The sha256 of the file of a task loaded by load_task_file; None for a shipped task.
    file_sha256: str | None = field(default=None, compare=False)

    def record_fields(self) -> dict[str, Any]:
        """The ``task`` of a result record of this task (:mod:`vlpbench.results`): name, version, protocol,
        profile and direction, and for a task file ``file: {path, sha256}``."""
        fields = {"name": self.name, "version": self.version, "protocol": self.protocol, "profile": self.profile,
                  "higher_is_better": self.higher_is_better}
        if self.file_sha256 is not None:
            fields["file"] = {"path": str(self.path), "sha256": self.file_sha256}
        return fields

    @property
    def higher_is_better(self) -> bool:
        """The direction of the primary metric (no task ranks a metric the other way round)."""
        return metric_spec(self.primary_metric).higher_is_better

    def with_profile(self, profile: str) -> "Task":
        """This task under ``profile``: its split, primary metric and config as that profile sets them.

        Raises:
            ConfigError: an unknown profile, or one this task cannot offer (the message says why).
        """
        if profile not in PROFILES:
            raise ConfigError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
        if profile == self.profile:
            return self
        if self.profile != DEFAULT_PROFILE:
            raise ConfigError(f"task {self.name} is already resolved for profile {self.profile!r}")
        spec = self.profiles.get(profile)
        if spec is None:
            raise ConfigError(f"--profile {profile}: task {self.name} declares no {profile!r} profile "
                              f"(in {self.path})")
        if spec.unavailable:
            raise ConfigError(f"--profile {profile}: task {self.name} has no {profile!r} profile: {spec.unavailable}")
        values = {s.key: s.value for s in spec.settings}
        config = copy.deepcopy(self.config)
        config.update({k: v for k, v in values.items() if k in self.config})
        return replace(self, config=config, split=values.get("split", self.split),
                       primary_metric=values.get("primary_metric", self.primary_metric), profile=profile)

    def profile_settings(self) -> tuple[Setting, ...]:
        """The settings the resolved profile changes from ``canonical``, with their sources (none for canonical)."""
        spec = self.profiles.get(self.profile)
        return spec.settings if spec is not None else ()

    def resolve(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The task config with ``overrides`` applied; unknown keys, type changes and values outside the
        option's domain (:mod:`vlpbench.tasks.domains`) are errors."""
        resolved = copy.deepcopy(self.config)
        for key, value in (overrides or {}).items():
            if key not in resolved:
                close = difflib.get_close_matches(key, resolved, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"--set {key}: task {self.name} has no option {key!r}{hint}; "
                                  f"options: {', '.join(sorted(resolved))}")
            default = resolved[key]
            # An inference batch size takes an integer where its default is "auto" (its domain decides).
            mixed = isinstance(domain_of(self.protocol, key), CountOrAuto)
            if default is not None and not mixed and not _compatible(default, value):
                raise ConfigError(f"--set {key}={value!r}: expected {type(default).__name__} "
                                  f"like the default {default!r}")
            try:
                resolved[key] = check_option(self.protocol, key, value)
            except OutOfDomain as error:
                raise ConfigError(f"--set {key}={value!r}: expected {error} (task {self.name}, default "
                                  f"{default!r})") from None
        return resolved


def _compatible(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))


def _check_primary_metric(path: Path, name: Any) -> None:
    """ConfigError unless ``name`` is a metric's current name (not unknown, not a former name)."""
    try:
        current = metric_spec(name).name
    except ConfigError as error:
        raise ConfigError(f"{path}: primary_metric: {error}") from None
    if current != name:
        raise ConfigError(f"{path}: primary_metric {name!r} is the former name of {current!r}; write {current!r}")


def _in_domain(path: Path, protocol: str, key: str, value: Any, at: str) -> Any:
    """``value`` of option ``key`` as its domain takes it; ConfigError naming the file and ``at`` otherwise."""
    try:
        return check_option(protocol, key, value)
    except KeyError:
        raise ConfigError(f"{path}: key {at!r}: option {key!r} of protocol {protocol} declares no type and "
                          "domain (add it to vlpbench/tasks/domains.py)") from None
    except OutOfDomain as error:
        raise ConfigError(f"{path}: key {at!r}: expected {error}, got {value!r}") from None


def task_names() -> list[str]:
    """Names of all tasks shipped with vlpbench."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _profiles(path: Path, spec: dict) -> dict[str, Profile]:
    """The ``profiles:`` mapping of a task file, validated: every setting names a known key, keeps the
    type of the canonical value and cites a source."""
    raw = spec.get("profiles")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: key 'profiles' must map profile names to their settings")
    profiles = {}
    for name, body in raw.items():
        where = f"profiles.{name}"
        if name not in PROFILES or name == DEFAULT_PROFILE:
            others = [p for p in PROFILES if p != DEFAULT_PROFILE]
            raise ConfigError(f"{path}: key {where!r}: expected one of {', '.join(others)} "
                              f"({DEFAULT_PROFILE!r} is the task's own split, primary_metric and config)")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: key {where!r} must be a mapping")
        unknown = sorted(set(body) - {"description", "split", "primary_metric", "config", "unavailable"})
        if unknown:
            raise ConfigError(f"{path}: unknown key '{where}.{unknown[0]}' (known: description, split, "
                              "primary_metric, config, unavailable)")
        if "unavailable" in body:
            if set(body) - {"unavailable", "description"} or not isinstance(body["unavailable"], str):
                raise ConfigError(f"{path}: key '{where}.unavailable' must be the reason as a string, alone")
            profiles[name] = Profile(name, body.get("description", ""), unavailable=body["unavailable"])
            continue
        settings = []
        entries = [(key, body[key], f"{where}.{key}") for key in ("split", "primary_metric") if key in body]
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: key '{where}.config' must map option names to {{value, source}}")
        entries += [(key, entry, f"{where}.config.{key}") for key, entry in config.items()]
        for key, entry, at in entries:
            if not isinstance(entry, dict) or set(entry) != {"value", "source"}:
                raise ConfigError(f"{path}: key {at!r}: expected {{value: ..., source: ...}}, got {entry!r}")
            if not isinstance(entry["source"], str) or not entry["source"].strip():
                raise ConfigError(f"{path}: key '{at}.source': every setting of a profile cites its source")
            value = entry["value"]
            if key == "split":
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{path}: key '{at}.value': expected a split version name")
            elif key == "primary_metric":
                _check_primary_metric(path, value)
            else:
                if key not in spec["config"]:
                    close = difflib.get_close_matches(key, spec["config"], n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(f"{path}: key {at!r}: the task has no option {key!r}{hint}")
                default = spec["config"][key]
                if default is not None and not _compatible(default, value):
                    raise ConfigError(f"{path}: key '{at}.value': expected {type(default).__name__} like the "
                                      f"canonical {default!r}, got {value!r}")
                value = _in_domain(path, spec["protocol"], key, value, f"{at}.value")
            settings.append(Setting(key, value, entry["source"].strip()))
        profiles[name] = Profile(name, body.get("description", ""), tuple(settings))
    return profiles


def load_task(name: str, profile: str = DEFAULT_PROFILE) -> Task:
    """Load and validate the task YAML called ``name``, resolved for ``profile`` (see :meth:`Task.with_profile`)."""
    # Only a shipped task's own file: a name is never joined onto the folder as a path ("../x" stays outside).
    if not isinstance(name, str) or name not in task_names():
        close = difflib.get_close_matches(str(name), task_names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown task {name!r}.{hint} Known: {', '.join(task_names())}")
    path = TASKS_DIR / f"{name}.yaml"
    return _task(path, path.read_bytes()).with_profile(profile)


def load_task_file(path: str | Path, profile: str = DEFAULT_PROFILE) -> Task:
    """Load and validate the user-written task YAML at ``path`` itself, resolved for ``profile``.

    The checks are those of a shipped task (:func:`load_task`); besides, its ``name`` is no shipped task's, and it
    has no ``compare:`` mapping (``vlpbench compare`` reads records, never this file). The task remembers the
    file's sha256 for its records (:meth:`Task.record_fields`).

    Raises:
        ConfigError: the file cannot be read, or fails a check; the message names the file and the key.
    """
    path = Path(path).expanduser().resolve()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"task file {path}: cannot be read ({error.strerror})") from None
    task = _task(path, data)
    if task.name in task_names():
        raise ConfigError(f"{path}: key 'name': {task.name!r} is the name of a shipped task "
                          f"({TASKS_DIR / task.name}.yaml); give the task (and its file) another name")
    if task.compare is not None:
        raise ConfigError(f"{path}: key 'compare': `vlpbench compare` reads the records, never a task file, so "
                          "it would not see these tolerances; remove the key and pass --abs-tol / --k to compare")
    return replace(task, file_sha256=hashlib.sha256(data).hexdigest()).with_profile(profile)


def _task(path: Path, data: bytes) -> Task:
    """The task in ``data``, the bytes of the task file ``path``, validated (canonical profile)."""
    from vlpbench.registry import DATASETS, PROTOCOLS

    try:
        spec = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with the keys {', '.join(_REQUIRED)}, got {spec!r}")
    missing = [key for key in _REQUIRED if key not in spec]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(map(str, spec)) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    if spec["name"] != path.stem:
        raise ConfigError(f"{path}: name {spec['name']!r} does not match the file name {path.stem!r}")
    version = spec["version"]
    if not ((isinstance(version, int) and not isinstance(version, bool) and version >= 1)
            or (isinstance(version, str) and version)):
        raise ConfigError(f"{path}: key 'version': expected a positive integer (or a non-empty string), got {version!r}")
    for key in ("description", "dataset", "split", "protocol"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise ConfigError(f"{path}: key {key!r}: expected a non-empty string, got {spec[key]!r}")
    for key, registry in (("dataset", DATASETS), ("protocol", PROTOCOLS)):
        if spec[key] not in registry:
            raise ConfigError(f"{path}: key {key!r}: unknown {registry.kind} {spec[key]!r}; known: "
                              f"{', '.join(registry.names())}")
    _check_primary_metric(path, spec["primary_metric"])
    if not isinstance(spec["config"], dict):
        raise ConfigError(f"{path}: key 'config' must map option names to values")
    spec["config"] = {key: _in_domain(path, spec["protocol"], key, value, f"config.{key}")
                      for key, value in spec["config"].items()}
    spec["fractions"] = _fractions(path, spec["fractions"])
    sources = spec["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ConfigError(f"{path}: key 'sources': expected a mapping of names to the sources they follow, "
                          f"got {sources!r}")
    return Task(path=path, compare=spec.get("compare"), profiles=_profiles(path, spec),
                **{key: spec[key] for key in _REQUIRED})


def _fractions(path: Path, value: Any) -> tuple[float, ...]:
    """The ``fractions`` of a task file: a non-empty list of numbers in (0, 1], each once."""
    def fraction(f: Any) -> bool:
        return isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1

    if not isinstance(value, list) or not value or not all(map(fraction, value)):
        raise ConfigError(f"{path}: key 'fractions': expected a list of training fractions in (0, 1], e.g. "
                          f"[0.01, 0.1, 1.0], got {value!r}")
    fractions = tuple(float(f) for f in value)
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"{path}: key 'fractions': each fraction once, got {value!r}")
    return fractions
