"""Zero-shot grounding protocol: text-conditioned heat maps scored against the lesion's mask, no training.

MedKLIP's RSNA grounding (which G2D's Table 2a follows) and BioViL's MS-CXR phrase grounding. Only positive
images are scored, as both references do; the skipped negatives are counted. A *query* is one heat map to
score: for RSNA and SIIM (``queries: class``) the task's ``prompt`` on each positive image, with the image's
lesion mask as truth; for MS-CXR (``queries: phrases``) each phrase of each image, with the union of that
phrase's boxes as truth; for CheXlocalize (``queries: pathologies``) each pathology of each image with a
non-empty radiologists' mask, its ``prompts`` entry as text and that mask as truth (:mod:`.grounding_pathologies`,
which also holds CheXlocalize's per-pathology threshold, mIoU and hit rate). An adapter whose ``free_text`` is False (MedKLIP: fixed entity queries) gets the
phrase's category label instead of its text; the record says which (``text_source``).

Steps, each a task option:

1. ``adapter.grounding_maps(adapter.preprocess(images), texts)``: maps at the model's own resolution, for
   images from the image cache at the adapter's ``image_size``. ``image_read: cache`` caches the reader's
   8-bit image; ``medklip`` histogram-equalises it first, as MedKLIP's RSNA grounding loader does
   (MediaBrain-SJTU/MedKLIP Sample_Zero-Shot_Grounding_RSNA/dataset/dataset_RSNA.py:63-70: ``pixel_array /
   255``, ``skimage.exposure.equalize_hist``, ``(255 * img).astype(uint8)``, RGB; then ``Resize([224, 224])``
   at :31-35, Pillow's bilinear, which is the cache's resize). See :func:`medklip_read`.
2. ``upsample`` (``bilinear``, or ``nearest``: MedKLIP's ``repeat(16)``, ``test.py:121``; nearest from
   14² to 224² picks ``i // 16``, the same pixels) to the evaluation grid: ``eval_resolution: fixed``
   compares at ``eval_size``² with the truth resized as torchvision's ``Resize(NEAREST)`` resizes a tensor
   (source pixel ``floor(i * in / out)``; MedKLIP: the 1024² box mask to 224², ``dataset_RSNA.py:36-39,55``),
   see :func:`resize_truth`; ``native`` compares at the truth's own size (RSNA and SIIM 1024², MS-CXR the
   image's size from its label file).
3. ``normalize: minmax`` rescales each map to [0, 1] (a constant map becomes 0) so that one threshold means
   the same on every image; ``none`` keeps raw values (MedKLIP's attention probabilities).
4. The threshold of recall / IoU / Dice: ``threshold_source: val`` searches the ``threshold_grid + 1``
   quantiles of the pooled validation map values (at the model's resolution, normalised as in step 3) for
   the highest mean Dice over the validation positives and applies it unchanged to test; ``fixed`` uses
   ``threshold`` (``0.008`` with ``normalize: none`` is MedKLIP's cut of raw attention probabilities, uniform
   attention over 14×14 patches being 0.0051; it means nothing for other maps). ``threshold_search:
   per_pathology`` (with ``threshold_source: val``) instead picks one of ``threshold_values`` per pathology by
   validation mIoU, as CheXlocalize does (:mod:`.grounding_pathologies`).
5. :mod:`vlpbench.metrics.grounding` on every test query: pointing game, pixel recall, IoU, Dice, CNR.

``score`` applies steps 2 to 5 to heat maps made by any framework (an ``.npz``), through the same
:func:`evaluate_grounding` as ``run``.

``batch_size`` is the inference batch (images per ``grounding_maps`` call): ``auto`` (default) fills the
device (:mod:`vlpbench.protocols.batch_fill`; :data:`GROUNDING_BATCH` on a CPU), or an integer. It changes
memory and speed only.

Under torchrun (:mod:`vlpbench.distributed`) each rank computes the maps of its block of whole image
batches (the batches of a single process); the maps are gathered in query order before the threshold
and the scores, so every rank computes the single-process result, and rank 0 alone saves predictions.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlpbench import distributed
from vlpbench.adapters.base import GROUNDING
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.evidence import per_item_evidence
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.grounding import (METRIC_NAMES, candidate_thresholds, choose_threshold, grounding_scores, hit,
                                        true_positive_iou)
from vlpbench.predictions import HEATMAPS_FILE, check_heatmap, write_heatmaps
from vlpbench.protocols import SplitIds, base
from vlpbench.protocols import grounding_pathologies as pathologies
from vlpbench.protocols.batch_fill import InferenceBatch, given, inference_batch
from vlpbench.protocols.runtime import DEFAULT_PRECISION, autocast, precision_of
from vlpbench.threads import single_threaded

log = logging.getLogger("vlpbench")

CHOICES = {
    "queries": ("class", "phrases", "pathologies"),
    "upsample": ("bilinear", "nearest"),
    "eval_resolution": ("fixed", "native"),
    "normalize": ("minmax", "none"),
    "threshold_source": ("val", "fixed"),
    "image_read": ("cache", "medklip"),
    "threshold_search": ("quantiles", "per_pathology"),
}
# Values per map that enter the pooled quantiles of the threshold search; larger maps are strided.
_VALUES_PER_MAP = 4096


@dataclass(frozen=True)
class Query:
    """One heat map to score: ``key`` names it in results and prediction files.

    ``key`` is the image id (``queries: class``), ``<image id>#<phrase index>`` (``queries: phrases``) or
    ``<image id>#<pathology>`` (``queries: pathologies``); ``phrase`` is that index and ``pathology`` that name,
    both None for the image's class mask.
    """

    key: str
    image_id: str
    text: str
    phrase: int | None = None
    pathology: str | None = None


# Options added after version 1 of the task files; a config without them means the old behaviour.
DEFAULTS = {"image_read": "cache", "threshold_search": "quantiles"}
GROUNDING_BATCH = 32  # batch_size: auto on a CPU (vlpbench.protocols.batch_fill)


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` naming the key for an option outside its allowed values."""
    for key, allowed in CHOICES.items():
        if config.get(key, DEFAULTS.get(key)) not in allowed:
            raise ConfigError(f"grounding option {key}={config.get(key)!r}: expected one of {', '.join(allowed)}")
    if config["queries"] == "class" and not str(config.get("prompt") or "").strip():
        raise ConfigError("grounding option prompt: queries=class needs the class prompt (e.g. pneumonia)")
    if config.get("threshold_search", DEFAULTS["threshold_search"]) == "per_pathology":
        if config["queries"] != "pathologies":
            raise ConfigError("grounding option threshold_search=per_pathology needs queries=pathologies")
        pathologies.check_values(config.get("threshold_values"))
    if config["eval_resolution"] == "fixed" and int(config["eval_size"]) < 1:
        raise ConfigError(f"grounding option eval_size={config['eval_size']!r}: expected a positive int")


