"""SIIM split ``mavl``: the SIIM-ACR test list that MAVL (CVPR 2024) publishes with its zero-shot code.

MedKLIP never released its SIIM split (MediaBrain-SJTU/MedKLIP issues 13, 21); MAVL, built on MedKLIP's
code, ships its own (HieuPhan33/CVPR2024_MAVL ``data/siimacr/{train,val,test}.csv``, header
``ImageId,EncodedPixels``, one row per mask instance) and scores SIIM zero-shot on ``test.csv``
(``Zero-shot_classification/configs/siim_mavl.yaml``). It is the one public SIIM zero-shot test list of the
MedKLIP family, which the ``paper`` profile of ``siim_zs`` uses.

Its parts share images: the file was split by CSV row, not by image, so an image with several mask rows can
sit in two parts (val and test share 87 images, train and test 199, train and val 192). Zero-shot uses no
training data, so the test list is kept whole; vlpbench's val is MAVL's val less the images of test, and
train every other stage-2 image, so no image is in two parts.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

from vlpbench.data.siim import EMPTY, SIIM_CLASS, read_labels
from vlpbench.data.splits import SEED, nested_subsets, read_id_list, write_split
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.errors import DataError
from vlpbench.splits import SPLITS_DIR

MAVL_REPOSITORY = "HieuPhan33/CVPR2024_MAVL"
MAVL_COMMIT = "6a5eacd0833875102e09147d8a0bcdd4000c4ed9"
MAVL_FILES = {"test": ("data/siimacr/test.csv", "397a3cd86a6e5e7910848c38c73a1af4901f13c6808f5227013c5df2963fb9d9"),
              "val": ("data/siimacr/val.csv", "415b44e29747acd13222908496832cbbe1316c07e74400705a4b314f0580bdd0")}
SOURCES = SPLITS_DIR / "siim" / "sources"
MAVL_IDS = {part: SOURCES / f"mavl_{part}_ids.csv" for part in MAVL_FILES}


def generate_split_mavl(out_dir: str | Path) -> dict:
    """Write SIIM split ``mavl`` (module docstring): test = MAVL's 2,264 test images, val = its val images
    not in test, train = the other stage-2 images, with vlpbench's nested 10 % / 1 % subsets (seed 0).
    Labels come from the stage-2 label file (they agree with MAVL's rows image for image).

    Returns:
        The manifest (also written to ``MANIFEST.json``).

    Raises:
        DataError: a listed image is not in the stage-2 label file.
    """
    source = xrv_data_file(SIIM_RLE)
    rows = read_labels(source)
    label = {image_id: int(masks[0] != EMPTY) for image_id, masks in rows.items()}
    listed = {part: read_id_list(path) for part, path in MAVL_IDS.items()}
    for part, ids in listed.items():
        unknown = [i for i in ids if i not in label]
        if unknown:
            raise DataError(f"{MAVL_IDS[part]}: {len(unknown)} images not in the stage-2 label file, e.g. {unknown[0]}")
    test = listed["test"]
    in_test = set(test)
    val = [i for i in listed["val"] if i not in in_test]
    held_out = in_test | set(val)
    train = [i for i in label if i not in held_out]
    train_10, train_1 = nested_subsets(train, label, SEED)
    n = len(label)
    return write_split(
        out_dir,
        dataset="siim",
        version="mavl",
        parts={"train": train, "val": val, "test": test, "train_1pct": train_1, "train_10pct": train_10},
        labels={image_id: {SIIM_CLASS: y} for image_id, y in label.items()},
        columns=[SIIM_CLASS],
        generator="vlpbench.data.siim_mavl:generate_split_mavl",
        seed=SEED,
        fractions={"train": len(train) / n, "val": len(val) / n, "test": len(test) / n,
                   "train_10pct": 0.1, "train_1pct": 0.01},
        source={
            "package": "torchxrayvision",
            "file": source.name,
            "sha256": hashlib.sha256(gzip.decompress(source.read_bytes())).hexdigest(),
            "n_images": len(rows),
            **{f"{part}_ids": {"file": f"splits/siim/sources/{path.name}",
                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "n_images": len(listed[part])} for part, path in MAVL_IDS.items()},
        },
        reference={
            "repository": MAVL_REPOSITORY,
            "commit": MAVL_COMMIT,
            "file": MAVL_FILES["test"][0],
            "sha256": MAVL_FILES["test"][1],
            "rule": "test = the distinct ImageIds of the file in file order (2,317 rows, 2,264 images, 594 with a "
                    "mask row; each label equals the stage-2 file's)",
            "identical": ["test"],
            "differs": {
                "val": f"{MAVL_FILES['val'][0]} (sha256 {MAVL_FILES['val'][1]}) less the 87 images it shares "
                       "with test",
                "train": "every other stage-2 image (MAVL's train.csv shares 199 images with test and 192 with val)",
                "train_10pct": "vlpbench nested stratified subset of train (seed 0)",
                "train_1pct": "drawn from train_10pct, stratified (seed 0)",
            },
        },
    )
