"""CLIP fine-tuning: sentence splitting, the relaxed contrastive loss, learning, resuming, MIMIC-CXR pairs, CLI."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.cli import main
from vlpbench.data.images import read_image
from vlpbench.errors import ConfigError, DataError
from vlpbench.synthetic.chest import place_lung, render
from vlpbench.testing import write_clip_checkpoint
from vlpbench.tools.clip_finetune import (
    FinetuneConfig,
    clip_loss,
    csv_pairs,
    finetune,
    mimic_pairs,
    relax_positives,
    report_text,
    split_sentences,
)
from vlpbench.tools.clip_finetune.trainer import lr_factor

CPU = torch.device("cpu")
SIZE = 32  # the tiny CLIP's input: 8-px patches, a 4x4 grid
RENDER = 64  # pictures are drawn at this size; the image cache shrinks them to SIZE
FINDING = "pleural effusion"
# Terse sentences, as report impressions often are. The zero-shot prompts are phrased like them (TEMPLATES):
# a tiny text encoder trained for a few steps still reads the end-of-text position, so a prompt whose length
# or final period differs from every training sentence is out of its distribution.
POSITIVE = ("Pleural effusion.", "Small pleural effusion.", "Pleural effusion at the lung base.")
NEGATIVE = ("No pleural effusion.", "No pleural effusion is seen.")
TEMPLATES = ("{}.", "no {}.")
OTHER = ("Heart size is normal.", "The mediastinum is unremarkable.", "Chest radiograph was obtained.")


# --- sentences ----------------------------------------------------------------------------------------------

def test_split_sentences_cuts_at_sentence_ends_only():
    text = ("FINDINGS: 1. Small left effusion.  2. No pneumothorax. Dr. ___ was paged at 2.5 pm. "
            "Is there edema? IMPRESSION: Cardiomegaly!")
    assert split_sentences(text) == ["Small left effusion.", "No pneumothorax.", "Dr. ___ was paged at 2.5 pm.",
                                     "Is there edema?", "Cardiomegaly!"]
    assert split_sentences(text, min_words=3) == ["Small left effusion.", "Dr. ___ was paged at 2.5 pm.",
                                                  "Is there edema?"]
    # Nothing survives the word rule: the whole text is the one sentence; no letter at all: no sentence.
    assert split_sentences("Clear.  ___.", min_words=2) == ["Clear. ___."]
    assert split_sentences("1. ___. 2.") == []
    assert report_text("Lungs are clear.", "") == "Lungs are clear."
    assert report_text(" Effusion. ", "No change.") == "Effusion. No change."


# --- loss ---------------------------------------------------------------------------------------------------

def _features(seed: int, n: int = 6, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(n, dim, generator=generator), dim=1)
    return image.double(), text.double()


def _reference_loss(similarity: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE written out with numpy: mean over rows and columns of -log softmax(diagonal)."""
    logits = scale * similarity

    def mean_nll(z: np.ndarray) -> float:
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z)))

    return (mean_nll(logits) + mean_nll(logits.T)) / 2


def test_plain_loss_matches_a_numpy_reference_and_relaxation_below_the_margin_changes_nothing():
    image, text = _features(0)
    similarity = (image @ text.T).numpy()
    plain = clip_loss(image, text, torch.tensor(14.0, dtype=torch.float64))
    assert plain.item() == pytest.approx(_reference_loss(similarity, 14.0), rel=1e-12)
    above_all = float(similarity.diagonal().max()) + 1e-6
    for margin in (above_all, 1.0):
        relaxed = clip_loss(image, text, torch.tensor(14.0, dtype=torch.float64), margin=margin)
        assert relaxed.item() == plain.item()


