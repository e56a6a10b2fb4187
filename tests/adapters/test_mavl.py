"""MAVL: the published checkpoint_full_*.pth layout, strict accounting, and its zero-shot and grounding rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizer

from vlpbench.adapters import adapter_names, build_adapter
from vlpbench.adapters.base import WRAPPER_REASON, load_state_dict_file, save_checkpoint
from vlpbench.adapters.medklip import ENTITY_NAMES
from vlpbench.adapters.mavl import (
    GROUNDING_CONCEPTS,
    LOCATION_REASON,
    TEMP_REASON,
    MAVLAdapter,
    concept_texts,
    load_concept_embeddings,
    text_mode_probabilities,
)
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_mavl_checkpoint, write_mavl_concept_files, write_tiny_bert_folder

CLASSES = ["Pneumonia", "Pleural Effusion", "pneumothorax"]
CLASS_INDICES = [20, 8, 10]  # pneumonia, effusion, pneumothorax in MAVL's original_class
CONTAINER_ENTRIES = ["optimizer", "lr_scheduler", "config", "epoch"]
# Short texts over write_tiny_bert_folder's filler tokens: "tok<entity>" and "tok<entity> tok<100 + aspect>";
# "covid19", an extra key of MAVL's files, gets "tok99".
_INDEX = {**{name: i for i, name in enumerate(ENTITY_NAMES)}, "covid19": 99}


def description(name):
    return f"tok{_INDEX[name]}"


def aspect(name, k):
    return f"tok{_INDEX[name]} tok{100 + k}"


def _bert_folder(folder, *, hidden, heads):
    """A one-layer BERT folder with weights (FFN width 32 keeps it cheap), seed 0."""
    write_tiny_bert_folder(folder, hidden=hidden, layers=1, heads=heads)
    config = BertConfig.from_pretrained(folder)
    config.intermediate_size = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_mavl_checkpoint(tmp_path_factory.mktemp("mavl") / "checkpoint_full_46.pth", seed=1)


@pytest.fixture(scope="module")
def raw(ckpt):
    return load_state_dict_file(ckpt)[0]


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("concepts") / "concepts.safetensors"
    save_file({"concepts": torch.randn(75, 9, 768, generator=torch.Generator().manual_seed(2))}, str(path))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _bert_folder(tmp_path_factory.mktemp("bert"), hidden=768, heads=12)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """MAVL's two JSON files with one-word-piece texts, keys in reverse order (MAVL reads them by name)."""
    folder = tmp_path_factory.mktemp("texts")
    names = [*ENTITY_NAMES, "covid19"][::-1]
    entities, concepts = folder / "observation explanation.json", folder / "gpt4_mimic.json"
    entities.write_text(json.dumps({name: description(name) for name in names}))
    concepts.write_text(json.dumps({name: [aspect(name, k) for k in range(8)] for name in names}))
    return entities, concepts


@pytest.fixture(scope="module")
def adapter(ckpt, concepts_file):
    return build_adapter("mavl", ckpt, concept_embeddings=str(concepts_file))


def test_published_layout_loads_with_every_key_accounted(adapter, raw):
    model = raw["model"]
    assert sorted(raw) == sorted(["model", *CONTAINER_ENTRIES])
    assert len(model) == 353 and sum(k.startswith("backbone.") for k in model) == 258
    assert tuple(model["classifier.weight"].shape) == (2, 9 * 256)
    assert tuple(model["location_emb.weight"].shape) == (768, 256, 9)
    assert tuple(model["pool.positional_embedding"].shape) == (197, 1024)
    assert tuple(model["res_l1.1.weight"].shape) == (1,)  # PReLU
    report = adapter.report
    assert report.ok and report.layout == "mavl-resnet50-layer3 (unwrapped 'model')"
    assert len(report.mapped) == 350 and not (report.missing or report.unexpected or report.mismatched)
    assert report.ignored == {WRAPPER_REASON: CONTAINER_ENTRIES,
                              LOCATION_REASON: ["location_emb.weight", "location_emb.bias"], TEMP_REASON: ["temp"]}
    assert ("backbone.6.5.conv3.weight", "encoder.layer3.5.conv3.weight") in report.mapped
    assert ("pool.c_proj.weight", "head.pool.c_proj.weight") in report.mapped
    encoder = adapter.encoder()
    assert not hasattr(encoder, "layer4")
    assert torch.equal(encoder.layer3[0].conv1.weight, model["backbone.6.0.conv1.weight"])


