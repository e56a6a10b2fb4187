"""Image cache: bit-identical to direct decoding, keyed and invalidated right, crash- and race-safe."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpbench.data.cache import CRC_BYTES, STALE_TEMP_S, cache_root, cached_images, clear_cache, resize_image
from vlpbench.data.dicom import read_dicom
from vlpbench.data.siim import SiimSource
from vlpbench.errors import DataError, VlpbenchError

SIZE = 64
N = 12
ENTRY = SIZE * SIZE + CRC_BYTES  # pixels, then their CRC-32


class CountingSiim(SiimSource):
    """A SIIM reader that records which images it decoded (use with workers=1)."""

    def __init__(self, root):
        super().__init__(root)
        self.decoded: list[str] = []

    def image(self, image_id):
        self.decoded.append(image_id)
        return super().image(image_id)


@pytest.fixture(scope="module")
def siim12(tmp_path_factory) -> Path:
    """A synthetic SIIM folder of 12 JPEG DICOMs at 256² (never modified: tests copy it first)."""
    from vlpbench.synthetic.siim import synth_siim

    root = tmp_path_factory.mktemp("data") / "siim"
    synth_siim(root, n=N, seed=0, size=256, progress=False)
    return root


@pytest.fixture(scope="module")
def expected(siim12) -> dict[str, np.ndarray]:
    """Each image decoded and resized directly, without the cache."""
    source = SiimSource(siim12)
    return {i: resize_image(source.image(i), SIZE) for i in source.image_ids}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def copy(siim12, tmp_path) -> Path:
    """A private copy of the synthetic set, for tests that change files."""
    return Path(shutil.copytree(siim12, tmp_path / "siim"))


def stack(expected: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    return np.stack([expected[i] for i in ids])


def key_folders(dataset: str = "siim") -> list[Path]:
    return sorted(p for p in (cache_root() / dataset).iterdir())


def only_folder() -> Path:
    (folder,) = key_folders()
    return folder


def entry_sizes(folder: Path) -> list[int]:
    return sorted(p.stat().st_size for p in (folder / "entries").rglob("*.u8"))


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix != ".sum")  # a run file's checksum goes with it


def test_processes_fill_bit_identical_read_only_memmap(siim12, expected, caplog):
    source = SiimSource(siim12)
    ids = source.image_ids
    with caplog.at_level(logging.INFO, logger="vlpbench"):
        images = cached_images(source, "siim", ids, SIZE, workers=2, progress=False)
    assert "with 2 processes" in caplog.text
    assert isinstance(images, np.memmap) and images.shape == (N, SIZE, SIZE) and images.dtype == np.uint8
    assert np.array_equal(images, stack(expected, ids))
    assert not images.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1

    folder = only_folder()
    assert folder.name.startswith(f"{SIZE}px-")
    assert entry_sizes(folder) == [ENTRY] * N
    assert len(listing(folder / "runs")) == 1 and listing(folder / "tmp") == []
    assert '"size": 64' in (folder / "INFO.json").read_text()


def test_warm_read_decodes_nothing_and_any_order_or_repeat_works(siim12, expected):
    source = CountingSiim(siim12)
    ids = source.image_ids
    cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    assert source.decoded == ids

    source.decoded.clear()
    again = cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    assert source.decoded == [] and np.array_equal(again, stack(expected, ids))

    # A new id list reuses the entries: a second run file, no decoding.
    wanted = ids[::-1] + ids[:2]
    reordered = cached_images(source, "siim", wanted, SIZE, workers=1, progress=False)
    assert source.decoded == [] and np.array_equal(reordered, stack(expected, wanted))
    assert len(listing(only_folder() / "runs")) == 2


def test_repeated_ids_are_decoded_once(siim12, expected):
    source = CountingSiim(siim12)
    ids = source.image_ids[:3] * 2
    images = cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    assert source.decoded == source.image_ids[:3]
    assert np.array_equal(images, stack(expected, ids))


def test_segmentation_images_are_bit_identical_to_direct_decoding(siim12):
    from vlpbench.protocols.segmentation import Images, resize_mask

    source = SiimSource(siim12)
    ids = source.image_ids
    data = Images(source, ids, 96, "test", progress=False)
    # The code path before the cache: decode, resize_image, resize_mask, image by image.
    direct_images = torch.stack([torch.from_numpy(resize_image(source.image(i), 96)) for i in ids])
    direct_masks = torch.stack([torch.from_numpy(resize_mask(source.mask(i), 96)) for i in ids])
    assert data.images.dtype == torch.uint8 and torch.equal(data.images, direct_images)
    assert torch.equal(data.masks, direct_masks)
    assert key_folders()[0].name.startswith("96px-")

    data.images[0] += 1  # a private copy: the cache is untouched
    assert torch.equal(Images(source, ids, 96, "test", progress=False).images, direct_images)


def test_size_change_is_a_new_entry_set(siim12):
    source = CountingSiim(siim12)
    ids = source.image_ids
    cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    source.decoded.clear()
    small = cached_images(source, "siim", ids, 48, workers=1, progress=False)
    assert source.decoded == ids and small.shape == (N, 48, 48)
    assert np.array_equal(small, np.stack([resize_image(SiimSource(siim12).image(i), 48) for i in ids]))
    assert [p.name[:5] for p in key_folders()] == ["48px-", "64px-"]


def test_changed_label_file_invalidates_everything(copy):
    source = CountingSiim(copy)
    cached_images(source, "siim", source.image_ids, SIZE, workers=1, progress=False)
    label_file = copy / "stage_2_train.csv"
    stamp = label_file.stat().st_mtime_ns + 10**9
    os.utime(label_file, ns=(stamp, stamp))

    changed = CountingSiim(copy)
    cached_images(changed, "siim", changed.image_ids, SIZE, workers=1, progress=False)
    assert changed.decoded == changed.image_ids
    assert len(key_folders()) == 2


def test_changed_image_file_is_decoded_again(copy, expected):
    source = CountingSiim(copy)
    ids = source.image_ids
    cached_images(source, "siim", ids, SIZE, workers=1, progress=False)

    # Overwrite the first DICOM with the second's bytes (a re-download with other pixels).
    target = source.path(ids[0])
    shutil.copyfile(source.path(ids[1]), target)
    stamp = target.stat().st_mtime_ns + 10**9
    os.utime(target, ns=(stamp, stamp))
    source.decoded.clear()
    images = cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    assert source.decoded == [ids[0]]
    assert np.array_equal(images[0], expected[ids[1]])
    assert np.array_equal(images[1:], stack(expected, ids[1:]))


def test_reader_fingerprint_keys_the_cache(siim12):
    class Tagged(SiimSource):
        def __init__(self, root, tag):
            super().__init__(root)
            self.tag = tag

        def fingerprint(self):
            return self.tag

    ids = SiimSource(siim12).image_ids[:2]
    cached_images(Tagged(siim12, "release-1"), "siim", ids, SIZE, workers=1, progress=False)
    cached_images(Tagged(siim12, "release-1"), "siim", ids, SIZE, workers=1, progress=False)
    assert len(key_folders()) == 1
    cached_images(Tagged(siim12, "release-2"), "siim", ids, SIZE, workers=1, progress=False)
    assert len(key_folders()) == 2
    assert all('"release-' in (f / "INFO.json").read_text() for f in key_folders())


def test_fingerprinted_reader_answers_for_its_files(siim12, expected):
    class Fingerprinted(SiimSource):
        def fingerprint(self):
            return "siim stage 2"

        def path(self, image_id):
            raise AssertionError("the cache stats no image file of a reader with a fingerprint")

        def image(self, image_id):
            return read_dicom(SiimSource.path(self, image_id))

    source = Fingerprinted(siim12)
    images = cached_images(source, "siim", source.image_ids, SIZE, workers=1, progress=False)
    assert np.array_equal(images, stack(expected, source.image_ids))


def test_images_inside_a_zip_archive_are_keyed_by_id(tmp_path):
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as archive:
        archive.writestr("a.jpg", b"not decoded here")

    class Zipped:
        root = tmp_path

        def path(self, image_id):
            return zipfile.Path(tmp_path / "train.zip", at=image_id)

        def image(self, image_id):
            return np.full((20, 30), 7, np.uint8)

    images = cached_images(Zipped(), "zipped", ["a.jpg"], 8, workers=1, progress=False)
    assert images.shape == (1, 8, 8) and (np.asarray(images) == 7).all()


def test_reader_without_identity_or_bad_arguments_are_refused(siim12):
    class Bare:
        def image(self, image_id):
            return np.zeros((8, 8), np.uint8)

    with pytest.raises(VlpbenchError, match="neither fingerprint"):
        cached_images(Bare(), "bare", ["a"], SIZE, progress=False)
    source = SiimSource(siim12)
    with pytest.raises(ValueError, match="dataset name"):
        cached_images(source, "../siim", source.image_ids, SIZE, progress=False)
    with pytest.raises(ValueError, match="size"):
        cached_images(source, "siim", source.image_ids, 0, progress=False)
    with pytest.raises(ValueError, match="workers"):
        cached_images(source, "siim", source.image_ids, SIZE, workers=0, progress=False)


def test_image_that_is_not_uint8_is_a_data_error(siim12):
    class Wide(SiimSource):
        def image(self, image_id):
            return super().image(image_id).astype(np.uint16)

    source = Wide(siim12)
    with pytest.raises(DataError, match=r"Wide.image\('.+'\) returned uint16 \(256, 256\); expected a uint8"):
        cached_images(source, "siim", source.image_ids[:1], SIZE, workers=1, progress=False)


def test_empty_id_list(siim12):
    images = cached_images(SiimSource(siim12), "siim", [], SIZE, progress=False)
    assert images.shape == (0, SIZE, SIZE) and images.dtype == np.uint8 and not images.flags.writeable


def test_unpicklable_reader_falls_back_to_threads(siim12, expected, caplog):
    class LocalSiim(SiimSource):  # a class defined in a function cannot be pickled
        pass

    source = LocalSiim(siim12)
    with caplog.at_level(logging.INFO, logger="vlpbench"):
        images = cached_images(source, "siim", source.image_ids, SIZE, workers=2, progress=False)
    assert "LocalSiim cannot be pickled" in caplog.text and "in 2 threads instead" in caplog.text
    assert np.array_equal(images, stack(expected, source.image_ids))


def test_corrupt_dicom_in_a_worker_names_the_file(copy):
    source = SiimSource(copy)
    broken = source.path(source.image_ids[5])
    broken.write_bytes(broken.read_bytes()[:400])
    with pytest.raises(DataError, match=str(broken)):
        cached_images(source, "siim", source.image_ids, SIZE, workers=2, progress=False)
    folder = only_folder()
    assert ENTRY * (N - 1) >= sum(entry_sizes(folder)) and set(entry_sizes(folder)) <= {ENTRY}
    assert listing(folder / "runs") == [] and listing(folder / "tmp") == []


def test_missing_dicom_names_the_file_before_any_decoding(copy):
    source = CountingSiim(copy)
    gone = source.path(source.image_ids[3])
    gone.unlink()
    with pytest.raises(DataError, match=f"image file of {source.image_ids[3]} not found: {gone}"):
        cached_images(source, "siim", source.image_ids, SIZE, workers=1, progress=False)
    assert source.decoded == []


def test_error_mid_write_leaves_no_partial_entry(siim12, expected, monkeypatch):
    source = CountingSiim(siim12)
    ids = source.image_ids
    write_bytes = Path.write_bytes
    calls = []

    def disk_fills_up(path, data):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as file:
                file.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", disk_fills_up)
        with pytest.raises(VlpbenchError, match="cannot write image cache entry .* No space left on device"):
            cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    folder = only_folder()
    assert entry_sizes(folder) == [ENTRY] * 2
    assert listing(folder / "tmp") == [] and listing(folder / "runs") == []

    source.decoded.clear()
    images = cached_images(source, "siim", ids, SIZE, workers=1, progress=False)
    assert source.decoded == ids[2:] and np.array_equal(images, stack(expected, ids))


KILLED_MID_WRITE = r"""
import sys, time
from pathlib import Path
from vlpbench.data.cache import cached_images
from vlpbench.data.dicom import read_dicom
from vlpbench.data.siim import SiimSource

