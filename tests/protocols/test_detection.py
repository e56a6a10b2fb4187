"""Detection protocol: YOLO targets, loss, decoding and NMS; learning on synthetic RSNA; run and score from the CLI."""

import json

import numpy as np
import pytest
import torch

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.object_cxr import ObjectCxrSource
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.splits import load_split
from vlpbench.errors import DataError
from vlpbench.metrics.detection import RECALL_POINTS, detection_map
from vlpbench.predictions import read_coco_results
from vlpbench.protocols import SplitIds
from vlpbench.protocols.detection import (
    PROTOCOL,
    Detector,
    assign_targets,
    decode,
    decode_labels,
    deepest_stages,
    evaluate_detection,
    fraction_settings,
    scaled_anchors,
    select_detections,
    truth_boxes,
    yolo_loss,
)
from vlpbench.tasks import load_task

# The canonical rsna_det protocol at 64 px with a narrower neck and a higher learning rate, so that a
# CPU learns the synthetic opacities in seconds; the record carries these overrides.
FAST = ["image_size=64", "neck_width=128", "lr=0.001", "max_epochs=15", "patience=15", "bootstrap_resamples=200"]
GRIDS = (((2, 2), (32.0, 32.0)), ((4, 4), (16.0, 16.0)), ((8, 8), (8.0, 8.0)))  # 64 px input, coarsest first


def _shape_iou(w, h, anchor_w, anchor_h):
    inter = min(w, anchor_w) * min(h, anchor_h)
    return inter / (w * h + anchor_w * anchor_h - inter)


def test_anchors_are_yolov3s_scaled_to_the_input():
    anchors = scaled_anchors(224)
    assert anchors.shape == (3, 3, 2)
    assert torch.allclose(anchors[0, 0], torch.tensor([116.0, 90.0]) * 224 / 416)
    assert torch.allclose(anchors[2, 2], torch.tensor([33.0, 23.0]) * 224 / 416)


def test_assignment_picks_the_centre_cell_and_best_anchor_shape_and_ignores_close_anchors():
    anchors = scaled_anchors(64)[1]  # stride 16 at 64 px
    box = torch.tensor([[10.0, 12.0, 30.0, 40.0]])  # centre (20, 26), 20 x 28 px
    targets = assign_targets([box, torch.zeros((0, 4))], (4, 4), (16.0, 16.0), anchors, 0.5)
    ious = [_shape_iou(20 / 16, 28 / 16, a[0] / 16, a[1] / 16) for a in anchors.tolist()]
    best = int(np.argmax(ious))
    assert targets.positive.sum() == 1 and targets.positive[0, best, 1, 1]
    assert torch.allclose(targets.offsets[0, best, 1, 1], torch.tensor([20 / 16 - 1, 26 / 16 - 1]))
    expected = torch.log(torch.tensor([20.0, 28.0]) / anchors[best])
    assert torch.allclose(targets.log_sizes[0, best, 1, 1], expected, atol=1e-6)
    assert not targets.ignore.any()  # no anchor shape overlaps a 20 x 28 box by more than 0.5

    # A 20 x 20 box at the coarsest scale overlaps the shapes of anchors 0 and 1 by more than 0.5:
    # anchor 0 fits best and takes it, and both are left out of the no-object loss.
    coarse = scaled_anchors(64)[0]
    targets = assign_targets([torch.tensor([[30.0, 30.0, 50.0, 50.0]])], (2, 2), (32.0, 32.0), coarse, 0.5)
    ious = [_shape_iou(20, 20, *a) for a in coarse.tolist()]
    assert ious[0] > ious[1] > 0.5 > ious[2]
    assert targets.positive[0, 0, 1, 1] and targets.positive.sum() == 1
    assert targets.ignore[0, :, 1, 1].tolist() == [True, True, False] and targets.ignore.sum() == 2


