"""Synthetic MIMIC-CXR-JPG release with MIMIC-CXR reports, in the real on-disk format.

:func:`synth_mimic_cxr` invents format-true ids (subject 10000000-19999999 under ``p<first two
digits>``, study 50000000-59999999, dicom ids of five 8-hex groups), gives each study the labels of a
real frontal row of the CheXpert train.csv that torchxrayvision ships (values spelled as there,
reordered to MIMIC's alphabetical columns), draws each frontal image with the study's positive findings
(:func:`vlpbench.synthetic.chexpert.draw`), and writes a report per study in the MIMIC layout
(docs/datasets.md, "MIMIC-CXR reports") whose sentences are real OpenI (Indiana, ``NLMCXR_reports.tgz``)
sentences that name exactly those findings; ``XXXX`` de-identification becomes MIMIC's ``___``.

A share of the images (:data:`FIVE_SHARE`) are MIMIC-5x200 images under their real ids
(``splits/mimic5x200/sources/``), as many per class as can be, each study labelled with its class alone and
showing it, so that ``mimic5x200_ret`` runs on a synthetic folder.
"""

from __future__ import annotations

import functools
import gzip
import io
import re
import shutil
import tarfile
import textwrap
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.mimic_5x200 import CLASSES, read_source_ids
from vlpbench.data.mimic_cxr import LABEL_COLUMNS, LABELS, METADATA_COLUMNS, REPORTS_ZIP, SPLIT_COLUMNS
from vlpbench.data.splits import apportion
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import DataError
from vlpbench.synthetic.chest import prepare_output, write_marker
from vlpbench.synthetic.chexpert import FINDINGS, draw

CHEXPERT_TRAIN = "chexpert_train.csv.gz"
OPENI_REPORTS = "NLMCXR_reports.tgz"
PREFIX = "mimic-cxr-2.0.0"
FILES = {kind: f"{PREFIX}-{kind}.csv.gz" for kind in ("metadata", "split", "chexpert", "negbio")}

SPLIT_SHARES = (0.7, 0.15, 0.15)  # of subjects: train / validate / test (the real release: 98 / 1 / 1.4 %)
PA_LATERAL_SHARE = 0.65  # studies "CHEST (PA AND LAT)"; the others are a single portable AP
MAX_ASPECT = 1.2
FIVE_SHARE = 0.15  # of the images, from n = FIVE_FROM on: MIMIC-5x200 images (module docstring)
FIVE_FROM = 20

# Sentence patterns that name a drawn finding (vlpbench.synthetic.chexpert.FINDINGS), and what disqualifies one.
PATTERNS = {
    "Atelectasis": r"atelecta",
    "Cardiomegaly": r"cardiomegaly|heart (?:size )?is (?:mildly |moderately |markedly )?enlarged|enlarged (?:heart|cardiac)",
    "Consolidation": r"consolidat",
    "Edema": r"edema",
    "Pleural Effusion": r"effusion",
    "Pneumothorax": r"pneumothora",
    "Support Devices": r"\b(?:tube|catheter|pacemaker|picc|port-a-cath)\b",
}
_FINDING = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in PATTERNS.items()}
_NEGATED = re.compile(r"\b(?:no|not|without|negative|resolved|resolution|removed|interval|clear|free|normal|"
                      r"previous|prior|since|limited|evaluation|exclude|excluded|assess|possible|cannot)\b|\?", re.IGNORECASE)
_OTHER = re.compile(r"nodul|granulom|opacit|mass|scar|fractur|degenerat|scolio|emphysem|hyperinfla|calcif|"
                    r"infiltrat|pneumonia|hernia|kyphos|surgical|clips|deformit|tortuous|ectatic|elevat",
                    re.IGNORECASE)
_NORMAL = re.compile(r"\b(?:normal|clear|unremarkable|no acute)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=\.)\s+(?=[A-Z])")
_NUMBERING = re.compile(r"^[0-9]+\.\s+|\s+[0-9]+\.$")  # OpenI's "1. ... 2." list markers
_INDICATION = re.compile(r"[a-z][a-z ,-]{8,58}[a-z]")


def _sentences(text: str) -> list[str]:
    text = " ".join(text.replace("XXXX", "___").split())
    cleaned = (_NUMBERING.sub("", s).strip() for s in _SENTENCE.split(text))
    return [s for s in cleaned if 10 <= len(s) <= 200 and s[0].isupper() and s.endswith(".")]