def test_relaxation_caps_positives_above_the_margin_and_stops_their_gradient():
    image, text = _features(1)
    similarity = (image @ text.T).numpy()
    margin = float(np.median(similarity.diagonal()))
    capped = similarity.copy()
    np.fill_diagonal(capped, np.minimum(similarity.diagonal(), margin))
    relaxed = clip_loss(image, text, torch.tensor(10.0, dtype=torch.float64), margin=margin)
    assert relaxed.item() == pytest.approx(_reference_loss(capped, 10.0), rel=1e-12)
    assert relaxed.item() != pytest.approx(_reference_loss(similarity, 10.0), rel=1e-6)

    s = torch.tensor(similarity, requires_grad=True)
    relax_positives(s, margin).sum().backward()
    above = similarity.diagonal() > margin
    assert above.sum() == 3
    assert np.array_equal(np.diag(s.grad.numpy()), (~above).astype(float))
    off_diagonal = ~np.eye(len(similarity), dtype=bool)
    assert (s.grad.numpy()[off_diagonal] == 1).all()

    # Through the whole loss: a positive above the margin receives no gradient at all.
    s = torch.tensor(similarity, requires_grad=True)
    logits = 10.0 * relax_positives(s, margin)
    targets = torch.arange(len(s))
    loss = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    loss.backward()
    assert (np.diag(s.grad.numpy())[above] == 0).all() and (np.diag(s.grad.numpy())[~above] < 0).all()


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    assert [lr_factor(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)


# --- synthetic image-report pairs ---------------------------------------------------------------------------

def _lungs(rng: np.random.Generator) -> np.ndarray:
    """Two elliptical lung fields, jittered (cheaper than the real masks and enough for the renderer)."""
    y = np.arange(RENDER)[:, None] / RENDER
    x = np.arange(RENDER)[None, :] / RENDER
    mask = np.zeros((RENDER, RENDER), dtype=np.uint8)
    for centre in (0.3, 0.7):
        cx, a, b = centre + rng.uniform(-0.03, 0.03), rng.uniform(0.13, 0.17), rng.uniform(0.3, 0.36)
        mask |= (((x - cx) / a) ** 2 + ((y - 0.5) / b) ** 2 < 1).astype(np.uint8)
    return mask


def _effusion(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """The lower 40 % of one lung, as a bright opacity field."""
    columns = np.arange(RENDER)[None, :]
    side_columns = np.nonzero(lung.any(axis=0))[0]
    middle = (side_columns.min() + side_columns.max()) / 2
    side = lung * ((columns < middle) if rng.random() < 0.5 else (columns >= middle))
    rows = np.nonzero(side.any(axis=1))[0]
    level = rows.max() - 0.4 * (rows.max() - rows.min())
    return (side * (np.arange(RENDER)[:, None] > level)).astype(np.float32)


def write_pairs(folder: Path, n: int, seed: int) -> np.ndarray:
    """``n`` chest pictures, half with an effusion, and a pairs CSV whose reports say so; the labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for k in range(n):
        lung = place_lung(rng, _lungs(rng))
        present = bool(rng.random() < 0.5)
        pixels = render(rng, lung, RENDER, opacity=_effusion(rng, lung) if present else None)
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")
        sentences = [str(rng.choice(POSITIVE if present else NEGATIVE)), str(rng.choice(OTHER))]
        rows.append((f"{k:03d}.png", " ".join(rng.permutation(sentences))))
        labels.append(present)
    with open(folder / "pairs.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image_path", "report"), *rows])
    return np.array(labels)


def zero_shot_auc(checkpoint: Path, folder: Path, labels: np.ndarray) -> float:
    """AUC of the clip adapter's zero-shot score ("pleural effusion." vs "no pleural effusion.") on ``folder``."""
    adapter = build_adapter("clip", checkpoint)
    ids = csv_pairs(folder / "pairs.csv").ids
    pixels = torch.from_numpy(np.stack([read_image(folder / i) for i in ids])).unsqueeze(1)
    scores = adapter.zero_shot_scores(adapter.preprocess(pixels), [FINDING], TEMPLATES)[:, 0]
    return float(roc_auc_score(labels, scores.numpy()))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_clip_checkpoint(tmp_path_factory.mktemp("clip") / "init.pt", seed=0, image_size=SIZE,
                                 patch_size=8, vision_layers=1, text_layers=1, context_length=16)


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("pairs")
    return {"train": (root / "train", write_pairs(root / "train", 128, seed=0)),
            "test": (root / "test", write_pairs(root / "test", 64, seed=1))}


# --- learning -----------------------------------------------------------------------------------------------

# 48 steps. A higher learning rate learns in fewer steps but can collapse the tiny text tower (every text
# embedding the same, the loss stuck at ln 32); 1e-3 reached AUC 0.97-0.98 with each of the orders seed 0, 1, 2.
LEARN = FinetuneConfig(epochs=12, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_steps=5, margin=0.8)


def test_finetuning_lifts_zero_shot_auc_from_chance(tiny_clip, pair_folders, tmp_path):
    (train, _), (test, test_labels) = pair_folders["train"], pair_folders["test"]
    before = zero_shot_auc(tiny_clip, test, test_labels)
    out = tmp_path / "run"
    metadata = finetune(csv_pairs(train / "pairs.csv"), tiny_clip, out, LEARN, device=CPU, progress=False)
    after = zero_shot_auc(out / "model.pt", test, test_labels)
    # A random CLIP's score is chance in expectation over initialisations, but one initialisation can lean
    # either way: random features already see that effusions are bright. Training must clearly beat it.
    assert before <= 0.75, before
    assert after >= 0.9 and after - before >= 0.2, (before, after)

    # The result is an open_clip trainer checkpoint that the clip adapter loads strictly, every key mapped.
    adapter = build_adapter("clip", out / "model.pt")
    assert adapter.report.ok and len(adapter.report.mapped) == len(build_adapter("clip", tiny_clip).report.mapped)
    assert sorted(torch.load(out / "model.pt", weights_only=True)) == ["epoch", "name", "state_dict"]

    steps = 12 * (128 // 32)
    assert metadata["steps"] == {"done": steps, "total": steps, "per_epoch": 4, "warmup": 5, "finished": True}
    assert metadata["data"]["pairs"] == 128 and metadata["data"]["text_views"] == 256
    assert metadata["files"]["model"]["sha256"] == adapter.checkpoint_sha256
    assert json.loads((out / "metadata.json").read_text())["config"]["margin"] == 0.8
    with open(out / "loss.csv") as handle:
        curve = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in curve] == list(range(steps))
    losses = np.array([float(r["loss"]) for r in curve])
    assert losses[-20:].mean() < losses[:5].mean() - 0.2
    print(f"zero-shot AUC before {before:.3f}, after {after:.3f}; loss {losses[:5].mean():.3f} -> "
          f"{losses[-20:].mean():.3f}")


# --- resuming -----------------------------------------------------------------------------------------------

def test_resumed_run_equals_an_uninterrupted_one(tiny_clip, pair_folders, tmp_path):
    every = csv_pairs(pair_folders["test"][0] / "pairs.csv")
    pairs = replace(every, ids=every.ids[:48], texts=every.texts[:48])
    # 3 steps an epoch: the interruption at step 4 falls inside the second epoch, after a save at step 2.
    config = FinetuneConfig(epochs=2, batch_size=16, lr=1e-3, warmup_steps=2, save_every=2, margin=0.3)
    whole = finetune(pairs, tiny_clip, tmp_path / "whole", config, device=CPU, progress=False)
    part = finetune(pairs, tiny_clip, tmp_path / "split", config, device=CPU, stop_at_step=4, progress=False)
    assert part["steps"]["done"] == 4 and part["files"]["model"] is None
    assert not (tmp_path / "split" / "model.pt").exists()
    with pytest.raises(ConfigError, match="--resume"):
        finetune(pairs, tiny_clip, tmp_path / "split", config, device=CPU, progress=False)
    with pytest.raises(ConfigError, match="differing config"):
        finetune(pairs, tiny_clip, tmp_path / "split", replace(config, lr=2e-3), device=CPU, resume=True,
                 progress=False)
    resumed = finetune(pairs, tiny_clip, tmp_path / "split", config, device=CPU, resume=True, progress=False)

    assert resumed["steps"] == whole["steps"] and whole["steps"]["done"] == 6
    one = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert (tmp_path / "whole" / "loss.csv").read_text() == (tmp_path / "split" / "loss.csv").read_text()


def test_bad_settings_and_pair_files_are_named(tiny_clip, tmp_path):
    with pytest.raises(ConfigError, match="batch_size=1"):
        FinetuneConfig(batch_size=1).check()
    with pytest.raises(ConfigError, match="margin=1.5"):
        FinetuneConfig(margin=1.5).check()
    (tmp_path / "a.png").write_bytes(b"")
    bad = tmp_path / "pairs.csv"
    bad.write_text("image_path,report\na.png,Effusion.\nb.png,Clear.\n")
    with pytest.raises(DataError, match=r"pairs.csv line 3: image file not found"):
        csv_pairs(bad)
    bad.write_text("image_path,text\na.png,Effusion.\n")
    with pytest.raises(DataError, match="header lacks report"):
        csv_pairs(bad)
    bad.write_text("image_path,report\na.png,  \n")
    with pytest.raises(DataError, match="line 2: empty report"):
        csv_pairs(bad)
    bad.write_text('image_path,report\na.png,"FINDINGS: Small\neffusion.\nIMPRESSION: Effusion."\n')
    assert csv_pairs(bad).texts == ["FINDINGS: Small effusion. IMPRESSION: Effusion."]


# --- MIMIC-CXR pairs and the command ------------------------------------------------------------------------

def test_mimic_pairs_and_the_command(tiny_clip, tmp_path, monkeypatch, capsys):
    import vlpbench.synthetic.mimic_cxr as synth_module

    # The pictures do not matter here; a flat grey image keeps the synthetic release fast to write.
    monkeypatch.setattr(synth_module, "draw", lambda seed, findings, shape, frontal=True: np.full(shape, 90, np.uint8))
    summary = api.synth("mimic_cxr", tmp_path / "mimic", n=40, seed=3, size=32, progress=False)
    from vlpbench.data.mimic_cxr import MimicCxrSource

    source = MimicCxrSource(tmp_path / "mimic")
    frontal_train = [i for i, image in summary["images"].items()
                     if image["view"] in ("PA", "AP") and source.official_split(i) == "train"]
    labelled = [i for i in frontal_train if source.study_id(i) not in summary["unlabelled"]]
    expected = {i: report_text(summary["reports"][source.study_id(i)]["FINDINGS"],
                               summary["reports"][source.study_id(i)]["IMPRESSION"]) for i in labelled}
    with_text = {i: t for i, t in expected.items() if t}

    pairs = mimic_pairs(tmp_path / "mimic")
    assert dict(zip(pairs.ids, pairs.texts)) == with_text and len(with_text) >= 8
    assert pairs.description["left_out"] == {"not_in_folder": len(frontal_train) - len(labelled), "no_report": 0,
                                             "no_findings_or_impression": len(expected) - len(with_text)}
    with pytest.raises(ConfigError, match="split parts"):
        mimic_pairs(tmp_path / "mimic", ("training",))

    out = tmp_path / "ft"
    code = main(["-q", "finetune-clip", "--data", str(tmp_path / "mimic"), "--checkpoint", str(tiny_clip),
                 "--out", str(out), "--epochs", "1", "--batch-size", "4", "--margin", "off", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"on {len(with_text)} pairs" in printed and "--task chexpert_zs" in printed
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["config"]["margin"] is None and metadata["data"]["kind"] == "mimic_cxr"
    assert metadata["steps"]["done"] == len(with_text) // 4
    assert build_adapter("clip", out / "model.pt").report.ok
