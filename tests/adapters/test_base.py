"""The adapter contract: safe file loading, key accounting, options, the registry helpers."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from vlpbench.adapters import build_adapter, get_adapter
from vlpbench.adapters.base import (
    WRAPPER_REASON,
    Adapter,
    LoadReport,
    encoder_shapes,
    load_state_dict_file,
    match_resnet50_encoder,
    resnet50_encoder_shapes,
    unet_decoder_shapes,
    unwrap_state_dict,
)
from vlpbench.adapters.g2d import G2DAdapter
from vlpbench.adapters.resnet import RandomResNet50, TorchvisionResNet50
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.registry import ADAPTERS


@pytest.fixture(scope="module")
def random_adapter() -> RandomResNet50:
    """A seeded random-init adapter, built once."""
    return RandomResNet50(seed=0)


@pytest.fixture(scope="module")
def encoder_state(random_adapter: RandomResNet50) -> dict[str, torch.Tensor]:
    """A complete smp ResNet-50 encoder state dict (318 keys)."""
    return random_adapter.encoder().state_dict()


class _OpensMarker:
    """Unpickling this calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _RunsShell:
    """Unpickling this runs ``touch marker`` through ``os.system``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --- expected layouts ---------------------------------------------------------------------------------


def test_expected_resnet50_and_unet_decoder_layouts():
    encoder = resnet50_encoder_shapes()
    assert len(encoder) == 318
    assert not any(k.startswith("fc.") for k in encoder)
    assert encoder["conv1.weight"] == (64, 3, 7, 7)
    assert encoder["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert encoder["bn1.num_batches_tracked"] == ()
    decoder = unet_decoder_shapes()
    assert len(decoder) == 62  # 380 U-Net keys minus the 318 encoder keys
    assert decoder["decoder.blocks.0.conv1.0.weight"] == (256, 3072, 3, 3)
    assert decoder["decoder.blocks.4.conv2.0.weight"] == (16, 16, 3, 3)
    assert decoder["segmentation_head.0.weight"] == (1, 16, 3, 3)
    assert decoder["segmentation_head.0.bias"] == (1,)


# --- load_state_dict_file -----------------------------------------------------------------------------


def test_torch_file_loads_with_sha256_of_its_bytes(tmp_path):
    path = tmp_path / "small.pth"
    state = {"w": torch.arange(12.0).reshape(3, 4), "n": torch.tensor(5)}
    torch.save(state, path)
    loaded, sha256 = load_state_dict_file(path)
    assert set(loaded) == {"w", "n"}
    assert torch.equal(loaded["w"], state["w"]) and loaded["n"].item() == 5
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_file_loads_and_feeds_an_adapter(tmp_path, encoder_state):
    path = tmp_path / "g2d_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder_state.items()}, str(path))
    loaded, sha256 = load_state_dict_file(path)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(loaded) == set(encoder_state)
    assert torch.equal(loaded["layer3.4.conv2.weight"], encoder_state["layer3.4.conv2.weight"])
    adapter = G2DAdapter(path)
    assert adapter.report.ok and adapter.report.layout == "encoder"
    assert adapter.checkpoint_sha256 == sha256


@pytest.mark.parametrize("payload_cls", [_OpensMarker, _RunsShell])
@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload_cls, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = payload_cls(str(marker))
    if container == "torch.save":
        torch.save({"state_dict": payload, "conv1.weight": torch.zeros(1)}, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "refused" in message and "execute code" in message and "not run" in message
    assert ("open while unpickling" in message) or ("system while unpickling" in message)
    assert "weights_only=False" not in message  # torch's retry advice is not passed on
    assert not marker.exists()

    # The adapters go through the same gate, including inspect().
    for call in (lambda: build_adapter("g2d", path), lambda: G2DAdapter.inspect(path),
                 lambda: TorchvisionResNet50(path)):
        with pytest.raises(CheckpointError, match="refused"):
            call()
    assert not marker.exists()


def test_malicious_payload_is_live_when_unpickled_unsafely(tmp_path):
    # Control for the test above: the same kind of file really does run code without weights_only.
    marker = tmp_path / "control"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _OpensMarker(str(marker))}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _truncated_torch(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"w": torch.randn(256, 256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_legacy(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_safetensors(tmp_path):
    path = tmp_path / "truncated.safetensors"
    save_file({"w": torch.randn(256, 256)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    return path


def _garbage(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n")
    return path


@pytest.mark.parametrize("make", [_truncated_torch, _truncated_legacy, _truncated_safetensors, _empty, _garbage])
def test_damaged_file_names_the_file(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)
    assert "refused" not in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "g2d_encoder.pth"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        G2DAdapter.inspect(path)


# --- LoadReport ---------------------------------------------------------------------------------------


def test_load_report_accounting_format_and_summary():
    report = LoadReport("encoder")
    assert report.ok
    report.mapped += [("conv1.weight", "encoder.conv1.weight"), ("bn1.weight", "encoder.bn1.weight")]
    report.ignore("text side", ["lm_model.a", "proj_v.b", "lm_model.c"])
    report.ignore("unused", [])
    report.missing += [f"layer1.{i}.conv1.weight" for i in range(7)]
    report.unexpected.append("module.res_features.0.weight")
    report.mismatched.append(("conv1.weight", (64, 3, 7, 7), (64, 1, 7, 7)))
    assert not report.ok
    assert report.ignored == {"text side": ["lm_model.a", "proj_v.b", "lm_model.c"]}

    summary = json.loads(json.dumps(report.summary()))
    assert summary["layout"] == "encoder" and summary["ok"] is False
    assert summary["mapped"] == 2
    assert summary["ignored"] == {"text side": 3}
    assert summary["missing"] == {"count": 7, "first": [f"layer1.{i}.conv1.weight" for i in range(5)]}
    assert summary["unexpected"] == {"count": 1, "first": ["module.res_features.0.weight"]}
    assert summary["mismatched"] == {"count": 1, "first": [["conv1.weight", [64, 3, 7, 7], [64, 1, 7, 7]]]}

    text = report.format()
    assert "layout: encoder" in text and "mapped: 2 keys" in text
    assert "3 keys (lm_model, proj_v): text side" in text
    for i in range(7):  # every key is listed, not only the first few
        assert f"  - layer1.{i}.conv1.weight" in text
    assert "  - module.res_features.0.weight" in text
    assert "conv1.weight: expected shape (64, 3, 7, 7), found (64, 1, 7, 7)" in text


def test_match_resnet50_encoder_accounts_every_key(encoder_state):
    report = LoadReport("test")
    matched = match_resnet50_encoder(encoder_state, report)
    assert report.ok and len(report.mapped) == 318 and set(matched) == set(encoder_state)
    assert report.mapped[0] == ("conv1.weight", "encoder.conv1.weight")

    found = {k: v for k, v in encoder_state.items() if k != "layer2.3.bn2.bias"}
    found["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    found["bn1.running_mean"] = 0.5  # not a tensor
    found["fc.weight"] = torch.zeros(1000, 2048)
    report = LoadReport("test")
    matched = match_resnet50_encoder(found, report, source_prefix="img_encoder_q.model.")
    assert report.missing == ["img_encoder_q.model.bn1.running_mean", "img_encoder_q.model.layer2.3.bn2.bias"]
    assert report.unexpected == ["img_encoder_q.model.bn1.running_mean", "img_encoder_q.model.fc.weight"]
    assert report.mismatched == [("img_encoder_q.model.conv1.weight", (64, 3, 7, 7), (64, 1, 7, 7))]
    assert len(report.mapped) == len(matched) == 315
    assert ("img_encoder_q.model.layer4.2.conv3.weight", "encoder.layer4.2.conv3.weight") in report.mapped


# --- Adapter behaviour --------------------------------------------------------------------------------


def test_encoder_is_new_each_call_and_isolated_from_the_adapter(random_adapter):
    first = random_adapter.encoder()
    assert tuple(first.out_channels) == (3, 64, 256, 512, 1024, 2048)
    with torch.no_grad():
        first.conv1.weight.zero_()
    second = random_adapter.encoder()
    assert second is not first
    assert second.conv1.weight.abs().sum() > 0


def test_encoder_does_not_touch_the_global_rng(random_adapter):
    state = torch.get_rng_state()
    random_adapter.encoder()
    assert torch.equal(torch.get_rng_state(), state)


def test_options_are_checked_and_coerced():
    with pytest.raises(ConfigError, match="colour"):
        RandomResNet50(colour=1)
    with pytest.raises(ConfigError, match="seed"):
        RandomResNet50(seed="three")
    with pytest.raises(ConfigError, match="seed"):
        RandomResNet50(seed=True)
    with pytest.raises(ConfigError, match="no option"):
        G2DAdapter.inspect("unused.pth", seed=1)
    assert RandomResNet50.inspect(seed="3").layout == "random-init"


def test_describe_is_json_able(random_adapter):
    record = json.loads(json.dumps(random_adapter.describe()))
    assert record["adapter"] == "random" and record["checkpoint"] is None
    assert record["layout"] == "random-init" and record["options"] == {"seed": 0}
    assert record["load_report"]["mapped"] == 318 and record["load_report"]["ok"] is True


def test_registry_helpers():
    assert {"g2d", "random", "resnet50"} <= set(ADAPTERS.names())
    assert get_adapter("g2d") is G2DAdapter
    assert get_adapter("resnet50") is TorchvisionResNet50
    adapter = build_adapter("random", seed=4)
    assert isinstance(adapter, RandomResNet50) and adapter.options == {"seed": 4}
    for name in ("g2d", "random", "resnet50"):
        cls = get_adapter(name)
        assert cls.name == name and "features" in cls.capabilities and cls.description
        assert len(cls.mean) == len(cls.std) == 3 and cls.image_size > 0


def test_listing_adapters_imports_no_torch():
    code = "import sys, vlpbench.adapters as a; print(sorted(a.ADAPTERS.names()), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['clip', 'cxrclip', 'g2d', 'generic', 'medclip', 'medklip', 'mgca', 'random', 'resnet50'] False"


# --- Lightning checkpoints and unwrapping -------------------------------------------------------------

LIGHTNING_PATHS = ["pytorch_lightning.utilities.parsing", "lightning_fabric.utilities.data",
                   "lightning.fabric.utilities.data"]


def _fake_class(monkeypatch, module_path: str, name: str, base: type = object) -> type:
    """A class pickle records as ``module_path.name``: fake modules are put in ``sys.modules`` for saving."""
    parts = module_path.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (base,), {"__module__": module_path, "__qualname__": name})
    setattr(sys.modules[module_path], name, cls)
    return cls


@pytest.mark.parametrize("module_path", [*LIGHTNING_PATHS, "argparse"])
def test_lightning_hyper_parameter_containers_load_without_lightning(tmp_path, monkeypatch, module_path):
    path = tmp_path / "last.ckpt"
    with monkeypatch.context() as patch:
        if module_path == "argparse":
            import argparse

            hparams = argparse.Namespace(img_encoder="resnet_50", emb_dim=128)
        else:
            attribute_dict = _fake_class(patch, module_path, "AttributeDict", dict)
            hparams = attribute_dict(img_encoder="resnet_50", emb_dim=128)
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": hparams, "epoch": 4}, path)
    assert not any(m.split(".")[0] in ("pytorch_lightning", "lightning_fabric", "lightning") for m in sys.modules)
    allowed_before = set(torch.serialization.get_safe_globals())

    loaded, _ = load_state_dict_file(path)
    hparams = loaded["hyper_parameters"]
    if module_path == "argparse":
        assert isinstance(hparams, types.SimpleNamespace) and vars(hparams) == {"img_encoder": "resnet_50",
                                                                                 "emb_dim": 128}
    else:
        assert type(hparams) is dict and hparams == {"img_encoder": "resnet_50", "emb_dim": 128}
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["epoch"] == 4
    # The allow-list was scoped to the call: nothing stays registered, and plain loads still refuse it.
    assert set(torch.serialization.get_safe_globals()) == allowed_before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_other_classes_in_a_lightning_checkpoint_are_refused_and_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    with monkeypatch.context() as patch:
        attribute_dict = _fake_class(patch, LIGHTNING_PATHS[0], "AttributeDict", dict)
        callback = _fake_class(patch, "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
        hparams = attribute_dict(img_encoder="resnet_50")
        plain = tmp_path / "callback.ckpt"
        torch.save({"state_dict": {}, "hyper_parameters": hparams, "callbacks": {callback: {"x": 1}}}, plain)
        evil = tmp_path / "evil.ckpt"
        torch.save({"state_dict": {}, "hyper_parameters": hparams, "loops": _RunsShell(str(marker))}, evil)

    with pytest.raises(CheckpointError, match="refused.*pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"):
        load_state_dict_file(plain)
    with pytest.raises(CheckpointError, match="refused.*system while unpickling"):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_unwrap_state_dict_takes_containers_and_strips_prefixes():
    tensors = {"conv1.weight": torch.zeros(1), "bn1.bias": torch.zeros(1)}
    checkpoint = {"epoch": 1, "hyper_parameters": {"lr": 0.1},
                  "state_dict": {f"module._orig_mod.{k}": v for k, v in tensors.items()}}
    report = LoadReport("demo")
    state, prefix = unwrap_state_dict(checkpoint, report)
    assert state == tensors and prefix == "module._orig_mod."
    assert report.layout == "demo (unwrapped 'state_dict', stripped 'module.', stripped '_orig_mod.')"
    assert report.ignored == {WRAPPER_REASON: ["epoch", "hyper_parameters"]}

    report = LoadReport("demo")
    assert unwrap_state_dict(tensors, report) == (tensors, "") and report.layout == "demo" and not report.ignored
    with pytest.raises(CheckpointError, match="a demo file is a dict of tensors; this file holds a list"):
        unwrap_state_dict([torch.zeros(1)], LoadReport("x"), what="a demo file")


def test_encoder_shapes_per_name_and_checkpoint_forms_everywhere():
    assert encoder_shapes("resnet50") is resnet50_encoder_shapes()  # cached
    assert len(encoder_shapes("resnet18")) == 120 and encoder_shapes("resnet18")["layer4.1.conv2.weight"] == (
        512, 512, 3, 3)
    assert Adapter.encoder_name == "resnet50"
    for name in ("g2d", "resnet50", "random", "mgca", "generic"):
        forms = get_adapter(name).checkpoint_forms
        assert forms and all(isinstance(f, str) and f for f in forms), name