root, ready = Path(sys.argv[1]), Path(sys.argv[2])
write_bytes, calls = Path.write_bytes, []

def torn(path, data):
    calls.append(path)
    if len(calls) == 3:  # the third image: half written, then hang until killed
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
        ready.touch()
        time.sleep(120)
    return write_bytes(path, data)

Path.write_bytes = torn
source = SiimSource(root)
cached_images(source, "siim", source.image_ids, int(sys.argv[3]), workers=1, progress=False)
"""


def wait_for(paths: list[Path], processes: list[subprocess.Popen], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"helper exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"helpers did not reach {paths}")
        time.sleep(0.01)


def test_kill_9_mid_write_leaves_no_partial_entry(siim12, expected, tmp_path):
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(siim12), str(ready), str(SIZE)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for([ready], [process])
    finally:
        process.kill()  # SIGKILL: no cleanup handler runs
        process.communicate()
    folder = only_folder()
    finished = {p: p.stat().st_mtime_ns for p in (folder / "entries").rglob("*.u8")}
    assert [p.stat().st_size for p in finished] == [ENTRY] * 2  # nothing of the third image
    (torn,) = (folder / "tmp").iterdir()
    assert torn.stat().st_size == ENTRY // 2
    assert listing(folder / "runs") == []

    # The next run keeps the finished entries, adds the rest and sweeps the orphan once it is stale.
    old = time.time() - STALE_TEMP_S - 60
    os.utime(torn, (old, old))
    source = SiimSource(siim12)
    images = cached_images(source, "siim", source.image_ids, SIZE, workers=1, progress=False)
    assert np.array_equal(images, stack(expected, source.image_ids))
    assert only_folder() == folder and entry_sizes(folder) == [ENTRY] * N
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert listing(folder / "tmp") == []


RACE = r"""
import hashlib, sys, time
from pathlib import Path
import numpy as np
from vlpbench.data.cache import cached_images
from vlpbench.data.dicom import read_dicom
from vlpbench.data.siim import SiimSource