@functools.cache
def openi_pools() -> dict[str, list[str]]:
    """Real OpenI sentences: ``{finding: positive sentences}`` for each drawn finding (from FINDINGS
    and IMPRESSION), plus ``"normal findings"``, ``"normal impression"`` and ``"indication"`` pools."""
    pools: dict[str, set[str]] = {key: set() for key in (*FINDINGS, "normal findings", "normal impression",
                                                         "indication")}
    with tarfile.open(xrv_data_file(OPENI_REPORTS)) as archive:
        for member in archive:
            if not member.name.endswith(".xml"):
                continue
            root = ElementTree.parse(archive.extractfile(member)).getroot()
            for node in root.iter("AbstractText"):
                label, text = node.get("Label"), node.text or ""
                indication = " ".join(text.split()).rstrip(".").lower()
                if label == "INDICATION" and _INDICATION.fullmatch(indication) and "xxxx" not in indication:
                    pools["indication"].add(indication)
                if label not in ("FINDINGS", "IMPRESSION"):
                    continue
                for sentence in _sentences(text):
                    named = [name for name, pattern in _FINDING.items() if pattern.search(sentence)]
                    if len(named) == 1 and not _NEGATED.search(sentence):
                        pools[named[0]].add(sentence)
                    elif not named and _NORMAL.search(sentence) and not _OTHER.search(sentence):
                        pools["normal findings" if label == "FINDINGS" else "normal impression"].add(sentence)
    empty = [key for key, pool in pools.items() if not pool]
    if empty:
        raise DataError(f"{xrv_data_file(OPENI_REPORTS)}: no usable sentences for {', '.join(empty)}")
    return {key: sorted(pool) for key, pool in pools.items()}


@functools.cache
def _chexpert_rows() -> list[list[str]]:
    """The 14 observation fields of every frontal row of the shipped CheXpert train.csv, in MIMIC order."""
    text = gzip.decompress(xrv_data_file(CHEXPERT_TRAIN).read_bytes()).decode("utf-8")
    header, *lines = text.splitlines()
    columns = header.split(",")
    at = [columns.index(name) for name in LABELS]
    frontal = columns.index("Frontal/Lateral")
    rows = []
    for line in lines:
        fields = line.split(",")
        if fields[frontal] == "Frontal":
            rows.append([fields[j] for j in at])
    return rows


def _pick(rng: np.random.Generator, pool: list[str]) -> str:
    return pool[int(rng.integers(len(pool)))]


def _block(header: str, text: str, *, below: bool) -> list[str]:
    """A report section: ``" HEADER:  text"`` wrapped, or the header alone, a blank line, the text."""
    wrap = functools.partial(textwrap.wrap, width=79, initial_indent=" ", subsequent_indent=" ",
                             break_on_hyphens=False, break_long_words=False)
    if below:
        return [f" {header}: ", " ", *wrap(text)]
    return wrap(f"{header}:  {text}")


def write_report(rng: np.random.Generator, findings: list[str], *, exam: str, sex: str) -> tuple[str, dict]:
    """One report in the MIMIC layout naming ``findings``; returns (text, facts) where facts holds
    the expected ``FINDINGS`` / ``IMPRESSION`` section text (``""`` where the report has none), the
    report ``variant`` and whether it has an ``addendum``."""
    pools = openi_pools()
    positive = [_pick(rng, pools[name]) for name in findings]
    # A normal sentence ("heart size is normal", "lungs are clear") would contradict a finding, so
    # only reports without one get them.
    normal = [_pick(rng, pools["normal findings"]) for _ in range(int(rng.integers(2, 4)))]
    body = " ".join(positive if findings else normal)
    impression = " ".join(positive[:2]) if findings else _pick(rng, pools["normal impression"])
    # 83.2 % have an impression, 12.2 % only findings, 4.6 % neither (docs/datasets.md, "MIMIC-CXR reports").
    variant = str(rng.choice(["both", "findings", "impression", "neither"], p=[0.78, 0.12, 0.05, 0.05]))
    if variant == "impression":
        impression = " ".join([*positive, impression] if findings else [impression])
    woman = "woman" if sex == "F" else "man"
    lines = [" " * 33 + "FINAL REPORT",
             *_block("EXAMINATION", exam, below=False), " ",
             *_block("INDICATION", f"___ year old {woman} with {_pick(rng, pools['indication'])}", below=False), " ",
             *_block("TECHNIQUE", "Chest PA and lateral" if "LAT" in exam else "Portable AP chest radiograph",
                     below=False), " ",
             *_block("COMPARISON", "None." if rng.random() < 0.5 else "Chest radiograph from ___.", below=False)]
    expected = {"FINDINGS": "", "IMPRESSION": ""}
    if variant in ("both", "findings"):
        lines += [" ", *_block("FINDINGS", body, below=True)]
        expected["FINDINGS"] = body
    if variant in ("both", "impression"):
        lines += [" ", *_block("IMPRESSION", impression, below=True)]
        expected["IMPRESSION"] = impression
    if variant == "neither":  # an older report: one headed paragraph under the exam name
        lines += [" ", *_block("CHEST, PA LATERAL" if "LAT" in exam else "CHEST, PORTABLE AP", body, below=False)]
    addendum = bool(rng.random() < 0.05)
    if addendum:  # addenda sit above the final report, behind a line of underscores
        note = "Findings were discussed with Dr. ___ by telephone at ___ on ___."
        lines = [" " * 36 + "ADDENDUM", *_block("ADDENDUM", note, below=False), " ", " " + "_" * 78, " ", *lines]
    return "\n".join(lines) + "\n", {**expected, "variant": variant, "addendum": addendum}