def text_source(config: Mapping[str, Any], free_text: bool) -> str:
    """What the model is given: ``prompt`` (class tasks), ``phrase`` or, for a fixed-vocabulary model, ``category``."""
    if config["queries"] == "class":
        return "prompt"
    return "phrase" if free_text else "category"


def grounding_queries(source, ids: Iterable[str], config: Mapping[str, Any],
                      texts: str = "prompt") -> tuple[list[Query], int]:
    """The queries of the positive images among ``ids``, and how many negative images were skipped.

    ``texts`` is a :func:`text_source` value. Uses the label files only (``label`` / ``phrases``).
    """
    queries: list[Query] = []
    negatives = 0
    for image_id in ids:
        if config["queries"] == "class":
            if source.label(image_id):
                queries.append(Query(image_id, image_id, config["prompt"]))
            else:
                negatives += 1
            continue
        if config["queries"] == "pathologies":
            names = source.pathologies(image_id)
            negatives += not names
            queries += [Query(f"{image_id}#{name}", image_id, pathologies.prompt(config, name), pathology=name)
                        for name in names]
            continue
        phrases = source.phrases(image_id)
        if not phrases:
            negatives += 1
        for index, (category, phrase, _) in enumerate(phrases):
            queries.append(Query(f"{image_id}#{index}", image_id, category if texts == "category" else phrase, index))
    return queries, negatives


