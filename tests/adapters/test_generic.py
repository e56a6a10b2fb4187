"""The generic adapter: torchvision ResNets and timm models from local state dicts, any smp encoder."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON
from vlpbench.adapters.generic import HEAD_REASON, GenericAdapter
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.protocols.segmentation import UNet


@pytest.fixture(scope="module")
def resnet18_state():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def resnet18_file(resnet18_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("generic") / "resnet18.pth"
    torch.save(resnet18_state, path)
    return path


@pytest.fixture(scope="module")
def resnet18(resnet18_file):
    return build_adapter("generic", resnet18_file, arch="resnet18")


def _feature_channels(encoder, size=64):
    with torch.no_grad():
        return [f.shape[1] for f in encoder.eval()(torch.zeros(1, 3, size, size))]


def test_torchvision_resnet18_loads_and_gives_its_channels(resnet18, resnet18_state):
    report = resnet18.report
    assert report.ok and report.layout == "generic-resnet18" and len(report.mapped) == 120
    assert report.ignored == {HEAD_REASON: ["fc.weight", "fc.bias"]}
    assert resnet18.encoder_name == "resnet18" and GenericAdapter.encoder_name == "resnet50"
    encoder = resnet18.encoder()
    assert tuple(encoder.out_channels) == (3, 64, 64, 128, 256, 512)
    assert _feature_channels(encoder) == list(encoder.out_channels)
    state = encoder.state_dict()
    assert all(torch.equal(state[k], resnet18_state[k]) for k in state)


def test_timm_model_loads_wrapped_and_prefixed(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        timm_state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "timm_resnet18.pth"
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in timm_state.items()}, "epoch": 3}, path)
    adapter = GenericAdapter(path, arch="tu-resnet18")
    report = adapter.report
    assert report.ok and report.layout == "generic-tu-resnet18 (unwrapped 'state_dict', stripped '_orig_mod.')"
    assert report.mapped[0] == ("_orig_mod.conv1.weight", "encoder.model.conv1.weight")
    assert report.ignored == {WRAPPER_REASON: ["epoch"], HEAD_REASON: ["_orig_mod.fc.weight", "_orig_mod.fc.bias"]}
    encoder = adapter.encoder()
    assert _feature_channels(encoder) == list(encoder.out_channels) == [3, 64, 64, 128, 256, 512]
    assert torch.equal(encoder.state_dict()["model.layer3.1.conv2.weight"], timm_state["layer3.1.conv2.weight"])


def test_wrong_arch_fails_naming_keys(resnet18_file):
    with pytest.raises(CheckpointError) as info:
        GenericAdapter(resnet18_file, arch="resnet34")
    message = str(info.value)
    assert "'generic'" in message and "layer1.2.conv1.weight" in message and "layer4.2.bn2.running_var" in message
    report = GenericAdapter.inspect(resnet18_file, arch="tu-resnet18")  # timm's resnet18 names match torchvision's
    assert report.ok and len(report.mapped) == 120


def test_unknown_arch_is_a_config_error(resnet18_file):
    with pytest.raises(ConfigError, match="arch='vgg16' is not supported"):
        GenericAdapter(resnet18_file, arch="vgg16")
    with pytest.raises(ConfigError, match="unknown encoder 'tu-no_such_model'"):
        GenericAdapter(resnet18_file, arch="tu-no_such_model")


def test_segmentation_unet_takes_the_resnet18_encoder(resnet18):
    model = UNet(resnet18.encoder(), resnet18.encoder_name).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    with pytest.raises(Exception, match="do not match the resnet50 U-Net"):
        UNet(resnet18.encoder())
