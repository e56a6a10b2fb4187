"""Per-image post-processing loops of many small torch ops: their time with one torch thread versus the
process's thread count (``vlpbench.threads.choose_threads``: ``--threads``, else ``OMP_NUM_THREADS``, else the
CPUs this process may use), on the CPU.

Each loop runs on synthetic inputs of its task's sizes, the thread counts taking turns: one warm-up call
each, then ``--repeats`` rounds; a loop's time is its best round at that count. The ratio is the
many-thread time over the one-thread time, both measured in this run: above 1, one thread is faster. The
outputs at both counts are compared, and any difference is printed. A function vlpbench runs on one thread
(``vlpbench.threads.single_threaded``) is timed undecorated (its ``__wrapped__``), so that both counts apply.

- detection decode: :func:`~vlpbench.protocols.detection.decode_batch` of one batch (the three scales' boxes,
  scores and classes; rsna_det: 224 px, batch 16; vindr_det: 14 classes);
- detection select: ``select_detections`` of one batch (per image: confidence cut, NMS, the best 100), with
  torchvision's NMS and with MGCA's, one class and 14 (NMS within each class);
- detection targets: ``assign_targets`` of the three scales of one training batch (1 to 3 boxes per image);
- detection loss: ``yolo_loss`` of the three scales of one batch, forward only (as validation computes it);
- grounding query: per query, the truth box mask 1024² resized to 224² (``truth_mask``) and the 14² map upsampled
  to it and min-max normalised (``prepare_heatmap``); 32 queries (rsna_ground); also at native 1024²;
- segmentation native Dice: per image, the 224² probabilities upsampled to 1024² and their Dice against the
  mask (``dice_resolution: native``); 8 images (siim_seg's batch).

    python perf/tiny_ops.py [--repeats 7] [--threads N] [--only NAME]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlpbench.metrics.dice import dice_per_image
from vlpbench.protocols import detection, grounding
from vlpbench.threads import choose_threads

SIZE = 224
BATCH = 16
CLASSES = 14
QUERIES = 32
NATIVE = 1024
SEG_BATCH = 8
GROUNDING_CONFIG = {"eval_resolution": "fixed", "eval_size": SIZE, "upsample": "bilinear", "normalize": "minmax"}


def _head_outputs(n_classes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Raw YOLO outputs of one batch, coarsest scale first; objectness logits put about 5 % of the predictions
    above the 0.5 confidence cut, in clusters of overlapping boxes (what NMS has to sort out)."""
    outputs = []
    for grid in (SIZE // 32, SIZE // 16, SIZE // 8):
        raw = torch.randn(BATCH, 3, detection.BOX_ATTRIBUTES + n_classes, grid, grid, generator=generator)
        raw[:, :, 2:4] *= 0.3
        raw[:, :, 4] = torch.randn(BATCH, 3, grid, grid, generator=generator) * 2 - 3.3
        outputs.append(raw.reshape(BATCH, -1, grid, grid))
    return outputs


def _truth_boxes(generator: torch.Generator, n_classes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    boxes, labels = [], []
    for _ in range(BATCH):
        count = int(torch.randint(1, 4, (), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * SIZE * 0.6
        size = 10 + torch.rand(count, 2, generator=generator) * SIZE * 0.35
        boxes.append(torch.cat([corner, corner + size], 1))
        labels.append(torch.randint(0, n_classes, (count,), generator=generator))
    return boxes, labels


def detection_cases(generator: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The detection loops, each a call without arguments."""
    anchors = detection.scaled_anchors(SIZE)
    decode_batch, assign_targets = detection.decode_batch.__wrapped__, detection.assign_targets.__wrapped__
    one, many = _head_outputs(1, generator), _head_outputs(CLASSES, generator)
    boxes, labels = _truth_boxes(generator, CLASSES)
    one_decoded, many_decoded = decode_batch(one, anchors, SIZE), decode_batch(many, anchors, SIZE)

    def select(decoded, nms: str, labelled: bool):
        b, s, l = decoded
        return lambda: detection.select_detections(b, s, conf_threshold=0.5, nms_threshold=0.5, max_detections=100,
                                                   nms=nms, labels=l if labelled else None)

    def targets():
        return [assign_targets(boxes, tuple(raw.shape[-2:]), (SIZE / raw.shape[-2], SIZE / raw.shape[-1]),
                                a, 0.7, labels=labels, n_classes=CLASSES) for raw, a in zip(many, anchors)]

    def loss():
        with torch.inference_mode():
            return [detection.yolo_loss(raw, t, box_weight=2.5, noobj_weight=1.0)
                    for raw, t in zip(many, targets())]

    return {
        "detection decode, 1 class": lambda: decode_batch(one, anchors, SIZE),
        "detection decode, 14 classes": lambda: decode_batch(many, anchors, SIZE),
        "detection select, torchvision NMS": select(one_decoded, "torchvision", False),
        "detection select, MGCA NMS": select(one_decoded, "mgca", False),
        "detection select, torchvision NMS, 14 classes": select(many_decoded, "torchvision", True),
        "detection select, MGCA NMS, 14 classes": select(many_decoded, "mgca", True),
        "detection targets, 14 classes": targets,
        "detection loss (with targets), 14 classes": loss,
    }


class _BoxMasks:
    """A reader of RSNA-like 1024² box masks."""

    def __init__(self, generator: torch.Generator):
        self.masks = {}
        for k in range(QUERIES):
            mask = np.zeros((NATIVE, NATIVE), dtype=np.uint8)
            x, y = (torch.rand(2, generator=generator) * NATIVE * 0.6).long().tolist()
            mask[y:y + 200, x:x + 150] = 1
            self.masks[f"i{k}"] = mask

    def mask(self, image_id: str) -> np.ndarray:
        return self.masks[image_id]


def grounding_cases(generator: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The grounding per-query loop at 224² and at native 1024²."""
    source = _BoxMasks(generator)
    queries = [grounding.Query(key, key, "pneumonia") for key in source.masks]
    maps = {q.key: torch.rand(14, 14, generator=generator) for q in queries}

    def per_query(config):
        def run():
            out = []
            for query in queries:
                truth = grounding.truth_mask(source, query, config)
                out.append((grounding.prepare_heatmap(maps[query.key], truth.shape, config), truth))
            return out
        return run

    return {"grounding query, 224²": per_query(GROUNDING_CONFIG),
            "grounding query, native 1024²": per_query({**GROUNDING_CONFIG, "eval_resolution": "native"})}


def segmentation_cases(generator: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The native-resolution Dice loop of one test batch."""
    probs = torch.rand(SEG_BATCH, 1, SIZE, SIZE, generator=generator)
    truths = [(torch.rand(NATIVE, NATIVE, generator=generator) > 0.9).to(torch.uint8).numpy() for _ in range(SEG_BATCH)]

    def native_dice():
        scores = []
        for probs_i, truth in zip(probs, truths):
            upsampled = F.interpolate(probs_i[None], size=truth.shape, mode="bilinear", align_corners=False)
            scores.append(dice_per_image(upsampled[0].cpu(), torch.from_numpy(truth)[None], 0.5)[0])
        return scores

    return {"segmentation native Dice, batch 8": native_dice}


def same(a: Any, b: Any) -> bool:
    """Whether two outputs are equal bit for bit (tensors, arrays, numbers, and sequences / dataclasses of them)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def measure(case: Callable[[], Any], counts: tuple[int, int], repeats: int) -> tuple[list[float], bool]:
    """Best seconds per call at each thread count (taking turns), and whether the outputs were identical."""
    outputs = []
    for count in counts:
        torch.set_num_threads(count)
        outputs.append(case())
    best = [float("inf")] * len(counts)
    for _ in range(repeats):
        for k, count in enumerate(counts):
            torch.set_num_threads(count)
            started = time.perf_counter()
            case()
            best[k] = min(best[k], time.perf_counter() - started)
    return best, same(outputs[0], outputs[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per thread count (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="the many-thread count (default: vlpbench's)")
    parser.add_argument("--only", default=None, help="only the loops whose name contains this")
    args = parser.parse_args()

    choice = choose_threads(args.threads)
    counts = (1, choice.count)
    generator = torch.Generator().manual_seed(0)
    cases = {**detection_cases(generator), **grounding_cases(generator), **segmentation_cases(generator)}
    before = torch.get_num_threads()
    print(f"torch {torch.__version__}, CPU, 1 thread vs {choice.count} ({choice.source}); best of {args.repeats}")
    print(f"{'loop':48s} {'1 thread':>10s} {f'{choice.count} threads':>11s} {'ratio':>7s}")
    try:
        for name, case in cases.items():
            if args.only and args.only not in name:
                continue
            (one, many), identical = measure(case, counts, args.repeats)
            print(f"{name:48s} {1000 * one:8.2f}ms {1000 * many:9.2f}ms {many / one:6.2f}x"
                  + ("" if identical else "  OUTPUTS DIFFER"))
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
