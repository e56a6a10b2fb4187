"""What a retrieval task ranks: its query images, its candidate texts and which of them are relevant.

``config["candidates"]`` picks how the texts and relevance are built (both read label files and reports only,
never an image, so ``run`` and ``score`` build the same set):

* ``class_prompts`` (CheXpert 5x200): the texts are the class prompts of ``config["prompt_grid"]``
  (class → a list of word lists; every combination of one entry per list, in the given order, joined by
  spaces, whitespace collapsed: the GLoRIA / MGCA severity × subtype × location prompts, all of them, as
  CXR-CLIP's ``generate_chexpert_class_prompts(n=None)`` expands them); a prompt repeated within a class is
  kept once. Relevance is by class: a text is relevant to an image when its class is the image's class
  (``config["classes"]``, ``label_kind: multiclass``).
* ``reports`` (MIMIC-CXR): each image's text is a section of its study's report (``config["text_section"]``:
  ``findings``, ``impression``, ``longer`` of the two, which is CXR-CLIP's rule (Soombit-ai/cxr-clip#10),
  or ``findings_impression``, both joined by a space); images whose text is empty are left out. Only the
  images whose ``ViewPosition`` is in ``config["views"]`` are queried; ``images_per_study: first`` keeps the
  first of them per study (in split order), as CXR-CLIP's evaluator queries one image per study. Identical
  texts are one candidate (CXR-CLIP ``cxrclip/evaluator.py:306-318`` deduplicates them), relevant to every
  image whose text it is.
* ``class_reports`` (MIMIC-5x200, BenchX's retrieval): every query image brings its own report text (the section
  rule of ``config["text_section"]``) as one candidate, identical texts kept apart (BenchX ranks one report per
  image, yangzhou12/BenchX unifier/blocks/zeroshot/zeroshot_dataset.py:40, 64); images whose text is empty are
  left out. Relevance is by class, as for ``class_prompts``: a text is relevant to an image when the class of
  the image it came from is the image's class (BenchX ``unifier/blocks/zeroshot/zeroshot_model.py:148``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols.labels import class_names, label_kind, task_labels

CANDIDATES = ("class_prompts", "reports", "class_reports")
TEXT_SECTIONS = ("findings", "impression", "longer", "findings_impression")
IMAGES_PER_STUDY = ("all", "first")


@dataclass(frozen=True)
class RetrievalSet:
    """Query images and candidate texts with relevance keys (image ``i`` and text ``j`` are relevant to each
    other when ``image_keys[i] == text_keys[j]``); ``left_out``: images of the split part not queried, by reason."""

    image_ids: list[str]
    image_keys: np.ndarray
    texts: list[str]
    text_keys: np.ndarray
    description: str
    left_out: dict[str, int] = field(default_factory=dict)


def _choice(config: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = config.get(key)
    if value not in allowed:
        raise ConfigError(f"config key {key} is {value!r}; expected one of {', '.join(allowed)}")
    return value


def expand_prompt_grid(grid: Any, classes: list[str]) -> list[tuple[str, str]]:
    """``(class, prompt)`` pairs of ``config["prompt_grid"]`` (module docstring), classes in ``classes`` order.

    Raises:
        ConfigError: the grid is not class → list of non-empty lists of strings, misses or adds a class, or
            gives one prompt to two classes.
    """
    if not isinstance(grid, dict):
        raise ConfigError(f"config key prompt_grid must map each class to a list of word lists, got {grid!r}")
    if set(grid) != set(classes):
        raise ConfigError(f"config key prompt_grid: classes {sorted(map(str, grid))}; expected {sorted(classes)}")
    pairs: list[tuple[str, str]] = []
    owner: dict[str, str] = {}
    for name in classes:
        parts = grid[name]
        if (not isinstance(parts, list) or not parts
                or not all(isinstance(p, list) and p and all(isinstance(w, str) for w in p) for p in parts)):
            raise ConfigError(f"config key prompt_grid.{name}: expected a list of non-empty lists of strings")
        for words in itertools.product(*parts):
            prompt = " ".join(" ".join(words).split())
            if not prompt or owner.get(prompt) == name:
                continue
            if prompt in owner:
                raise ConfigError(f"config key prompt_grid: the prompt {prompt!r} belongs to {owner[prompt]} and "
                                  f"{name}; relevance by class needs one class per text")
            owner[prompt] = name
            pairs.append((name, prompt))
    return pairs


def _class_prompts(source, ids: Sequence[str], config: dict[str, Any]) -> RetrievalSet:
    classes = class_names(config)
    if label_kind(config) != "multiclass":
        raise ConfigError("candidates class_prompts: relevance by class needs label_kind multiclass (one class "
                          "per image)")
    pairs = expand_prompt_grid(config.get("prompt_grid"), classes)
    keys = task_labels(source, ids, config)
    return RetrievalSet(list(ids), keys, [prompt for _, prompt in pairs],
                        np.array([classes.index(name) for name, _ in pairs]),
                        f"{len(pairs)} class prompts of {len(classes)} classes (prompt_grid), relevant by class")


def report_text(sections: dict[str, str], rule: str) -> str:
    """The text ``rule`` (one of :data:`TEXT_SECTIONS`) takes from ``{"FINDINGS", "IMPRESSION"}``.

    ``longer``: the longer section by characters, findings where both are as long (CXR-CLIP's rule,
    Soombit-ai/cxr-clip#10: "the longest text between finding and impression").
    """
    findings, impression = sections["FINDINGS"], sections["IMPRESSION"]
    if rule == "findings":
        return findings
    if rule == "impression":
        return impression
    if rule == "longer":
        return findings if len(findings) >= len(impression) else impression
    return " ".join(t for t in (findings, impression) if t)


def _reports(source, ids: Sequence[str], config: dict[str, Any]) -> RetrievalSet:
    rule = _choice(config, "text_section", TEXT_SECTIONS)
    per_study = _choice(config, "images_per_study", IMAGES_PER_STUDY)
    views = config.get("views")
    if not isinstance(views, list) or not views or not all(isinstance(v, str) for v in views):
        raise ConfigError(f"config key views must be a non-empty list of ViewPosition values such as "
                          f"['PA', 'AP'], got {views!r}")
    if not all(hasattr(source, name) for name in ("sections", "view_position", "study_id")):
        raise ConfigError(f"candidates reports: dataset reader {type(source).__name__} has no reports "
                          "(sections, view_position, study_id); use a MIMIC-CXR task")
    left_out = {"view": 0, "study_already_queried": 0, "empty_text": 0}
    chosen: list[str] = []
    texts: list[str] = []
    studies: set[str] = set()
    for image_id in ids:
        if source.view_position(image_id) not in views:
            left_out["view"] += 1
            continue
        study = source.study_id(image_id)
        if per_study == "first" and study in studies:
            left_out["study_already_queried"] += 1
            continue
        text = report_text(source.sections(image_id), rule)
        if not text:
            left_out["empty_text"] += 1
            continue
        studies.add(study)
        chosen.append(image_id)
        texts.append(text)
    if not chosen:
        raise DataError(f"candidates reports: none of the {len(ids)} images has a {', '.join(views)} view and a "
                        f"non-empty {rule} text (left out: {left_out})")
    unique = list(dict.fromkeys(texts))
    index = {text: k for k, text in enumerate(unique)}
    return RetrievalSet(chosen, np.array([index[t] for t in texts]), unique, np.arange(len(unique)),
                        f"{len(unique)} distinct report texts ({rule}) of {len(chosen)} images, identical texts "
                        "merged, relevant to the images they belong to", left_out)


def _class_reports(source, ids: Sequence[str], config: dict[str, Any]) -> RetrievalSet:
    rule = _choice(config, "text_section", TEXT_SECTIONS)
    if label_kind(config) != "multiclass":
        raise ConfigError("candidates class_reports: relevance by class needs label_kind multiclass (one class "
                          "per image)")
    if not hasattr(source, "sections"):
        raise ConfigError(f"candidates class_reports: dataset reader {type(source).__name__} has no reports "
                          "(sections); use a MIMIC-CXR task")
    keys = task_labels(source, ids, config)
    texts = [report_text(source.sections(image_id), rule) for image_id in ids]
    kept = [k for k, text in enumerate(texts) if text]
    if not kept:
        raise DataError(f"candidates class_reports: none of the {len(ids)} images has a non-empty {rule} text")
    chosen = keys[kept]
    return RetrievalSet([ids[k] for k in kept], chosen, [texts[k] for k in kept], chosen,
                        f"{len(kept)} report texts ({rule}), one per image, of {len(class_names(config))} "
                        "classes, relevant by class", {"empty_text": len(ids) - len(kept)})


def retrieval_set(source, ids: Sequence[str], config: dict[str, Any]) -> RetrievalSet:
    """The retrieval set of the images ``ids`` as ``config["candidates"]`` builds it (module docstring).

    Raises:
        ConfigError: a bad option.
        DataError: no image to query, or a label / report the reader cannot give.
    """
    if not ids:
        raise DataError("retrieval: no test images")
    builders = {"class_prompts": _class_prompts, "reports": _reports, "class_reports": _class_reports}
    build = builders[_choice(config, "candidates", CANDIDATES)]
    return build(source, ids, config)
