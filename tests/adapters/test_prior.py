"""PRIOR: prior_resnet50.pt and the whole image-text state dict load strictly; the one-channel encoder runs the
protocols' three-channel input end to end (siim_seg, rsna_det, rsna_cls from the CLI).

The files are built from PRIOR's module structure (QtacierP/PRIOR): ``resnet50_224(in_channels=1)``
(codes/prior/encoders/image/resnet.py:137-146: torchvision ResNet-50, conv1 replaced by a one-channel conv, fc =
Identity), its ``AttentionPool2d`` (:15-22), ``Prior``'s heads (codes/prior/models/prior.py:30-57), the SPB bank
(codes/prior/modules/spb.py:15), the sentence pool (codes/prior/modules/sentence_pool.py:6-15), the local
cross-attention (codes/prior/modules/local_attention.py:7-17), the sentence decoder (a ``BertModel`` with 8
decoder layers and cross-attention, codes/prior/decoders/sentence.py:6-13) and the image decoder's blocks
(codes/prior/decoders/image.py:7-36, 118-141). The text encoder and sentence decoder use a tiny BERT config, and
the image decoder (ignored by the adapter) is narrowed from 1536 to 64 input channels to keep the file small; every
key name is PRIOR's.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.adapters.prior import IGNORED_PARTS, TEXT_SIDE_REASON
from vlpbench.adapters.single_channel import GreyInputEncoder
from vlpbench.cli import main
from vlpbench.errors import CheckpointError
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.aligned import separating

EMBED = 768  # configs/pretrain_model/prior.yaml: embed_dim
N_ENCODER = 318
# AttentionPool2d: positional_embedding + k/q/v/c_proj weight and bias.
N_POOL = 9
BRIGHTNESS = torch.tensor([0.4, 0.7, 1.3, 1.6])


def _resnet50_224() -> nn.Module:
    """resnet.py:137-146 with in_channels=1: conv1 summed over RGB into one channel, fc = Identity."""
    model = torchvision.models.resnet50(weights=None)
    old = model.conv1
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.conv1.weight = nn.Parameter(old.weight.sum(dim=1, keepdim=True))
    model.fc = nn.Identity()
    return model


class _Pool(nn.Module):
    """AttentionPool2d (resnet.py:15-22) / SentenceAttentionPool (sentence_pool.py:6-15): parameters only."""

    def __init__(self, dim: int, positions: int = 0):
        super().__init__()
        if positions:
            self.positional_embedding = nn.Parameter(torch.randn(positions, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj, self.c_proj = (nn.Linear(dim, dim) for _ in range(4))


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    """smp's md.Conv2dReLU with batch norm: conv without bias, BatchNorm2d, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _image_decoder(width: int = 64) -> nn.Module:
    decoder = nn.Module()
    blocks = []
    for i in range(5):
        block = nn.Module()
        block.conv1 = _conv_relu(width >> i, width >> (i + 1))
        block.conv2 = _conv_relu(width >> (i + 1), width >> (i + 1))
        blocks.append(block)
    decoder.output_head = nn.Sequential(nn.Conv2d(width >> 5, 1, 3, padding=1))
    decoder.blocks = nn.ModuleList(blocks)
    return decoder


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_tiny_bert_folder(tmp_path_factory.mktemp("clinical_bert"), hidden=32, layers=2)


