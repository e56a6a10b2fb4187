"""MedKLIP: the published checkpoint_final.pth layout, the layer3-only encoder, entity-query zero-shot and grounding."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from vlpbench.adapters import adapter_names, base, build_adapter, get_adapter
from vlpbench.adapters import medklip
from vlpbench.adapters.base import WRAPPER_REASON, CapabilityError, load_state_dict_file
from vlpbench.adapters.medklip import (
    CL_FC_REASON,
    ENTITY_NAMES,
    STAGE_NOTE,
    MedKLIPAdapter,
    entity_index,
    load_entity_descriptions,
    load_entity_embeddings,
)
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_medklip_checkpoint, write_medklip_entities, write_medklip_entity_embeddings

CONTAINER_ENTRIES = ["optimizer", "lr_scheduler", "config", "epoch"]
CLASSES = ["Pneumonia", "Pleural Effusion", "Fibrosis", "pneumothorax"]
CLASS_INDICES = [20, 8, 73, 10]  # pneumonia, effusion, tail_abnorm_obs, pneumothorax in original_class
WORDS = ["synthetic", "description", "findings", "of", "pneumonia", "effusion", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)] + [
    f"##{chr(c)}" for c in range(97, 123)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_medklip_checkpoint(tmp_path_factory.mktemp("medklip") / "checkpoint_final.pth", seed=1)


@pytest.fixture(scope="module")
def raw(ckpt):
    return load_state_dict_file(ckpt)[0]


@pytest.fixture(scope="module")
def embeddings_file(tmp_path_factory):
    return write_medklip_entity_embeddings(tmp_path_factory.mktemp("entities") / "entities.safetensors", seed=2)


@pytest.fixture(scope="module")
def adapter(ckpt, embeddings_file):
    return build_adapter("medklip", ckpt, entity_embeddings=str(embeddings_file))


@pytest.fixture(scope="module")
def images():
    """Two 64×64 preprocessed inputs: a 4×4 grid of patch tokens at stride 16."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A one-layer BERT of Bio_ClinicalBERT's width (768) with weights, config and a word-piece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=32, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    return folder