def make_dicom_id(rng: np.random.Generator) -> str:
    """A format-true MIMIC dicom_id: five dash-separated groups of 8 lower-case hex digits."""
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))


def _studies(rng: np.random.Generator, n: int) -> list[dict]:
    """Subjects, studies and their images (views) until ``n`` images, ids unique."""
    subjects = rng.choice(10_000_000, size=n, replace=False) + 10_000_000
    study_ids = iter(rng.choice(10_000_000, size=n, replace=False) + 50_000_000)
    splits = ("train", "validate", "test")
    studies: list[dict] = []
    count = 0
    for k, subject in enumerate(sorted(subjects.tolist())):
        # Round-robin over the first three subjects so that every official split is non-empty.
        split = splits[k] if k < 3 else str(rng.choice(splits, p=SPLIT_SHARES))
        sex = "F" if rng.random() < 0.5 else "M"
        for _ in range(int(rng.integers(1, 4))):
            if count >= n:
                return studies
            paired = bool(rng.random() < PA_LATERAL_SHARE)
            lateral = str(rng.choice(["LATERAL", "LL", ""], p=[0.85, 0.1, 0.05]))
            if paired and not any(len(s["views"]) == 2 for s in studies):
                lateral = ""  # the first lateral always shows the empty-ViewPosition quirk
            views = ["PA", lateral] if paired else ["AP"]
            views = views[: n - count]
            studies.append({"subject": str(subject), "study": str(next(study_ids)), "split": split, "sex": sex,
                            "exam": "CHEST (PA AND LAT)" if paired else "CHEST (PORTABLE AP)",
                            "views": views, "dicoms": [make_dicom_id(rng) for _ in views]})
            count += len(views)
    return studies


def _five_studies(rng: np.random.Generator, n: int, invented: list[dict]) -> list[dict]:
    """Studies of ``n`` MIMIC-5x200 images under their real ids, classes as even as ``n`` allows (a study with
    two listed images brings both), none sharing a subject or study id with the ``invented`` ones."""
    taken = {s["subject"] for s in invented} | {s["study"] for s in invented}
    by_study: dict[str, list[tuple[str, ...]]] = {}
    for row in read_source_ids():
        if row[1] not in taken and row[2] not in taken:
            by_study.setdefault(row[2], []).append(row)
    studies: list[dict] = []
    for name, wanted in zip(CLASSES, apportion(n, [1] * len(CLASSES))):
        pool = sorted(study for study, rows in by_study.items() if rows[0][3] == name)
        count = 0
        for k in rng.permutation(len(pool)):
            rows = by_study[pool[k]]
            if count + len(rows) > wanted:
                continue
            view = str(rng.choice(["PA", "AP"]))
            studies.append({"subject": rows[0][1], "study": rows[0][2], "split": "train",
                            "sex": "F" if rng.random() < 0.5 else "M",
                            "exam": "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)",
                            "views": [view] * len(rows), "dicoms": [row[0] for row in rows],
                            "values": ["1.0" if label == name else "" for label in LABELS]})
            count += len(rows)
            if count == wanted:
                break
    return studies


VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral", "": ""}


def _gz(rows: list[str]) -> bytes:
    return gzip.compress(("\n".join(rows) + "\n").encode(), compresslevel=9, mtime=0)


