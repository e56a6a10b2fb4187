"""The ``paper`` profile of the grounding tasks (MedKLIP's RSNA grounding script) and the truth resize of both
profiles, each checked against a computation written here: scikit-image's ``equalize_hist``, torchvision's
tensor ``Resize(NEAREST)``, ``np.repeat`` for MedKLIP's ``repeat(16)``, and the scores of MedKLIP's
``score_cal`` rules (positives only, ``map > 0.008``, any tied maximum inside the box) spelled out by hand.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpbench import api
from vlpbench.adapters.base import Adapter
from vlpbench.data.cache import cached_images, resize_image
from vlpbench.data.splits import dataset_split
from vlpbench.errors import ConfigError
from vlpbench.protocols import SplitIds
from vlpbench.protocols.grounding import (
    MedKLIPRead,
    equalize_hist,
    medklip_read,
    prepare_heatmap,
    resize_truth,
    run_grounding_task,
)
from vlpbench.tasks import load_task
from vlpbench.testing.weightless import WeightlessAdapter

GROUNDING_TASKS = ("rsna_ground", "siim_ground", "ms_cxr_ground")


def _images(seed: int) -> list[np.ndarray]:
    """uint8 test images: full range, a narrow range, a skewed one, one with few grey levels."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (97, 131), dtype=np.uint8),
            rng.integers(90, 141, (128, 128), dtype=np.uint8),
            (rng.beta(2.0, 6.0, (200, 150)) * 255).astype(np.uint8),
            rng.choice(np.array([3, 40, 41, 200], dtype=np.uint8), (64, 80))]


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_equalisation_equals_scikit_image(seed):
    exposure = pytest.importorskip("skimage.exposure")
    for pixels in _images(seed):
        scaled = pixels.astype(float) / 255.0  # MedKLIP: pixel_array.astype(float) / 255.
        reference = exposure.equalize_hist(scaled)
        assert equalize_hist(scaled) == pytest.approx(reference, abs=1e-12)
        # After MedKLIP's (255 * img).astype(np.uint8): within one grey level (here exactly equal).
        expected = (255 * reference).astype(np.uint8)
        assert np.abs(medklip_read(pixels).astype(int) - expected.astype(int)).max() <= 1
        assert medklip_read(pixels).dtype == np.uint8 and medklip_read(pixels).shape == pixels.shape


def test_the_package_does_not_import_scikit_image():
    import vlpbench.protocols.grounding as grounding

    source = open(grounding.__file__).read()
    assert "skimage" not in source.replace("skimage.exposure.equalize_hist", "")


