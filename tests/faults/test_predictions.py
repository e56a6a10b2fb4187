"""Fault injection: predictions are checked where they enter `vlpbench score` (issue 17, item 2).

Each bad prediction goes through the CLI as a careless or hostile user would give it and must end in exit 2
with an error naming the file (or key, or line) and what was expected, print no score and leave the
predictions as they were. A property test feeds random arrays to the segmentation scorer: each is either
scored exactly as a direct Dice says, or refused with a named error, never a silent number.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.siim import SiimSource
from vlpbench.data.splits import load_split
from vlpbench.errors import DataError
from vlpbench.predictions import HEATMAPS_FILE, PROBABILITIES_FILE, write_probabilities
from vlpbench.protocols import SplitIds
from vlpbench.protocols.segmentation import PROTOCOL as SEGMENTATION
from vlpbench.tasks import load_task

FAST = ["--set", "bootstrap_resamples=20"]


@pytest.fixture(scope="module")
def siim(siim_root):
    """The synthetic SIIM source, its test ids and its val ids."""
    source = SiimSource(siim_root)
    test, _ = api.split_ids(load_split("siim"), "test", source)
    val, _ = api.split_ids(load_split("siim"), "val", source)
    return source, test, val


def _snapshot(folder):
    """Every file under ``folder`` with its bytes: what must survive a refused score unchanged."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _score(task, predictions, root, capsys, *extra):
    """``vlpbench score`` on ``predictions``: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["score", "--task", task, "--predictions", str(predictions), "--data-root", str(root), *FAST,
                 *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(task, predictions, root, capsys, *expected):
    """Score, and assert exit 2, no score printed, the files untouched and each of ``expected`` in the error."""
    before = _snapshot(predictions if predictions.is_dir() else predictions.parent)
    code, out, err = _score(task, predictions, root, capsys)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ")
    for text in expected:
        assert text in err, (text, err)
    assert _snapshot(predictions if predictions.is_dir() else predictions.parent) == before
    return err


def _empty_masks(folder, ids, size=(16, 16)):
    folder.mkdir()
    for image_id in ids:
        Image.fromarray(np.zeros(size, np.uint8)).save(folder / f"{image_id}.png")
    return folder


# --- segmentation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, expected", [
    (np.full((16, 16), np.nan, np.float32), "256 of 256 values are NaN or infinite; expected probabilities in [0, 1]"),
    (np.full((16, 16), np.inf, np.float32), "256 of 256 values are NaN or infinite; expected probabilities in [0, 1]"),
    (np.full((16, 16), -5.0), "values range from -5 to -5; expected probabilities in [0, 1]"),
    (np.full((16, 16), 255, np.uint8), "values range from 255 to 255; expected probabilities in [0, 1] (a 0/255"),
    (np.full((16, 16), 0.5 + 0j), "expected probabilities (bool, int or float), found dtype complex128"),
    (np.full((16, 16), "0.5"), "expected probabilities (bool, int or float), found dtype <U3"),
    (np.zeros((2, 16, 16)), "expected a 2-D mask (H, W) of probabilities, got shape (2, 16, 16)"),
    (np.zeros((0, 16)), "expected a 2-D mask (H, W) of probabilities, got shape (0, 16)"),
], ids=["nan", "inf", "minus5", "uint8_255", "complex", "text", "3d", "empty"])
def test_a_bad_npy_map_is_refused_naming_the_file(siim, siim_root, tmp_path, capsys, values, expected):
    """Old: NaN and −5 scored as empty masks (Dice 0.7778), +inf as full masks, exit 0."""
    _, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test[1:])
    np.save(folder / f"{test[0]}.npy", values)
    _refused("siim_seg", folder, siim_root, capsys, f"{folder / test[0]}.npy: ", expected)


def test_a_pickled_npy_is_refused_without_loading_it(siim, siim_root, tmp_path, capsys):
    _, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test[1:])
    np.save(folder / f"{test[0]}.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _refused("siim_seg", folder, siim_root, capsys, f"{folder / test[0]}.npy: cannot read the prediction")


def test_an_npz_archive_under_an_npy_name_is_refused(siim, siim_root, tmp_path, capsys):
    _, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test[1:])
    np.savez(tmp_path / "archive.npz", mask=np.zeros((16, 16)))
    (tmp_path / "archive.npz").rename(folder / f"{test[0]}.npy")
    _refused("siim_seg", folder, siim_root, capsys, f"{folder / test[0]}.npy: expected one 2-D array (.npy), "
             "found an .npz archive")


def test_an_unknown_file_in_the_masks_folder_is_named(siim, siim_root, tmp_path, capsys):
    """Old: ignored, exit 0, although the README says unknown ids are errors."""
    _, test, val = siim
    folder = _empty_masks(tmp_path / "masks", test)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"{val[0]}.png")  # a val image: not scored
    (folder / "notes.txt").write_text("hello")
    _refused("siim_seg", folder, siim_root, capsys,
             f"{folder}: 2 file(s) are not the prediction of a test image (<image_id>.png or .npy for the "
             f"{len(test)} images scored), e.g. {val[0]}.png, notes.txt")


def test_hidden_files_are_not_predictions(siim, siim_root, tmp_path, capsys):
    _, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test)
    (folder / ".DS_Store").write_bytes(b"\0")
    code, out, err = _score("siim_seg", folder, siim_root, capsys, "--json")
    assert code == 0, err


def test_a_png_and_an_npy_for_one_image_are_refused(siim, siim_root, tmp_path, capsys):
    _, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test)
    np.save(folder / f"{test[3]}.npy", np.zeros((16, 16), np.float32))
    _refused("siim_seg", folder, siim_root, capsys,
             f"{folder}: 1 images have both a .png and a .npy prediction, e.g. {test[3]}; keep one")


@pytest.mark.parametrize("size", [(16, 32), (1024, 512), (15, 16)])
def test_a_mask_of_another_aspect_ratio_is_refused(siim, siim_root, tmp_path, capsys, size):
    """Old: stretched to the image's size without a word, exit 0. SIIM's masks are 1024x1024."""
    source, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test[1:])
    Image.fromarray(np.zeros(size, np.uint8)).save(folder / f"{test[0]}.png")
    height, width = source.mask(test[0]).shape
    _refused("siim_seg", folder, siim_root, capsys,
             f"{folder / test[0]}.png: a {size[0]}x{size[1]} (HxW) mask for a {height}x{width} image; expected the "
             "image's size or its aspect ratio (a mask is resized, never stretched)")


def test_a_mask_of_the_same_aspect_ratio_is_resized_with_a_note(siim, siim_root, tmp_path, capsys):
    source, test, _ = siim
    folder = _empty_masks(tmp_path / "masks", test)  # 16x16 for 1024x1024: the stated resize rule
    code, out, err = _score("siim_seg", folder, siim_root, capsys, "--json")
    assert code == 0, err
    scored = json.loads(out)
    negatives = sum(1 for i in test if not source.label(i))
    assert scored["metrics"]["dice"] == pytest.approx(negatives / len(test))
    assert f"{len(test)} of {len(test)} masks were not at their image's size" in scored["scoring"]["notes"][0]


# --- grounding, classification --------------------------------------------------------------------------------


def _heatmaps(path, ids, **extra):
    rng = np.random.default_rng(0)
    np.savez(path, **{i: rng.random((8, 8)).astype(np.float32) for i in ids}, **extra)
    return path


@pytest.mark.parametrize("bad, expected", [
    ({"not-an-image": np.ones((8, 8))}, "1 key(s) name no image of the split's test or validation part"),
    ("nan", "the heat map holds NaN or infinite values"),
    ("complex", "expected a 2-D numeric heat map (H, W), got shape (8, 8) of complex128"),
], ids=["unknown_key", "nan", "complex"])
def test_a_bad_heat_map_is_refused_naming_the_key(siim, siim_root, tmp_path, capsys, bad, expected):
    source, test, val = siim
    positive = next(i for i in test if source.label(i))
    extra = bad if isinstance(bad, dict) else {positive: np.full((8, 8), np.nan if bad == "nan" else 1 + 1j)}
    path = _heatmaps(tmp_path / HEATMAPS_FILE, [i for i in test + val if i not in extra], **extra)
    err = _refused("siim_ground", path, siim_root, capsys, str(path), expected)
    if not isinstance(bad, dict):
        assert f"key '{positive}'" in err


def test_a_bad_probability_or_an_unknown_row_is_refused_naming_the_line(siim, siim_root, tmp_path, capsys):
    _, test, val = siim
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = {i: [0.5] for i in test + val}
    write_probabilities(folder, ["pneumothorax"], {**rows, test[2]: [float("nan")]})
    _refused("siim_zs", folder, siim_root, capsys, f"{folder / PROBABILITIES_FILE} line 4 column 'pneumothorax': "
             "'nan' is not a probability (a number in [0, 1])")
    write_probabilities(folder, ["pneumothorax"], {**rows, "stranger": [0.5]})
    _refused("siim_zs", folder, siim_root, capsys, "1 row(s) for images that are neither test images of the split "
             "nor threshold images", "stranger")


# --- property: random arrays are scored as a direct Dice says, or refused by name --------------------------------


def _direct_dice(values: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Dice of ``values`` (resized bilinearly to ``truth`` when smaller) against ``truth > 0.5``, in numpy."""
    if values.shape != truth.shape:
        values = F.interpolate(torch.from_numpy(values.astype(np.float32))[None, None], size=truth.shape,
                               mode="bilinear", align_corners=False)[0, 0].numpy()
    predicted, actual = values > threshold, truth > 0.5
    total = predicted.sum() + actual.sum()
    return 1.0 if total == 0 else float(2 * (predicted & actual).sum() / total)