class SlowSiim(SiimSource):
    def image(self, image_id):
        time.sleep(0.03)  # both runs write the same entries over the same stretch of time
        return super().image(image_id)

root, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
source = SlowSiim(root)
ready.touch()
while not go.exists():
    time.sleep(0.002)
images = cached_images(source, "siim", source.image_ids, int(sys.argv[4]), workers=1, progress=False)
print(hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest())
"""


def test_two_processes_filling_at_once_agree(siim12, expected, tmp_path):
    go = tmp_path / "go"
    readies = [tmp_path / f"ready{k}" for k in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(siim12), str(r), str(go), str(SIZE)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in readies]
    try:
        wait_for(readies, processes)
        go.touch()
        outputs = [p.communicate(timeout=60) for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs
    truth = hashlib.sha256(stack(expected, SiimSource(siim12).image_ids).tobytes()).hexdigest()
    assert [out.strip() for out, _ in outputs] == [truth, truth]
    folder = only_folder()
    assert entry_sizes(folder) == [ENTRY] * N
    assert len(listing(folder / "runs")) == 1 and listing(folder / "tmp") == []


def test_clear_cache(siim12):
    source = SiimSource(siim12)
    cached_images(source, "siim", source.image_ids, SIZE, workers=1, progress=False)
    cached_images(source, "other", source.image_ids[:2], SIZE, workers=1, progress=False)
    freed = clear_cache("siim")
    assert freed >= N * SIZE * SIZE * 2  # entries plus the run file
    assert listing(cache_root()) == ["other"]
    assert clear_cache("siim") == 0
    assert clear_cache() > 0 and not cache_root().exists()
    with pytest.raises(ValueError, match="dataset name"):
        clear_cache("..")
