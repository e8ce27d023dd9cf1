"""ChestX-ray14 metadata: both real files, their quirks, and bad-input errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from dist_ft.data.findings import FINDINGS, encode_findings
from dist_ft.data.metadata import MetadataError, find_metadata, read_metadata
from tests.conftest import REAL_CXR14

# Counted independently with zcat | cut -d, -f2 | tr '|' '\n' | grep -cx FINDING.
COUNTS_2017 = [11535, 2772, 4667, 2303, 13307, 2516, 1686, 227, 19870, 5746, 6323, 3385, 1353,
               5298]
COUNTS_2020 = [11559, 2776, 4667, 2303, 13317, 2516, 1686, 227, 19894, 5782, 6331, 3385, 1431,
               5302]


def test_findings_order_is_fixed() -> None:
    assert FINDINGS[0] == "Atelectasis" and FINDINGS[-1] == "Pneumothorax" and len(FINDINGS) == 14
    assert encode_findings("No Finding").sum() == 0
    assert encode_findings("Cardiomegaly|Effusion").tolist() == [
        0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0
    ]


@pytest.mark.parametrize(
    ("name", "counts", "no_finding"),
    [("Data_Entry_2017.csv.gz", COUNTS_2017, 60412),
     ("Data_Entry_2017_v2020.csv.gz", COUNTS_2020, 60361)],
)
def test_real_metadata_files_load(name: str, counts: list[int], no_finding: int) -> None:
    meta = read_metadata(REAL_CXR14 / name)
    assert len(meta) == 112_120
    assert len(np.unique(meta.patients)) == 30_805
    assert meta.labels.sum(0).tolist() == counts
    assert int((meta.labels.sum(1) == 0).sum()) == no_finding
    assert set(np.unique(meta.views)) == {"PA", "AP"}
    assert set(np.unique(meta.sexes)) == {"M", "F"}


def test_2017_quirks_are_parsed() -> None:
    meta = read_metadata(REAL_CXR14 / "Data_Entry_2017.csv.gz")
    first = dict(zip(meta.images[:2], meta.ages[:2], strict=True))
    assert first == {"00000001_000.png": 58.0, "00000001_001.png": 58.0}  # '058Y'
    assert meta.patients[0] == 1  # '00000001'
    assert np.nanmax(meta.ages) == 414  # the release has a few impossible ages; kept as read
    months = read_metadata(REAL_CXR14 / "Data_Entry_2017.csv.gz").ages
    assert np.any((months > 0) & (months < 1))  # '011M' -> 11/12 years


def test_2020_revision_differs_on_181_images() -> None:
    old = read_metadata(REAL_CXR14 / "Data_Entry_2017.csv.gz")
    new = read_metadata(REAL_CXR14 / "Data_Entry_2017_v2020.csv.gz")
    row = {name: i for i, name in enumerate(new.images)}
    order = np.array([row[n] for n in old.images])
    assert int((old.labels != new.labels[order]).any(1).sum()) == 181


def _write(tmp_path: Path, text: str, name: str = "Data_Entry_2017.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.replace("\n", "\r\n").encode())
    return path


HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,{sex},View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
ROW = "{img},{labels},000,{pid},045Y,F,PA,2500,2048,0.168,0.168,\n"


def test_patient_sex_header_variant_and_plain_csv(tmp_path: Path) -> None:
    text = HEADER.format(sex="Patient Sex") + ROW.format(img="a.png", labels="Mass", pid="00000007")
    meta = read_metadata(_write(tmp_path, text))
    assert meta.sexes.tolist() == ["F"] and meta.patients.tolist() == [7]
    assert find_metadata(tmp_path).name == "Data_Entry_2017.csv"


def test_v2020_is_preferred_when_both_exist(tmp_path: Path) -> None:
    for name in ("Data_Entry_2017.csv.gz", "Data_Entry_2017_v2020.csv"):
        (tmp_path / name).write_bytes(b"")
    assert find_metadata(tmp_path).name == "Data_Entry_2017_v2020.csv"


def test_missing_column_names_it(tmp_path: Path) -> None:
    text = "Image Index,Follow-up #,Patient ID\na.png,000,1\n"
    with pytest.raises(MetadataError, match=r"missing column 'Finding Labels'.*header is"):
        read_metadata(_write(tmp_path, text))


def test_unknown_finding_names_line_image_and_suggests(tmp_path: Path) -> None:
    text = HEADER.format(sex="Patient Gender") + ROW.format(img="a.png", labels="Mass", pid="1") \
        + ROW.format(img="b.png", labels="Effusion|Infiltrate", pid="2")
    with pytest.raises(MetadataError) as info:
        read_metadata(_write(tmp_path, text))
    text = str(info.value)
    assert ":3: b.png: unknown finding 'Infiltrate'; did you mean 'Infiltration'?" in text


def test_duplicated_image_index_names_both_lines(tmp_path: Path) -> None:
    text = HEADER.format(sex="Patient Gender") + ROW.format(img="a.png", labels="Mass", pid="1") \
        + ROW.format(img="a.png", labels="Mass", pid="1")
    message = r":3: duplicated image index 'a\.png' \(first at line 2\)"
    with pytest.raises(MetadataError, match=message):
        read_metadata(_write(tmp_path, text))


def test_bad_patient_id_and_short_row(tmp_path: Path) -> None:
    text = HEADER.format(sex="Patient Gender") + ROW.format(img="a.png", labels="Mass", pid="x1")
    with pytest.raises(MetadataError, match=r"a\.png: Patient ID 'x1' is not an integer"):
        read_metadata(_write(tmp_path, text))
    with pytest.raises(MetadataError, match=r":2: 1 fields"):
        read_metadata(_write(tmp_path, HEADER.format(sex="Patient Gender") + "a.png\n"))


def test_corrupt_gzip_and_absent_metadata(tmp_path: Path) -> None:
    bad = tmp_path / "Data_Entry_2017.csv.gz"
    bad.write_bytes(gzip.compress(b"Image Index,Finding Labels,Patient ID\n")[:-8])
    with pytest.raises(MetadataError, match="cannot read metadata"):
        read_metadata(bad)
    with pytest.raises(MetadataError, match="no ChestX-ray14 metadata file"):
        find_metadata(tmp_path / "nowhere")


@pytest.mark.parametrize("pid", ["99999999999999999999999", "9223372036854775808", "-1"])
def test_a_patient_id_out_of_range_is_named_in_the_real_file(tmp_path: Path, run_cli,
                                                             pid: str) -> None:
    # The 2017 release as shipped (CRLF, trailing commas, zero-padded ids), one id replaced.
    lines = gzip.decompress((REAL_CXR14 / "Data_Entry_2017.csv.gz").read_bytes()).split(b"\r\n")
    fields = lines[2].split(b",")
    assert fields[3] == b"00000001"  # Patient ID of 00000001_001.png
    fields[3] = pid.encode()
    lines[2] = b",".join(fields)
    path = tmp_path / "Data_Entry_2017.csv.gz"
    path.write_bytes(gzip.compress(b"\r\n".join(lines)))
    message = (rf":3: 00000001_001\.png: Patient ID '{pid}' is out of range: ids are whole "
               r"numbers from 0 to 9223372036854775807 .*correct that row")
    with pytest.raises(MetadataError, match=message):
        read_metadata(path)
    result = run_cli("data", "stats", str(tmp_path))
    assert result.code == 1 and f"{path}:3: 00000001_001.png: Patient ID '{pid}'" in result.err
    assert "Traceback" not in result.err


def test_the_largest_int64_patient_id_is_kept(tmp_path: Path) -> None:
    text = HEADER.format(sex="Patient Gender") + ROW.format(
        img="a.png", labels="Mass", pid="9223372036854775807")
    assert read_metadata(_write(tmp_path, text)).patients.tolist() == [2**63 - 1]
