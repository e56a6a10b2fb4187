"""Detection mAP against pycocotools' COCOeval (the definition it pins), MGCA's skipping, the bootstrap."""

import contextlib
import io

import numpy as np
import pytest

from vlpbench.errors import DataError
from vlpbench.metrics.detection import (
    IOU_THRESHOLDS,
    ClassMatches,
    DetectionMatches,
    box_iou,
    detection_map,
    map_ci,
    match_image,
)

pycocotools = pytest.importorskip("pycocotools")


def coco_reference(truths, boxes, scores, truth_labels=None, labels=None, n_classes=1, iou_thresholds=IOU_THRESHOLDS):
    """(mAP, AP per threshold) from COCOeval bbox, area all, maxDets 100, our thresholds, categories
    ``1..n_classes`` (``useCats``; one category without labels); NaN where pycocotools reports -1 (no ground
    truth). Its summary's mean skips the -1 entries of a category without ground truth (macro over classes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box):
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    truth_labels = truth_labels or [np.zeros(len(t), dtype=int) for t in truths]
    labels = labels or [np.zeros(len(b), dtype=int) for b in boxes]
    images = [{"id": i + 1} for i in range(len(truths))]  # ids in list order: COCOeval sorts image ids
    pairs = [(i + 1, b, c) for i, (image_truths, image_labels) in enumerate(zip(truths, truth_labels))
             for b, c in zip(image_truths, image_labels)]
    annotations = [{"id": k + 1, "image_id": image_id, "category_id": int(c) + 1, "bbox": xywh(b),
                    "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
                   for k, (image_id, b, c) in enumerate(pairs)]
    results = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s)}
               for i, (image_boxes, image_scores, image_labels) in enumerate(zip(boxes, scores, labels))
               for b, s, c in zip(image_boxes, image_scores, image_labels)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c + 1} for c in range(n_classes)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.params.iouThrs = np.array(iou_thresholds, dtype=np.float64)
        evaluation.params.maxDets = [1, 10, 100]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, 2]  # (T, R, K) at area "all", maxDets 100
    if (precision <= -1).all():
        return float("nan"), np.full(len(iou_thresholds), np.nan)
    per_threshold = [float(p[p > -1].mean()) for p in precision]
    return float(precision[precision > -1].mean()), np.array(per_threshold)


def random_scene(rng, n_images, max_truths=4, max_detections=8, tie_scores=False):
    """Images with random boxes; most detections jitter a true box, so every IoU threshold sees hits
    and misses; some images have no truth, no detection, or neither."""
    truths, boxes, scores = [], [], []
    for _ in range(n_images):
        n_truth = int(rng.integers(0, max_truths + 1))
        xy = rng.uniform(0, 200, (n_truth, 2))
        truth = np.hstack([xy, xy + rng.uniform(10, 80, (n_truth, 2))])
        n_det = int(rng.integers(0, max_detections + 1))
        det = np.empty((n_det, 4))
        for d in range(n_det):
            if n_truth and rng.random() < 0.7:
                base = truth[rng.integers(n_truth)]
                size = base[2:] - base[:2]
                det[d] = base + np.tile(size, 2) * rng.normal(0, 0.12, 4)
            else:
                corner = rng.uniform(0, 200, 2)
                det[d] = np.hstack([corner, corner + rng.uniform(5, 80, 2)])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        score = np.round(rng.random(n_det), 1) if tie_scores else rng.random(n_det)
        truths.append(truth)
        boxes.append(det)
        scores.append(score)
    return truths, boxes, scores


@pytest.mark.parametrize("seed,tie_scores", [(0, False), (1, False), (2, True), (3, True), (4, False)])
def test_map_equals_pycocotools_on_random_scenes(seed, tie_scores):
    rng = np.random.default_rng(seed)
    truths, boxes, scores = random_scene(rng, n_images=40, tie_scores=tie_scores)
    truths += [np.zeros((0, 4)), np.array([[5.0, 5, 30, 30]])]  # an empty image; a missed box
    boxes += [np.zeros((0, 4)), np.zeros((0, 4))]
    scores += [np.zeros(0), np.zeros(0)]
    expected_map, expected_per_threshold = coco_reference(truths, boxes, scores)
    result = detection_map(truths, boxes, scores)
    assert 0.05 < expected_map < 0.95  # a scene where matching decides the value
    assert result["map"] == pytest.approx(expected_map, abs=1e-12)
    got = [result[f"ap{round(t * 100)}"] for t in IOU_THRESHOLDS]
    np.testing.assert_allclose(got, expected_per_threshold, atol=1e-12)
    assert result["n_images"] == len(truths) and result["n_truths"] == sum(map(len, truths))


def test_map_equals_pycocotools_with_more_than_100_detections_and_false_positives_on_negatives():
    rng = np.random.default_rng(7)
    truths, boxes, scores = random_scene(rng, n_images=10)
    crowd = np.hstack([rng.uniform(0, 150, (150, 2)), np.zeros((150, 2))])
    crowd[:, 2:] = crowd[:, :2] + rng.uniform(10, 60, (150, 2))
    crowd[:20] = np.tile(truths[0][:1], (20, 1)) if len(truths[0]) else crowd[:20]
    truths.append(np.array([[0.0, 0, 50, 50]]))
    boxes.append(np.vstack([crowd, [[0.0, 0, 50, 50]]]))
    scores.append(np.append(rng.random(150), 0.001))  # the perfect box ranks 151st: cut by maxDets
    truths.append(np.zeros((0, 4)))  # a negative image with confident false positives
    boxes.append(np.array([[10.0, 10, 60, 60], [100, 100, 140, 150]]))
    scores.append(np.array([0.99, 0.98]))
    expected_map, _ = coco_reference(truths, boxes, scores)
    assert detection_map(truths, boxes, scores)["map"] == pytest.approx(expected_map, abs=1e-12)


def test_perfect_detections_score_one_and_no_truth_is_undefined():
    truth = [np.array([[0.0, 0, 10, 10], [20, 20, 40, 50]]), np.zeros((0, 4))]
    perfect = detection_map(truth, [truth[0], np.zeros((0, 4))], [np.array([0.9, 0.8]), np.zeros(0)])
    assert perfect["map"] == pytest.approx(1.0, abs=1e-12) and perfect["ap75"] == pytest.approx(1.0, abs=1e-12)
    empty = detection_map([np.zeros((0, 4))], [np.array([[0.0, 0, 1, 1]])], [np.array([0.5])])
    assert np.isnan(empty["map"])
    assert np.isnan(coco_reference([np.zeros((0, 4))], [np.array([[0.0, 0, 1, 1]])], [np.array([0.5])])[0])


def test_iou_is_plain_area_ratio_without_the_pixel_convention():
    iou = box_iou(np.array([[0.0, 0, 10, 10]]), np.array([[5.0, 0, 15, 10], [10.0, 0, 20, 10], [0.0, 0, 10, 10]]))
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])


def test_matching_takes_the_best_overlap_and_each_truth_once():
    truths = np.array([[0.0, 0, 10, 10], [0.0, 0, 10, 12]])
    boxes = np.array([[0.0, 0, 10, 11.9], [0.0, 0, 10, 10]])  # the first overlaps truth 1 best
    scores, hits = match_image(boxes, np.array([0.9, 0.8]), truths, np.array([0.5, 0.95]))
    np.testing.assert_array_equal(scores, [0.9, 0.8])
    # At 0.5 both match (to truths 1 and 0); at 0.95 only the first box (IoU 11.9/12 with truth 1)
    # and the second box exactly on truth 0.
    np.testing.assert_array_equal(hits, [[True, True], [True, True]])
    _, hits = match_image(boxes[:1].repeat(2, 0), np.array([0.9, 0.8]), truths[1:], np.array([0.5]))
    np.testing.assert_array_equal(hits, [[True, False]])  # a second box on a taken truth is a false positive


def test_mgca_protocol_skips_images_without_detection_or_truth():
    truths = [np.array([[0.0, 0, 10, 10]]),  # found
              np.array([[50.0, 50, 70, 70]]),  # missed: no detection at all -> MGCA skips the image
              np.zeros((0, 4))]  # false positive on a negative image -> MGCA skips it
    boxes = [np.array([[0.0, 0, 10, 10]]), np.zeros((0, 4)), np.array([[0.0, 0, 5, 5]])]
    scores = [np.array([0.6]), np.zeros(0), np.array([0.9])]
    mgca = detection_map(truths, boxes, scores, protocol="mgca")
    assert mgca["map"] == pytest.approx(1.0, abs=1e-12) and mgca["n_images"] == 1
    # Every image: detections [FP 0.9, TP 0.6] over 2 truths; precision 0.5 up to recall 0.5, then 0.
    coco = detection_map(truths, boxes, scores)
    assert coco["map"] == pytest.approx(0.5 * 51 / 101, abs=1e-9)
    assert coco["map"] == pytest.approx(coco_reference(truths, boxes, scores)[0], abs=1e-12)
    with pytest.raises(ValueError, match="protocol"):
        detection_map(truths, boxes, scores, protocol="torchmetrics")


def labelled_scene(rng, n_images, n_classes):
    """:func:`random_scene` with a class per box; a detection near a truth mostly takes its class."""
    truths, boxes, scores = random_scene(rng, n_images)
    truth_labels = [rng.integers(0, n_classes, len(t)) for t in truths]
    labels = []
    for truth, classes, det in zip(truths, truth_labels, boxes):
        guess = rng.integers(0, n_classes, len(det))
        if len(truth):
            nearest = np.argmax(box_iou(det, truth), axis=1) if len(det) else np.zeros(0, dtype=int)
            guess = np.where(rng.random(len(det)) < 0.8, classes[nearest], guess)
        labels.append(guess.astype(np.int64))
    return truths, truth_labels, boxes, scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_map_over_classes_equals_pycocotools_with_categories(seed):
    rng = np.random.default_rng(seed)
    n_classes = 4
    truths, truth_labels, boxes, scores, labels = labelled_scene(rng, 40, n_classes)
    # Class 3 has detections but no ground truth: pycocotools leaves it out of the mean (-1), as we do.
    truth_labels = [np.minimum(l, 2) for l in truth_labels]
    expected, expected_per_threshold = coco_reference(truths, boxes, scores, truth_labels, labels, n_classes)
    result = detection_map(truths, boxes, scores, truth_labels=truth_labels, labels=labels, n_classes=n_classes)
    assert 0.05 < expected < 0.95
    assert result["map"] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose([result[f"ap{round(t * 100)}"] for t in IOU_THRESHOLDS], expected_per_threshold,
                               atol=1e-12)
    # The VinDr-CXR challenge's threshold alone: mAP at IoU 0.4.
    at_40, _ = coco_reference(truths, boxes, scores, truth_labels, labels, n_classes, iou_thresholds=[0.4])
    assert result["ap40"] == pytest.approx(at_40, abs=1e-12)
    # Macro, not micro: the mean of the per-class mAPs, not the mAP of the pooled detections.
    matches = ClassMatches(truths, truth_labels, boxes, scores, labels, n_classes)
    per_class = matches.class_mean_average_precision()
    assert np.isnan(per_class[3]) and result["map"] == pytest.approx(np.mean(per_class[:3]), abs=1e-12)
    pooled = detection_map(truths, boxes, scores)["map"]
    assert abs(pooled - result["map"]) > 1e-3
    # Resampled images: the same as pycocotools on the resampled list.
    idx = np.sort(rng.integers(0, 40, 40))
    expected_resample, _ = coco_reference([truths[i] for i in idx], [boxes[i] for i in idx], [scores[i] for i in idx],
                                          [truth_labels[i] for i in idx], [labels[i] for i in idx], n_classes)
    assert matches.mean_average_precision(np.bincount(idx, minlength=40)) == pytest.approx(expected_resample,
                                                                                           abs=1e-12)


def test_one_class_of_class_matches_is_the_single_class_map():
    truths, boxes, scores = random_scene(np.random.default_rng(3), n_images=25)
    zeros = [np.zeros(len(b), dtype=np.int64) for b in boxes]
    single = detection_map(truths, boxes, scores)
    multi = detection_map(truths, boxes, scores, truth_labels=[np.zeros(len(t), dtype=np.int64) for t in truths],
                          labels=zeros, n_classes=1)
    assert single == multi  # bit for bit


def test_class_labels_are_checked():
    with pytest.raises(DataError, match="class label outside 0..1"):
        ClassMatches([np.array([[0.0, 0, 1, 1]])], [np.array([2])], [np.zeros((0, 4))], [np.zeros(0)],
                     [np.zeros(0, dtype=int)], 2)
    with pytest.raises(DataError, match="1 boxes but 0 class labels"):
        ClassMatches([np.zeros((0, 4))], [np.zeros(0, dtype=int)], [np.zeros((1, 4))], [np.zeros(1)],
                     [np.zeros(0, dtype=int)], 2)


def test_resample_counts_equal_the_explicitly_resampled_image_list():
    rng = np.random.default_rng(11)
    truths, boxes, scores = random_scene(rng, n_images=30)
    matches = DetectionMatches(truths, boxes, scores)
    for _ in range(3):
        idx = np.sort(rng.integers(0, 30, 30))  # copies side by side, images in index order
        expected, _ = coco_reference([truths[i] for i in idx], [boxes[i] for i in idx], [scores[i] for i in idx])
        got = matches.mean_average_precision(np.bincount(idx, minlength=30))
        assert got == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_brackets_the_map_and_is_deterministic():
    truths, boxes, scores = random_scene(np.random.default_rng(5), n_images=60)
    matches = DetectionMatches(truths, boxes, scores)
    ci = map_ci(matches, n_resamples=200, seed=3)
    value = matches.mean_average_precision()
    assert ci["low"] < value < ci["high"] and ci["n_resamples"] == 200
    assert ci == map_ci(matches, n_resamples=200, seed=3)


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="image 0 has 1 boxes but 2 scores"):
        DetectionMatches([np.zeros((0, 4))], [np.zeros((1, 4))], [np.zeros(2)])
    with pytest.raises(DataError, match=r"\(N, 4\)"):
        DetectionMatches([np.zeros((1, 3))], [np.zeros((0, 4))], [np.zeros(0)])
    with pytest.raises(DataError, match="non-finite score"):
        DetectionMatches([np.zeros((0, 4))], [np.zeros((1, 4))], [np.array([np.nan])])
