"""Baseline adapters: seeded random init and torchvision ResNet-50 state dicts."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from vlpbench.adapters import build_adapter
from vlpbench.adapters.resnet import FC_REASON, WRAPPER_REASON, RandomResNet50, TorchvisionResNet50
from vlpbench.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    """``torchvision.models.resnet50()`` state dict (320 keys) built right after ``manual_seed(7)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return torchvision.models.resnet50(weights=None).state_dict()


@pytest.fixture(scope="module")
def tv_file(tv_state, tmp_path_factory):
    """The torchvision state dict saved as a plain ``.pth``."""
    path = tmp_path_factory.mktemp("tv") / "resnet50-imagenet.pth"
    torch.save(tv_state, path)
    return path


# --- random -------------------------------------------------------------------------------------------


def test_random_is_torchvision_default_init_for_its_seed(tv_state):
    adapter = RandomResNet50(seed=7)
    assert adapter.report.ok and adapter.report.layout == "random-init" and len(adapter.report.mapped) == 318
    state = adapter.encoder().state_dict()
    assert set(state) == set(tv_state) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(state[k], tv_state[k]) for k in state)


def test_random_differs_across_seeds_and_repeats_per_seed():
    a, b, c = (RandomResNet50(seed=s).encoder().state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert not torch.equal(a["layer4.2.conv3.weight"], c["layer4.2.conv3.weight"])


def test_random_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    adapter = build_adapter("random", seed=5)
    adapter.encoder()
    assert torch.equal(torch.get_rng_state(), state)


def test_random_takes_no_checkpoint(tv_file):
    with pytest.raises(ConfigError, match="takes no checkpoint"):
        RandomResNet50(tv_file)
    adapter = RandomResNet50(seed=3)
    assert adapter.checkpoint_path is None and adapter.checkpoint_sha256 is None
    assert adapter.describe()["checkpoint"] is None and adapter.describe()["options"] == {"seed": 3}
    assert adapter.decoder_state_dict() is None


# --- torchvision state dicts --------------------------------------------------------------------------


def test_plain_torchvision_state_dict_loads_with_fc_ignored(tv_state, tv_file):
    assert len(tv_state) == 320 and tuple(tv_state["fc.weight"].shape) == (1000, 2048)
    adapter = TorchvisionResNet50(tv_file)
    report = adapter.report
    assert report.ok and report.layout == "torchvision-resnet50"
    assert len(report.mapped) == 318
    assert report.ignored == {FC_REASON: ["fc.weight", "fc.bias"]}
    state = adapter.encoder().state_dict()
    assert all(torch.equal(state[k], tv_state[k]) for k in state)

    record = adapter.describe()
    assert record["adapter"] == "resnet50" and record["layout"] == "torchvision-resnet50"
    assert record["checkpoint"] == {"path": str(tv_file),
                                    "sha256": hashlib.sha256(tv_file.read_bytes()).hexdigest()}
    assert record["load_report"]["ignored"] == {FC_REASON: 2}


def _prefixed(state):
    return {f"module.{k}": v for k, v in state.items()}


VARIANTS = {
    "state_dict": (lambda s: {"state_dict": s}, "torchvision-resnet50 (unwrapped 'state_dict')"),
    "model": (lambda s: {"model": s}, "torchvision-resnet50 (unwrapped 'model')"),
    "module": (_prefixed, "torchvision-resnet50 (stripped 'module.')"),
    "training": (
        lambda s: {"epoch": 90, "state_dict": _prefixed(s), "optimizer": {"state": {}, "param_groups": []}},
        "torchvision-resnet50 (unwrapped 'state_dict', stripped 'module.')",
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wrapped_and_prefixed_variants_load(tmp_path, tv_state, variant):
    wrap, layout = VARIANTS[variant]
    path = tmp_path / "resnet50.pth"
    torch.save(wrap(tv_state), path)
    adapter = build_adapter("resnet50", path)
    report = adapter.report
    assert report.ok and report.layout == layout and len(report.mapped) == 318
    prefix = "module." if variant in ("module", "training") else ""
    assert report.mapped[0] == (f"{prefix}conv1.weight", "encoder.conv1.weight")
    assert report.ignored[FC_REASON] == [f"{prefix}fc.weight", f"{prefix}fc.bias"]
    if variant == "training":
        assert report.ignored[WRAPPER_REASON] == ["epoch", "optimizer"]
    state = adapter.encoder().state_dict()
    for key in ("conv1.weight", "layer2.1.bn2.running_mean", "layer4.2.conv3.weight"):
        assert torch.equal(state[key], tv_state[key]), key


def test_mgca_style_keys_are_rejected(tmp_path, tv_state):
    state = {f"img_encoder_q.model.{k}": v for k, v in tv_state.items() if not k.startswith("fc.")}
    path = tmp_path / "resnet_50.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        TorchvisionResNet50(path)
    assert "img_encoder_q.model.conv1.weight" in str(info.value) and "layer4.2.bn3.bias" in str(info.value)
    report = TorchvisionResNet50.inspect(path)
    assert report.layout == "torchvision-resnet50 (unwrapped 'state_dict')"
    assert len(report.unexpected) == 318 and len(report.missing) == 318 and not report.mapped


def test_partial_module_prefix_is_not_stripped(tmp_path, tv_state):
    state = dict(tv_state)
    state["module.conv1.weight"] = state.pop("conv1.weight")
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    report = TorchvisionResNet50.inspect(path)
    assert report.layout == "torchvision-resnet50"
    assert report.missing == ["conv1.weight"] and report.unexpected == ["module.conv1.weight"]


def test_resnet50_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        build_adapter("resnet50")
