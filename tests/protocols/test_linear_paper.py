"""The linear-classification ``paper`` profile: MGCA's image pipeline (``resize: pad``, ``upsample_299``),
the feature-cache key, the task files' paper settings, and MGCA's ``df.sample`` fraction draw.

Every expected value is computed here independently: MGCA's ``resize_img`` written out with OpenCV,
the 299 upsampling written out in numpy, and the fraction draw taken from pandas itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlpbench.errors import ConfigError
from vlpbench.protocols.features import Preprocessing, RunEncoder, cached_features, feature_key
from vlpbench.protocols.linear import _augmented_batches, mgca_fraction, mgca_fraction_positions
from vlpbench.tasks import load_task

# (height, width): taller, wider, square, and odd paddings on both sides.
SHAPES = [(390, 320), (300, 411), (280, 280), (333, 257), (259, 515)]


class PortraitSource:
    """In-memory reader of deterministic random grey images of the SHAPES above."""

    def __init__(self, tag: str):
        self.ids = [f"img{k}" for k in range(len(SHAPES))]
        self.tag = tag

    def fingerprint(self) -> str:
        return f"paper-{self.tag}"

    def image(self, image_id: str) -> np.ndarray:
        k = int(image_id[3:])
        rng = np.random.default_rng(k)
        height, width = SHAPES[k]
        # A smooth ramp plus noise: INTER_AREA's averaging is exercised, not just constant patches.
        ramp = np.add.outer(np.linspace(30, 150, height), np.linspace(0, 80, width))
        return np.clip(ramp + rng.integers(0, 25, size=(height, width)), 0, 255).astype(np.uint8)


class Recorder(torch.nn.Module):
    """An "encoder" that records what it is fed and returns it as its one feature map."""

    out_channels = (3,)

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return [x]


class RecordingAdapter:
    name, checkpoint_sha256, options, encoder_name = "recorder", "0" * 64, {}, "recorder"

    def __init__(self):
        self.encoders: list[Recorder] = []

    def encoder(self) -> Recorder:
        self.encoders.append(Recorder())
        return self.encoders[-1]

    def inputs(self) -> torch.Tensor:
        return torch.cat([x for encoder in self.encoders for x in encoder.seen])


def mgca_resize_img(img: np.ndarray, scale: int) -> np.ndarray:
    """MGCA's resize_img (HKU-MedAI/MGCA mgca/datasets/utils.py:28-74), written out with OpenCV."""
    cv2 = pytest.importorskip("cv2")
    height, width = img.shape
    if height == max(height, width):  # index of the first maximal dimension is 0: "heigher"
        size = (scale, int(float(width) * float(scale / float(height))))
    else:
        size = (int(float(height) * float(scale / float(width))), scale)
    out = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    pad_h, pad_w = scale - out.shape[0], scale - out.shape[1]
    return np.pad(out, [(int(np.floor(pad_h / 2)), int(np.ceil(pad_h / 2))),
                        (int(np.floor(pad_w / 2)), int(np.ceil(pad_w / 2)))], constant_values=0)


def torchvision_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision CenterCrop's offsets: int(round((side - size) / 2))."""
    top, left = (int(round((side - size) / 2.0)) for side in img.shape)
    return img[top:top + size, left:left + size]


def _pre(**changes) -> Preprocessing:
    # mean 0, std 1: the encoder input is the [0, 1] grey value itself, so it can be compared in grey levels.
    return Preprocessing(**{"resize": 256, "crop": 224, "mean": 0.0, "std": 1.0, "upsample_299": False, **changes})


def _grey_levels(x: torch.Tensor) -> np.ndarray:
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    return (x[:, 0] * 255.0).numpy()


def test_pad_feeds_the_encoder_mgca_resize_img_then_the_center_crop():
    source, adapter = PortraitSource("pad"), RecordingAdapter()
    cached_features(adapter, source, source.ids, _pre(resize_rule="pad"), batch_size=2, device=torch.device("cpu"))
    seen = _grey_levels(adapter.inputs())
    expected = np.stack([torchvision_center_crop(mgca_resize_img(source.image(i), 256), 224) for i in source.ids])
    assert seen.shape == expected.shape == (len(SHAPES), 224, 224)
    assert np.abs(seen - expected).max() <= 1.0
    # The zero band is there: the 320-wide portrait becomes 210 wide, 23 columns of padding each side, 7 kept by the crop.
    assert (expected[0][:, :7] == 0).all() and (seen[0][:, :7] == 0).all() and (expected[0][:, 7] > 0).all()


def test_square_is_not_mgca_resize_img_on_non_square_images():
    source, adapter = PortraitSource("square"), RecordingAdapter()
    cached_features(adapter, source, source.ids, _pre(), batch_size=8, device=torch.device("cpu"))
    seen = _grey_levels(adapter.inputs())
    expected = np.stack([torchvision_center_crop(mgca_resize_img(source.image(i), 256), 224) for i in source.ids])
    assert np.abs(seen[0] - expected[0]).max() > 50  # the squash stretches, pad keeps the aspect and pads