def test_an_assigned_box_decodes_back_to_itself_at_every_scale():
    anchors = scaled_anchors(64)
    boxes = [torch.tensor([[10.0, 12.0, 30.0, 40.0], [41.0, 3.0, 61.5, 21.0]]), torch.zeros((0, 4))]
    for (grid, stride), scale_anchors in zip(GRIDS, anchors):
        targets = assign_targets(boxes, grid, stride, scale_anchors, 0.5)
        pred = torch.full((2, 3, *grid, 6), -30.0)  # objectness ~0 wherever nothing is assigned
        positive = targets.positive
        pred[..., 0:2][positive] = torch.logit(targets.offsets[positive].double()).float()
        pred[..., 2:4][positive] = targets.log_sizes[positive]
        pred[..., 4][positive] = 30.0
        raw = pred.permute(0, 1, 4, 2, 3).reshape(2, 18, *grid)
        decoded, scores = decode(raw, scale_anchors, stride)
        found = decoded[0][scores[0] > 0.5]
        assert len(found) == 2 and not (scores[1] > 0.5).any()
        order = torch.argsort(found[:, 0])
        assert torch.allclose(found[order], boxes[0], atol=1e-4)


def test_yolo_loss_equals_mgcas_masked_mean_formula():
    gen = torch.Generator().manual_seed(0)
    anchors = scaled_anchors(64)[2]
    boxes = [torch.tensor([[10.0, 12.0, 30.0, 40.0]]), torch.tensor([[2.0, 2.0, 9.0, 7.0], [40.0, 30.0, 63.0, 60.0]])]
    targets = assign_targets(boxes, (8, 8), (8.0, 8.0), anchors, 0.5)
    raw = torch.randn(2, 18, 8, 8, generator=gen)
    loss = yolo_loss(raw, targets, box_weight=2.5, noobj_weight=0.5)

    pred = raw.view(2, 3, 6, 8, 8).permute(0, 1, 3, 4, 2)
    mask = targets.positive.float()
    noobj = (~targets.positive & ~targets.ignore).float()
    bce, mse = torch.nn.BCELoss(), torch.nn.MSELoss()
    x, y, conf, cls = (torch.sigmoid(pred[..., i]) for i in (0, 1, 4, 5))
    expected = (2.5 * (bce(x * mask, targets.offsets[..., 0] * mask) + bce(y * mask, targets.offsets[..., 1] * mask)
                       + mse(pred[..., 2] * mask, targets.log_sizes[..., 0] * mask)
                       + mse(pred[..., 3] * mask, targets.log_sizes[..., 1] * mask))
                + bce(conf * mask, mask) + 0.5 * bce(conf * noobj, noobj * 0.0) + bce(cls * mask, mask))
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_selection_thresholds_confidence_then_suppresses_overlaps():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0.5, 0, 10.5, 10], [20, 20, 30, 30], [40, 40, 50, 50],
                           [0, 0, 10, 6]]])
    scores = torch.tensor([[0.8, 0.9, 0.6, 0.4, 0.7]])
    (kept_boxes, kept_scores), = select_detections(boxes, scores, conf_threshold=0.5, nms_threshold=0.5,
                                                   max_detections=100)
    # 0.8 overlaps 0.9 by IoU 0.9 (suppressed); [0,0,10,6] overlaps it by 0.57 (suppressed); 0.4 is below 0.5.
    np.testing.assert_allclose(kept_scores, [0.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose(kept_boxes, [[0.5, 0, 10.5, 10], [20, 20, 30, 30]])
    (_, top), = select_detections(boxes, scores, conf_threshold=0.0, nms_threshold=1.0, max_detections=2)
    np.testing.assert_allclose(top, [0.9, 0.8], rtol=1e-6)


def test_several_classes_get_one_hot_targets_and_mgcas_class_bce():
    gen = torch.Generator().manual_seed(1)
    anchors = scaled_anchors(64)[2]
    boxes = [torch.tensor([[10.0, 12.0, 30.0, 40.0]]), torch.tensor([[2.0, 2.0, 9.0, 7.0], [40.0, 30.0, 63.0, 60.0]])]
    labels = [torch.tensor([2]), torch.tensor([0, 3])]
    targets = assign_targets(boxes, (8, 8), (8.0, 8.0), anchors, 0.5, labels=labels, n_classes=4)
    hot = targets.classes[targets.positive]
    assert hot.shape == (3, 4) and hot.sum(dim=1).tolist() == [1.0, 1.0, 1.0]
    assert sorted(hot.argmax(dim=1).tolist()) == [0, 2, 3]
    raw = torch.randn(2, 3 * 9, 8, 8, generator=gen)
    loss = yolo_loss(raw, targets, box_weight=2.5, noobj_weight=0.5)
    # MGCA's class term: BCE of the masked class scores against the masked one-hot target, a mean over every
    # anchor and class (utils/yolo_loss.py:159); the rest as for one class.
    pred = raw.view(2, 3, 9, 8, 8).permute(0, 1, 3, 4, 2)
    mask = targets.positive.float()
    noobj = (~targets.positive & ~targets.ignore).float()
    bce, mse = torch.nn.BCELoss(), torch.nn.MSELoss()
    x, y, conf = (torch.sigmoid(pred[..., i]) for i in (0, 1, 4))
    cls = torch.sigmoid(pred[..., 5:])
    expected = (2.5 * (bce(x * mask, targets.offsets[..., 0] * mask) + bce(y * mask, targets.offsets[..., 1] * mask)
                       + mse(pred[..., 2] * mask, targets.log_sizes[..., 0] * mask)
                       + mse(pred[..., 3] * mask, targets.log_sizes[..., 1] * mask))
                + bce(conf * mask, mask) + 0.5 * bce(conf * noobj, noobj * 0.0)
                + bce(cls * mask[..., None], targets.classes * mask[..., None]))
    assert torch.allclose(loss, expected, rtol=1e-5)
    # The class of a prediction is its largest class logit, in decode's order.
    assert torch.equal(decode_labels(raw, 3), pred[..., 5:].argmax(-1).reshape(2, -1))


@pytest.mark.parametrize("nms", ["torchvision", "mgca"])
def test_suppression_runs_within_each_class(nms):
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0.5, 0, 10.5, 10], [0, 0, 10, 10.5], [20, 20, 30, 30]]])
    scores = torch.tensor([[0.8, 0.9, 0.7, 0.6]])
    labels = torch.tensor([[0, 0, 1, 1]])
    (kept_boxes, kept_scores, kept_labels), = select_detections(boxes, scores, conf_threshold=0.5, nms_threshold=0.5,
                                                                max_detections=100, nms=nms, labels=labels)
    # 0.8 is suppressed by 0.9 of its class; 0.7 overlaps 0.9 as much but is of another class: kept.
    np.testing.assert_allclose(kept_scores, [0.9, 0.7, 0.6], rtol=1e-6)
    assert kept_labels.tolist() == [0, 1, 1] and kept_boxes.shape == (3, 4)
    (_, top, _), = select_detections(boxes, scores, conf_threshold=0.0, nms_threshold=1.0, max_detections=2, nms=nms,
                                     labels=labels)
    np.testing.assert_allclose(top, [0.9, 0.8], rtol=1e-6)


