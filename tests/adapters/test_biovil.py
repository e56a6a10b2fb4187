"""BioViL / BioViL-T: hi-ml's published ImageModel state dicts and the CXR-BERT text folder, loaded strictly.

The checkpoints are built here from hi-ml's module structure (microsoft/hi-ml, hi-ml-multimodal/src/
health_multimodal/image/model/{model,encoder,modules,resnet,transformer}.py), not from the adapter's modules: a
torchvision ResNet-50 with ``fc`` under ``encoder.encoder``, the 1×1-conv ``MLP`` projector, and for BioViL-T
``backbone_to_vit``, ``missing_previous_emb`` and the 3-block ``VisionTransformerPooler`` with timm's ``Mlp``.
The "aligned" variants set the weights by hand so that the model must see brightness: each layer4 location's
channel 0 is the local image brightness and the projected patch is (brightness, 0.5, 0, ...), so the text
direction e0 ("pneumonia") scores bright images and bright places, e1 ("no pneumonia") dark ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from timm.layers import Mlp
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import CapabilityError
from vlpbench.adapters.biovil import (
    FC_REASON,
    HIML_PROMPTS,
    MLM_REASON,
    POOLER_REASON,
    BioVilAdapter,
    gaussian_smooth,
)
from vlpbench.adapters.text import POSITION_IDS_REASON
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_tiny_bert_folder

# hi-ml image/model/pretrained.py:20 (JOINT_FEATURE_SIZE); encoder.py:95 (output_dim); transformer.py:38-39.
JOINT, TEMPORAL, BLOCKS, HEADS = 128, 256, 3, 8
# The published key counts (shared/reference/checkpoint-layouts.md), which the structures below must give:
# torchvision ResNet-50 with fc 320; MLP projector 8 (Conv 1 + BN 5 + Conv 2, modules.py:41-46); BioViL-T adds
# backbone_to_vit.weight, missing_previous_emb (encoder.py:100-111) and 42 pooler keys: 13 per Block
# (norm1 2, proj_q/k/v 3, proj 2, norm2 2, mlp fc1/fc2 4; transformer.py:155-160, 217-224), norm_post 2, type_embed 1.
PUBLISHED_KEYS = {"biovil": 328, "biovil_t": 372}
PROJECTOR_KEYS = ["projector.model.0.weight", "projector.model.1.weight", "projector.model.1.bias",
                  "projector.model.1.running_mean", "projector.model.1.running_var",
                  "projector.model.1.num_batches_tracked", "projector.model.3.weight", "projector.model.3.bias"]
BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.proj_q.weight", "attn.proj_k.weight", "attn.proj_v.weight",
              "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]
POOLER_KEYS = ([f"encoder.vit_pooler.blocks.{b}.{k}" for b in range(BLOCKS) for k in BLOCK_KEYS]
               + ["encoder.vit_pooler.norm_post.weight", "encoder.vit_pooler.norm_post.bias",
                  "encoder.vit_pooler.type_embed"])
# The brightness above which the aligned models call pneumonia (the projected patch's constant component).
THRESHOLD = 0.5
PROMPTS = ["pneumonia", "no pneumonia", *HIML_PROMPTS["pneumonia"][0], *HIML_PROMPTS["pneumonia"][1]]
E2E_SIZE = 64


# --- hi-ml's module structure -------------------------------------------------------------------------


class HimlMLP(nn.Module):
    """modules.py:27-46 with use_1x1_convs=True and a hidden layer."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(input_dim, JOINT, 1, bias=False), nn.BatchNorm2d(JOINT),
                                   nn.ReLU(inplace=True), nn.Conv2d(JOINT, JOINT, 1, bias=True))


class HimlAttention(nn.Module):
    """transformer.py:145-161 (MultiHeadAttentionLayer, qkv_bias=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(TEMPORAL, TEMPORAL, bias=False) for _ in range(3))
        self.proj = nn.Linear(TEMPORAL, TEMPORAL)


class HimlBlock(nn.Module):
    """transformer.py:204-224 (Block, mlp_ratio=1.0, timm Mlp)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(TEMPORAL, eps=1e-6)
        self.attn = HimlAttention()
        self.norm2 = nn.LayerNorm(TEMPORAL, eps=1e-6)
        self.mlp = Mlp(in_features=TEMPORAL, hidden_features=TEMPORAL, act_layer=nn.GELU)