def test_mgca_mode_augments_the_padded_images_too():
    source, adapter = PortraitSource("augment"), RecordingAdapter()
    # crop = resize: RandomCrop has one window, so the augmented input is the whole padded image.
    pre = _pre(crop=256, resize_rule="pad")
    batch = _augmented_batches(RunEncoder(adapter, torch.device("cpu")), source, source.ids, pre, "crop", 0,
                               torch.device("cpu"), False)
    batch(torch.tensor([3, 0, 1]))
    seen = _grey_levels(adapter.inputs())
    expected = np.stack([mgca_resize_img(source.image(source.ids[k]), 256) for k in (0, 1, 3)])  # file order
    assert np.abs(seen - expected).max() <= 1.0


def test_upsample_299_is_bilinear_with_aligned_corners_after_normalisation():
    source, adapter = PortraitSource("upsample"), RecordingAdapter()
    pre = _pre(resize=40, crop=32, mean=0.5, std=0.25, upsample_299=True)
    cached_features(adapter, source, source.ids[:2], pre, batch_size=8, device=torch.device("cpu"))
    seen = adapter.inputs()
    assert seen.shape == (2, 3, 299, 299)
    # Reference: bilinear interpolation with align_corners=True (source = target * (in - 1) / (out - 1)),
    # on the normalised crop, written out in numpy.
    plain = RecordingAdapter()
    cached_features(plain, source, source.ids[:2], _pre(resize=40, crop=32), batch_size=8, device=torch.device("cpu"))
    crop = (plain.inputs()[:, 0].double().numpy() - 0.5) / 0.25
    where = np.arange(299) * (32 - 1) / (299 - 1)
    low = np.minimum(np.floor(where).astype(int), 30)
    frac = where - low
    rows = crop[:, low] * (1 - frac)[None, :, None] + crop[:, low + 1] * frac[None, :, None]
    expected = rows[:, :, low] * (1 - frac) + rows[:, :, low + 1] * frac
    np.testing.assert_allclose(seen[:, 0].double().numpy(), expected, atol=1e-5)


def test_square_and_pad_never_share_cached_features():
    source, adapter = PortraitSource("keys"), RecordingAdapter()
    square, pad = _pre(), _pre(resize_rule="pad")
    square_key, pad_key = feature_key(adapter, source, square), feature_key(adapter, source, pad)
    assert square_key != pad_key
    assert square_key["preprocessing"]["resize_method"] == "pil-bilinear-antialias"
    assert pad_key["preprocessing"]["resize_method"] == "mgca-pad-inter-area"
    assert set(square_key["preprocessing"]) == {"resize", "crop", "mean", "std", "upsample_299", "resize_method",
                                                "pillow", "pool"}
    first = cached_features(adapter, source, source.ids, square, batch_size=8, device=torch.device("cpu"))
    second = cached_features(adapter, source, source.ids, pad, batch_size=8, device=torch.device("cpu"))
    assert not first.hit and not second.hit and first.paths[0].parent != second.paths[0].parent
    assert not np.allclose(first.values, second.values)
    assert cached_features(adapter, source, source.ids, pad, batch_size=8, device=torch.device("cpu")).hit
    assert cached_features(adapter, source, source.ids, square, batch_size=8, device=torch.device("cpu")).hit


def test_resize_option_from_config():
    config = {"resize_size": 256, "image_size": 224, "mean": 0.5, "std": 0.5, "upsample_299": False}
    assert Preprocessing.from_config(config).resize_rule == "square"  # a task without the option
    assert Preprocessing.from_config({**config, "resize": "pad"}).cache_method == "pad_area"
    with pytest.raises(ConfigError, match="resize='stretch': expected one of square, pad"):
        Preprocessing.from_config({**config, "resize": "stretch"})


@pytest.mark.parametrize("task", ["chexpert_cls", "rsna_cls", "covidx_cls"])
def test_paper_profile_holds_mgca_settings_with_sources(task):
    canonical, paper = load_task(task), load_task(task, profile="paper")
    assert (canonical.config["resize"], canonical.config["upsample_299"], canonical.config["linear_mode"],
            canonical.config["head_solver"]) == ("square", False, "cached", "sgd")
    assert paper.profile == "paper"
    assert paper.config == {**canonical.config, "resize": "pad", "upsample_299": True, "linear_mode": "mgca",
                            "batch_size": 8}
    assert paper.config["train_transform"] == ("moco2" if task == "chexpert_cls" else "crop")
    assert paper.config["head_solver"] == "sgd"  # MGCA's AdamW head
    # MGCA's own splits with its df.sample 1 %/10 % subsets (tests/data/test_splits_mgca_cls.py).
    assert canonical.split == "v1" and paper.split == ("mgca_cls" if task == "rsna_cls" else "mgca")
    sources = {s.key: s.source for s in paper.profile_settings()}
    assert set(sources) == {"split", "resize", "upsample_299", "linear_mode", "batch_size"}
    assert "classification_dataset.py" in sources["split"] and "random_state=42" in sources["split"]
    assert "mgca/datasets/utils.py:28-74" in sources["resize"]
    assert "mgca/models/backbones/encoder.py:114-116" in sources["upsample_299"]
    assert sources["batch_size"].startswith("G2D (NeurIPS 2024) Table 6")
    assert all(s.startswith("HKU-MedAI/MGCA mgca/") for k, s in sources.items() if k != "batch_size")


