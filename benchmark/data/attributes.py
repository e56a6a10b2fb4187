"""Per-image patient and acquisition attributes (sex, age, view, site), normalised across datasets.

Readers that have them (:meth:`vlpbench.data.base.DatasetReader.attributes`) read them from the label
files and image headers that carry them (docs/datasets.md) and normalise them here, so that a subgroup
means the same thing on every dataset:

* ``sex``: ``F``, ``M``, ``O`` (DICOM "other") or ``unknown``.
* ``age``: years as a float (DICOM ``006M`` is 0.5), or ``unknown``. Values are kept as recorded, even
  implausible ones (RSNA headers hold ages up to 155): they fall into the top age bin.
* ``view``: the DICOM ``ViewPosition`` vocabulary, upper case: ``PA``, ``AP``, ``LATERAL``, ``LL``, ``RL``,
  ... (MIMIC-CXR's rarer ones as written), ``FRONTAL`` for a CheXpert frontal row without AP/PA, or ``unknown``.
* ``site``: the data source as written (COVIDx ``data_source``, typos included), or ``unknown``.

``unknown`` is its own category wherever a file leaves a value empty or says it is unknown; it is never
guessed from other fields. A value in none of these forms is an error naming the file (and line).
"""

from __future__ import annotations

import re

from vlpbench.errors import DataError

ATTRIBUTES = ("sex", "age", "view", "site")
UNKNOWN = "unknown"
SEXES = ("F", "M", "O")

_DICOM_AGE = re.compile(r"([0-9]{1,3})([DWMY]?)")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25, "": 365.25}
_VIEW = re.compile(r"[A-Z][A-Z0-9 _-]*")


def sex(text: str, where: str, spellings: dict[str, str]) -> str:
    """``text`` as ``F``/``M``/``O``/``unknown`` through ``spellings`` (the file's vocabulary).

    Raises:
        DataError: ``text`` is not one of ``spellings``; the message names ``where``.
    """
    value = spellings.get(text.strip())
    if value is None:
        raise DataError(f"{where}: sex {text!r}; expected one of {', '.join(repr(s) for s in spellings)}")
    return value


def age_years(text: str, where: str, *, zero_is_unknown: bool = False) -> float | str:
    """An age field in years: a bare number (``62``, as SIIM and RSNA headers and CheXpert write it) or the
    DICOM AS form ``nnnD|W|M|Y`` (``045Y``, ``006M``); empty is ``unknown``. ``zero_is_unknown``: a ``0``
    means unknown (CheXpert's convention for its three rows without an age).

    Raises:
        DataError: any other text, naming ``where``.
    """
    text = text.strip()
    if not text:
        return UNKNOWN
    match = _DICOM_AGE.fullmatch(text)
    if match is None:
        raise DataError(f"{where}: age {text!r} is not a number of years or a DICOM age (nnnD, nnnW, nnnM, nnnY)")
    number, unit = int(match.group(1)), match.group(2)
    if number == 0 and zero_is_unknown:
        return UNKNOWN
    return number * _DAYS_PER_UNIT[unit] / 365.25


def view(text: str, where: str) -> str:
    """A ``ViewPosition``-style value, upper case (``pa`` is ``PA``); empty is ``unknown``.

    Raises:
        DataError: text that is not letters, digits, spaces, ``_`` or ``-`` starting with a letter.
    """
    value = text.strip().upper()
    if not value:
        return UNKNOWN
    if not _VIEW.fullmatch(value):
        raise DataError(f"{where}: view position {text!r} is not a DICOM ViewPosition value such as PA, AP, LATERAL")
    return value


def site(text: str | None) -> str:
    """A data source as written; None or empty is ``unknown``."""
    return text.strip() if text and text.strip() else UNKNOWN


def read_attributes(source, ids) -> dict[str, dict]:
    """``{image id: source.attributes(image id)}`` for ``ids`` (header reads only, no pixels).

    Raises:
        DataError: a value in no accepted form, naming the file (and line).
    """
    if not source.attribute_names:
        return {}
    return {image_id: source.attributes(image_id) for image_id in dict.fromkeys(ids)}
