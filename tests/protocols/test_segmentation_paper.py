"""The segmentation options of the ``paper`` profile (MGCA's downstream code), each checked against an
independent computation written here: OpenCV itself for the resize and the warp, MGCA's Dice and its
training-set rule re-written from HKU-MedAI/MGCA (not imported from vlpbench)."""

import math

import numpy as np
import pytest
import torch

from vlpbench import api
from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.metrics.dice import batch_means, dice_per_image
from vlpbench.protocols import SplitIds
from vlpbench.protocols.segmentation import (
    about_albumentations_centre,
    affine_theta,
    augment_masks,
    check_options,
    evaluate_segmentation,
    mgca_images,
    mgca_train_subset,
    random_affine,
    resize_like_cv2,
    run_segmentation,
    warp,
)
from vlpbench.tasks import load_task


def _xray_like(size: int, seed: int = 0) -> np.ndarray:
    """A uint8 image with smooth shading, hard edges and fine noise (what aliasing shows on)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    smooth = 120 + 80 * np.sin(6 * x) * np.cos(4 * y)
    edges = 40.0 * ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1)
    stripes = 25.0 * (np.arange(size) % 3 == 0)[None, :]
    return np.clip(smooth + edges + stripes + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)


def _as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).float()[None, None]


# --- pipeline: mgca -----------------------------------------------------------------------------------

def test_paper_resize_equals_opencv_inter_linear_to_one_grey_level():
    cv2 = pytest.importorskip("cv2")
    image = _xray_like(1024)
    expected = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.int64)
    ours = resize_like_cv2(_as_batch(image), 224)[0, 0].numpy()
    assert np.array_equal(ours, np.round(ours))  # whole grey levels, as uint8
    difference = np.abs(ours.astype(np.int64) - expected)
    assert difference.max() <= 1
    assert difference.mean() < 0.2  # OpenCV rounds its 11-bit fixed-point weights; most pixels agree exactly
    # And it is not the antialiased resize: point sampling keeps the 3-pixel stripes' aliasing.
    antialiased = np.asarray(__import__("PIL.Image").Image.fromarray(image).resize((224, 224), 2), dtype=np.int64)
    assert np.abs(antialiased - expected).max() > 5


def test_albumentations_warp_matches_opencv_about_its_centre():
    """ShiftScaleRotate in albumentations 0.5.2: cv2.getRotationMatrix2D((w/2, h/2), angle, scale) and
    cv2.warpAffine with BORDER_CONSTANT; bilinear for the image, INTER_NEAREST for the mask."""
    cv2 = pytest.importorskip("cv2")
    image = _xray_like(256, seed=1)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)  # OpenCV quantises positions to 1/32 px: compare smooth content
    angle, scale = 7.0, 1.06
    matrix = cv2.getRotationMatrix2D((256 / 2, 256 / 2), angle, scale)
    expected = cv2.warpAffine(image, matrix, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0).astype(np.int64)
    theta = about_albumentations_centre(affine_theta(torch.tensor([scale]), torch.tensor([math.radians(angle)])),
                                        256, 256)
    ours = warp(_as_batch(image), theta, "bilinear").round()[0, 0].numpy().astype(np.int64)
    difference = np.abs(ours - expected)
    assert np.percentile(difference, 99) <= 1 and difference.mean() < 0.2
    # Turning about the exact centre instead is half a pixel off, visibly so.
    exact = warp(_as_batch(image), affine_theta(torch.tensor([scale]), torch.tensor([math.radians(angle)])),
                 "bilinear").round()[0, 0].numpy().astype(np.int64)
    assert np.abs(exact - expected).mean() > 2 * difference.mean()

    mask = np.zeros((224, 224), np.float32)
    mask[60:150, 40:120] = 1.0
    expected_mask = cv2.warpAffine(mask, cv2.getRotationMatrix2D((112, 112), angle, scale), (224, 224),
                                   flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    theta_mask = affine_theta(torch.tensor([scale]), torch.tensor([math.radians(angle)]))
    ours_mask = augment_masks(torch.from_numpy(mask)[None, None], theta_mask, "nearest", albumentations_centre=True)
    assert (ours_mask[0, 0].numpy() != expected_mask).mean() < 0.005


def test_nearest_mask_augmentation_keeps_mask_values_and_p0_is_the_plain_resize():
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 1, 56, 56)
    masks[:, :, 10:40, 15:45] = 1.0
    theta = random_affine(6, 0.1, 10.0, 1.0, generator)
    nearest = augment_masks(masks, theta, "nearest", albumentations_centre=True)
    assert set(nearest.unique().tolist()) <= {0.0, 1.0} and nearest.sum() > 0
    bilinear = augment_masks(masks, theta, "bilinear", albumentations_centre=True)
    assert ((bilinear > 0) & (bilinear < 1)).any()  # what canonical trains on: soft edges
    # A soft (area-resized) mask keeps its own values under nearest: nothing new is interpolated.
    soft = torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (6, 1, 56, 56), generator=generator)]
    assert set(augment_masks(soft, theta, "nearest", True).unique().tolist()) <= {0.0, 0.25, 0.5, 1.0}

    cv2 = pytest.importorskip("cv2")
    full = np.stack([_xray_like(256, seed=s) for s in range(3)])
    pixels = torch.from_numpy(full).float()[:, None]
    identity = random_affine(3, 0.1, 10.0, 0.0, generator)  # p = 0
    augmented = mgca_images(pixels, identity, 64)
    plain = resize_like_cv2(pixels, 64) / 255.0
    assert torch.equal(augmented, plain) and torch.equal(mgca_images(pixels, None, 64), plain)
    expected = np.stack([cv2.resize(i, (64, 64), interpolation=cv2.INTER_LINEAR) for i in full]) / 255.0
    assert np.abs(augmented[:, 0].numpy() - expected).max() <= 1 / 255 + 1e-7


# --- dice_average: batch and the truth threshold ----------------------------------------------------

def _mgca_get_dice(probability: torch.Tensor, truth: torch.Tensor) -> float:
    """HKU-MedAI/MGCA mgca/models/ssl_segmenter.py:99-121 (SSLSegmenter.get_dice), re-written."""
    n = len(truth)
    p = (probability.reshape(n, -1) > 0.5).float()
    t = (truth.reshape(n, -1) > 0.5).float()
    scores = []
    for p_i, t_i in zip(p, t):
        if t_i.sum() >= 1:
            scores.append(float(2 * (p_i * t_i).sum() / (p_i + t_i).sum()))
        else:
            scores.append(float(p_i.sum() == 0))
    return float(np.mean(scores))


class _Labels:
    def __init__(self, labels: dict[str, int]):
        self.labels = labels

    def label(self, image_id: str) -> int:
        return self.labels[image_id]


def test_batch_average_is_mgcas_mean_of_batch_means():
    generator = torch.Generator().manual_seed(3)
    n, batch = 21, 8  # a short last batch of 5
    truth = (torch.rand(n, 1, 16, 16, generator=generator) > 0.8).float() * torch.rand(n, 1, 16, 16, generator=generator)
    truth[::4] = 0.0  # some empty truths
    probs = torch.rand(n, 1, 16, 16, generator=generator) ** 3
    expected = np.mean([_mgca_get_dice(probs[s:s + batch], truth[s:s + batch]) for s in range(0, n, batch)])
    scores = dice_per_image(probs, truth)
    ids = [f"i{k}" for k in range(n)]
    labels = _Labels({i: int(truth[k].max() > 0.5) for k, i in enumerate(ids)})
    outcome = evaluate_segmentation(labels, ids, scores, n_resamples=50, seed=0, batch_size=batch)
    assert outcome["metrics"]["dice"] == pytest.approx(expected, abs=1e-6)
    assert outcome["metrics"]["dice"] != pytest.approx(scores.mean(), abs=1e-6)  # the short batch weighs more
    assert batch_means(scores, batch).tolist() == pytest.approx(
        [scores[0:8].mean(), scores[8:16].mean(), scores[16:].mean()])
    canonical = evaluate_segmentation(labels, ids, scores, n_resamples=50, seed=0)
    assert canonical["metrics"]["dice"] == pytest.approx(scores.mean())
    assert {k: v for k, v in canonical["metrics"].items() if k != "dice"} == \
        {k: v for k, v in outcome["metrics"].items() if k != "dice"}


def test_truth_is_cut_at_one_half_whatever_the_prediction_threshold():
    truth = np.array([[[0.3, 0.6, 0.9, 0.0]]])  # a soft (area-resized) truth: T = {1, 2}
    pred = np.array([[[0.35, 0.4, 0.9, 0.1]]])
    # At 0.2 the prediction {0, 1, 2} meets T = {1, 2}; the truth's 0.3 pixel stays negative.
    assert dice_per_image(pred, truth, threshold=0.2).tolist() == [pytest.approx(2 * 2 / 5)]
    # At the default threshold the rule is the one it always was (both cut at 0.5).
    assert dice_per_image(pred, truth).tolist() == [pytest.approx(2 * 1 / 3)]


# --- train_subset: mgca -----------------------------------------------------------------------------

def _mgca_siim_train_ids(image_ids: list[str], positive: set[str], data_pct: float) -> list[str]:
    """HKU-MedAI/MGCA mgca/datasets/segmentation_dataset.py:43-63 with the global numpy RNG, ids unique."""
    pos = [i for i in image_ids if i in positive]
    neg_series = np.array([i for i in image_ids if i not in positive])
    neg_selected = set(np.random.choice(neg_series, size=len(pos), replace=False).tolist())
    kept = pos + [i for i in neg_series.tolist() if i in neg_selected]  # pd.concat([df_pos, df_neg])
    if data_pct != 1:
        selected = set(np.random.choice(np.array(kept), size=int(len(kept) * data_pct), replace=False).tolist())
        kept = [i for i in kept if i in selected]
    return kept


def _mgca_rsna_train_ids(filenames: list[str], data_pct: float) -> list[str]:
    """HKU-MedAI/MGCA mgca/datasets/segmentation_dataset.py:184-188 with the global numpy RNG."""
    n = len(filenames)
    indices = np.random.choice(n, int(data_pct * n), replace=False)
    return [filenames[k] for k in indices]


@pytest.mark.parametrize("fraction", [0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 42])
def test_mgca_subset_is_what_mgcas_rule_selects_from_the_same_draw(fraction, seed):
    rng = np.random.default_rng(7)
    ids = [f"1.2.276.{k}" for k in rng.permutation(400)]
    positive = {i for i in ids if rng.random() < 0.3}
    label = lambda i: int(i in positive)  # noqa: E731
    state = np.random.get_state()
    try:
        np.random.seed(seed)  # pytorch_lightning.seed_everything(seed), mgca_segmenter.py:46
        _mgca_siim_train_ids(ids, positive, fraction)  # the copy built to count steps (mgca_segmenter.py:123)
        siim = _mgca_siim_train_ids(ids, positive, fraction)  # the one trainer.fit trains on
        np.random.seed(seed)
        _mgca_rsna_train_ids(ids, fraction)
        rsna = _mgca_rsna_train_ids(ids, fraction)
    finally:
        np.random.set_state(state)
    ours = mgca_train_subset(ids, label, fraction, True, seed)
    assert set(ours) == set(siim) and ours == [i for i in ids if i in set(siim)]
    n_pos = len(positive)
    assert len(ours) == (2 * n_pos if fraction == 1 else int(2 * n_pos * fraction))
    assert set(mgca_train_subset(ids, label, fraction, False, seed)) == set(rsna)
    # The global RNG is left alone.
    assert np.random.get_state()[1].tolist() == state[1].tolist()


def test_mgca_subset_needs_the_whole_training_part():
    config = {**load_task("siim_seg", profile="paper").config, "image_size": 32, "batch_size": 2}
    split = SplitIds(train=["a", "b"], val=["c"], test=["d"], fraction=0.1)
    with pytest.raises(ConfigError, match="train_subset=mgca"):
        run_segmentation(None, _Labels({}), split, config, seed=0, device=torch.device("cpu"), progress=False)
    labels = _Labels({"a": 1, "b": 1, "c": 0})
    with pytest.raises(VlpbenchError, match="2 positive training images but only 1 negatives"):
        mgca_train_subset(["a", "b", "c"], labels.label, 1.0, True, 0)


# --- option validation and the task files -------------------------------------------------------------

@pytest.mark.parametrize("key", ["pipeline", "augment_mask", "dice_average", "train_subset", "dice_resolution"])
def test_a_bad_option_is_refused_before_anything_runs(key):
    config = {**load_task("siim_seg").config, key: "mgcaa"}
    with pytest.raises(ConfigError, match=f"{key}='mgcaa': expected one of "):
        check_options(config)
    # run_segmentation checks first: the encoder and source here would fail on any use.
    with pytest.raises(ConfigError, match=key):
        run_segmentation(None, None, SplitIds([], [], []), config, seed=0, device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["siim_seg", "rsna_seg"])
def test_paper_profile_holds_mgcas_values_with_sources(name):
    canonical = load_task(name).config
    assert (canonical["pipeline"], canonical["augment_mask"], canonical["dice_average"], canonical["train_subset"],
            canonical["freeze_bn"], canonical["dice_resolution"]) == ("cached", "bilinear", "image", "split", True,
                                                                      "native")
    task = load_task(name, profile="paper")
    config = task.config
    assert (config["pipeline"], config["augment_mask"], config["dice_average"], config["train_subset"],
            config["freeze_bn"], config["dice_resolution"], config["lr"]) == ("mgca", "nearest", "batch", "mgca",
                                                                              False, "input", 2e-4)
    assert config["threshold"] == 0.5 and config["balance_negatives"] is (name == "siim_seg")
    # SIIM stays by image in both profiles; RSNA runs on MGCA's own split
    assert task.split == ("mgca" if name == "rsna_seg" else "v1")
    changed = {key for key in config if config[key] != canonical[key]}
    settings = {s.key: s.source for s in task.profile_settings()}
    assert changed <= set(settings) and ("split" in settings) is (name == "rsna_seg")
    for key, source in settings.items():
        assert source.startswith(("HKU-MedAI/MGCA ", "G2D (NeurIPS 2024) Table 6")), key
    assert "5e-4" in settings["lr"] and "run_seg_finetune.sh" in settings["lr"]
    check_options(config)


# --- a tiny synthetic run under the paper settings --------------------------------------------------

@pytest.fixture(scope="module")
def siim_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper") / "siim"
    api.synth("siim", root, n=64, size=64, progress=False)
    return root


def test_paper_settings_run_end_to_end_on_synthetic_siim(siim_tiny, resnet18_checkpoint, tmp_path):
    paper = load_task("siim_seg", profile="paper").config
    overrides = {key: paper[key] for key in ("pipeline", "augment_mask", "dice_average", "train_subset",
                                             "freeze_bn", "dice_resolution")}
    overrides.update(image_size=32, batch_size=2, max_epochs=2, patience=2, bootstrap_resamples=20)
    # At 10 %, train_subset=mgca draws from the whole training part (api passes it as SplitIds.train_all).
    record, _ = api.run("generic", "siim_seg", 0.1, checkpoint=resnet18_checkpoint, model_options={"arch": "resnet18"},
                        data_root=siim_tiny, results=tmp_path, device="cpu", overrides=overrides, progress=False)
    scores = np.array(list(record["per_image"].values()))
    assert record["metrics"]["dice"] == pytest.approx(batch_means(scores, 2).mean())
    source = api.open_dataset(load_task("siim_seg"), siim_tiny)
    split, _ = api.task_splits(load_task("siim_seg"), source)
    whole, _ = api.split_ids(split, "train", source)
    expected = mgca_train_subset(whole, source.label, 0.1, True, 0)
    assert record["n"]["train"] == len(expected) >= 2
