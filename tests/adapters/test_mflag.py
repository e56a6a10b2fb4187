"""M-FLAG: {name}_encoder.pth and {name}_total.pth (the layout of BenchX's HF youngzhou12/M-FLAG) load strictly.

The files are built from M-FLAG's ``ResNet_CXRBert`` structure (cheliu-computation/M-FLAG-MICCAI2023
utils/utils_builder.py:16-42): torchvision's ResNet-50 with ``fc = nn.Identity()`` as ``encoder``, ``proj_v`` /
``proj_t`` as :24-36 define them, and a transformers ``BertModel`` with pooler as ``lm_model`` (``AutoModel`` of
CXR-BERT-general, shrunk to a tiny config); saved as utils/utils_trainer.py:172-177 saves them.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from vlpbench.adapters import build_adapter
from vlpbench.adapters.mflag import TEXT_SIDE_REASON
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.aligned import separating, set_sign_head

N_ENCODER = 318  # torchvision ResNet-50 state dict (320) without fc.weight / fc.bias
# Linear (2) + BatchNorm (5) + Linear (2) + BatchNorm without affine (3), utils_builder.py:24-36.
N_PROJ = 12
PINNED_SHAPES = {
    "encoder.conv1.weight": (64, 3, 7, 7),
    "proj_v.0.weight": (2048, 2048),
    "proj_v.3.weight": (1024, 2048),
    "proj_v.4.running_var": (1024,),
    "proj_t.0.weight": (2048, 32),
    "lm_model.pooler.dense.weight": (32, 32),
}
BRIGHTNESS = torch.tensor([0.3, 0.5, 0.7, 1.3, 1.5, 1.7])


def _projection(in_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                         nn.Linear(2048, 1024), nn.BatchNorm1d(1024, affine=False))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_tiny_bert_folder(tmp_path_factory.mktemp("cxr_bert"), hidden=32, layers=2)


@pytest.fixture(scope="module")
def base_image():
    return torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2)).expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def model_state(text_dir, base_image):
    """``ResNet_CXRBert.state_dict()`` with heads set so that bright images match 'effusion'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = torchvision.models.resnet50(weights=None)
        encoder.fc = nn.Identity()
        proj_v, proj_t = _projection(2048), _projection(32)
        lm_model = BertModel(BertConfig.from_pretrained(text_dir), add_pooling_layer=True).eval()
    d = torch.zeros(1024)
    d[7] = 1.0
    with torch.no_grad():
        feature = encoder.eval()(base_image)[0]
        tokens = AutoTokenizer.from_pretrained(text_dir)(["effusion", "no effusion"], padding=True, return_tensors="pt")
        cls = lm_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
    set_sign_head(proj_v, feature, float(feature @ feature), d)
    set_sign_head(proj_t, *separating(cls[0], cls[1]), d)
    state = {}
    for prefix, module in (("encoder.", encoder), ("proj_v.", proj_v), ("proj_t.", proj_t), ("lm_model.", lm_model)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def files(model_state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mflag")
    encoder = {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}
    torch.save(encoder, folder / "mflag_encoder.pth")
    torch.save(model_state, folder / "mflag_total.pth")
    return folder / "mflag_encoder.pth", folder / "mflag_total.pth"


@pytest.fixture(scope="module")
def text_adapter(files, text_dir):
    return build_adapter("mflag", files[1], text_encoder=str(text_dir))


def test_published_files_have_the_pinned_keys(model_state):
    assert sum(k.startswith("encoder.") for k in model_state) == N_ENCODER
    for head in ("proj_v.", "proj_t."):
        assert sum(k.startswith(head) for k in model_state) == N_PROJ
    assert {k: tuple(model_state[k].shape) for k in PINNED_SHAPES} == PINNED_SHAPES
    assert not any(k.startswith("encoder.fc") for k in model_state)


def test_encoder_file_loads_as_the_encoder_alone(files):
    adapter = build_adapter("mflag", files[0])
    assert adapter.report.ok and adapter.report.layout == "encoder" and len(adapter.report.mapped) == N_ENCODER
    assert adapter.capabilities == {"features"} and adapter.mean == adapter.std == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="needs the whole-model"):
        build_adapter("mflag", files[0], text_encoder="anything")


def test_total_file_loads_with_every_key_accounted(files, model_state):
    adapter = build_adapter("mflag", files[1])
    report = adapter.report
    assert report.ok and report.layout == "total" and len(report.mapped) == N_ENCODER + N_PROJ
    assert ("proj_v.4.running_mean", "proj_v.4.running_mean") in report.mapped
    assert sorted(report.ignored[TEXT_SIDE_REASON]) == sorted(k for k in model_state
                                                              if k.startswith(("lm_model.", "proj_t.")))
    assert adapter.capabilities == {"features", "embed_image"}


def test_text_side_maps_with_a_text_encoder(text_adapter, model_state):
    n_bert = sum(k.startswith("lm_model.") for k in model_state)
    assert text_adapter.report.ok and len(text_adapter.report.mapped) == N_ENCODER + 2 * N_PROJ + n_bert
    assert not text_adapter.report.ignored and "zero_shot" in text_adapter.capabilities


def test_a_renamed_key_is_named_in_the_error(model_state, tmp_path):
    state = dict(model_state)
    state["proj_v.3.weights"] = state.pop("proj_v.3.weight")
    torch.save(state, tmp_path / "renamed_total.pth")
    with pytest.raises(CheckpointError) as error:
        build_adapter("mflag", tmp_path / "renamed_total.pth")
    assert "missing: 1 keys\n  - proj_v.3.weight" in str(error.value)
    assert "unexpected: 1 keys\n  - proj_v.3.weights" in str(error.value)


def test_embeddings_have_the_declared_shapes(text_adapter, base_image):
    assert [f.shape[1] for f in text_adapter.encoder().eval()(base_image)] == [3, 64, 256, 512, 1024, 2048]
    assert text_adapter.embed_image(base_image.expand(2, -1, -1, -1)).shape == (2, 1024)
    text = text_adapter.embed_text(["effusion", "no effusion", "small effusion"])
    assert text.shape == (3, 1024) and torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_zero_shot_beats_chance_on_the_aligned_model(text_adapter, base_image):
    scores = text_adapter.zero_shot_scores(BRIGHTNESS.view(-1, 1, 1, 1) * base_image, ["effusion"])[:, 0]
    bright = BRIGHTNESS > 1
    # BatchNorm's epsilon shrinks the embeddings a little, never their direction: cos = ±1, softmax(1, -1).
    assert torch.allclose(scores[bright], torch.full((3,), 0.8808), atol=1e-3)
    assert torch.allclose(scores[~bright], torch.full((3,), 0.1192), atol=1e-3)
