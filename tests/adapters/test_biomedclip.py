"""BiomedCLIP: the Hugging Face open_clip folder, key by key against open_clip's CustomTextCLIP; its embeddings,
zero-shot with its logit scale, and patch-level grounding on an aligned tiny model."""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertTokenizer

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import CapabilityError, load_state_dict_file
from vlpbench.adapters.biomedclip import TEXT_SIDE_REASON, BiomedClipAdapter, BiomedClipFolder
from vlpbench.adapters.clip import OPENAI_MEAN, OPENAI_STD
from vlpbench.adapters.text import POSITION_IDS_REASON
from vlpbench.adapters.transformer import ViTEncoder
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.vit import biomedclip_model, write_biomedclip_folder

# timm's smallest ViT with 64-wide heads (192 wide, 3 heads, 12 blocks, 16-pixel patches, 224²) stands in for
# vit_base_patch16_224; a 2-layer, 32-wide BERT for PubMedBERT.
TINY_VIT, TINY_WIDTH, EMBED = "vit_tiny_patch16_224", 192, 64
TEXT_HIDDEN, TEXT_LAYERS = 32, 2
# open_clip CustomTextCLIP as BiomedCLIP's open_clip_config.json builds it: timm_model.py:69-103 (trunk, then
# head.proj Linear(768, 512, bias=False) for timm_proj "linear"), hf_model.py:128 (no pooler for
# cls_last_hidden_state_pooler) and :146-152 (proj MLP, hidden (768 + 512) // 2 = 640, no biases).
PUBLISHED_SHAPES = {
    "visual.trunk.patch_embed.proj.weight": (768, 3, 16, 16),
    "visual.trunk.pos_embed": (1, 197, 768),
    "visual.trunk.blocks.11.attn.qkv.weight": (2304, 768),
    "visual.trunk.norm.weight": (768,),
    "visual.head.proj.weight": (512, 768),
    "text.transformer.embeddings.word_embeddings.weight": (30522, 768),
    "text.transformer.embeddings.token_type_embeddings.weight": (2, 768),
    "text.transformer.encoder.layer.11.output.dense.weight": (768, 3072),
    "text.proj.0.weight": (640, 768),
    "text.proj.2.weight": (512, 640),
    "logit_scale": (),
}
# trunk 150 (timm_vit.py) + head.proj 1 + BertModel without pooler 5 + 16 × 12 + proj 2 + logit_scale 1.
N_PUBLISHED = 150 + 1 + 5 + 16 * 12 + 2 + 1


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_tiny_bert_folder(tmp_path_factory.mktemp("bert"), hidden=TEXT_HIDDEN, layers=TEXT_LAYERS)


@pytest.fixture(scope="module")
def no_token(text_dir):
    return BertTokenizer.from_pretrained(text_dir).convert_tokens_to_ids("no")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, text_dir):
    return write_biomedclip_folder(tmp_path_factory.mktemp("biomedclip"), text_dir, seed=2, timm_model=TINY_VIT,
                                   embed_dim=EMBED)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, text_dir, no_token):
    return write_biomedclip_folder(tmp_path_factory.mktemp("aligned"), text_dir, timm_model=TINY_VIT,
                                   embed_dim=EMBED, aligned_no_token=no_token)


@pytest.fixture(scope="module")
def adapter(folder, text_dir):
    return BiomedClipAdapter(folder, text_encoder=str(text_dir))


@pytest.fixture(scope="module")
def aligned_adapter(aligned, text_dir):
    return BiomedClipAdapter(aligned, text_encoder=str(text_dir))