def _box_masks(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    for shape in [(1024, 1024), (1024, 1024), (1000, 800), (64, 64), (300, 517)]:
        mask = np.zeros(shape)
        for _ in range(3):  # boxes filled as MedKLIP's loader fills them: rows y:y+h, columns x:x+w
            y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
            h, w = rng.integers(1, shape[0] - y), rng.integers(1, shape[1] - x)
            mask[y:y + h, x:x + w] = 1
        masks.append(mask)
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truth_resize_equals_torchvision_tensor_nearest(seed):
    transforms = pytest.importorskip("torchvision.transforms")
    resize = transforms.Resize([224, 224], interpolation=transforms.InterpolationMode.NEAREST)
    for mask in _box_masks(seed):
        # MedKLIP: ToTensor() on the float64 mask (no scaling for float input), then Resize NEAREST.
        reference = resize(transforms.ToTensor()(mask))[0].numpy() > 0
        assert resize_truth(mask, 224).dtype == bool
        np.testing.assert_array_equal(resize_truth(mask, 224), reference)


def test_pillow_nearest_would_shift_box_edges():
    mask = np.zeros((1024, 1024), dtype=np.uint8)
    mask[100:500, 200:700] = 1
    pillow = np.asarray(Image.fromarray(mask).resize((224, 224), Image.NEAREST)) > 0
    floor = resize_truth(mask, 224)
    rows = np.flatnonzero(floor.any(axis=1))
    pillow_rows = np.flatnonzero(pillow.any(axis=1))
    # Source rows 100..499. floor(i * 32 / 7) keeps output rows 22..109; Pillow's centres,
    # floor((i + 0.5) * 32 / 7), keep 22..108: the bottom edge moves up one output row.
    assert (rows.min(), rows.max()) == (22, 109)
    assert (pillow_rows.min(), pillow_rows.max()) == (22, 108)


def test_nearest_upsampling_is_medklips_repeat_16():
    raw = np.random.default_rng(0).random((14, 14)).astype(np.float32)
    heat = prepare_heatmap(raw, (224, 224), {"upsample": "nearest", "normalize": "none"})
    np.testing.assert_array_equal(heat, raw.repeat(16, axis=0).repeat(16, axis=1))


def test_medklip_reader_pickles_and_is_cached_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    api.synth("rsna", tmp_path / "rsna", n=6, size=48, progress=False)
    spec = load_task("rsna_ground")
    source = api.open_dataset(spec, tmp_path / "rsna")
    ids = list(source.image_ids)[:4]
    wrapped = pickle.loads(pickle.dumps(MedKLIPRead(source)))  # what the cache's worker processes receive
    np.testing.assert_array_equal(wrapped.image(ids[0]), medklip_read(source.image(ids[0])))
    plain = np.array(cached_images(source, "rsna", ids, 32, workers=1, progress=False))
    equalised = np.array(cached_images(MedKLIPRead(source), "rsna", ids, 32, workers=1, progress=False))
    np.testing.assert_array_equal(plain, np.stack([resize_image(source.image(i), 32) for i in ids]))
    np.testing.assert_array_equal(equalised, np.stack([resize_image(medklip_read(source.image(i)), 32) for i in ids]))
    assert not np.array_equal(plain, equalised)


def test_profiles_of_the_grounding_tasks():
    for name in GROUNDING_TASKS:
        task = load_task(name)
        assert task.version == 2  # the truth resize changed
        assert task.config["image_read"] == "cache" and task.config["eval_size"] == 224
        assert task.config["normalize"] == "minmax" and task.config["threshold_source"] == "val"
    for name in ("rsna_ground", "siim_ground"):
        paper = load_task(name, profile="paper")
        assert paper.profile == "paper"
        expected = {"image_read": "medklip", "upsample": "nearest", "normalize": "none",
                    "threshold_source": "fixed", "threshold": 0.008, "eval_resolution": "fixed", "eval_size": 224}
        assert {key: paper.config[key] for key in expected} == expected
        sources = {setting.key: setting.source for setting in paper.profile_settings()}
        assert set(sources) - {"split"} == {"image_read", "upsample", "normalize", "threshold_source", "threshold"}
        assert all("MedKLIP Sample_Zero-Shot_Grounding_RSNA/" in text for text in sources.values())
        # RSNA runs on MedKLIP's public test list; SIIM's is unreleased
        assert paper.split == ("medklip" if name == "rsna_ground" else "v1")
    with pytest.raises(ConfigError, match="no reference code"):
        load_task("ms_cxr_ground", profile="paper")


class AttentionModel(WeightlessAdapter):
    """MedKLIP-shaped maps: a softmax over 14×14 patches of local brightness (sums to 1, uniform = 1/196),
    at 224² input. It records the uint8 images the protocol gives it."""

    name = "grounding-test-attention"
    description = "test model: softmax attention over 14x14 patches of brightness"
    capabilities = frozenset({"grounding"})
    native_capabilities = frozenset({"grounding"})
    free_text = False
    image_size = 224
    seen: list[np.ndarray] = []

    def preprocess(self, images):
        type(self).seen.extend(images[:, 0].cpu().numpy())
        return super().preprocess(images)

    def grounding_maps(self, images, texts):
        level = F.avg_pool2d(images.mean(1, keepdim=True), 16)  # (B, 1, 14, 14)
        attention = torch.softmax(8.0 * level.flatten(1), dim=1).reshape(level.shape)
        return attention.expand(-1, len(texts), -1, -1)


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding_paper") / "rsna"
    api.synth("rsna", root, n=40, size=64, progress=False)
    return root


def _medklip_scores(heat: np.ndarray, truth: np.ndarray, cut: float) -> dict[str, float]:
    """MedKLIP's per-image rules written out: P = heat > cut; IoU, Dice; a hit when a tied maximum is inside."""
    predicted = heat > cut
    both = np.logical_and(predicted, truth).sum()
    return {"iou": both / (truth.sum() + predicted.sum() - both), "dice": 2 * both / (truth.sum() + predicted.sum()),
            "pointing_game": float(truth[heat == heat.max()].any())}


def test_paper_profile_run_equals_medklips_rules(rsna):
    task = load_task("rsna_ground", profile="paper")
    source = api.open_dataset(task, rsna)
    split = dataset_split(task.dataset, source, task.split)
    test = api.split_ids(split, "test", source)[0]
    config = task.resolve({"bootstrap_resamples": 50})
    AttentionModel.seen = []
    outcome = run_grounding_task(AttentionModel(), source, SplitIds([], [], test), config, seed=0,
                                 device=torch.device("cpu"), progress=False)
    positives = [i for i in test if source.label(i)]
    assert outcome["n"]["test"] == len(positives) > 0 and outcome["n"]["val"] == 0
    assert outcome["training"]["image_read"] == "medklip" and outcome["training"]["threshold"] == 0.008

    model, expected = AttentionModel(), {"iou": [], "dice": [], "pointing_game": []}
    seen = []
    for image_id in positives:
        pixels = resize_image(medklip_read(source.image(image_id)), 224)  # equalise, then Resize 224 (Pillow)
        seen.append(pixels)
        raw = model.grounding_maps(Adapter.preprocess(model, torch.from_numpy(pixels)[None, None]), ["pneumonia"])
        heat = raw[0, 0].numpy().repeat(16, axis=0).repeat(16, axis=1)
        mask = source.mask(image_id)
        rows = np.arange(224) * mask.shape[0] // 224  # torchvision tensor NEAREST: floor(i * in / out)
        cols = np.arange(224) * mask.shape[1] // 224
        for name, value in _medklip_scores(heat, mask[np.ix_(rows, cols)] > 0, 0.008).items():
            expected[name].append(value)
    np.testing.assert_array_equal(np.stack(AttentionModel.seen), np.stack(seen))
    for name, values in expected.items():
        assert outcome["metrics"][name] == pytest.approx(np.mean(values), abs=1e-9)
    # The fixed cut means something for these maps: some pixels pass it, not all.
    assert 0 < outcome["metrics"]["dice"] < 1
