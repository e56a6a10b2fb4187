"""Faults a single run must survive or report clearly: corrupt images and label rows, bad checkpoints,
NaN losses, CUDA out-of-memory, unwritable results folders, pickles in cached files; and --precision."""

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlpbench import api, results
from vlpbench.cli import main
from vlpbench.data import cache
from vlpbench.data.cache import CorruptImagesError, cached_images
from vlpbench.data.images import read_image
from vlpbench.data.siim import SiimSource, read_labels
from vlpbench.data.splits import dataset_split
from vlpbench.errors import CheckpointError, ConfigError, DataError, VlpbenchError
from vlpbench.protocols import runtime, segmentation
from vlpbench.protocols.features import Preprocessing, cached_features
from vlpbench.protocols.segmentation import UNet
from vlpbench.synthetic.siim import synth_siim

# A resnet18 U-Net at 32 px for one or two epochs: fast, and the whole api.run path.
TINY = {"image_size": 32, "batch_size": 2, "max_epochs": 1, "patience": 1, "balance_negatives": False,
        "dice_resolution": "input", "bootstrap_resamples": 20}


class OpensMarker:
    """A pickle payload: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def siim_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust") / "siim"
    synth_siim(root, n=48, seed=1, size=64, progress=False)
    return root


def _run(root, checkpoint, results_dir, **kwargs):
    options = {"overrides": TINY, **kwargs}
    return api.run("generic", "siim_seg", 1.0, checkpoint=checkpoint, model_options={"arch": "resnet18"},
                   data_root=root, results=results_dir, device="cpu", progress=False, **options)


def _records(results_dir):
    return sorted((results_dir / "runs").rglob("*.json")) if (results_dir / "runs").exists() else []


# --- corrupt images and label rows --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_siim(siim_small, tmp_path_factory):
    """A copy of ``siim_small`` with one training and one test DICOM truncated to half their bytes;
    the root and the two ids, training first."""
    root = tmp_path_factory.mktemp("corrupt") / "siim"
    shutil.copytree(siim_small, root)
    source = SiimSource(root)
    split = dataset_split("siim", source, "v1")
    present = set(source.image_ids) - set(source.missing(source.image_ids))
    victims = [next(i for i in split.ids(part) if i in present) for part in ("train", "test")]
    for image_id in victims:
        path = source.path(image_id)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root, victims


def test_truncated_png_and_jpeg_name_the_file(tmp_path):
    pixels = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    for name in ("x.png", "x.jpg"):
        path = tmp_path / name
        Image.fromarray(pixels).save(path)
        path.write_bytes(path.read_bytes()[:60])
        with pytest.raises(DataError, match=f"cannot decode image {path}"):
            read_image(path)


def test_cache_workers_report_every_corrupt_file_and_store_nothing_for_them(corrupt_siim, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path))
    root, victims = corrupt_siim
    source = SiimSource(root)
    ids = [i for i in source.image_ids if i not in set(source.missing(source.image_ids))]
    with pytest.raises(CorruptImagesError) as caught:
        cached_images(source, "siim", ids, 24, workers=2, progress=False)
    assert sorted(caught.value.failures) == sorted(victims)
    for image_id in victims:
        assert str(source.path(image_id)) in str(caught.value) and "--skip-corrupt" in str(caught.value)
    (folder,) = (cache.cache_root() / "siim").glob("24px-*")
    entries = list((folder / cache.ENTRIES).rglob("*.u8"))
    # Every decodable image is stored, complete; nothing for the corrupt ones; no temp file left behind.
    assert len(entries) == len(ids) - len(victims)
    assert all(entry.stat().st_size == 24 * 24 + cache.CRC_BYTES for entry in entries)  # pixels, CRC-32
    assert list((folder / cache.TMP).iterdir()) == []
    assert list((folder / cache.RUNS).iterdir()) == []


def test_corrupt_image_stops_the_run_naming_the_file(corrupt_siim, resnet18_checkpoint, tmp_path):
    root, (in_train, _) = corrupt_siim
    with pytest.raises(DataError, match=f"{in_train}: {SiimSource(root).path(in_train)}: DICOM file has no pixel"):
        _run(root, resnet18_checkpoint, tmp_path)
    assert _records(tmp_path) == []


def test_skip_corrupt_runs_without_them_and_records_them_in_bf16(corrupt_siim, resnet18_checkpoint, tmp_path):
    root, victims = corrupt_siim
    argv = ["-q", "run", "--model", "generic", "--model-option", "arch=resnet18", "--task", "siim_seg",
            "--frac", "1.0", "--checkpoint", str(resnet18_checkpoint), "--data-root", str(root),
            "--results", str(tmp_path), "--device", "cpu", "--skip-corrupt", "--precision", "bf16"]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert main(argv) == 0
    (path,) = _records(tmp_path)
    record = json.loads(path.read_text())
    assert record["data"]["skipped_corrupt"] == sorted(victims)
    assert record["config"]["precision"] == "bf16"
    assert victims[1] not in record["per_image"]
    source = SiimSource(root)
    split = dataset_split("siim", source, "v1")
    present = [i for i in split.ids("test") if i not in set(source.missing(split.ids("test")))]
    assert record["n"]["test"] == len(present) - 1 == len(record["per_image"])
    assert all(np.isfinite(v) for v in record["per_image"].values())


def test_corrupt_label_row_names_the_line(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ImageId,EncodedPixels\n1.2.3,-1\n1.2.4,5 x 7\n")
    with pytest.raises(DataError, match=f"{path} line 3"):
        read_labels(path)
    path.write_text("ImageId,EncodedPixels\n1.2.3,-1,extra\n")
    with pytest.raises(DataError, match=f"{path} line 2: expected 2 fields"):
        read_labels(path)


# --- checkpoints ----------------------------------------------------------------------------------------


def _no_data(*args, **kwargs):
    raise AssertionError("the dataset was opened: the checkpoint should have been refused first")


def test_truncated_checkpoint_fails_before_any_data_is_read(g2d_encoder_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "open_dataset", _no_data)
    truncated = tmp_path / "g2d_encoder.pth"
    truncated.write_bytes(g2d_encoder_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{truncated}.*truncated or corrupt"):
        api.run("g2d", "siim_seg", 1.0, checkpoint=truncated, data_root=tmp_path, results=tmp_path / "r",
                device="cpu", progress=False)


def test_checkpoint_of_another_model_fails_before_any_data_is_read(resnet18_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "open_dataset", _no_data)
    with pytest.raises(CheckpointError, match="layer4.2|missing"):
        api.run("g2d", "siim_seg", 1.0, checkpoint=resnet18_checkpoint, data_root=tmp_path,
                results=tmp_path / "r", device="cpu", progress=False)


# --- NaN loss and out-of-memory -------------------------------------------------------------------------


def test_check_finite_returns_the_value_or_names_epoch_and_step():
    assert runtime.check_finite(torch.tensor(0.25), 1, 1) == 0.25
    for bad in (float("nan"), float("inf")):
        with pytest.raises(runtime.NonFiniteLossError, match="epoch 3, step 7"):
            runtime.check_finite(torch.tensor(bad), 3, 7)


def test_nan_loss_stops_the_run_at_its_step_without_a_record(siim_small, resnet18_checkpoint, tmp_path):
    # A learning rate of 1e30 makes the activations overflow float32 after the first step: step 2 of epoch 1
    # is the first non-finite loss.
    with pytest.raises(runtime.NonFiniteLossError, match="epoch 1, step 2"):
        _run(siim_small, resnet18_checkpoint, tmp_path, overrides={**TINY, "lr": 1e30})
    assert _records(tmp_path) == []


def test_nan_validation_loss_stops_the_run_at_its_epoch_without_a_record(siim_small, resnet18_checkpoint, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(segmentation, "_evaluate_loss", lambda *args, **kwargs: float("nan"))
    with pytest.raises(runtime.NonFiniteLossError, match="validation loss became nan at epoch 1"):
        _run(siim_small, resnet18_checkpoint, tmp_path)
    assert _records(tmp_path) == []


def test_out_of_memory_names_the_batch_size_and_the_fix(siim_small, resnet18_checkpoint, tmp_path, monkeypatch):
    def out_of_memory(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet, "forward", out_of_memory)
    with pytest.raises(runtime.OutOfMemoryError,
                       match=r"batch size batch_size=2; rerun with a smaller batch \(--set batch_size=1\)"):
        _run(siim_small, resnet18_checkpoint, tmp_path)
    assert _records(tmp_path) == []
    with pytest.raises(runtime.OutOfMemoryError, match="--set batch_size=8 --set batch_size_1pct=4"):
        with runtime.out_of_memory_hint({"batch_size": 16, "batch_size_1pct": 8, "lr": 1e-3}):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


# --- results folder on a full or read-only disk ----------------------------------------------------------


def _refuse_under(folder, code, monkeypatch):
    """os.open fails with ``code`` for paths under ``folder``, as on a read-only or full disk."""
    real_open = os.open

    def guarded(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_read_only_results_folder_fails_before_training(siim_small, resnet18_checkpoint, tmp_path, monkeypatch):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    _refuse_under(results_dir, errno.EROFS, monkeypatch)
    monkeypatch.setattr(api, "open_dataset", _no_data)
    with pytest.raises(VlpbenchError, match=f"results folder {results_dir}: the file system is read-only"):
        _run(siim_small, resnet18_checkpoint, results_dir)
    assert list(results_dir.iterdir()) == []


def test_chmod_read_only_results_folder_is_reported(tmp_path):
    results_dir = tmp_path / "results"
    (results_dir / "runs").mkdir(parents=True)
    os.chmod(results_dir / "runs", 0o555)
    try:
        if os.access(results_dir / "runs", os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the os.open test covers EROFS)")
        with pytest.raises(VlpbenchError, match="permission denied"):
            results.check_writable(results_dir)
    finally:
        os.chmod(results_dir / "runs", 0o755)


def _record(**changes):
    fields = {"model": {"name": "m", "checkpoint": None}, "task": {"name": "t", "version": 1}, "frac": 1.0,
              "seed": 1, "split": {"dataset": "d", "version": "v1", "sha256": "0" * 64},
              "metrics": {"dice": 0.5}, "primary_metric": "dice", "n": {"test": 2}, "config": {}, "timing": {}}
    return results.make_record(**{**fields, **changes})


def test_full_disk_while_replacing_a_record_keeps_the_old_one(tmp_path, monkeypatch):
    path = results.write_record(_record(), tmp_path)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(VlpbenchError, match=f"results folder {path.parent}: the disk is full"):
        results.write_record(_record(metrics={"dice": 0.9}), tmp_path, overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == before
    monkeypatch.undo()

    # The backup is renamed back when the final rename fails after the old record was moved aside.
    real_replace = os.replace

    def replace_fails(src, dst):
        if str(dst) == str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(VlpbenchError, match="the disk is full"):
        results.write_record(_record(metrics={"dice": 0.9}), tmp_path, overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == before


# --- pickles inside cached files and records --------------------------------------------------------------


class ArraySource:
    """In-memory images with a fingerprint (a reader the image cache accepts)."""

    fingerprint = "robustness-arrays-v1"

    def __init__(self, n=8, size=40):
        rng = np.random.default_rng(0)
        self.images = {f"img{k}": rng.integers(0, 256, (size, size), dtype=np.uint8) for k in range(n)}
        self.ids = list(self.images)

    def image(self, image_id):
        return self.images[image_id]


def _pickle_npy(path, marker):
    with open(path, "wb") as handle:
        np.save(handle, np.array([OpensMarker(marker)], dtype=object), allow_pickle=True)


def test_pickle_in_the_image_cache_is_never_run(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = ArraySource()
    first = np.array(cached_images(source, "arrays", source.ids, 16, workers=1, progress=False))
    (run,) = (cache.cache_root() / "arrays").glob("16px-*/runs/*.npy")
    marker = tmp_path / "ran"
    _pickle_npy(run, marker)
    again = cached_images(source, "arrays", source.ids, 16, workers=1, progress=False)
    assert np.array_equal(again, first)
    assert not marker.exists()


def test_pickle_in_the_feature_cache_is_never_run(tmp_path, resnet18_checkpoint):
    from vlpbench.adapters import build_adapter

    adapter = build_adapter("generic", resnet18_checkpoint, arch="resnet18")
    source = ArraySource(n=4, size=40)
    pre = Preprocessing(resize=36, crop=32, mean=0.5, std=0.5)
    first = cached_features(adapter, source, source.ids, pre, batch_size=4, device=torch.device("cpu"))
    marker = tmp_path / "ran"
    _pickle_npy(first.paths[0], marker)
    again = cached_features(adapter, source, source.ids, pre, batch_size=4, device=torch.device("cpu"))
    assert not again.hit and not marker.exists()
    np.testing.assert_allclose(again.values, first.values, rtol=1e-5, atol=1e-6)


def test_pickle_in_the_entity_cache_is_never_run(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import BertConfig, BertModel, BertTokenizer

    from vlpbench.adapters import medklip
    from vlpbench.testing import write_medklip_entities

    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"]) + "\n")
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=6, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert)
    entities = write_medklip_entities(tmp_path / "observation explanation.json")
    medklip.cached_entity_embeddings(str(entities), str(bert))
    (cached,) = (tmp_path / "cache" / "medklip_entities").iterdir()
    marker = tmp_path / "ran"
    cached.write_bytes(pickle.dumps(OpensMarker(marker)))
    # The cache is read with safetensors, which has no code path that unpickles.
    with pytest.raises(SafetensorError):
        medklip.cached_entity_embeddings(str(entities), str(bert))
    assert not marker.exists()


def test_pickle_in_a_record_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "runs" / "m" / "nockpt" / "t.v1" / "frac1.0-seed0.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(OpensMarker(marker)))
    with pytest.raises(DataError, match=f"{path}: not a JSON result record"):
        results.load_records(tmp_path)
    assert not marker.exists()


# --- precision switches ------------------------------------------------------------------------------------


def test_precision_values_are_checked():
    assert runtime.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="--precision 'fp16': expected one of fp32, bf16"):
        runtime.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision='half'"):
        runtime.precision_of({"precision": "half"})
    assert runtime.precision_of({}) == "fp32"


def test_bf16_forward_runs_in_bfloat16_and_returns_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    reference = torch.nn.Conv2d(3, 8, 3)
    fp32 = runtime.prepare_model(torch.nn.Conv2d(3, 8, 3), torch.device("cpu"), "fp32")
    bf16 = runtime.prepare_model(torch.nn.Conv2d(3, 8, 3), torch.device("cpu"), "bf16")
    fp32.load_state_dict(reference.state_dict())
    bf16.load_state_dict(reference.state_dict())
    assert list(bf16.state_dict()) == list(reference.state_dict())
    expected = reference(x)
    torch.testing.assert_close(fp32(x), expected, rtol=0, atol=0)
    # The bf16 result equals the convolution of bfloat16-rounded inputs and weights, returned as float32.
    out = bf16(x)
    assert out.dtype == torch.float32
    rounded = torch.nn.functional.conv2d(x.bfloat16().float(), reference.weight.bfloat16().float(),
                                         reference.bias.bfloat16().float())
    torch.testing.assert_close(out, rounded, rtol=2e-2, atol=2e-2)
    assert not torch.equal(out, expected)
    moved = runtime.to_device(x, torch.device("cpu"))
    assert torch.equal(moved, x)
