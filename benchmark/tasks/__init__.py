"""Task specifications: one versioned YAML file per task in this folder."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlpbench.errors import ConfigError
from vlpbench.metrics.specs import metric_spec

TASKS_DIR = Path(__file__).resolve().parent
_REQUIRED = ("name", "version", "description", "dataset", "split", "protocol", "primary_metric",
             "fractions", "config", "sources")


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

    @property
    def higher_is_better(self) -> bool:
        """The direction of the primary metric (no task ranks a metric the other way round)."""
        return metric_spec(self.primary_metric).higher_is_better

    def resolve(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The task config with ``overrides`` applied; unknown keys and type changes are errors."""
        resolved = copy.deepcopy(self.config)
        for key, value in (overrides or {}).items():
            if key not in resolved:
                close = difflib.get_close_matches(key, resolved, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"--set {key}: task {self.name} has no option {key!r}{hint}; "
                                  f"options: {', '.join(sorted(resolved))}")
            default = resolved[key]
            if default is not None and not _compatible(default, value):
                raise ConfigError(f"--set {key}={value!r}: expected {type(default).__name__} "
                                  f"like the default {default!r}")
            resolved[key] = float(value) if isinstance(default, float) else value
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


def task_names() -> list[str]:
    """Names of all tasks shipped with vlpbench."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(name: str) -> Task:
    """Load and validate the task YAML called ``name``."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, task_names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown task {name!r}.{hint} Known: {', '.join(task_names())}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    missing = [key for key in _REQUIRED if key not in (spec or {})]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    if spec["name"] != name:
        raise ConfigError(f"{path}: name {spec['name']!r} does not match the file name {name!r}")
    _check_primary_metric(path, spec["primary_metric"])
    spec["fractions"] = tuple(float(f) for f in spec["fractions"])
    return Task(path=path, compare=spec.get("compare"), **{key: spec[key] for key in _REQUIRED})