def test_class_detections_round_trip_through_the_predictions_file_and_score_the_same(tmp_path):
    from vlpbench.predictions import write_detections

    rng = np.random.default_rng(2)
    truths = [np.array([[0.0, 0, 20, 20], [30, 30, 60, 50]]), np.zeros((0, 4)), np.array([[5.0, 5, 25, 40]])]
    truth_labels = [np.array([0, 2]), np.zeros(0, dtype=np.int64), np.array([1])]
    detections = [(t + rng.normal(0, 1, t.shape), rng.random(len(t)), (l + k) % 3)
                  for k, (t, l) in enumerate(zip(truths, truth_labels))]
    ids = ["a", "b", "c"]
    path = write_detections(tmp_path, ids, detections, multiclass=True)
    assert {e["category_id"] for e in json.loads(path.read_text())} <= {0, 1, 2}
    read = read_coco_results(path, ids, n_classes=3)
    for image_id, (boxes, scores, labels) in zip(ids, detections):
        np.testing.assert_allclose(read[image_id][0], boxes, atol=1e-9)
        assert read[image_id][1].tolist() == scores.tolist() and read[image_id][2].tolist() == labels.tolist()
    direct = evaluate_detection(truths, detections, n_resamples=20, seed=0, ids=ids, truth_labels=truth_labels,
                                n_classes=3)
    again = evaluate_detection(truths, [read[i] for i in ids], n_resamples=20, seed=0, ids=ids,
                               truth_labels=truth_labels, n_classes=3)
    assert again["metrics"] == direct["metrics"] and again["ci"] == direct["ci"]
    statistics = direct["evidence"].statistics()  # paired tests recompute the macro mAPs from the evidence
    weights = np.ones(3)
    assert statistics["map"](weights) == pytest.approx(direct["metrics"]["map"], abs=1e-12)
    assert statistics["ap40"](weights) == pytest.approx(direct["metrics"]["ap40"], abs=1e-12)
    expected = detection_map(truths, [d[0] for d in detections], [d[1] for d in detections],
                             truth_labels=truth_labels, labels=[d[2] for d in detections], n_classes=3)
    assert direct["metrics"]["map"] == pytest.approx(expected["map"], abs=1e-12)
    entries = json.loads(path.read_text())
    del entries[0]["category_id"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="entry 0: missing key 'category_id'"):
        read_coco_results(path, ids, n_classes=3)
    entries[0]["category_id"] = 3
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 0: 'category_id' must be the class index, an integer in 0..2"):
        read_coco_results(path, ids, n_classes=3)