def _part(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_published_layout_loads_with_every_key_accounted(adapter, raw):
    model = raw["model"]
    assert sorted(raw) == sorted(["model", *CONTAINER_ENTRIES])
    assert len(model) == 342 and all(k.startswith("module.") for k in model)
    assert sum(k.startswith("module.res_features.") for k in model) == 258
    assert tuple(model["module.res_features.6.5.conv3.weight"].shape) == (1024, 256, 1, 1)
    assert tuple(model["module.decoder.layers.3.multihead_attn.in_proj_weight"].shape) == (768, 256)
    assert not any(k.startswith("module.res_features.7.") for k in model)  # no layer4
    report = adapter.report
    assert report.ok and report.layout == "medklip-resnet50-layer3 (unwrapped 'model', stripped 'module.')"
    assert len(report.mapped) == 340 and not (report.missing or report.unexpected or report.mismatched)
    assert report.ignored == {WRAPPER_REASON: CONTAINER_ENTRIES,
                              CL_FC_REASON: ["module.cl_fc.weight", "module.cl_fc.bias"]}
    assert ("module.res_features.6.5.conv3.weight", "encoder.layer3.5.conv3.weight") in report.mapped
    assert ("module.res_features.0.weight", "encoder.conv1.weight") in report.mapped
    assert ("module.decoder.norm.bias", "head.decoder.norm.bias") in report.mapped


def test_bare_state_dicts_with_and_without_prefix_load(tmp_path, raw):
    prefixed = MedKLIPAdapter.inspect(_save(raw["model"], tmp_path / "prefixed.pth"))
    assert prefixed.ok and prefixed.layout == "medklip-resnet50-layer3 (stripped 'module.')"
    plain_state = {k[len("module."):]: v for k, v in raw["model"].items()}
    plain = MedKLIPAdapter.inspect(_save(plain_state, tmp_path / "plain.pth"))
    assert plain.ok and plain.layout == "medklip-resnet50-layer3" and len(plain.mapped) == 340
    assert plain.ignored == {CL_FC_REASON: ["cl_fc.weight", "cl_fc.bias"]}
    # A layer4 weight has no place in MedKLIP's trunk.
    plain_state["res_features.7.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    extra = MedKLIPAdapter.inspect(_save(plain_state, tmp_path / "layer4.pth"))
    assert extra.unexpected == ["res_features.7.0.conv1.weight"] and not extra.missing


def test_renamed_key_fails_naming_it(tmp_path, raw):
    model = dict(raw["model"])
    model["module.decoder.layers.2.norm3.gamma"] = model.pop("module.decoder.layers.2.norm3.weight")
    path = _save({**raw, "model": model}, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError) as info:
        MedKLIPAdapter(path)
    assert "module.decoder.layers.2.norm3.weight" in str(info.value)
    assert "module.decoder.layers.2.norm3.gamma" in str(info.value)
    report = MedKLIPAdapter.inspect(path)
    assert report.missing == ["module.decoder.layers.2.norm3.weight"]
    assert report.unexpected == ["module.decoder.layers.2.norm3.gamma"] and len(report.mapped) == 339


def test_encoder_is_resnet50_to_layer3_with_the_checkpoint_weights(adapter, raw):
    encoder = adapter.encoder()
    assert tuple(encoder.out_channels) == (3, 64, 256, 512, 1024) and not hasattr(encoder, "layer4")
    state = encoder.state_dict()
    assert len(state) == 258
    stages = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    for key, value in state.items():
        stage, rest = key.split(".", 1)
        assert torch.equal(value, raw["model"][f"module.res_features.{stages[stage]}.{rest}"]), key
    with torch.no_grad():
        features = encoder.eval()(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(1, 3, 224, 224), (1, 64, 112, 112), (1, 256, 56, 56),
                                                  (1, 512, 28, 28), (1, 1024, 14, 14)]
    assert adapter.encoder_depth == 4 and base.Adapter.encoder_depth == 5
    record = adapter.describe()
    assert record["encoder_depth"] == 4 and record["stage_note"] == STAGE_NOTE and "no layer4" in STAGE_NOTE
    assert adapter.capabilities == {"features", "zero_shot", "grounding"} and adapter.free_text is False
    assert adapter.image_size == 224 and adapter.mean == base.IMAGENET_MEAN and adapter.std == base.IMAGENET_STD


def _reference(raw, entities, images):
    """MedKLIP's forward from torchvision's ResNet-50 and torch's pre-norm TransformerDecoder, with the
    cross-attention computed by hand: ``(present probability (B, 75), attention (B, 75, h·w))``."""
    state = _part(raw["model"], "module.")
    with torch.device("meta"):  # no random init: every tensor is assigned from the checkpoint
        trunk = nn.Sequential(*list(torchvision.models.resnet50().children())[:-3])
    trunk.load_state_dict(_part(state, "res_features."), assign=True)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(256, 4, 1024, dropout=0.0, norm_first=True), 4,
                                    norm=nn.LayerNorm(256))
    decoder.load_state_dict(_part(state, "decoder."))
    linears = {}
    for name in ("res_l1", "res_l2", "disease_embedding_layer", "classifier"):
        weight = state[f"{name}.weight"]
        linears[name] = nn.Linear(weight.shape[1], weight.shape[0])
        linears[name].load_state_dict(_part(state, f"{name}."))
    with torch.no_grad():
        features = trunk.eval()(images)  # (B, 1024, h, w)
        batch = len(images)
        tokens = features.flatten(2).permute(2, 0, 1)  # (h·w, B, 1024)
        memory = linears["res_l2"](torch.relu(linears["res_l1"](tokens)))
        queries = linears["disease_embedding_layer"](entities)[:, None].repeat(1, batch, 1)
        logits = linears["classifier"](decoder.eval()(queries, memory)).transpose(0, 1)
        maps, x = [], queries
        for layer in decoder.layers:
            h = layer.norm1(x)
            x = x + layer.self_attn(h, h, h, need_weights=False)[0]
            q = layer.norm2(x)
            w_q, w_k, _ = layer.multihead_attn.in_proj_weight.chunk(3)
            b_q, b_k, _ = layer.multihead_attn.in_proj_bias.chunk(3)
            heads_q = (q @ w_q.T + b_q).reshape(len(q), batch, 4, 64).permute(1, 2, 0, 3)
            heads_k = (memory @ w_k.T + b_k).reshape(len(memory), batch, 4, 64).permute(1, 2, 0, 3)
            maps.append((heads_q @ heads_k.transpose(-1, -2) / 8).softmax(dim=-1).mean(dim=1))
            x = x + layer.multihead_attn(q, memory, memory, need_weights=False)[0]
            x = x + layer.linear2(torch.relu(layer.linear1(layer.norm3(x))))
    return logits.softmax(dim=-1)[..., 1], torch.stack(maps).mean(dim=0)


def test_zero_shot_and_grounding_equal_an_independent_recomputation(adapter, raw, embeddings_file, images):
    entities = load_file(str(embeddings_file))["entity_embeddings"]
    assert torch.equal(adapter.entity_embeddings, entities)
    present, attention = _reference(raw, entities, images)
    assert [entity_index(name) for name in CLASSES] == CLASS_INDICES

    scores = adapter.zero_shot_scores(images, CLASSES, templates=("ignored {}", "also ignored {}"))
    assert scores.shape == (2, 4) and bool(((scores > 0) & (scores < 1)).all())
    torch.testing.assert_close(scores, present[:, CLASS_INDICES], rtol=1e-4, atol=1e-5)

    maps = adapter.grounding_maps(images, CLASSES)
    assert maps.shape == (2, 4, 4, 4) and bool((maps >= 0).all())
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 4))
    torch.testing.assert_close(maps.flatten(2), attention[:, CLASS_INDICES], rtol=1e-4, atol=1e-6)


