"""Per-image attributes read from files in the real formats (docs/datasets.md): CheXpert train.csv / valid.csv,
ChestX-ray14 Data_Entry (v2020 and 2017), DICOM headers written with pydicom (RSNA and SIIM), the MIMIC-CXR
metadata CSV and COVIDx label lines; values normalised, ``unknown`` kept as its own category, and a value in no
accepted form an error naming the file and line."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from vlpbench.data import attributes
from vlpbench.data.chexpert import COLUMNS, ChexpertSource
from vlpbench.data.covidx import CovidxSource
from vlpbench.data.cxr14 import Cxr14Source
from vlpbench.data.dicom import read_dicom_attributes, write_dicom
from vlpbench.data.mimic_cxr import MimicCxrSource
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.siim import SiimSource
from vlpbench.errors import DataError

UNKNOWN = attributes.UNKNOWN
EMPTY_14 = "," * 13


def _chexpert(tmp_path, rows: list[str]):
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    (folder / "train.csv").write_text(",".join(COLUMNS) + "\n" + "".join(f"{r}\n" for r in rows))
    valid = f"CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,{'0.0,' * 13}0.0"
    (folder / "valid.csv").write_text(",".join(COLUMNS) + "\n" + valid + "\n")
    return ChexpertSource(tmp_path)


def test_chexpert_sex_age_and_view_from_the_csv_columns(tmp_path):
    path = "CheXpert-v1.0-small/train/patient{:05d}/study1/view{}.jpg"
    source = _chexpert(tmp_path, [
        f"{path.format(1, '1_frontal')},Female,68,Frontal,AP,1.0{EMPTY_14}",
        f"{path.format(2, '2_lateral')},Male,83,Lateral,,{EMPTY_14}1.0",
        f"{path.format(3, '1_frontal')},Unknown,0,Frontal,PA,{EMPTY_14}",  # the real file's unknown sex and age
        f"{path.format(4, '1_frontal')},Male,41,Frontal,,{EMPTY_14}",  # frontal without AP/PA
        f"{path.format(5, '1_frontal')},Female,30,Frontal,LL,{EMPTY_14}",  # the 5x200 set's frontal LL row
    ])
    got = [source.attributes(path.format(k, view)) for k, view in
           ((1, "1_frontal"), (2, "2_lateral"), (3, "1_frontal"), (4, "1_frontal"), (5, "1_frontal"))]
    assert got == [{"sex": "F", "age": 68.0, "view": "AP"}, {"sex": "M", "age": 83.0, "view": "LATERAL"},
                   {"sex": UNKNOWN, "age": UNKNOWN, "view": "PA"}, {"sex": "M", "age": 41.0, "view": "FRONTAL"},
                   {"sex": "F", "age": 30.0, "view": "LL"}]
    assert source.attributes("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg")["age"] == 73.0
    assert source.attribute_names == ("sex", "age", "view")


@pytest.mark.parametrize("row, message", [
    ("Femme,68,Frontal,AP", "line 2: sex 'Femme'"),
    ("Female,sixty,Frontal,AP", "line 2: age 'sixty'"),
    ("Female,68,Frontal,XX", "line 2: column 'AP/PA' is 'XX'"),
])
def test_chexpert_invalid_attribute_names_file_and_line(tmp_path, row, message):
    source = _chexpert(tmp_path, [f"CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,{row},{EMPTY_14}"])
    with pytest.raises(DataError, match=message) as error:
        source.attributes("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert "train.csv" in str(error.value)


def test_cxr14_attributes_from_data_entry_v2020_and_2017(tmp_path):
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(
        header + "\n00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002\n"
        "00000002_000.png,No Finding,0,2,80,F,AP,2500,2048,0.171,0.171\n")
    source = Cxr14Source(tmp_path)
    assert source.attributes("00000001_000.png") == {"sex": "M", "age": 57.0, "view": "PA"}
    assert source.attributes("00000002_000.png") == {"sex": "F", "age": 80.0, "view": "AP"}

    old = tmp_path / "old"
    old.mkdir()  # the 2017 file: trailing commas, and ages such as 058Y or in months
    (old / "Data_Entry_2017.csv").write_text(
        header + ",\n00000003_000.png,Hernia,0,3,058Y,F,PA,2582,2991,0.143,0.143,\n"
        "00000004_000.png,Mass,0,4,006M,M,AP,2048,2500,0.168,0.168,\n")
    source = Cxr14Source(old)
    assert source.attributes("00000003_000.png") == {"sex": "F", "age": 58.0, "view": "PA"}
    assert source.attributes("00000004_000.png")["age"] == pytest.approx(0.5)


def _dicom(path, **elements):
    """A small uncompressed DICOM with only the given header elements (no pixel data is needed)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    for name, value in elements.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom warns on writing a lower-case CS value