class HimlPooler(nn.Module):
    """transformer.py:34-69 (VisionTransformerPooler(256, (14, 14)); pos_embed is not persistent)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([HimlBlock() for _ in range(BLOCKS)])
        self.norm_post = nn.LayerNorm(TEMPORAL, eps=1e-6)
        self.type_embed = nn.Parameter(torch.randn(2, 1, TEMPORAL) * 0.02)
        self.register_buffer("pos_embed", torch.zeros(1, 196, TEMPORAL), persistent=False)


class HimlEncoder(nn.Module):
    """encoder.py:24-47 (ImageEncoder) and, with ``temporal``, :84-112 (MultiImageEncoder)."""

    def __init__(self, temporal: bool) -> None:
        super().__init__()
        self.encoder = torchvision.models.resnet50()
        if temporal:
            self.backbone_to_vit = nn.Conv2d(2048, TEMPORAL, 1, bias=False)
            self.vit_pooler = HimlPooler()
            self.missing_previous_emb = nn.Parameter(torch.randn(1, TEMPORAL, 1, 1) * 0.02)


class HimlImageModel(nn.Module):
    """model.py:34-55 (ImageModel): ``encoder`` and ``projector``; ``forward`` is model.py:77-94 for one image."""

    def __init__(self, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.encoder = HimlEncoder(temporal)
        self.projector = HimlMLP(2 * TEMPORAL if temporal else 2048)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected patch embeddings, projected global embedding), neither normalised."""
        r = self.encoder.encoder
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))  # resnet.py:37-45
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        if self.temporal:  # encoder.py:129-135
            patch = self.encoder.backbone_to_vit(x)
            b, _, w, h = patch.shape
            x = torch.cat([patch, self.encoder.missing_previous_emb.repeat(b, 1, w, h)], dim=1)
        patches = self.projector.model(x)
        return patches, patches.mean(dim=(2, 3))


def himl_model(variant: str, seed: int, aligned: bool = False) -> HimlImageModel:
    """A random-init hi-ml ImageModel of ``variant`` (eval mode), or the brightness-aligned one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HimlImageModel(variant == "biovil_t")
    if aligned:
        _align(model)
    return model.eval()


@torch.no_grad()
def _align(model: HimlImageModel) -> None:
    """Make layer4 channel 0 a local average of the brightness and the projected patch (brightness, THRESHOLD, 0, ...).

    The stem's channel 0 averages its 7×7 window of the three channels. In each block that downsamples, the
    residual branch averages channel 0 over its 3×3 stride-2 window and the shortcut is zeroed, so every pixel
    counts; every other block keeps only its shortcut (bn3 zeroed: relu(shortcut)), which copies channel 0.
    """
    r = model.encoder.encoder
    r.conv1.weight.zero_()
    r.conv1.weight[0] = 1.0 / (3 * 49)
    for block in r.modules():
        if not isinstance(block, torchvision.models.resnet.Bottleneck):
            continue
        if block.stride == 2:
            for conv in (block.conv1, block.conv2, block.conv3, block.downsample[0]):
                conv.weight.zero_()
            block.conv1.weight[0, 0] = 1.0
            block.conv2.weight[0, 0] = 1.0 / 9
            block.conv3.weight[0, 0] = 1.0
        else:
            block.bn3.weight.zero_()
            if block.downsample is not None:
                block.downsample[0].weight.zero_()
                block.downsample[0].weight[0, 0] = 1.0
    first, last = model.projector.model[0], model.projector.model[3]
    first.weight.zero_()
    first.weight[0, 0] = 1.0
    last.weight.zero_()
    last.bias.zero_()
    last.weight[0, 0] = 1.0
    if model.temporal:  # the constant comes from missing_previous_emb, through the projector's hidden unit 1
        model.encoder.backbone_to_vit.weight.zero_()
        model.encoder.backbone_to_vit.weight[0, 0] = 1.0
        model.encoder.missing_previous_emb.zero_()
        model.encoder.missing_previous_emb[0, 0] = THRESHOLD
        first.weight[1, TEMPORAL] = 1.0
        last.weight[1, 1] = 1.0
    else:
        last.bias[1] = THRESHOLD


# --- CXR-BERT folder ------------------------------------------------------------------------------------


class HimlProjectionHead(nn.Module):
    """text/model/modelling_cxrbert.py:30-51 (BertProjectionHead)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense_to_hidden = nn.Linear(hidden, JOINT)
        self.LayerNorm = nn.LayerNorm(JOINT, eps=1e-12)
        self.dense_to_output = nn.Linear(JOINT, JOINT)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.dense_to_output(self.LayerNorm(nn.functional.gelu(self.dense_to_hidden(cls))))


