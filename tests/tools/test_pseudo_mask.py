"""G2D pseudo masks: the released code's top 9 of 64 cells, the paper's refinements, the attention pool, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from transformers import BertConfig, BertTokenizer

from vlpbench.adapters.base import Adapter
from vlpbench.adapters.g2d import G2DAdapter
from vlpbench.cli import main
from vlpbench.data.dicom import write_dicom
from vlpbench.errors import ConfigError, DataError
from vlpbench.synthetic import chest
from vlpbench.testing import write_g2d_checkpoint
from vlpbench.tools import pseudo_mask as pm

SIZE, CELLS, CELL = 256, 8, 32
# The cells (row, column) the constructed attention pool attends to: a 3×3 block, 9 of the 64 cells.
BLOCK = [(r, c) for r in (2, 3, 4) for c in (4, 5, 6)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "small", "left", "pneumothorax"]
TEXT_HIDDEN = 16


def cells_to_pixels(cells: np.ndarray) -> np.ndarray:
    """An 8×8 boolean cell grid as the 256² mask of its 32×32 blocks."""
    return np.kron(cells, np.ones((CELL, CELL))).astype(bool)


def block_cells() -> np.ndarray:
    cells = np.zeros((CELLS, CELLS), dtype=bool)
    for r, c in BLOCK:
        cells[r, c] = True
    return cells


def lung_fields(size: int = SIZE) -> np.ndarray:
    """Two elliptic lungs (columns 0.26-0.74 of the film), so that the synthetic body leaves dark margins."""
    y, x = np.mgrid[:size, :size] / size
    left = ((x - 0.36) / 0.1) ** 2 + ((y - 0.45) / 0.25) ** 2 <= 1
    right = ((x - 0.64) / 0.1) ** 2 + ((y - 0.45) / 0.25) ** 2 <= 1
    return (left | right).astype(np.uint8)


def chest_image(seed: int) -> np.ndarray:
    """A 256² synthetic chest (``vlpbench.synthetic.chest``): body, ribs, spine, heart and lung markings."""
    return chest.render(np.random.default_rng(seed), lung_fields(), SIZE)


def within(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose Euclidean distance to a pixel of the other value in ``mask`` is at most ``radius``."""
    distance = np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    return distance <= radius


class FixedAttention(Adapter):
    """An adapter whose attention pool returns a given (heads, 8, 8) map for every image."""

    name = "fixed_attention"
    takes_checkpoint = False
    image_size = SIZE

    def __init__(self, attention: np.ndarray) -> None:
        self.attention = torch.as_tensor(attention, dtype=torch.float32)

    @classmethod
    def map_weights(cls, checkpoint, options):
        raise NotImplementedError

    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.attention.expand(images.shape[0], -1, -1, -1)


class NoPool(FixedAttention):
    """An adapter without ``attention_maps`` (as every adapter but G2D)."""

    name = "no_pool"
    attention_maps = None

    def __init__(self) -> None:
        pass


# --- the released code: strict ">" against numpy's linear quantile --------------------------------------

def test_released_variant_keeps_exactly_the_top_9_of_64_cells_on_random_maps():
    rng = np.random.default_rng(0)
    options = pm.pseudo_mask_options("released")
    for _ in range(25):
        cells = rng.random((CELLS, CELLS))
        heat, body, threshold, soft, mask = pm.mask_from_attention(cells, np.zeros((SIZE, SIZE), np.uint8), options)
        top9 = cells >= np.sort(cells.ravel())[-9]
        assert np.array_equal(mask, cells_to_pixels(top9))
        assert mask.mean() == 9 / 64
        assert body.all() and np.array_equal(soft, mask.astype(np.float32))
        # The 85th percentile over 65,536 repeated values lands on the 55th-smallest cell exactly.
        assert threshold == np.sort(cells.ravel())[54]


@pytest.mark.parametrize(("percentile", "cells_kept"), [(50, 32), (75, 16), (85, 9), (90, 6)])
def test_percentile_option_sets_the_number_of_cells_kept(percentile, cells_kept):
    # Hand-computed: position q·65535 in the sorted pixels; a threshold that lands on a cell's own value
    # (85, 90) keeps only the cells above it, one between two cells (50, 75) keeps those above it too.
    cells = np.random.default_rng(1).permutation(64).reshape(CELLS, CELLS).astype(float)
    options = pm.pseudo_mask_options("released", percentile=percentile)
    mask = pm.mask_from_attention(cells, np.zeros((SIZE, SIZE), np.uint8), options)[4]
    assert np.array_equal(mask, cells_to_pixels(cells >= 64 - cells_kept))