_SHAPES = st.sampled_from([(1024, 1024), (32, 32), (8, 8), (8, 16), (33, 32)])
_PROBABILITIES = st.floats(0, 1, width=32)
# Any float, NaN and the infinities included, or a probability (so that valid maps are drawn often too).
_ANY = st.floats(allow_nan=True, allow_infinity=True, width=32) | _PROBABILITIES


@st.composite
def _prediction(draw):
    shape = draw(_SHAPES)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elements = draw(st.sampled_from([_PROBABILITIES, _ANY]))
    return draw(arrays(dtype, shape, elements=elements, fill=_PROBABILITIES))


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prediction=_prediction())
def test_random_npy_maps_are_scored_as_dice_or_refused_by_name(siim, tmp_path_factory, prediction):
    source, test, _ = siim
    image_id = next(i for i in test if source.label(i))
    truth = source.mask(image_id)
    config = {**load_task("siim_seg").config, "bootstrap_resamples": 10}
    folder = tmp_path_factory.mktemp("random")
    np.save(folder / f"{image_id}.npy", prediction)
    valid = (np.isfinite(prediction).all() and prediction.min() >= 0 and prediction.max() <= 1
             and prediction.shape[0] == prediction.shape[1])
    event("refused" if not valid else "scored")
    if not valid:
        with pytest.raises(DataError, match=f"{image_id}.npy: .*(NaN or infinite|range from|aspect ratio)"):
            SEGMENTATION.score(folder, source, SplitIds([], [], [image_id]), config)
        return
    scored = SEGMENTATION.score(folder, source, SplitIds([], [], [image_id]), config)
    assert scored["per_image"][image_id] == pytest.approx(_direct_dice(prediction, truth, config["threshold"]))