@pytest.fixture(scope="module")
def grey():
    return torch.rand(1, 1, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def full_state(text_dir, grey):
    """``Prior.state_dict()`` with heads set so that bright images match 'effusion' and dark ones 'no effusion'."""
    config = BertConfig.from_pretrained(text_dir)
    decoder_config = BertConfig.from_pretrained(text_dir, num_hidden_layers=8, is_decoder=True,
                                                add_cross_attention=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder, atten_pool = _resnet50_224().eval(), _Pool(2048, 50)
        text_encoder = BertModel(config).eval()  # AutoModel: with pooler
        heads = {"global_text_attention": _Pool(EMBED), "global_image_projection": nn.Linear(2048, EMBED),
                 "local_image_projection": nn.Linear(2048, EMBED), "global_text_projection": nn.Linear(32, EMBED),
                 "local_text_projection": nn.Linear(32, EMBED),
                 "predictor": nn.Sequential(nn.Linear(EMBED, EMBED // 2), nn.ReLU(), nn.Linear(EMBED // 2, EMBED)),
                 "sentence_decoder": BertModel(decoder_config, add_pooling_layer=False),
                 "image_decoder": _image_decoder(), "sentence_bank": nn.Module(),
                 "local_cross_attention": nn.ModuleDict({n: nn.Linear(EMBED, EMBED) for n in (
                     "query1", "key1", "value1", "query2", "key2", "value2")})}
        heads["sentence_bank"].embed = nn.Embedding(512, EMBED)
    d = torch.zeros(EMBED)
    d[11] = 1.0
    with torch.no_grad():
        # Image: uniform attention over the 7×7 grid (q, k zero), v and c identity: the pool is the average.
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            layer = getattr(atten_pool, name)
            layer.weight.copy_(torch.eye(2048) if name in ("v_proj", "c_proj") else torch.zeros(2048, 2048))
            layer.bias.zero_()
        atten_pool.positional_embedding.zero_()
        feature = encoder(grey)[0]
        project = heads["global_image_projection"]
        project.weight.copy_(torch.outer(d, feature))
        project.bias.copy_(-float(feature @ feature) * d)  # threshold at brightness 1
        # Text: the mean projected token (after [CLS], mask 1) is +/- d; the bank maps it to +/- 30 d; the
        # sentence pool over one sentence returns c_proj(v_proj(x)) = x.
        tokens = AutoTokenizer.from_pretrained(text_dir)(["effusion", "no effusion"], padding="max_length",
                                                         max_length=256, return_tensors="pt")
        hidden = text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        mask = tokens["attention_mask"][:, 1:-1, None].float()
        means = (hidden[:, 1:-1] * mask).sum(1) / mask.sum(1)
        w, t = separating(means[0], means[1])
        scale = 1.0 / min(float(means[0] @ w - t), float(t - means[1] @ w))
        heads["local_text_projection"].weight.copy_(scale * torch.outer(d, w))
        heads["local_text_projection"].bias.copy_(-scale * t * d)
        bank = heads["sentence_bank"].embed.weight
        bank.zero_()
        bank[0], bank[1] = 30 * d, -30 * d
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            layer = getattr(heads["global_text_attention"], name)
            layer.weight.copy_(torch.eye(EMBED))
            layer.bias.zero_()
    state = {f"text_encoder.encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    state.update({f"image_encoder.encoder.{k}": v for k, v in encoder.state_dict().items()})
    state.update({f"image_encoder.atten_pool.{k}": v for k, v in atten_pool.state_dict().items()})
    for name, module in heads.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    state.update({"prototype_queries": torch.randn(1, 16, EMBED), "logit_scale": torch.tensor(4.6),
                  "local_logit_scale": torch.tensor(4.6)})
    return state


@pytest.fixture(scope="module")
def files(full_state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    encoder = {k[len("image_encoder.encoder."):]: v for k, v in full_state.items()
               if k.startswith("image_encoder.encoder.")}
    torch.save(encoder, folder / "prior_resnet50.pt")
    torch.save(full_state, folder / "prior_full.pt")
    return folder / "prior_resnet50.pt", folder / "prior_full.pt"


@pytest.fixture(scope="module")
def text_adapter(files, text_dir):
    return build_adapter("prior", files[1], text_encoder=str(text_dir))


def test_published_files_have_the_pinned_keys(full_state, files):
    assert tuple(full_state["image_encoder.encoder.conv1.weight"].shape) == (64, 1, 7, 7)
    assert tuple(full_state["image_encoder.atten_pool.positional_embedding"].shape) == (50, 2048)
    assert tuple(full_state["global_image_projection.weight"].shape) == (EMBED, 2048)
    assert tuple(full_state["sentence_bank.embed.weight"].shape) == (512, EMBED)
    assert "global_text_attention.positional_embedding" not in full_state  # pos_embed=False, prior.py:30
    encoder = torch.load(files[0], weights_only=True)
    assert len(encoder) == N_ENCODER and not any(k.startswith("fc.") for k in encoder)


def test_image_encoder_file_loads(files):
    adapter = build_adapter("prior", files[0])
    assert adapter.report.ok and adapter.report.layout == "image_encoder"
    assert len(adapter.report.mapped) == N_ENCODER and adapter.capabilities == {"features"}
    assert adapter.in_channels == 1 and adapter.mean == (0.4755,) * 3 and adapter.std == (0.3011,) * 3


def test_full_file_loads_with_every_key_accounted(files, full_state, text_adapter):
    adapter = build_adapter("prior", files[1])
    report = adapter.report
    assert report.ok and report.layout == "full" and len(report.mapped) == N_ENCODER + N_POOL + 2
    text_keys = [k for k in full_state if k.startswith(("text_encoder.", "local_text_projection.", "sentence_bank.",
                                                        "global_text_attention."))]
    assert sorted(report.ignored[TEXT_SIDE_REASON]) == sorted(text_keys)
    for _, reason in IGNORED_PARTS:
        assert report.ignored[reason]
    assert sum(map(len, report.ignored.values())) + len(report.mapped) == len(full_state)
    assert adapter.capabilities == {"features", "embed_image"}
    n_bert = sum(k.startswith("text_encoder.") for k in full_state)
    assert len(text_adapter.report.mapped) == N_ENCODER + N_POOL + 2 + n_bert + 2 + 1 + 8
    assert "input_conversion" in text_adapter.describe()


def test_a_renamed_key_is_named_in_the_error(full_state, tmp_path):
    state = dict(full_state)
    state["image_encoder.atten_pool.c_projection.weight"] = state.pop("image_encoder.atten_pool.c_proj.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError) as error:
        build_adapter("prior", tmp_path / "renamed.pt")
    assert "missing: 1 keys\n  - image_encoder.atten_pool.c_proj.weight" in str(error.value)
    assert "unexpected: 1 keys\n  - image_encoder.atten_pool.c_projection.weight" in str(error.value)


def test_a_three_channel_resnet_is_refused(tmp_path):
    torch.save({k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")},
               tmp_path / "rgb.pt")
    with pytest.raises(CheckpointError, match=r"conv1.weight: expected shape \(64, 1, 7, 7\), found \(64, 3, 7, 7\)"):
        build_adapter("prior", tmp_path / "rgb.pt")


def test_encoder_takes_three_channels_and_runs_the_one_channel_network(text_adapter, full_state, grey):
    encoder = text_adapter.encoder().eval()
    assert isinstance(encoder, GreyInputEncoder) and encoder.encoder.conv1.in_channels == 1
    assert tuple(encoder.out_channels) == (3, 64, 256, 512, 1024, 2048) and encoder.output_stride == 32
    reference = _resnet50_224().eval()
    reference.load_state_dict({k[len("image_encoder.encoder."):]: v for k, v in full_state.items()
                               if k.startswith("image_encoder.encoder.")})
    small = grey[..., :64, :64]
    features = encoder(small.expand(-1, 3, -1, -1))
    assert [f.shape[1] for f in features] == [3, 64, 256, 512, 1024, 2048]
    with torch.no_grad():
        layer4 = nn.Sequential(*list(reference.children())[:-2])(small)
    assert torch.allclose(features[-1], layer4, atol=1e-4)


def test_embeddings_have_the_declared_shapes(text_adapter, grey):
    image = text_adapter.embed_image(grey.expand(2, 3, -1, -1))
    text = text_adapter.embed_text(["effusion", "no effusion", "small left effusion"])
    assert image.shape == (2, EMBED) and text.shape == (3, EMBED)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_zero_shot_beats_chance_on_the_aligned_model(text_adapter, grey):
    images = BRIGHTNESS.view(-1, 1, 1, 1) * grey.expand(-1, 3, -1, -1)
    scores = text_adapter.zero_shot_scores(images, ["effusion"])[:, 0]
    bright = BRIGHTNESS > 1
    assert torch.allclose(scores[bright], torch.full((2,), 0.8808), atol=1e-2)
    assert torch.allclose(scores[~bright], torch.full((2,), 0.1192), atol=1e-2)


# --- end to end from the CLI: the one-channel encoder on the protocols' three-channel input -----------------------

def _cli(task: str, checkpoint, data_root, results, *overrides: str, frac: str = "1.0") -> dict:
    argv = ["-q", "run", "--model", "prior", "--checkpoint", str(checkpoint), "--task", task, "--frac", frac,
            "--data-root", str(data_root), "--results", str(results), "--device", "cpu"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
    (path,) = results.glob(f"runs/**/{task}.v1/*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=40, size=64, progress=False)
    return root


def test_siim_seg_runs_from_the_cli(files, siim_root, tmp_path):
    # 10 % of the shared synthetic SIIM at 32 px: a ResNet-50 U-Net epoch on CPU is otherwise minutes.
    record = _cli("siim_seg", files[0], siim_root, tmp_path, "image_size=32", "max_epochs=1", "batch_size=8",
                  "balance_negatives=false", "bootstrap_resamples=20", frac="0.1")
    assert 0.0 <= record["metrics"]["dice"] <= 1.0
    assert record["model"]["adapter"] == "prior" and "input_conversion" in record["model"]


def test_rsna_det_runs_from_the_cli(files, rsna_root, tmp_path):
    record = _cli("rsna_det", files[0], rsna_root, tmp_path, "image_size=64", "max_epochs=1", "neck_width=32",
                  "batch_size=8", "bootstrap_resamples=20")
    assert 0.0 <= record["metrics"]["map"] <= 1.0


def test_rsna_linear_probe_runs_from_the_cli(files, rsna_root, tmp_path):
    record = _cli("rsna_cls", files[0], rsna_root, tmp_path, "resize_size=64", "image_size=56", "max_epochs=2",
                  "bootstrap_resamples=20")
    assert 0.0 <= record["metrics"]["auc"] <= 1.0