def test_a_four_stage_encoder_uses_its_own_deepest_three_maps():
    from segmentation_models_pytorch.encoders import get_encoder

    encoder = get_encoder("resnet18", weights=None, depth=4)  # ends at stride 16, like MedKLIP's layer3
    stages = deepest_stages(encoder, 64)
    assert [(s.index, s.stride, s.channels) for s in stages] == [(2, 4.0, 64), (3, 8.0, 128), (4, 16.0, 256)]
    outputs = Detector(encoder, stages, 32)(torch.zeros(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 18, 4, 4), (2, 18, 8, 8), (2, 18, 16, 16)]
    assert not any(p.requires_grad for p in encoder.parameters())


def test_task_files_carry_mgcas_settings_per_fraction():
    rsna, object_cxr = load_task("rsna_det"), load_task("object_cxr_det")
    assert fraction_settings(rsna.config, 0.01) == (2e-4, 8)
    assert fraction_settings(object_cxr.config, 0.01) == (2.5e-4, 8)
    assert fraction_settings(rsna.config, 0.1) == fraction_settings(rsna.config, 1.0) == (5e-4, 16)
    assert rsna.primary_metric == "map" and rsna.fractions == object_cxr.fractions == (0.01, 0.1, 1.0)
    config = rsna.config
    assert (config["conf_threshold"], config["nms_threshold"], config["weight_decay"]) == (0.5, 0.5, 1e-6)


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=300, size=64, progress=False)
    return root


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    from segmentation_models_pytorch.encoders import get_encoder

    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(get_encoder("resnet18", weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def record(rsna_root, resnet18_checkpoint, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    argv = ["-q", "run", "--model", "generic", "--checkpoint", str(resnet18_checkpoint), "--model-option",
            "arch=resnet18", "--task", "rsna_det", "--frac", "1.0", "--data-root", str(rsna_root),
            "--results", str(results), "--device", "cpu"]
    for override in FAST:
        argv += ["--set", override]
    # One thread: on these tiny tensors a second one only adds synchronisation, which costs many times
    # the work itself when other processes share the cores.
    assert main([*argv, "--threads", "1"]) == 0
    (path,) = (results / "runs").rglob("*.json")
    return json.loads(path.read_text())


def _test_truths(root):
    source = RsnaSource(root)
    ids, _ = api.split_ids(load_split("rsna"), "test", source)
    return source, ids, [source.boxes(i) for i in ids]


def test_training_reaches_map_far_above_random_boxes(record, rsna_root):
    source, ids, truths = _test_truths(rsna_root)
    train_ids, _ = api.split_ids(load_split("rsna"), "train", source)
    sizes = np.concatenate([source.boxes(i) for i in train_ids])
    sizes = sizes[:, 2:] - sizes[:, :2]
    rng = np.random.default_rng(0)
    # Chance: per image 3 boxes of real training-box sizes at random places, with random scores.
    chance = []
    for _ in range(20):
        boxes, scores = [], []
        for image_id in ids:
            height, width = source.image_size(image_id)
            wh = sizes[rng.integers(len(sizes), size=3)]
            centre = rng.uniform(0, 1, (3, 2)) * [width, height]
            boxes.append(np.hstack([centre - wh / 2, centre + wh / 2]))
            scores.append(rng.random(3))
        chance.append(detection_map(truths, boxes, scores)["map"])
    chance_level = float(np.mean(chance))
    metrics = record["metrics"]
    assert chance_level < 0.005
    assert metrics["map"] > max(0.03, 10 * chance_level)
    assert metrics["ap40"] >= metrics["ap50"] >= metrics["ap75"]
    assert record["ci"]["map"]["low"] <= metrics["map"] <= record["ci"]["map"]["high"]


def test_record_has_map_counts_and_the_training_choices(record, rsna_root):
    _, ids, truths = _test_truths(rsna_root)
    assert record["primary_metric"] == "map" and {"map", "ap40", "ap50", "ap75", "map_mgca"} <= set(record["metrics"])
    positives = sum(1 for t in truths if len(t))
    assert record["n"]["test"] == len(ids) and record["n"]["test_positive"] == positives
    assert record["n"]["test_negative"] == len(ids) - positives
    assert record["n"]["test_boxes"] == sum(map(len, truths))
    training = record["config"]["training"]
    assert [(s["stride"], s["channels"]) for s in training["stages_used"]] == [(8.0, 128), (16.0, 256), (32.0, 512)]
    assert (training["lr"], training["batch_size"]) == (0.001, 16)
    memory, batch = {"storage": "memory", "dtype": "float32"}, {"storage": "batch", "dtype": "float32"}
    assert training["features"] == {"train": memory, "val": memory, "test": batch}
    assert 1 <= training["best_epoch"] <= training["epochs"] <= 15
    assert record["config"]["lr"] == 0.001 and record["per_image"] == {}


def _coco(image_id, box, score):
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def test_score_from_the_cli_gives_the_hand_computed_map(rsna_root, tmp_path, capsys):
    _, ids, truths = _test_truths(rsna_root)
    positive = [(i, t) for i, t in zip(ids, truths) if len(t)]
    negative = next(i for i, t in zip(ids, truths) if not len(t))
    missed = len(positive[0][1])  # the first positive image gets no prediction
    entries = [_coco(i, box, 0.9) for i, t in positive[1:] for box in t]
    entries.append(_coco(negative, [0, 0, 20, 20], 0.95))  # one confident false positive, ranked first
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(entries))

    assert main(["score", "--task", "rsna_det", "--predictions", str(predictions), "--data-root", str(rsna_root),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Ranked: the false positive, then every found box: precision k / (k + 1) rises to found / (found + 1),
    # which the envelope gives to every recall point up to found / total; the rest are 0.
    total = sum(len(t) for t in truths)
    found = total - missed
    expected = found / (found + 1) * np.sum(RECALL_POINTS <= found / total) / len(RECALL_POINTS)
    assert result["metrics"]["map"] == pytest.approx(expected, abs=1e-9)
    assert result["metrics"]["ap75"] == pytest.approx(expected, abs=1e-9)
    assert result["metrics"]["map_mgca"] == pytest.approx(1.0 / (1 + np.spacing(1)), abs=1e-9)
    assert result["n"]["test"] == len(ids) and result["ci"]["map"]["low"] <= expected <= result["ci"]["map"]["high"]


def test_predictions_outside_the_split_or_malformed_are_data_errors(tmp_path):
    path = tmp_path / "p.json"
    ids = ["a", "b"]

    def read(entries):
        path.write_text(json.dumps(entries))
        return read_coco_results(path, ids)

    got = read([{"image_id": "a", "bbox": [1, 2, 3, 4], "score": 0.5}])
    np.testing.assert_allclose(got["a"][0], [[1, 2, 4, 6]]) and np.testing.assert_allclose(got["a"][1], [0.5])
    assert got["b"][0].shape == (0, 4)
    with pytest.raises(DataError, match="outside the split.*'zz'"):
        read([{"image_id": "zz", "bbox": [1, 2, 3, 4], "score": 0.5}])
    with pytest.raises(DataError, match="entry 1: missing key 'score'"):
        read([{"image_id": "a", "bbox": [1, 2, 3, 4], "score": 0.5}, {"image_id": "a", "bbox": [1, 2, 3, 4]}])
    with pytest.raises(DataError, match="entry 0: 'bbox' must be"):
        read([{"image_id": "a", "bbox": [1, 2, 3], "score": 0.5}])
    with pytest.raises(DataError, match="entry 0: 'bbox' width and height"):
        read([{"image_id": "a", "bbox": [1, 2, -3, 4], "score": 0.5}])
    with pytest.raises(DataError, match="entry 0: 'image_id' must be"):
        read([{"image_id": 7, "bbox": [1, 2, 3, 4], "score": 0.5}])
    with pytest.raises(DataError, match="JSON list"):
        read({"image_id": "a"})


def test_object_cxr_scoring_reads_only_labels_and_follows_the_polygon_rule(tmp_path):
    root = tmp_path / "object_cxr"
    api.synth("object_cxr", root, n=30, size=64, progress=False)
    source = ObjectCxrSource(root)
    for image in root.rglob("*.jpg"):
        image.unlink()  # scoring must not need the images
    ids = [i for i in source.image_ids if source.part(i) == "dev"]
    config = load_task("object_cxr_det").config
    entries = [_coco(i, box, 0.8) for i in ids for box in source.boxes(i)]
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps(entries))
    result = PROTOCOL.score(predictions, source, SplitIds([], [], ids), {**config, "bootstrap_resamples": 50})
    assert result["metrics"]["map"] == pytest.approx(1.0, abs=1e-9) and result["n"]["test"] == len(ids)
    # The task's polygon_rule reaches the reader: MGCA's polylabel-centred boxes on request.
    mgca = truth_boxes(source, ids, {**config, "polygon_rule": "mgca"})
    assert all(np.array_equal(m, source.boxes(i, polygon_rule="mgca")) for m, i in zip(mgca, ids))
    assert any(not np.allclose(m, source.boxes(i)) for m, i in zip(mgca, ids))


def test_object_cxr_det_runs_from_the_cli_on_its_derived_split(tmp_path, resnet18_checkpoint):
    root = tmp_path / "object_cxr"
    api.synth("object_cxr", root, n=60, size=64, progress=False)
    results = tmp_path / "results"
    argv = ["-q", "run", "--model", "generic", "--checkpoint", str(resnet18_checkpoint), "--model-option",
            "arch=resnet18", "--task", "object_cxr_det", "--frac", "1.0", "--data-root", str(root),
            "--results", str(results), "--device", "cpu", "--set", "image_size=64", "--set", "max_epochs=1",
            "--set", "neck_width=32", "--set", "batch_size=8", "--set", "bootstrap_resamples=20"]
    assert main(argv) == 0
    (path,) = (results / "runs").rglob("*.json")
    record = json.loads(path.read_text())
    source = ObjectCxrSource(root)
    dev = [i for i in source.image_ids if source.part(i) == "dev"]
    # Object-CXR's test set is its dev part; every dev image is scored, with or without a detection.
    assert record["n"]["test"] == len(dev) and record["split"]["dataset"] == "object_cxr"
    assert 0.0 <= record["metrics"]["map"] <= 1.0 and record["primary_metric"] == "map"
    assert record["ci"]["map"]["low"] <= record["metrics"]["map"] <= record["ci"]["map"]["high"]
