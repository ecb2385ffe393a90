import json

import numpy as np
import pytest
from PIL import Image

from yolc_kd.errors import UserError
from yolc_kd.infer.viz import PALETTE, class_color, draw_detections, plot_loss_curves, save_detections


def _has_color(arr: np.ndarray, color, tol: int = 0) -> bool:
    return bool((np.abs(arr.astype(int) - np.array(color)).max(axis=-1) <= tol).any())


def test_draw_detections_colours_boxes():
    img = np.full((200, 300, 3), 90, np.uint8)
    boxes = np.array([[20, 60, 120, 150], [160, 40, 280, 180], [5, 5, 50, 30]], float)
    labels = np.array([0, 1, 2])
    scores = np.array([0.9, 0.8, 0.1])  # the last one is below score_thr
    out = draw_detections(img, boxes, labels, scores, class_names=["car", "van", "bus"])
    assert isinstance(out, Image.Image) and out.size == (300, 200) and out.mode == "RGB"
    arr = np.asarray(out)
    assert tuple(arr[100, 20]) == class_color(0)  # left edge of box 0
    assert tuple(arr[100, 280]) == class_color(1)  # right edge of box 1
    assert tuple(arr[100, 70]) == (90, 90, 90)  # box interior untouched
    assert not _has_color(arr, class_color(2))  # below threshold, not drawn
    assert len(set(PALETTE)) >= 10


def test_heatmap_and_crops(tmp_path):
    img = np.zeros((120, 160, 3), np.uint8)
    heat = np.zeros((2, 30, 40), np.float32)
    heat[1, 20:, 30:] = 1.0  # hot in the bottom-right corner
    crops = np.array([[10, 10, 60, 50]])
    out = np.asarray(draw_detections(img, np.zeros((0, 4)), [], [], None, crop_regions=crops, heatmap=heat))
    assert out[110, 150].sum() > 50  # heat overlaid
    assert tuple(out[5, 5]) == (0, 0, 0)  # cold, outside the crop: untouched
    assert _has_color(out[8:14, 10:70], (255, 255, 255))  # dashed white crop edge
    p = save_detections(tmp_path / "a" / "viz.png", img, [[10, 10, 50, 50]], [3], [0.9], heatmap=heat[0])
    assert Image.open(p).size == (160, 120)


def test_plot_loss_curves(tmp_path):
    paths = {}
    for name, scale in (("teacher", 1.0), ("student", 2.0)):
        p = tmp_path / f"{name}.jsonl"
        lines = [json.dumps({"iter": i * 10, "loss": scale * 5 / (i + 1), "loss_kd": 0.3 * scale, "lr": 0.01})
                 for i in range(50)]
        p.write_text("\n".join(lines) + "\n{\"iter\": 50")  # truncated last line is tolerated
        paths[name] = p
    out = plot_loss_curves(paths, tmp_path / "plots" / "loss.png")
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape[0] > 100 and im.shape[1] > 100
    for c in PALETTE[:4]:  # 2 runs x 2 loss keys
        assert _has_color(im, c)
    assert not _has_color(im, PALETTE[4])  # "lr" is not a loss key

    out2 = plot_loss_curves({"t": paths["teacher"]}, tmp_path / "kd.png", keys=["loss_kd"])
    assert Image.open(out2).format == "PNG"
    with pytest.raises(UserError):
        plot_loss_curves({"t": tmp_path / "missing.jsonl"}, tmp_path / "x.png")
    with pytest.raises(UserError, match="no 'nothing'"):
        plot_loss_curves({"t": paths["teacher"]}, tmp_path / "x.png", keys=["nothing"])
