"""Locate the real label files that ship inside the installed torchxrayvision wheel.

torchxrayvision carries real dataset label files in its ``data/`` folder (the SIIM stage-2 RLE
CSV, the v7labs lung masks, ...). Importing torchxrayvision would pull in torch and
torchvision for nothing, so its folder is found through its import spec instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlpbench.errors import DataError

PACKAGE = "torchxrayvision"

# The stage-2 SIIM label file with the header changed to "ImageId, EncodedPixels" (values
# unchanged, no leading space): 12,954 rows, 12,047 images.
SIIM_RLE = "siim-pneumothorax-train-rle.csv.gz"
# 517 real lung masks (png/jpg/jpeg, mode L) drawn by v7labs on public chest X-rays.
LUNG_MASKS = "semantic_masks_v7labs_lungs.zip"


def xrv_data_dir() -> Path:
    """Return the ``data/`` folder of the installed torchxrayvision package (without importing it).

    Raises:
        DataError: torchxrayvision is not installed, or its ``data/`` folder is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the Python package {PACKAGE!r} is not installed; vlpbench reads the real label files "
            f"it ships (pip install {PACKAGE})"
        )
    for location in spec.submodule_search_locations:
        data_dir = Path(location) / "data"
        if data_dir.is_dir():
            return data_dir
    raise DataError(
        f"{PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no data/ folder; "
        "reinstall it from a wheel that includes its data files"
    )


def xrv_data_file(name: str) -> Path:
    """Return the path of the file ``name`` inside torchxrayvision's ``data/`` folder.

    Args:
        name: a file name such as ``SIIM_RLE`` or ``LUNG_MASKS``.

    Raises:
        DataError: the package or the file is missing.
    """
    path = xrv_data_dir() / name
    if not path.is_file():
        raise DataError(
            f"{path} not found: the installed {PACKAGE} does not ship {name!r}; "
            f"install a {PACKAGE} release that includes it"
        )
    return path