def resize_truth(mask: Any, size: int) -> np.ndarray:
    """A 2-D mask resized to ``size``² by nearest neighbour as torchvision's ``Resize(NEAREST)`` resizes a
    tensor (``torch.nn.functional.interpolate(mode="nearest")``): output pixel ``i`` takes source pixel
    ``floor(i * in / out)`` along each axis. MedKLIP resizes its box mask this way (``ToTensor`` then
    ``Resize([224, 224], NEAREST)``, Sample_Zero-Shot_Grounding_RSNA/dataset/dataset_RSNA.py:36-39).
    Pillow's NEAREST samples pixel centres instead (``floor((i + 0.5) * in / out)``), which moves box
    edges by one output pixel. Returns a boolean array."""
    truth = torch.from_numpy(np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8))
    if tuple(truth.shape) != (size, size):
        truth = F.interpolate(truth[None, None], size=(size, size), mode="nearest")[0, 0]
    return truth.numpy() > 0


def truth_mask(source, query: Query, config: Mapping[str, Any]) -> np.ndarray:
    """The query's ground truth as a boolean mask at the evaluation resolution (see module docstring)."""
    if query.pathology is not None:
        mask = source.mask(query.image_id, query.pathology)
    else:
        mask = source.mask(query.image_id) if query.phrase is None else source.mask(query.image_id, query.phrase)
    if config["eval_resolution"] == "fixed":
        return resize_truth(mask, int(config["eval_size"]))
    return np.asarray(mask) > 0


def equalize_hist(image: Any, nbins: int = 256) -> np.ndarray:
    """Histogram equalisation of a float image, as ``skimage.exposure.equalize_hist`` computes it for
    float input: ``nbins`` equal bins over ``[min, max]``, the normalised cumulative histogram taken at the
    bin centres and interpolated linearly at every pixel (clamped outside the first and last centre).
    Returns float64 values in (0, 1]."""
    values = np.asarray(image, dtype=np.float64)
    counts, edges = np.histogram(values, bins=nbins, range=(float(values.min()), float(values.max())))
    cdf = np.cumsum(counts) / counts.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    return np.interp(values.ravel(), centres, cdf).reshape(values.shape)


def medklip_read(pixels: np.ndarray) -> np.ndarray:
    """A uint8 image as MedKLIP's RSNA grounding loader reads it: ``/ 255``, histogram equalisation,
    ``(255 * x).astype(uint8)`` (truncation) (MedKLIP Sample_Zero-Shot_Grounding_RSNA/dataset/
    dataset_RSNA.py:63-70). MedKLIP starts from ``pixel_array``; vlpbench readers give the 8-bit image
    scaled by ``255 / max``, which is the pixel array itself for RSNA's 8-bit files whose maximum is 255,
    and otherwise a linear stretch that equalisation (bins over the image's own range) nearly undoes."""
    return (255 * equalize_hist(np.asarray(pixels, dtype=np.float64) / 255.0)).astype(np.uint8)