def test_paper_threshold_is_inclusive_so_the_tie_cell_joins_and_the_filter_only_touches_edges():
    cells = np.random.default_rng(2).permutation(64).reshape(CELLS, CELLS).astype(float)
    bright = np.full((SIZE, SIZE), 200, np.uint8)
    # A fixed body threshold below the image's level: the body is the whole image.
    options = pm.pseudo_mask_options("paper", body_threshold=100)
    heat, body, threshold, soft, mask = pm.mask_from_attention(cells, bright, options)
    assert body.all() and threshold == 54
    expected = cells_to_pixels(cells >= 54)  # ≥: the 55th-smallest cell joins the top 9
    radius = options.bilateral_diameter // 2
    # Only pixels within the filter's radius of a block edge can change; all others keep 0 or 1 exactly.
    near_edge = within(expected, radius)
    assert np.array_equal(mask[~near_edge], expected[~near_edge])
    assert set(np.unique(soft[~near_edge])) <= {0.0, 1.0}
    assert np.mean(mask == expected) > 0.98


def test_options_are_checked_and_paper_only_options_are_refused_for_the_released_variant():
    with pytest.raises(ConfigError, match="body_threshold.*released variant"):
        pm.pseudo_mask_options("released", body_threshold=20)
    with pytest.raises(ConfigError, match="percentile=120"):
        pm.pseudo_mask_options("paper", percentile=120)
    with pytest.raises(ConfigError, match="upsample.*NEAREST"):
        pm.pseudo_mask_options("released", upsample="bilinear")
    with pytest.raises(ConfigError, match="unknown pseudo-mask option sigma"):
        pm.pseudo_mask_options("paper", sigma=3)


# --- heads --------------------------------------------------------------------------------------------

def test_heads_mean_follows_the_consensus_and_max_the_single_head_peak():
    attention = np.full((4, CELLS, CELLS), 0.01)
    attention[0, 0, 0] = 0.2  # one head's peak: mean 0.0575, max 0.2
    for r, c in BLOCK:
        attention[1:, r, c] = 0.1  # three heads agree: mean 0.0775, max 0.1
    image = np.zeros((SIZE, SIZE), np.uint8)
    adapter = FixedAttention(attention)
    mean, = pm.pseudo_masks(adapter, [image], options=pm.pseudo_mask_options("released", heads="mean"))
    peak, = pm.pseudo_masks(adapter, [image], options=pm.pseudo_mask_options("released", heads="max"))
    assert np.allclose(mean.aggregated, attention.mean(axis=0)) and np.allclose(peak.aggregated, attention.max(axis=0))
    assert np.array_equal(mean.mask, cells_to_pixels(block_cells()))
    only_peak = np.zeros((CELLS, CELLS), dtype=bool)
    only_peak[0, 0] = True  # the block ties at the 55th-smallest value, so strict ">" keeps the peak alone
    assert np.array_equal(peak.mask, cells_to_pixels(only_peak))


# --- refinements: bilateral filter, Otsu, body mask ------------------------------------------------------

def test_bilateral_filter_matches_the_direct_formula():
    rng = np.random.default_rng(3)
    values = rng.random((11, 13))
    diameter, sigma_space, sigma_range = 5, 1.5, 0.3
    radius = diameter // 2
    padded = np.pad(values, radius, mode="reflect")
    expected = np.empty_like(values)
    for y in range(values.shape[0]):
        for x in range(values.shape[1]):
            num = den = 0.0
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    if dy * dy + dx * dx <= radius * radius:
                        neighbour = padded[y + radius + dy, x + radius + dx]
                        w = np.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2)) * np.exp(
                            -((neighbour - values[y, x]) ** 2) / (2 * sigma_range**2))
                        num += w * neighbour
                        den += w
            expected[y, x] = num / den
    assert np.allclose(pm.bilateral_filter(values, diameter, sigma_space, sigma_range), expected, atol=1e-12)


def test_bilateral_filter_keeps_a_0_1_interior_rounds_corners_and_removes_specks():
    mask = np.zeros((64, 64))
    mask[16:48, 16:48] = 1
    mask[4, 58] = 1  # a one-pixel speck
    soft = pm.bilateral_filter(mask)  # defaults: diameter 15, sigma_space 4, sigma_range 1
    assert np.all(soft[23:41, 23:41] == 1.0)  # farther than the radius 7 from every edge
    untouched = ~within(mask.astype(bool), 7)
    assert np.array_equal(soft[untouched], mask[untouched])  # 0 or 1 exactly, away from every edge
    assert 0 < soft[15, 32] < 0.5 < soft[16, 32] < 1  # a straight edge softens but stays in place
    assert soft[16, 16] < 0.5 and soft[4, 58] < 0.5  # a block corner and a speck go at binarisation


