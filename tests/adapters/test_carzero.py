"""CARZero adapter: its Lightning CARZero_best_model.ckpt rebuilt at a tiny size from CARZero's module structure,
and its zero-shot and grounding rules recomputed by hand from the checkpoint's tensors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel, BertTokenizer

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON, CapabilityError, save_checkpoint
from vlpbench.adapters.carzero import (
    LOGIT_SCALE_REASON,
    SELF_ATTENTION_REASON,
    TEXT_SIDE_REASON,
    CARZeroAdapter,
    FusionModule,
)
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import lightning_1_1_checkpoint, write_tiny_bert_folder
from vlpbench.testing.carzero import CARZERO_CONFIG, CARZeroModel, carzero_state, write_carzero_checkpoint
from vlpbench.testing.hf import renamed

WIDTH, DEPTH, GRID, PATCH = 32, 2, 4, 16
SIZE = GRID * PATCH
# Published key counts (module docstring): ViT-B/16 150; BertModel with pooler 5 + 12 × 16 + 2 = 199; TQN_Model
# logit_scale + decoder_norm 2 + 4 layers × 18 + decoder.norm 2 + mlp_head 8 = 85, of which 25 are ignored.
PUBLISHED = {"image": 150, "text": 199, "fusion": 85, "ignored_fusion": 25}
TINY_TEXT_KEYS = 5 + 2 * 16 + 2
PROMPTS = ["pleural effusion", "small pneumothorax", "left lung opacity"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return str(write_tiny_bert_folder(tmp_path_factory.mktemp("bert"), hidden=WIDTH, layers=2))


@pytest.fixture(scope="module")
def state(bert_folder):
    return carzero_state(bert_folder, seed=3, width=WIDTH, depth=DEPTH, grid=GRID)


@pytest.fixture(scope="module")
def checkpoint(bert_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("carzero") / "CARZero_best_model.ckpt"
    return str(write_carzero_checkpoint(path, bert_folder, seed=3, width=WIDTH, depth=DEPTH, grid=GRID))


@pytest.fixture(scope="module")
def adapter(checkpoint, bert_folder):
    return CARZeroAdapter(checkpoint, text_encoder=bert_folder)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, SIZE, SIZE, generator=generator)


def write(state, path, config=CARZERO_CONFIG) -> str:
    return str(save_checkpoint(lightning_1_1_checkpoint(state, config), path))


# --- loading ------------------------------------------------------------------------------------------------


def test_the_published_layout_is_accounted_at_full_size(tmp_path):
    folder = write_tiny_bert_folder(tmp_path, hidden=768, layers=12, heads=12)
    with torch.device("meta"):
        model = CARZeroModel(folder, width=768, depth=12, grid=14)
    keys = {f"CARZero.{k}": v for k, v in model.state_dict().items()}
    counts = {part: sum(k.startswith(f"CARZero.{part}") for k in keys)
              for part in ("img_encoder.", "text_encoder.", "fusion_module.")}
    assert counts == {"img_encoder.": PUBLISHED["image"], "text_encoder.": PUBLISHED["text"],
                      "fusion_module.": PUBLISHED["fusion"]}
    assert keys["CARZero.fusion_module.decoder.norm.weight"].shape == (768,)  # the shared decoder_norm, saved twice

    report = CARZeroAdapter.map_weights({"state_dict": keys, "epoch": 3}, {"pool": "cls", "text_encoder": str(folder)}).report
    assert report.ok and report.layout == "carzero-vit-b16 (unwrapped 'state_dict')"
    assert len(report.mapped) == len(keys) - PUBLISHED["ignored_fusion"]
    assert len(report.ignored[SELF_ATTENTION_REASON]) == PUBLISHED["ignored_fusion"] - 1
    assert report.ignored[LOGIT_SCALE_REASON] == ["CARZero.fusion_module.logit_scale"]


def test_checkpoint_loads_with_every_key_accounted(adapter, state):
    report = adapter.report
    assert report.ok and report.layout == f"carzero-vit-w{WIDTH}-d{DEPTH}-p{PATCH}-{SIZE} (unwrapped 'state_dict')"
    assert len(report.mapped) + len(report.ignored[SELF_ATTENTION_REASON]) + 1 == len(state)
    assert set(report.ignored[WRAPPER_REASON]) == {
        "epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states", "lr_schedulers",
        "native_amp_scaling_state", "hparams_name", "hyper_parameters", "hparams_type"}
    assert ("CARZero.img_encoder.model.blocks.1.attn.qkv.weight", "encoder.backbone.blocks.1.attn.qkv.weight") \
        in report.mapped
    assert ("CARZero.fusion_module.mlp_head.9.weight", "fusion_module.mlp_head.9.weight") in report.mapped
    assert adapter.capabilities == {"features", "zero_shot", "grounding"}
    assert adapter.image_size == SIZE and adapter.mean == (0.4978,) * 3 and adapter.std == (0.2449,) * 3
    record = adapter.describe()
    assert record["pretraining_data"] == ["mimic_cxr", "padchest"]
    assert set(record["procedures"]) == {"zero_shot", "grounding", "linear"}
    assert record["text_encoder"]["files"] and record["pool"].startswith("cls")


def test_without_text_encoder_the_image_side_loads_alone(checkpoint):
    adapter = build_adapter("carzero", checkpoint)
    assert adapter.report.ok
    assert len(adapter.report.ignored[TEXT_SIDE_REASON]) == TINY_TEXT_KEYS
    assert adapter.capabilities == {"features"}
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        adapter.zero_shot_scores(torch.zeros(1, 3, SIZE, SIZE), PROMPTS)
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        adapter.grounding_maps(torch.zeros(1, 3, SIZE, SIZE), PROMPTS)
    with pytest.raises(CapabilityError, match="not trained for cosine"):
        adapter.require("embed_image")


@pytest.mark.parametrize("key", ["CARZero.fusion_module.decoder.layers.2.multihead_attn.in_proj_weight",
                                 "CARZero.img_encoder.model.blocks.0.norm1.weight",
                                 "CARZero.text_encoder.model.encoder.layer.1.output.dense.weight"])
def test_a_renamed_key_fails_naming_it(state, tmp_path, bert_folder, key):
    path = write(renamed(state, key, key + "_renamed"), tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError) as error:
        CARZeroAdapter(path, text_encoder=bert_folder)
    message = str(error.value)
    assert f"missing: 1 keys\n  - {key}\n" in message
    assert f"unexpected: 1 keys\n  - {key}_renamed\n" in message


def test_the_bare_model_state_dict_loads_the_same(state, tmp_path, bert_folder, adapter, images):
    bare = {k[len("CARZero."):]: v for k, v in state.items()}
    path = save_checkpoint(bare, tmp_path / "bare.pt")
    loaded = CARZeroAdapter(path, text_encoder=bert_folder)
    assert loaded.report.ok and loaded.report.layout == f"carzero-vit-w{WIDTH}-d{DEPTH}-p{PATCH}-{SIZE}"
    assert torch.equal(loaded.zero_shot_scores(images, PROMPTS), adapter.zero_shot_scores(images, PROMPTS))


def test_another_configuration_in_hyper_parameters_is_refused(state, tmp_path, bert_folder):
    config = {**CARZERO_CONFIG, "model": {**CARZERO_CONFIG["model"],
                                          "text": {**CARZERO_CONFIG["model"]["text"], "last_n_layers": 1}}}
    path = write(state, tmp_path / "other.ckpt", config)
    with pytest.raises(CheckpointError, match=r"hyper_parameters\.model\.text\.last_n_layers: expected 4 .* found 1"):
        CARZeroAdapter(path, text_encoder=bert_folder)


def test_a_text_encoder_of_another_width_is_refused(checkpoint, tmp_path):
    folder = write_tiny_bert_folder(tmp_path, hidden=48, layers=1, heads=2)
    with pytest.raises(ConfigError, match="hidden_size 48, but CARZero's fusion head takes the ViT's width 32"):
        CARZeroAdapter(checkpoint, text_encoder=str(folder))


def test_models_lists_carzero(capsys):
    assert main(["models"]) == 0
    assert "\ncarzero " in capsys.readouterr().out


# --- CARZero's forward, by hand from the checkpoint's tensors -------------------------------------------------


def _reference_vit(state):
    """The ``MRM`` image encoder (transformer_backbones.py:227-247) from timm's PatchEmbed and Block."""
    prefix = "CARZero.img_encoder.model."
    vit = nn.Module()
    vit.patch_embed = PatchEmbed(SIZE, PATCH, 3, WIDTH)
    vit.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
    vit.pos_embed = nn.Parameter(torch.zeros(1, GRID * GRID + 1, WIDTH))
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    vit.blocks = nn.ModuleList(Block(WIDTH, max(1, WIDTH // 64), 4.0, qkv_bias=True, norm_layer=norm)
                               for _ in range(DEPTH))
    vit.norm = norm(WIDTH)
    vit.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return vit.eval()


def _reference_image(state, images):
    vit = _reference_vit(state)
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
    for block in vit.blocks:
        x = block(x)
    x = vit.norm(x)
    return x[:, 0], x[:, 1:]


def _reference_text(state, folder, texts):
    """``BertEncoder.forward`` (text_model.py:93-148): last 4 layers, word pieces summed per layer up to [SEP]."""
    prefix = "CARZero.text_encoder.model."
    bert = BertModel(BertConfig.from_pretrained(folder))
    bert.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    tokenizer = BertTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=97, return_tensors="pt")
    out = bert.eval()(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], output_hidden_states=True)
    embeddings = torch.stack(out.hidden_states[-4:]).permute(1, 2, 0, 3)  # (T, words, layers, D)
    rows = []
    for embs, ids in zip(embeddings, batch["input_ids"]):
        aggregated, bank = [], []
        for emb, token in zip(embs, tokenizer.convert_ids_to_tokens(ids.tolist())):
            if token == "[SEP]":
                aggregated += [torch.stack(bank).sum(0), emb]
                break
            if token.startswith("##"):
                bank.append(emb)
            else:
                if bank:
                    aggregated.append(torch.stack(bank).sum(0))
                bank = [emb]
        rows.append(torch.cat([torch.stack(aggregated), torch.zeros(97 - len(aggregated), *emb.shape)]))
    embeddings = torch.stack(rows).permute(0, 2, 1, 3)  # (T, layers, words, D)
    return embeddings.sum(dim=1), embeddings.mean(dim=2).sum(dim=1)


