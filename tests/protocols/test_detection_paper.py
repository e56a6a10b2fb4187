"""Detection's ``paper`` profile: MGCA's anchor IoU, no-object term, NMS and input resize, each checked
against MGCA's algorithm written out here (HKU-MedAI/MGCA mgca/utils/yolo_loss.py,
mgca/utils/detection_utils.py, mgca/datasets/detection_dataset.py), not against vlpbench itself."""

import math

import numpy as np
import pytest
import torch

from vlpbench import api
from vlpbench.data.rsna import RsnaSource
from vlpbench.errors import ConfigError
from vlpbench.protocols import SplitIds
from vlpbench.protocols.detection import DetectionImages, _batch_loss, run_detection, select_detections
from vlpbench.tasks import load_task

SIZE = 128  # input side: grids 4, 8, 16 (strides 32, 16, 8), coarsest first
# YOLOv3's anchors (w, h) at its 416 input, coarsest scale first, as MGCA's ModelMain lists them.
ANCHORS_416 = [[(116, 90), (156, 198), (373, 326)], [(30, 61), (62, 45), (59, 119)], [(10, 13), (16, 30), (33, 23)]]
GRIDS = (4, 8, 16)
MGCA_RULES = {"anchor_iou": "mgca", "noobj_assigned": "mgca"}


# ---- MGCA's YOLO loss, as its YOLOLoss.forward / get_target compute it (float64 numpy) ----

def _mgca_bbox_iou(box, other):
    """MGCA's bbox_iou of two xyxy boxes: every side one longer ("+1")."""
    inter = (max(min(box[2], other[2]) - max(box[0], other[0]) + 1, 0)
             * max(min(box[3], other[3]) - max(box[1], other[1]) + 1, 0))
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    area_other = (other[2] - other[0] + 1) * (other[3] - other[1] + 1)
    return inter / (area + area_other - inter + 1e-16)


def _mgca_bce(p, t):
    """torch.nn.BCELoss (mean; log clamped at -100) on probabilities."""
    with np.errstate(divide="ignore"):
        log_p, log_q = np.maximum(np.log(p), -100), np.maximum(np.log(1 - p), -100)
    return float(np.mean(-(t * log_p + (1 - t) * log_q)))


def _mgca_scale_loss(raw, labels, grid, anchors_px):
    """MGCA's loss of one scale: ``raw`` (B, 18, g, g); ``labels`` per image a list of (cx, cy, w, h)
    normalised by the input size (MGCA's dataset labels)."""
    batch = raw.shape[0]
    pred = raw.astype(np.float64).reshape(batch, 3, 6, grid, grid).transpose(0, 1, 3, 4, 2)
    stride = SIZE / grid
    anchors = [(w / stride, h / stride) for w, h in anchors_px]
    shape = (batch, 3, grid, grid)
    mask, noobj = np.zeros(shape), np.ones(shape)
    tx, ty, tw, th = (np.zeros(shape) for _ in range(4))
    for b, boxes in enumerate(labels):
        for cx, cy, w, h in boxes:
            gx, gy, gw, gh = cx * grid, cy * grid, w * grid, h * grid
            gi, gj = int(gx), int(gy)
            ious = np.array([_mgca_bbox_iou((0, 0, gw, gh), (0, 0, aw, ah)) for aw, ah in anchors])
            noobj[b, ious > 0.5, gj, gi] = 0
            best = int(np.argmax(ious))
            mask[b, best, gj, gi] = 1
            tx[b, best, gj, gi], ty[b, best, gj, gi] = gx - gi, gy - gj
            tw[b, best, gj, gi] = math.log(gw / anchors[best][0] + 1e-16)
            th[b, best, gj, gi] = math.log(gh / anchors[best][1] + 1e-16)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    x, y, conf, cls = (sigmoid(pred[..., i]) for i in (0, 1, 4, 5))
    w, h = pred[..., 2], pred[..., 3]
    loss_xy = _mgca_bce(x * mask, tx * mask) + _mgca_bce(y * mask, ty * mask)
    loss_wh = np.mean((w * mask - tw * mask) ** 2) + np.mean((h * mask - th * mask) ** 2)
    loss_conf = _mgca_bce(conf * mask, mask) + 0.5 * _mgca_bce(conf * noobj, noobj * 0.0)
    loss_cls = _mgca_bce(cls * mask, mask)
    return 2.5 * loss_xy + 2.5 * loss_wh + loss_conf + loss_cls