def test_otsu_threshold_matches_scikit_image():
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(4)
    pictures = [chest_image(seed) for seed in (0, 5)] + [rng.integers(30, 200, (40, 40)).astype(np.uint8)]
    for picture in pictures:
        assert pm.otsu_threshold(picture) == filters.threshold_otsu(picture)


def test_body_mask_of_a_synthetic_chest_excludes_the_background_border_and_keeps_the_lungs():
    lung = lung_fields()
    image = chest_image(5)
    assert image[:, :4].mean() < 20 and image[:, -4:].mean() < 20  # the film edges are background
    body = pm.body_mask(image)
    assert not body[:, :4].any() and not body[:, -4:].any()
    assert body[lung.astype(bool)].all()  # lungs are darker than tissue: holes that the fill closes
    assert ndimage.label(body)[1] == 1 and np.array_equal(body, ndimage.binary_fill_holes(body))
    assert not body[image < 30].any()


def test_mask_covers_the_attended_region_and_nothing_outside_the_body():
    image = chest_image(5)
    attention = np.full((4, CELLS, CELLS), 0.005) + np.random.default_rng(6).random((4, CELLS, CELLS)) * 1e-3
    straddling = [(r, c) for r in (3, 4, 5) for c in (0, 1, 2)]  # over the body's left edge
    for r, c in straddling:
        attention[:, r, c] = 0.1
    result, = pm.pseudo_masks(FixedAttention(attention), [image])
    region = np.zeros((CELLS, CELLS), dtype=bool)
    for r, c in straddling:
        region[r, c] = True
    region = cells_to_pixels(region)
    assert not result.mask[~result.body].any() and not result.soft[~result.body].any()
    assert not result.body[:, :4].any()
    inside = region & result.body
    assert inside.sum() > 3000 and (region & ~result.body).sum() > 1000  # the block straddles the edge
    # Everything of the region inside the body, away from the filter's reach of the body's outline.
    reach = ndimage.binary_erosion(result.body, iterations=8)
    assert result.mask[inside & reach].all()


# --- the G2D attention pool and the CLI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(vocab_size=len(VOCAB), hidden_size=TEXT_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=4 * TEXT_HIDDEN).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pointing_checkpoint(tmp_path_factory):
    """A full G2D checkpoint whose attention pool attends to the BLOCK cells in every head.

    The query is a constant vector u (zero weights, bias u); keys are 0.01·(token + position), and the
    positional embedding of the BLOCK cells is 2·10⁴·u: their logits exceed the others' by about 9.
    """
    path = tmp_path_factory.mktemp("g2d_pointing") / "g2d_pointing_checkpoint.pth"
    write_g2d_checkpoint(path, "pretrain", text_layers=1, text_hidden=TEXT_HIDDEN, text_vocab=len(VOCAB))
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = state["model_state_dict"]
    dim = model["attnpool.positional_embedding"].shape[1]
    u = torch.ones(dim) / dim**0.5
    positions = torch.zeros(CELLS * CELLS + 1, dim)
    for r, c in BLOCK:
        positions[1 + r * CELLS + c] = 2e4 * u
    weight = torch.zeros(3 * dim, dim)
    weight[dim:2 * dim] = 0.01 * torch.eye(dim)
    bias = torch.zeros(3 * dim)
    bias[:dim] = u
    model.update({"attnpool.positional_embedding": positions, "attnpool.mhsa.in_proj_weight": weight,
                  "attnpool.mhsa.in_proj_bias": bias})
    torch.save(state, path)
    return path


def test_g2d_attention_maps_are_the_pools_per_head_weights_and_a_grounding_source(pointing_checkpoint):
    adapter = G2DAdapter(pointing_checkpoint, heatmap_source="attention_pool")
    images = adapter.preprocess(torch.from_numpy(np.stack([chest_image(0), chest_image(1)]))[:, None])
    attention = adapter.attention_maps(images)
    assert attention.shape == (2, 4, CELLS, CELLS)
    on_block = attention[:, :, [r for r, _ in BLOCK], [c for _, c in BLOCK]].sum(dim=-1)
    assert torch.all(on_block > 0.99) and torch.all(attention.sum(dim=(2, 3)) <= 1 + 1e-6)
    with pytest.raises(ConfigError, match=r"attention_maps needs 256×256.*\(224, 224\)"):
        adapter.attention_maps(torch.zeros(1, 3, 224, 224))
    # The grounding protocol's alternative heat-map source: the head mean, one copy per text, no text encoder.
    assert "grounding" in adapter.capabilities and "embed_text" not in adapter.capabilities
    maps = adapter.grounding_maps(images, ["pneumonia", "left lung opacity"])
    assert maps.shape == (2, 2, CELLS, CELLS)
    assert torch.allclose(maps[:, 1], attention.mean(dim=1)) and torch.equal(maps[:, 0], maps[:, 1])
    encoder_only = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ConfigError, match="heatmap_source=attention_pool needs the full pre-training checkpoint"):
        G2DAdapter.map_weights(encoder_only, {"text_encoder": "", "heatmap_source": "attention_pool"})
    with pytest.raises(ConfigError, match="heatmap_source='saliency'"):
        G2DAdapter.map_weights(encoder_only, {"text_encoder": "", "heatmap_source": "saliency"})