def test_mgca_fraction_is_pandas_sample_with_random_state_42():
    pd = pytest.importorskip("pandas")
    for n, fraction in [(1000, 0.01), (1000, 0.1), (18678, 0.01), (18678, 0.1), (250, 0.01), (250, 0.1), (7, 0.5)]:
        frame = pd.DataFrame({"id": [f"p{k}" for k in range(n)]})
        expected = frame.sample(frac=fraction, random_state=42)["id"].tolist()
        ids = frame["id"].tolist()
        assert mgca_fraction(ids, fraction) == expected
        assert len(expected) == round(fraction * n)
    # 250 * 0.01 = 2.5 rounds half to even: 2 rows (pandas uses Python's round).
    assert len(mgca_fraction_positions(250, 0.01)) == 2
    assert mgca_fraction(["a", "b", "c"], 1.0) == ["a", "b", "c"]  # MGCA samples only when data_pct != 1
    with pytest.raises(ValueError):
        mgca_fraction_positions(10, 0.0)


def test_moco2_blur_is_close_to_pillow_gaussian_blur_as_mgca_applies_it():
    from PIL import Image, ImageFilter

    from vlpbench.protocols.linear import gaussian_blur

    rng = np.random.default_rng(0)
    image = np.clip(np.add.outer(np.linspace(0, 200, 64), np.linspace(0, 50, 64)) + rng.integers(0, 40, (64, 64)),
                    0, 255).astype(np.uint8)
    image[:, :3] = 255  # a bright edge: the border rule matters
    for sigma in (0.5, 1.0, 2.0):
        # MGCA: GaussianBlur(radius=sigma) on the RGB PIL image (HKU-MedAI/MGCA mgca/datasets/transforms.py:94-97).
        pillow = np.asarray(Image.fromarray(image).convert("RGB").filter(ImageFilter.GaussianBlur(radius=sigma)))
        ours = gaussian_blur(torch.from_numpy(image / 255.0)[None], sigma)[0].numpy() * 255
        assert np.abs(ours - pillow[..., 0]).max() <= 6.5


def test_mgca_fraction_over_mgca_rsna_and_covidx_training_order():
    """The subset is a fixed function of the label files once the ids are in the row order of MGCA's
    training CSV; that order is a permutation of sorted patient ids (RSNA) or of the file's rows
    (COVIDx). Reference: pandas and scikit-learn doing what MGCA's preprocessing and dataset do."""
    pd = pytest.importorskip("pandas")
    model_selection = pytest.importorskip("sklearn.model_selection")
    rng = np.random.default_rng(3)
    # RSNA: one row per box, patients unsorted and repeated (mgca/preprocess/rsna.py:34-53).
    patients = [f"{rng.integers(0, 16**8):08x}-{k}" for k in range(1500)]
    rows = pd.DataFrame({"patientId": patients + list(rng.choice(patients, 300))})
    grouped = rows.groupby("patientId").size().reset_index()  # groupby sorts by patientId
    train, _ = model_selection.train_test_split(grouped, test_size=0.15 * 2, random_state=0)
    # COVIDx: the rows of train_COVIDx9A.txt in file order (mgca/preprocess/covidx.py:21-36).
    files = pd.DataFrame({"filename": [f"f{k}.png" for k in rng.permutation(2000)]})
    covidx_train, _ = model_selection.train_test_split(files, train_size=0.8, random_state=0)
    for frame, column, order in [
        (train, "patientId", _train_order(sorted(set(patients)), test_fraction=0.3)),
        (covidx_train, "filename", _train_order(list(files["filename"]), train_fraction=0.8)),
    ]:
        frame = frame.reset_index(drop=True)  # MGCA re-reads the CSV it wrote: a fresh RangeIndex
        assert order == frame[column].tolist()
        for fraction in (0.01, 0.1):
            assert mgca_fraction(order, fraction) == frame.sample(frac=fraction, random_state=42)[column].tolist()


def _train_order(ids: list[str], test_fraction: float | None = None, train_fraction: float | None = None) -> list[str]:
    """scikit-learn's train_test_split(random_state=0) train part, in its order, written with numpy."""
    import math

    n = len(ids)
    n_test = math.ceil(test_fraction * n) if test_fraction is not None else n - math.floor(train_fraction * n)
    return [ids[k] for k in np.random.RandomState(0).permutation(n)[n_test:]]
