"""Image–text retrieval end to end on synthetic CheXpert 5x200 and MIMIC-CXR, with models that look embeddings up
in a table: an aligned one (every image's embedding is its relevant texts' embedding) and a random one."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from vlpbench import api
from vlpbench.adapters.base import CapabilityError
from vlpbench.cli import main
from vlpbench.data.attributes import read_attributes
from vlpbench.data.base import DatasetReader
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols import SplitIds
from vlpbench.protocols.retrieval import (
    SIMILARITY_FILE,
    evaluate_retrieval,
    read_similarity,
    run_retrieval_task,
    write_similarity,
)
from vlpbench.protocols.retrieval_sets import report_text, retrieval_set
from vlpbench.registry import ADAPTERS
from vlpbench.results import write_record
from vlpbench.splits import SPLITS_DIR
from vlpbench.tasks import load_task
from vlpbench.testing.weightless import WeightlessAdapter

TASKS = {"chexpert5x200_ret": "chexpert", "mimic_cxr_ret": "mimic_cxr", "mimic5x200_ret": "mimic_cxr"}
FAST = {"bootstrap_resamples": 50}


def pixel_key(pixels: torch.Tensor) -> str:
    """One preprocessed image, as the key of the table models."""
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


class TableModel(WeightlessAdapter):
    """Embeddings looked up in class-level tables: images by their preprocessed pixels, texts by their text."""

    name = "retrieval-test-table"
    description = "test model: embeddings from a table"
    capabilities = frozenset({"embed_image", "embed_text"})
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    images: dict[str, torch.Tensor] = {}
    texts: dict[str, torch.Tensor] = {}

    def embed_image(self, images):
        return torch.stack([self.images[pixel_key(x)] for x in images])

    def embed_text(self, texts):
        return torch.stack([self.texts[t] for t in texts])


class ImageOnlyModel(TableModel):
    name = "retrieval-test-image-only"
    capabilities = frozenset({"embed_image"})
    capability_hints = {"embed_text": "pass --model-option text_encoder=DIR"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("retrieval")
    facts = {"chexpert": api.synth("chexpert", base / "chexpert", n=60, size=32, progress=False),
             "mimic_cxr": api.synth("mimic_cxr", base / "mimic_cxr", n=80, size=32, progress=False)}
    return {dataset: base / dataset for dataset in facts}, facts


def task_set(task, root):
    """The task's source, retrieval set and test ids, as a run builds them."""
    spec = load_task(task)
    source = api.open_dataset(spec, root)
    ids, _ = api.split_ids(api.task_splits(spec, source)[1], "test", source)
    return source, retrieval_set(source, ids, spec.config), ids


def table_model(task, root, *, aligned: bool, seed: int = 0) -> type[TableModel]:
    """A TableModel subclass for ``task``: aligned (image ↦ one-hot of its relevance key, text ↦ one-hot of its
    key) or random (independent Gaussian vectors)."""
    source, rset, _ = task_set(task, root)
    images = cached_images(source, type(source).__module__.rpartition(".")[2], rset.image_ids, TableModel.image_size,
                           progress=False)
    model = TableModel()
    keys = [pixel_key(model.preprocess(torch.from_numpy(np.array(images[i:i + 1])).unsqueeze(1))[0])
            for i in range(len(rset.image_ids))]
    size = int(max(rset.image_keys.max(), rset.text_keys.max())) + 1
    rng = np.random.default_rng(seed)

    def vector(key):
        return torch.eye(size)[key] if aligned else torch.from_numpy(rng.normal(size=8).astype(np.float32))

    return type(f"Table{seed}", (TableModel,), {
        "images": {pixel: vector(int(k)) for pixel, k in zip(keys, rset.image_keys)},
        "texts": {text: vector(int(k)) for text, k in zip(rset.texts, rset.text_keys)}})


def brute_force_ranks(similarity, relevant):
    """Per query the position of the first relevant candidate in the order: score descending, irrelevant first."""
    ranks = []
    for row, flags in zip(similarity, relevant):
        order = sorted(range(len(row)), key=lambda j: (-row[j], flags[j]))
        ranks.append(next(p + 1 for p, j in enumerate(order) if flags[j]))
    return np.array(ranks)