def _mgca_loss(outputs, boxes):
    labels = [[((x1 + x2) / 2 / SIZE, (y1 + y2) / 2 / SIZE, (x2 - x1) / SIZE, (y2 - y1) / SIZE)
               for x1, y1, x2, y2 in image.double().tolist()] for image in boxes]
    anchors = [[(w * SIZE / 416, h * SIZE / 416) for w, h in scale] for scale in ANCHORS_416]
    return sum(_mgca_scale_loss(raw.numpy(), labels, grid, scale)
               for raw, grid, scale in zip(outputs, GRIDS, anchors))


def _slots(box, plus_one):
    """(scale, cell, best anchor) of a box under either IoU, to keep two boxes of an image apart."""
    x1, y1, x2, y2 = box
    slots = []
    for s, grid in enumerate(GRIDS):
        stride = SIZE / grid
        gw, gh = (x2 - x1) / stride, (y2 - y1) / stride
        pad = 1 if plus_one else 0
        ious = [(min(gw, a) + pad) * (min(gh, b) + pad)
                / ((gw + pad) * (gh + pad) + (a + pad) * (b + pad) - (min(gw, a) + pad) * (min(gh, b) + pad))
                for a, b in ((w * SIZE / 416 / stride, h * SIZE / 416 / stride) for w, h in ANCHORS_416[s])]
        slots.append((s, int((x1 + x2) / 2 / stride), int((y1 + y2) / 2 / stride), int(np.argmax(ious))))
    return slots


