"""``KEY=VALUE`` options (``--set``, ``--model-option``, a sweep's ``set`` and ``options``) and their values.

Every such value follows one set of rules (:func:`parse_value`; a sweep file's unquoted values too,
:func:`load_yaml`):

- ``true`` / ``false`` (also ``True``, ``TRUE``, ``False``, ``FALSE``) are booleans; ``yes``, ``no``,
  ``on`` and ``off`` stay text;
- ``null``, ``~`` or nothing is None;
- an integer (``2``, ``-3``, ``1_000``) is an int; a number with a point or an exponent (``0.5``,
  ``1e-3``, ``.5``), or ``inf`` / ``nan``, is a float;
- a value that starts with ``[`` or ``{`` is a YAML flow list or mapping (``[0.9, 0.999]``), whose
  items follow the same rules; one that starts with a quote is a YAML quoted string (``"1e-3"`` is text);
- anything else is the text itself, unchanged (``resnet18``, ``C:/data``, ``a: b``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import yaml

from vlpbench.errors import ConfigError

_NULL = ("", "~", "null", "Null", "NULL")
_BOOLEANS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+(?:_[0-9]+)*")
# Candidates for float(): digits with a point, underscores or an exponent; float() has the last word,
# so "1.2.3" stays text.
_FLOAT = re.compile(r"[-+]?[0-9._]*[0-9][0-9._]*(?:[eE][-+]?[0-9_]+)?")
_SPECIAL_FLOAT = re.compile(r"[-+]?\.?(?:inf|infinity|nan)", re.IGNORECASE)
_COLLECTION_OR_QUOTED = ("[", "{", '"', "'")


def parse_value(text: str) -> Any:
    """The value the text of a ``KEY=VALUE`` option stands for (see the module docstring for the rules).

    Raises:
        ValueError: a value starting with ``[``, ``{`` or a quote that is not a valid YAML flow list,
            mapping or quoted string.
    """
    text = text.strip()
    if not text.startswith(_COLLECTION_OR_QUOTED):
        return _scalar(text)
    try:
        return load_yaml(text)
    except yaml.YAMLError as error:
        raise ValueError(" ".join(str(error).split())) from None


def load_yaml(text: str) -> Any:
    """A YAML document whose unquoted scalars follow :func:`parse_value`'s rules, so that a sweep file's
    ``lr: 1e-3`` is the number ``--set lr=1e-3`` gives, and its ``flag: "false"`` and ``x: yes`` are text.

    Raises:
        yaml.YAMLError: not valid YAML.
    """
    return yaml.load(text, Loader=_ValueLoader)  # a SafeLoader, with narrower scalar rules


def parse_options(items: Iterable[str] | None, option: str = "--set", *, form: str = "KEY=VALUE") -> dict[str, Any]:
    """``{key: value}`` of ``KEY=VALUE`` strings given to ``option`` (values by :func:`parse_value`; a
    key given twice keeps its last value).

    Raises:
        ConfigError: an item without ``=`` or without a key, or with an unreadable value, naming
            ``option`` and the item (and ``form``, what an item should look like).
    """
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected {form}")
        try:
            values[key.strip()] = parse_value(raw)
        except ValueError as error:
            raise ConfigError(f"{option} {item!r}: the value is not a valid list, mapping or quoted "
                              f"string: {error}") from None
    return values


def typed_value(value: Any, default: Any, what: str) -> Any:
    """``value`` as an option whose default is ``default`` takes it: text (as the command line gives it)
    is read by :func:`parse_value` when the default is not text (so ``"false"`` is False), and an int
    stands for a float.

    Raises:
        ConfigError: the value is not of the default's type, naming ``what`` (e.g. ``"option seed"``)
            and the value as given.
    """
    kind = type(default)
    typed = value
    if isinstance(value, str) and kind is not str:
        try:
            typed = parse_value(value)
        except ValueError:
            typed = value
    if kind is float and type(typed) is int:
        typed = float(typed)
    if type(typed) is not kind:
        expected = {bool: "true or false", int: "an integer", float: "a number",
                    str: 'text (in quotes, "...", where it would read as a number, true/false or null)'
                    }.get(kind, kind.__name__)
        raise ConfigError(f"{what}={value!r}: expected {expected}, like the default {default!r}")
    return typed


def _scalar(text: str) -> Any:
    if text in _NULL:
        return None
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        try:
            return float(text)
        except ValueError:
            return text
    if _SPECIAL_FLOAT.fullmatch(text):
        return float(text.replace(".", ""))  # YAML's .inf and .nan too
    return text


class _ValueLoader(yaml.SafeLoader):
    """YAML for flow lists, mappings and quoted strings, whose plain scalars follow :func:`_scalar`
    (no ``yes``/``no`` booleans, no dates, no octal or sexagesimal numbers)."""

    yaml_implicit_resolvers: dict = {}


_PLAIN_TAG = "tag:vlpbench,2025:option-value"
_ValueLoader.add_implicit_resolver(_PLAIN_TAG, re.compile(r".*", re.DOTALL), None)
_ValueLoader.add_constructor(_PLAIN_TAG, lambda loader, node: _scalar(loader.construct_scalar(node)))
