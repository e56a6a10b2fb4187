"""Every ``vlpbench synth`` output is fixed byte for byte by its dataset, n, seed and size.

The hashes pin the pictures, label files and headers that each synthesizer wrote when they were recorded, so
that a change meant to make synthesis faster cannot change a single byte of what it writes (and with it the
numbers the tests that learn from synthetic data were tuned on).

The bytes also depend on the libraries that draw, encode and supply the label files, so the hashes hold for the
versions they were recorded with (:data:`RECORDED_WITH`); with any other version the comparison is skipped, saying
which, rather than failing on a dependency's release. Record them again on the new versions from a checkout whose
synthesizers are known good.
"""

import hashlib
from importlib.metadata import PackageNotFoundError, version

import pytest

from vlpbench.cli import main

N, SEED, SIZE = 10, 7, 64

# The packages whose versions the bytes depend on, as installed when the hashes were recorded.
RECORDED_WITH = {"numpy": "2.4.6", "pillow": "13.0.0", "pydicom": "3.0.2", "torchxrayvision": "1.5.7"}

# sha256 over the sorted (relative path, sha256 of the bytes) of every file written by
# ``vlpbench synth --dataset <key> --n 10 --seed 7 --size 64`` (TBX11K: its only size, 512).
HASHES = {
    "chexlocalize": "42ad8b6adc7dde59ac08ad0828ea6f87cc68dc235f17d360fa44d41988b2ebc4",
    "chexpert": "7d49193914d252b4dc1cc74b842dd1a7dddc0457a6f088e444dfe71f7aa46b87",
    "covidx": "42fe440b2651e16d55a75807fb59aa76b22a62efce4f3ca6e95134d0ce05378f",
    "cxr14": "33c2f1fdcdedf2edebc61a9c7c8a3c31c62e85b237dd85cc227ecdd32b8637a3",
    "mimic_cxr": "cece9a3d90c23894b381d5e350d5bdf155fbbf85d1354b309bf7eac5acc71ee7",
    "ms_cxr": "2b5705e1e0d7f2706bd7b754a9f83d9deca62ae630a7565e122515ff21ad1032",
    "object_cxr": "5cac900d923995ae24147335552c8432ba6f85b0bbac8773f25d6a7f95b60403",
    "padchest": "4d7ad393f039cacd5829fbb6f0abec3bbb6c4875a4b9a00cbdd6041a65c9698c",
    "rsna": "fef369ad74ca3a420e07fcd8d47a3ac0a48add94449fdbc1d3cc191e720c9ff7",
    "siim": "076da534c8dd9620110f70d6ae7dcb23af7574c07c3df10d4f6e14ea5134332c",
    "tbx11k": "277021e1fa0ee98c8918674f72b911589503716d94762ebe87521eb69af80227",
    "vindr": "64f7073bbab707a06e11a233dad02485e6e3e4b44a0379938938b06dae9382c8",
}


def _tree_sha256(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_every_synthesizer_is_pinned():
    from vlpbench.registry import DATASETS

    assert sorted(HASHES) == sorted(name for name in DATASETS if DATASETS.get(name).synthesizer is not None)


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@pytest.mark.parametrize("dataset", sorted(HASHES))
def test_synth_writes_the_recorded_bytes(dataset, tmp_path):
    changed = {p: _installed(p) for p, v in RECORDED_WITH.items() if _installed(p) != v}
    if changed:
        pytest.skip(f"hashes recorded with {RECORDED_WITH}; installed now: {changed}")
    size = [] if dataset == "tbx11k" else ["--size", str(SIZE)]
    out = tmp_path / dataset
    assert main(["-q", "synth", "--dataset", dataset, "--out", str(out), "--n", str(N), "--seed", str(SEED),
                 *size]) == 0
    assert _tree_sha256(out) == HASHES[dataset]
