"""Where each dataset lives on this machine, and where vlpbench keeps what it derives from it.

A dataset root is looked up, first match wins, in: the ``--data-root`` option; the environment
variable ``VLPBENCH_<DATASET>_ROOT`` (e.g. ``VLPBENCH_SIIM_ROOT``); ``$VLPBENCH_DATA/<dataset>``;
the ``data:`` mapping of ``./vlpbench.yaml`` or ``~/.config/vlpbench/config.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vlpbench.errors import ConfigError

CONFIG_FILES = (Path("vlpbench.yaml"), Path("~/.config/vlpbench/config.yaml"))


def _config_file_roots() -> tuple[dict[str, str], Path | None]:
    for candidate in CONFIG_FILES:
        path = candidate.expanduser()
        if path.is_file():
            try:
                spec = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
            data = spec.get("data", {})
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: key 'data' must map dataset names to folders")
            return {str(k): str(v) for k, v in data.items()}, path
    return {}, None


def resolve_data_root(dataset: str, data_root: str | os.PathLike | None = None) -> Path:
    """The folder that holds ``dataset`` as its download unpacks, or a ConfigError saying where we looked."""
    looked = []
    if data_root is not None:
        return _existing(Path(data_root), "--data-root")
    env_name = f"VLPBENCH_{dataset.upper()}_ROOT"
    if os.environ.get(env_name):
        return _existing(Path(os.environ[env_name]), env_name)
    looked.append(env_name)
    if os.environ.get("VLPBENCH_DATA"):
        return _existing(Path(os.environ["VLPBENCH_DATA"]) / dataset, "VLPBENCH_DATA")
    looked.append("VLPBENCH_DATA")
    roots, path = _config_file_roots()
    if dataset in roots:
        return _existing(Path(roots[dataset]).expanduser(), f"{path} data.{dataset}")
    looked.extend(str(p) for p in CONFIG_FILES)
    raise ConfigError(f"no data folder for dataset {dataset!r}: pass --data-root, or set one of "
                      f"{', '.join(looked)} (for a synthetic copy: vlpbench synth --dataset {dataset} --out DIR)")


def _existing(path: Path, origin: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"data folder {path} (from {origin}) does not exist")
    return path


def cache_dir() -> Path:
    """Where vlpbench keeps what it derives from the user's data (splits derived from user files,
    image caches): ``$VLPBENCH_CACHE``, else ``~/.cache/vlpbench``."""
    return Path(os.environ.get("VLPBENCH_CACHE") or Path("~/.cache/vlpbench").expanduser())
