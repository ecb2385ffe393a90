"""`yolc-kd make-crops`: YOLC's crop training set (originals + ground-truth LSM crops) in one COCO json."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model_cfg
from yolc_kd.cli import main
from yolc_kd.crops import find_clusters, select_regions
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.make_crops import crop_regions, gt_heatmap, largest_regions, make_crop_dataset

CLUSTER = [[10 + i * 24, 10 + j * 24, 14, 14] for i in range(6) for j in range(5)]  # top-left corner
FAR = [350, 250, 20, 20]  # alone in the bottom-right corner
CATEGORIES = [{"id": 1, "name": "pedestrian"}, {"id": 2, "name": "people"}, {"id": 3, "name": "bicycle"}]


def _image(path, size, seed):
    """Smooth gradients plus a 16-px checker (JPEG-friendly, position-sensitive), never near black."""
    y, x = np.mgrid[0:size[1], 0:size[0]]
    checker = ((x // 16 + y // 16 + seed) % 2) * 40
    arr = np.stack([80 + x * 80 // size[0] + checker, 80 + y * 80 // size[1] + checker, 120 + checker], axis=2)
    arr = arr.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_source(tmp_path):
    """Two images under src/images (one in a sub-folder) and their COCO json; returns (ann, root)."""
    root = tmp_path / "src" / "images"
    _image(root / "seq1" / "img_a.png", (400, 300), 0)
    _image(root / "img_b.jpg", (480, 320), 1)
    anns = [dict(image_id=10, bbox=b, category_id=1 + k % 3) for k, b in enumerate(CLUSTER + [FAR])]
    anns.append(dict(image_id=10, bbox=[40, 40, 10, 10], category_id=2, iscrowd=1))  # inside the cluster
    anns.append(dict(image_id=10, bbox=[1, 2, "x", 4], category_id=1))  # malformed: left out, counted
    anns += [dict(image_id=20, bbox=[260 + 30 * i, 150 + 30 * j, 16, 14], category_id=3)
             for i in range(6) for j in range(5)]
    for k, a in enumerate(anns):
        a.update(id=100 + k, area=0, iscrowd=a.get("iscrowd", 0))
    coco = {"images": [dict(id=10, file_name="seq1/img_a.png", width=400, height=300),
                       dict(id=20, file_name="img_b.jpg", width=480, height=320)],
            "annotations": anns, "categories": CATEGORIES, "info": {"description": "test"}}
    ann = tmp_path / "src" / "ann.json"
    ann.write_text(json.dumps(coco))
    return ann, root


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path)


def _by_name(coco):
    return {im["file_name"]: im for im in coco["images"]}


def _anns_of(coco, image_id):
    return [a for a in coco["annotations"] if a["image_id"] == image_id]


def test_crop_boxes_are_source_boxes_scaled_and_shifted(tmp_path, source):
    ann, root = source
    s = make_crop_dataset(ann, root, tmp_path / "out", progress=False)
    out = json.loads(s.ann_file.read_text())
    src = json.loads(ann.read_text())
    assert out["categories"] == CATEGORIES and out["info"] == {"description": "test"}
    names = _by_name(out)
    assert set(names) == {"seq1/img_a.png", "seq1/img_a_part1.jpg", "img_b.jpg", "img_b_part1.jpg"}
    assert (s.images, s.crops, s.dropped_annotations) == (2, 2, 1)
    assert len({im["id"] for im in out["images"]}) == 4 and len({a["id"] for a in out["annotations"]}) == len(
        out["annotations"])
    # originals: same bytes, all usable annotations with their fields and new ids
    a_full, crop = names["seq1/img_a.png"], names["seq1/img_a_part1.jpg"]
    assert (s.image_root / "seq1/img_a.png").read_bytes() == (root / "seq1/img_a.png").read_bytes()
    assert len(_anns_of(out, a_full["id"])) == len(CLUSTER) + 2
    # the crop: the region YOLC's pipeline gives, the content centred on a >= 1024x640 black canvas
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in CLUSTER + [FAR]], np.float32)
    _, coords = find_clusters(gt_heatmap(boxes, (300, 400)))
    expected = select_regions(largest_regions(coords, 1, 96), (300, 400), max_patches=1, min_size=0, enlarge=1.2)
    rx, ry, rw, rh = crop["crop"]["region"]
    assert [rx, ry, rw, rh] == expected[0].tolist()
    assert crop["crop"]["source_image_id"] == a_full["id"] and crop["crop"]["scale"] == 1.5
    cw, ch = int(rw * 1.5), int(rh * 1.5)
    left, top = (1024 - cw) // 2, (640 - ch) // 2
    assert crop["crop"]["offset"] == [left, top] and (crop["width"], crop["height"]) == (1024, 640)
    img = np.asarray(Image.open(s.image_root / crop["file_name"]), dtype=np.int64)
    assert img.shape == (640, 1024, 3)
    assert img[:top - 8].max() < 12 and img[:, :left - 8].max() < 12 and img[:, left + cw + 8:].max() < 12
    assert img[top + 4:top + ch - 4, left + 4:left + cw - 4].min() > 30
    src_pix = np.asarray(Image.open(root / "seq1/img_a.png").crop((rx, ry, rx + rw, ry + rh))
                         .resize((cw, ch), Image.BILINEAR), dtype=np.int64)
    assert np.abs(img[top:top + ch, left:left + cw] - src_pix).mean() < 3  # JPEG noise only
    # boxes: exactly the source boxes wholly inside the region, x1.5, plus the pad offset
    inside = [a for a in src["annotations"][:len(CLUSTER) + 2] if rx <= a["bbox"][0] and ry <= a["bbox"][1]
              and a["bbox"][0] + a["bbox"][2] <= rx + rw and a["bbox"][1] + a["bbox"][3] <= ry + rh]
    assert 0 < len(inside) < len(CLUSTER) + 2  # some cluster boxes straddle the edge, FAR is outside
    got = sorted(_anns_of(out, crop["id"]), key=lambda a: a["bbox"])
    want = sorted(inside, key=lambda a: a["bbox"])
    assert [a["bbox"] for a in got] == [[(x - rx) * 1.5 + left, (y - ry) * 1.5 + top, w * 1.5, h * 1.5]
                                        for x, y, w, h in (a["bbox"] for a in want)]
    assert [(a["category_id"], a["iscrowd"]) for a in got] == [(a["category_id"], a["iscrowd"]) for a in want]
    assert any(a["iscrowd"] == 1 for a in got)  # crowd boxes travel with the crop, still flagged
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in got)


def test_output_reads_with_coco_detection_and_trains(tmp_path, source, capsys):
    ann, root = source
    out = tmp_path / "out"
    assert main(["make-crops", "--ann", str(ann), "--images", str(root), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "2 images + 2 crops" in printed.out and "left out 1 unusable annotation" in printed.err
    coco = CocoDetection(out / "annotations.json", out / "images")
    assert len(coco) == 4 and coco.classes == ("pedestrian", "people", "bicycle")
    assert coco.warnings == [f"{out / 'annotations.json'}: dropped 2 annotation(s) with iscrowd=1"]  # full + crop
    i = next(k for k in range(len(coco)) if coco.image_info(k)["file_name"] == "img_b_part1.jpg")
    assert coco.load_image(i).shape == (640, 1024, 3) and len(coco.annotations(i)[0]) > 0
    cfg = tmp_path / "tiny.py"
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                dict(type="RandomCenterCropPad", crop_size=(128, 96), ratios=(1.0,), mean=[0, 0, 0], std=[1, 1, 1],
                     to_rgb=True, test_pad_mode=None),
                dict(type="Resize", img_scale=(128, 96), keep_ratio=True),
                dict(type="Normalize", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)]
    cfg.write_text(f"model = {tiny_model_cfg(num_classes=3)!r}\nclasses = ('pedestrian', 'people', 'bicycle')\n"
                   f"train_pipeline = {pipeline!r}\ndata = dict(samples_per_gpu=2, workers_per_gpu=0)\n"
                   "optimizer = dict(type='Adam', lr=0.001)\nrunner = dict(type='IterBasedRunner', max_iters=1)\n")
    assert main(["train", "--config", str(cfg), "--ann", str(out / "annotations.json"), "--images",
                 str(out / "images"), "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 0
    assert (tmp_path / "w" / "latest.pth").exists()


def test_largest_regions_follow_gen_crop_area_rule():
    coords = np.array([[0, 0, 96, 96], [0, 0, 200, 50], [0, 0, 40, 40], [0, 0, 100, 100]])
    assert largest_regions(coords, 1, 96).tolist() == [[0, 0, 200, 50]]  # area 10000 >= 96*96
    assert largest_regions(coords, 3, 96).tolist() == [[0, 0, 200, 50], [0, 0, 100, 100], [0, 0, 96, 96]]
    assert largest_regions(coords, 4, 97).tolist() == [[0, 0, 200, 50], [0, 0, 100, 100]]
    assert largest_regions(np.zeros((0, 4)), 1, 96).shape == (0, 4)


def test_heatmap_peaks_at_truncated_centres_with_yolc_radius():
    heat = gt_heatmap(np.array([[10, 10, 31, 25]], np.float32), (40, 50))
    assert heat.shape == (1, 1, 40, 50) and heat.dtype == np.float32
    assert heat[0, 0, 17, 20] == 1.0 and heat.max() == 1.0  # centre (20.5, 17.5) truncated
    assert heat[0, 0, 0, 0] == 0.0 and heat[0, 0, 17, 21] < 1.0
    assert crop_regions(np.zeros((0, 4)), (300, 400)).shape == (0, 4)  # no boxes: no crop (YOLC crashes)


def test_more_crops_small_canvas_and_min_size(tmp_path, source):
    ann, root = source
    s = make_crop_dataset(ann, root, tmp_path / "o1", crops_per_image=3, min_size=0, min_canvas=(8, 8),
                          progress=False)
    out = json.loads(s.ann_file.read_text())
    crops = [im for im in out["images"] if "crop" in im]
    assert s.crops == len(crops) > 2 and {im["file_name"] for im in crops} >= {"seq1/img_a_part2.jpg"}
    for im in crops:  # no pad needed: the canvas is the resized region, offset 0
        _, _, rw, rh = im["crop"]["region"]
        assert (im["width"], im["height"]) == (int(rw * 1.5), int(rh * 1.5)) and im["crop"]["offset"] == [0, 0]
        assert all(a["bbox"][0] + a["bbox"][2] <= im["width"] for a in _anns_of(out, im["id"]))
    s = make_crop_dataset(ann, root, tmp_path / "o2", min_size=10_000, progress=False)
    assert (s.images, s.crops) == (2, 0)


def test_rerun_into_own_output_and_unreadable_image_is_skipped(tmp_path, source, capsys):
    ann, root = source
    out = tmp_path / "out"
    args = ["make-crops", "--ann", str(ann), "--images", str(root), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0  # its own output may be rewritten
    (root / "img_b.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 of 2 image(s) that could not be read" in err and "img_b.jpg" in err
    listed = set(_by_name(json.loads((out / "annotations.json").read_text())))
    assert listed == {"seq1/img_a.png", "seq1/img_a_part1.jpg"}
    on_disk = {p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert on_disk == listed  # the earlier run's img_b.jpg and its crop are gone
    assert "removed 2 file(s) an earlier make-crops run had left" in err


def test_rerun_with_fewer_crops_leaves_no_stale_crop(tmp_path, source):
    ann, root = source
    out = tmp_path / "out"
    first = make_crop_dataset(ann, root, out, crops_per_image=3, min_size=0, min_canvas=(8, 8), progress=False)
    assert (out / "images" / "seq1" / "img_a_part2.jpg").is_file()
    assert not any("removed" in w for w in first.warnings)
    again = make_crop_dataset(ann, root, out, crops_per_image=1, progress=False)
    on_disk = {p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert on_disk == set(_by_name(json.loads(again.ann_file.read_text())))
    assert not (out / "images" / "seq1" / "img_a_part2.jpg").exists()
    assert any("removed" in w for w in again.warnings)


def _fails(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("yolc-kd make-crops: error: ")
    for n in needles:
        assert n in err, err
    return err


def test_user_errors_get_one_line(tmp_path, source, capsys):
    ann, root = source
    out = str(tmp_path / "out")

    def run(*extra, a=str(ann), images=str(root), o=out):
        return ["make-crops", "--ann", a, "--images", images, "--out", o, "--no-progress", *extra]

    _fails(capsys, run(a=str(tmp_path / "nope.json")), "annotation file not found")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    _fails(capsys, run(a=str(garbage)), "malformed JSON")
    _fails(capsys, run(images=str(tmp_path / "missing")), "image root not found")
    _fails(capsys, run(images=str(tmp_path / "src")), "none of the 2 images", "0 found", f"--images {root}")
    _fails(capsys, run(images=str(root / "seq1")), "none of the 2 images", f"--images {root}")
    _fails(capsys, run("--crops", "0"), "--crops", ">= 1, got 0")
    _fails(capsys, run("--crops", "-2"), "--crops", "got -2")
    _fails(capsys, run("--min-size", "-1"), "--min-size")
    _fails(capsys, run(o=str(root)), "is (or contains) the image root")
    _fails(capsys, run(o=str(tmp_path / "src")), "is (or contains) the image root")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    _fails(capsys, run(o=str(busy)), "already holds files", "'notes.txt'")
    a_file = tmp_path / "file"
    a_file.write_text("")
    _fails(capsys, run(o=str(a_file)), "is a file")
    assert main(run()) == 0
    _fails(capsys, run(a=os.path.join(out, "annotations.json")), "would overwrite the input annotation file")
    assert not (tmp_path / "busy" / "images").exists() and not (root / "img_a_part1.jpg").exists()


def test_crop_name_clash_and_undecodable_set(tmp_path, capsys):
    ann, root = make_source(tmp_path)
    coco = json.loads(ann.read_text())
    _image(root / "img_b_part1.jpg", (64, 64), 2)
    coco["images"].append(dict(id=30, file_name="img_b_part1.jpg", width=64, height=64))
    ann.write_text(json.dumps(coco))
    argv = ["make-crops", "--ann", str(ann), "--images", str(root), "--out", str(tmp_path / "o"), "--no-progress"]
    _fails(capsys, argv, "img_b_part1.jpg", "already uses")
    coco["images"].pop()
    ann.write_text(json.dumps(coco))
    for p in (root / "seq1" / "img_a.png", root / "img_b.jpg"):
        p.write_bytes(b"\x89PNG broken")
    _fails(capsys, argv, "none of the 2 images", "could be read")


def test_summary_counts_read_in_the_singular_for_one():
    from yolc_kd.commands.make_crops import _count

    assert [_count(1, "image"), _count(2, "crop"), _count(0, "crop"), _count(1, "box", "boxes"),
            _count(3, "box", "boxes")] == ["1 image", "2 crops", "0 crops", "1 box", "3 boxes"]
