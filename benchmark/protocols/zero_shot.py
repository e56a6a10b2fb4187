"""Zero-shot classification: no training; each class is scored from a positive and a negative prompt.

The adapter's ``zero_shot_scores`` gives, per image and class, the probability that the class is
present (by default CheXzero's: the softmax over the cosine similarities of the image embedding with
the prompts ``templates[0].format(prompt)`` and ``templates[1].format(prompt)``). The task YAML holds
the data: ``classes`` (the dataset's names), ``prompts`` (class → the text put into the templates)
and ``templates``. ``class_prompts`` picks the text of each class: ``plain`` (the task's ``prompts``),
``chexzero`` or ``kad`` (the strings those references' code passes, :data:`PROMPT_SETS`). The text
encoders of G2D and MGCA (Bio_ClinicalBERT) are cased, so ``Pneumonia`` and ``pneumonia`` differ.

Metrics (``config["metrics"]``, any of ``auc``, ``f1``, ``acc``, ``mcc``), macro over classes and, for
several classes, per class (``auc_<class slug>`` ...):

* binary / multi-label tasks: AUC of each class; F1, accuracy and MCC of ``score >= threshold``
  (``acc_rule: gt``: accuracy of ``score > threshold``, as MedKLIP's code computes it), the
  threshold of each class chosen by ``best_threshold`` (``threshold_criterion``; of equally good cuts
  the highest, or with ``threshold_ties: lowest`` the lowest, as MedKLIP's code picks) on validation images
  (``threshold_source: val``), never on test. Which images those are is ``threshold_images``:
  ``split_val`` (the split's val part) or ``chexpert_valid`` (the frontal images of CheXpert's
  ``valid.csv``, for the radiologist test set, which has no validation part). ``test_oracle`` tunes
  the thresholds on the test set itself, as MedKLIP's code does; the record flags it as optimistic.
  A task that wants AUC only (``padchest_zs``, whose split has no validation part) chooses no threshold.
* multi-class tasks (CheXpert 5x200): the predicted class is the highest-scoring one; ``acc`` is top-1
  accuracy, ``f1`` the macro F1 and ``mcc`` the multi-class MCC of those predictions, ``auc`` the
  mean one-vs-rest AUC. No threshold is involved.

Every metric gets a percentile bootstrap CI over test images, thresholds held fixed.

Calibration (``ece``, ``adaptive_ece``, ``brier``; :mod:`vlpbench.protocols.calibration`) is reported only
where the adapter declares its scores probabilities the model was trained to output
(``Adapter.zero_shot_probabilities``: a present/absent classifier head trained with cross-entropy, KAD and
MedKLIP). A softmax over the similarities of a positive and a negative prompt (CheXzero's procedure and
its variants), like SigLIP's sigmoid of an image-caption match, ranks images but was never fitted to presence
frequencies; its calibration would measure the prompts and the temperature, not the model, so the record says
why it is left out instead. ``score`` reads a CSV that does not say which procedure made it, and leaves
calibration out for the same reason.

Images: the image cache at the adapter's ``image_size``, or with ``center_crop: true`` G2D's stated
pipeline (G2D §A.4.2): resize to 256², then the central 224² crop. That crop is for adapters whose input
is 224²; an adapter with another ``image_size`` is refused (G2D itself: its attention pool holds 8×8 + 1
positions, so it takes 256² only), rather than fed the crop resized, which is neither pipeline.

``batch_size`` is the inference batch: ``auto`` (default) fills the device
(:mod:`vlpbench.protocols.batch_fill`; :data:`ZERO_SHOT_BATCH` on a CPU), or an integer. It changes memory
and speed only.

Under torchrun (:mod:`vlpbench.distributed`) each rank scores its block of whole batches of the test
and validation images (the batches of a single process) and the probabilities are gathered in image
order before thresholds, metrics and CIs, so every rank computes the single-process result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vlpbench import distributed
from vlpbench.adapters.base import EMBED_IMAGE, EMBED_TEXT, ZERO_SHOT, check_zero_shot_arguments
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.metrics.classification import ACC_RULES, CRITERIA, TIE_RULES
from vlpbench.predictions import PROBABILITIES_FILE, write_probabilities
from vlpbench.protocols import SplitIds, base
from vlpbench.protocols.batch_fill import InferenceBatch, given, inference_batch, planned_size
from vlpbench.protocols.classification import class_thresholds, evaluate_classification, score_predictions_csv
from vlpbench.protocols.labels import class_names, label_kind, task_labels
from vlpbench.protocols.runtime import autocast, precision_of

log = logging.getLogger("vlpbench")

METRICS = ("auc", "f1", "acc", "mcc")
THRESHOLD_SOURCES = ("val", "test_oracle")
CSV_CALIBRATION = ("a zero-shot predictions CSV does not say whether its scores are probabilities the model was "
                   "trained to output or a softmax over prompt similarities; `run` reports calibration where the "
                   "adapter declares the former")
# G2D §A.4.2: resize to 256, center-crop 224 (option center_crop).
CROP_FROM, CROP_TO = 256, 224

# The class texts of the reference code, keyed by vlpbench's class names (option class_prompts).
PROMPT_SETS: dict[str, dict[str, str]] = {
    # rajpurkarlab/CheXzero zero_shot.py:520-526 passes its label names as written, capitalised (CheXpert's
    # 'Atelectasis', 'Pleural Effusion', 'Pneumonia', 'Pneumothorax', ...), into ("{}", "no {}"); its own
    # CLIP tokenizer lowercases, a cased BERT does not. CheXzero has no ChestX-ray14 code: for the NIH
    # findings its label list lacks, the NIH label name, '_' written as a space (vlpbench's reading).
    "chexzero": {
        "pneumonia": "Pneumonia", "pneumothorax": "Pneumothorax",  # RSNA, SIIM: CheXzero's spelling (:522-523)
        "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
        "Edema": "Edema", "Pleural Effusion": "Pleural Effusion", "Pneumonia": "Pneumonia",
        "Pneumothorax": "Pneumothorax",
        "Effusion": "Effusion", "Infiltration": "Infiltration", "Mass": "Mass", "Nodule": "Nodule",
        "Emphysema": "Emphysema", "Fibrosis": "Fibrosis", "Pleural_Thickening": "Pleural Thickening",
        "Hernia": "Hernia",
    },
    # xiaoman-zhang/KAD A3_CLIP/test_chestxray14.py:105 (ChestX-ray14) and A3_CLIP/test_chexpert.py:104
    # (CheXpert). KAD tests no RSNA or SIIM classification, so it has no string for their classes.
    "kad": {
        "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "pleural effusion",
        "Infiltration": "infiltration", "Mass": "lung mass", "Nodule": "lung nodule", "Pneumonia": "pneumonia",
        "Pneumothorax": "pneumothorax", "Consolidation": "consolidation", "Edema": "edema",
        "Emphysema": "emphysema", "Fibrosis": "fibrosis", "Pleural_Thickening": "pleural thicken",
        "Hernia": "hernia", "Pleural Effusion": "pleural effusion",
    },
}
CLASS_PROMPTS = ("plain", *PROMPT_SETS)
THRESHOLD_METRICS = ("f1", "acc", "mcc")  # the metrics of a decision at a threshold
# Options added after version 1 of the task files; a config without them means the old behaviour.
DEFAULTS = {"class_prompts": "plain", "acc_rule": "ge", "threshold_ties": "highest"}
ZERO_SHOT_BATCH = 64  # batch_size: auto on a CPU (vlpbench.protocols.batch_fill)


def class_prompts(config: dict[str, Any], classes: list[str]) -> list[str]:
    """The prompt text of each class: from ``config["prompts"]`` (class → text; every class needs one) with
    ``class_prompts: plain``, else from :data:`PROMPT_SETS`.

    Raises:
        ConfigError: a class without a text, or an unknown ``class_prompts``.
    """
    style = _choice({**DEFAULTS, **config}, "class_prompts", CLASS_PROMPTS)
    if style != "plain":
        texts = PROMPT_SETS[style]
        if missing := [c for c in classes if c not in texts]:
            raise ConfigError(f"class_prompts={style}: the {style} reference code has no text for class(es) "
                              f"{', '.join(missing)}; use class_prompts=plain (the task's prompts)")
        return [texts[c] for c in classes]
    prompts = config.get("prompts")
    if not isinstance(prompts, dict):
        raise ConfigError(f"config key prompts must map each class to its prompt text, got {prompts!r}")
    problems = []
    if missing := [c for c in classes if not (isinstance(prompts.get(c), str) and prompts[c].strip())]:
        problems.append(f"no text for {', '.join(missing)}")
    if extra := [str(c) for c in prompts if c not in classes]:
        problems.append(f"not a class: {', '.join(extra)}")
    if problems:
        raise ConfigError(f"config key prompts: {'; '.join(problems)} (classes: {', '.join(classes)})")
    return [prompts[c] for c in classes]


def prompt_templates(config: dict[str, Any]) -> tuple[str, str]:
    """``config["templates"]`` as a (positive, negative) pair of strings with one ``{}`` each."""
    templates = config.get("templates")
    if not isinstance(templates, (list, tuple)):
        raise ConfigError(f"config key templates must be a (positive, negative) pair such as ['{{}}', 'no {{}}'], "
                          f"got {templates!r}")
    check_zero_shot_arguments(["class"], tuple(templates))
    return tuple(templates)


def check_center_crop(adapter, config: dict[str, Any]) -> None:
    """ConfigError when ``center_crop`` is on and the adapter's input is not the 224² crop.

    ``center_crop`` is G2D §A.4.2's "resize 256, centre-crop 224"; the crop suits an adapter that takes
    224² input. G2D itself takes 256² only (its attention pool's 65 positions = 8×8 + CLS at stride 32):
    feeding it the crop resized to 256² would be neither the paper's pipeline nor the model's."""
    if config.get("center_crop") and int(adapter.image_size) != CROP_TO:
        raise ConfigError(f"center_crop=true resizes to {CROP_FROM}² and crops the central {CROP_TO}² "
                          f"(G2D §A.4.2), but adapter {adapter.name!r} takes {int(adapter.image_size)}² input"
                          f"{' (its attention pool holds 8x8 + 1 positions)' if adapter.name == 'g2d' else ''}; "
                          "use center_crop=false (resize only)")


def _choice(config: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = config.get(key)
    if value not in allowed:
        raise ConfigError(f"config key {key} is {value!r}; expected one of {', '.join(allowed)}")
    return value


def _metric_names(config: dict[str, Any]) -> list[str]:
    names = config.get("metrics", list(METRICS))
    if not isinstance(names, list) or not names or any(m not in METRICS for m in names):
        raise ConfigError(f"config key metrics is {names!r}; expected a list of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def zero_shot_probabilities(adapter, source, ids: list[str], prompts: list[str], templates: tuple[str, str],
                            config: dict[str, Any], *, device: torch.device, progress: bool,
                            desc: str, batch: int | InferenceBatch | None = None) -> np.ndarray:
    """``(len(ids), len(prompts))`` probabilities from ``adapter.zero_shot_scores``, float64, in batches of
    ``batch`` (default: ``config["batch_size"]``, :data:`ZERO_SHOT_BATCH` for ``auto``).

    Images come from the image cache at the adapter's ``image_size`` (with ``center_crop``: at 256², then
    the central 224² crop; see :func:`check_center_crop`) and pass ``adapter.preprocess``.
    Under torchrun each rank scores its block of batches; every rank returns all rows, in ``ids`` order.

    Raises:
        VlpbenchError: the adapter returns the wrong shape, or values outside [0, 1] or not finite.
    """
    check_center_crop(adapter, config)
    size = int(adapter.image_size)
    cache_size = CROP_FROM if config["center_crop"] else size
    dataset = type(source).__module__.rpartition(".")[2]  # readers live in vlpbench.data.<dataset>
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        images = cached_images(source, dataset, ids, cache_size, progress=progress)
    offset = (cache_size - size) // 2
    batch = given(batch or planned_size(config, "batch_size", ZERO_SHOT_BATCH))

    def one_pass(batch_size: int) -> np.ndarray:
        first, stop = distributed.batch_block(len(ids), batch_size)  # this rank's whole batches
        probabilities = np.empty((stop - first, len(prompts)))
        with torch.inference_mode(), autocast(device, precision_of(config)):
            for start in tqdm(range(first, stop, batch_size), desc=f"zero-shot {desc}", disable=not progress,
                              leave=False, unit="batch"):
                pixels = np.array(images[start:min(start + batch_size, stop), offset:offset + size,
                                         offset:offset + size])
                scores = adapter.zero_shot_scores(adapter.preprocess(torch.from_numpy(pixels).unsqueeze(1).to(device)),
                                                  prompts, templates)
                scores = scores.detach().double().cpu().numpy()
                if scores.shape != (len(pixels), len(prompts)):
                    raise VlpbenchError(f"adapter {adapter.name!r}: zero_shot_scores returned shape {scores.shape} "
                                        f"for {len(pixels)} images and {len(prompts)} classes")
                if not (np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()):
                    raise VlpbenchError(f"adapter {adapter.name!r}: zero_shot_scores returned values outside [0, 1]")
                probabilities[start - first:start - first + len(pixels)] = scores
        return distributed.gather_arrays(probabilities)

    return batch.run(one_pass)


def _probe(adapter, prompts: list[str], templates: tuple[str, str], config: dict[str, Any], count: int,
           device: torch.device) -> None:
    """Zero-shot scores of ``count`` blank images (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    size = int(adapter.image_size)
    with torch.inference_mode(), autocast(device, precision_of(config)):
        pixels = torch.zeros(count, 1, size, size, dtype=torch.uint8, device=device)
        adapter.zero_shot_scores(adapter.preprocess(pixels), prompts, templates)


def _chexpert_valid(source) -> tuple[Any, list[str], str]:
    """The frontal images of CheXpert's valid.csv: from the CheXpert folder beside the test set, else
    from the configured ``chexpert`` data folder."""
    from vlpbench.config import resolve_data_root
    from vlpbench.data.splits import test_part_split
    from vlpbench.registry import DATASETS

    chexpert = DATASETS.get("chexpert")
    try:
        reader = chexpert.open(source.root)
    except DataError as beside:
        try:
            reader = chexpert.open(resolve_data_root("chexpert"))
        except (ConfigError, DataError) as configured:
            raise ConfigError(
                f"threshold_images chexpert_valid: the thresholds come from CheXpert's valid.csv, found neither "
                f"beside the test set ({beside}) nor in the chexpert data folder ({configured}); keep "
                "CheXpert-v1.0-small/ beside the test set or set VLPBENCH_CHEXPERT_ROOT") from None
    ids = test_part_split("chexpert", reader).ids("test")
    return reader, ids, f"CheXpert valid.csv frontal images in {reader.folder}"


def _split_val(source, split: SplitIds) -> tuple[Any, list[str], str]:
    return source, list(split.val), "the split's val part"


# Where validation images for thresholds come from: name -> (reader, ids, description).
THRESHOLD_IMAGES: dict[str, Callable[[Any, SplitIds], tuple[Any, list[str], str]]] = {
    "split_val": _split_val,
    "chexpert_valid": lambda source, split: _chexpert_valid(source),
}


def calibration_left_out(adapter) -> str | None:
    """Why ``adapter``'s zero-shot scores get no calibration metrics, or None where they are probabilities
    the model was trained to output (``zero_shot_probabilities``)."""
    if adapter.zero_shot_probabilities:
        return None
    return (f"adapter {adapter.name!r}: its zero-shot scores are a softmax over the similarities of a positive "
            "and a negative prompt (SigLIP: the sigmoid of the positive prompt's), a ranking score the model was not "
            "trained to calibrate against class presence (procedures.zero_shot in the record's model entry says how "
            "they are made)")


def require_zero_shot(adapter) -> None:
    """CapabilityError unless ``adapter`` has zero-shot scores; where it lacks them, the message names the missing
    embedding(s) and the adapter's hint for them, since the default scores need both."""
    if ZERO_SHOT not in adapter.capabilities:
        adapter.require(EMBED_IMAGE, EMBED_TEXT)
    adapter.require(ZERO_SHOT)


def run_zero_shot_task(adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int,
                       device: torch.device, progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
    """Score ``split.test`` zero-shot; thresholds (binary / multi-label tasks) from validation images.

    Returns ``metrics``, ``ci``, ``per_image`` (top-1 correctness per test image for a multi-class
    task; {} otherwise: AUC is not a mean over images), ``n`` (``test``; ``val``: the threshold
    images; ``test_positives`` per class), ``training`` (the thresholds and where they came from) and
    ``timing``.

    Raises:
        CapabilityError: the adapter has no zero-shot scores (no image or no text embedding).
        ConfigError: a bad task option.
        DataError: no test images, or no class with both labels among them.
    """
    require_zero_shot(adapter)
    t0 = time.perf_counter()
    kind = label_kind(config)
    classes = class_names(config)
    prompts = class_prompts(config, classes)
    templates = prompt_templates(config)
    wanted = _metric_names(config)
    check_center_crop(adapter, config)
    acc_rule = _choice({**DEFAULTS, **config}, "acc_rule", ACC_RULES)
    ties = _choice({**DEFAULTS, **config}, "threshold_ties", TIE_RULES)
    # Top-1 decisions need no threshold, and neither does AUC alone.
    thresholded = kind != "multiclass" and any(name in THRESHOLD_METRICS for name in wanted)
    if thresholded:
        threshold_source = _choice(config, "threshold_source", THRESHOLD_SOURCES)
        criterion = _choice(config, "threshold_criterion", CRITERIA)
        threshold_images = THRESHOLD_IMAGES[_choice(config, "threshold_images", tuple(THRESHOLD_IMAGES))]
    if not split.test:
        raise DataError("zero-shot: no test images")

    test_labels = task_labels(source, split.test, config)
    batch = inference_batch(config, "batch_size", device=device, fallback=ZERO_SHOT_BATCH,
                            limit=max(len(split.test), len(split.val)),
                            probe=lambda count: _probe(adapter, prompts, templates, config, count, device))
    test_scores = zero_shot_probabilities(adapter, source, list(split.test), prompts, templates, config,
                                          device=device, progress=progress, desc="test", batch=batch)
    t_test = time.perf_counter()
    n_threshold_images = 0
    saved = dict(zip(split.test, test_scores))
    thresholds = None
    if kind == "multiclass":
        training: dict[str, Any] = {"decision": "argmax over classes", "thresholds": None}
        positives = {c: int((test_labels == k).sum()) for k, c in enumerate(classes)}
    elif not thresholded:
        training = {"decision": "none: only threshold-free metrics are wanted", "thresholds": None}
        positives = {c: int(test_labels[:, k].sum()) for k, c in enumerate(classes)}
    else:
        if threshold_source == "val":
            reader, ids, where = threshold_images(source, split)
            if not ids:
                raise DataError(f"zero-shot thresholds: no validation images ({where}); use threshold_images "
                                f"chexpert_valid where it applies, or threshold_source test_oracle")
            val_labels = task_labels(reader, ids, config)
            val_scores = zero_shot_probabilities(adapter, reader, ids, prompts, templates, config,
                                                 device=device, progress=progress, desc="val", batch=batch)
            thresholds = class_thresholds(val_labels, val_scores, classes, criterion, ties)
            n_threshold_images = len(ids)
            saved.update(zip(ids, val_scores))
        else:
            log.warning("zero-shot: thresholds tuned on the test set (test_oracle, as MedKLIP's code); "
                        "F1, accuracy and MCC are optimistic")
            thresholds = class_thresholds(test_labels, test_scores, classes, criterion, ties)
            where = "the test set itself (optimistic)"
            n_threshold_images = len(split.test)
        training = {"thresholds": dict(zip(classes, thresholds)), "threshold_source": threshold_source,
                    "threshold_images": where, "threshold_criterion": criterion, "acc_rule": acc_rule,
                    "threshold_ties": ties,
                    "optimistic": threshold_source == "test_oracle"}
        positives = {c: int(test_labels[:, k].sum()) for k, c in enumerate(classes)}
    if predictions is not None and distributed.is_main():
        write_probabilities(predictions, classes, saved)
    t_scored = time.perf_counter()

    evaluated = evaluate_classification(kind, classes, split.test, test_labels, test_scores, wanted,
                                        thresholds=thresholds, n_resamples=int(config["bootstrap_resamples"]),
                                        seed=seed, acc_rule=acc_rule,
                                        calibration_left_out=calibration_left_out(adapter))
    metrics = evaluated["metrics"]
    if "auc" in metrics and metrics["auc"] is None:
        raise DataError(f"zero-shot: no class has both positive and negative test images "
                        f"(positives per class: {positives}); AUC is undefined")
    t_end = time.perf_counter()
    return {
        **evaluated,
        "n": {"train": 0, "val": n_threshold_images, "test": len(split.test), "test_positives": positives},
        "training": {**training, "prompts": dict(zip(classes, prompts)),
                     "class_prompts": config.get("class_prompts", DEFAULTS["class_prompts"]),
                     "world_size": distributed.world_size(), "inference_batch": batch.describe()},
        "timing": {"test_inference_s": t_test - t0, "threshold_s": t_scored - t_test,
                   "metrics_s": t_end - t_scored, "total_s": t_end - t0},
    }


class ZeroShotProtocol(base.Protocol):
    """Zero-shot classification from prompts, thresholds from validation images (module docstring)."""

    name = "zero_shot"
    table_group = "zs"
    uses_val = True
    trains = False
    needs = (ZERO_SHOT,)
    prediction_file = PROBABILITIES_FILE
    prediction_files = (f"{PROBABILITIES_FILE}: image_id and one probability column per class, one row per test "
                        "image and per image the thresholds come from")

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """:func:`run_zero_shot_task`."""
        return run_zero_shot_task(adapter, source, split, config, seed=seed, device=device, progress=progress,
                                  predictions=predictions)

    def require(self, adapter) -> None:
        """:func:`require_zero_shot`."""
        require_zero_shot(adapter)

    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """The test rows of a predictions CSV, with thresholds chosen on its rows of the threshold images
        (``threshold_images``) as ``run`` chooses them."""
        kind = label_kind(config)
        images = None
        thresholded = kind != "multiclass" and any(name in THRESHOLD_METRICS for name in _metric_names(config))
        if thresholded and _choice(config, "threshold_source", THRESHOLD_SOURCES) == "val":
            images = THRESHOLD_IMAGES[_choice(config, "threshold_images", tuple(THRESHOLD_IMAGES))](source, split)
        return score_predictions_csv(self.prediction_path(Path(predictions)), source, split.test, config,
                                     default_metrics=METRICS, seed=seed, threshold_images=images,
                                     calibration_left_out=CSV_CALIBRATION)


PROTOCOL = ZeroShotProtocol()
