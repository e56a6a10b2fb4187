"""What one run of a sweep will compute: its images per split part, as its protocol selects them, and how many
batches of each kind of step it runs (``vlpbench sweep --plan``).

The counts come from the protocols' own rules (their functions, not copies): segmentation's
``balance_negatives`` / ``mgca_train_subset``, detection's ``fraction_settings`` and ``feature_storage``, the
linear probe's ``Preprocessing`` and ``feature_batch``, grounding's ``grounding_queries``, retrieval's
``retrieval_set``; the split parts a run gets are :func:`vlpbench.api.run_parts`'s. Without the data
folder the committed split files give the ids (a protocol that selects by label reads the split's label
column); a split derived from the user's files is counted by its sizes on the dataset's official release
where the dataset declares them (``DatasetSpec.release_sizes``: counts, no labels); otherwise, or where a
selection needs labels beyond that, it cannot be counted then, and :class:`Unknown` says why.

Counts are upper bounds where training stops early: every epoch up to ``max_epochs`` is counted; a last
incomplete batch counts as a full one. Inference passes whose batch is ``auto`` are counted at the batch it
gives on a CPU (:func:`vlpbench.protocols.batch_fill.planned_size`); a GPU's is at least as large where memory
allows, so those passes are then upper bounds too.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from vlpbench.sweep.plan import Run
from vlpbench.sweep.spec import ModelSpec

SPLIT_ROLES = ("train", "val", "test")


class Unknown(Exception):
    """A run's work cannot be counted or timed; the message says why."""


@dataclass(frozen=True, eq=False)
class Step:
    """One kind of batch a protocol runs, timed once per :attr:`key` on the device (:mod:`vlpbench.sweep.calibrate`).

    ``kind``: ``train`` (forward and backward of the trainable part, optimizer step), ``eval`` (forward and
    loss or predictions), ``features`` (the frozen encoder's forward), ``head`` (a linear head's training
    step on features), ``score`` (zero-shot scores), ``maps`` (grounding heat maps), ``embed_image`` /
    ``embed_text`` (retrieval). ``image_size``: the side of the protocol's input (0 for a step on features or
    texts). ``variant``: the other task options that change what the step computes. ``config``: the task
    config the step is built from.
    """

    model: ModelSpec
    protocol: str
    kind: str
    batch_size: int
    image_size: int
    precision: str
    variant: tuple = ()
    config: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> tuple:
        """Steps with equal keys take the same time: (model, protocol, kind, batch size, image size,
        precision, variant)."""
        return (self.model.label, self.protocol, self.kind, self.batch_size, self.image_size, self.precision,
                self.variant)

    def describe(self) -> str:
        """``"g2d segmentation train, batch 8 at 224 px, fp32"``."""
        shape = f" at {self.image_size} px" if self.image_size else ""
        return f"{self.model.label} {self.protocol} {self.kind}, batch {self.batch_size}{shape}, {self.precision}"


@dataclass(frozen=True)
class StepTiming:
    """Seconds per batch of a step; ``shapes``: for detection's ``features``, the per-image shapes of the
    frozen part's output (what keeping a part's features costs, ``detection.feature_storage``);
    ``peak_bytes``: the device memory allocated at the step's peak, the model and optimiser state included
    (None: not measured, as on a CPU)."""

    seconds: float
    shapes: tuple = ()
    peak_bytes: int | None = None


Measure = Callable[[Step], StepTiming]


@dataclass(frozen=True)
class Work:
    """``batches`` batches of ``step``. ``shared``: the same work of any run of the sweep (features cached on
    disk), done by the first run that needs it."""

    what: str
    step: Step
    batches: int
    shared: tuple | None = None


@dataclass(frozen=True)
class ImageRead:
    """Images a run decodes into the image cache, unless an earlier run did: ``ids`` of ``dataset`` at
    ``cache`` (the cache's size and resize rule, which key its entries), read by ``reader`` (None without
    the data folder)."""

    dataset: str
    cache: tuple
    ids: tuple[str, ...]
    reader: Any = field(default=None, compare=False, repr=False)


