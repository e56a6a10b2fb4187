"""``vlpbench baseline update``: copy result records into the CI baseline folder, on request only.

A baseline folder has the layout of a results folder (``<baseline-dir>/runs/...``), so ``vlpbench
compare --baseline <baseline-dir>`` reads it like any results. It keeps one record per *slot*:
(model name, task, fraction, seed, task overrides). A record of a new checkpoint or task version
of the same model fills the same slot, so the baseline never holds two models for one cell.

A record identical to the baseline's is left alone. A slot the baseline already fills with another
record is a conflict: without ``force`` nothing at all is written and the conflicts are listed; with
``force`` each replaced record is renamed to ``<name>.replaced-<UTC time>.json.bak`` beside it (which
:func:`vlpbench.results.load_records` ignores) before the new one is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlpbench.errors import ConfigError, DataError
from vlpbench.files import atomic_write, backup_path
from vlpbench.results import load_record, record_path, write_record


@dataclass
class BaselineUpdate:
    """What an update did: paths under the baseline folder."""

    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    replaced: list[tuple[Path, Path]] = field(default_factory=list)  # (old record, its .bak)

    def format(self) -> str:
        lines = [f"wrote {len(self.written)} record(s), {len(self.unchanged)} unchanged, "
                 f"{len(self.replaced)} replaced"]
        lines += [f"  replaced {old} (kept as {backup.name})" for old, backup in self.replaced]
        lines += [f"  wrote {path}" for path in self.written]
        return "\n".join(lines)


def _slot(record: dict) -> tuple:
    overrides = json.dumps((record.get("config") or {}).get("overrides") or {}, sort_keys=True, default=str)
    return (record["model"]["name"], record["task"]["name"], round(float(record["frac"]), 6), record["seed"],
            overrides)


def _records(folder: Path) -> list[tuple[Path, dict]]:
    runs = folder / "runs"
    if not runs.is_dir():
        return []
    return [(path, load_record(path)) for path in sorted(runs.rglob("*.json")) if path.is_file()]


def update_baseline(results: str | os.PathLike, baseline_dir: str | os.PathLike, *,
                    force: bool = False) -> BaselineUpdate:
    """Copy every record under ``results/runs`` into ``baseline_dir`` (see the module docstring).

    Raises:
        DataError: ``results`` does not exist or holds no record, or two of its records fill one slot.
        ConfigError: baseline records would be replaced and ``force`` is False; nothing is written.
    """
    results, baseline_dir = Path(results), Path(baseline_dir)
    if not results.is_dir():
        raise DataError(f"results folder {results} does not exist")
    incoming = _records(results)
    if not incoming:
        raise DataError(f"no result records under {results / 'runs'} to make a baseline of")
    slots: dict[tuple, Path] = {}
    for path, record in incoming:
        if _slot(record) in slots:
            raise DataError(f"{path} and {slots[_slot(record)]} fill the same baseline slot (model "
                            f"{record['model']['name']}, {record['task']['name']}, frac {record['frac']}, seed "
                            f"{record['seed']}); a baseline keeps one checkpoint and task version per model")
        slots[_slot(record)] = path

    existing: dict[tuple, list[tuple[Path, dict]]] = {}
    for path, record in _records(baseline_dir):
        existing.setdefault(_slot(record), []).append((path, record))
    update = BaselineUpdate()
    plan: list[tuple[Path, dict, list[Path]]] = []
    for source, record in incoming:
        target = record_path(baseline_dir, record)
        occupants = existing.get(_slot(record), [])
        if any(path == target and old == record for path, old in occupants):
            update.unchanged.append(target)
            continue
        plan.append((source, record, [path for path, _ in occupants]))
    conflicts = [path for _, _, olds in plan for path in olds]
    if conflicts and not force:
        raise ConfigError(f"{len(conflicts)} baseline record(s) would be replaced; nothing was written. Pass "
                          f"--force to replace them (each old record is kept as a .bak file): "
                          + ", ".join(map(str, conflicts)))
    for source, record, olds in plan:
        for old in olds:
            backup = backup_path(old)
            old.rename(backup)
            update.replaced.append((old, backup))
        written = write_record(record, baseline_dir)
        if record.get("evidence"):  # the sidecar travels with its record (vlpbench.evidence)
            atomic_write(written.with_name(record["evidence"]["file"]),
                         source.with_name(record["evidence"]["file"]).read_bytes(), backup=backup_path)
        update.written.append(written)
    return update
