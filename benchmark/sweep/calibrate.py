"""Time the protocols' own steps on this machine's device: the calibration of ``vlpbench sweep --plan``.

For each distinct :class:`~vlpbench.sweep.workload.Step` (model, protocol, kind of step, batch size, input
size, precision) the protocol's model is built as a run builds it, from the adapter ``vlpbench run`` builds
from the checkpoint, and fed random inputs of the protocol's input shape: one warm-up batch (allocations,
cuDNN's algorithm search, lazy initialisation), then ``batches`` timed batches, the device synchronised at
both ends. The steps are the protocols' own functions where they take a split part in memory (segmentation's
``_train_epoch`` / ``_evaluate_loss``, detection's ``PartFeatures`` / ``_train_epoch`` / ``_predict``, the
linear probe's ``extract_features`` / ``_fit``, fine-tuning's ``train_epoch`` / ``_predict``, the adapters'
``zero_shot_scores``, ``grounding_maps``, ``embed_image`` and ``embed_text``).

On a GPU each step's peak allocated device memory is read too (the model and optimiser state included), for the
plan's memory per run.

What random inputs leave out: loading batches from the image cache (memory-mapped reads), segmentation's
full-size ``pipeline: mgca`` augmentation (timed as the cached pipeline's), the linear probe's ``mgca``-mode
crops and colour jitter (timed as the centre crop), and the scoring after the forward passes (Dice at native
resolution, mAP, AUC, bootstrap).
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vlpbench.errors import VlpbenchError
from vlpbench.sweep.spec import ModelSpec
from vlpbench.sweep.workload import Step, StepTiming, Unknown

log = logging.getLogger("vlpbench")

# What a report text of the retrieval candidates looks like to a text encoder: about 50 words.
REPORT_TEXT = ("Frontal and lateral views of the chest. The heart size is within normal limits and the mediastinal "
               "contours are unremarkable. There is no focal consolidation, pleural effusion or pneumothorax. "
               "Mild degenerative changes of the thoracic spine. No acute cardiopulmonary process.")

# A built model's batches: (step, n) -> a call that runs n batches of the step.
Prepare = Callable[[Step, int], Callable[[], Any]]


class Adapters:
    """Each model's adapter, built once as ``vlpbench run`` builds it (``build_adapter``); an adapter that
    cannot be built raises :class:`Unknown` with the reason, every time it is asked for."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __call__(self, model: ModelSpec) -> Any:
        from vlpbench.adapters import build_adapter

        if model.label not in self._built:
            try:
                self._built[model.label] = build_adapter(model.adapter, model.checkpoint, **model.options)
            except VlpbenchError as error:
                self._built[model.label] = Unknown(f"adapter {model.adapter}: {error}")
        built = self._built[model.label]
        if isinstance(built, Unknown):
            raise built
        return built


class Calibrator:
    """Times steps on ``device`` with ``threads`` torch threads (the runs' own count): call it with a
    :class:`Step` for its :class:`StepTiming`. A step that cannot run (the adapter cannot be built or lacks a
    capability, the device runs out of memory, the model does not take the input) raises :class:`Unknown` with
    the reason: the run would fail the same way. ``seconds``: the wall time spent calibrating so far.

    The steps of one model, protocol, input size, precision and variant (a run's training and evaluation
    steps) share one built model: the last one built is kept for the next step.
    """

    def __init__(self, device: torch.device, *, batches: int, threads: int | None, adapters: Adapters) -> None:
        self.device, self.batches, self.threads, self.adapters = device, batches, threads, adapters
        self.seconds = 0.0
        self._built: tuple[tuple, tuple[Prepare, tuple]] | None = None

    def __call__(self, step: Step) -> StepTiming:
        from vlpbench.threads import torch_threads

        started = time.perf_counter()
        try:
            with torch_threads(self.threads):
                return self._time(step)
        except Unknown:
            raise
        except Exception as error:  # the run would fail the same way: the plan says so and goes on
            log.debug("calibrating %s failed", step.describe(), exc_info=True)
            first = str(error).splitlines()[0] if str(error) else ""
            why = first if isinstance(error, VlpbenchError) else f"{type(error).__name__}: {first}"
            raise Unknown(f"{step.describe()} does not run: {why}") from error
        finally:
            self.seconds += time.perf_counter() - started

    def _time(self, step: Step) -> StepTiming:
        log.info("calibrating %s", step.describe())
        key = (step.model.label, step.protocol, step.image_size, step.precision, step.variant)
        if self._built is None or self._built[0] != key:
            self._built = None  # frees the last model before the next is built
            self._built = key, BUILDERS[step.protocol](step, self.adapters(step.model), self.device)
        prepare, shapes = self._built[1]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        prepare(step, 1)()  # warm-up
        timed = prepare(step, self.batches)
        _sync(self.device)
        started = time.perf_counter()
        timed()
        _sync(self.device)
        seconds = (time.perf_counter() - started) / self.batches
        return StepTiming(seconds, shapes, int(torch.cuda.max_memory_allocated(self.device)) if cuda else None)


