import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from yolc_kd.cli import main
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.synth import make_synthetic_dataset

REAL_LAYOUT = SHARED / "data" / "visdrone2019-det-train-first50image.json"


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _boxes_per_image(ann: dict) -> dict:
    out = {img["id"]: [] for img in ann["images"]}
    for a in ann["annotations"]:
        out[a["image_id"]].append(a["bbox"])
    return {k: np.asarray(v, dtype=float).reshape(-1, 4) for k, v in out.items()}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    a = _files(make_synthetic_dataset(tmp_path / "a", 3, seed=5, size=(160, 96)))
    b = _files(make_synthetic_dataset(tmp_path / "b", 3, seed=5, size=(160, 96)))
    c = _files(make_synthetic_dataset(tmp_path / "c", 3, seed=6, size=(160, 96)))
    assert sorted(a) == ["annotations.json", "images/000000.png", "images/000001.png", "images/000002.png"]
    assert a == b
    assert a["images/000000.png"] != c["images/000000.png"] and a["annotations.json"] != c["annotations.json"]


def test_boxes_inside_image_and_tiny(tmp_path):
    out = make_synthetic_dataset(tmp_path, 6, seed=1)
    ann = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in ann["categories"]][:3] == ["pedestrian", "people", "bicycle"]
    assert [c["id"] for c in ann["categories"]] == list(range(1, 11))
    assert len(ann["annotations"]) >= 6 * 15
    b = np.asarray([a["bbox"] for a in ann["annotations"]], dtype=float)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] + b[:, 2] <= 512).all() and (b[:, 1] + b[:, 3] <= 320).all()
    assert (b[:, 2:] >= 4).all() and (b[:, 2:] <= 32).all()
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in ann["annotations"])
    assert len({a["category_id"] for a in ann["annotations"]}) >= 8
    ds = CocoDetection(out / "annotations.json", out)
    assert ds.warnings == [] and ds.load_image(0).shape == (320, 512, 3)
    # the drawn object differs from the background inside its tight box
    img = ds.load_image(0).astype(int)
    x0, y0, x1, y1 = ds.annotations(0)[0][0].astype(int)
    assert np.ptp(img[y0:y1, x0:x1].reshape(-1, 3), axis=0).max() > 40


def test_objects_are_clustered(tmp_path):
    out = make_synthetic_dataset(tmp_path, 12, seed=2)
    rng = np.random.default_rng(0)
    clustered, uniform = [], []
    for boxes in _boxes_per_image(json.loads((out / "annotations.json").read_text())).values():
        for centres, acc in ((boxes[:, :2] + boxes[:, 2:] / 2, clustered),
                             (rng.uniform(0, 1, (len(boxes), 2)) * (512, 320), uniform)):
            dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
            acc.append(np.mean((dist < 48).sum(1) - 1 >= 3))
    assert np.median(clustered) > 0.5
    assert np.median(clustered) > np.median(uniform) + 0.25


def test_layout_from_small_file(tmp_path):
    layout = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 1024, "height": 640},
                   {"id": 2, "file_name": "b.jpg", "width": 2048, "height": 1280}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 20]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [600, 300, 2, 200]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1000, 600, 100, 100]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    out = make_synthetic_dataset(tmp_path / "out", 3, seed=0, num_classes=3, layout_from=path)
    per_image = _boxes_per_image(json.loads((out / "annotations.json").read_text()))
    centres = {k: v[:, :2] + v[:, 2:] / 2 for k, v in per_image.items()}
    assert np.allclose(centres[1], [[60, 55], [300.5, 200]], atol=1.5)
    # boxes scaled by 0.5, clamped to 4..32 px; the drawn shapes nearly fill them
    assert np.allclose(per_image[1][:, 2:], [[20, 10], [4, 32]], rtol=0.12, atol=1.5)
    assert np.allclose(centres[2], [[262.5, 162.5]], atol=1.5)
    assert np.allclose(per_image[2][:, 2:], 25, rtol=0.12, atol=1.5)
    assert np.allclose(centres[3], centres[1], atol=1.5)  # image i uses layout image i mod 2


@pytest.mark.skipif(not REAL_LAYOUT.exists(), reason="example VisDrone layout file not available")
def test_layout_from_real_visdrone_file(tmp_path):
    real = json.loads(REAL_LAYOUT.read_text())
    out = make_synthetic_dataset(tmp_path, 2, seed=0, layout_from=REAL_LAYOUT)
    per_image = _boxes_per_image(json.loads((out / "annotations.json").read_text()))
    img0 = real["images"][0]
    src = np.asarray([a["bbox"] for a in real["annotations"] if a["image_id"] == img0["id"]], dtype=float)
    src_centres = (src[:, :2] + src[:, 2:] / 2) * (512 / img0["width"], 320 / img0["height"])
    got = per_image[1][:, :2] + per_image[1][:, 2:] / 2
    assert len(got) >= 0.5 * len(src)
    nearest = np.linalg.norm(got[:, None] - src_centres[None], axis=-1).min(1)
    assert np.median(nearest) < 1.5 and (per_image[1][:, 2:] <= 32).all() and (per_image[1][:, 2:] >= 4).all()


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--num-images", "2", "--seed", "3",
                 "--size", "128x96", "--classes", "4"]) == 0
    ann = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert [c["name"] for c in ann["categories"]] == ["pedestrian", "people", "bicycle", "car"]
    assert {(i["width"], i["height"]) for i in ann["images"]} == {(128, 96)}
    capsys.readouterr()
    assert main(["synth", "--out", str(tmp_path / "e"), "--num-images", "1",
                 "--layout-from", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
    assert main(["synth", "--out", str(tmp_path / "e"), "--num-images", "1", "--size", "big"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
