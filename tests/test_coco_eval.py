import json
from pathlib import Path

import pytest

from yolc_kd.errors import UserError
from yolc_kd.infer.coco_eval import evaluate_coco, format_table


def _write_gt(path: Path, boxes_per_image: dict, w: int = 400, h: int = 400) -> Path:
    """boxes_per_image: {image_id: [(cat_id, [x, y, w, h]), ...]}"""
    anns, aid = [], 1
    for img_id, boxes in boxes_per_image.items():
        for cat, b in boxes:
            anns.append(dict(id=aid, image_id=img_id, category_id=cat, bbox=list(b), area=b[2] * b[3], iscrowd=0))
            aid += 1
    data = dict(images=[dict(id=i, file_name=f"{i}.jpg", width=w, height=h) for i in boxes_per_image],
                annotations=anns, categories=[dict(id=1, name="car"), dict(id=2, name="person")])
    path.write_text(json.dumps(data))
    return path


def _grid_boxes(n: int, size: int = 12, step: int = 20, per_row: int = 19):
    return [[(i % per_row) * step + 2, (i // per_row) * step + 2, size, size] for i in range(n)]


@pytest.fixture()
def gt(tmp_path):
    boxes = {1: [(1, [10, 10, 20, 20]), (2, [100, 100, 60, 60])],
             2: [(1, [50, 50, 120, 120]), (1, [300, 300, 30, 30])]}
    return _write_gt(tmp_path / "gt.json", boxes), boxes


def _perfect(boxes):
    return [dict(image_id=i, category_id=c, bbox=b, score=0.9) for i, bs in boxes.items() for c, b in bs]


def test_perfect_predictions_give_ap_one(gt):
    ann, boxes = gt
    r = evaluate_coco(ann, _perfect(boxes))
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    assert r["AR@500"] == pytest.approx(1.0)
    assert r["per_class"] == {"car": pytest.approx(1.0), "person": pytest.approx(1.0)}
    assert r["num_images"] == 2 and r["num_preds"] == 4
    assert r["max_dets"] == [1, 10, 100, 500]
    table = format_table(r)
    assert "AP50" in table and "car" in table and "maxDets=500" in table


def test_shifted_predictions_lower_ap(gt, tmp_path):
    ann, boxes = gt
    preds = _perfect(boxes)
    for p in preds:
        p["bbox"] = [p["bbox"][0] + p["bbox"][2] * 0.3, p["bbox"][1], p["bbox"][2], p["bbox"][3]]
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps(preds))
    r = evaluate_coco(ann, pred_file)
    assert 0.0 < r["AP"] < 1.0
    assert r["AP50"] == pytest.approx(1.0)  # IoU 0.7/1.3 ~ 0.54 still matches at 0.5
    assert r["AP75"] == pytest.approx(0.0)


def test_empty_predictions_give_zero(gt, tmp_path):
    ann, _ = gt
    r = evaluate_coco(ann, [])
    for k in ("AP", "AP50", "AP75", "AR@1", "AR@500"):
        assert r[k] == 0.0
    assert r["num_preds"] == 0 and all(v == 0.0 for v in r["per_class"].values())
    f = tmp_path / "empty.json"
    f.write_text("[]")
    assert evaluate_coco(ann, f)["AP"] == 0.0


def test_unknown_image_or_category_raises(gt):
    ann, _ = gt
    with pytest.raises(UserError, match="image id 77"):
        evaluate_coco(ann, [dict(image_id=77, category_id=1, bbox=[0, 0, 5, 5], score=0.5)])
    with pytest.raises(UserError, match="category id 9"):
        evaluate_coco(ann, [dict(image_id=1, category_id=9, bbox=[0, 0, 5, 5], score=0.5)])


def test_bad_files_raise(tmp_path, gt):
    ann, _ = gt
    with pytest.raises(UserError, match="not found"):
        evaluate_coco(tmp_path / "nope.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        evaluate_coco(ann, bad)


def test_max_dets_500_counts_lower_ranked_objects(tmp_path):
    n = 150
    boxes = {1: [(1, b) for b in _grid_boxes(n)]}
    ann = _write_gt(tmp_path / "gt.json", boxes)
    preds = [dict(image_id=1, category_id=1, bbox=b, score=1.0 - i / 1000) for i, (_, b) in enumerate(boxes[1])]
    r = evaluate_coco(ann, preds, max_dets=(1, 10, 100, 500))
    r100 = evaluate_coco(ann, preds, max_dets=(1, 10, 100))
    assert r["AP"] == pytest.approx(1.0)
    assert r100["AP"] < 0.7  # only the top-100 of 150 objects can be found
    assert r["AR@100"] == pytest.approx(100 / n)
    assert r["AR@500"] == pytest.approx(1.0)


def test_quiet_suppresses_pycocotools_output(gt, capsys):
    ann, boxes = gt
    evaluate_coco(ann, _perfect(boxes))
    assert capsys.readouterr().out == ""
    evaluate_coco(ann, _perfect(boxes), quiet=False)
    assert "Accumulating" in capsys.readouterr().out


def test_cli_eval_writes_json(gt, tmp_path, capsys):
    from yolc_kd.cli import main

    ann, boxes = gt
    pred_file = tmp_path / "run1.json"
    pred_file.write_text(json.dumps(_perfect(boxes)))
    assert main(["eval", "--ann", str(ann), "--preds", str(pred_file)]) == 0
    out = tmp_path / "run1.metrics.json"
    metrics = json.loads(out.read_text())
    assert metrics["AP"] == pytest.approx(1.0) and "AR@500" in metrics
    assert "AP50" in capsys.readouterr().out

    custom = tmp_path / "sub" / "m.json"
    assert main(["eval", "--ann", str(ann), "--preds", str(pred_file), "--max-dets", "1", "100",
                 "--out", str(custom)]) == 0
    assert json.loads(custom.read_text())["max_dets"] == [1, 100]


def test_cli_eval_bad_path(gt, tmp_path, capsys):
    from yolc_kd.cli import main

    ann, _ = gt
    capsys.readouterr()
    assert main(["eval", "--ann", str(ann), "--preds", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json" in err[0] and "Traceback" not in err[0]