def device_name(device: torch.device, threads: int | None = None) -> str:
    """``"cuda (NVIDIA H100 80GB HBM3)"`` or ``"cpu (AMD EPYC 7763, 4 threads)"``: the device a plan was
    calibrated on; ``threads``: the runs' torch threads on a CPU (None: torch's count now)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    count = threads if threads is not None else torch.get_num_threads()
    return f"cpu ({_cpu_model()}, {count} thread{'s' if count != 1 else ''})"


def decode_seconds(reader: Any, ids: list[str], cache: tuple) -> float:
    """Seconds per image to decode ``ids`` with ``reader.image`` and resize them as the image cache stores them
    at ``cache`` (size, resize rule); a ``"full"`` size is not resized."""
    from vlpbench.data.resize import resize_method

    size, method = cache[0], cache[1]
    resize = resize_method(method)
    started = time.perf_counter()
    for image_id in ids:
        pixels = reader.image(image_id)
        if size != "full":
            resize(pixels, int(size))
    return (time.perf_counter() - started) / len(ids)


# --- random split parts --------------------------------------------------------------------------------------


class _Part:
    """``n`` random grey images of side ``size`` with what the protocols' epoch functions read of a split part:
    segmentation's masks (``full``: not at full size), detection's targets, truth boxes, their class labels
    (class 0) and scales (one box per image, in input pixels)."""

    def __init__(self, n: int, size: int) -> None:
        generator = torch.Generator().manual_seed(n)
        self.ids = [str(i) for i in range(n)]
        self.images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=generator)
        self.masks = (torch.rand(n, size, size, generator=generator) < 0.5).float()
        self.full = None
        box = [0.25 * size, 0.3 * size, 0.6 * size, 0.7 * size]
        self.targets = [torch.tensor([box], dtype=torch.float32) for _ in range(n)]
        self.truths = [np.array([box], dtype=np.float64) for _ in range(n)]
        self.truth_labels = [np.zeros(1, dtype=np.int64) for _ in range(n)]
        self.target_labels = [torch.from_numpy(labels) for labels in self.truth_labels]
        self.scales = np.ones((n, 2))

    def __len__(self) -> int:
        return len(self.ids)


def _pixels(n: int, size: int) -> torch.Tensor:
    """``n`` random uint8 images ``(n, 1, size, size)``, as the inference protocols read them from the cache."""
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def _optimizer(parameters, config: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=config["lr"], betas=tuple(config["betas"]),
                             weight_decay=config["weight_decay"])


# --- one builder per protocol: the built model's Prepare, and detection's feature shapes ----------------------------


def _segmentation(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.protocols import segmentation as seg
    from vlpbench.protocols.runtime import freeze_backbone, prepare_model
    from vlpbench.protocols.segmentation_finetune import parameter_groups, unfreeze_encoder

    config = dict(step.config)
    model = seg.UNet(adapter.encoder(), adapter.encoder_name, seg.option(config, "decoder"))
    freeze_backbone(model.unet.encoder)
    unfreeze_encoder(model.unet.encoder, config)
    prepare_model(model, device, step.precision)
    normalize, loss = seg._normalizer(config["mean"], config["std"]), seg._loss(config)
    optimizer = _optimizer(parameter_groups(model, config), config)
    generator = torch.Generator().manual_seed(0)

    def prepare(step: Step, n: int) -> Callable[[], Any]:
        part = _Part(n * step.batch_size, step.image_size)
        if step.kind == "eval":
            return _bind(seg._evaluate_loss, model, part, loss, normalize, step.batch_size, device)
        return _bind(seg._train_epoch, model, model, part, optimizer, loss, normalize, dict(step.config), generator,
                     device, 1)
    return prepare, ()


def _detection(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.protocols import detection as det
    from vlpbench.protocols.runtime import prepare_model

    config, size = dict(step.config), step.image_size
    encoder = adapter.encoder().to(device)
    model = det.Detector(encoder, det.deepest_stages(encoder, size), int(config["neck_width"])).to(device)
    for part in (model.encoder, model.head):
        prepare_model(part, device, step.precision)
    anchors = det.scaled_anchors(size)
    optimizer = _optimizer(model.head.parameters(), config)
    generator = torch.Generator().manual_seed(0)

    def prepare(step: Step, n: int) -> Callable[[], Any]:
        config, batch, part = dict(step.config), step.batch_size, _Part(n * step.batch_size, size)

        def kept() -> Any:
            return det.PartFeatures(model, part, config, device, storage="memory", batch_size=batch, progress=False,
                                    desc="calibration")

        if step.kind == "features":
            return kept
        features = kept()  # the head's steps read the features a run keeps (or computes: timed as features)
        if step.kind == "eval":
            return _bind(det._predict, model, part, features, anchors, config, batch)
        return _bind(det._train_epoch, model, model.head, part, features, optimizer, anchors, config, batch,
                     generator, 1)
    return prepare, tuple(det._feature_shapes(model, size, device))


def _linear(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.protocols import linear as lin
    from vlpbench.protocols.features import Preprocessing, extract_features, pooled_channels
    from vlpbench.protocols.labels import class_names, label_kind
    from vlpbench.protocols.runtime import prepare_model

    encoder = adapter.encoder()
    if step.kind == "features":
        prepare_model(encoder, device, step.precision)

        def features(step: Step, n: int) -> Callable[[], Any]:
            pre = Preprocessing.from_config(dict(step.config))
            return _bind(extract_features, encoder, _pixels(n * step.batch_size, pre.resize)[:, 0].numpy(), pre,
                         batch_size=step.batch_size, device=device)
        return features, ()
    width, outputs = pooled_channels(encoder), len(class_names(dict(step.config)))
    head = lin.seeded_head(width, outputs, 0).to(device)

    def fit(step: Step, n: int) -> Callable[[], Any]:
        kind, rows = label_kind(dict(step.config)), n * step.batch_size + 1  # the last row: the validation set
        features = torch.randn(rows, width, device=device)
        targets = lin.targets(kind, _labels(kind, rows, outputs), device)
        return _bind(lin._fit, head, lambda index: features[index], targets[:-1], features[-1:], targets[-1:],
                     lin.loss_function(kind), {**step.config, "max_epochs": 1, "patience": 1}, 0, False)
    return fit, ()


def _finetune(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.protocols import finetune as ft
    from vlpbench.protocols import linear as lin
    from vlpbench.protocols.features import channel_values, normalize, pooled_channels
    from vlpbench.protocols.labels import class_names, label_kind
    from vlpbench.protocols.runtime import neck_of, prepare_model

    config = dict(step.config)
    kind, outputs = label_kind(config), len(class_names(config))
    encoder = adapter.encoder()
    if (neck := neck_of(encoder)) is not None:
        neck.requires_grad_(False)
    model = prepare_model(ft.Classifier(encoder, lin.seeded_head(pooled_channels(encoder), outputs, 0)), device,
                          step.precision)
    mean, std = channel_values(config["mean"], "mean"), channel_values(config["std"], "std")
    optimizer, loss_fn = _optimizer(model.parameters(), config), lin.loss_function(kind)
    generator = torch.Generator().manual_seed(0)

    def inputs(x01: torch.Tensor) -> torch.Tensor:
        return normalize(x01, mean, std)

    def prepare(step: Step, n: int) -> Callable[[], Any]:
        batch = step.batch_size
        images = _pixels(n * batch, step.image_size)[:, 0].numpy()
        if step.kind == "eval":
            return _bind(ft._predict, model, images, inputs, batch, device)
        targets = lin.targets(kind, _labels(kind, n * batch, outputs), device)
        return _bind(ft.train_epoch, model, model, images, targets, optimizer=optimizer, loss_fn=loss_fn,
                     inputs=inputs, batch_size=batch, augment_images=bool(step.config["augment"]),
                     generator=generator, device=device, epoch=1)
    return prepare, ()


def _zero_shot(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.protocols.labels import class_names
    from vlpbench.protocols.zero_shot import class_prompts, prompt_templates

    config = dict(step.config)
    prompts, templates = class_prompts(config, class_names(config)), prompt_templates(config)

    def score(batch: torch.Tensor) -> Any:
        return adapter.zero_shot_scores(adapter.preprocess(batch), prompts, templates).detach().cpu()

    return _inference(device, score), ()


def _grounding(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.data.ms_cxr import CATEGORIES

    config = dict(step.config)
    if config["queries"] == "class":
        texts = [config["prompt"]]
    elif adapter.free_text:  # about one phrase per image: a batch asks for as many texts
        texts = [f"{category.lower()} in the right lower zone ({k})" for k, category in
                 zip(range(step.batch_size), CATEGORIES * step.batch_size)]
    else:  # a fixed-vocabulary model gets each phrase's category
        texts = list(CATEGORIES)

    def maps(batch: torch.Tensor) -> Any:
        return adapter.grounding_maps(adapter.preprocess(batch), texts).detach().float().cpu()

    return _inference(device, maps), ()


def _retrieval(step: Step, adapter: Any, device: torch.device) -> tuple[Prepare, tuple]:
    from vlpbench.protocols.labels import class_names
    from vlpbench.protocols.retrieval_sets import expand_prompt_grid
    from vlpbench.protocols.runtime import autocast

    if step.kind == "embed_image":
        return _inference(device, lambda images: adapter.embed_image(adapter.preprocess(images)).cpu()), ()
    config = dict(step.config)
    if config.get("candidates") == "class_prompts":
        prompts = [prompt for _, prompt in expand_prompt_grid(config.get("prompt_grid"), class_names(config))]
    else:
        prompts = [REPORT_TEXT]

    def embed(step: Step, n: int) -> Callable[[], Any]:
        texts = [prompts[k % len(prompts)] for k in range(step.batch_size)]

        def run() -> None:
            with torch.inference_mode(), autocast(device, step.precision):
                for _ in range(n):
                    adapter.embed_text(texts).cpu()
        return run
    return embed, ()


BUILDERS: dict[str, Callable[[Step, Any, torch.device], tuple[Prepare, tuple]]] = {
    "segmentation": _segmentation, "detection": _detection, "linear": _linear, "finetune": _finetune,
    "zero_shot": _zero_shot, "grounding": _grounding, "retrieval": _retrieval}


def _inference(device: torch.device, forward: Callable[[torch.Tensor], Any]) -> Prepare:
    """Batches of random uint8 images through ``forward`` under inference mode and the run's precision, as the
    inference protocols run their batches."""
    from vlpbench.protocols.runtime import autocast

    def prepare(step: Step, n: int) -> Callable[[], Any]:
        pixels = _pixels(n * step.batch_size, step.image_size)

        def run() -> None:
            with torch.inference_mode(), autocast(device, step.precision):
                for batch in pixels.split(step.batch_size):
                    forward(batch.to(device))
        return run
    return prepare


def _labels(kind: str, n: int, outputs: int) -> np.ndarray:
    """Random labels of ``n`` images in the protocol's form (class indices, or 0/1 per class)."""
    rng = np.random.default_rng(n)
    return rng.integers(0, outputs, n) if kind == "multiclass" else rng.integers(0, 2, (n, outputs))


def _bind(function: Callable, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: function(*args, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
