"""The ``paper`` profile of the zero-shot tasks and its options: ``acc_rule`` (MedKLIP's ``pred > cut``),
``class_prompts`` (the strings CheXzero's and KAD's code pass) and ``center_crop`` (resize 256, crop 224),
each checked against a computation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from vlpbench import api
from vlpbench.data.cache import resize_image
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.classification import threshold_metrics
from vlpbench.protocols import SplitIds
from vlpbench.protocols.classification import class_thresholds, evaluate_classification
from vlpbench.protocols.zero_shot import PROTOCOL, class_prompts, run_zero_shot_task, zero_shot_probabilities
from vlpbench.tasks import load_task
from vlpbench.testing.weightless import WeightlessAdapter

ZS_TASKS = ("rsna_zs", "siim_zs", "cxr14_zs", "chexpert_zs")

# The strings of the reference code, copied from the files cited (test data, not code).
# KAD A3_CLIP/test_chestxray14.py:105
KAD_CXR14 = ["atelectasis", "cardiomegaly", "pleural effusion", "infiltration", "lung mass", "lung nodule", "pneumonia",
             "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural thicken", "hernia"]
KAD_CHEXPERT = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion"]  # test_chexpert.py:104
CHEXZERO_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                   "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                   "Pneumothorax", "Support Devices"]  # zero_shot.py:520-523


def test_acc_rule_gt_counts_ties_at_the_cut_as_negative():
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 1])
    scores = np.array([0.9, 0.6, 0.6, 0.6, 0.4, 0.2, 0.1, 0.6, 0.3, 0.8])
    for cut in (0.6, 0.4, 0.2):
        ge, gt = threshold_metrics(labels, scores, cut), threshold_metrics(labels, scores, cut, acc_rule="gt")
        assert ge["acc"] == pytest.approx(accuracy_score(labels, scores >= cut))
        assert gt["acc"] == pytest.approx(accuracy_score(labels, scores > cut))
        # F1 and MCC stay those of score >= cut, as MedKLIP's F1 is the precision-recall curve's.
        assert gt["f1"] == ge["f1"] == pytest.approx(f1_score(labels, scores >= cut))
        assert gt["mcc"] == ge["mcc"] == pytest.approx(matthews_corrcoef(labels, scores >= cut))
    # At 0.4 one positive sits on the cut: counted right by >=, wrong by >.
    assert threshold_metrics(labels, scores, 0.4)["acc"] == pytest.approx(0.8)
    assert threshold_metrics(labels, scores, 0.4, acc_rule="gt")["acc"] == pytest.approx(0.7)
    with pytest.raises(DataError, match="acc_rule"):
        threshold_metrics(labels, scores, 0.6, acc_rule="gte")


def _medklip_f1_acc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """MedKLIP's rule in plain words: the best F1 over every cut ``score >= cut`` on these very images;
    accuracy of ``score > that cut`` (the lowest cut among equal F1, as ascending PR thresholds give)."""
    cuts = np.unique(scores)
    f1s = np.array([f1_score(labels, scores >= cut) for cut in cuts])
    best = cuts[int(np.argmax(f1s))]
    return float(f1s.max()), float(accuracy_score(labels, scores > best))


def test_test_oracle_with_acc_rule_gt_is_medklips_f1_and_acc():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (200, 3))
    scores = np.round(np.clip(0.3 * labels + rng.random((200, 3)) * 0.7, 0, 1), 2)  # rounded: ties on cuts
    classes = ["a", "b", "c"]
    thresholds = class_thresholds(labels, scores, classes, "f1", "lowest")
    result = evaluate_classification("multilabel", classes, [str(i) for i in range(200)], labels, scores,
                                     ["f1", "acc"], thresholds=thresholds, n_resamples=20, seed=0, acc_rule="gt")
    reference = [_medklip_f1_acc(labels[:, k], scores[:, k]) for k in range(3)]
    assert result["metrics"]["f1"] == pytest.approx(np.mean([f for f, _ in reference]))
    assert result["metrics"]["acc"] == pytest.approx(np.mean([a for _, a in reference]))


def test_threshold_ties_pick_the_lowest_or_highest_of_equally_good_cuts():
    # Cuts 0.8 (tp 2, fp 0, fn 2) and 0.5 (tp 4, fp 4, fn 0) both give F1 2/3; 0.6 and 0.3 are worse.
    labels = np.array([1, 1, 0, 0, 0, 0, 1, 1, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.3])
    f1 = {cut: f1_score(labels, scores >= cut) for cut in np.unique(scores)}
    assert f1[0.8] == pytest.approx(f1[0.5]) == pytest.approx(max(f1.values()))
    assert class_thresholds(labels[:, None], scores[:, None], ["x"], "f1") == [0.8]
    assert class_thresholds(labels[:, None], scores[:, None], ["x"], "f1", "lowest") == [0.5]
    with pytest.raises(ConfigError, match="threshold_ties 'middle'"):
        class_thresholds(labels[:, None], scores[:, None], ["x"], "f1", "middle")


def test_prompts_of_the_reference_code():
    cxr14 = load_task("cxr14_zs").config["classes"]
    chexpert = load_task("chexpert_zs").config["classes"]
    assert class_prompts({"class_prompts": "kad"}, cxr14) == KAD_CXR14
    assert class_prompts({"class_prompts": "kad"}, chexpert) == KAD_CHEXPERT
    assert class_prompts({"class_prompts": "kad"}, load_task("chexpert5x200_zs").config["classes"]) == KAD_CHEXPERT
    chexzero_chexpert = class_prompts({"class_prompts": "chexzero"}, chexpert)
    assert chexzero_chexpert == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert set(chexzero_chexpert) <= set(CHEXZERO_LABELS)
    assert class_prompts({"class_prompts": "chexzero"}, ["pneumonia"]) == ["Pneumonia"]  # rsna_zs
    assert class_prompts({"class_prompts": "chexzero"}, ["pneumothorax"]) == ["Pneumothorax"]  # siim_zs
    chexzero_cxr14 = class_prompts({"class_prompts": "chexzero"}, cxr14)
    # CheXzero's own spelling where its label list has the finding; NIH's name, '_' as a space, elsewhere.
    assert [p for p in chexzero_cxr14 if p in CHEXZERO_LABELS] == [
        "Atelectasis", "Cardiomegaly", "Pneumonia", "Pneumothorax", "Consolidation", "Edema"]
    assert chexzero_cxr14 == [c.replace("_", " ") for c in cxr14]
    plain = load_task("rsna_zs").config
    assert class_prompts(plain, ["pneumonia"]) == ["pneumonia"]
    with pytest.raises(ConfigError, match="kad reference code has no text for class.*pneumonia"):
        class_prompts({"class_prompts": "kad"}, ["pneumonia"])  # KAD tests no RSNA classification
    with pytest.raises(ConfigError, match="class_prompts"):
        class_prompts({**plain, "class_prompts": "gloria"}, ["pneumonia"])


class BrightnessModel(WeightlessAdapter):
    """Bright images point towards "<finding>", dark ones towards "no <finding>"; it records its texts."""

    name = "zero-shot-paper-test"
    description = "test model: image brightness as the finding's evidence"
    capabilities = frozenset({"embed_image", "embed_text"})
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    texts: list[str] = []

    def embed_image(self, images):
        angle = math.pi / 2 * torch.sigmoid(4 * images.mean(dim=(1, 2, 3)))
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)

    def embed_text(self, texts):
        type(self).texts.extend(texts)
        return torch.tensor([[1.0, 0.0] if t.startswith("no ") else [0.0, 1.0] for t in texts])


class Model224(BrightnessModel):
    """The same at 224² input; records the uint8 images it is given."""

    name = "zero-shot-paper-test-224"
    image_size = 224
    seen: list[np.ndarray] = []

    def preprocess(self, images):
        type(self).seen.extend(images[:, 0].cpu().numpy())
        return super().preprocess(images)


class Model256(BrightnessModel):
    name = "g2d"  # G2D's input size, and its name in the refusal
    image_size = 256


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot_paper") / "rsna"
    api.synth("rsna", root, n=80, size=32, progress=False)
    source = RsnaSource(root)
    split = load_split("rsna")
    present = set(source.image_ids)
    return source, SplitIds(train=[], val=[i for i in split.ids("val") if i in present],
                            test=[i for i in split.ids("test") if i in present])


def test_paper_profile_run_thresholds_on_test_accuracy_strict_and_chexzero_prompts(rsna, tmp_path):
    source, split = rsna
    config = load_task("rsna_zs", profile="paper").resolve({"bootstrap_resamples": 50})
    BrightnessModel.texts = []
    outcome = run_zero_shot_task(BrightnessModel(), source, split, config, seed=0, device=torch.device("cpu"),
                                 progress=False, predictions=tmp_path)
    assert set(BrightnessModel.texts) == {"Pneumonia", "no Pneumonia"}
    training = outcome["training"]
    assert training["optimistic"] is True and training["threshold_source"] == "test_oracle"
    assert training["acc_rule"] == "gt" and training["class_prompts"] == "chexzero"
    assert training["threshold_ties"] == "lowest"
    assert training["prompts"] == {"pneumonia": "Pneumonia"}

    model = BrightnessModel()
    pixels = torch.from_numpy(np.stack([resize_image(source.image(i), 32) for i in split.test]))[:, None]
    scores = model.zero_shot_scores(model.preprocess(pixels), ["Pneumonia"]).numpy()[:, 0].astype(np.float64)
    labels = np.array([source.label(i) for i in split.test])
    f1, acc = _medklip_f1_acc(labels, scores)
    assert outcome["metrics"]["f1"] == pytest.approx(f1, abs=1e-6)
    assert outcome["metrics"]["acc"] == pytest.approx(acc, abs=1e-6)
    cut = training["thresholds"]["pneumonia"]
    assert outcome["metrics"]["acc"] == pytest.approx(accuracy_score(labels, scores > cut), abs=1e-6)

    scored = PROTOCOL.score(tmp_path, source, split, config)  # score reads the same rule from the config
    assert scored["metrics"] == pytest.approx(outcome["metrics"])
    assert scored["scoring"]["acc_rule"] == "gt" and scored["scoring"]["optimistic"] is True
    assert scored["scoring"]["threshold_ties"] == "lowest"


def test_center_crop_resizes_to_256_and_crops_224(rsna):
    source, split = rsna
    ids = split.test[:5]
    config = {**load_task("rsna_zs").config, "center_crop": True}
    Model224.seen = []
    zero_shot_probabilities(Model224(), source, ids, ["pneumonia"], ("{}", "no {}"), config,
                            device=torch.device("cpu"), progress=False, desc="test")
    expected = [resize_image(source.image(i), 256)[16:240, 16:240] for i in ids]  # (256 - 224) / 2 = 16
    np.testing.assert_array_equal(np.stack(Model224.seen), np.stack(expected))
    Model224.seen = []
    zero_shot_probabilities(Model224(), source, ids, ["pneumonia"], ("{}", "no {}"), {**config, "center_crop": False},
                            device=torch.device("cpu"), progress=False, desc="test")
    np.testing.assert_array_equal(np.stack(Model224.seen), np.stack([resize_image(source.image(i), 224) for i in ids]))


def test_center_crop_refuses_an_adapter_that_takes_no_224_input(rsna):
    source, split = rsna
    config = {**load_task("rsna_zs").config, "center_crop": True, "bootstrap_resamples": 10}
    for model in (Model256(), BrightnessModel()):
        with pytest.raises(ConfigError, match=rf"center_crop=true .* takes {model.image_size}² input"):
            run_zero_shot_task(model, source, split, config, seed=0, device=torch.device("cpu"), progress=False)
    with pytest.raises(ConfigError, match="attention pool"):
        run_zero_shot_task(Model256(), source, split, config, seed=0, device=torch.device("cpu"), progress=False)


def test_profiles_of_the_zero_shot_tasks():
    for name in ZS_TASKS:
        canonical = load_task(name)
        assert canonical.version == 1  # canonical numbers are unchanged
        keys = ("threshold_source", "acc_rule", "class_prompts", "threshold_criterion", "center_crop")
        assert tuple(canonical.config[k] for k in keys) == ("val", "ge", "plain", "f1", False)
        paper = load_task(name, profile="paper")
        assert tuple(paper.config[k] for k in keys) == ("test_oracle", "gt", "chexzero", "f1", False)
        sources = {setting.key: setting.source for setting in paper.profile_settings()}
        assert set(sources) - {"split"} == {"threshold_source", "threshold_ties", "acc_rule", "class_prompts"}
        assert paper.config["threshold_ties"] == "lowest" and canonical.config["threshold_ties"] == "highest"
        assert "Sample_zero-shot_Classification_CXR14/test.py:126-137" in sources["threshold_source"]
        assert "test.py:138" in sources["acc_rule"] and "CheXzero zero_shot.py:520" in sources["class_prompts"]
        # RSNA runs on MedKLIP's public test list, SIIM on MAVL's; the other test sets are the canonical ones
        assert paper.split == {"rsna_zs": "medklip", "siim_zs": "mavl"}.get(name, canonical.split)
    assert load_task("chexpert5x200_zs").config["class_prompts"] == "plain"
    with pytest.raises(ConfigError, match="no reference evaluation code"):
        load_task("chexpert5x200_zs", profile="paper")