@dataclass
class Workload:
    """A run's images per role as the protocol uses them, ``max_epochs`` (None where nothing trains), its
    work and its image reads; ``kept_bytes``: device memory it holds besides its steps' own (detection's
    features kept on the device)."""

    images: dict[str, int]
    epochs: int | None
    work: list[Work]
    reads: list[ImageRead]
    kept_bytes: int = 0


@dataclass
class RunContext:
    """What counting a run needs: the run, its task and resolved config, the dataset reader (None without the
    data folder, ``missing`` saying why), the ids of each role (:func:`vlpbench.api.run_parts`; a role is
    absent where it cannot be known without the data folder), a label reader for protocols that select by
    label (the reader, or the split's label column), the adapter (built on first use), the precision, and
    ``release_sizes``: the split whose declared sizes on the official release the ids stand for (placeholders,
    without labels; empty where they are the split's own ids)."""

    run: Run
    task: Any
    config: dict[str, Any]
    source: Any | None
    missing: str
    parts: dict[str, list[str]]
    labels: Any | None
    adapter: Callable[[], Any]
    precision: str
    release_sizes: str = ""

    def ids(self, role: str) -> list[str]:
        """The ids of ``role``; :class:`Unknown` where only the data folder would give them."""
        if role not in self.parts:
            raise Unknown(f"the {self.task.dataset} {role} images come from the data folder: {self.missing}")
        return self.parts[role]

    def reader(self, what: str) -> Any:
        """The dataset reader; :class:`Unknown` naming ``what`` needs it where there is none."""
        if self.source is None:
            raise Unknown(f"{what} needs the {self.task.dataset} data folder: {self.missing}")
        return self.source

    def step(self, kind: str, batch_size: int, image_size: int, variant: tuple = ()) -> Step:
        """A step of this run's model and protocol."""
        return Step(self.run.model, self.task.protocol, kind, int(batch_size), int(image_size), self.precision,
                    variant, self.config)

    def read(self, ids: list[str], *cache: Any, dataset: str | None = None, reader: Any = None) -> ImageRead:
        """Images ``ids`` decoded into the cache at ``cache`` (size, resize rule), by ``reader`` (default: the
        run's dataset reader)."""
        return ImageRead(dataset or self.task.dataset, tuple(cache), tuple(ids), reader or self.source)


def training_batches(n: int, batch_size: int) -> int:
    """Training batches per epoch of ``n`` images: the last incomplete one is dropped (as every training loop
    does); :class:`Unknown` where there is not one, since the run then stops before training."""
    if n < batch_size:
        raise Unknown(f"only {n} training images for batch size {batch_size}: the run stops before training")
    return n // batch_size


def batches(n: int, batch_size: int) -> int:
    """Inference batches of ``n`` images, a last incomplete one counted as a full one."""
    return math.ceil(n / batch_size)