def _images(brightness: list[float], size: int = 224) -> torch.Tensor:
    """Grey images of the given values in [0, 1], normalised with OpenAI's statistics."""
    pixels = torch.tensor(brightness).view(-1, 1, 1, 1).expand(-1, 3, size, size)
    return (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def test_published_layout_is_open_clips_custom_text_clip_key_by_key(tmp_path):
    """vit_base_patch16_224 and a PubMedBERT-sized BERT, built by open_clip on the meta device (shapes only)."""
    BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12).save_pretrained(tmp_path)
    with torch.device("meta"):
        model = biomedclip_model(tmp_path)
    state = dict(model.state_dict())
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]
    assert {k: tuple(state[k].shape) for k in PUBLISHED_SHAPES} == PUBLISHED_SHAPES
    assert not any(k.startswith("text.transformer.pooler.") for k in state)
    weights = BiomedClipAdapter.map_weights(BiomedClipFolder(state, "open_clip_pytorch_model.bin"),
                                            {"text_encoder": str(tmp_path)})
    report = weights.report
    assert report.ok and report.layout == "biomedclip-vit-b16 (open_clip_pytorch_model.bin)"
    assert len(report.mapped) == N_PUBLISHED == len(state) - 1
    assert report.ignored == {POSITION_IDS_REASON: ["text.transformer.embeddings.position_ids"]}
    assert Counter(".".join(source.split(".")[:2]) for source, _ in report.mapped) == {
        "visual.trunk": 150, "visual.head": 1, "text.transformer": 5 + 16 * 12, "text.proj": 2, "logit_scale": 1}


def test_folder_loads_with_everything_accounted(adapter, folder):
    raw = load_state_dict_file(folder / "open_clip_pytorch_model.bin")[0]
    assert type(raw).__name__ == "OrderedDict" and raw["text.transformer.embeddings.position_ids"].dtype == torch.int64
    report = adapter.report
    assert report.ok and report.layout == "biomedclip-vit-w192-d12-p16-224 (open_clip_pytorch_model.bin)"
    assert len(report.mapped) == len(raw) - 1 and not report.unexpected and not report.missing
    assert adapter.capabilities == {"features", "embed_image", "embed_text", "dense_embed", "zero_shot", "grounding"}
    assert (adapter.image_size, adapter.context_length, adapter.mean, adapter.std) == (224, 256, OPENAI_MEAN,
                                                                                       OPENAI_STD)
    assert adapter.describe()["vit"]["embed_dim"] == TINY_WIDTH and adapter.describe()["vit"]["num_heads"] == 3
    assert adapter.describe()["text_encoder"]["path"] == adapter.options["text_encoder"]


def test_embeddings_equal_open_clips_own_model(adapter, folder, text_dir):
    from open_clip.tokenizer import HFTokenizer

    reference = biomedclip_model(text_dir, timm_model=TINY_VIT, embed_dim=EMBED)
    state = load_state_dict_file(folder / "open_clip_pytorch_model.bin")[0]
    del state["text.transformer.embeddings.position_ids"]  # as open_clip's load_checkpoint does (factory.py)
    reference.load_state_dict(state)
    reference.eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    texts = ["no pleural effusion", "small  left pneumothorax"]
    with torch.no_grad():
        image = reference.encode_image(images, normalize=True)
        text = reference.encode_text(HFTokenizer(str(text_dir), context_length=256)(texts), normalize=True)
    torch.testing.assert_close(adapter.embed_image(images), image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.embed_text(texts), text, rtol=1e-4, atol=1e-5)
    dense = adapter.dense_embed(images)
    assert dense.shape == (2, EMBED, 14, 14)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 14, 14))


def test_zero_shot_uses_the_logit_scale_and_reads_the_image(aligned_adapter):
    scores = aligned_adapter.zero_shot_scores(_images([0.9, 0.8, 0.2, 0.1]), ["effusion", "pneumothorax"])
    # Cosines ±1 for the pair, times logit_scale.exp() = 1 / 0.07.
    bright = 1 / (1 + math.exp(-2 / 0.07))
    expected = torch.tensor([[bright] * 2] * 2 + [[1 - bright] * 2] * 2)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_grounding_maps_are_high_where_the_image_is_bright(aligned_adapter):
    image = _images([0.1])
    image[..., :, 112:] = _images([0.9])[..., :, 112:]  # right half bright
    maps = aligned_adapter.grounding_maps(image, ["effusion", "no effusion"])
    assert maps.shape == (1, 2, 14, 14)
    right = torch.zeros(14, 14)
    right[:, 7:] = 1
    torch.testing.assert_close(maps[0, 0], 2 * right - 1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps[0, 1], 1 - 2 * right, rtol=1e-4, atol=1e-4)