def synth_mimic_cxr(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 512, progress: bool = True) -> dict:
    """Write a synthetic MIMIC-CXR-JPG 2.0.0 release of ``n`` images, with reports, to ``out``.

    Layout (the release folder itself): ``files/pXX/p<subject>/s<study>/<dicom_id>.jpg`` (grayscale
    JPEG, ``size`` px on the short side, up to 1.2x on the long side, the size written as Rows x
    Columns), ``mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}.csv.gz`` (real headers; StudyTime as a
    float that drops the leading zero; some empty ViewPosition and PatientOrientation values; one
    study with no label row when n >= 20), ``mimic-cxr-reports.zip`` (members ``files/pXX/p<subject>/
    s<study>.txt``) and ``VLPBENCH_SYNTHETIC.json``. Subjects go to train / validate / test 70 / 15 /
    15 %; from n = 20 on, 15 % of the images are MIMIC-5x200 images in train (module docstring). The negbio
    rows copy the chexpert rows. Frontal images show the study's ``1.0`` findings
    among :data:`vlpbench.synthetic.chexpert.FINDINGS`; laterals show none. Deterministic per ``seed``.

    Returns:
        ``{"n", "path", "images": {dicom_id: {"findings", "view", "size"}}, "reports": {study_id:
        {"FINDINGS", "IMPRESSION", "variant", "addendum"}}, "unlabelled": [study_id, ...]}``.

    Raises:
        DataError: ``out`` holds other data, or a shipped label file is missing.
        ValueError: ``n`` below 3 or ``size`` below 32.
    """
    out = Path(out)
    if n < 3:
        raise ValueError(f"n must be at least 3, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    prepare_output(out, ("files", REPORTS_ZIP, *FILES.values()))
    rng = np.random.default_rng(seed)
    n_five = round(n * FIVE_SHARE) if n >= FIVE_FROM else 0
    invented = _studies(rng, n - n_five)
    chexpert = _chexpert_rows()
    unlabelled = {invented[int(rng.integers(len(invented)))]["study"]} if n >= 20 else set()
    studies = invented + _five_studies(rng, n_five, invented)
    if (out / "files").exists():
        shutil.rmtree(out / "files")
    write_marker(out, "mimic_cxr", n, seed)

    metadata, split_rows, label_rows = [",".join(METADATA_COLUMNS)], [",".join(SPLIT_COLUMNS)], [",".join(LABEL_COLUMNS)]
    images, reports = {}, {}
    buffer = io.BytesIO()
    archive = zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED)
    index = 0
    with tqdm(total=n, desc="synth mimic_cxr", unit="image", disable=not progress) as bar:
        for k, study in enumerate(studies):
            study_rng = np.random.default_rng([seed, n + k])
            values = study.get("values") or chexpert[int(study_rng.integers(len(chexpert)))]
            findings = [name for name in FINDINGS if values[LABELS.index(name)] == "1.0"]
            subject, study_id = study["subject"], study["study"]
            folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
            if study_id not in unlabelled:
                label_rows.append(",".join([subject, study_id, *values]))
            text, facts = write_report(study_rng, findings, exam=study["exam"], sex=study["sex"])
            member = zipfile.ZipInfo(f"{folder.as_posix()}/s{study_id}.txt", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(member, text, compress_type=zipfile.ZIP_DEFLATED)
            reports[study_id] = facts
            date = f"21{int(study_rng.integers(10, 99))}{int(study_rng.integers(1, 13)):02d}{int(study_rng.integers(1, 29)):02d}"
            # The first study is before 10:00, so its StudyTime shows the lost leading zero.
            seconds = int(study_rng.integers(0, 36000 if k == 0 else 86400))
            clock = seconds // 3600 * 10000 + seconds // 60 % 60 * 100 + seconds % 60
            study_time = repr(round(clock + int(study_rng.integers(0, 1000)) / 1000, 3))
            for view, dicom in zip(study["views"], study["dicoms"]):
                image_rng = np.random.default_rng([seed, index])
                frontal = view in ("PA", "AP")
                long_side = int(round(size * image_rng.uniform(1.0, MAX_ASPECT)))
                rows, columns = (long_side, size) if image_rng.random() < 0.7 else (size, long_side)
                drawn = findings if frontal else []
                pixels = draw([seed, index], drawn, (rows, columns), frontal=frontal)
                target = out / folder / f"s{study_id}" / f"{dicom}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target, format="JPEG", quality=90)
                orientation = "" if view == "" else ("Recumbent" if view == "AP" and image_rng.random() < 0.3 else "Erect")
                metadata.append(",".join([dicom, subject, study_id, study["exam"], view, str(rows), str(columns),
                                          date, study_time, study["exam"], VIEW_MEANING[view], orientation]))
                split_rows.append(",".join([dicom, study_id, subject, study["split"]]))
                images[dicom] = {"findings": drawn, "view": view, "size": (rows, columns)}
                index += 1
                bar.update()
    archive.close()
    (out / REPORTS_ZIP).write_bytes(buffer.getvalue())
    for kind, rows in (("metadata", metadata), ("split", split_rows), ("chexpert", label_rows), ("negbio", label_rows)):
        (out / FILES[kind]).write_bytes(_gz(rows))
    return {"n": n, "path": str(out), "images": images, "reports": reports, "unlabelled": sorted(unlabelled)}
