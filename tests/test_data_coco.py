import json
import os

import numpy as np
import pytest
from PIL import Image

from yolc_kd.data.coco import CocoDetection
from yolc_kd.errors import UserError


def _write(tmp_path, images, annotations, categories=None, name="ann.json"):
    categories = categories if categories is not None else [
        {"id": 7, "name": "car"}, {"id": 3, "name": "person"}, {"id": 5, "name": "bus"}]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _img(i, name=None, w=100, h=50):
    return {"id": i, "file_name": name or f"{i}.png", "width": w, "height": h}


def _ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def test_label_order_follows_classes_or_sorted_ids(tmp_path):
    path = _write(tmp_path, [_img(1)], [_ann(1, 1, 7, [1, 2, 3, 4]), _ann(2, 1, 3, [10, 10, 5, 5])])
    ds = CocoDetection(path, tmp_path)
    assert ds.classes == ("person", "bus", "car") and ds.label_to_cat_id == [3, 5, 7]
    assert ds.annotations(0)[1].tolist() == [2, 0]
    ds = CocoDetection(path, tmp_path, classes=["car", "person"])
    assert ds.classes == ("car", "person") and ds.label_to_cat_id == [7, 3]
    boxes, labels = ds.annotations(0)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    assert boxes.tolist() == [[1, 2, 4, 6], [10, 10, 15, 15]] and labels.tolist() == [0, 1]
    with pytest.raises(UserError, match="truck"):
        CocoDetection(path, tmp_path, classes=["car", "truck"])


def test_unknown_category_counted_and_empty_images_kept(tmp_path):
    path = _write(tmp_path, [_img(1), _img(2), _img(3)],
                  [_ann(1, 1, 7, [1, 1, 5, 5]), _ann(2, 1, 5, [1, 1, 5, 5]), _ann(3, 1, 99, [1, 1, 5, 5])])
    ds = CocoDetection(path, tmp_path, classes=["car"])
    assert len(ds) == 3
    assert ds.stats["dropped_unknown_category"] == 2 and ds.stats["annotations"] == 1
    assert ds.stats["images_without_annotations"] == 2
    boxes, labels = ds.annotations(2)
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    assert any("2 annotation(s) with a category id outside" in w for w in ds.warnings)


def test_bad_boxes_dropped_or_clipped(tmp_path):
    anns = [
        _ann(1, 1, 7, [10, 10, 0, 5]),          # zero width
        _ann(2, 1, 7, [10, 10, 5, -1]),         # negative height
        _ann(3, 1, 7, [-5, 40, 20, 20]),        # partly outside: clipped
        _ann(4, 1, 7, [200, 10, 5, 5]),         # entirely outside
        _ann(5, 1, 7, [1, 1, 5, 5], iscrowd=1),
        _ann(6, 42, 7, [1, 1, 5, 5]),           # unknown image id
        _ann(7, 1, 7, [1, 1, 5]),               # malformed
        _ann(8, 1, 7, [20, 20, 10, 10]),        # fine
    ]
    ds = CocoDetection(_write(tmp_path, [_img(1)], anns), tmp_path)
    boxes, _ = ds.annotations(0)
    assert boxes.tolist() == [[0, 40, 15, 50], [20, 20, 30, 30]]
    s = ds.stats
    assert (s["dropped_degenerate"], s["dropped_outside"], s["dropped_crowd"], s["dropped_orphan"],
            s["dropped_malformed"], s["clipped"], s["annotations"]) == (2, 1, 1, 1, 1, 1, 2)
    assert len(ds.warnings) == 6


def test_image_info_index_and_load(tmp_path):
    Image.new("RGB", (100, 50), (5, 6, 7)).save(tmp_path / "a b.png")
    ds = CocoDetection(_write(tmp_path, [_img(10, "a b.png"), _img(4)], []), tmp_path)
    info = ds.image_info(0)
    assert info == {"id": 10, "file_name": "a b.png", "width": 100, "height": 50, "path": tmp_path / "a b.png"}
    assert [ds.image_info(i)["id"] for i in range(len(ds))] == [10, 4]  # the json's order
    assert ds.load_image(0).shape == (50, 100, 3)
    with pytest.raises(UserError, match="4.png"):
        ds.load_image(1)


def test_missing_size_read_from_file(tmp_path):
    Image.new("L", (33, 21)).save(tmp_path / "s.png")
    ds = CocoDetection(_write(tmp_path, [{"id": 1, "file_name": "s.png"}], [_ann(1, 1, 7, [30, 0, 10, 10])]),
                       tmp_path)
    assert (ds.image_info(0)["width"], ds.image_info(0)["height"]) == (33, 21)
    assert ds.annotations(0)[0].tolist() == [[30, 0, 33, 10]]


def test_duplicate_image_id(tmp_path):
    with pytest.raises(UserError, match="duplicate image id 3"):
        CocoDetection(_write(tmp_path, [_img(3), _img(3, "x.png")], []), tmp_path)


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/passwd"])
def test_traversal_refused(tmp_path, name):
    with pytest.raises(UserError, match="escapes the image root"):
        CocoDetection(_write(tmp_path, [_img(1, name)], []), tmp_path)


def test_malformed_and_missing_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(UserError, match="bad.json"):
        CocoDetection(bad, tmp_path)
    bad.write_bytes(b'{"images": ["\xff"]}')
    with pytest.raises(UserError, match="bad.json"):
        CocoDetection(bad, tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="bad.json"):
        CocoDetection(bad, tmp_path)
    with pytest.raises(UserError, match="missing.json"):
        CocoDetection(tmp_path / "missing.json", tmp_path)


def test_non_utf8_file_name(tmp_path):
    name = os.fsdecode(b"img_\xe9\xff.png")
    Image.new("RGB", (100, 50), (1, 2, 3)).save(os.path.join(str(tmp_path), name), format="PNG")
    path = _write(tmp_path, [_img(1, name), _img(2, "日本 #%.png")], [_ann(1, 1, 7, [0, 0, 4, 4])])
    Image.new("RGB", (100, 50)).save(tmp_path / "日本 #%.png")
    ds = CocoDetection(path, tmp_path)
    assert tuple(ds.load_image(0)[0, 0]) == (1, 2, 3)
    assert ds.load_image(1).shape == (50, 100, 3)