def test_prefixed_state_dict_loads(tmp_path, raw):
    path = save_checkpoint({"module." + k: v for k, v in raw["model"].items()}, tmp_path / "bare.pth")
    report = MAVLAdapter.inspect(path)
    assert report.ok and report.layout == "mavl-resnet50-layer3 (stripped 'module.')" and len(report.mapped) == 350
    assert report.ignored[TEMP_REASON] == ["module.temp"]


def test_renamed_key_fails_naming_it(tmp_path, raw):
    state = dict(raw["model"])
    state["classifier.weights"] = state.pop("classifier.weight")
    with pytest.raises(CheckpointError) as info:
        MAVLAdapter(save_checkpoint({"model": state}, tmp_path / "renamed.pth"))
    assert "classifier.weight" in str(info.value) and "classifier.weights" in str(info.value)


def test_zero_shot_feature_mode_equals_the_classifier_softmax_by_hand(adapter):
    assert adapter.zero_shot_probabilities is True  # a presence classifier trained with cross-entropy
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = adapter._forward(images)
    assert outputs["logits"].shape == (2, 75, 2) and outputs["attention"].shape == (2, 75, 9, 4, 4)
    logits = outputs["logits"]
    by_hand = torch.exp(logits[..., 1]) / (torch.exp(logits[..., 0]) + torch.exp(logits[..., 1]))
    scores = adapter.zero_shot_scores(images, CLASSES)
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores, by_hand[:, CLASS_INDICES])


def test_text_mode_rule_by_hand():
    sim = torch.randn(2, 9, 75, generator=torch.Generator().manual_seed(3))
    out = text_mode_probabilities(sim)
    for b, d in [(0, 20), (1, 8), (1, 0)]:
        per_reference = [torch.sigmoid(sim[b, :, d] - sim[b, :, r]) for r in (0, 1)]  # 2-way softmax
        assert float(out[b, d]) == pytest.approx(float(((per_reference[0] + per_reference[1]) / 2).mean()), abs=1e-6)
    assert float(out[0, 0]) == pytest.approx(float((0.5 + torch.sigmoid(sim[0, :, 0] - sim[0, :, 1])).mean() / 2))


def test_text_mode_runs_at_224_and_refuses_other_sizes(ckpt, concepts_file):
    adapter = build_adapter("mavl", ckpt, concept_embeddings=str(concepts_file), zero_shot_mode="text")
    assert adapter.zero_shot_probabilities is False  # similarities to reference texts: no calibration entry
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    outputs = adapter._forward(images)
    scores = adapter.zero_shot_scores(images, CLASSES)
    torch.testing.assert_close(scores, text_mode_probabilities(outputs["similarity"])[:, CLASS_INDICES])
    with pytest.raises(ConfigError, match="224"):
        adapter.zero_shot_scores(images[:, :, :64, :64], CLASSES)


def test_grounding_averages_the_description_and_aspects_6_to_8(adapter):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    attention = adapter._forward(images)["attention"]
    maps = adapter.grounding_maps(images, CLASSES)
    assert maps.shape == (2, 3, 4, 4)
    by_hand = sum(attention[:, CLASS_INDICES, c] for c in GROUNDING_CONCEPTS) / len(GROUNDING_CONCEPTS)
    torch.testing.assert_close(maps, by_hand)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 3))


def test_concept_texts_read_by_key_and_errors_name_the_entity(tmp_path):
    entities, concepts = write_mavl_concept_files(tmp_path)
    texts = concept_texts(entities, concepts)
    assert len(texts) == 675 and texts[0] == "Synthetic description of normal." and texts[1].startswith("aspect 0")
    assert texts[9 * 20] == "Synthetic description of pneumonia."
    bad = tmp_path / "bad.json"
    bad.write_text('{"normal": ["a"]}')
    with pytest.raises(ConfigError, match="'normal'"):
        concept_texts(entities, bad)