def ids_digest(ids: list[str]) -> str:
    """What identifies a list of ids in a shared key (the feature cache keys features by their ids too)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


# --- the protocols -----------------------------------------------------------------------------------------

# Options of each protocol that change the cost of its steps (beyond batch size, input size and precision).
SEGMENTATION_VARIANT = ("decoder", "train_encoder", "freeze_bn", "loss", "augment", "augmentation",
                        "decay_bias_and_norm")


def segmentation(ctx: RunContext, measure: Measure) -> Workload:
    """U-Net on the encoder, which runs in every step: training batches and the validation pass every epoch,
    then the test pass (:mod:`vlpbench.protocols.segmentation`)."""
    from vlpbench.protocols.batch_fill import planned_size
    from vlpbench.protocols.segmentation import balance_negatives, check_options, mgca_train_subset, option

    config = ctx.config
    check_options(config)
    run = ctx.run
    if option(config, "train_subset") == "mgca":
        labels = _labels(ctx, "train_subset=mgca")
        train = mgca_train_subset(ctx.ids("train_all"), labels.label, run.frac, bool(config["balance_negatives"]),
                                  run.seed)
    else:
        train = ctx.ids("train")
        if config["balance_negatives"]:
            train = balance_negatives(train, _labels(ctx, "balance_negatives").label, np.random.default_rng(run.seed))
    val, test = ctx.ids("val"), ctx.ids("test")
    size, batch, epochs = int(config["image_size"]), int(config["batch_size"]), int(config["max_epochs"])
    evaluated = planned_size(config, "eval_batch_size", batch)
    variant = tuple(config.get(key) for key in SEGMENTATION_VARIANT)
    train_step, eval_step = ctx.step("train", batch, size, variant), ctx.step("eval", evaluated, size, variant)
    mgca = option(config, "pipeline") == "mgca"
    method = "linear" if mgca else "antialias"
    return Workload(
        images={"train": len(train), "val": len(val), "test": len(test)}, epochs=epochs,
        work=[Work("training", train_step, epochs * training_batches(len(train), batch)),
              Work("validation", eval_step, epochs * batches(len(val), evaluated)),
              Work("test", eval_step, batches(len(test), evaluated))],
        # pipeline mgca augments training images at their full size before the resize
        reads=[ctx.read(train, "full" if mgca and config["augment"] else size, method),
               ctx.read(val + test, size, method)])


def detection(ctx: RunContext, measure: Measure) -> Workload:
    """YOLOv3 head on frozen features: the training and validation parts' features are computed once per run
    with ``freeze_bn`` (kept in memory or in a file, ``detection.feature_storage``), else in every batch; the
    head trains and predicts on them (:mod:`vlpbench.protocols.detection`)."""
    from vlpbench.protocols.batch_fill import planned_size
    from vlpbench.protocols.detection import feature_storage, fraction_settings, memory_bytes

    config = ctx.config
    _, batch = fraction_settings(config, ctx.run.frac)
    train, val, test = ctx.ids("train"), ctx.ids("val"), ctx.ids("test")
    size, epochs = int(config["image_size"]), int(config["max_epochs"])
    variant = (int(config["neck_width"]),)
    steps = training_batches(len(train), batch)
    evaluated = planned_size(config, "eval_batch_size", batch)
    encode = ctx.step("features", evaluated, size, variant)
    shapes, sizes = measure(encode).shapes, {"train": len(train), "val": len(val)}
    storage = feature_storage(shapes, sizes, float(config["feature_cache_gb"]), frozen=bool(config["freeze_bn"]))
    kept = {name: where != "batch" for name, where in storage.items()}
    val_passes = 1 if kept["val"] else epochs
    work = [Work("train features", encode, batches(len(train), evaluated)) if kept["train"] else
            Work("train features, every epoch", ctx.step("features", batch, size, variant), epochs * steps),
            Work("training", ctx.step("train", batch, size, variant), epochs * steps),
            Work("val features", encode, batches(len(val), evaluated) * val_passes),
            Work("validation", ctx.step("eval", evaluated, size, variant), epochs * batches(len(val), evaluated)),
            Work("test features", encode, batches(len(test), evaluated)),
            Work("test", ctx.step("eval", evaluated, size, variant), batches(len(test), evaluated))]
    return Workload(images={"train": len(train), "val": len(val), "test": len(test)}, epochs=epochs, work=work,
                    reads=[ctx.read(train + val + test, size, config["input_resize"])],
                    kept_bytes=memory_bytes(shapes, sizes, storage))


def linear(ctx: RunContext, measure: Measure) -> Workload:
    """Linear head on pooled frozen features. Each part's features are computed once per checkpoint,
    preprocessing and id list and cached on disk, so the other runs of a sweep (fractions share the val and
    test parts, seeds the train part too) reuse them; ``linear_mode: mgca`` encodes freshly augmented training
    images every epoch instead (:mod:`vlpbench.protocols.linear`)."""
    from vlpbench.protocols.features import Preprocessing
    from vlpbench.protocols.labels import class_names
    from vlpbench.protocols.linear import check_schedule, feature_batch

    config = ctx.config
    check_schedule(config)
    pre = Preprocessing.from_config(config)
    batch, epochs = int(config["batch_size"]), int(config["max_epochs"])
    parts = {role: ctx.ids(role) for role in SPLIT_ROLES}
    size = 299 if pre.upsample_299 else pre.crop  # the encoder's input (features.MGCA_UPSAMPLE)
    variant = (pre.resize, pre.crop, pre.resize_rule)
    feature_batch_size = feature_batch(config)
    encode = ctx.step("features", feature_batch_size, size, variant)
    identity = (ctx.run.model.label, ctx.task.dataset, tuple(sorted(asdict(pre).items())), ctx.precision)

    def features(role: str) -> Work:
        return Work(f"{role} features", encode, batches(len(parts[role]), feature_batch_size),
                    shared=("features", *identity, ids_digest(parts[role])))

    steps = training_batches(len(parts["train"]), batch)
    work = [features("val"), features("test")]
    if config["linear_mode"] == "mgca":
        work.append(Work("augmented train features, every epoch", ctx.step("features", batch, size, variant),
                         epochs * steps))
    else:
        work.append(features("train"))
    work.append(Work("training", ctx.step("head", batch, 0, (len(class_names(config)),)), epochs * steps))
    return Workload(images={role: len(ids) for role, ids in parts.items()}, epochs=epochs, work=work,
                    reads=[ctx.read(sum(parts.values(), []), pre.resize, pre.cache_method)])


def finetune(ctx: RunContext, measure: Measure) -> Workload:
    """Encoder and head trained together: training batches and the validation pass every epoch, then the
    test pass (:mod:`vlpbench.protocols.finetune`)."""
    from vlpbench.protocols.batch_fill import planned_size
    from vlpbench.protocols.labels import class_names
    from vlpbench.protocols.linear import check_schedule

    config = ctx.config
    check_schedule(config)
    train, val, test = ctx.ids("train"), ctx.ids("val"), ctx.ids("test")
    size, batch, epochs = int(config["image_size"]), int(config["batch_size"]), int(config["max_epochs"])
    variant = (bool(config["augment"]), len(class_names(config)))
    evaluated = planned_size(config, "eval_batch_size", batch)
    eval_step = ctx.step("eval", evaluated, size, variant)
    return Workload(
        images={"train": len(train), "val": len(val), "test": len(test)}, epochs=epochs,
        work=[Work("training", ctx.step("train", batch, size, variant),
                   epochs * training_batches(len(train), batch)),
              Work("validation", eval_step, epochs * batches(len(val), evaluated)),
              Work("test", eval_step, batches(len(test), evaluated))],
        reads=[ctx.read(train + val + test, size, "antialias")])


def zero_shot(ctx: RunContext, measure: Measure) -> Workload:
    """Zero-shot scores of the test images and, where thresholds come from them, of the validation images
    (``threshold_images``); nothing is trained or cached between runs (:mod:`vlpbench.protocols.zero_shot`)."""
    from vlpbench.protocols.labels import class_names, label_kind
    from vlpbench.protocols.batch_fill import planned_size
    from vlpbench.protocols.zero_shot import (CROP_FROM, THRESHOLD_IMAGES, ZERO_SHOT_BATCH, class_prompts,
                                              prompt_templates)

    config = ctx.config
    prompts = class_prompts(config, class_names(config))
    templates = prompt_templates(config)
    adapter = ctx.adapter()
    size, batch = int(adapter.image_size), planned_size(config, "batch_size", ZERO_SHOT_BATCH)
    test = ctx.ids("test")
    cache = (CROP_FROM if config["center_crop"] else size, "antialias")
    val: list[str] = []
    val_read = ctx.read(val, *cache)
    if label_kind(config) != "multiclass" and config["threshold_source"] == "val":
        if config["threshold_images"] == "split_val":
            val = ctx.ids("val")
            val_read = ctx.read(val, *cache)
        else:  # another dataset's images (CheXpert valid.csv beside the test set)
            reader, val, _ = THRESHOLD_IMAGES[config["threshold_images"]](
                ctx.reader(f"threshold_images {config['threshold_images']}"), None)
            # readers live in vlpbench.data.<dataset>: the cache's dataset name
            val_read = ctx.read(val, *cache, dataset=type(reader).__module__.rpartition(".")[2], reader=reader)
    step = ctx.step("score", batch, size, (len(prompts), tuple(templates)))
    return Workload(images={"train": 0, "val": len(val), "test": len(test)}, epochs=None,
                    work=[Work("validation scores", step, batches(len(val), batch)),
                          Work("test scores", step, batches(len(test), batch))],
                    reads=[ctx.read(test, *cache), val_read])


def grounding(ctx: RunContext, measure: Measure) -> Workload:
    """Heat maps of the positive test images and, with ``threshold_source: val``, of the positive validation
    images (``grounding_queries``); nothing is trained (:mod:`vlpbench.protocols.grounding`)."""
    from vlpbench.protocols.batch_fill import planned_size
    from vlpbench.protocols.grounding import DEFAULTS, GROUNDING_BATCH, check_config, grounding_queries, text_source

    config = ctx.config
    check_config(config)
    adapter = ctx.adapter()
    texts = text_source(config, adapter.free_text)
    labels = _labels(ctx, "grounding's positive images") if config["queries"] == "class" else \
        ctx.reader("grounding's phrases")
    test = _query_images(grounding_queries(labels, ctx.ids("test"), config, texts)[0])
    val = _query_images(grounding_queries(labels, ctx.ids("val"), config, texts)[0]) \
        if config["threshold_source"] == "val" else []
    size, batch = int(adapter.image_size), planned_size(config, "batch_size", GROUNDING_BATCH)
    step = ctx.step("maps", batch, size, (config["queries"],))
    cache = (size, "antialias", config.get("image_read", DEFAULTS["image_read"]))
    return Workload(images={"train": 0, "val": len(val), "test": len(test)}, epochs=None,
                    work=[Work("validation maps", step, batches(len(val), batch)),
                          Work("test maps", step, batches(len(test), batch))],
                    reads=[ctx.read(val + test, *cache)])


def retrieval(ctx: RunContext, measure: Measure) -> Workload:
    """Embeddings of the query images and of the candidate texts (``retrieval_set``); nothing is trained
    (:mod:`vlpbench.protocols.retrieval`)."""
    from vlpbench.protocols.batch_fill import planned_size
    from vlpbench.protocols.labels import class_names
    from vlpbench.protocols.retrieval import RETRIEVAL_BATCH
    from vlpbench.protocols.retrieval_sets import expand_prompt_grid, retrieval_set

    config = ctx.config
    test = ctx.ids("test")
    if ctx.source is not None:
        rset = retrieval_set(ctx.source, test, config)
        images, texts = list(rset.image_ids), len(rset.texts)
    elif config.get("candidates") == "class_prompts":  # the texts come from the task, the images from the split
        images, texts = test, len(expand_prompt_grid(config.get("prompt_grid"), class_names(config)))
    else:
        raise Unknown(f"the candidate texts ({config.get('candidates')}) come from the {ctx.task.dataset} data "
                      f"folder: {ctx.missing}")
    size, batch = int(ctx.adapter().image_size), planned_size(config, "batch_size", RETRIEVAL_BATCH)
    return Workload(images={"train": 0, "val": 0, "test": len(images)}, epochs=None,
                    work=[Work("image embeddings", ctx.step("embed_image", batch, size), batches(len(images), batch)),
                          Work("text embeddings", ctx.step("embed_text", batch, 0, (config.get("candidates"),)),
                               batches(texts, batch))],
                    reads=[ctx.read(images, size, "antialias")])


WORKLOADS: dict[str, Callable[[RunContext, Measure], Workload]] = {
    "segmentation": segmentation, "detection": detection, "linear": linear, "finetune": finetune,
    "zero_shot": zero_shot, "grounding": grounding, "retrieval": retrieval}


def workload(ctx: RunContext, measure: Measure) -> Workload:
    """The run's workload by its protocol; :class:`Unknown` for a protocol without a rule here (one a user
    registered) or where the counts need what is not there."""
    rule = WORKLOADS.get(ctx.task.protocol)
    if rule is None:
        raise Unknown(f"protocol {ctx.task.protocol!r} has no cost rule in vlpbench.sweep.workload")
    return rule(ctx, measure)


def _labels(ctx: RunContext, what: str) -> Any:
    if ctx.labels is None:
        raise Unknown(f"{what} needs the {ctx.task.dataset} labels: {ctx.missing}")
    return ctx.labels


def _query_images(queries: list) -> list[str]:
    return list(dict.fromkeys(query.image_id for query in queries))
