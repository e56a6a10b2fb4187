"""Issue 17 item 8: ``vlpbench data check`` checks label geometry as ``run`` needs it: SIIM RLE runs within the
1024 x 1024 image, RSNA / Object-CXR / ChestX-ray14 boxes of positive size within their image, each
problem naming the label file and line."""

from pathlib import Path

import pytest

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.siim import HEADER, decode_rle, read_labels
from vlpbench.errors import DataError

SIIM_ID = "1.2.276.0.7230010.3.1.4.8323329.10638.1517875224.671320"


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*") if path.is_file()}


def _replace_line(path: Path, number: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n")


def test_an_rle_run_past_the_end_of_the_image_fails_data_check_naming_file_and_line(tmp_path, capsys):
    root = tmp_path / "siim"
    root.mkdir()
    labels = root / "stage_2_train.csv"
    # 1048570 + 10 = 1048580 > 1024 * 1024 = 1048576: the last run leaves the image.
    labels.write_text(f"{','.join(HEADER)}\n{SIIM_ID},100 20\n{SIIM_ID},1048570 10\n")
    before = _files(root)
    assert main(["-q", "data", "check", "--dataset", "siim", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    expected = f"{labels} line 3: RLE run ends at pixel 1048580, past the end of a 1024x1024 image"
    assert f"ERROR {expected}" in out and "FAILED" in out
    assert _files(root) == before  # data check writes nothing
    # The same rule, and the same words, as decoding the mask in a run.
    with pytest.raises(DataError, match="RLE run ends at pixel 1048580, past the end of a 1024x1024 image"):
        decode_rle("1048570 10")
    # A run that ends exactly at the last pixel is inside; an absurdly large value is refused, not overflowed.
    labels.write_text(f"{','.join(HEADER)}\n{SIIM_ID},1048566 10\n")
    assert read_labels(labels) == {SIIM_ID: ["1048566 10"]}
    labels.write_text(f"{','.join(HEADER)}\n{SIIM_ID},1 99999999999999999999999\n")
    with pytest.raises(DataError, match=f"{labels} line 2: RLE run ends at pixel 100000000000000000000000, past"):
        read_labels(labels)


def _rsna(root: Path) -> tuple[Path, int, str, str]:
    labels = root / "stage_2_train_labels.csv"
    number, line = next((n, line) for n, line in enumerate(labels.read_text().splitlines(), start=1)
                        if line.endswith(",1"))
    patient, x, y, _, height, _ = line.split(",")
    problem = f"patient {patient}: box x {float(x):g}..{float(x) + 100:g}"
    return labels, number, f"{patient},{x},{y},100.0,{height},1", problem


def _object_cxr(root: Path) -> tuple[Path, int, str, str]:
    labels = root / "train.csv"
    number, line = next((n, line) for n, line in enumerate(labels.read_text().splitlines(), start=1)
                        if n > 1 and not line.endswith(","))
    image = line.split(",")[0]
    return labels, number, f"{image},0 7 30 7 40", f"{image} object 1 (box): box x 7..7, y 30..40 has no area"


def _cxr14(root: Path) -> tuple[Path, int, str, str]:
    labels = root / "BBox_List_2017.csv"
    image, finding = labels.read_text().splitlines()[1].split(",")[:2]
    return labels, 2, f"{image},{finding},-3,10,20,20", f"{image} {finding}: box x -3..17, y 10..30 reaches outside"


@pytest.mark.parametrize("dataset, edit", [("rsna", _rsna), ("object_cxr", _object_cxr), ("cxr14", _cxr14)])
def test_a_box_off_its_image_or_without_area_fails_data_check_naming_file_and_line(dataset, edit, tmp_path, capsys):
    root = tmp_path / dataset
    api.synth(dataset, root, n=4, size=64, progress=False)
    assert main(["-q", "data", "check", "--dataset", dataset, "--data-root", str(root)]) == 0
    labels, number, line, problem = edit(root)
    _replace_line(labels, number, line)
    before = _files(root)
    capsys.readouterr()
    assert main(["-q", "data", "check", "--dataset", dataset, "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    [error] = [text for text in out.splitlines() if text.strip().startswith("ERROR")]
    assert f"ERROR {labels} line {number}: {problem}" in error
    assert _files(root) == before
    # Without decoding, the image sizes are unknown: the report says the geometry was not checked.
    assert main(["-q", "data", "check", "--dataset", dataset, "--data-root", str(root), "--no-decode"]) == 0
    assert "label geometry not checked against the images (--no-decode)" in capsys.readouterr().out