def test_cli_writes_masks_attention_similarity_and_overlays(pointing_checkpoint, text_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(chest_image(0)).resize((300, 300)).save(images / "first.png")
    write_dicom(images / "second.dcm", chest_image(1), sop_instance_uid="1.2.3.1", study_instance_uid="1.2.3.2",
                series_instance_uid="1.2.3.3", patient_id="p1", patient_sex="F", patient_age=50, view_position="PA")
    out = tmp_path / "released"
    code = main(["-q", "pseudo-mask", str(images), "--checkpoint", str(pointing_checkpoint), "--out", str(out),
                 "--variant", "released", "--sentence", "small left pneumothorax",
                 "--model-option", f"text_encoder={text_dir}"])
    assert code == 0
    summary = json.loads((out / "pseudo_masks.json").read_text())
    assert [entry["image"].rsplit("/", 1)[-1] for entry in summary["images"]] == ["first.png", "second.dcm"]
    assert summary["options"] == {"variant": "released", "heads": "mean", "percentile": 85.0, "upsample": "nearest"}
    for stem in ("first", "second"):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask == 255, cells_to_pixels(block_cells()))
        attention = np.load(out / f"{stem}_attention.npy")
        assert attention.shape == (CELLS, CELLS) and attention[block_cells()].sum() > 0.99
        similarity = np.load(out / f"{stem}_similarity.npy")
        assert similarity.shape == (CELLS, CELLS) and np.all(np.abs(similarity) <= 1 + 1e-5)
        assert Image.open(out / f"{stem}_overlay.png").size == (3 * SIZE, SIZE)
    # The similarity is the adapter's own sentence-to-location cosine map (Adapter.grounding_maps).
    adapter = G2DAdapter(pointing_checkpoint, text_encoder=text_dir)
    first = pm.model_grid(np.asarray(Image.open(images / "first.png")), SIZE)
    expected = adapter.grounding_maps(adapter.preprocess(torch.from_numpy(first)[None, None]),
                                      ["small left pneumothorax"])[0, 0].numpy()
    assert np.allclose(np.load(out / "first_similarity.npy"), expected, atol=1e-5)

    paper = tmp_path / "paper"
    assert main(["-q", "pseudo-mask", str(images / "first.png"), "--checkpoint", str(pointing_checkpoint),
                 "--out", str(paper)]) == 0
    mask = np.asarray(Image.open(paper / "first_mask.png")) == 255
    body = pm.body_mask(pm.model_grid(np.asarray(Image.open(images / "first.png")), SIZE))
    assert not mask[~body].any()
    assert mask[cells_to_pixels(block_cells()) & ndimage.binary_erosion(body, iterations=8)].mean() > 0.9
    assert Image.open(paper / "first_overlay.png").size == (2 * SIZE, SIZE)
    assert not (paper / "first_similarity.npy").exists()


def test_cli_refuses_paper_only_options_with_the_released_variant(pointing_checkpoint, tmp_path, capsys):
    code = main(["pseudo-mask", str(tmp_path), "--checkpoint", str(pointing_checkpoint), "--out", str(tmp_path / "o"),
                 "--variant", "released", "--bilateral-diameter", "9"])
    assert code == 2 and "bilateral_diameter belongs to the paper's pipeline" in capsys.readouterr().err


def test_an_adapter_without_attention_pool_and_an_empty_sentence_are_refused():
    with pytest.raises(ConfigError, match="adapter 'no_pool' has no attention pool"):
        pm.pseudo_masks(NoPool(), [np.zeros((8, 8), np.uint8)])
    with pytest.raises(ConfigError, match="--sentence is empty"):
        pm.pseudo_masks(FixedAttention(np.ones((4, CELLS, CELLS))), [np.zeros((8, 8), np.uint8)], sentence=" ")


def test_collect_images_names_missing_paths_empty_folders_and_clashing_names(tmp_path):
    with pytest.raises(DataError, match="image path not found"):
        pm.collect_images([tmp_path / "absent.png"])
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg/.dcm/.dicom image"):
        pm.collect_images([tmp_path])
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / folder / "x.png")
    with pytest.raises(DataError, match="two images share the name 'x'"):
        pm.collect_images([tmp_path / "a", tmp_path / "b"])