class MedKLIPRead:
    """A dataset reader whose ``image`` is :func:`medklip_read` of the wrapped reader's; every other
    attribute is the wrapped reader's. Its class name is part of the image cache's key, so equalised
    images are cached apart from plain ones."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def image(self, image_id: str) -> np.ndarray:
        return medklip_read(self.source.image(image_id))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "source":  # not during unpickling, before ``source`` is set
            raise AttributeError(name)
        return getattr(self.source, name)


def _normalized(heat: torch.Tensor, normalize: str) -> torch.Tensor:
    if normalize == "none":
        return heat
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low) if high > low else torch.zeros_like(heat)


def prepare_heatmap(raw: Any, shape: tuple[int, int], config: Mapping[str, Any]) -> np.ndarray:
    """A raw 2-D map upsampled to ``shape`` (``config["upsample"]``) and normalised (``config["normalize"]``)."""
    heat = torch.as_tensor(raw, dtype=torch.float32)
    if tuple(heat.shape) != tuple(shape):
        options = {"align_corners": False} if config["upsample"] == "bilinear" else {}
        heat = F.interpolate(heat[None, None], size=tuple(shape), mode=config["upsample"], **options)[0, 0]
    return _normalized(heat, config["normalize"]).numpy()


def is_flat(raw: Any) -> bool:
    """Whether a map is constant (every pixel ties for the maximum, so the pointing game always hits)."""
    heat = torch.as_tensor(raw)
    return bool(heat.max() == heat.min())


def _pairs(maps: Mapping[str, Any], queries: list[Query], source, config: Mapping[str, Any],
           desc: str, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(heat map, truth)`` at the evaluation resolution, one query at a time (memory stays per image)."""
    # At the fixed grid a query's ops are small: one thread is faster, by far more than threads could save. At
    # native masks (a million pixels and more) threads save about as much as a busy CPU costs (perf/tiny_ops.py).
    fixed = config["eval_resolution"] == "fixed"
    for query in tqdm(queries, desc=desc, disable=not progress, leave=False, unit="map"):
        with single_threaded(fixed):
            truth = truth_mask(source, query, config)
            heat = prepare_heatmap(maps[query.key], truth.shape, config)
        yield heat, truth