def test_without_text_encoder_the_image_side_loads_alone(folder):
    image_only = build_adapter("biomedclip", folder)
    assert image_only.report.ok and image_only.capabilities == {"features", "embed_image", "dense_embed"}
    assert all(k.startswith(("text.", "logit_scale")) for k in image_only.report.ignored[TEXT_SIDE_REASON])
    with pytest.raises(CapabilityError, match="text_encoder=DIR.*BiomedBERT"):
        image_only.embed_text(["no effusion"])
    bare = BiomedClipAdapter(folder / "open_clip_pytorch_model.bin")
    assert bare.report.ok and bare.report.layout == "biomedclip-vit-w192-d12-p16-224"


def test_encoder_is_the_trunk_behind_a_feature_pyramid(adapter, folder):
    raw = load_state_dict_file(folder / "open_clip_pytorch_model.bin")[0]
    encoder = adapter.encoder()
    assert isinstance(encoder, ViTEncoder) and encoder.out_channels == (3, 0) + (TINY_WIDTH,) * 4
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, raw[f"visual.trunk.{key}"]), key
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pooled = encoder.eval().pooled(images)
    # The linear probe's feature is the class token that BiomedCLIP projects into its embedding space.
    torch.testing.assert_close(torch.nn.functional.normalize(adapter._visual_proj(pooled), dim=-1),
                               adapter.embed_image(images))


def test_renamed_key_fails_naming_it(tmp_path, folder, text_dir):
    state = load_state_dict_file(folder / "open_clip_pytorch_model.bin")[0]
    state["text.proj.0.weights"] = state.pop("text.proj.0.weight")
    (tmp_path / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        BiomedClipAdapter(tmp_path, text_encoder=str(text_dir))
    assert "missing: 1 keys\n  - text.proj.0.weight\n" in str(info.value)
    assert "unexpected: 1 keys\n  - text.proj.0.weights\n" in str(info.value)


def test_a_config_other_than_biomedclips_is_refused_naming_the_field(tmp_path, folder):
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_proj_type"] = "linear"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    (tmp_path / "open_clip_pytorch_model.bin").symlink_to(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model_cfg.text_cfg.hf_proj_type is 'linear'.*'mlp'"):
        BiomedClipAdapter(tmp_path)
    with pytest.raises(CheckpointError, match="needs open_clip_config.json"):
        BiomedClipAdapter(tmp_path.parent)
    with pytest.raises(ConfigError, match="text_encoder"):
        BiomedClipAdapter(folder, text_encoder=str(tmp_path / "absent"))


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=30, size=64, progress=False)
    return root


def _run(*args: str) -> dict:
    """``vlpbench run --model biomedclip`` on the CPU with ``args``; the record it wrote."""
    results = Path(tempfile.mkdtemp(prefix="biomedclip_run"))
    assert main(["-q", "run", "--model", "biomedclip", "--frac", "1.0", "--results", str(results), "--device", "cpu",
                 "--set", "bootstrap_resamples=20", *args]) == 0
    (path,) = results.rglob("*.json")
    return json.loads(path.read_text())


def test_rsna_zero_shot_runs_from_the_cli(rsna_root, aligned, text_dir):
    record = _run("--checkpoint", str(aligned), "--model-option", f"text_encoder={text_dir}", "--task", "rsna_zs",
                  "--data-root", str(rsna_root))
    assert 0.0 <= record["metrics"]["auc"] <= 1.0 and record["n"]["test"] > 0
    assert record["model"]["procedures"] == BiomedClipAdapter.procedures
    assert record["model"]["pretraining_data"] == [] and record["model"]["text_encoder"]["path"] == str(text_dir)