@pytest.mark.parametrize("elements, expected", [
    ({"PatientSex": "F", "PatientAge": "045Y", "ViewPosition": "AP"}, {"sex": "F", "age": 45.0, "view": "AP"}),
    ({"PatientSex": "O", "PatientAge": "006M", "ViewPosition": "ll"}, {"sex": "O", "age": 0.5, "view": "LL"}),
    ({"PatientSex": "M", "PatientAge": "014D", "ViewPosition": ""}, {"sex": "M", "age": 14 / 365.25, "view": UNKNOWN}),
    ({"PatientSex": "", "PatientAge": "002W"}, {"sex": UNKNOWN, "age": 14 / 365.25, "view": UNKNOWN}),
    ({}, {"sex": UNKNOWN, "age": UNKNOWN, "view": UNKNOWN}),
])
def test_dicom_header_attributes_in_the_standard_forms(tmp_path, elements, expected):
    got = read_dicom_attributes(_dicom(tmp_path / "a.dcm", **elements))
    assert (got["sex"], got["view"]) == (expected["sex"], expected["view"])
    assert got["age"] == (pytest.approx(expected["age"]) if expected["age"] != UNKNOWN else UNKNOWN)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_dicom_invalid_values_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"bad\.dcm: PatientSex: sex 'X'"):
        read_dicom_attributes(_dicom(tmp_path / "bad.dcm", PatientSex="X"))
    with pytest.raises(DataError, match=r"age\.dcm: PatientAge: age '4.5Y'"):
        read_dicom_attributes(_dicom(tmp_path / "age.dcm", PatientAge="4.5Y"))
    with pytest.raises(DataError, match="not found"):
        read_dicom_attributes(tmp_path / "absent.dcm")


def test_rsna_and_siim_readers_read_the_kaggle_style_dicom_header(tmp_path):
    """write_dicom reproduces the Kaggle files (JPEG Baseline, bare-number PatientAge such as ``62``)."""
    pixels = np.full((32, 32), 90, dtype=np.uint8)
    uids = dict(sop_instance_uid="1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819",
                study_instance_uid="1.2.276.0.7230010.3.1.2.8323329.6904.1517875201.850818",
                series_instance_uid="1.2.276.0.7230010.3.1.3.8323329.6904.1517875201.850817")
    siim = tmp_path / "siim"
    write_dicom(siim / "dicom-images-train" / "s" / "r" / f"{uids['sop_instance_uid']}.dcm", pixels, **uids,
                patient_id="16d7f894-55d7-4d95-8957-d18987f0e981", patient_sex="M", patient_age=62,
                view_position="PA")
    (siim / "stage_2_train.csv").write_text(f"ImageId,EncodedPixels\n{uids['sop_instance_uid']},-1\n")
    assert SiimSource(siim).attributes(uids["sop_instance_uid"]) == {"sex": "M", "age": 62.0, "view": "PA"}

    rsna, patient = tmp_path / "rsna", "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
    write_dicom(rsna / "stage_2_train_images" / f"{patient}.dcm", pixels, **uids, patient_id=patient,
                patient_sex="F", patient_age=51, view_position="AP")
    (rsna / "stage_2_train_labels.csv").write_text(
        f"patientId,x,y,width,height,Target\n{patient},,,,,0\n00436515-870c-4b36-a041-de91049b9ab4,,,,,0\n")
    source = RsnaSource(rsna)
    assert source.attributes(patient) == {"sex": "F", "age": 51.0, "view": "AP"}
    # No image file (a folder of label files only): the attributes are absent, not guessed.
    assert source.attributes("00436515-870c-4b36-a041-de91049b9ab4") == {}


def test_mimic_view_from_the_metadata_csv(tmp_path):
    folder = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    folder.mkdir(parents=True)
    ids = ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714",
           "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab")
    (folder / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
        "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
        "PatientOrientationCodeSequence_CodeMeaning\n"
        f"{ids[0]},10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),"
        "postero-anterior,Erect\n"
        f"{ids[1]},10000032,53911762,CHEST (PORTABLE AP),AP,2705,2539,21800723,80556.875,CHEST (PORTABLE AP),"
        "antero-posterior,\n"
        f"{ids[2]},10000032,53911762,CHEST (PORTABLE AP),,2705,2539,21800723,80556.875,CHEST (PORTABLE AP),,\n")
    (folder / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\n" + "".join(f"{i},{s},10000032,train\n" for i, s in
                                                         zip(ids, ("50414267", "53911762", "53911762"))))
    (folder / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
        "10000032,50414267,,,,,,,,,1.0,,,,,\n")
    source = MimicCxrSource(tmp_path)
    assert [source.attributes(i) for i in ids] == [{"view": "PA"}, {"view": "AP"}, {"view": UNKNOWN}]
    assert source.attribute_names == ("view",)


def test_covidx_site_is_the_data_source_as_written(tmp_path):
    (tmp_path / "train_COVIDx9A.txt").write_text("3 a.jpeg pneumonia cohen\n5 b.png normal rnsa\n")
    (tmp_path / "test_COVIDx9A.txt").write_text("7 c.png COVID-19 ricord\n8 d.png normal\n")
    source = CovidxSource(tmp_path)
    assert [source.attributes(i)["site"] for i in ("a.jpeg", "b.png", "c.png", "d.png")] == [
        "cohen", "rnsa", "ricord", UNKNOWN]
