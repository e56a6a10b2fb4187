"""Lightning 1.1 / omegaconf 2.0 checkpoint containers: read as inert data, written exactly, payloads refused."""

from __future__ import annotations

import builtins
import io
import os
import pickletools
import subprocess
import sys
import textwrap
import types
import zipfile

import pytest
import torch

from vlpbench.adapters.base import load_state_dict_file, save_checkpoint
from vlpbench.adapters.containers import (
    EARLY_STOPPING,
    MODEL_CHECKPOINT,
    EarlyStoppingClass,
    GlobalName,
    ModelCheckpointClass,
    OmegaConfDict,
    dict_config,
)
from vlpbench.errors import CheckpointError
from vlpbench.testing import lightning_1_1_checkpoint

# pickle.dumps(OmegaConf.create({"phase": "pretrain", "model": {"norm": False, "temp1": 4.0}}), protocol=2) under
# omegaconf 2.0.5 (GLoRIA requirements.txt pins omegaconf==2.0.5; torch.save's default protocol is 2), recorded in a
# throwaway environment: 739 bytes.
OMEGACONF_2_0_5_PICKLE = bytes.fromhex(textwrap.dedent("""
    8002636f6d656761636f6e662e64696374636f6e6669670a44696374436f6e6669670a7100298171017d7102285809000000
    5f6d657461646174617103636f6d656761636f6e662e626173650a436f6e7461696e65724d657461646174610a7104298171
    057d71062858080000007265665f747970657107635f5f6275696c74696e5f5f0a646963740a7108580b0000006f626a6563
    745f7479706571094e58080000006f7074696f6e616c710a8858030000006b6579710b4e5805000000666c616773710c7d71
    0d580e0000007265736f6c7665725f6361636865710e63636f6c6c656374696f6e730a64656661756c74646963740a710f68
    0885711052711158080000006b65795f7479706571124e580c000000656c656d656e745f7479706571134e75625807000000
    5f706172656e7471144e58080000005f636f6e74656e7471157d711628580500000070686173657117636f6d656761636f6e
    662e6e6f6465730a416e794e6f64650a7118298171197d711a286803636f6d656761636f6e662e626173650a4d6574616461
    74610a711b2981711c7d711d28680763747970696e670a416e790a711e68094e680a88680b6817680c7d711f680e680f6808
    85712052712175626814680158040000005f76616c71225808000000707265747261696e7123756258050000006d6f64656c
    71246800298171257d71262868036804298171277d7128286807681e68094e680a88680b6824680c7d7129680e680f680885
    712a52712b68124e68134e75626814680168157d712c2858040000006e6f726d712d68182981712e7d712f286803681b2981
    71307d7131286807681e68094e680a88680b682d680c7d7132680e680f680885713352713475626814682568228975625805
    00000074656d703171356818298171367d7137286803681b298171387d7139286807681e68094e680a88680b6835680c7d71
    3a680e680f680885713b52713c756268146825682247401000000000000075627575627575622e
""").replace("\n", ""))
# The non-torch globals of GLoRIA's pretraining checkpoint container: Lightning 1.1.4 dump_checkpoint around
# OmegaConf.load(configs/chexpert_pretrain_config.yaml) as run.py mutates it, pickled at protocol 2 with omegaconf
# 2.0.5 and the two callback classes (recorded with pickletools in the same throwaway environment).
GLORIA_CONTAINER_GLOBALS = {
    "omegaconf.dictconfig DictConfig", "omegaconf.base ContainerMetadata", "omegaconf.base Metadata",
    "omegaconf.nodes AnyNode", "collections defaultdict", "__builtin__ dict", "typing Any",
    "pytorch_lightning.callbacks.model_checkpoint ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping EarlyStopping",
}
# The opcodes of that pickle besides those of plain containers and torch's tensor records.
OMEGACONF_OPCODES = {"NEWOBJ", "BUILD", "REDUCE", "EMPTY_TUPLE", "TUPLE1"}
HYPER_PARAMETERS = {"phase": "pretrain", "model": {"norm": False, "vision": {"model_name": "resnet_50"}},
                    "lr": 5e-05, "trial_name": None, "output_dir": "${lr}"}


