"""G2D embeddings: proj_v/attnpool always, the text side with a local tiny BERT (``text_encoder`` option)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from vlpbench.adapters.base import IMAGENET_MEAN, IMAGENET_STD, CapabilityError
from vlpbench.adapters.g2d import (
    PSEUDO_CONV_REASON,
    TEXT_SIDE_REASON,
    TRAINING_STATE_REASON,
    G2DAdapter,
)
from vlpbench.adapters.text import POSITION_IDS_REASON, load_tokenizer
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_g2d_checkpoint

WORDS = ["no", "pleural", "effusion", "pneumothorax", "cardiomegaly", "lung", "left", "right", "small", "large"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + WORDS + [chr(c) for c in range(97, 123)] + [
    f"##{chr(c)}" for c in range(97, 123)
] + [f"tok{i}" for i in range(200)]
HIDDEN, LAYERS = 32, 2
# BERT keys: 5 embedding + 16 per layer + 2 pooler.
N_LM = 5 + 16 * LAYERS + 2
TEXTS = ["no pleural effusion.", "small left pneumothorax"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A tiny BERT directory: config and a word-piece tokenizer, no weights (they come from the checkpoint)."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(vocab_file)).save_pretrained(folder)
    BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
               intermediate_size=4 * HIDDEN, max_position_embeddings=512, type_vocab_size=2).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("g2d_text") / "g2d_50_checkpoint.pth"
    return write_g2d_checkpoint(path, "pretrain", text_layers=LAYERS, text_hidden=HIDDEN, text_vocab=len(VOCAB))


@pytest.fixture(scope="module")
def adapter(ckpt, text_dir):
    return G2DAdapter(ckpt, text_encoder=text_dir)


@pytest.fixture(scope="module")
def images():
    """Two 256×256 inputs, drawn from a private generator."""
    return torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _group(key):
    return key.split(".", 1)[0]


def test_tiny_bert_checkpoint_loads_with_every_key_accounted(adapter):
    report = adapter.report
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert Counter(_group(k) for k, _ in report.mapped) == {
        "img_model": 380, "proj_v": 5, "attnpool": 7, "lm_model": N_LM, "proj_t": 5,
    }
    assert {reason: len(keys) for reason, keys in report.ignored.items()} == {
        TRAINING_STATE_REASON: 2, PSEUDO_CONV_REASON: 2,
    }
    assert adapter.capabilities == {"features", "decoder", "embed_image", "embed_text", "dense_embed", "zero_shot", "grounding"}
    adapter.require("embed_image", "embed_text", "dense_embed")


def test_renamed_attnpool_key_is_rejected_naming_it(tmp_path, ckpt, text_dir):
    obj = _state(ckpt)
    state = obj["model_state_dict"]
    state["attnpool.c_proj.weights"] = state.pop("attnpool.c_proj.weight")
    path = tmp_path / "renamed.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"attnpool\.c_proj\.weight\b") as err:
        G2DAdapter(path, text_encoder=text_dir)
    assert "attnpool.c_proj.weights" in str(err.value)
    report = G2DAdapter.inspect(path, text_encoder=text_dir)
    assert report.missing == ["attnpool.c_proj.weight"] and report.unexpected == ["attnpool.c_proj.weights"]


def test_embeddings_have_declared_shapes_and_unit_norm(adapter, images):
    x = images
    image = adapter.embed_image(x)
    text = adapter.embed_text(TEXTS)
    dense = adapter.dense_embed(x[:1, :, :64, :96])
    assert image.shape == (2, 128) and text.shape == (2, 128) and dense.shape == (1, 128, 2, 3)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(1, 2, 3))
    assert not torch.allclose(text[0], text[1])


def test_two_loads_give_identical_outputs(adapter, ckpt, text_dir, images):
    x = images
    again = G2DAdapter(ckpt, text_encoder=text_dir)
    assert torch.equal(adapter.embed_image(x), again.embed_image(x))
    assert torch.equal(adapter.embed_text(TEXTS), again.embed_text(TEXTS))
    assert torch.equal(adapter.dense_embed(x), again.dense_embed(x))


def test_embed_text_equals_a_hand_built_bert_and_proj_t(adapter, ckpt, text_dir):
    state = _state(ckpt)["model_state_dict"]
    bert = BertModel(BertConfig.from_pretrained(text_dir), add_pooling_layer=True)
    bert.load_state_dict({k[len("lm_model."):]: v for k, v in state.items() if k.startswith("lm_model.")})
    proj_t = nn.Sequential(nn.Conv1d(HIDDEN, 128, 1, bias=False), nn.BatchNorm1d(128, affine=False), nn.ReLU(),
                           nn.Conv1d(128, 128, 1, bias=False))
    proj_t.load_state_dict({k[len("proj_t."):]: v for k, v in state.items() if k.startswith("proj_t.")})
    tokens = BertTokenizer.from_pretrained(text_dir)(["no pleural effusion."], padding="longest", return_tensors="pt")
    assert tokens["input_ids"][0, 0] == VOCAB.index("[CLS]")
    with torch.no_grad():
        hidden = bert.eval()(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        expected = nn.functional.normalize(proj_t.eval()(hidden.permute(0, 2, 1))[:, :, 0], dim=-1)
    torch.testing.assert_close(adapter.embed_text(["no pleural effusion."]), expected)


def test_embed_image_refuses_224_input(adapter):
    with pytest.raises(ConfigError, match=r"256×256.*\(224, 224\).*65 positions"):
        adapter.embed_image(torch.zeros(1, 3, 224, 224))


def test_without_text_encoder_text_keys_are_ignored_and_embed_text_names_the_option(ckpt, images):
    plain = G2DAdapter(ckpt)
    ignored = plain.report.ignored[TEXT_SIDE_REASON]
    assert Counter(_group(k) for k in ignored) == {"lm_model": N_LM, "proj_t": 5}
    assert "text_encoder" in TEXT_SIDE_REASON
    assert plain.capabilities == {"features", "decoder", "embed_image", "dense_embed"}
    with pytest.raises(CapabilityError, match=r"'g2d'.*embed_text.*--model-option text_encoder=DIR"):
        plain.embed_text(["no effusion"])
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        plain.require("embed_image", "embed_text")
    assert plain.embed_image(images[:1]).shape == (1, 128)


def test_position_ids_buffer_is_tolerated(tmp_path, ckpt, text_dir):
    obj = _state(ckpt)
    obj["model_state_dict"]["lm_model.embeddings.position_ids"] = torch.arange(512)[None]
    path = tmp_path / "old_transformers.pth"
    torch.save(obj, path)
    report = G2DAdapter.inspect(path, text_encoder=text_dir)
    assert report.ok and report.ignored[POSITION_IDS_REASON] == ["lm_model.embeddings.position_ids"]


def test_text_encoder_must_be_a_local_bert_directory(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="text_encoder"):
        G2DAdapter.inspect(ckpt, text_encoder=str(tmp_path / "absent"))


def test_text_encoder_is_refused_for_a_file_without_text_side(tmp_path, text_dir):
    path = write_g2d_checkpoint(tmp_path / "g2d_encoder.pth", "encoder")
    with pytest.raises(ConfigError, match=r"text_encoder needs the full.*'encoder'"):
        G2DAdapter(path, text_encoder=text_dir)


def test_image_only_layouts_lack_embeddings(tmp_path):
    adapter = G2DAdapter(write_g2d_checkpoint(tmp_path / "g2d_encoder.pth", "encoder"))
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        adapter.embed_text(["no effusion"])
    assert adapter.capabilities == {"features"}
    with pytest.raises(CapabilityError, match=r"embed_image.*_checkpoint\.pth"):
        adapter.embed_image(torch.zeros(1, 3, 256, 256))
    with pytest.raises(CapabilityError, match="dense_embed"):
        adapter.dense_embed(torch.zeros(1, 3, 256, 256))
    assert issubclass(CapabilityError, ConfigError)


def test_preprocess_resizes_greyscale_uint8_and_normalises(adapter):
    white = torch.full((1, 1, 300, 200), 255, dtype=torch.uint8)
    out = adapter.preprocess(white)
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out[0, :, 100, 100], torch.tensor(expected))
    torch.testing.assert_close(adapter.preprocess(white.float().expand(-1, 3, -1, -1) / 255), out)
    with pytest.raises(ConfigError, match="preprocess"):
        adapter.preprocess(torch.zeros(3, 256, 256))


def test_inspect_takes_the_text_encoder_option_from_the_command_line(ckpt, text_dir, capsys):
    from vlpbench import api
    from vlpbench.cli import main

    with_text = api.inspect("g2d", ckpt, text_encoder=text_dir)
    assert with_text.ok and Counter(_group(k) for k, _ in with_text.mapped) == {
        "img_model": 380, "proj_v": 5, "attnpool": 7, "lm_model": N_LM, "proj_t": 5}
    image_only = api.inspect("g2d", ckpt)
    assert len(image_only.mapped) == 392 and len(image_only.ignored[TEXT_SIDE_REASON]) == N_LM + 5

    assert main(["inspect", "--model", "g2d", "--checkpoint", str(ckpt), "--model-option", f"text_encoder={text_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"mapped: {392 + N_LM + 5} keys\nignored: 4 keys\n" in out and TEXT_SIDE_REASON not in out
    assert main(["inspect", "--model", "g2d", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert f"mapped: 392 keys\nignored: {4 + N_LM + 5} keys\n" in out and TEXT_SIDE_REASON in out


def test_a_tokenizer_needing_a_missing_package_is_a_named_error(tmp_path, monkeypatch):
    import transformers

    def needs_sentencepiece(*args, **kwargs):
        raise ImportError("this tokenizer requires the SentencePiece library but it was not found")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_sentencepiece)
    with pytest.raises(ConfigError, match=r"adapter 'g2d': no tokenizer can be loaded from text_encoder=.*SentencePiece"):
        load_tokenizer(tmp_path, "g2d")
