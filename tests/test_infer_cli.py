"""`yolc-kd infer` end to end on a tiny random checkpoint: COCO results, viz, and one-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_cfg
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.cli import main
from yolc_kd.infer.predict import IMAGE_EXTENSIONS, Predictor, folder_source, list_image_folder
from yolc_kd.models import build_detector

# (file name, width, height): different sizes in one batch
IMAGES = (("b_scene.png", 96, 64), ("a_scene.png", 80, 120), ("c_scene.png", 64, 64))
COCO_IDS = {"b_scene.png": 7, "a_scene.png": 3, "c_scene.png": 11}
CAT_IDS = {"a": 5, "b": 6, "c": 9}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model_cfg(num_classes: int = 3) -> dict:
    cfg = tiny_model_cfg(num_classes=num_classes)
    cfg["test_cfg"]["crop"] = dict(min_patch_size=8)  # small images still get patches
    return cfg


def _write_config(path: Path, num_classes: int = 3, classes=("a", "b", "c")) -> Path:
    text = f"model = {_model_cfg(num_classes)!r}\n"
    if classes is not None:
        text += f"classes = {tuple(classes)!r}\n"
    path.write_text(text, encoding="utf-8")
    return path


def _tiny_model(num_classes: int = 3) -> torch.nn.Module:
    """Random weights, except that the heatmap follows the image content and boxes are ~12 px
    (a freshly initialised head gives a flat heatmap and zero-size boxes, i.e. no detections)."""
    torch.manual_seed(0)
    model = build_detector(_model_cfg(num_classes))
    head = model.bbox_head
    with torch.no_grad():
        for m in head.local_head.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.normal_(0, 0.5)
        head.reg_conv[2].weight.zero_()
        head.reg_conv[2].bias.fill_(1.0)
        head.xywh_init.weight.zero_()
        head.xywh_init.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
        head.xywh_refine.weight.zero_()
        head.xywh_refine.weight[2:4] = 1.5 / (9 * head.xywh_refine.weight.shape[1])
    return model


def _write_ckpt(path: Path, num_classes: int = 3) -> Path:
    return save_checkpoint(path, _tiny_model(num_classes), meta=dict(note="tiny random"))


def _write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, w, h in IMAGES:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _write_coco(path: Path, extra_images=(), categories=None) -> Path:
    images = [dict(id=COCO_IDS[n], file_name=n, width=w, height=h) for n, w, h in IMAGES]
    images += [dict(id=100 + i, file_name=n, width=32, height=32) for i, n in enumerate(extra_images)]
    cats = categories or [dict(id=i, name=n) for n, i in CAT_IDS.items()]
    anns = [dict(id=1, image_id=7, category_id=5, bbox=[10, 10, 20, 15], iscrowd=0, area=300),
            dict(id=2, image_id=3, category_id=9, bbox=[30, 40, 12, 12], iscrowd=0, area=144)]
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)), encoding="utf-8")
    return path


@pytest.fixture()
def setup(tmp_path):
    return dict(cfg=_write_config(tmp_path / "cfg.py"), ckpt=_write_ckpt(tmp_path / "tiny.pth"),
                images=_write_images(tmp_path / "images"), ann=_write_coco(tmp_path / "ann.json"))


def _infer(s, out, *extra) -> int:
    return main(["infer", "--config", str(s["cfg"]), "--ckpt", str(s["ckpt"]), "--out", str(out), *map(str, extra)])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("yolc-kd infer: error: ")
    return err[0]


def _check_results(preds, sizes_by_id, cat_ids):
    assert isinstance(preds, list) and preds
    for p in preds:
        assert set(p) == {"image_id", "category_id", "bbox", "score"}
        assert p["image_id"] in sizes_by_id and p["category_id"] in cat_ids
        w, h = sizes_by_id[p["image_id"]]
        x, y, bw, bh = p["bbox"]
        assert all(v == round(v, 2) for v in p["bbox"]) and p["score"] == round(p["score"], 5)
        assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6
        assert 0.0 <= p["score"] <= 1.0


# ----------------------------------------------------------------------------- success paths

def test_infer_coco_json_ids_eval_and_viz(setup, tmp_path, capsys):
    out, viz = tmp_path / "out" / "preds.json", tmp_path / "viz"
    rc = _infer(setup, out, "--ann", setup["ann"], "--images", setup["images"], "--viz", viz, "--batch-size", 2)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    preds = json.loads(out.read_text())
    sizes = {COCO_IDS[n]: (w, h) for n, w, h in IMAGES}
    _check_results(preds, sizes, set(CAT_IDS.values()))
    assert {p["image_id"] for p in preds} == set(sizes)
    assert not (tmp_path / "out" / "preds.images.json").exists()  # ids come from the json
    assert "infer: 3 images," in captured.out and "AP    @[.50:.95]" in captured.out
    pngs = sorted(p.name for p in viz.iterdir())
    assert pngs == ["a_scene.png", "b_scene.png", "c_scene.png"]
    for name, w, h in IMAGES:
        assert Image.open(viz / name).size == (w, h)
    assert list((tmp_path / "out").iterdir()) == [out]  # no temporary files left


def test_infer_folder_writes_image_map(setup, tmp_path, capsys):
    out = tmp_path / "preds.json"
    rc = _infer(setup, out, "--images", setup["images"], "--batch-size", 3, "--fusion", "replace",
                "--max-patches", 2)
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "preds.images.json").read_text())
    by_name = {n: (w, h) for n, w, h in IMAGES}
    assert [im["file_name"] for im in side["images"]] == sorted(by_name)  # ids 1..N in sorted order
    assert [im["id"] for im in side["images"]] == [1, 2, 3]
    assert all((im["width"], im["height"]) == by_name[im["file_name"]] for im in side["images"])
    assert side["categories"] == [dict(id=1, name="a"), dict(id=2, name="b"), dict(id=3, name="c")]
    sizes = {im["id"]: (im["width"], im["height"]) for im in side["images"]}
    preds = json.loads(out.read_text())
    _check_results(preds, sizes, {1, 2, 3})
    assert {p["image_id"] for p in preds} == {1, 2, 3}


def test_missing_image_is_skipped_without_strict(setup, tmp_path, capsys):
    ann = _write_coco(tmp_path / "ann_missing.json", extra_images=["gone.png"])
    out = tmp_path / "preds.json"
    rc = _infer(setup, out, "--ann", ann, "--images", setup["images"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "gone.png" in captured.err and "skipped 1 unreadable image" in captured.err
    assert "infer: 3 images," in captured.out
    assert {p["image_id"] for p in json.loads(out.read_text())} == set(COCO_IDS.values())


def test_corrupt_image_is_skipped_without_strict(setup, tmp_path, capsys):
    (setup["images"] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "preds.json"
    assert _infer(setup, out, "--images", setup["images"]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err
    side = json.loads((tmp_path / "preds.images.json").read_text())
    assert [im["id"] for im in side["images"]] == [1, 2, 4]  # broken.jpg keeps its id 3 in sorted order


# ----------------------------------------------------------------------------- errors: exit 1, one stderr line

def test_strict_missing_image_is_an_error(setup, tmp_path, capsys):
    ann = _write_coco(tmp_path / "ann_missing.json", extra_images=["gone.png"])
    assert _infer(setup, tmp_path / "p.json", "--ann", ann, "--images", setup["images"], "--strict") == 1
    line = _error_line(capsys)
    assert "1 of 4 images not found" in line and "gone.png" in line  # checked before the model runs
    assert not (tmp_path / "p.json").exists()


def test_strict_corrupt_image_is_an_error(setup, tmp_path, capsys):
    (setup["images"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"], "--strict") == 1
    assert "broken.png" in _error_line(capsys)


def test_only_unreadable_images_is_an_error(setup, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"nope")
    assert _infer(setup, tmp_path / "p.json", "--images", folder) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "x.png" in err[0] and err[-1] == "yolc-kd infer: error: none of the 1 image(s) could be read"


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"garbage", b"", None])
def test_unreadable_checkpoint(setup, tmp_path, capsys, content):
    ckpt = tmp_path / "bad.pth"
    if content is not None:
        ckpt.write_bytes(content)
    setup = dict(setup, ckpt=ckpt)
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"]) == 1
    assert "bad.pth" in _error_line(capsys)


def test_class_count_mismatch_config_vs_checkpoint(setup, tmp_path, capsys):
    setup = dict(setup, ckpt=_write_ckpt(tmp_path / "two.pth", num_classes=2))
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"]) == 1
    assert "checkpoint has 2 classes, the config 3" in _error_line(capsys)


def test_class_count_mismatch_config_vs_coco(setup, tmp_path, capsys):
    cats = [dict(id=i, name=n) for i, n in enumerate("abcd", start=1)]
    ann = _write_coco(tmp_path / "four.json", categories=cats)
    assert _infer(setup, tmp_path / "p.json", "--ann", ann, "--images", setup["images"]) == 1
    assert "4 categories but the model has 3 classes" in _error_line(capsys)
    cats = [dict(id=1, name="a"), dict(id=2, name="b"), dict(id=3, name="z")]
    ann = _write_coco(tmp_path / "renamed.json", categories=cats)
    assert _infer(setup, tmp_path / "p.json", "--ann", ann, "--images", setup["images"]) == 1
    assert "'c' is not a category name" in _error_line(capsys)


def test_config_classes_vs_model_classes(setup, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg4.py", num_classes=3, classes=("a", "b", "c", "d"))
    assert _infer(dict(setup, cfg=cfg), tmp_path / "p.json", "--images", setup["images"]) == 1
    assert "'classes' lists 4 names but model.bbox_head.num_classes is 3" in _error_line(capsys)


def test_empty_or_missing_image_folder(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert _infer(setup, tmp_path / "p.json", "--images", empty) == 1
    assert "no images" in _error_line(capsys)
    assert _infer(setup, tmp_path / "p.json", "--images", tmp_path / "nowhere") == 1
    assert "image folder not found" in _error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(setup, tmp_path, capsys):
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"], "--device", "cuda") == 1
    assert "CUDA is not available" in _error_line(capsys)


def test_bad_numbers(setup, tmp_path, capsys):
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"], "--batch-size", 0) == 1
    assert "--batch-size" in _error_line(capsys)
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"], "--max-patches", -1) == 1
    assert "--max-patches" in _error_line(capsys)


# ----------------------------------------------------------------------------- library API

def test_folder_listing_and_predictor_api(setup, tmp_path):
    (setup["images"] / "UPPER.JPG").write_bytes(b"")  # listed by extension, case-insensitive
    (setup["images"] / "sub.png").mkdir()  # a folder is not an image
    items = list_image_folder(setup["images"])
    assert [i.file_name for i in items] == ["UPPER.JPG", "a_scene.png", "b_scene.png", "c_scene.png"]
    assert [i.image_id for i in items] == [1, 2, 3, 4] and ".webp" in IMAGE_EXTENSIONS
    assert folder_source(setup["images"], ("a", "b", "c")).label_to_cat_id == [1, 2, 3]

    model = _tiny_model()
    predictor = Predictor(model, {}, fusion="nms", max_patches=2)
    assert not model.training
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)]
    preds = predictor(imgs, keep_heatmap=True)
    for img, p in zip(imgs, preds):
        h, w = img.shape[:2]
        assert p.heatmap.shape == (3, h, w)  # cropped to the image content
        assert len(p.boxes) == len(p.scores) == len(p.labels) > 0
        assert (p.boxes >= 0).all() and (p.boxes[:, [0, 2]] <= w).all() and (p.boxes[:, [1, 3]] <= h).all()
        assert len(p.regions) <= 2


def test_crop_model_picks_the_crops(setup, tmp_path, capsys):
    """--crop-config/--crop-ckpt: LSM on the crop model's heatmap; refine and fusion stay with the model."""
    model = _tiny_model()
    images = [np.asarray(Image.open(setup["images"] / name).convert("RGB")) for name, _, _ in IMAGES]
    plain = Predictor(model, {"model": _model_cfg()}, device="cpu")(images)
    same = Predictor(model, {"model": _model_cfg()}, device="cpu", crop_model=_tiny_model())(images)
    for a, b in zip(plain, same):  # the same weights as crop model: the same crops and detections
        np.testing.assert_array_equal(a.regions, b.regions)
        np.testing.assert_array_equal(a.boxes, b.boxes)

    class CornerCrops(torch.nn.Module):  # a crop model whose LSM region is each image's top-left quarter
        def lsm_coords(self, img, metas):
            return [np.array([[0, 0, m["img_shape"][1] // 2, m["img_shape"][0] // 2]]) for m in metas]

    lent = Predictor(model, {"model": _model_cfg()}, device="cpu", crop_model=CornerCrops())(images)
    for pred, (_, w, h) in zip(lent, IMAGES):
        cw, ch = w // 2, h // 2  # enlarged 1.2x about its centre, clamped to the image
        x1, y1 = max(0, round(cw / 2 - cw * 0.6)), max(0, round(ch / 2 - ch * 0.6))
        x2, y2 = min(w, round(cw / 2 + cw * 0.6)), min(h, round(ch / 2 + ch * 0.6))
        np.testing.assert_array_equal(pred.regions, [[x1, y1, x2 - x1, y2 - y1]])
    torch.manual_seed(5)
    other = build_detector(_model_cfg())
    # the command
    crop_ckpt = save_checkpoint(tmp_path / "crop.pth", other)
    assert _infer(setup, tmp_path / "p.json", "--images", setup["images"], "--crop-config", setup["cfg"],
                  "--crop-ckpt", crop_ckpt) == 0
    assert json.loads((tmp_path / "p.json").read_text())
    capsys.readouterr()
    assert _infer(setup, tmp_path / "q.json", "--images", setup["images"], "--crop-config", setup["cfg"]) == 1
    assert "--crop-config and --crop-ckpt go together" in _error_line(capsys)
    four = _write_config(tmp_path / "four.py", num_classes=4, classes=("a", "b", "c", "d"))
    assert _infer(setup, tmp_path / "q.json", "--images", setup["images"], "--crop-config", four,
                  "--crop-ckpt", crop_ckpt) == 1
    assert "must share the classes" in _error_line(capsys)