@pytest.mark.parametrize("task", list(TASKS))
def test_an_aligned_model_ranks_a_relevant_candidate_first_from_the_cli_and_score_agrees(roots, task, tmp_path,
                                                                                         monkeypatch, capsys):
    paths, _ = roots
    root = paths[TASKS[task]]
    monkeypatch.setitem(ADAPTERS._targets, TableModel.name, table_model(task, root, aligned=True))
    assert main(["-q", "run", "--model", TableModel.name, "--task", task, "--frac", "1.0", "--data-root", str(root),
                 "--results", str(tmp_path / "results"), "--device", "cpu", "--set", "bootstrap_resamples=50",
                 "--save-predictions", str(tmp_path / "predictions")]) == 0
    capsys.readouterr()
    (path,) = (tmp_path / "results").rglob(f"{task}.v1/*.json")
    record = json.loads(path.read_text())
    metrics, spec = record["metrics"], load_task(task)
    for direction in spec.config["directions"]:
        for k in spec.config["recall_at"]:
            assert metrics[f"{direction}_r{k}"] == 1.0
        assert metrics[f"{direction}_medr"] == metrics[f"{direction}_meanr"] == 1.0
        assert record["ci"][f"{direction}_r1"]["low"] == record["ci"][f"{direction}_r1"]["high"] == 1.0
        assert record["ci"][f"{direction}_r1"]["unit"] == {"i2t": "image", "t2i": "text"}[direction]
    _, rset, _ = task_set(task, root)
    if task in ("chexpert5x200_ret", "mimic5x200_ret"):
        # Precision@K of a perfect ranking: min(K, relevant candidates) / K per query.
        per_class = np.bincount(rset.text_keys)
        assert metrics["i2t_p10"] == pytest.approx(np.mean(np.minimum(10, per_class[rset.image_keys]) / 10), abs=1e-6)
        images_per_class = np.bincount(rset.image_keys, minlength=5)
        assert metrics["t2i_p5"] == pytest.approx(np.mean(np.minimum(5, images_per_class[rset.text_keys]) / 5),
                                                  abs=1e-6)
    assert record["primary_metric"] == spec.primary_metric == spec.config["per_image_metric"]
    assert set(record["per_image"]) == set(rset.image_ids)
    assert np.mean(list(record["per_image"].values())) == pytest.approx(metrics[spec.primary_metric], abs=1e-6)
    assert record["n"]["test"] == len(rset.image_ids) and record["n"]["texts"] == len(rset.texts)

    # score over the saved similarity matrix, in a data folder without one image, gives the same numbers.
    labels = shutil.copytree(root, tmp_path / "labels", ignore=shutil.ignore_patterns("*.jpg"))
    assert main(["-q", "score", "--task", task, "--predictions", str(tmp_path / "predictions"),
                 "--data-root", str(labels), "--set", "bootstrap_resamples=50", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["per_image"] == record["per_image"] and set(scored["metrics"]) == set(metrics)
    for name, value in metrics.items():  # the record holds 6 decimals
        assert scored["metrics"][name] == (None if value is None else pytest.approx(value, abs=1e-6)), name
    assert set(scored["ci"]) == set(record["ci"]) == {name for name, value in metrics.items() if value is not None}
    for name, ci in record["ci"].items():
        assert [scored["ci"][name]["low"], scored["ci"][name]["high"]] == pytest.approx([ci["low"], ci["high"]],
                                                                                        abs=1e-6), name


def test_run_and_score_agree_exactly_and_equal_a_brute_force_ranking(roots, tmp_path, monkeypatch):
    paths, _ = roots
    task, root = "mimic_cxr_ret", paths["mimic_cxr"]
    model = table_model(task, root, aligned=False, seed=3)
    monkeypatch.setitem(ADAPTERS._targets, TableModel.name, model)
    record, _ = api.run(TableModel.name, task, 1.0, data_root=root, results=tmp_path / "results", overrides=FAST,
                        device="cpu", progress=False, save_predictions=tmp_path / "predictions")
    scored = api.score(task, tmp_path / "predictions", data_root=root, overrides=FAST)
    assert scored["metrics"] == record["metrics"] and scored["ci"] == record["ci"]
    assert scored["per_image"] == record["per_image"] and scored["n"] == record["n"]

    _, rset, _ = task_set(task, root)
    images = np.stack([model.images[k].numpy() for k in model.images])  # insertion order = rset.image_ids order
    texts = np.stack([model.texts[t].numpy() for t in rset.texts])
    normalise = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    similarity = normalise(images) @ normalise(texts).T
    relevant = rset.image_keys[:, None] == rset.text_keys[None, :]
    i2t, t2i = brute_force_ranks(similarity, relevant), brute_force_ranks(similarity.T, relevant.T)
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert record["metrics"][f"{direction}_r{k}"] == pytest.approx(np.mean(ranks <= k), abs=1e-9)
        assert record["metrics"][f"{direction}_medr"] == np.median(ranks)
        assert record["metrics"][f"{direction}_meanr"] == pytest.approx(ranks.mean(), abs=1e-9)
        ci = record["ci"][f"{direction}_meanr"]
        assert ci["low"] <= ranks.mean() <= ci["high"] and ci["n_resamples"] == 50
    assert record["per_image"] == {i: float(r <= 10) for i, r in zip(rset.image_ids, i2t)}

    # Subgroups of the query images by view (from the evidence): the brute-force Recall@10 of each view's images.
    source, _, ids = task_set(task, root)
    views = np.array([read_attributes(source, ids).get(i, {}).get("view", "unknown") for i in rset.image_ids])
    assert scored["subgroups"] == record["subgroups"] and set(record["subgroups"]) == set(source.attribute_names)
    rows = record["subgroups"]["view"]["groups"]
    assert {row["group"] for row in rows} == set(views) and sum(row["n"] for row in rows) == len(views)
    for row in rows:  # the synthetic test set is small: a view of fewer than 10 images gets a reason, no number
        if row["n"] < 10:
            assert row["value"] is None and "fewer than the 10 needed" in row["reason"]
        else:
            assert row["value"] == pytest.approx(np.mean(i2t[views == row["group"]] <= 10), abs=1e-12)

    # Tables print ranks as they are (not ×100), and the lower median rank is the best.
    other = copy.deepcopy(record)
    other["model"]["name"], other["metrics"]["i2t_medr"] = "other", record["metrics"]["i2t_medr"] + 2
    write_record(other, tmp_path / "results")
    table = api.table(tmp_path / "results", metrics=["i2t_r10", "i2t_medr"])
    assert f"**{record['metrics']['i2t_medr']:.1f}**" in table
    assert re.search(rf"\|\s+{other['metrics']['i2t_medr']:.1f} \|", table)
    assert f"{100 * record['metrics']['i2t_r10']:.1f}" in table and "(×100; ranks as they are)" in table
    page = api.leaderboard(tmp_path / "results", tmp_path / "site").read_text(encoding="utf-8")
    assert '<section id="group-ret">' in page and "Image-text retrieval" in page


def test_a_random_model_scores_about_chance_on_the_class_prompts(roots):
    paths, _ = roots
    task, root = "chexpert5x200_ret", paths["chexpert"]
    chance, observed = [], []
    for seed in range(4):
        model = table_model(task, root, aligned=False, seed=seed)
        source, rset, ids = task_set(task, root)
        outcome = run_retrieval_task(model(), source, SplitIds([], [], ids), {**load_task(task).config, **FAST},
                                     seed=0, device=torch.device("cpu"), progress=False)
        observed.append(outcome["metrics"]["i2t_p10"])
        chance.append(np.mean(np.bincount(rset.text_keys)[rset.image_keys] / len(rset.texts)))
    # Expected Precision@10 of a random ranking: the share of the image's class among the 471 prompts (~0.31).
    assert np.mean(observed) == pytest.approx(np.mean(chance), abs=0.12)


def test_mimic5x200_from_the_cli_equals_numpy_hit_and_precision_at_k(roots, tmp_path, monkeypatch, capsys):
    """A random model on the synthetic MIMIC-5x200 images: every image's report is a candidate, relevant when the
    committed class (read straight from the split file) matches; Hit@K and Precision@K over all images."""
    paths, _ = roots
    task, root = "mimic5x200_ret", paths["mimic_cxr"]
    model = table_model(task, root, aligned=False, seed=5)
    monkeypatch.setitem(ADAPTERS._targets, TableModel.name, model)
    assert main(["-q", "run", "--model", TableModel.name, "--task", task, "--frac", "1.0", "--data-root", str(root),
                 "--results", str(tmp_path / "results"), "--device", "cpu", "--set", "bootstrap_resamples=50"]) == 0
    capsys.readouterr()
    (path,) = (tmp_path / "results").rglob(f"{task}.v1/*.json")
    record = json.loads(path.read_text())

    source, rset, _ = task_set(task, root)
    with open(SPLITS_DIR / "mimic5x200" / "v1" / "test.csv", newline="") as handle:
        committed = {row["image_id"]: int(row["class"]) for row in csv.DictReader(handle)}
    sections = [source.sections(i) for i in rset.image_ids]
    assert rset.texts == [" ".join(t for t in (s["FINDINGS"], s["IMPRESSION"]) if t) for s in sections]
    listed = [i for i in source.image_ids if i in committed]
    assert record["n"]["test_left_out"] == {"empty_text": len(listed) - len(rset.image_ids)}
    classes = np.array([committed[i] for i in rset.image_ids])
    assert len(set(classes.tolist())) == 5 and record["n"]["texts"] == len(rset.image_ids)
    images = np.stack([model.images[k].numpy() for k in model.images])
    texts = np.stack([model.texts[t].numpy() for t in rset.texts])
    normalise = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    similarity = normalise(images) @ normalise(texts).T
    relevant = classes[:, None] == classes[None, :]
    for direction, scores, flags in (("i2t", similarity, relevant), ("t2i", similarity.T, relevant.T)):
        top = np.argsort(-scores, axis=1, kind="stable")
        hits_in_top = np.take_along_axis(flags, top, axis=1)
        for k in (1, 5, 10):
            assert record["metrics"][f"{direction}_r{k}"] == pytest.approx(hits_in_top[:, :k].any(axis=1).mean(),
                                                                           abs=1e-6)
            assert record["metrics"][f"{direction}_p{k}"] == pytest.approx(hits_in_top[:, :k].mean(), abs=1e-6)
    assert record["metrics"]["i2t_p1"] == record["metrics"]["i2t_r1"]


class Reports:
    """A hand-made reader: four frontal images and a lateral, two studies with the same impression."""

    rows = {"a": ("PA", "s1", "Heart is enlarged.", "Cardiomegaly."),
            "b": ("AP", "s1", "Heart is enlarged.", "Cardiomegaly."),
            "c": ("PA", "s2", "", "No acute process."),
            "d": ("LATERAL", "s3", "Lateral view.", ""),
            "e": ("AP", "s4", "", "No acute process."),
            "f": ("PA", "s5", "", "")}

    def view_position(self, image_id):
        return self.rows[image_id][0]

    def study_id(self, image_id):
        return self.rows[image_id][1]

    def sections(self, image_id):
        return {"FINDINGS": self.rows[image_id][2], "IMPRESSION": self.rows[image_id][3]}


def test_report_texts_follow_the_section_rule_views_and_study_rule_and_merge_identical_texts():
    config = {**load_task("mimic_cxr_ret").config}
    rset = retrieval_set(Reports(), list("abcdef"), config)
    assert rset.image_ids == ["a", "b", "c", "e"]  # d is lateral, f has no text
    assert rset.texts == ["Heart is enlarged.", "No acute process."]
    assert rset.image_keys.tolist() == [0, 0, 1, 1] and rset.text_keys.tolist() == [0, 1]
    assert rset.left_out == {"view": 1, "study_already_queried": 0, "empty_text": 1}
    first = retrieval_set(Reports(), list("abcdef"), {**config, "images_per_study": "first"})
    assert first.image_ids == ["a", "c", "e"] and first.left_out["study_already_queried"] == 1
    assert retrieval_set(Reports(), list("abc"), {**config, "text_section": "impression"}).texts == [
        "Cardiomegaly.", "No acute process."]
    assert report_text({"FINDINGS": "ab", "IMPRESSION": "cd"}, "longer") == "ab"  # equal length: findings
    assert report_text({"FINDINGS": "ab", "IMPRESSION": "cd"}, "findings_impression") == "ab cd"


class ClassReports(Reports, DatasetReader):
    """The hand-made reports with a class per image (a, b: one study, one text; f: no text)."""

    rows = {**Reports.rows, "e": ("AP", "s4", "", "Small effusion.")}
    image_ids, synthetic, image = list("abcdef"), False, None
    of = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 0, "f": 1}

    def class_labels(self, image_id, classes, config):
        return [int(k == self.of[image_id]) for k in range(len(classes))]

    def unlabelled(self, ids):
        return []

    missing = unlabelled


def test_class_reports_keep_one_text_per_image_and_score_by_class_as_by_hand(tmp_path):
    config = {**load_task("mimic5x200_ret").config, "classes": ["Atelectasis", "Edema"], **FAST}
    source = ClassReports()
    rset = retrieval_set(source, list("abcdef"), config)
    assert rset.image_ids == list("abcde") and rset.left_out == {"empty_text": 1}
    assert rset.texts == ["Heart is enlarged. Cardiomegaly."] * 2 + ["No acute process.", "Lateral view.",
                                                                      "Small effusion."]
    assert rset.image_keys.tolist() == rset.text_keys.tolist() == [0, 0, 1, 1, 0]
    # Rows: images a b c d e; columns: their texts (ta = tb). Relevant (same class): {a, b, e} and {c, d}.
    similarity = np.array([[0.9, 0.9, 0.8, 0.1, 0.2],
                           [0.5, 0.5, 0.7, 0.6, 0.4],
                           [0.3, 0.3, 0.2, 0.9, 0.1],
                           [0.6, 0.6, 0.5, 0.4, 0.3],
                           [0.1, 0.1, 0.9, 0.8, 0.7]], np.float32)
    # By hand, ties pessimistic. i2t: a ranks ta tb (tied, relevant) first: rank 1, P@1 1, 3 relevant in the top 5;
    # b: tc td above its best relevant 0.5: rank 3; c: td first: rank 1; d: ta tb above tc: rank 3; e: tc td above
    # te: rank 3. t2i: ta, tb, td, te rank a relevant image first; tc's best relevant image d (0.5) follows e a b.
    outcome = evaluate_retrieval(similarity, rset, {**config, "precision_at": [1, 5], "per_image_metric": "i2t_p5"},
                                 seed=0)
    metrics = outcome["metrics"]
    assert metrics["i2t_r1"] == metrics["i2t_p1"] == pytest.approx(2 / 5)
    assert metrics["i2t_r5"] == 1.0 and metrics["i2t_medr"] == 3.0 and metrics["i2t_meanr"] == pytest.approx(11 / 5)
    assert metrics["i2t_p5"] == pytest.approx((3 + 3 + 2 + 2 + 3) / 25)
    assert metrics["t2i_r1"] == pytest.approx(4 / 5) and metrics["t2i_meanr"] == pytest.approx(8 / 5)
    assert outcome["per_image"] == pytest.approx(dict(zip("abcde", [3 / 5, 3 / 5, 2 / 5, 2 / 5, 3 / 5])))
    # A saved matrix with the columns shuffled (the two identical texts included) scores the same.
    write_similarity(tmp_path, similarity, rset)
    order = [4, 1, 3, 0, 2]
    np.savez(tmp_path / SIMILARITY_FILE, similarity=similarity[:, order], image_ids=np.array(rset.image_ids),
             texts=np.array([rset.texts[j] for j in order]))
    assert np.array_equal(read_similarity(tmp_path / SIMILARITY_FILE, rset), similarity)
    np.savez(tmp_path / SIMILARITY_FILE, similarity=similarity[:, :4], image_ids=np.array(rset.image_ids),
             texts=np.array(rset.texts[1:]))
    with pytest.raises(DataError, match="holds 1 copies of 'Heart is enlarged. Cardiomegaly.'; the task has 2"):
        read_similarity(tmp_path / SIMILARITY_FILE, rset)
    with pytest.raises(ConfigError, match="label_kind multiclass"):
        retrieval_set(source, list("ab"), {**config, "label_kind": "multilabel"})


def test_mimic_texts_are_the_longer_section_of_each_synthetic_report(roots):
    paths, facts = roots
    source, rset, ids = task_set("mimic_cxr_ret", paths["mimic_cxr"])
    reports = facts["mimic_cxr"]["reports"]
    frontal = [i for i in ids if source.view_position(i) in ("PA", "AP")]
    expected = {i: report_text(reports[source.study_id(i)], "longer") for i in frontal}
    assert rset.image_ids == [i for i in frontal if expected[i]]
    assert [rset.texts[k] for k in rset.image_keys] == [expected[i] for i in rset.image_ids]


def test_an_adapter_without_text_embedding_gets_a_capability_error_before_any_work():
    with pytest.raises(CapabilityError, match="embed_text .pass --model-option text_encoder=DIR"):
        run_retrieval_task(ImageOnlyModel(), None, SplitIds([], [], []), {}, seed=0, device=torch.device("cpu"))


def test_bad_options_and_foreign_similarity_files_are_refused(roots, tmp_path):
    paths, _ = roots
    source, rset, ids = task_set("mimic_cxr_ret", paths["mimic_cxr"])
    config = load_task("mimic_cxr_ret").config
    for bad, message in [({"recall_at": [1, 3]}, "recall_at"), ({"per_image_metric": "t2i_r1"}, "per_image_metric"),
                         ({"directions": ["both"]}, "directions"), ({"text_section": "summary"}, "text_section")]:
        with pytest.raises(ConfigError, match=message):
            run_retrieval_task(table_model("mimic_cxr_ret", paths["mimic_cxr"], aligned=True)(), source,
                               SplitIds([], [], ids), {**config, **bad}, seed=0, device=torch.device("cpu"))
    protocol = load_protocol()
    folder = tmp_path / "foreign"
    folder.mkdir()
    np.savez(folder / SIMILARITY_FILE, similarity=np.zeros((len(rset.image_ids), len(rset.texts)), np.float32),
             image_ids=np.array(["not-a-test-image", *rset.image_ids[1:]]), texts=np.array(rset.texts))
    with pytest.raises(DataError, match="image_ids lacks 1 test images of the task"):
        protocol.score(folder, source, SplitIds([], [], ids), config)
    np.savez(folder / SIMILARITY_FILE, similarity=np.full((len(rset.image_ids), len(rset.texts)), np.nan),
             image_ids=np.array(rset.image_ids), texts=np.array(rset.texts))
    with pytest.raises(DataError, match="NaN"):
        protocol.score(folder, source, SplitIds([], [], ids), config)


def load_protocol():
    from vlpbench.protocols.base import protocol_named

    return protocol_named("retrieval")


def test_the_inference_batch_changes_no_rank_and_auto_on_a_cpu_is_64(roots):
    paths, _ = roots
    task, root = "chexpert5x200_ret", paths["chexpert"]
    model = table_model(task, root, aligned=False)
    source, _, ids = task_set(task, root)
    config = {**load_task(task).config, **FAST}
    assert config["batch_size"] == "auto"
    automatic, small = (run_retrieval_task(model(), source, SplitIds([], [], ids), {**config, **change}, seed=0,
                                           device=torch.device("cpu"), progress=False)
                        for change in ({}, {"batch_size": 9}))
    assert automatic["training"]["inference_batch"]["size"] == 64
    assert small["training"]["inference_batch"] == {"size": 9, "requested": 9, "how": "set", "lowered_from": []}
    assert small["metrics"] == automatic["metrics"]