def _random_batch(seed, n_images=4):
    """Raw predictions of the three scales and 1-3 boxes per image (input pixels), no two of an image
    sharing a cell and best anchor at any scale (where MGCA's later box would overwrite the earlier)."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n_images):
        image, taken = [], set()
        while len(image) < rng.integers(1, 4):
            w, h = rng.uniform(3, 100, 2)
            x1, y1 = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
            box = (x1, y1, x1 + w, y1 + h)
            slots = set(_slots(box, False)) | set(_slots(box, True))
            if slots & taken:
                continue
            taken |= slots
            image.append(box)
        boxes.append(torch.tensor(image, dtype=torch.float32))
    gen = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(n_images, 18, g, g, generator=gen) for g in GRIDS]
    return outputs, boxes


def _anchors():
    return torch.tensor(ANCHORS_416, dtype=torch.float32) * SIZE / 416


def _loss(outputs, boxes, config):
    return float(_batch_loss(outputs, boxes, _anchors(), SIZE, config))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_loss_is_mgcas_yolo_loss(seed):
    outputs, boxes = _random_batch(seed)
    paper = load_task("rsna_det", profile="paper").config
    expected = _mgca_loss(outputs, boxes)
    assert _loss(outputs, boxes, paper) == pytest.approx(expected, abs=1e-6, rel=0)
    canonical = load_task("rsna_det").config
    assert abs(_loss(outputs, boxes, canonical) - expected) > 1e-4  # 100 times the tolerance above


def test_each_mgca_loss_rule_alone_changes_the_loss():
    outputs, boxes = _random_batch(0)
    canonical = load_task("rsna_det").config
    base = _loss(outputs, boxes, canonical)
    for key, value in MGCA_RULES.items():
        assert abs(_loss(outputs, boxes, {**canonical, key: value}) - base) > 1e-4, key
    both = _loss(outputs, boxes, {**canonical, **MGCA_RULES})
    assert both == pytest.approx(_mgca_loss(outputs, boxes), abs=1e-6, rel=0)


def test_mgca_anchor_iou_alone_moves_the_best_anchor_and_the_ignore_set():
    # 4 x 4 px at stride 8 (0.5 x 0.5 cells) against the finest anchors (0.38 x 0.5, 0.62 x 1.15,
    # 1.27 x 0.88 cells): plain IoU 0.77 / 0.35 / 0.22 (only anchor 0 ignored), "+1" 0.92 / 0.65 / 0.53
    # (all three ignored, so the no-object term loses two anchors).
    from vlpbench.protocols.detection import assign_targets

    anchors = _anchors()[2]
    box = [torch.tensor([[60.0, 60.0, 64.0, 64.0]])]
    plain = assign_targets(box, (16, 16), (8.0, 8.0), anchors, 0.5)
    mgca = assign_targets(box, (16, 16), (8.0, 8.0), anchors, 0.5, anchor_iou="mgca")
    assert plain.ignore[0, :, 7, 7].tolist() == [True, False, False]
    assert mgca.ignore[0, :, 7, 7].tolist() == [True, True, True]
    # A box size (in cells) whose best anchor differs between the two IoUs goes to that anchor under each.
    sizes = [(gw, gh) for gw in np.linspace(0.2, 8, 80) for gh in np.linspace(0.2, 8, 80)]
    grid_anchors = (anchors / 8).tolist()

    def best(gw, gh, pad):
        ious = [(min(gw, a) + pad) * (min(gh, b) + pad)
                / ((gw + pad) * (gh + pad) + (a + pad) * (b + pad) - (min(gw, a) + pad) * (min(gh, b) + pad))
                for a, b in grid_anchors]
        return int(np.argmax(ious))

    moved = next((gw, gh) for gw, gh in sizes if best(gw, gh, 0) != best(gw, gh, 1))
    box = [torch.tensor([[8.0, 8.0, 8.0 + 8 * moved[0], 8.0 + 8 * moved[1]]])]
    centre = (int((8 + 4 * moved[1]) // 8), int((8 + 4 * moved[0]) // 8))
    for rule, pad in (("plain", 0), ("mgca", 1)):
        targets = assign_targets(box, (16, 16), (8.0, 8.0), anchors, 0.5, anchor_iou=rule)
        assert targets.positive[0, best(*moved, pad), centre[0], centre[1]]


# ---- MGCA's NMS (detection_utils.non_max_suppression, one class) ----

def _mgca_nms(boxes, scores, conf_threshold, nms_threshold):
    keep = scores >= conf_threshold
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    kept = []
    while len(boxes):
        kept.append((boxes[0], scores[0]))
        ious = np.array([_mgca_bbox_iou(boxes[0], other) for other in boxes[1:]])
        boxes, scores = boxes[1:][ious < nms_threshold], scores[1:][ious < nms_threshold]
    return np.array([b for b, _ in kept]).reshape(-1, 4), np.array([s for _, s in kept])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgca_nms_is_mgcas_greedy_suppression(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (120, 2))
    boxes = np.hstack([xy, xy + rng.uniform(2, 25, (120, 2))]).astype(np.float32)
    scores = rng.uniform(0, 1, 120).astype(np.float32)
    (got_boxes, got_scores), = select_detections(torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None],
                                                 conf_threshold=0.5, nms_threshold=0.5, max_detections=1000,
                                                 nms="mgca")
    want_boxes, want_scores = _mgca_nms(boxes.astype(np.float64), scores.astype(np.float64), 0.5, 0.5)
    assert 5 < len(want_scores) < (scores >= 0.5).sum()
    np.testing.assert_array_equal(got_scores, want_scores)
    np.testing.assert_array_equal(got_boxes, want_boxes)
    (top_boxes, _), = select_detections(torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None],
                                        conf_threshold=0.5, nms_threshold=0.5, max_detections=3, nms="mgca")
    np.testing.assert_array_equal(top_boxes, want_boxes[:3])


@pytest.mark.parametrize("box, plain_iou, mgca_iou", [
    ([0.0, 0.0, 9.0, 4.0], 36 / 81, 0.5),  # "+1" IoU exactly 0.5: MGCA suppresses (>=), torchvision keeps
    ([1.2, 0.0, 4.2, 3.0], 5.4 / 12.6, 11.2 / 20.8),  # plain IoU 0.43, "+1" IoU 0.54
])
def test_mgca_nms_differs_from_torchvisions_where_plus_one_or_at_threshold_bites(box, plain_iou, mgca_iou):
    first = [0.0, 0.0, 9.0, 9.0] if box[2] == 9.0 else [0.0, 0.0, 3.0, 3.0]
    assert _mgca_bbox_iou(first, box) == pytest.approx(mgca_iou) and mgca_iou >= 0.5 > plain_iou
    boxes, scores = torch.tensor([[first, box]]), torch.tensor([[0.9, 0.8]])
    options = {"conf_threshold": 0.5, "nms_threshold": 0.5, "max_detections": 100}
    (_, mgca), = select_detections(boxes, scores, **options, nms="mgca")
    (_, torchvision), = select_detections(boxes, scores, **options)
    np.testing.assert_allclose(mgca, [0.9])
    np.testing.assert_allclose(torchvision, [0.9, 0.8])


# ---- input resize ----

def test_linear_input_is_cv2_inter_linear(tmp_path):
    cv2 = pytest.importorskip("cv2")
    root = tmp_path / "rsna"
    api.synth("rsna", root, n=6, size=150, progress=False)
    source = RsnaSource(root)
    ids = list(source.image_ids)[:6]
    paper = load_task("rsna_det", profile="paper").config
    linear = DetectionImages(source, ids, 48, paper, "test", False).images.numpy().astype(int)
    canonical = DetectionImages(source, ids, 48, load_task("rsna_det").config, "test", False).images.numpy()
    # MGCA: grey DICOM to RGB, then cv2.resize INTER_LINEAR; the grey channels are equal.
    expected = np.stack([cv2.resize(cv2.cvtColor(source.image(i), cv2.COLOR_GRAY2RGB), (48, 48),
                                    interpolation=cv2.INTER_LINEAR)[..., 0] for i in ids]).astype(int)
    assert np.abs(linear - expected).max() <= 1
    assert np.abs(canonical.astype(int) - expected).max() > 1  # the option changes the input


# ---- options and the task files ----

def test_paper_profile_holds_mgcas_settings():
    for name in ("rsna_det", "object_cxr_det"):
        task = load_task(name, profile="paper")
        config = task.config
        assert task.primary_metric == "map_mgca" and config["val_metric"] == "map_mgca"
        assert config["freeze_bn"] is False
        assert (config["anchor_iou"], config["noobj_assigned"], config["nms"], config["input_resize"]) == (
            "mgca", "mgca", "mgca", "linear")
        assert all(s.source.startswith("HKU-MedAI/MGCA ") for s in task.profile_settings())
        assert task.split == "mgca"  # MGCA's own split, reproduced from the public files
        canonical = load_task(name).config
        assert (canonical["anchor_iou"], canonical["noobj_assigned"], canonical["nms"], canonical["input_resize"]) == (
            "plain", "exclude", "torchvision", "antialias")
        # What MGCA shares with canonical stays as it is.
        unchanged = set(canonical) - {s.key for s in task.profile_settings()}
        assert all(config[key] == canonical[key] for key in unchanged)
        assert {"lr", "lr_1pct", "batch_size", "batch_size_1pct", "conf_threshold", "nms_threshold"} <= unchanged
    assert load_task("object_cxr_det", profile="paper").config["polygon_rule"] == "mgca"
    rsna = load_task("rsna_det", profile="paper").config
    assert (rsna["lr"], rsna["batch_size"], rsna["lr_1pct"], rsna["batch_size_1pct"]) == (5e-4, 16, 2e-4, 8)


@pytest.mark.parametrize("key", ["anchor_iou", "noobj_assigned", "nms", "input_resize"])
def test_a_bad_choice_is_refused_at_the_start_naming_the_option_and_its_choices(key):
    config = {**load_task("rsna_det").config, key: "bogus"}
    choices = {"anchor_iou": "'plain', 'mgca'", "noobj_assigned": "'exclude', 'mgca'",
               "nms": "'torchvision', 'mgca'", "input_resize": "'antialias', 'linear'"}[key]
    with pytest.raises(ConfigError, match=f"{key} must be one of {choices}, got 'bogus'"):
        run_detection(None, None, SplitIds([], [], []), config, seed=0, device=torch.device("cpu"))


def test_mgca_map_has_a_ci_over_the_images_mgca_keeps():
    from vlpbench.metrics.detection import DetectionMatches, map_ci
    from vlpbench.protocols.detection import evaluate_detection

    rng = np.random.default_rng(3)
    truths, detections = [], []
    for i in range(30):
        truths.append(np.array([[10.0, 10.0, 40.0, 40.0]]) if i % 3 else np.zeros((0, 4)))
        n = int(rng.integers(0, 3))
        boxes = np.array([[10.0, 10.0, 40.0, 40.0]]) + rng.normal(0, 4, (n, 4))
        detections.append((boxes, rng.random(n)))
    evaluated = evaluate_detection(truths, detections, n_resamples=200, seed=0)
    # the images MGCA keeps: at least one detection and one box, its CI resamples only those
    kept = [i for i in range(30) if len(truths[i]) and len(detections[i][0])]
    direct = map_ci(DetectionMatches([truths[i] for i in kept], [detections[i][0] for i in kept],
                                     [detections[i][1] for i in kept]), n_resamples=200, seed=0)
    assert evaluated["ci"]["map_mgca"]["low"] == pytest.approx(direct["low"])
    assert evaluated["ci"]["map_mgca"]["high"] == pytest.approx(direct["high"])
    assert direct["low"] <= evaluated["metrics"]["map_mgca"] <= direct["high"]