def _reference_tqn(state, image_features, text_features):
    """``TQN_Model.forward`` (dqn_wo_self_atten_mlp.py:166-182) with the layers of transformer_decoder.py:200-225."""
    p = "CARZero.fusion_module."

    def norm(x, name):
        return F.layer_norm(x, (WIDTH,), state[f"{p}{name}.weight"], state[f"{p}{name}.bias"])

    batch = image_features.shape[0]
    memory = norm(image_features.transpose(0, 1), "decoder_norm")
    query = norm(text_features.unsqueeze(1).repeat(1, batch, 1), "decoder_norm")
    weights = []
    for i in range(4):
        layer = f"decoder.layers.{i}"
        attention = nn.MultiheadAttention(WIDTH, 4)
        attention.load_state_dict({k[len(f"{p}{layer}.multihead_attn."):]: v for k, v in state.items()
                                   if k.startswith(f"{p}{layer}.multihead_attn.")})
        attended, w = attention.eval()(norm(query, f"{layer}.norm2"), memory, memory)
        query = query + attended
        hidden = F.relu(F.linear(norm(query, f"{layer}.norm3"), state[f"{p}{layer}.linear1.weight"],
                                 state[f"{p}{layer}.linear1.bias"]))
        query = query + F.linear(hidden, state[f"{p}{layer}.linear2.weight"], state[f"{p}{layer}.linear2.bias"])
        weights.append(w)
    out = norm(query, "decoder.norm").transpose(0, 1)
    for index in (0, 3, 6, 9):
        out = F.linear(out, state[f"{p}mlp_head.{index}.weight"], state[f"{p}mlp_head.{index}.bias"])
        out = F.relu(out) if index < 9 else out
    return out, weights


