"""Every speed figure a user pays for, in one run: encoder throughput, one pass of each protocol's steps,
the data path's utilisation, and the linear probe's cost per sweep. Prints a table and appends it as a section
to ``--out`` (``perf/RESULTS.md``, created with a short header where missing).

- encoder: images/s of a ResNet-50 forward at 224 px (eval, inference mode, as feature extraction runs it),
  fp32 and bf16 autocast (on a CPU only where it has native bf16: ``avx512_bf16`` or ``amx_bf16``), batches
  of 32 and 128 (``--quick``: 32), after warm-up batches of the same shape; measured.
- protocol steps: each protocol's own step (``vlpbench.sweep.calibrate``, the ``random`` adapter on random
  inputs), timed after one warm-up batch, then multiplied by one epoch's batch counts on the rsna/v1 split as
  ``vlpbench.sweep.workload`` counts them (rsna_seg, rsna_det, rsna_cls; fine-tuning with cxr14_ft's settings
  on rsna/v1's parts): extrapolated. ``--quick`` times each step at a batch of ``QUICK_BATCH`` images and scales
  it linearly to the protocol's batch (a CPU's time per image barely depends on the batch; a GPU's does).
  The linear head is fitted on random features of RSNA's training-part size: one sgd epoch (``--quick``: a
  tenth of the rows, scaled linearly), and the whole lbfgs penalty grid (full size in both modes).
- data path: a feature extraction (``extract_features``, rsna_cls's ``feature_batch_size``) over synthetic RSNA
  images read from a filled image cache, serial (``VLPBENCH_PREFETCH=0``) and prefetched, against the encoder's
  compute alone on the same batches already on the device: the busy fraction is compute / wall, for each.
- inference batches: the batch ``auto`` picks for rsna_seg's validation pass and rsna_cls's feature extraction
  (``vlpbench.protocols.batch_fill``) and, on a GPU (not ``--quick``), each pass's images/s at the protocol's
  batch and at the automatic one; measured.
- linear probe per sweep: encoder passes of rsna_cls's 3 fractions x 3 seeds on rsna/v1, cached (one shared
  extraction) vs MGCA's per-epoch mode, counted from the split files, and the time they imply at the measured
  fp32 images/s.

    python perf/gpu_figures.py --device cuda|cpu [--quick] [--out perf/RESULTS.md] [--label "..."]
                               [--images N] [--feature-batch B]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from results_md import Figure, append_section, section  # perf/ is this script's folder, first on sys.path

SPLIT = ("rsna", "v1")
# Task whose settings each protocol's steps take; fine-tuning has no RSNA task, cxr14_ft's settings serve.
PROTOCOL_TASKS = {"segmentation": "rsna_seg", "detection": "rsna_det", "linear": "rsna_cls", "finetune": "cxr14_ft"}
QUICK_BATCH = 2
SEEDS = 3
REPEATS = 3  # timings of the data-path figure: the best of as many
QUICK_FEATURE_BATCH = 32  # --quick: a CPU extracts 4 batches of this size in seconds, not minutes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (without it, CPU bf16 autocast emulates and is slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encoder_rate(precision: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of ``steps`` ResNet-50 forward passes of ``batch`` images at 224 px after ``warmup`` passes."""
    import segmentation_models_pytorch as smp

    from vlpbench.protocols.runtime import autocast, prepare_model

    encoder = prepare_model(smp.encoders.get_encoder("resnet50", weights=None).eval(), device, precision)
    x = torch.randn(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        for step in range(warmup + steps):
            if step == warmup:
                _sync(device)
                started = time.perf_counter()
            encoder(x)
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def encoder_figures(device: torch.device, quick: bool) -> tuple[list[Figure], float]:
    """The encoder's images/s per precision and batch, and the fp32 rate at batch 32 (for the sweep figures)."""
    precisions = ["fp32", "bf16"]
    skip_bf16 = device.type == "cpu" and not cpu_bf16()
    cuda = device.type == "cuda"
    figures, base = [], 0.0
    for batch in (32,) if quick else (32, 128):
        for precision in precisions:
            name = f"ResNet-50 encoder, 224 px, batch {batch}, {precision}"
            if precision == "bf16" and skip_bf16:
                figures.append(Figure(name, None, "images/s", "skipped", "no avx512_bf16/amx_bf16 on this CPU"))
                continue
            steps, warmup = (20, 3) if cuda else ((1, 1) if quick else (3, 1))
            rate = encoder_rate(precision, batch, steps, warmup, device)
            base = base or rate
            figures.append(Figure(name, rate, "images/s", "measured",
                                  f"{steps} batch(es) after {warmup} warm-up; {rate / base:.2f}x fp32 batch 32"))
    return figures, base


class StepTimer:
    """Seconds per batch of each distinct step (``vlpbench.sweep.calibrate``), timed once; quick: at
    ``QUICK_BATCH`` images, scaled linearly to the step's batch."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        from vlpbench.sweep.calibrate import Adapters, Calibrator

        self.quick = quick
        self.calibrate = Calibrator(device, batches=1 if quick else 3, threads=None, adapters=Adapters())
        self.done: dict[tuple, object] = {}

    def __call__(self, step):
        from vlpbench.sweep.workload import StepTiming

        if step.key not in self.done:
            if self.quick and step.batch_size > QUICK_BATCH:
                small = self.calibrate(dataclasses.replace(step, batch_size=QUICK_BATCH,
                                                           config={**step.config, "batch_size": QUICK_BATCH}))
                self.done[step.key] = StepTiming(small.seconds * step.batch_size / QUICK_BATCH, small.shapes)
            else:
                self.done[step.key] = self.calibrate(step)
        return self.done[step.key]


def split_parts() -> dict[str, list[str]]:
    """The rsna/v1 split's ids per role of a 100 % run, from the committed split files."""
    from vlpbench.data.splits import load_split

    split = load_split(*SPLIT)
    return {"train": split.ids(split.part_for_fraction(1.0)), "val": split.ids("val"), "test": split.ids("test"),
            "train_all": split.ids("train")}


def protocol_figures(device: torch.device, quick: bool) -> list[Figure]:
    """One epoch of each protocol's steps on rsna/v1 (``vlpbench.sweep.workload`` at ``max_epochs`` 1), each
    step's measured seconds per batch times its batches; the linear head's steps are left to
    :func:`head_figures`."""
    from vlpbench.sweep.plan import Run
    from vlpbench.sweep.spec import ModelSpec
    from vlpbench.sweep.workload import RunContext, workload
    from vlpbench.tasks import load_task

    timer, parts, model = StepTimer(device, quick), split_parts(), ModelSpec("random")
    how = f"at batch {QUICK_BATCH}, scaled to the protocol's batch" if quick else "3 batches after 1 warm-up"
    figures = []
    for protocol, name in PROTOCOL_TASKS.items():
        task = load_task(name)
        run = Run(model, name, 1.0, 0, {}, None, None, Path(os.devnull))
        ctx = RunContext(run=run, task=task, config=task.resolve({"max_epochs": 1, "patience": 1}), source=None,
                         missing="", parts=parts, labels=None, adapter=lambda: timer.calibrate.adapters(model),
                         precision="fp32")
        for item in workload(ctx, timer).work:
            if item.step.kind == "head" or item.batches == 0:
                continue
            per_batch = timer(item.step).seconds
            figures.append(Figure(f"{protocol} ({name}): {item.what}, one pass", item.batches * per_batch, "s",
                                  "extrapolated", f"{item.batches:,} batches of {item.step.batch_size} x "
                                  f"{per_batch:.4g} s measured ({how})"))
    return figures


def head_figures(device: torch.device, quick: bool) -> list[Figure]:
    """The linear head on random pooled features of RSNA's training-part size: one sgd epoch (the protocol's
    ``_fit``; quick: a tenth of the rows, scaled linearly) and the whole lbfgs fit (``select_logistic``, always
    at full size: its per-penalty Cholesky factor does not scale with the rows)."""
    from vlpbench.protocols import linear as lin
    from vlpbench.protocols.logistic import select_logistic
    from vlpbench.tasks import load_task

    config = load_task(PROTOCOL_TASKS["linear"]).resolve({"max_epochs": 1, "patience": 1})
    full = len(split_parts()["train"])
    rows, scale = (full // 10, 10) if quick else (full, 1)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(rows, 2048, generator=generator).to(device)
    labels = (torch.rand(rows, 1, generator=generator) < 0.3).float().to(device)
    val, val_labels = features[: rows // 3], labels[: rows // 3]
    head = lin.seeded_head(2048, 1, 0).to(device)
    loss = lin.loss_function("binary")
    lin._fit(head, lambda index: features[index], labels[:64], val, val_labels, loss, config, 0, False)  # warm-up
    _sync(device)
    started = time.perf_counter()
    lin._fit(head, lambda index: features[index], labels, val, val_labels, loss, config, 0, False)
    _sync(device)
    sgd = time.perf_counter() - started
    if quick:
        features = torch.randn(full, 2048, generator=generator).to(device)
        labels = (torch.rand(full, 1, generator=generator) < 0.3).float().to(device)
        val, val_labels = features[: full // 3], labels[: full // 3]
    started = time.perf_counter()
    select_logistic("binary", features, labels, val, val_labels, 1)
    _sync(device)
    lbfgs = time.perf_counter() - started
    how, note = ("extrapolated", f"{rows:,} rows measured, x{scale}") if quick else ("measured", f"{rows:,} rows")
    epochs = int(load_task(PROTOCOL_TASKS["linear"]).resolve()["max_epochs"])
    return [Figure("linear head, sgd, one epoch on RSNA-size features", sgd * scale, "s", how,
                   f"{note}, 2048 channels, batch {config['batch_size']}; up to {epochs} epochs a run"),
            Figure("linear head, lbfgs, whole fit on RSNA-size features", lbfgs, "s", "measured",
                   f"{full:,} rows, 2048 channels, the whole penalty grid")]


def data_path_figures(device: torch.device, n: int | None, batch: int | None, work: Path,
                      quick: bool = False) -> list[Figure]:
    """Busy fraction of a feature extraction from the image cache, serial and prefetched, measured in the same run:
    the encoder's compute alone on the same batches (already on the device) over each extraction's wall time.
    ``batch``: images per encoder call (None: rsna_cls's ``feature_batch_size``; quick: ``QUICK_FEATURE_BATCH``);
    ``n``: images (None: 4 batches, so that there is a next batch to prepare); quick: one timing of each, not
    the best of ``REPEATS``."""
    from vlpbench import api
    from vlpbench.adapters import build_adapter
    from vlpbench.protocols.features import (Preprocessing, RunEncoder, batch_ranges, center_crop, encoder_input,
                                             extract_features, load_images, pooled, uint8_batch, uint8_pixels)
    from vlpbench.protocols.linear import feature_batch
    from vlpbench.protocols.prefetch import prefetch_depth

    spec = api.load_task(PROTOCOL_TASKS["linear"])
    config = spec.resolve()
    pre = Preprocessing.from_config(config)
    batch = batch or (QUICK_FEATURE_BATCH if quick else feature_batch(config))
    repeats = 1 if quick else REPEATS
    n = n or 4 * batch
    api.synth("rsna", work / "rsna", n=n, size=pre.resize, progress=False)
    source = api.open_dataset(spec, work / "rsna")
    ids = list(source.image_ids)[:n]
    images = load_images(source, ids, pre.resize, False, pre.cache_method)  # fills the image cache; memory-mapped
    module = RunEncoder(build_adapter("random", None), device)()
    depth = prefetch_depth() or 2

    def extraction(depth: int) -> float:
        _sync(device)
        started = time.perf_counter()
        extract_features(module, images, pre, batch_size=batch, device=device, depth=depth)
        _sync(device)
        return time.perf_counter() - started

    def computation() -> float:
        batches = [encoder_input(center_crop(uint8_batch(images, index, device), pre.crop), pre)
                   for index in batch_ranges(len(images), batch)]
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                pooled(module, x)
        _sync(device)
        return time.perf_counter() - started

    def reading() -> float:
        started = time.perf_counter()
        for index in batch_ranges(len(images), batch):
            uint8_pixels(images, index, device)
        return time.perf_counter() - started

    extraction(depth)  # warm-up: allocations, algorithm search, the memory map's pages
    # The best of REPEATS, taken in turn, so that a passing load on the machine favours none.
    times = [(extraction(0), extraction(depth), computation(), reading()) for _ in range(repeats)]
    serial, ahead, compute, read = (min(column) for column in zip(*times))
    best = f"best of {repeats}" if repeats > 1 else "timed once"
    how = f"extract_features over the memory-mapped image cache, batch {batch}, {pre.crop} px crop, {best}"
    return [Figure(f"feature extraction, {n} images, serial", n / serial, "images/s", "measured", how),
            Figure(f"feature extraction, {n} images, prefetched (depth {depth})", n / ahead, "images/s", "measured",
                   how),
            Figure("encoder compute alone, same batches", n / compute, "images/s", "measured",
                   f"inputs on device, {best}"),
            Figure("image-cache reads alone, same batches", 1000 * read / len(batch_ranges(n, batch)), "ms/batch",
                   "measured", f"what prefetching hides: read into host memory, page-locked for CUDA; {best}"),
            Figure("data path busy fraction, serial (compute / wall)", compute / serial, "fraction", "measured",
                   "1 = the encoder never waits"),
            Figure("data path busy fraction, prefetched (compute / wall)", compute / ahead, "fraction", "measured",
                   f"the next {depth} batches read while the encoder runs")]


def inference_batch_figures(device: torch.device, quick: bool) -> list[Figure]:
    """The batch ``auto`` picks for rsna_seg's validation pass and rsna_cls's feature extraction
    (``vlpbench.protocols.batch_fill``, the protocols' own probes on the ``random`` adapter), and on a GPU the
    images/s of each pass at the protocol's batch and at the automatic one, measured in the same run (the best
    of ``REPEATS`` after a warm-up). On a CPU ``auto`` is the protocol's batch: nothing to compare, not timed."""
    from vlpbench.adapters import build_adapter
    from vlpbench.protocols import segmentation as seg
    from vlpbench.protocols.batch_fill import inference_batch
    from vlpbench.protocols.features import Preprocessing, RunEncoder, extract_features
    from vlpbench.protocols.linear import FEATURE_BATCH
    from vlpbench.protocols.linear import _probe as feature_probe
    from vlpbench.protocols.runtime import freeze_backbone, prepare_model
    from vlpbench.sweep.calibrate import _Part
    from vlpbench.tasks import load_task

    adapter, parts = build_adapter("random", None), split_parts()
    seg_config = load_task(PROTOCOL_TASKS["segmentation"]).resolve()
    size, protocol_batch = int(seg_config["image_size"]), int(seg_config["batch_size"])
    model = seg.UNet(adapter.encoder(), adapter.encoder_name, "smp")
    freeze_backbone(model.unet.encoder)
    prepare_model(model, device)
    normalize, loss = seg._normalizer(seg_config["mean"], seg_config["std"]), seg._loss(seg_config)
    chosen = inference_batch(seg_config, "eval_batch_size", device=device, fallback=protocol_batch,
                             limit=len(parts["val"]), multiple_of=protocol_batch,
                             probe=lambda count: seg._probe(model, normalize, count, size, device))

    lin_config = load_task(PROTOCOL_TASKS["linear"]).resolve()
    pre, encoder = Preprocessing.from_config(lin_config), RunEncoder(adapter, device)
    features = inference_batch(lin_config, "feature_batch_size", device=device, fallback=FEATURE_BATCH,
                               limit=len(parts["train"]), probe=lambda count: feature_probe(encoder(), pre, count, device))

    # Per pass: the batch, the protocol's batch, random input of n images, one pass over it at a batch.
    passes = {
        "segmentation (rsna_seg) validation pass": (
            chosen, protocol_batch, lambda n: _Part(n, size),
            lambda part, b: seg._evaluate_loss(model, part, loss, normalize, b, device, protocol_batch=protocol_batch)),
        "feature extraction (rsna_cls)": (
            features, FEATURE_BATCH, lambda n: _Part(n, pre.resize).images.numpy(),
            lambda images, b: extract_features(encoder(), images, pre, batch_size=b, device=device)),
    }
    figures = []
    for name, (batch, baseline, make, one_pass) in passes.items():
        figures.append(Figure(f"{name}: automatic batch", batch.size, "images",
                              "measured" if device.type == "cuda" else "default", batch.how))
        if device.type != "cuda" or quick:
            continue
        images = 2 * max(batch.size, baseline)
        data, rates = make(images), {}
        for size_now in (baseline, batch.size):
            one_pass(make(size_now), size_now)  # warm-up: allocations and cuDNN's search for this shape
            best = math.inf
            for _ in range(REPEATS):
                _sync(device)
                started = time.perf_counter()
                one_pass(data, size_now)
                _sync(device)
                best = min(best, time.perf_counter() - started)
            rates[size_now] = images / best
        figures += [Figure(f"{name}, batch {baseline}", rates[baseline], "images/s", "measured",
                           f"{images} images, best of {REPEATS}"),
                    Figure(f"{name}, automatic batch {batch.size}", rates[batch.size], "images/s", "measured",
                           f"{images} images, best of {REPEATS}; {rates[batch.size] / rates[baseline]:.2f}x "
                           f"batch {baseline}")]
    return figures


def sweep_figures(rate: float) -> list[Figure]:
    """Encoder passes of rsna_cls's fractions x ``SEEDS`` seeds on rsna/v1, cached vs mgca mode, and the time
    they imply at ``rate`` images/s (the counting rule of ``perf/linear_probe.py``)."""
    from linear_probe import encoder_passes
    from vlpbench.data.splits import load_split
    from vlpbench.tasks import load_task

    spec = load_task(PROTOCOL_TASKS["linear"])
    config, split = spec.resolve(), load_split(*SPLIT)
    epochs, batch = int(config["max_epochs"]), int(config["batch_size"])
    sizes = [len(split.ids(split.part_for_fraction(f))) for f in spec.fractions]
    n_eval = len(split.ids("val")) + len(split.ids("test"))
    cached = encoder_passes(max(sizes), n_eval, epochs, batch, False)
    mgca = n_eval + SEEDS * sum(encoder_passes(size, 0, epochs, batch, True) for size in sizes)
    runs = f"{len(sizes)} fractions x {SEEDS} seeds, {epochs} epochs at batch {batch}"
    return [Figure("linear probe sweep, cached: encoder passes", cached, "images", "arithmetic",
                   f"{runs}; one extraction for all runs"),
            Figure("linear probe sweep, mgca mode: encoder passes", mgca, "images", "arithmetic",
                   f"{runs}; at most (early stopping ends runs sooner)"),
            Figure("linear probe sweep, cached: encoder time", cached / rate, "s", "extrapolated",
                   f"at {rate:.4g} images/s (fp32, batch 32)"),
            Figure("linear probe sweep, mgca mode: encoder time", mgca / rate, "s", "extrapolated",
                   f"at {rate:.4g} images/s; {mgca / cached:.0f}x cached")]


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU model with torch's threads."""
    from vlpbench.sweep.calibrate import device_name

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device_name(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", required=True, choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="batch 32 only, steps at a small batch, 1/10 sgd head, a short data-path figure")
    parser.add_argument("--out", type=Path, default=None, help="append a section to this Markdown file")
    parser.add_argument("--label", default="", help="added to the section's title (e.g. the machine's sharing)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images of the data-path figure "
                        "(default: 4 batches)")
    parser.add_argument("--feature-batch", type=int, default=None, help="images per encoder call in the data-path "
                        "figure (default: rsna_cls's feature_batch_size)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlpbench-figures-") as tmp:
        os.environ["VLPBENCH_CACHE"] = str(Path(tmp) / "cache")  # never the user's own caches
        encoder, rate = encoder_figures(device, args.quick)
        figures = [*encoder, *protocol_figures(device, args.quick), *head_figures(device, args.quick),
                   *data_path_figures(device, args.images, args.feature_batch, Path(tmp), args.quick),
                   *inference_batch_figures(device, args.quick),
                   *sweep_figures(rate)]
    name = device_label(device)
    title = f"{datetime.date.today().isoformat()}, {name}" + (f" ({args.label})" if args.label else "")
    facts = [("date", datetime.datetime.now().isoformat(timespec="seconds")), ("device", name),
             ("torch threads", str(torch.get_num_threads())), ("torch", torch.__version__),
             ("mode", "quick" if args.quick else "full"),
             ("wall time of this run", f"{time.perf_counter() - started:.0f} s")]
    text = section(title, facts, figures)
    print(text)
    if args.out is not None:
        append_section(args.out, text)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