@torch.no_grad()
def write_cxr_bert_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny CXR-BERT folder: config, tokenizer and ``pytorch_model.bin`` holding CXRBertModel's keys (a
    BertForMaskedLM, modelling_cxrbert.py:54-70: bert.*, cls.predictions.*, and cls_projection_head.*).

    The head is solved so that every PROMPTS text embeds exactly on e0 (positive prompts) or e1 (negative).
    """
    write_tiny_bert_folder(folder)
    config = BertConfig.from_pretrained(folder)
    tokenizer = BertTokenizer.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlm = BertForMaskedLM(config).eval()
        head = HimlProjectionHead(config.hidden_size)
    batch = tokenizer([p.rstrip("!?.") for p in PROMPTS], padding="longest", return_tensors="pt")
    cls = mlm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
    hidden = head.LayerNorm(nn.functional.gelu(head.dense_to_hidden(cls)))  # (prompts, 128)
    positive = [p == "pneumonia" or p in HIML_PROMPTS["pneumonia"][0] for p in PROMPTS]
    target = torch.zeros(len(PROMPTS), JOINT)
    target[torch.tensor(positive), 0] = 1.0
    target[~torch.tensor(positive), 1] = 1.0
    head.dense_to_output.weight.copy_(target.T @ torch.linalg.pinv(hidden.T))
    head.dense_to_output.bias.zero_()
    state = {**mlm.state_dict(), **{f"cls_projection_head.{k}": v for k, v in head.state_dict().items()}}
    # transformers < 4.31, which saved the published file, wrote this buffer too.
    state["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    torch.save(state, folder / "pytorch_model.bin")
    return folder


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """Random-init hi-ml ImageModels of both variants."""
    return {variant: himl_model(variant, seed) for seed, variant in enumerate(["biovil", "biovil_t"])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, models):
    """The random-init models' files, as hi-ml saves them (``ImageModel.state_dict()``)."""
    folder = tmp_path_factory.mktemp("biovil")
    files = {"biovil": folder / "biovil_image_resnet50_proj_size_128.pt",
             "biovil_t": folder / "biovil_t_image_model_proj_size_128.pt"}
    for variant, path in files.items():
        torch.save(models[variant].state_dict(), path)
    return files


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Brightness-aligned files of both variants."""
    folder = tmp_path_factory.mktemp("aligned")
    files = {}
    for variant in ("biovil", "biovil_t"):
        files[variant] = folder / f"{variant}.pt"
        torch.save(himl_model(variant, 5, aligned=True).state_dict(), files[variant])
    return files


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_cxr_bert_folder(tmp_path_factory.mktemp("cxr_bert"))


@pytest.fixture(scope="module")
def adapters(checkpoints):
    return {variant: build_adapter("biovil", path) for variant, path in checkpoints.items()}


@pytest.fixture(scope="module")
def aligned_adapters(aligned, text_dir):
    """The aligned models with the text side; ``himl`` uses hi-ml's prompt sets."""
    built = {variant: BioVilAdapter(path, text_encoder=str(text_dir)) for variant, path in aligned.items()}
    return built | {"himl": BioVilAdapter(aligned["biovil"], text_encoder=str(text_dir), prompts="himl")}