def test_options_and_concept_files_are_checked(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="zero_shot_mode"):
        build_adapter("mavl", ckpt, zero_shot_mode="both")
    with pytest.raises(ConfigError, match="concepts"):
        build_adapter("mavl", ckpt, text_encoder=str(tmp_path), entities=str(tmp_path / "e.json"))
    torch.save(torch.zeros(75, 768), tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"\(75, 9, 768\)"):
        load_concept_embeddings(tmp_path / "wrong.pt")


def test_registered_and_listed_without_concepts_capabilities_drop(ckpt):
    assert "mavl" in adapter_names()
    bare = build_adapter("mavl", ckpt)
    assert "zero_shot" not in bare.capabilities and "features" in bare.capabilities


def test_concept_queries_from_a_text_encoder_are_the_last_layer_cls_of_each_text(ckpt, bert_dir, text_files):
    entities, concepts = text_files
    adapter = build_adapter("mavl", ckpt, text_encoder=str(bert_dir), entities=str(entities), concepts=str(concepts))
    queries = adapter.concept_embeddings
    assert queries.shape == (75, 9, 768) and adapter.capabilities >= {"zero_shot", "grounding"}
    # MAVL's rule (Zero-shot_classification/test.py:143-147, models/model_MAVL.py:80-94), for three entities: each
    # text padded to 64 tokens, the last layer's [CLS] output; the description first, then the 8 aspects.
    tokenizer = BertTokenizer.from_pretrained(bert_dir)
    bert = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    for index in (0, 20, 74):
        name = ENTITY_NAMES[index]
        tokens = tokenizer([description(name), *(aspect(name, k) for k in range(8))], padding="max_length",
                           truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            hidden = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        torch.testing.assert_close(queries[index], hidden[:, 0], rtol=1e-5, atol=1e-5)
        mask = tokens["attention_mask"][..., None]
        assert not torch.allclose(queries[index], (hidden * mask).sum(1) / mask.sum(1), atol=1e-2)  # not a mean
    assert not torch.allclose(queries[0, 0], queries[0, 1], atol=1e-2)  # the texts differ, so do their queries
    record = adapter.describe()["entity_queries"]
    assert record["entities"]["path"] == str(entities) and record["concepts"]["path"] == str(concepts)
    assert set(record["text_encoder"]["files"]) >= {"config.json", "vocab.txt", "model.safetensors"}


def test_a_missing_entity_or_aspect_and_a_narrow_text_encoder_are_named(ckpt, bert_dir, text_files, tmp_path):
    entities, concepts = text_files
    book = json.loads(entities.read_text())
    del book["pneumonia"]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(book))
    aspects = json.loads(concepts.read_text())
    aspects["effusion"] = aspects["effusion"][:7]
    seven = tmp_path / "seven.json"
    seven.write_text(json.dumps(aspects))
    narrow = _bert_folder(tmp_path / "narrow", hidden=32, heads=2)
    for options, message in (
            ({"entities": short}, f"entities file {short}: no string description for entity 'pneumonia'"),
            ({"concepts": seven}, f"concepts file {seven}: entity 'effusion' needs a list of 8 aspect strings"),
            ({"text_encoder": narrow}, f"adapter 'mavl': text_encoder='{narrow}' has width 32; the queries are "
                                       "projected from 768-d")):
        chosen = {"text_encoder": bert_dir, "entities": entities, "concepts": concepts, **options}
        with pytest.raises(ConfigError) as error:
            MAVLAdapter(ckpt, **{k: str(v) for k, v in chosen.items()})
        assert message in str(error.value)
    write_tiny_bert_folder(tmp_path / "no_weights", hidden=768, heads=12)
    with pytest.raises(ConfigError, match="adapter 'mavl': text_encoder=.* has no model.safetensors"):
        MAVLAdapter.inspect(ckpt, text_encoder=str(tmp_path / "no_weights"), entities=str(entities),
                            concepts=str(concepts))
