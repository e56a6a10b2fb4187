"""Image–text retrieval: no training; test images and candidate texts are ranked by cosine similarity.

The retrieval set (query images, candidate texts, relevance) is built from label files and reports
(:mod:`vlpbench.protocols.retrieval_sets`). The adapter embeds every image (``embed_image``, image cache at
its ``image_size``, ``adapter.preprocess``) and every text (``embed_text``); both are L2-normalised again and
their float32 dot products are the similarity matrix ``(images, texts)``. ``batch_size`` (images or texts per
call) is ``auto`` by default, filling the device (:mod:`vlpbench.protocols.batch_fill`; :data:`RETRIEVAL_BATCH`
on a CPU), or an integer; it changes memory and speed only. Image→text ranks the texts for each
image; text→image ranks the images for each text (its transpose). Ties are pessimistic
(:mod:`vlpbench.metrics.retrieval`).

Metrics, per direction in ``config["directions"]`` (``i2t``, ``t2i``): ``<dir>_r<K>`` for K in
``config["recall_at"]``, ``<dir>_p<K>`` for K in ``config["precision_at"]``, ``<dir>_medr`` and ``<dir>_meanr``.
Each gets a percentile bootstrap CI that resamples the queries of its direction with the candidates held
fixed: the test images for i2t, the candidate texts for t2i (the CI's ``unit`` says which). The record's
``per_image`` holds, per query image, the value of ``config["per_image_metric"]`` (an i2t metric: the task's
primary metric), for ``compare``'s paired test. The evidence (:func:`retrieval_evidence`) holds every
image→text metric per query image, for ``vlpbench significance`` and subgroup metrics (the query images'
attributes); text→image metrics are listed there as untestable.

``run --save-predictions`` writes ``similarity.npz`` (:data:`SIMILARITY_FILE`): ``similarity`` (float32,
images × texts), ``image_ids`` and ``texts``; ``score`` reads it, checks that it holds exactly the task's
images and texts (in any order; a text the task holds twice, twice), and gives the run's metrics and CIs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlpbench.adapters.base import EMBED_IMAGE, EMBED_TEXT
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.metrics import retrieval as rm
from vlpbench.metrics.bootstrap import bootstrap_ci, weighted_mean
from vlpbench.metrics.classification import resample_weights
from vlpbench.metrics.specs import RECOMPUTED, metric_spec
from vlpbench.protocols import SplitIds, base
from vlpbench.protocols.batch_fill import InferenceBatch, given, inference_batch, planned_size
from vlpbench.protocols.retrieval_sets import RetrievalSet, retrieval_set
from vlpbench.protocols.runtime import autocast, precision_of

log = logging.getLogger("vlpbench")

SIMILARITY_FILE = "similarity.npz"
RETRIEVAL_BATCH = 64  # batch_size: auto on a CPU (vlpbench.protocols.batch_fill)
QUERY_UNITS = {"i2t": "image", "t2i": "text"}


def _ks(config: dict[str, Any], key: str, allowed: tuple[int, ...]) -> list[int]:
    values = config.get(key)
    if (not isinstance(values, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in values)
            or not set(values) <= set(allowed)):
        raise ConfigError(f"config key {key} is {values!r}; expected a list of cut-offs from "
                          f"{', '.join(map(str, allowed))} (the ones with a registered metric)")
    return sorted(set(values))


def retrieval_options(config: dict[str, Any]) -> tuple[list[str], list[int], list[int], str]:
    """``(directions, recall_at, precision_at, per_image_metric)`` of ``config``, checked.

    Raises:
        ConfigError: an unknown direction, a cut-off without a registered metric, or a ``per_image_metric``
            that is not an image→text per-image mean among the metrics computed.
    """
    directions = config.get("directions")
    if not isinstance(directions, list) or not directions or not set(directions) <= set(rm.DIRECTIONS):
        raise ConfigError(f"config key directions is {directions!r}; expected a non-empty list of "
                          f"{', '.join(rm.DIRECTIONS)}")
    recall_at, precision_at = _ks(config, "recall_at", rm.RECALL_AT), _ks(config, "precision_at", rm.PRECISION_AT)
    chosen = config.get("per_image_metric")
    computed = metric_names([d for d in rm.DIRECTIONS if d in directions], recall_at, precision_at)
    if chosen not in computed or not chosen.startswith("i2t_") or metric_spec(chosen).ci == RECOMPUTED:
        raise ConfigError(f"config key per_image_metric is {chosen!r}; expected an image→text metric that is a "
                          f"mean over images, among {', '.join(m for m in computed if m.startswith('i2t_'))}")
    return [d for d in rm.DIRECTIONS if d in directions], recall_at, precision_at, chosen


def metric_names(directions: list[str], recall_at: list[int], precision_at: list[int]) -> list[str]:
    """The metrics a run reports, in record order."""
    return [name for d in directions for name in (
        *(rm.metric_name(d, "r", k) for k in recall_at), *(rm.metric_name(d, "p", k) for k in precision_at),
        rm.metric_name(d, "medr"), rm.metric_name(d, "meanr"))]


def evaluate_retrieval(similarity: np.ndarray, rset: RetrievalSet, config: dict[str, Any], *,
                       seed: int) -> dict[str, Any]:
    """Metrics, CIs and per-image values of ``similarity`` (images × texts of ``rset``).

    Returns ``metrics`` (a precision cut-off above the number of candidates is None: undefined), ``ci`` (each
    with ``unit`` ``image`` or ``text``: what was resampled), ``per_image`` (``config["per_image_metric"]``
    per query image) and ``evidence`` (:func:`retrieval_evidence`).

    Raises:
        ConfigError: a bad option.
        DataError: a malformed matrix, or the per-image metric undefined.
    """
    directions, recall_at, precision_at, per_image_metric = retrieval_options(config)
    n_resamples = int(config["bootstrap_resamples"])
    sides = {"i2t": (similarity, rset.image_keys, rset.text_keys),
             "t2i": (similarity.T, rset.text_keys, rset.image_keys)}
    metrics: dict[str, float | None] = {}
    ci: dict[str, dict] = {}
    per_query: dict[str, dict[str, np.ndarray]] = {}  # direction -> metric -> value per query
    for direction in directions:
        similarities, query_keys, candidate_keys = sides[direction]
        # Precision@K over fewer than K candidates is undefined (null), as on a small synthetic set.
        defined = [k for k in precision_at if k <= similarities.shape[1]]
        scores = rm.query_scores(similarities, query_keys, candidate_keys, defined)
        values = {**{rm.metric_name(direction, "r", k): scores.hits(k) for k in recall_at},
                  **{rm.metric_name(direction, "p", k): scores.precision[k] for k in defined},
                  rm.metric_name(direction, "meanr"): scores.rank.astype(np.float64)}
        statistics = {name: weighted_mean(v) for name, v in values.items()}
        statistics[rm.metric_name(direction, "medr")] = lambda w, r=scores.rank: rm.weighted_median(r, w)
        per_query[direction] = {**values, rm.metric_name(direction, "medr"): scores.rank.astype(np.float64)}
        n = len(scores.rank)
        for name in metric_names([direction], recall_at, precision_at):
            if name not in statistics:
                log.warning("%s: %d candidates, fewer than its K; the metric is left undefined (null)", name,
                            similarities.shape[1])
                metrics[name] = None
                continue
            statistic = statistics[name]
            metrics[name] = statistic(np.ones(n))
            ci[name] = {**bootstrap_ci(lambda idx, f=statistic: f(resample_weights(idx, n)), n,
                                       n_resamples=n_resamples, seed=seed), "unit": QUERY_UNITS[direction]}
    if per_image_metric not in per_query.get("i2t", {}):
        raise DataError(f"per_image_metric {per_image_metric} is undefined: {len(rset.texts)} candidate texts")
    per_image = dict(zip(rset.image_ids, per_query["i2t"][per_image_metric].tolist()))
    return {"metrics": metrics, "ci": ci, "per_image": per_image, "evidence": retrieval_evidence(rset, per_query)}


def retrieval_evidence(rset: RetrievalSet, per_query: dict[str, dict[str, np.ndarray]]):
    """Per-item evidence over the query images (:mod:`vlpbench.evidence`): each image→text metric per image,
    the median rank as the median of its column; text→image metrics are untestable, their queries being
    the candidate texts."""
    from vlpbench.evidence import per_item_evidence

    untestable = [f"{name}: its queries are the candidate texts, while the evidence's items are the test images"
                  for name in per_query.get("t2i", {})]
    return per_item_evidence(rset.image_ids, per_query.get("i2t", {}), medians=[rm.metric_name("i2t", "medr")],
                             untestable=untestable)


def _embedded(values: torch.Tensor, adapter, what: str, count: int) -> np.ndarray:
    """An adapter's embeddings as float32 rows of unit length, after checking their shape and values."""
    array = values.detach().float().cpu().numpy()
    if array.ndim != 2 or array.shape[0] != count:
        raise VlpbenchError(f"adapter {adapter.name!r}: {what} returned shape {array.shape} for {count} inputs")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not np.isfinite(array).all() or not (norms > 0).all():
        raise VlpbenchError(f"adapter {adapter.name!r}: {what} returned a non-finite or zero embedding")
    return array / norms