def test_class_names_map_to_entities_and_unknown_names_fail(adapter, images):
    assert entity_index("PNEUMONIA") == ENTITY_NAMES.index("pneumonia") == 20
    assert entity_index("Pleural_Thickening") == ENTITY_NAMES.index("thicken")
    assert entity_index("Infiltration") == ENTITY_NAMES.index("infiltrate")
    assert entity_index("tail_abnorm_obs") == entity_index("Fibrosis") == 73
    assert entity_index("Enlarged Cardiomediastinum") == ENTITY_NAMES.index("enlarge")
    with pytest.raises(ConfigError, match=r"no entity for class 'Covid-19'.*atelectasis.*pleural effusion"):
        entity_index("Covid-19")
    with pytest.raises(ConfigError, match="no entity for class 'lung cancer'"):
        adapter.zero_shot_scores(images, ["pneumonia", "lung cancer"])
    with pytest.raises(ConfigError, match="non-empty list"):
        adapter.grounding_maps(images, "pneumonia")


def test_entity_queries_from_a_text_encoder_are_cached_once_and_reused(ckpt, bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    entities = write_medklip_entities(tmp_path / "observation explanation.json")
    assert list(json.loads(entities.read_text()))[20] == "eumonia"
    first = MedKLIPAdapter(ckpt, text_encoder=str(bert_dir), entities=str(entities))
    cached = list((tmp_path / "cache" / "medklip_entities").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".safetensors"
    written = cached[0].stat().st_mtime_ns

    descriptions = load_entity_descriptions(entities)
    tokens = BertTokenizer.from_pretrained(bert_dir)(descriptions, padding="max_length", truncation=True,
                                                     max_length=64, return_tensors="pt")
    with torch.no_grad():
        bert = BertModel.from_pretrained(bert_dir).eval()
        expected = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
    assert first.entity_embeddings.shape == (75, 768)
    torch.testing.assert_close(first.entity_embeddings, expected, rtol=1e-5, atol=1e-5)
    record = first.describe()["entity_queries"]
    assert record["cache"] == str(cached[0]) and record["entities"]["path"] == str(entities)
    assert set(record["text_encoder"]["files"]) >= {"config.json", "vocab.txt", "model.safetensors"}

    def no_recompute(*args, **kwargs):
        raise RuntimeError("entity embeddings recomputed")

    monkeypatch.setattr(medklip, "compute_entity_embeddings", no_recompute)
    second = MedKLIPAdapter(ckpt, text_encoder=str(bert_dir), entities=str(entities))
    assert torch.equal(second.entity_embeddings, first.entity_embeddings)
    assert list((tmp_path / "cache" / "medklip_entities").iterdir()) == cached
    assert cached[0].stat().st_mtime_ns == written
    # Another description is another cache key: the embeddings would be computed again.
    book = json.loads(entities.read_text())
    book["normal"] = "A different description."
    entities.write_text(json.dumps(book))
    with pytest.raises(RuntimeError, match="recomputed"):
        MedKLIPAdapter(ckpt, text_encoder=str(bert_dir), entities=str(entities))


def test_padding_to_the_longest_text_gives_the_cls_of_padding_to_64_also_when_truncated(bert_dir):
    texts = ["pneumonia", "effusion of " * 40]  # the second is cut at 64 tokens
    tokens = BertTokenizer.from_pretrained(bert_dir)(texts, padding="max_length", truncation=True, max_length=64,
                                                     return_tensors="pt")
    assert tokens["attention_mask"].sum(dim=1).tolist() == [3, 64]
    with torch.no_grad():
        bert = BertModel.from_pretrained(bert_dir).eval()
        expected = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
    embeddings = medklip.compute_entity_embeddings(texts, str(bert_dir))
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(medklip.compute_entity_embeddings(texts[:1], str(bert_dir)), expected[:1],
                               rtol=1e-5, atol=1e-5)  # padded to 3 tokens only


def test_without_entity_queries_capabilities_name_the_options(ckpt, images):
    plain = MedKLIPAdapter(ckpt)
    assert plain.capabilities == {"features"} and plain.describe()["entity_queries"] is None
    for call in (lambda: plain.zero_shot_scores(images, ["pneumonia"]),
                 lambda: plain.grounding_maps(images, ["pneumonia"])):
        with pytest.raises(CapabilityError, match=r"text_encoder=DIR.*entities=FILE.*entity_embeddings=FILE"):
            call()


@pytest.mark.parametrize(("options", "message"), [
    ({"text_encoder": "bert"}, r"text_encoder=DIR also needs entities=FILE"),
    ({"entities": "book.json"}, r"entities=FILE also needs text_encoder=DIR"),
    ({"entity_embeddings": "e.pt", "text_encoder": "bert", "entities": "book.json"}, "not both"),
])
def test_option_combinations_are_checked_before_loading(options, message):
    with pytest.raises(ConfigError, match=message):
        MedKLIPAdapter("never-read.pth", **options)


def test_entities_file_must_be_medklips_json_in_order(tmp_path):
    path = write_medklip_entities(tmp_path / "book.json")
    book = json.loads(path.read_text())
    assert len(load_entity_descriptions(path)) == 75
    swapped = dict(reversed(list(book.items())))
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    with pytest.raises(ConfigError, match=r"key 0 is 'excluded_obs', expected 'normal'"):
        load_entity_descriptions(tmp_path / "swapped.json")
    (tmp_path / "short.json").write_text(json.dumps(dict(list(book.items())[:74])))
    with pytest.raises(ConfigError, match="75 entity descriptions; found 74 entries"):
        load_entity_descriptions(tmp_path / "short.json")


def test_entity_embedding_files_are_shape_checked(tmp_path, embeddings_file):
    tensor = load_entity_embeddings(embeddings_file)
    torch.save(tensor, tmp_path / "entities.pt")
    assert torch.equal(load_entity_embeddings(tmp_path / "entities.pt"), tensor)
    torch.save(torch.zeros(75, 512), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError, match=r"\(75, 768\).*found a \(75, 512\)"):
        load_entity_embeddings(tmp_path / "narrow.pt")


def test_registered_and_listed():
    assert get_adapter("medklip") is MedKLIPAdapter and "medklip" in adapter_names()
    assert any("checkpoint_final.pth" in form for form in MedKLIPAdapter.checkpoint_forms)


def test_inspect_takes_the_entity_options_from_the_command_line_and_reads_their_files(
        ckpt, embeddings_file, bert_dir, tmp_path, capsys):
    from vlpbench.cli import main

    entities = write_medklip_entities(tmp_path / "observation explanation.json")
    plain = MedKLIPAdapter.inspect(ckpt)
    for options in (["--model-option", f"entity_embeddings={embeddings_file}"],
                    ["--model-option", f"text_encoder={bert_dir}", "--model-option", f"entities={entities}"]):
        assert main(["inspect", "--model", "medklip", "--checkpoint", str(ckpt), *options]) == 0
        assert capsys.readouterr().out.endswith(plain.format() + "\n")

    short = tmp_path / "short.json"
    short.write_text(json.dumps(dict(list(json.loads(entities.read_text()).items())[:74])))
    torch.save(torch.zeros(75, 512), tmp_path / "narrow.pt")
    for options, message in (
            ([f"text_encoder={bert_dir}", f"entities={short}"], f"entities file {short}: expected MedKLIP's"),
            ([f"entity_embeddings={tmp_path / 'narrow.pt'}"], r"found a (75, 512)"),
            ([f"entities={entities}"], "entities=FILE also needs text_encoder=DIR")):
        assert main(["inspect", "--model", "medklip", "--checkpoint", str(ckpt),
                     *(part for option in options for part in ("--model-option", option))]) == 2
        assert message in capsys.readouterr().err
