"""Per-image Dice for binary segmentation, the canonical vlpbench variant.

.. math::

    \\mathrm{Dice}(P, T) = \\frac{2 |P \\cap T|}{|P| + |T|},
    \\qquad \\mathrm{Dice}(\\emptyset, \\emptyset) = 1

``P`` is the pixels of one image's prediction above ``threshold``, ``T`` those of its truth above
0.5 (fixed, as MGCA's ``get_dice`` has it: ``truth > 0.5``, HKU-MedAI/MGCA mgca/models/ssl_segmenter.py:107,
whatever the prediction threshold; a soft resized truth mask is not moved by it). An image whose
truth is empty scores 1 when the prediction is empty too and 0 when it contains any positive pixel
(the formula already gives 0 there, since ``|P ∩ T| = 0``). This is MGCA's per-image rule; unlike
MGCA, the dataset score is the mean over images, not over batch means (see :func:`dice`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from vlpbench.errors import DataError

# Images per chunk are chosen so that one chunk holds about this many pixels: the thresholded
# boolean temporaries then stay near 16 MB each, whatever N is (SIIM's test set at 1024² is ~2 GB).
_CHUNK_PIXELS = 1 << 24


def _is_tensor(x: Any) -> bool:
    # A tensor can only exist if torch is already imported, so this module need not import it:
    # `import vlpbench.metrics` (and listing the METRICS registry) stays free of torch's start-up cost.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _as_images(x: Any, name: str) -> Any:
    """``x`` as an (N, H, W) array, or tensor if it lives on an accelerator; never copies.

    (N, 1, H, W) loses its channel axis.
    """
    if not _is_tensor(x):
        x = np.asarray(x)
    elif x.device.type == "cpu" and x.dtype is not sys.modules["torch"].bfloat16:
        # A free view; numpy counts boolean pixels several times faster than torch on the CPU.
        x = x.detach().numpy()
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise DataError(f"dice: {name} must have shape (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x


TRUTH_THRESHOLD = 0.5


def dice_per_image(pred: Any, truth: Any, threshold: float = 0.5) -> np.ndarray:
    """Dice score of every image, as a float64 array of length N.

    Args:
        pred: predicted probabilities or 0/1 masks, shape (N, H, W) or (N, 1, H, W); a numpy array,
            a torch tensor (any device) or anything ``np.asarray`` accepts.
        truth: ground-truth masks of the same shape (after dropping a singleton channel axis).
        threshold: a pixel of ``pred`` is positive when its value is strictly greater than this. A pixel
            of ``truth`` is positive when it is greater than 0.5 (:data:`TRUTH_THRESHOLD`), whatever
            ``threshold`` is, so 0/1 and 0/255 truths both work, and a soft (resized) truth keeps its
            area when the prediction threshold moves. At the default 0.5 the two rules coincide.

    Returns:
        ``2|P∩T| / (|P|+|T|)`` per image; 1.0 where both are empty, 0.0 where only the truth is.

    Raises:
        DataError: a shape is not (N, H, W) / (N, 1, H, W), or ``pred`` and ``truth`` differ in shape.

    Example:
        >>> import numpy as np
        >>> truth = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
        >>> pred = np.array([[[0.9, 0.2], [0.7, 0.1]], [[0.1, 0.0], [0.3, 0.2]], [[0.6, 0.0], [0.0, 0.0]]])
        >>> dice_per_image(pred, truth).tolist()
        [0.5, 1.0, 0.0]
    """
    pred = _as_images(pred, "pred")
    truth = _as_images(truth, "truth")
    if tuple(pred.shape) != tuple(truth.shape):
        raise DataError(f"dice: pred has shape {tuple(pred.shape)} but truth has {tuple(truth.shape)}")
    n = pred.shape[0]
    device = None
    if _is_tensor(pred) or _is_tensor(truth):
        import torch

        # Count on the device the tensor lives on, so a GPU batch never visits the host; the other
        # input, if it is an array, moves there one chunk at a time.
        device = pred.device if _is_tensor(pred) else truth.device
        counts = torch.empty((3, n), dtype=torch.int64, device=device)
    else:
        counts = np.empty((3, n), dtype=np.int64)

    per_chunk = max(1, _CHUNK_PIXELS // max(1, pred.shape[1] * pred.shape[2]))
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        p, t = pred[start:stop], truth[start:stop]
        if device is not None:
            p, t = torch.as_tensor(p, device=device), torch.as_tensor(t, device=device)
        p, t = p > threshold, t > TRUTH_THRESHOLD
        if device is not None:
            counts[0, start:stop] = (p & t).sum(dim=(1, 2))
            counts[1, start:stop] = p.sum(dim=(1, 2))
            counts[2, start:stop] = t.sum(dim=(1, 2))
        else:
            counts[0, start:stop] = np.count_nonzero(p & t, axis=(1, 2))
            counts[1, start:stop] = np.count_nonzero(p, axis=(1, 2))
            counts[2, start:stop] = np.count_nonzero(t, axis=(1, 2))
    if device is not None:
        counts = counts.cpu().numpy()

    intersection, pred_size, truth_size = counts.astype(np.float64)
    denominator = pred_size + truth_size
    # A zero denominator means both masks are empty: a correct "no finding", scored 1.
    return np.divide(2.0 * intersection, denominator, out=np.ones(n, dtype=np.float64),
                     where=denominator > 0)


def batch_means(scores: np.ndarray, batch_size: int) -> np.ndarray:
    """Means of consecutive blocks of ``batch_size`` per-image scores (the last block may be shorter).

    MGCA's test Dice is the mean of these (``np.array(dice).mean()`` over the per-batch ``get_dice``
    values, HKU-MedAI/MGCA mgca/models/ssl_segmenter.py:81-88 and 99-121; test loader unshuffled,
    last batch kept, mgca/datasets/data_module.py:53-67).

    Raises:
        DataError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise DataError(f"dice: batch_size must be at least 1, got {batch_size}")
    scores = np.asarray(scores, dtype=np.float64)
    starts = np.arange(0, scores.size, batch_size)
    return np.add.reduceat(scores, starts) / np.diff(np.append(starts, scores.size)) if scores.size else scores


def dice(pred: Any, truth: Any, threshold: float = 0.5) -> float:
    """Mean of :func:`dice_per_image` over all images.

    Every image weighs the same. MGCA instead averages per-batch means, which gives the images of a
    short last batch more weight and makes the score depend on the batch size and on the order of
    the test set; the mean over images has neither dependence, and it is the quantity whose
    bootstrap over images (:func:`vlpbench.metrics.bootstrap.bootstrap_ci`) is meaningful.

    Raises:
        DataError: as :func:`dice_per_image`, or there are no images.

    Example:
        >>> import numpy as np
        >>> dice(np.array([[[1, 0]], [[0, 0]]]), np.array([[[1, 1]], [[0, 0]]]))
        0.8333333333333333
    """
    scores = dice_per_image(pred, truth, threshold)
    if scores.size == 0:
        raise DataError("dice: no images to score (N = 0)")
    return float(scores.mean())