def embed(adapter, source, rset: RetrievalSet, config: dict[str, Any], *, device: torch.device,
          progress: bool, batch: int | InferenceBatch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image embeddings, text embeddings)`` of ``rset``, float32, rows of unit length (module docstring), in
    batches of ``batch`` images or texts (default: ``config["batch_size"]``, :data:`RETRIEVAL_BATCH` for
    ``auto``)."""
    size = int(adapter.image_size)
    dataset = type(source).__module__.rpartition(".")[2]  # readers live in vlpbench.data.<dataset>
    images = cached_images(source, dataset, rset.image_ids, size, progress=progress)
    batch = given(batch or planned_size(config, "batch_size", RETRIEVAL_BATCH))

    def one_pass(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        image_rows, text_rows = [], []
        with torch.inference_mode(), autocast(device, precision_of(config)):
            for start in tqdm(range(0, len(rset.image_ids), batch_size), desc="retrieval images",
                              disable=not progress, leave=False, unit="batch"):
                pixels = torch.from_numpy(np.array(images[start:start + batch_size])).unsqueeze(1).to(device)
                image_rows.append(_embedded(adapter.embed_image(adapter.preprocess(pixels)), adapter, "embed_image",
                                            len(pixels)))
            for start in tqdm(range(0, len(rset.texts), batch_size), desc="retrieval texts", disable=not progress,
                              leave=False, unit="batch"):
                texts = rset.texts[start:start + batch_size]
                text_rows.append(_embedded(adapter.embed_text(list(texts)), adapter, "embed_text", len(texts)))
        return np.concatenate(image_rows), np.concatenate(text_rows)

    return batch.run(one_pass)


def _probe(adapter, config: dict[str, Any], count: int, device: torch.device) -> None:
    """Embeddings of ``count`` blank images (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    size = int(adapter.image_size)
    with torch.inference_mode(), autocast(device, precision_of(config)):
        adapter.embed_image(adapter.preprocess(torch.zeros(count, 1, size, size, dtype=torch.uint8, device=device)))


def _outcome(evaluated: dict[str, Any], rset: RetrievalSet) -> dict[str, Any]:
    return {**evaluated, "n": {"train": 0, "val": 0, "test": len(rset.image_ids), "texts": len(rset.texts),
                               "test_left_out": dict(rset.left_out)}}


def run_retrieval_task(adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int,
                       device: torch.device, progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
    """Rank the candidate texts for every test image and the images for every text (module docstring).

    Raises:
        CapabilityError: the adapter has no image or no text embedding (before any work).
        ConfigError: a bad task option.
        DataError: no test image, a query without a relevant candidate.
    """
    adapter.require(*RetrievalProtocol.needs)
    retrieval_options(config)
    t0 = time.perf_counter()
    rset = retrieval_set(source, list(split.test), config)
    batch = inference_batch(config, "batch_size", device=device, fallback=RETRIEVAL_BATCH,
                            limit=max(len(rset.image_ids), len(rset.texts)),
                            probe=lambda count: _probe(adapter, config, count, device))
    image_embeddings, text_embeddings = embed(adapter, source, rset, config, device=device, progress=progress,
                                              batch=batch)
    similarity = image_embeddings @ text_embeddings.T
    t_embedded = time.perf_counter()
    if predictions is not None:
        write_similarity(Path(predictions), similarity, rset)
    evaluated = evaluate_retrieval(similarity, rset, config, seed=seed)
    t_end = time.perf_counter()
    return {**_outcome(evaluated, rset),
            "training": {"candidates": rset.description, "similarity": "cosine (float32)",
                         "ties": "pessimistic: a relevant candidate tied with irrelevant ones ranks after them",
                         "inference_batch": batch.describe()},
            "timing": {"embedding_s": t_embedded - t0, "metrics_s": t_end - t_embedded, "total_s": t_end - t0}}


def write_similarity(folder: Path, similarity: np.ndarray, rset: RetrievalSet) -> Path:
    """Save ``similarity.npz`` (module docstring) in ``folder``; its path."""
    path = folder / SIMILARITY_FILE
    np.savez(path, similarity=np.asarray(similarity, dtype=np.float32), image_ids=np.array(rset.image_ids, dtype=str),
             texts=np.array(rset.texts, dtype=str))
    return path


def read_similarity(path: Path, rset: RetrievalSet) -> np.ndarray:
    """The similarity matrix of ``path`` with its rows in ``rset.image_ids`` order and columns in
    ``rset.texts`` order.

    Raises:
        DataError: naming the file: unreadable, a missing array, a wrong shape or dtype, a non-finite value,
            repeated ids or texts, or images / texts other than the task's (with an example).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise DataError(f"predictions file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if missing := [k for k in ("similarity", "image_ids", "texts") if k not in arrays]:
        raise DataError(f"{path}: no array {', '.join(map(repr, missing))}; expected similarity (images x texts), "
                        "image_ids and texts")
    similarity, ids, texts = arrays["similarity"], arrays["image_ids"].tolist(), arrays["texts"].tolist()
    if not np.issubdtype(similarity.dtype, np.floating) or similarity.shape != (len(ids), len(texts)):
        raise DataError(f"{path}: similarity has shape {similarity.shape} and dtype {similarity.dtype}; expected "
                        f"floats of shape ({len(ids)}, {len(texts)}) (image_ids x texts)")
    if not np.isfinite(similarity).all():
        raise DataError(f"{path}: similarity holds NaN or infinite values")
    rows = _positions(path, "image_ids", ids, rset.image_ids, "test images of the task")
    columns = _positions(path, "texts", texts, rset.texts, "candidate texts of the task")
    return similarity[np.ix_(rows, columns)]


def _positions(path: Path, key: str, given: list, wanted: list[str], what: str) -> np.ndarray:
    """Where each of ``wanted`` sits in ``given``, or a DataError naming what differs. An entry the task holds
    several times (the report text of two images of one study, ``candidates: class_reports``) must be there as
    often; its k-th copy in ``wanted`` takes its k-th in ``given`` (identical texts have identical columns)."""
    if not all(isinstance(v, str) for v in given):
        raise DataError(f"{path}: {key} must be strings")
    at: dict[str, list[int]] = {}
    for k, value in enumerate(given):
        at.setdefault(value, []).append(k)
    copies = Counter(wanted)
    if any(len(places) > copies.get(value, 1) for value, places in at.items()):
        raise DataError(f"{path}: {key} repeats an entry")
    for label, values in (("lacks", [v for v in wanted if v not in at]),
                          ("has entries that are not", [v for v in given if v not in copies])):
        if values:
            raise DataError(f"{path}: {key} {label} {len(values)} {what}, e.g. {values[0]!r}")
    if short := [v for v, count in copies.items() if len(at[v]) != count]:
        raise DataError(f"{path}: {key} holds {len(at[short[0]])} copies of {short[0]!r}; the task has "
                        f"{copies[short[0]]}")
    taken = {value: iter(places) for value, places in at.items()}
    return np.array([next(taken[v]) for v in wanted], dtype=np.int64)


class RetrievalProtocol(base.Protocol):
    """Image–text retrieval from image and text embeddings (module docstring)."""

    name = "retrieval"
    table_group = "ret"
    distributed = False
    trains = False
    needs = (EMBED_IMAGE, EMBED_TEXT)
    prediction_file = SIMILARITY_FILE
    prediction_files = (f"{SIMILARITY_FILE}: similarity (float32, test images x candidate texts), image_ids and "
                        "texts")

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """:func:`run_retrieval_task`."""
        return run_retrieval_task(adapter, source, split, config, seed=seed, device=device, progress=progress,
                                  predictions=predictions)

    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """The metrics of a saved similarity matrix on the task's retrieval set of ``split.test``."""
        retrieval_options(config)
        rset = retrieval_set(source, list(split.test), config)
        path = self.prediction_path(Path(predictions))
        similarity = read_similarity(path, rset)
        return {**_outcome(evaluate_retrieval(similarity, rset, config, seed=seed), rset),
                "scoring": {"candidates": rset.description, "notes": []}}


PROTOCOL = RetrievalProtocol()
