"""Linear classification on a frozen encoder (MGCA's protocol, which G2D follows).

MGCA's ``SSLFineTuner``: the backbone frozen (no gradients, ``eval()``), a global average pool of its
last feature map, ``SSLEvaluator`` (Flatten, Dropout(0), Linear: a plain linear layer, built as one
here), AdamW on the head only, no scheduler, up to 50 epochs with early stopping on validation loss
(patience 10), and the test set scored with the best-validation weights. BCE-with-logits for binary
and multi-label tasks (RSNA, CheXpert), cross-entropy for multi-class ones (COVIDx). The training
batches drop the last incomplete one as MGCA's loader does; the validation loss covers every
validation image (MGCA's validation loader drops its last incomplete batch too).

Two modes (config ``linear_mode``):

- ``cached`` (default): every image passes the deterministic test-time pipeline once
  (:mod:`vlpbench.protocols.features`), its pooled feature is cached on disk, and the head trains
  on the cached features. A sweep over fractions, seeds or learning rates runs the encoder once.
- ``mgca``: MGCA's training pipeline, each epoch a new random crop (``train_transform: crop``,
  MGCA's ``DataTransforms``) or MGCA's ``Moco2Transform`` (``train_transform: moco2``, CheXpert)
  through the frozen encoder. Validation and test images go through the same deterministic
  pipeline as in ``cached`` mode, so both modes take their features from the cache.

Two head solvers (config ``head_solver``):

- ``sgd`` (default, and the paper profile's): MGCA's AdamW schedule above, one host sync per mini-batch.
- ``lbfgs``: an L2-regularised logistic regression solved to convergence on the whole training set at once,
  its penalty chosen on the validation split from a log grid (:mod:`vlpbench.protocols.logistic`, after
  CLIP's linear probe); cached mode only. No seed enters the fit: every seed of a fraction gives the same head.

Both modes read the images through the resize of config ``resize`` (:mod:`vlpbench.protocols.features`):
``square`` (canonical) or ``pad``, MGCA's ``resize_img``. The cached features are extracted in batches of config
``feature_batch_size``, which sets memory and speed only: ``auto`` (default) fills the device
(:mod:`vlpbench.protocols.batch_fill`; :data:`FEATURE_BATCH` on a CPU), or an integer.

MGCA draws its 1 % and 10 % training subsets with ``df.sample(frac, random_state=42)`` over its
training dataframe (HKU-MedAI/MGCA mgca/datasets/classification_dataset.py:52-53, 165-166, 208-209);
:func:`mgca_fraction` is that draw, for ids given in the dataframe's row order.

Under torchrun (:mod:`vlpbench.distributed`) each rank encodes its block of whole feature batches
and the features are gathered in id order on every rank (so they are bit for bit those of one
process); rank 0 writes the feature cache while the others wait. The head is tiny, so every rank
then trains it identically on all the features (same seeds, same data: the same head and metrics),
and only rank 0 writes the record. In ``mgca`` mode the per-epoch augmented encoder pass is
repeated on every rank: same result, no speed-up.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlpbench import distributed
from vlpbench.errors import ConfigError
from vlpbench.predictions import PROBABILITIES_FILE, write_probabilities
from vlpbench.protocols import SplitIds, base
from vlpbench.protocols.batch_fill import inference_batch, planned_size, probing
from vlpbench.protocols.classification import class_counts, evaluate_classification, metric_names, score_predictions_csv
from vlpbench.protocols.features import (
    Preprocessing,
    RunEncoder,
    cached_features,
    encoder_input,
    extract_features,
    load_images,
    pool_description,
    pooled,
    uint8_batch,
)
from vlpbench.protocols.labels import class_names, label_kind, task_labels
from vlpbench.protocols.logistic import select_logistic
from vlpbench.protocols.runtime import (
    LOWEST_VAL_LOSS,
    EpochLosses,
    FitResult,
    fit,
    precision_of,
    state_copy,
)

log = logging.getLogger("vlpbench")

MODES = ("cached", "mgca")
HEAD_SOLVERS = ("sgd", "lbfgs")
DEFAULT_HEAD_SOLVER = "sgd"
TRAIN_TRANSFORMS = ("crop", "moco2")
# ``feature_batch_size: auto`` on a CPU: images per encoder call when extracting frozen features. No gradients are
# kept, so it can be larger than a training batch; it sets memory and speed only (the features are the same up to
# float32 rounding, whatever the batch).
FEATURE_BATCH = 128

# MGCA Moco2Transform (mgca/datasets/transforms.py), SimCLR's settings.
JITTER_P, BRIGHTNESS, CONTRAST = 0.8, 0.4, 0.4
BLUR_P, BLUR_SIGMA = 0.5, (0.1, 2.0)
FLIP_P = 0.5


# --- labels and metrics, shared with the fine-tuning protocol ----------------------------------------


def check_known(labels: dict[str, np.ndarray]) -> None:
    """ConfigError where a label is -1 (CheXpert's uncertain labels kept by ``label_policy: ignore``):
    the protocols train and score on 0/1 labels only."""
    for part, values in labels.items():
        if (values < 0).any():
            raise ConfigError(f"{int((values < 0).any(axis=-1).sum())} {part} images have uncertain (-1) labels; "
                              "these protocols need 0/1 labels: choose label_policy mgca, ones or zeros")


def check_schedule(config: dict[str, Any]) -> None:
    """ConfigError unless ``batch_size``, ``max_epochs`` and ``patience`` are at least 1."""
    for key in ("batch_size", "max_epochs", "patience"):
        if int(config[key]) < 1:
            raise ConfigError(f"{key}={config[key]!r}: expected an integer of at least 1")


def output_size(kind: str, labels: np.ndarray, classes: list[str]) -> int:
    """Logits of the head: one per class (a single one for a binary task)."""
    return len(classes) if kind == "multiclass" else int(labels.shape[1])


def targets(kind: str, labels: np.ndarray, device: torch.device) -> torch.Tensor:
    """Loss targets: class indices (multi-class) or 0/1 floats (binary, multi-label)."""
    if kind == "multiclass":
        return torch.as_tensor(labels, dtype=torch.long, device=device)
    return torch.as_tensor(labels, dtype=torch.float32, device=device)


def loss_function(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for multi-class tasks, BCE-with-logits otherwise (MGCA)."""
    return F.cross_entropy if kind == "multiclass" else F.binary_cross_entropy_with_logits


def probabilities(kind: str, logits: torch.Tensor) -> np.ndarray:
    """Softmax (multi-class) or sigmoid probabilities as float64 numpy."""
    probs = logits.softmax(dim=1) if kind == "multiclass" else torch.sigmoid(logits)
    return probs.double().cpu().numpy()


def seeded_head(in_features: int, out_features: int, seed: int) -> torch.nn.Linear:
    """The linear head, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(in_features, out_features)


# --- MGCA's training augmentation on batches ---------------------------------------------------------


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandomCrop(size) per image of ``(B, C, S, S)``: an offset drawn for each image."""
    span = images.shape[-1] - size + 1
    tops = torch.randint(0, span, (len(images),), generator=generator).tolist()
    lefts = torch.randint(0, span, (len(images),), generator=generator).tolist()
    return torch.stack([image[:, t:t + size, l:l + size] for image, t, l in zip(images, tops, lefts)])


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A ``(C, H, W)`` image blurred by a Gaussian of standard deviation ``sigma`` pixels, the pixels
    beyond the border taking the edge pixel's value.

    MGCA blurs with PIL ``ImageFilter.GaussianBlur(radius=sigma)`` (HKU-MedAI/MGCA
    mgca/datasets/transforms.py:88-97), PIL's radius being the standard deviation. Pillow approximates
    the Gaussian by three box blurs that repeat the edge pixel outside the image (src/libImaging/
    BoxBlur.c, ``ImagingLineBoxBlur``); here the Gaussian is exact, truncated at 3 sigma, with the same
    edge rule (within 6 grey levels of Pillow for sigma up to 2, the box approximation's own error).
    """
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(image[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def moco2(images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MGCA's Moco2Transform after its RandomCrop, on grey ``(B, 1, h, w)`` images in [0, 1].

    Per image: ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale(0.2), GaussianBlur
    sigma in [0.1, 2] with p 0.5, horizontal flip with p 0.5. The images are grey (MGCA converts
    grey to RGB by repeating it), so saturation, hue and grayscale are exact no-ops and only the
    jitter's brightness and contrast, in a random order as torchvision applies them, change pixels.
    """
    out = []
    for image in images01:
        draw = torch.rand(8, generator=generator).tolist()
        if draw[0] < JITTER_P:
            brightness = 1 + BRIGHTNESS * (2 * draw[1] - 1)
            contrast = 1 + CONTRAST * (2 * draw[2] - 1)
            steps = [("b", brightness), ("c", contrast)]
            for name, factor in steps if draw[3] < 0.5 else steps[::-1]:
                if name == "b":
                    image = (image * factor).clamp(0, 1)
                else:
                    image = (factor * image + (1 - factor) * image.mean()).clamp(0, 1)
        if draw[4] < BLUR_P:
            image = gaussian_blur(image, BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * draw[5])
        if draw[6] < FLIP_P:
            image = image.flip(-1)
        out.append(image)
    return torch.stack(out)


# --- MGCA's fraction draw ---------------------------------------------------------------------------

MGCA_FRACTION_SEED = 42  # HKU-MedAI/MGCA mgca/datasets/classification_dataset.py:53, 166, 209


def mgca_fraction_positions(n: int, fraction: float, seed: int = MGCA_FRACTION_SEED) -> np.ndarray:
    """Row positions that ``df.sample(frac=fraction, random_state=seed)`` takes from ``n`` rows, in
    the order pandas returns them; all ``n`` rows, in order, for ``fraction`` 1 (MGCA samples only
    when ``data_pct != 1``).

    pandas' rule, the same in the 1.x releases MGCA ran and in 3.x: ``size = round(frac * n)``
    (Python's round, half to even; ``NDFrame.sample`` in pandas/core/generic.py), the seed made a
    ``numpy.random.RandomState`` (pandas/core/common.py ``random_state``), and
    ``RandomState.choice(n, size, replace=False)`` without weights (pandas/core/sample.py ``sample``),
    which numpy computes as ``permutation(n)[:size]`` (numpy/random/mtrand.pyx ``choice``). The legacy
    RandomState stream is frozen across numpy versions, so the draw is a fixed function of ``n``.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(n)
    return np.random.RandomState(seed).permutation(n)[:round(fraction * n)]


def mgca_fraction(ids: list[str], fraction: float, seed: int = MGCA_FRACTION_SEED) -> list[str]:
    """MGCA's training subset of ``ids`` (``df.sample(frac=fraction, random_state=42)``).

    ``ids`` must be in the row order of MGCA's training dataframe: MGCA's preprocessed train CSV as
    written (CheXpert also keeps only its frontal rows first, classification_dataset.py:48-49); any
    other order gives another subset of the same size.
    """
    return [ids[k] for k in mgca_fraction_positions(len(ids), fraction, seed)]


# --- the protocol ------------------------------------------------------------------------------------


def run_linear_task(adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int,
                    device: torch.device, progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
    """Train a linear head on ``split.train`` over the frozen encoder, early-stop on ``split.val``,
    score ``split.test`` (entry point of protocol ``linear``).

    Returns the outcome dict of the protocol contract; ``training`` records the mode, the head solver and
    its fit (``sgd``: the epochs and loss curves; ``lbfgs``: the penalty ``l2`` chosen and each grid value's
    validation loss and iterations) and each part's feature-cache state (``hit``, ``miss`` or ``partial``).

    Raises:
        ConfigError: an unknown ``linear_mode``, ``train_transform``, ``head_solver`` or ``label_kind``,
            ``head_solver: lbfgs`` outside cached mode, or a bad image size.
        DataError: fewer training images than one batch (one image for ``lbfgs``), or no validation or
            test images.
    """
    started = time.perf_counter()
    kind = label_kind(config)
    mode, transform = config["linear_mode"], config["train_transform"]
    if mode not in MODES:
        raise ConfigError(f"linear_mode={mode!r}: expected one of {', '.join(MODES)}")
    if transform not in TRAIN_TRANSFORMS:
        raise ConfigError(f"train_transform={transform!r}: expected one of {', '.join(TRAIN_TRANSFORMS)}")
    solver = head_solver(config)
    if solver == "lbfgs" and mode != "cached":
        raise ConfigError(f"head_solver=lbfgs fits on fixed features: it needs linear_mode=cached, not {mode!r}")
    pre = Preprocessing.from_config(config)
    check_schedule(config)
    batch_size = int(config["batch_size"])
    split.require_training(batch_size if solver == "sgd" else 1)
    classes = class_names(config)
    labels = {part: task_labels(source, getattr(split, part), config) for part in ("train", "val", "test")}
    check_known(labels)
    log.info("linear (%s, %s head): %d train, %d val, %d test images; %s over %d class(es)", mode, solver,
             len(split.train), len(split.val), len(split.test), kind, len(classes))

    encoder = RunEncoder(adapter, device, precision_of(config))  # built once, for every part that needs it
    # Extraction batches sized to fill the device (vlpbench.protocols.batch_fill), chosen if an image needs one.
    extraction = inference_batch(config, "feature_batch_size", device=device, fallback=FEATURE_BATCH,
                                 limit=max(len(split.train), len(split.val), len(split.test)),
                                 probe=lambda count: _probe(encoder(), pre, count, device))

    def features(part: str):
        return cached_features(adapter, source, getattr(split, part), pre, batch_size=extraction,
                               device=device, progress=progress, desc=part, precision=precision_of(config),
                               encoder=encoder)

    val, test = features("val"), features("test")
    cache = {"val": val.cache_state(), "test": test.cache_state()}
    if mode == "cached":
        train = features("train")
        cache["train"] = train.cache_state()
        train_values = torch.from_numpy(train.values).to(device)

        def batches(index: torch.Tensor) -> torch.Tensor:
            return train_values[index]
    else:
        cache["train"] = "not used (mgca mode runs the encoder on augmented images)"
        batches = _augmented_batches(encoder, source, split.train, pre, transform, seed, device, progress)
    t_data = time.perf_counter()

    outputs = output_size(kind, labels["train"], classes)
    val_values = torch.from_numpy(val.values).to(device)
    train_targets, val_targets = targets(kind, labels["train"], device), targets(kind, labels["val"], device)
    if solver == "lbfgs":
        solved = select_logistic(kind, train_values, train_targets, val_values, val_targets, outputs)
        head = seeded_head(val.values.shape[1], outputs, seed).to(device)  # the global RNG left alone
        with torch.no_grad():
            head.weight.copy_(solved.weight)
            head.bias.copy_(solved.bias)
        summary = {"l2": solved.l2, "best_val_loss": solved.val_loss, "l2_grid": solved.grid}
    else:
        head = seeded_head(val.values.shape[1], outputs, seed).to(device)
        fitted = _fit(head, batches, train_targets, val_values, val_targets, loss_function(kind), config, seed,
                      progress)
        summary = {"epochs": fitted.epochs, "best_epoch": fitted.best_epoch, "best_val_loss": fitted.best_value,
                   "history": fitted.history}
    t_train = time.perf_counter()

    with torch.no_grad():
        probs = probabilities(kind, head(torch.from_numpy(test.values).to(device)))
    if predictions is not None and distributed.is_main():
        write_probabilities(predictions, classes, dict(zip(split.test, probs)))
    evaluated = evaluate_classification(kind, classes, split.test, labels["test"], probs,
                                        metric_names(config, default_metrics(kind)), thresholds=None,
                                        n_resamples=int(config["bootstrap_resamples"]), seed=seed)
    t_test = time.perf_counter()
    return {
        **evaluated,
        "n": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
              "test_per_class": class_counts(kind, labels["test"], classes)},
        "training": {"mode": mode, "head_solver": solver, "pool": pool_description(adapter),
                     "feature_cache": cache, "feature_batch": extraction.describe(),
                     "world_size": distributed.world_size(), **summary},
        "timing": {"data_s": t_data - started, "train_s": t_train - t_data, "test_s": t_test - t_train,
                   "total_s": t_test - started, "features_val_s": val.seconds, "features_test_s": test.seconds},
    }


def feature_batch(config: dict[str, Any]) -> int:
    """The images per encoder call of a feature extraction on a CPU: ``config["feature_batch_size"]``, or
    :data:`FEATURE_BATCH` where it is ``auto`` or absent (what ``auto`` gives on a CPU;
    :mod:`vlpbench.protocols.batch_fill`).

    Raises:
        ConfigError: neither an integer of at least 1 nor ``auto``.
    """
    return planned_size(config, "feature_batch_size", FEATURE_BATCH)


def _probe(encoder: torch.nn.Module, pre: Preprocessing, count: int, device: torch.device) -> None:
    """A feature extraction of ``count`` blank images (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    with probing(encoder):
        extract_features(encoder, np.zeros((count, pre.resize, pre.resize), dtype=np.uint8), pre,
                         batch_size=count, device=device)


def head_solver(config: dict[str, Any]) -> str:
    """``config["head_solver"]`` (``sgd`` where the task has no such option), checked.

    Raises:
        ConfigError: not one of :data:`HEAD_SOLVERS`, with the closest one where there is one.
    """
    solver = config.get("head_solver", DEFAULT_HEAD_SOLVER)
    if solver not in HEAD_SOLVERS:
        close = difflib.get_close_matches(solver, HEAD_SOLVERS, n=1) if isinstance(solver, str) else []
        raise ConfigError(f"head_solver={solver!r}: expected one of {', '.join(HEAD_SOLVERS)}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    return solver


def default_metrics(kind: str) -> list[str]:
    """The metrics of a linear-probe or fine-tuning task without a ``metrics`` option: top-1 accuracy and the
    one-vs-rest AUC for a multi-class task, the AUC (macro and per class) otherwise."""
    return ["acc", "auc"] if kind == "multiclass" else ["auc"]


class LinearProtocol(base.Protocol):
    """Linear head on frozen pooled features (module docstring)."""

    name = "linear"
    table_group = "cls"
    prediction_file = PROBABILITIES_FILE
    prediction_files = f"{PROBABILITIES_FILE}: image_id and one probability column per class, one row per test image"

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """:func:`run_linear_task`."""
        return run_linear_task(adapter, source, split, config, seed=seed, device=device, progress=progress,
                               predictions=predictions)

    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """The test rows of a predictions CSV, evaluated as ``run`` does (:mod:`vlpbench.protocols.classification`)."""
        return score_predictions_csv(self.prediction_path(Path(predictions)), source, split.test, config,
                                     default_metrics=default_metrics(label_kind(config)), seed=seed,
                                     threshold_images=(source, list(split.val), "the split's val part"))


PROTOCOL = LinearProtocol()


def _augmented_batches(run_encoder: RunEncoder, source, ids: list[str], pre: Preprocessing, transform: str, seed: int,
                       device: torch.device, progress: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """MGCA mode: pooled features of freshly augmented training images, through the run's frozen encoder."""
    images = load_images(source, ids, pre.resize, progress, pre.cache_method)
    encoder = run_encoder()
    generator = torch.Generator().manual_seed(seed + 1)  # the augmentation's own stream

    def batch(index: torch.Tensor) -> torch.Tensor:
        order = np.sort(index.cpu().numpy())  # memory-map reads in file order
        x = random_crop(uint8_batch(images, order, torch.device("cpu")), pre.crop, generator)
        if transform == "moco2":
            x = moco2(x, generator)
        with torch.no_grad():
            return pooled(encoder, encoder_input(x.to(device), pre))[_restore(index, order)]

    return batch


def _restore(index: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """Positions in ``order`` (sorted) of each entry of ``index``, to return rows in ``index`` order."""
    return torch.from_numpy(np.searchsorted(order, index.cpu().numpy()))


def _fit(head: torch.nn.Module, batches: Callable[[torch.Tensor], torch.Tensor], train_targets: torch.Tensor,
         val_features: torch.Tensor, val_targets: torch.Tensor, loss_fn, config: dict[str, Any], seed: int,
         progress: bool) -> FitResult:
    """MGCA's loop: shuffled batches (last incomplete one dropped), AdamW, early stopping on val loss
    (the first epoch, then any strictly lower one); ``head`` ends with the best epoch's weights."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=config["lr"], betas=tuple(config["betas"]),
                                  weight_decay=config["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    batch_size, n = int(config["batch_size"]), len(train_targets)

    def train_epoch(epoch: int) -> float:
        head.train()
        order = torch.randperm(n, generator=generator).to(train_targets.device)
        steps = n // batch_size
        losses = EpochLosses()  # read once per epoch: a step of the head is far shorter than a host round trip
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            loss = loss_fn(head(batches(index)), train_targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.add(loss)
        return losses.total(epoch) / steps

    def validate(epoch: int) -> dict[str, float]:
        head.eval()
        with torch.no_grad():
            return {"val_loss": loss_fn(head(val_features), val_targets).item()}

    return fit(train_epoch, validate, max_epochs=int(config["max_epochs"]), patience=int(config["patience"]),
               select=LOWEST_VAL_LOSS, snapshot=lambda: state_copy(head.state_dict()), restore=head.load_state_dict,
               progress=progress)