def _pickle_bytes(path):
    """The pickle inside a torch.save zip file."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def _globals_and_opcodes(data):
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    return {arg for name, arg in ops if name == "GLOBAL"}, {name for name, _ in ops}


@pytest.fixture(scope="module")
def container_file(tmp_path_factory):
    state = {"gloria.img_encoder.local_embedder.weight": torch.ones(4, 8, 1, 1)}
    return save_checkpoint(lightning_1_1_checkpoint(state, HYPER_PARAMETERS),
                           tmp_path_factory.mktemp("pl11") / "chexpert_resnet50.ckpt")


def test_written_dict_config_is_byte_identical_to_omegaconf_2_0_5(tmp_path):
    path = save_checkpoint(dict_config({"phase": "pretrain", "model": {"norm": False, "temp1": 4.0}}),
                           tmp_path / "config.ckpt")
    assert _pickle_bytes(path) == OMEGACONF_2_0_5_PICKLE


def test_written_container_uses_the_globals_of_the_real_one(container_file):
    found, opcodes = _globals_and_opcodes(_pickle_bytes(container_file))
    torch_globals = {g for g in found if g.startswith("torch") or g == "collections OrderedDict"}
    assert found - torch_globals == GLORIA_CONTAINER_GLOBALS
    assert OMEGACONF_OPCODES <= opcodes


def test_real_omegaconf_pickle_loads_as_plain_data():
    from torch._weights_only_unpickler import Unpickler

    from vlpbench.adapters import base

    with torch.serialization.safe_globals(list(base._SAFE_GLOBALS)):
        config = Unpickler(io.BytesIO(OMEGACONF_2_0_5_PICKLE)).load()
    assert type(config) is OmegaConfDict
    assert config == {"phase": "pretrain", "model": {"norm": False, "temp1": 4.0}}
    assert type(config["model"]) is OmegaConfDict


def test_lightning_1_1_container_loads_as_inert_data(container_file):
    allowed_before = set(torch.serialization.get_safe_globals())
    obj, _ = load_state_dict_file(container_file)
    hparams = obj["hyper_parameters"]
    assert isinstance(hparams, dict) and hparams == HYPER_PARAMETERS  # interpolations stay strings
    assert obj["hparams_type"] is OmegaConfDict and obj["hparams_name"] == "cfg"
    assert set(obj["callbacks"]) == {GlobalName(MODEL_CHECKPOINT), GlobalName(EARLY_STOPPING)}
    assert torch.equal(obj["callbacks"][GlobalName(MODEL_CHECKPOINT)]["best_model_score"], torch.tensor(1.25))
    assert obj["callbacks"][GlobalName(EARLY_STOPPING)]["patience"] == 10
    assert torch.equal(obj["state_dict"]["gloria.img_encoder.local_embedder.weight"], torch.ones(4, 8, 1, 1))
    assert obj["lr_schedulers"][0]["mode_worse"] == float("inf")
    assert "pytorch_lightning" not in sys.modules and "omegaconf" not in sys.modules
    # The allow-list was scoped to the call.
    assert set(torch.serialization.get_safe_globals()) == allowed_before


class _Payload:
    """Unpickling this calls ``call(*args)``; each variant creates the marker file when run."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker):
    return {
        "os.system": _Payload(os.system, (f"touch '{marker}'",)),
        "builtins.exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.call": _Payload(subprocess.call, (["touch", str(marker)],)),
    }


def _payload_container(form, payload):
    """A Lightning 1.1 checkpoint with ``payload`` inside one of the new container forms."""
    checkpoint = lightning_1_1_checkpoint({"w": torch.zeros(1)}, {"model": {"norm": False}})
    if form == "callbacks":
        checkpoint["callbacks"] = {ModelCheckpointClass: {"best_model_path": payload},
                                   EarlyStoppingClass: {"best_score": torch.zeros(())}}
    else:
        checkpoint["hyper_parameters"] = dict_config({"model": {"norm": False, "vision": payload}})
    return checkpoint


@pytest.mark.parametrize("form", ["callbacks", "dict_config"])
@pytest.mark.parametrize("call", ["os.system", "builtins.exec", "subprocess.call"])
def test_payload_in_a_lightning_1_1_container_is_refused_and_not_run(tmp_path, form, call):
    marker = tmp_path / "pwned"
    path = save_checkpoint(_payload_container(form, _payloads(marker)[call]), tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused") as info:
        load_state_dict_file(path)
    assert f"{call.split('.')[-1]} while unpickling" in str(info.value)
    assert not marker.exists()


# What the payload files name besides the payloads: replaced by empty classes for the unsafe control load.
_NAMED_CLASSES = ("omegaconf.dictconfig.DictConfig", "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
                  "omegaconf.nodes.AnyNode", MODEL_CHECKPOINT, EARLY_STOPPING)


@pytest.mark.parametrize("form", ["callbacks", "dict_config"])
def test_payload_files_are_live_when_unpickled_unsafely(tmp_path, monkeypatch, form):
    # Control for the test above: the same files do run their payload under full unpickling.
    marker = tmp_path / "control"
    path = save_checkpoint(_payload_container(form, _payloads(marker)["os.system"]), tmp_path / "evil.ckpt")
    for name in _NAMED_CLASSES:
        parts = name.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) not in sys.modules:
                monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        monkeypatch.setattr(sys.modules[".".join(parts[:-1])], parts[-1], type(parts[-1], (), {}), raising=False)
    torch.load(path, weights_only=False)
    assert marker.exists()
