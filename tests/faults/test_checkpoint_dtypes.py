"""Issue 17 item 5: a checkpoint tensor of the wrong dtype kind is refused, naming the key, what the model
holds there and what the file holds (``load_state_dict`` would cast it silently: an int32 conv weight
becomes numbers near 1e9)."""

import json
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import LoadReport, TensorSpec, match_keys
from vlpbench.cli import main
from vlpbench.errors import CheckpointError


def _relabel(path: Path, key: str, dtype: str) -> None:
    """Rewrite the safetensors header so ``key`` claims ``dtype`` (of the same width: the data is untouched)."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    path.write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dtype") / "resnet18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(path))
    return path


@pytest.mark.parametrize("key, dtype, expected, found", [
    ("conv1.weight", "I32", "floating point", "int32"),  # the case: same byte size, loaded cleanly before
    ("layer1.0.bn1.num_batches_tracked", "F64", "integer", "float64"),  # an integer buffer stored as a float
])
def test_a_relabelled_tensor_is_refused_naming_key_and_dtypes(resnet18_file, tmp_path, capsys, key, dtype, expected,
                                                              found):
    path = tmp_path / "relabelled.safetensors"
    path.write_bytes(resnet18_file.read_bytes())
    _relabel(path, key, dtype)
    before = path.read_bytes()
    line = f"  - {key}: expected {expected} dtype, found {found}"
    with pytest.raises(CheckpointError) as error:
        build_adapter("generic", path, arch="resnet18")
    message = str(error.value)
    assert str(path) in message and "nothing was loaded" in message
    assert "wrong dtype: 1 keys\n" + line in message and "mismatched: 0 keys" in message

    assert main(["inspect", "--model", "generic", "--model-option", "arch=resnet18", "--checkpoint", str(path)]) == 1
    out = capsys.readouterr().out
    assert "mapped: 119 keys" in out and line in out  # the other 119 tensors are accounted as usual
    assert path.read_bytes() == before  # reading never writes the checkpoint


def test_other_widths_of_the_same_kind_load_and_the_record_counts_wrong_dtypes(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    half = {k: v.half() if v.is_floating_point() else v.int() for k, v in state.items()}  # float16, int32 counters
    save_file(half, str(tmp_path / "half.safetensors"))
    adapter = build_adapter("generic", tmp_path / "half.safetensors", arch="resnet18")
    assert adapter.report.ok and adapter.encoder().conv1.weight.dtype == torch.float32
    assert adapter.describe()["load_report"]["wrong_dtype"] == {"count": 0, "first": []}


def test_match_keys_takes_the_dtype_kind_from_the_module_and_floating_point_for_a_bare_shape():
    expected = {"weight": (2, 2), "counter": TensorSpec((), torch.int64), "mask": TensorSpec((2,), torch.bool)}
    found = {"weight": torch.zeros(2, 2, dtype=torch.int8), "counter": torch.tensor(1.0),
             "mask": torch.ones(2, dtype=torch.uint8)}
    report = LoadReport("test")
    assert match_keys(found, expected, report, source_prefix="model.") == {}
    assert report.wrong_dtype == [("model.weight", "floating point", "int8"), ("model.counter", "integer", "float32"),
                                  ("model.mask", "bool", "uint8")]
    assert not report.ok and report.summary()["wrong_dtype"]["count"] == 3
    assert TensorSpec((2, 2), torch.float32) == (2, 2)  # still compares as the shape it is