@torch.no_grad()
def test_zero_shot_is_the_sigmoid_of_carzeros_score_computed_by_hand(adapter, state, bert_folder, images):
    image_g, image_l = _reference_image(state, images)
    words, sentences = _reference_text(state, bert_folder, [f"there is {c}" for c in PROMPTS])
    expected = []
    for i in range(len(images)):  # get_dqn_similarities (CARZero.py:451-503), one image at a time
        i2t, _ = _reference_tqn(state, torch.cat([image_g[i:i + 1, None], image_l[i:i + 1]], dim=1), sentences)
        t2i, _ = _reference_tqn(state, torch.cat([sentences[:, None], words], dim=1), image_g[i:i + 1])
        expected.append((i2t.squeeze(-1) + t2i.squeeze(-1).transpose(1, 0)) / 2)
    expected = torch.sigmoid(torch.cat(expected).double())
    scores = adapter.zero_shot_scores(images, PROMPTS, ("there is {}", "no {}"))
    assert scores.shape == (3, 3) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    assert scores.std() > 1e-4  # the scores differ across images and classes: the check is not vacuous
    # CARZero scores one prompt per class: the negative template plays no part.
    assert torch.equal(adapter.zero_shot_scores(images, PROMPTS, ("there is {}", "nothing like {}")), scores)


