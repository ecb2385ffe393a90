import json

import pytest
from PIL import Image

from yolc_kd.cli import main
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.visdrone import VISDRONE_CLASSES, convert_visdrone
from yolc_kd.errors import UserError

SAMPLE_TXT = (
    "10,20,30,40,1,4,0,0\n"
    "0,0,5,5,0,0,0,0\n"          # ignored region: dropped
    "50,50,10,10,1,11,0,0\n"     # others: dropped
    "90,70,20,20,1,1,0,1,\n"     # crosses the border (and a trailing comma): clipped
    "\n"
    "0,0,100,80,1,9,1,0\n"       # touches all borders: kept as is
)

EXPECTED = {
    "images": [
        {"id": 1, "file_name": "0001.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "0002.png", "width": 50, "height": 40},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [90, 70, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [0, 0, 100, 80], "area": 8000, "iscrowd": 0},
    ],
    "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(VISDRONE_CLASSES)],
}


@pytest.fixture()
def sample(tmp_path):
    images, anns = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    anns.mkdir()
    Image.new("RGB", (50, 40)).save(images / "0002.png")  # no txt: kept without boxes
    Image.new("RGB", (100, 80)).save(images / "0001.jpg")
    (images / "notes.md").write_text("not an image")
    (anns / "0001.txt").write_text(SAMPLE_TXT)
    return images, anns


def test_convert_exact_json(sample, tmp_path):
    images, anns = sample
    out = tmp_path / "sub" / "coco.json"
    coco, stats = convert_visdrone(images, anns, out, progress=False)
    assert coco == EXPECTED
    assert json.loads(out.read_text()) == EXPECTED
    assert stats == {"images": 2, "images_without_txt": 1, "annotations": 3,
                     "dropped_ignored_or_others": 2, "clipped": 1}
    ds = CocoDetection(out, images, classes=list(VISDRONE_CLASSES))
    assert ds.annotations(0)[1].tolist() == [3, 0, 8] and ds.warnings == []


def test_malformed_line_names_file_and_line(sample):
    images, anns = sample
    (anns / "0001.txt").write_text("10,20,30,40,1,4,0,0\n1,2,3\n")
    with pytest.raises(UserError, match=r"0001\.txt line 2"):
        convert_visdrone(images, anns, progress=False)
    (anns / "0001.txt").write_text("10,20,30,40,1,4,0,0\n\n10,20,x,40,1,4,0,0\n")
    with pytest.raises(UserError, match=r"0001\.txt line 3"):
        convert_visdrone(images, anns, progress=False)
    (anns / "0001.txt").write_text("10,20,30,40,1,12,0,0\n")
    with pytest.raises(UserError, match=r"0001\.txt line 1: category 12"):
        convert_visdrone(images, anns, progress=False)


def test_corrupt_image_named(sample):
    images, anns = sample
    (images / "0003.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="0003.jpg"):
        convert_visdrone(images, anns, progress=False)


def test_cli(sample, tmp_path, capsys):
    images, anns = sample
    out = tmp_path / "coco.json"
    assert main(["convert-visdrone", "--images", str(images), "--annotations", str(anns), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == EXPECTED
    capsys.readouterr()
    assert main(["convert-visdrone", "--images", str(tmp_path / "nope"), "--annotations", str(anns),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
