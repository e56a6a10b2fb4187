"""`vlpbench data check` and `splits verify` name what is wrong, and pass a sound folder."""

import re

import pytest

from vlpbench.cli import main
from vlpbench.data.check import check_dataset, verify_split
from vlpbench.data.siim import SiimSource
from vlpbench.synthetic.siim import synth_siim


@pytest.fixture()
def siim_copy(tmp_path):
    root = tmp_path / "siim"
    synth_siim(root, n=12, seed=3, size=128, progress=False)
    return root


def test_a_sound_folder_passes_with_counts_per_split_part(siim_copy):
    report = check_dataset("siim", siim_copy, progress=False)
    assert report.ok, report.format()
    text = report.format()
    assert "12 images in the label files (synthetic dataset)" in text
    assert "decoded 12 of 12 image files" in text
    assert "split siim/v1 train:" in text and text.rstrip().endswith("OK")


def test_planted_missing_and_corrupt_files_are_named(siim_copy, capsys):
    source = SiimSource(siim_copy)
    gone, broken = source.image_ids[0], source.image_ids[1]
    source.path(gone).unlink()
    source.path(broken).write_bytes(source.path(broken).read_bytes()[:300])
    report = check_dataset("siim", siim_copy, progress=False)
    assert not report.ok
    errors = "\n".join(report.errors)
    assert f"1 indexed images have no image file: {gone}" in errors
    assert f"unreadable image {broken}" in errors and str(source.path(broken)) in errors
    for option in ("--data-root", "--root"):  # --root: the older name, still accepted
        assert main(["-q", "data", "check", "--dataset", "siim", option, str(siim_copy)]) == 1
        assert "FAILED: 2 problem(s)" in capsys.readouterr().out


def test_a_layout_error_says_what_is_expected_where(tmp_path):
    report = check_dataset("siim", tmp_path, progress=False)
    assert not report.ok and "stage_2_train.csv" in report.errors[0] and str(tmp_path) in report.errors[0]


def test_splits_verify_checks_manifest_overlap_and_presence(siim_copy, tmp_path, capsys):
    report = verify_split("siim", siim_copy)
    assert report.ok, report.format()
    assert "train: 8433 ids" in report.format()
    assert main(["splits", "verify", "--dataset", "siim"]) == 0
    assert "every file matches it" in capsys.readouterr().out
    for option in ("--data-root", "--root"):
        assert main(["splits", "verify", "--dataset", "siim", option, str(siim_copy)]) == 0
        assert capsys.readouterr().out == report.format() + "\n"


@pytest.mark.parametrize("dataset", ["siim", "rsna", "chexpert", "cxr14", "object_cxr", "covidx", "mimic_cxr", "ms_cxr",
                                     "vindr"])
def test_every_synthetic_dataset_passes_data_check_and_a_removed_image_is_named(dataset, tmp_path):
    from vlpbench.api import synth
    from vlpbench.registry import DATASETS

    root = tmp_path / dataset
    synth(dataset, root, n=16, seed=1, size=96, progress=False)
    report = check_dataset(dataset, root, progress=False)
    assert report.ok, report.format()
    assert "16 images in the label files (synthetic dataset)" in report.format()
    assert re.search(r"decoded (\d+) of \1 image files", report.format())

    source = DATASETS.get(dataset).open(root)
    victim = source.image_ids[-1]
    source.path(victim).unlink()
    errors = "\n".join(check_dataset(dataset, root, decode=False, progress=False).errors)
    assert f"1 indexed images have no image file: {victim}" in errors