@torch.no_grad()
def test_grounding_is_carzeros_layer_averaged_attention_computed_by_hand(adapter, state, bert_folder, images):
    image_g, image_l = _reference_image(state, images)
    _, sentences = _reference_text(state, bert_folder, PROMPTS[:2])
    _, weights = _reference_tqn(state, torch.cat([image_g[:, None], image_l], dim=1), sentences)
    expected = ((weights[-4] + weights[-3] + weights[-2] + weights[-1]) / 4)[:, :, 1:].reshape(3, 2, GRID, GRID)
    maps = adapter.grounding_maps(images, PROMPTS[:2])
    assert maps.shape == (3, 2, GRID, GRID)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)
    assert (maps.sum(dim=(-1, -2)) < 1).all()  # the [CLS] column is dropped, not renormalised


@torch.no_grad()
def test_the_encoder_gives_carzeros_class_token_and_a_pyramid(adapter, state, images):
    encoder = adapter.encoder().eval()
    torch.testing.assert_close(encoder.pooled(images), _reference_image(state, images)[0], rtol=0, atol=1e-5)
    maps = encoder(images)
    assert [tuple(m.shape) for m in maps] == [(3, 3, SIZE, SIZE), (3, 0, SIZE // 2, SIZE // 2)] + [
        (3, WIDTH, SIZE // s, SIZE // s) for s in (4, 8, 16, 32)]
    assert encoder.out_channels == (3, 0) + (WIDTH,) * 4


def test_zero_shot_on_an_aligned_model_beats_chance(state, bert_folder, tmp_path):
    """The fusion head fitted for a few steps on CARZero's score (get_dqn_similarities, as recomputed above) of
    bright images with "pleural effusion" and dark ones with "pneumothorax"; scored on fresh images, each class
    ranks its own images first. The ViT and the BERT stay at random init."""
    classes = ["pleural effusion", "pneumothorax"]
    generator = torch.Generator().manual_seed(1)

    def images(n):  # n bright (class 0), then n dark (class 1) preprocessed images
        levels = torch.tensor([1.0] * n + [-1.0] * n).view(-1, 1, 1, 1)
        return levels + 0.5 * torch.randn(2 * n, 3, SIZE, SIZE, generator=generator)

    with torch.no_grad():
        image_g, image_l = _reference_image(state, images(4))
        words, sentences = _reference_text(state, bert_folder, classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fusion = FusionModule(WIDTH).eval()  # eval: no dropout while fitting
    optimizer = torch.optim.Adam(fusion.parameters(), lr=1e-3)
    targets = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    for _ in range(10):
        image_to_text, _ = fusion(torch.cat([image_g[:, None], image_l], dim=1), sentences)
        text_to_image, _ = fusion(torch.cat([sentences[:, None], words], dim=1), image_g)
        loss = F.binary_cross_entropy_with_logits((image_to_text + text_to_image.T) / 2, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fitted = dict(state)
    fitted.update({f"CARZero.fusion_module.{k}": v.detach() for k, v in fusion.state_dict().items()})
    aligned = CARZeroAdapter(write(fitted, tmp_path / "aligned.ckpt"), text_encoder=bert_folder)
    scores = aligned.zero_shot_scores(images(4), classes, ("{}", "no {}")).numpy()
    labels = np.array([0] * 4 + [1] * 4)
    aucs = [roc_auc_score(labels == c, scores[:, c]) for c in range(2)]
    assert min(aucs) > 0.8, aucs  # chance is 0.5; both classes: the score depends on the pair, not the image alone
    assert (scores.argmax(axis=1) == labels).all()


def test_images_off_the_pre_training_size_are_refused(adapter):
    with pytest.raises(ConfigError, match=f"\\(B, 3, {SIZE}, {SIZE}\\)"):
        adapter.zero_shot_scores(torch.zeros(1, 3, SIZE + PATCH, SIZE + PATCH), PROMPTS)


# --- through the protocols --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["siim_zs", "siim_ground"])
def test_zero_shot_and_grounding_run_from_the_cli(checkpoint, bert_folder, siim_root, tmp_path, task):
    assert main(["-q", "run", "--model", "carzero", "--checkpoint", checkpoint, "--model-option",
                 f"text_encoder={bert_folder}", "--task", task, "--frac", "1.0", "--data-root", str(siim_root),
                 "--results", str(tmp_path), "--device", "cpu", "--set", "bootstrap_resamples=20"]) == 0
    (path,) = tmp_path.glob(f"runs/**/{task}.v*/*.json")
    record = json.loads(path.read_text())
    assert record["n"]["test"] > 0 and record["metrics"]
    assert record["model"]["procedures"] == CARZeroAdapter.procedures
    assert record["model"]["text_encoder"]["path"] == bert_folder