def _bright_images(n: int, size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` grey images at 0.3, every second one with a bright (1.0) square somewhere; labels."""
    generator = torch.Generator().manual_seed(1)
    images = torch.full((n, 3, size, size), 0.3) + 0.02 * torch.rand(n, 1, size, size, generator=generator)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        y, x = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
        images[i, :, y:y + size // 4, x:x + size // 4] = 1.0
    return images, labels


# --- layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["biovil", "biovil_t"])
def test_hi_ml_structure_gives_the_published_keys(models, variant):
    state = models[variant].state_dict()
    assert len(state) == PUBLISHED_KEYS[variant]
    resnet = [k for k in state if k.startswith("encoder.encoder.")]
    assert len(resnet) == 320 and {"encoder.encoder.fc.weight", "encoder.encoder.fc.bias"} <= set(resnet)
    rest = [k for k in state if not k.startswith("encoder.encoder.")]
    if variant == "biovil":
        assert rest == PROJECTOR_KEYS
        assert tuple(state["projector.model.0.weight"].shape) == (JOINT, 2048, 1, 1)
    else:
        assert sorted(rest) == sorted(["encoder.backbone_to_vit.weight", "encoder.missing_previous_emb", *POOLER_KEYS,
                                       *PROJECTOR_KEYS])
        assert tuple(state["projector.model.0.weight"].shape) == (JOINT, 2 * TEMPORAL, 1, 1)
        assert tuple(state["encoder.missing_previous_emb"].shape) == (1, TEMPORAL, 1, 1)
        assert tuple(state["encoder.vit_pooler.type_embed"].shape) == (2, 1, TEMPORAL)


@pytest.mark.parametrize("variant, size, mapped, pooler",
                         [("biovil", 480, 318 + 8, 0), ("biovil_t", 448, 318 + 10, 42)])
def test_both_variants_load_with_everything_accounted(adapters, checkpoints, variant, size, mapped, pooler):
    adapter = adapters[variant]
    report = adapter.report
    assert report.ok and report.layout == variant and adapter.variant == variant
    assert adapter.image_size == size and BioVilAdapter.image_size == 480
    assert adapter.mean == (0.0, 0.0, 0.0) and adapter.std == (1.0, 1.0, 1.0)
    assert len(report.mapped) == mapped
    assert report.ignored[FC_REASON] == ["encoder.encoder.fc.weight", "encoder.encoder.fc.bias"]
    assert sorted(report.ignored.get(POOLER_REASON, [])) == (sorted(POOLER_KEYS) if pooler else [])
    assert len(report.mapped) + sum(map(len, report.ignored.values())) == PUBLISHED_KEYS[variant]
    assert ("projector.model.3.bias", "projector.3.bias") in report.mapped
    assert adapter.capabilities == {"features", "embed_image", "dense_embed"}
    describe = adapter.describe()
    assert describe["variant"] == variant and describe["image_size"] == size
    assert describe["pretraining_data"] == ["mimic_cxr"] and "grounding" in describe["procedures"]


def test_encoder_is_the_resnet_without_fc(adapters, checkpoints):
    raw = torch.load(checkpoints["biovil"], weights_only=True)
    encoder = adapters["biovil"].encoder()
    assert list(encoder.out_channels) == [3, 64, 256, 512, 1024, 2048]
    state = encoder.state_dict()
    assert len(state) == 318
    for key in state:
        assert torch.equal(state[key], raw[f"encoder.encoder.{key}"]), key


@pytest.mark.parametrize("renamed, message", [
    ("projector.model.3.bias", "projector.model.3.b"),
    ("encoder.vit_pooler.blocks.2.mlp.fc2.bias", "encoder.vit_pooler.blocks.2.mlp.fc2.b"),
    ("encoder.missing_previous_emb", "encoder.missing_previous"),
])
def test_renamed_key_fails_naming_it(tmp_path, checkpoints, renamed, message):
    state = torch.load(checkpoints["biovil_t"], weights_only=True)
    state[message] = state.pop(renamed)
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError) as info:
        BioVilAdapter(tmp_path / "renamed.pt")
    assert renamed in str(info.value) and message in str(info.value)
    report = BioVilAdapter.inspect(tmp_path / "renamed.pt")
    assert report.missing == [renamed] and report.unexpected == [message]


def test_wrong_pooler_shape_is_named(tmp_path, checkpoints):
    state = torch.load(checkpoints["biovil_t"], weights_only=True)
    state["encoder.vit_pooler.type_embed"] = torch.zeros(3, 1, TEMPORAL)  # hi-ml fixes 2 series
    torch.save(state, tmp_path / "shape.pt")
    report = BioVilAdapter.inspect(tmp_path / "shape.pt")
    assert report.mismatched == [("encoder.vit_pooler.type_embed", (2, 1, TEMPORAL), (3, 1, TEMPORAL))]


def test_options_are_checked(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="prompts='clip'"):
        BioVilAdapter.inspect(checkpoints["biovil"], prompts="clip")
    with pytest.raises(ConfigError, match="image_size=-1"):
        BioVilAdapter.inspect(checkpoints["biovil"], image_size=-1)
    write_tiny_bert_folder(tmp_path / "no_weights")
    with pytest.raises(ConfigError, match="has no model.safetensors or pytorch_model.bin"):
        BioVilAdapter.inspect(checkpoints["biovil"], text_encoder=str(tmp_path / "no_weights"))


# --- embeddings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["biovil", "biovil_t"])
def test_embeddings_equal_hi_ml_forward(models, adapters, variant):
    images = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patches, pooled = models[variant](images)
    adapter = adapters[variant]
    dense, image = adapter.dense_embed(images), adapter.embed_image(images)
    assert dense.shape == (2, JOINT, 2, 1) and image.shape == (2, JOINT)
    torch.testing.assert_close(dense, nn.functional.normalize(patches, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(image, nn.functional.normalize(pooled, dim=1), atol=1e-5, rtol=1e-4)
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        adapter.embed_text(["pneumonia"])


def test_text_side_is_accounted_and_hashed(aligned_adapters, text_dir):
    adapter = aligned_adapters["biovil"]
    report = adapter.report
    source = "text_encoder/pytorch_model.bin:"
    saved = torch.load(text_dir / "pytorch_model.bin", weights_only=True)
    mlm = [source + k for k in saved if k.startswith("cls.predictions.")]
    assert mlm and report.ignored[MLM_REASON] == mlm
    assert report.ignored[POSITION_IDS_REASON] == [source + "bert.embeddings.position_ids"]
    text_mapped = [k for k, _ in report.mapped if k.startswith(source)]
    assert len(text_mapped) == len(saved) - len(mlm) - 1
    assert (source + "cls_projection_head.dense_to_output.weight",
            "text.cls_projection_head.dense_to_output.weight") in report.mapped
    assert adapter.capabilities >= {"embed_text", "zero_shot", "grounding"}
    record = adapter.describe()["text_encoder"]
    assert "pytorch_model.bin" in record["files"] and "config.json" in record["files"]


def test_text_weights_renamed_key_is_named(checkpoints, text_dir, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    for path in text_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["cls_projection_head.dense_to_out.weight"] = state.pop("cls_projection_head.dense_to_output.weight")
    torch.save(state, folder / "pytorch_model.bin")
    report = BioVilAdapter.inspect(checkpoints["biovil"], text_encoder=str(folder))
    assert report.missing == ["text_encoder/pytorch_model.bin:cls_projection_head.dense_to_output.weight"]
    assert report.unexpected == ["text_encoder/pytorch_model.bin:cls_projection_head.dense_to_out.weight"]


def test_embed_text_is_the_projected_cls(aligned_adapters):
    adapter = aligned_adapters["biovil"]
    embedded = adapter.embed_text(["No pneumonia.", "pneumonia"])
    assert embedded.shape == (2, JOINT)
    # The head was solved to put these prompts on e1 and e0 ("." is stripped as hi-ml's TextInput does).
    torch.testing.assert_close(embedded, torch.eye(JOINT)[[1, 0]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["biovil", "biovil_t", "himl"])
def test_zero_shot_on_an_aligned_model_beats_chance(aligned_adapters, variant):
    adapter = aligned_adapters[variant]
    images, labels = _bright_images(6)
    scores = adapter.zero_shot_scores(images, ["pneumonia"], ("{}", "no {}"))[:, 0]
    assert roc_auc_score(labels, scores.numpy()) == 1.0  # chance is 0.5
    # The texts embed on e0 / e1, so the score is the softmax of the image embedding's first two components.
    image = adapter.embed_image(images)
    torch.testing.assert_close(scores, torch.sigmoid(image[:, 0] - image[:, 1]), atol=1e-5, rtol=0)


def test_himl_prompts_refuse_classes_without_a_set(aligned_adapters):
    adapter = aligned_adapters["himl"]
    assert adapter.options["prompts"] == "himl"
    with pytest.raises(ConfigError, match="not 'pneumothorax'"):
        adapter.zero_shot_scores(torch.zeros(1, 3, 64, 64), ["pneumothorax"])


@pytest.mark.parametrize("size", [(15, 15), (14, 14), (4, 3), (1, 1)])
def test_gaussian_smoothing_equals_scipy(size):
    from scipy import ndimage

    grid = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    expected = np.stack([[ndimage.gaussian_filter(m.numpy(), sigma=(1.5, 1.5)) for m in row] for row in grid])
    np.testing.assert_allclose(gaussian_smooth(grid).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["biovil", "biovil_t"])
def test_grounding_map_peaks_at_the_planted_region(aligned_adapters, variant):
    adapter = aligned_adapters[variant]
    image = torch.full((1, 3, 256, 256), 0.3)
    # ResNet's layer4 cell (i, j) is centred on pixel (32i, 32j): this square covers cell (4, 3) and no other centre.
    image[..., 112:144, 80:112] = 1.0
    maps = adapter.grounding_maps(image, ["pneumonia", "no pneumonia"])
    assert maps.shape == (1, 2, 8, 8)
    assert divmod(int(maps[0, 0].argmax()), 8) == (4, 3)
    assert divmod(int(maps[0, 1].argmin()), 8) == (4, 3)
    raw = torch.einsum("bdhw,td->bthw", adapter.dense_embed(image), adapter.embed_text(["pneumonia", "no pneumonia"]))
    torch.testing.assert_close(maps, gaussian_smooth(raw))


# --- end to end -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic RSNA and MS-CXR folders of 40 images at 64 pixels (the aligned models run at 64² here)."""
    root = tmp_path_factory.mktemp("data")
    for dataset in ("rsna", "ms_cxr"):
        api.synth(dataset, root / dataset, n=40, size=E2E_SIZE, progress=False)
    return root


def _run(task: str, checkpoint: Path, root: Path, results: Path, *extra: str) -> dict:
    code = main(["-q", "run", "--model", "biovil", "--checkpoint", str(checkpoint), "--task", task, "--frac", "1.0",
                 "--data-root", str(root), "--results", str(results), "--device", "cpu", *extra])
    assert code == 0
    (path,) = results.glob(f"runs/**/{task}.v*/*.json")
    return json.loads(path.read_text())


def test_cli_zero_shot_on_synthetic_rsna(aligned, text_dir, data, tmp_path):
    record = _run("rsna_zs", aligned["biovil"], data / "rsna", tmp_path, "--model-option", f"text_encoder={text_dir}",
                  "--model-option", f"image_size={E2E_SIZE}", "--set", "bootstrap_resamples=50")
    assert record["metrics"]["auc"] > 0.8  # chance is 0.5; the synthetic opacities are bright
    model = record["model"]
    assert model["variant"] == "biovil" and model["image_size"] == E2E_SIZE and model["options"]["prompts"] == "task"
    assert "test_zero_shot_classification.py" in model["procedures"]["zero_shot"]
    assert "pytorch_model.bin" in model["text_encoder"]["files"] and "pretraining_overlap" not in model


def test_cli_grounding_on_synthetic_ms_cxr_is_flagged_as_pretraining_data(aligned, text_dir, data, tmp_path):
    record = _run("ms_cxr_ground", aligned["biovil_t"], data / "ms_cxr", tmp_path,
                  "--model-option", f"text_encoder={text_dir}", "--model-option", f"image_size={E2E_SIZE}",
                  "--set", "eval_size=64", "--set", "bootstrap_resamples=50", "--set", "threshold_grid=100")
    model, training = record["model"], record["config"]["training"]
    assert model["variant"] == "biovil_t" and model["pretraining_overlap"] == "mimic_cxr"
    assert training["map_size"] == [E2E_SIZE // 32] * 2 and training["input_size"] == E2E_SIZE
    assert training["text_source"] == "phrase" and record["n"]["test"] > 0 and record["n"]["flat_maps"] == 0
    assert 0.0 <= record["metrics"]["dice"] <= 1.0


def test_cli_linear_probe_on_synthetic_rsna(checkpoints, data, tmp_path):
    record = _run("rsna_cls", checkpoints["biovil_t"], data / "rsna", tmp_path, "--set", "resize_size=64",
                  "--set", "image_size=64", "--set", "mean=0", "--set", "std=1", "--set", "max_epochs=2",
                  "--set", "bootstrap_resamples=20")
    assert record["model"]["load_report"]["ok"] and record["n"]["train"] > 0
    assert 0.0 <= record["metrics"]["auc"] <= 1.0
