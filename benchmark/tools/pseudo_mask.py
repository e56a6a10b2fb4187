"""G2D's pseudo segmentation masks: the attention pool's map of an image, thresholded and refined.

G2D (NeurIPS 2024, §3.2) supervises its U-Net decoder with masks made from the attention of its
attention pool: the mean-token query over the projected final-stage tokens (``G2DAdapter.attention_maps``,
``(B, 4, 8, 8)`` for the fixed 256² input). Two variants of the steps that follow:

``paper`` (default), the pipeline as the paper describes it:

1. aggregate the heads (``heads``: ``mean`` as Eq. 2; ``max`` as an alternative);
2. upsample to the input grid (``upsample``);
3. zero the map outside a body mask from histogram thresholding (``body_threshold``);
4. keep pixels whose score is ≥ the ``percentile``-th percentile (Eq. 3), taken over the whole image or
   inside the body (``percentile_scope``);
5. smooth the mask's edges with a bilateral filter (``bilateral_*``), zero it again outside the body and
   binarise it at ``binarize_at``.

``released``, what ``cheliu-computation/G2D-NeurIPS24`` does (``trainer.py: transform_att2label``): the mean
(or max) over heads, NEAREST upsampling, ``np.quantile(map, q)`` over all pixels with numpy's linear
method and a strict ``>``; no body mask, no filter. At 256² input the mask is exactly the top 9 of the 64
cells (for q = 0.85), as 32×32 blocks.

The paper publishes neither the upsampling mode, the body-mask rule nor the filter's sizes. The defaults
here are interpretations, each an option:

- ``upsample: nearest``: the paper applies the filter "to remove the square-block edges left by
  upsampling", which nearest upsampling leaves.
- ``body_threshold: otsu``: Otsu's threshold of the 256-level intensity histogram; the pixels above it,
  with their holes filled (the lungs, darker than the surrounding tissue) and only the largest connected
  component kept. A number (0-255) is used as a fixed grey-level threshold instead.
- ``percentile_scope: image``: the percentile over every pixel, the zeroed background included, as Eq. 3
  reads; ``body`` takes it over the pixels inside the body.
- The bilateral filter (Tomasi & Manduchi 1998) on the 0/1 mask: a circular window of ``bilateral_diameter``
  = 15 pixels, spatial σ ``bilateral_sigma_space`` = 4 px, range σ ``bilateral_sigma_range`` = 1.0 (mask
  units), reflected borders. On a 0/1 mask the range term weighs a neighbour across the edge by
  exp(-1/(2σ²)) = 0.61 of one on the same side, so the filter is a mildly edge-aware Gaussian: pixels
  farther than the window radius from an edge keep exactly 0 or 1, block corners are rounded and specks
  narrower than about σ are removed once the result is binarised at ``binarize_at`` = 0.5 (the paper does
  not say whether it binarises again).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage

from vlpbench.errors import ConfigError, DataError

VARIANTS = ("paper", "released")
HEAD_AGGREGATIONS = ("mean", "max")
UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")
PERCENTILE_SCOPES = ("image", "body")
# Options that only the paper's pipeline has (the released code has no body mask and no filter).
PAPER_ONLY = ("percentile_scope", "body_threshold", "bilateral_diameter", "bilateral_sigma_space",
              "bilateral_sigma_range", "binarize_at")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@dataclass(frozen=True)
class PseudoMaskOptions:
    """How an attention map becomes a mask; see the module docstring for each option and its source."""

    variant: str = "paper"
    heads: str = "mean"
    percentile: float = 85.0
    upsample: str = "nearest"
    percentile_scope: str = "image"
    body_threshold: str | float = "otsu"
    bilateral_diameter: int = 15
    bilateral_sigma_space: float = 4.0
    bilateral_sigma_range: float = 1.0
    binarize_at: float = 0.5

    def __post_init__(self) -> None:
        for name, allowed in (("variant", VARIANTS), ("heads", HEAD_AGGREGATIONS), ("upsample", UPSAMPLE_MODES),
                              ("percentile_scope", PERCENTILE_SCOPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"pseudo-mask option {name}={getattr(self, name)!r}: expected one of "
                                  f"{', '.join(allowed)}")
        if not 0 <= self.percentile <= 100:
            raise ConfigError(f"pseudo-mask option percentile={self.percentile!r}: expected a number in [0, 100]")
        if self.variant == "released" and self.upsample != "nearest":
            raise ConfigError("pseudo-mask option upsample: the released variant upsamples NEAREST; "
                              "use --variant paper for another mode")
        if self.body_threshold != "otsu" and not (isinstance(self.body_threshold, (int, float))
                                                  and 0 <= self.body_threshold <= 255):
            raise ConfigError(f"pseudo-mask option body_threshold={self.body_threshold!r}: expected 'otsu' or a "
                              "grey level in [0, 255]")
        if int(self.bilateral_diameter) != self.bilateral_diameter or self.bilateral_diameter < 1:
            raise ConfigError(f"pseudo-mask option bilateral_diameter={self.bilateral_diameter!r}: expected a "
                              "positive whole number of pixels")
        if self.bilateral_sigma_space <= 0 or self.bilateral_sigma_range <= 0:
            raise ConfigError("pseudo-mask options bilateral_sigma_space and bilateral_sigma_range must be > 0, "
                              f"got {self.bilateral_sigma_space!r} and {self.bilateral_sigma_range!r}")
        if not 0 < self.binarize_at <= 1:
            raise ConfigError(f"pseudo-mask option binarize_at={self.binarize_at!r}: expected a number in (0, 1]")

    @property
    def refined(self) -> bool:
        """Whether the body mask and the bilateral filter apply (the paper's pipeline)."""
        return self.variant == "paper"


def pseudo_mask_options(variant: str = "paper", **given: Any) -> PseudoMaskOptions:
    """Options of ``variant`` with the ``given`` ones (None = default) set.

    Raises:
        ConfigError: an unknown option, a value outside its range, or a paper-only option with ``released``.
    """
    known = {f.name for f in fields(PseudoMaskOptions)} - {"variant"}
    given = {key: value for key, value in given.items() if value is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown pseudo-mask option {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if variant == "released" and (paper_only := sorted(set(given) & set(PAPER_ONLY))):
        raise ConfigError(f"pseudo-mask option {', '.join(paper_only)} belongs to the paper's pipeline; the "
                          "released variant has no body mask and no filter (use --variant paper)")
    return PseudoMaskOptions(variant=variant, **given)


@dataclass
class PseudoMask:
    """One image's pseudo mask and what it was made from; 2-D arrays are on the model's input grid (S×S).

    ``image`` (uint8) is the input as the model saw it; ``attention`` the per-head map ``(heads, h, w)``;
    ``aggregated`` its head aggregate ``(h, w)``; ``heat`` the upsampled aggregate, zero outside ``body``;
    ``threshold`` the percentile value; ``soft`` the filtered mask in [0, 1] (the binary mask where no
    filter runs); ``mask`` the final binary mask; ``similarity`` the sentence-to-location cosine map
    ``(h, w)`` when a sentence was given.
    """

    image: np.ndarray
    attention: np.ndarray
    aggregated: np.ndarray
    heat: np.ndarray
    body: np.ndarray
    threshold: float
    soft: np.ndarray
    mask: np.ndarray
    similarity: np.ndarray | None = None


# --- the steps ------------------------------------------------------------------------------------------

def aggregate_heads(attention: np.ndarray, how: str = "mean") -> np.ndarray:
    """Mean (G2D's Eq. 2 and code) or max of ``(heads, h, w)`` over the heads: ``(h, w)``."""
    if how not in HEAD_AGGREGATIONS:
        raise ConfigError(f"head aggregation {how!r}: expected one of {', '.join(HEAD_AGGREGATIONS)}")
    return attention.mean(axis=0) if how == "mean" else attention.max(axis=0)


def upsample(values: np.ndarray, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """A 2-D map resized to ``size`` (torch's interpolation; nearest is torchvision's ``Resize`` NEAREST)."""
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"upsample mode {mode!r}: expected one of {', '.join(UPSAMPLE_MODES)}")
    heat = torch.as_tensor(np.asarray(values, dtype=np.float64))[None, None]
    options = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(heat, size=tuple(size), mode=mode, **options)[0, 0].numpy()


def otsu_threshold(image: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image's histogram: the grey level t maximising the between-class variance
    of {≤ t} and {> t} (the first such level on ties); the image's single level if it has one."""
    counts = np.bincount(np.asarray(image, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    low_weight = np.cumsum(counts)
    high_weight = low_weight[-1] - low_weight
    low_sum = np.cumsum(counts * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        low_mean = low_sum / low_weight
        high_mean = (low_sum[-1] - low_sum) / high_weight
        between = low_weight * high_weight * (low_mean - high_mean) ** 2
    # Only levels present in the image, with pixels on both sides, are candidates (as scikit-image's).
    present = np.nonzero(counts)[0]
    candidates = present[:-1]
    if candidates.size == 0:
        return int(present[0])
    return int(candidates[np.argmax(between[candidates])])


def body_mask(image: np.ndarray, threshold: str | float = "otsu") -> np.ndarray:
    """The body of a uint8 chest X-ray: pixels above ``threshold`` (``"otsu"`` or a grey level), holes filled,
    largest connected component (4-connected) only. Empty for an image with nothing above the threshold."""
    level = otsu_threshold(image) if threshold == "otsu" else float(threshold)
    filled = ndimage.binary_fill_holes(np.asarray(image) > level)
    labels, count = ndimage.label(filled)
    if count <= 1:
        return filled
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return labels == largest


def bilateral_filter(values: np.ndarray, diameter: int = 15, sigma_space: float = 4.0,
                     sigma_range: float = 1.0) -> np.ndarray:
    """Bilateral filter of a 2-D float array over a circular window of ``diameter`` pixels, borders reflected.

    Each output pixel is the mean of its window weighted by exp(-d²/(2 σ_space²)) · exp(-Δ²/(2 σ_range²)),
    d the distance and Δ the value difference to the centre. A window of equal values returns that value
    exactly.
    """
    values = np.asarray(values, dtype=np.float64)
    radius = int(diameter) // 2
    padded = np.pad(values, radius, mode="reflect")
    height, width = values.shape
    total = np.zeros_like(values)
    weights = np.zeros_like(values)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            shifted = padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width]
            weight = np.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2)
                            - (shifted - values) ** 2 / (2 * sigma_range**2))
            total += weight * shifted
            weights += weight
    return total / weights


def mask_from_attention(aggregated: np.ndarray, image: np.ndarray,
                        options: PseudoMaskOptions = PseudoMaskOptions(),
                        ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """Steps 2-5 for one image: ``(heat, body, threshold, soft, mask)`` on ``image``'s grid.

    ``aggregated`` is the head-aggregated ``(h, w)`` map and ``image`` the uint8 picture the model saw.
    """
    heat = upsample(aggregated, image.shape, options.upsample)
    if options.refined:
        body = body_mask(image, options.body_threshold)
        heat = np.where(body, heat, 0.0)
    else:
        body = np.ones(image.shape, dtype=bool)
    scored = heat[body] if options.refined and options.percentile_scope == "body" and body.any() else heat
    threshold = float(np.quantile(scored, options.percentile / 100))
    if not options.refined:
        mask = heat > threshold
        return heat, body, threshold, mask.astype(np.float32), mask
    binary = (heat >= threshold) & body
    soft = bilateral_filter(binary, options.bilateral_diameter, options.bilateral_sigma_space,
                            options.bilateral_sigma_range) * body
    return heat, body, threshold, soft.astype(np.float32), soft >= options.binarize_at


# --- models and images ----------------------------------------------------------------------------------

def model_grid(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 (H, W) image resized to size×size as ``Adapter.preprocess`` does (bilinear, antialiased)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None]
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return pixels[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def pseudo_masks(adapter, images: Sequence[np.ndarray], *, sentence: str | None = None,
                 options: PseudoMaskOptions = PseudoMaskOptions(), batch_size: int = 8,
                 device: torch.device | str = "cpu") -> list[PseudoMask]:
    """The pseudo mask of every uint8 (H, W) image, in order.

    ``adapter`` provides ``attention_maps`` (G2D from its full pre-training checkpoint); with ``sentence``
    also ``dense_embed`` and ``embed_text`` (the G2D adapter needs option ``text_encoder``), whose
    sentence-to-location similarity is returned beside the mask. Images of any size are resized to the adapter's input size.

    Raises:
        CapabilityError: the adapter lacks the attention pool, or a text encoder for ``sentence``.
        ConfigError: the adapter has no ``attention_maps`` at all.
    """
    if not callable(getattr(adapter, "attention_maps", None)):
        raise ConfigError(f"adapter {adapter.name!r} has no attention pool: pseudo masks need G2D's full "
                          "pre-training checkpoint (--model g2d, *_checkpoint.pth)")
    if sentence is not None and not sentence.strip():
        raise ConfigError("--sentence is empty; give a report sentence or leave the option out")
    size = int(adapter.image_size)
    results = []
    for start in range(0, len(images), batch_size):
        grid = [model_grid(image, size) for image in images[start:start + batch_size]]
        pixels = adapter.preprocess(torch.from_numpy(np.stack(grid))[:, None].to(device))
        with torch.no_grad():
            attention = adapter.attention_maps(pixels).float().cpu().numpy()
            similarity = sentence_similarity(adapter, pixels, sentence) if sentence is not None else None
        for row, image in enumerate(grid):
            aggregated = aggregate_heads(attention[row], options.heads)
            heat, body, threshold, soft, mask = mask_from_attention(aggregated, image, options)
            results.append(PseudoMask(image, attention[row], aggregated, heat, body, threshold, soft, mask,
                                      None if similarity is None else similarity[row]))
    return results


def sentence_similarity(adapter, pixels: torch.Tensor, sentence: str) -> np.ndarray:
    """Cosine of the sentence's embedding with each location's dense embedding, ``(B, h, w)``.

    Raises:
        CapabilityError: the adapter has no dense or no text embedding (G2D: option ``text_encoder``).
    """
    adapter.require("dense_embed", "embed_text")
    dense = adapter.dense_embed(pixels)
    text = adapter.embed_text([sentence]).to(dense.device)
    return torch.einsum("bdhw,d->bhw", dense, text[0]).float().cpu().numpy()


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders' PNG/JPEG/DICOM files (sorted, not recursive).

    Raises:
        DataError: a path does not exist, a folder holds no image, or two images share a file stem (their
            outputs would overwrite each other).
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DataError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} image in this folder")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"image path not found: {path}")
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems:
            raise DataError(f"two images share the name {path.stem!r} ({stems[path.stem]} and {path}); "
                            "their outputs would overwrite each other")
        stems[path.stem] = path
    return found


def load_image(path: Path) -> np.ndarray:
    """A uint8 (H, W) image from a PNG/JPEG (``read_image``) or a DICOM (``read_dicom``, by suffix)."""
    from vlpbench.data.dicom import read_dicom
    from vlpbench.data.images import read_image

    return read_dicom(path) if path.suffix.lower() in (".dcm", ".dicom") else read_image(path)


# --- outputs --------------------------------------------------------------------------------------------

# Anchor colours of the heat-map palette (dark blue → cyan → yellow → red), evenly spaced over [0, 1].
_PALETTE = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
_CONTOUR = (0, 255, 0)


def _colour(heat: np.ndarray) -> np.ndarray:
    """(H, W) values → (H, W, 3) palette colours after per-map min-max scaling (a flat map is all dark blue)."""
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    position = scaled * (len(_PALETTE) - 1)
    index = np.minimum(position.astype(int), len(_PALETTE) - 2)
    fraction = (position - index)[..., None]
    return (1 - fraction) * _PALETTE[index] + fraction * _PALETTE[index + 1]


def _panel(image: np.ndarray, heat: np.ndarray | None, mask: np.ndarray, title: str) -> Image.Image:
    """The grey image, the heat map blended over it (when given), the mask's contour and a title."""
    grey = np.repeat(image[..., None].astype(np.float64), 3, axis=2)
    if heat is not None:
        grey = 0.5 * grey + 0.5 * _colour(upsample(heat, image.shape, "bilinear"))
    picture = np.rint(grey).clip(0, 255).astype(np.uint8)
    contour = mask & ~ndimage.binary_erosion(mask, border_value=0)
    picture[contour] = _CONTOUR
    panel = Image.fromarray(picture)
    ImageDraw.Draw(panel).text((4, 2), title, fill=(255, 255, 255))
    return panel


def overlay(result: PseudoMask, *, heads: str = "mean") -> Image.Image:
    """Side by side: the image; the aggregated attention with the mask's contour; with a sentence, its
    similarity map with the same contour."""
    panels = [_panel(result.image, None, result.mask, "image + mask"),
              _panel(result.image, result.aggregated, result.mask,
                     f"attention ({heads} of {result.attention.shape[0]} heads)")]
    if result.similarity is not None:
        panels.append(_panel(result.image, result.similarity, result.mask, "sentence similarity"))
    width, height = panels[0].size
    sheet = Image.new("RGB", (width * len(panels), height))
    for k, panel in enumerate(panels):
        sheet.paste(panel, (k * width, 0))
    return sheet


def write_outputs(result: PseudoMask, stem: str, out: Path, *, heads: str = "mean") -> dict[str, str]:
    """Write ``<stem>_mask.png`` (0/255), ``<stem>_attention.npy`` (the aggregated map at the model's
    resolution), ``<stem>_overlay.png`` and, with a sentence, ``<stem>_similarity.npy``; return their names."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"mask": f"{stem}_mask.png", "attention": f"{stem}_attention.npy", "overlay": f"{stem}_overlay.png"}
    Image.fromarray(np.where(result.mask, 255, 0).astype(np.uint8)).save(out / files["mask"])
    np.save(out / files["attention"], result.aggregated.astype(np.float32))
    overlay(result, heads=heads).save(out / files["overlay"])
    if result.similarity is not None:
        files["similarity"] = f"{stem}_similarity.npy"
        np.save(out / files["similarity"], result.similarity.astype(np.float32))
    return files


def write_summary(out: Path, record: dict[str, Any]) -> Path:
    """``pseudo_masks.json`` in ``out``: the model, the options and one entry per image."""
    path = out / "pseudo_masks.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def options_record(options: PseudoMaskOptions) -> dict[str, Any]:
    """The options as recorded: the released variant drops the paper-only ones it does not use."""
    record = asdict(options)
    return record if options.refined else {k: v for k, v in record.items() if k not in PAPER_ONLY}
