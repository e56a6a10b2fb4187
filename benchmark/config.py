"""Where each dataset lives on this machine, and where vlpbench keeps what it derives from it.

A dataset root is looked up, first match wins, in: the ``--data-root`` option; the environment
variable ``VLPBENCH_<DATASET>_ROOT`` (e.g. ``VLPBENCH_SIIM_ROOT``); ``$VLPBENCH_DATA/<dataset>``;
the ``data:`` mapping of ``./vlpbench.yaml`` or ``~/.config/vlpbench/config.yaml``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from vlpbench.errors import ConfigError

CONFIG_FILES = (Path("vlpbench.yaml"), Path("~/.config/vlpbench/config.yaml"))


KNOWN_KEYS = ("data",)


def read_config_file(path: Path) -> dict[str, str]:
    """The ``data:`` mapping (dataset name → folder) of the config file at ``path``, the whole file checked.

    Raises:
        ConfigError: naming the file (and the key and line): not UTF-8, not YAML, not a mapping, an
            unknown top-level key, ``data`` not a mapping, or a folder that is not a path as text.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        spec = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping such as 'data: {{siim: /data/siim}}', "
                          f"got {type(spec).__name__} {_short(spec)}")
    for key in spec:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(str(key), KNOWN_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}, line {_line(root, key)}: unknown key {key!r}{hint}; "
                              f"known: {', '.join(KNOWN_KEYS)}")
    data = spec.get("data")
    if data is None:
        return {}
    data_node = _value_node(root, "data")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}, line {_line(root, 'data')}: key 'data' must map dataset names to folders, "
                          f"got {type(data).__name__} {_short(data)}")
    for name, folder in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}, line {_line(data_node, name)}: key 'data.{name}': expected a dataset "
                              "name (text)")
        if not isinstance(folder, str) or not folder.strip():
            raise ConfigError(f"{path}, line {_line(data_node, name)}: key 'data.{name}': expected a folder "
                              f"path (text), got {_short(folder)}")
    return dict(data)


def _value_node(mapping: yaml.Node | None, key: object) -> yaml.Node | None:
    """The value node of ``key`` in a YAML mapping node (keys compared as their text), or None."""
    return next((value for name, value in getattr(mapping, "value", ()) if _is_key(name, key)), None)


def _line(mapping: yaml.Node | None, key: object) -> int | str:
    """The 1-based line of ``key`` in a YAML mapping node, or ``?`` where it cannot be told."""
    return next((name.start_mark.line + 1 for name, _ in getattr(mapping, "value", ()) if _is_key(name, key)), "?")


def _is_key(node: yaml.Node, key: object) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.value == str(key)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _config_file_roots() -> tuple[dict[str, str], Path | None]:
    for candidate in CONFIG_FILES:
        path = candidate.expanduser()
        if path.is_file():
            return read_config_file(path), path
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