def select_threshold(maps: Mapping[str, Any], queries: list[Query], source, config: Mapping[str, Any], *,
                     progress: bool = False) -> dict[str, Any]:
    """Step 4 on validation queries: ``{"threshold", "val_dice", "candidates"}``.

    Raises:
        DataError: there are no validation queries.
    """
    if not queries:
        raise DataError("threshold_source=val: the validation part holds no positive image to choose the "
                        "threshold on; use --set threshold_source=fixed (and threshold=...)")
    if config.get("threshold_search", DEFAULTS["threshold_search"]) == "per_pathology":
        pairs = _pairs(maps, queries, source, config, "threshold", progress)
        return pathologies.select_thresholds(((q.pathology, heat, truth) for q, (heat, truth) in zip(queries, pairs)),
                                             pathologies.check_values(config["threshold_values"]))
    pooled = []
    for query in queries:
        values = _normalized(torch.as_tensor(maps[query.key], dtype=torch.float32), config["normalize"]).ravel()
        pooled.append(values[:: max(1, values.numel() // _VALUES_PER_MAP)].numpy())
    candidates = candidate_thresholds(np.concatenate(pooled), int(config["threshold_grid"]))
    threshold, val_dice = choose_threshold(_pairs(maps, queries, source, config, "threshold", progress), candidates)
    return {"threshold": threshold, "val_dice": val_dice, "candidates": int(candidates.size)}


def score_queries(maps: Mapping[str, Any], queries: list[Query], source, config: Mapping[str, Any],
                  threshold: float | Mapping[str, float], *, progress: bool = False) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRIC_NAMES` per query (CNR may be NaN), in query order; with ``queries:
    pathologies`` also CheXlocalize's ``tp_iou`` (NaN where undefined) and ``hit``. ``threshold`` is one value,
    or one per pathology (a pathology it lacks takes ``config["threshold"]``)."""
    per_pathology = config["queries"] == "pathologies"
    names = METRIC_NAMES + (pathologies.SCORES if per_pathology else ())
    scores = {name: np.empty(len(queries)) for name in names}
    pairs = _pairs(maps, queries, source, config, "test", progress)
    for index, (query, (heat, truth)) in enumerate(zip(queries, pairs)):
        # A pathology without validation queries has no tuned threshold: it takes the task's fixed one.
        cut = threshold.get(query.pathology, float(config["threshold"])) if isinstance(threshold, Mapping) else threshold
        for name, value in grounding_scores(heat, truth, cut).items():
            scores[name][index] = value
        if per_pathology:
            scores["tp_iou"][index] = true_positive_iou(heat, truth, cut)
            scores["hit"][index] = hit(heat, truth)
    return scores


def summarize(scores: dict[str, np.ndarray], *, n_resamples: int, seed: int) -> tuple[dict, dict]:
    """Means over queries and per-query bootstrap CIs; CNR over its finite values (None if there are none)."""
    metrics: dict[str, float | None] = {}
    ci: dict[str, dict] = {}
    for name in METRIC_NAMES:
        values = scores[name][np.isfinite(scores[name])]
        metrics[name] = float(values.mean()) if values.size else None
        if values.size:
            ci[name] = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return metrics, ci


def compute_maps(adapter, source, queries: list[Query], *, batch_size: int | InferenceBatch, device: torch.device,
                 progress: bool = True, desc: str = "maps", precision: str = DEFAULT_PRECISION,
                 image_read: str = "cache") -> dict[str, torch.Tensor]:
    """The adapter's raw heat map of every query, ``{key: (h, w) float32 CPU tensor}``, the adapter
    running in ``precision`` (``vlpbench.protocols.runtime``), for images read as ``image_read`` says
    (``cache``, or ``medklip``: :class:`MedKLIPRead`).

    Each batch of ``batch_size`` images (an integer, or the run's
    :class:`~vlpbench.protocols.batch_fill.InferenceBatch`) is embedded once for all the distinct texts its
    queries ask for. Under torchrun each rank computes its block of batches and every rank returns the maps of
    all queries.

    Raises:
        VlpbenchError: ``grounding_maps`` returned a shape other than ``(B, texts, h, w)``.
    """
    image_ids = list(dict.fromkeys(query.image_id for query in queries))
    by_image: dict[str, list[Query]] = {}
    for query in queries:
        by_image.setdefault(query.image_id, []).append(query)
    # Readers live in vlpbench.data.<dataset>, so the module's name is the cache's dataset name.
    dataset = type(source).__module__.rpartition(".")[2]
    reader = MedKLIPRead(source) if image_read == "medklip" else source
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        images = cached_images(reader, dataset, image_ids, int(adapter.image_size), progress=progress)
    def one_pass(size: int) -> dict[str, torch.Tensor]:
        maps: dict[str, torch.Tensor] = {}
        first, stop = distributed.batch_block(len(image_ids), size)  # this rank's whole batches
        bar = tqdm(total=stop - first, desc=desc, disable=not progress, leave=False, unit="img")
        for start in range(first, stop, size):
            end = min(start + size, stop)
            batch_ids = image_ids[start:end]
            pixels = torch.from_numpy(np.array(images[start:end]))[:, None].to(device)
            texts = list(dict.fromkeys(query.text for image_id in batch_ids for query in by_image[image_id]))
            with torch.inference_mode(), autocast(device, precision):
                batch = adapter.grounding_maps(adapter.preprocess(pixels), texts)
            if batch.ndim != 4 or tuple(batch.shape[:2]) != (len(batch_ids), len(texts)):
                raise VlpbenchError(f"adapter {adapter.name!r}: grounding_maps returned shape {tuple(batch.shape)} "
                                    f"for {len(batch_ids)} images and {len(texts)} texts; expected (B, T, h, w)")
            batch = batch.detach().float().cpu()
            column = {text: k for k, text in enumerate(texts)}
            for row, image_id in enumerate(batch_ids):
                for query in by_image[image_id]:
                    maps[query.key] = batch[row, column[query.text]].clone()
            bar.update(len(batch_ids))
        bar.close()
        return maps

    maps = given(batch_size).run(one_pass)
    return _gathered(maps, queries) if distributed.is_active() else maps


def _probe(adapter, texts: list[str], precision: str, count: int, device: torch.device) -> None:
    """Heat maps of ``count`` blank images for ``texts`` (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    size = int(adapter.image_size)
    with torch.inference_mode(), autocast(device, precision):
        pixels = torch.zeros(count, 1, size, size, dtype=torch.uint8, device=device)
        adapter.grounding_maps(adapter.preprocess(pixels), texts)


def _gathered(maps: dict[str, torch.Tensor], queries: list[Query]) -> dict[str, torch.Tensor]:
    """Every rank's maps, on every rank, keyed in query order.

    A rank's images are a contiguous block of the image order, so its queries are a contiguous block of
    ``queries`` and concatenating the ranks' stacks in rank order gives the maps in query order. Rank 0
    always holds a block (blocks are larger first), so its map shape serves ranks that hold none.
    """
    local = [maps[query.key].numpy() for query in queries if query.key in maps]
    shape = distributed.broadcast_object(local[0].shape if local else None)
    if odd := next((heat.shape for heat in local if heat.shape != shape), None):
        raise VlpbenchError(f"grounding_maps returned maps of shape {odd} and {shape}: the maps of one run "
                            "must share one (h, w) to be gathered across processes")
    stacked = np.stack(local) if local else np.empty((0, *shape), dtype=np.float32)
    every = distributed.gather_arrays(stacked)
    return {query.key: torch.from_numpy(heat) for query, heat in zip(queries, every)}


def run_grounding_task(adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int,
                       device: torch.device, progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
    """Entry point used by ``vlpbench.api.run``: heat maps of val and test positives, threshold, scores.

    ``predictions``: a folder to save the raw val and test maps in, as ``score`` reads them (see
    :mod:`vlpbench.predictions`), or None.

    ``split.train`` is not used (nothing is trained). Returns ``metrics`` (the means of
    :data:`~vlpbench.metrics.grounding.METRIC_NAMES` over test queries), ``ci``, ``per_image`` (Dice per
    query key), ``n`` (``test``/``val``: queries scored / used for the threshold; images, skipped negatives,
    constant maps, queries without a defined CNR), ``training`` (the threshold and how it was chosen, the
    texts given, map and input sizes) and ``timing``.
    """
    adapter.require(*GroundingProtocol.needs)
    check_config(config)
    t0 = time.perf_counter()
    texts = text_source(config, adapter.free_text)
    test, test_negatives = grounding_queries(source, split.test, config, texts)
    if not test:
        raise DataError(f"no positive test image among the {len(split.test)} test images: nothing to ground")
    use_val = config["threshold_source"] == "val"
    val, val_negatives = grounding_queries(source, split.val, config, texts) if use_val else ([], 0)
    log.info("grounding: %d test and %d validation queries (%s texts), %d + %d negative images skipped",
             len(test), len(val), texts, test_negatives, val_negatives)

    precision = precision_of(config)
    image_read = config.get("image_read", DEFAULTS["image_read"])
    # The probe asks for as many distinct texts as images, at most those the queries hold: about what a batch asks.
    asked = list(dict.fromkeys(query.text for query in test))
    batch_size = inference_batch(config, "batch_size", device=device, fallback=GROUNDING_BATCH,
                                 limit=len({query.image_id for query in test + val}),
                                 probe=lambda count: _probe(adapter, asked[:count], precision, count, device))
    maps = compute_maps(adapter, source, val, batch_size=batch_size, device=device, progress=progress,
                        desc="val maps", precision=precision, image_read=image_read) if val else {}
    maps.update(compute_maps(adapter, source, test, batch_size=batch_size, device=device, progress=progress,
                             desc="test maps", precision=precision, image_read=image_read))
    if predictions is not None and distributed.is_main():  # every rank holds all maps: one file, from rank 0
        write_heatmaps(predictions, maps)
    t_maps = time.perf_counter()

    evaluated = evaluate_grounding(maps, test, val, source, config, seed=seed, progress=progress)
    scores = evaluated.pop("scores")
    chosen = evaluated.pop("threshold")
    t_test = time.perf_counter()
    map_size = list(next(iter(maps.values())).shape)
    return {
        **evaluated,
        "n": {"train": 0, "val": len(val), "test": len(test),
              "test_images": len({query.image_id for query in test}),
              "test_negatives_skipped": test_negatives, "val_negatives_skipped": val_negatives,
              "flat_maps": sum(is_flat(maps[query.key]) for query in test),
              "cnr_undefined": int(np.count_nonzero(~np.isfinite(scores["cnr"])))},
        "training": {**chosen, "threshold_source": config["threshold_source"], "text_source": texts,
                     "map_size": map_size, "input_size": int(adapter.image_size), "image_read": image_read,
                     "world_size": distributed.world_size(), "inference_batch": batch_size.describe()},
        "timing": {"maps_s": t_maps - t0, "evaluate_s": t_test - t_maps, "total_s": t_test - t0},
    }


def evaluate_grounding(maps: Mapping[str, Any], test: list[Query], val: list[Query], source,
                       config: Mapping[str, Any], *, seed: int, progress: bool = False) -> dict[str, Any]:
    """Steps 4 and 5 for ``run`` and ``score`` alike: the threshold (chosen on the ``val`` queries' maps, or
    the task's fixed ``threshold`` when ``val`` is empty), then every test query scored.

    Returns ``metrics`` (means over test queries), ``ci``, ``per_image`` (Dice per query key), ``threshold``
    (``threshold``, ``val_dice``, ``candidates``), ``scores`` (each metric per test query) and ``evidence``
    (every metric per query, each query under its image, :mod:`vlpbench.evidence`).
    """
    if val:
        chosen = select_threshold(maps, val, source, config, progress=progress)
    else:
        chosen = {"threshold": float(config["threshold"]), "val_dice": None, "candidates": 0}
    scores = score_queries(maps, test, source, config, chosen["threshold"], progress=progress)
    metrics, ci = summarize(scores, n_resamples=int(config["bootstrap_resamples"]), seed=seed)
    if config["queries"] == "pathologies":
        more, more_ci = pathologies.summarize(scores, [q.pathology for q in test], [q.image_id for q in test],
                                              n_resamples=int(config["bootstrap_resamples"]), seed=seed)
        metrics.update(more)
        ci.update(more_ci)
    return {"metrics": metrics, "ci": ci,
            "per_image": {query.key: float(value) for query, value in zip(test, scores["dice"])},
            "evidence": per_item_evidence([query.key for query in test], {name: scores[name] for name in METRIC_NAMES},
                                          images=[query.image_id for query in test]),
            "threshold": chosen, "scores": scores}


def read_heatmaps(path: Path) -> Mapping[str, np.ndarray]:
    """Open an ``.npz`` of heat maps (read lazily, key by key; no pickles).

    Raises:
        DataError: the file is missing or not a readable ``.npz``.
    """
    if not path.is_file():
        raise DataError(f"predictions file {path} not found; expected an .npz with one 2-D heat map per "
                        "image id (MS-CXR: per '<image_id>#<phrase index>')")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array; expected an .npz with one heat map per key")
    return archive


class _CheckedMaps(Mapping[str, np.ndarray]):
    """The maps of an ``.npz``, each checked on access by :func:`~vlpbench.predictions.check_heatmap`."""

    def __init__(self, archive: Mapping[str, np.ndarray], path: Path):
        self._archive, self._path = archive, path

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            heat = self._archive[key]
        except ValueError as exc:  # an object array, which needs pickle
            raise DataError(f"{self._path} key {key!r}: not a numeric array ({exc})") from exc
        return check_heatmap(self._path, key, heat)

    def __contains__(self, key: object) -> bool:
        return key in self._archive

    def __iter__(self) -> Iterator[str]:
        return iter(self._archive)

    def __len__(self) -> int:
        return len(self._archive)


class GroundingProtocol(base.Protocol):
    """Zero-shot heat maps scored against lesion masks (module docstring)."""

    name = "grounding"
    table_group = "ground"
    uses_val = True
    trains = False
    needs = (GROUNDING,)
    prediction_file = HEATMAPS_FILE
    prediction_files = (f"{HEATMAPS_FILE}: one 2-D heat map per positive test (and validation) image, keyed by "
                        "image id (MS-CXR: '<image_id>#<phrase index>')")

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """:func:`run_grounding_task`."""
        return run_grounding_task(adapter, source, split, config, seed=seed, device=device, progress=progress,
                                  predictions=predictions)

    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """Steps 2 to 5 on an ``.npz`` of heat maps (any resolution) of the positive images of ``split.test``.

        Keys are image ids, or ``<image_id>#<phrase index>`` for MS-CXR, of test or validation images (maps of
        negative images are allowed, not scored); a key naming another image is an error. The
        threshold is chosen as ``run`` chooses it when the file also holds the maps of the validation positives
        (``split.val``); otherwise the task's ``threshold`` is used and a note says so. Reads the label files only.

        Raises:
            DataError: the file is unreadable, a test positive has no map, a key names no test or validation
                image, or a map is not a finite 2-D array of real numbers.
        """
        check_config(config)
        path = self.prediction_path(Path(predictions))
        maps = _CheckedMaps(read_heatmaps(path), path)
        test, negatives = grounding_queries(source, split.test, config)
        if not test:
            raise DataError(f"no positive image among the {len(split.test)} images scored: nothing to ground")
        missing = [query.key for query in test if query.key not in maps]
        if missing:
            raise DataError(f"{path}: {len(missing)} of {len(test)} positive test maps are missing, "
                            f"e.g. keys {', '.join(map(repr, missing[:3]))}")
        images = set(split.test) | set(split.val)
        if unknown := [key for key in maps if key not in images and key.rpartition("#")[0] not in images]:
            raise DataError(f"{path}: {len(unknown)} key(s) name no image of the split's test or validation part "
                            f"({len(images)} images), e.g. {', '.join(map(repr, unknown[:3]))}; expected "
                            "'<image_id>' or '<image_id>#<phrase index>'")
        notes = []
        val: list[Query] = []
        if config["threshold_source"] == "val":
            val = [query for query in grounding_queries(source, split.val, config)[0] if query.key in maps]
            if not val:
                notes.append(f"{path.name} holds no map of a validation positive, so the threshold is the "
                             f"task's fixed threshold {config['threshold']} instead of one chosen on validation maps")
        evaluated = evaluate_grounding(maps, test, val, source, config, seed=seed)
        scores = evaluated.pop("scores")
        chosen = evaluated.pop("threshold")
        flat = sum(is_flat(maps[query.key]) for query in test)
        if flat:
            notes.append(f"{flat} of {len(test)} test maps are constant: every pixel ties for the maximum, so each "
                         "scores a pointing-game hit")
        return {**evaluated,
                "n": {"train": 0, "val": len(val), "test": len(test), "test_negatives_skipped": negatives,
                      "cnr_undefined": int(np.count_nonzero(~np.isfinite(scores["cnr"])))},
                "scoring": {**chosen, "threshold_source": "val" if val else "config", "notes": notes}}


PROTOCOL = GroundingProtocol()
