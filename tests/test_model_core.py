"""Behaviour of the YOLC core beyond the reference: training, decode, config and checkpoint handling."""

import numpy as np
import pytest
import torch

from conftest import REPO, plain_metas, tiny_model_cfg
from yolc_kd.errors import UserError
from yolc_kd.models import build_detector


def test_tiny_yolc_overfits_two_images():
    torch.manual_seed(0)
    model = build_detector(tiny_model_cfg(num_classes=2)).train()
    img = torch.randn(2, 3, 128, 128)
    gt_bboxes = [torch.tensor([[10., 12., 30., 40.], [60., 60., 90., 84.]]), torch.tensor([[40., 20., 56., 36.]])]
    gt_labels = [torch.tensor([0, 1]), torch.tensor([1])]
    metas = plain_metas(2, 128, 128)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(60):
        losses, _ = model.forward_train(img, metas, gt_bboxes, gt_labels)
        total = sum(losses.values())
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) * 5 <= first, (first, float(total.detach()))


def test_decode_is_offset_plus_grid():
    model = build_detector(tiny_model_cfg())
    xywh = torch.randn(2, 4, 3, 5)
    before = xywh.clone()
    boxes = model.bbox_head.decode_xywh_to_bbox(xywh)
    assert boxes.shape == (2, 15, 4)
    # cell (row 2, col 4) is index 14: centre = offset + (4, 2), sizes unchanged
    torch.testing.assert_close(boxes[:, 14], torch.stack([xywh[:, 0, 2, 4] + 4, xywh[:, 1, 2, 4] + 2,
                                                          xywh[:, 2, 2, 4], xywh[:, 3, 2, 4]], 1))
    assert torch.equal(xywh, before)  # decode does not modify its input


def test_loss_does_not_modify_predictions():
    model = build_detector(tiny_model_cfg(num_classes=2)).train()
    outs = model.bbox_head(model.extract_feat(torch.randn(1, 3, 64, 64)))
    before = [o[0].detach().clone() for o in outs]
    model.bbox_head.loss(*outs, [torch.tensor([[4., 4., 20., 20.]])], [torch.tensor([1])], plain_metas(1, 64, 64))
    assert all(torch.equal(b, o[0].detach()) for b, o in zip(before, outs))


def test_empty_ground_truth_trains():
    model = build_detector(tiny_model_cfg(num_classes=2)).train()
    losses, _ = model.forward_train(torch.randn(1, 3, 64, 64), plain_metas(1, 64, 64),
                                    [torch.zeros((0, 4))], [torch.zeros((0,), dtype=torch.long)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_test_cfg_reaches_head_and_rescale():
    cfg = tiny_model_cfg()
    cfg["test_cfg"] = dict(topk=7, local_maximum_kernel=3, max_per_img=5, nms_cfg=dict(iou_threshold=0.5))
    model = build_detector(cfg).eval()
    with torch.no_grad():
        outs = model.bbox_head(model.extract_feat(torch.randn(1, 3, 64, 96)))
    metas = plain_metas(1, 64, 96)
    metas[0]["scale_factor"] = np.full(4, 2.0, np.float32)
    metas[0]["border"] = np.array([4, 4, 8, 8], np.float32)
    raw = model.bbox_head.get_bboxes(*outs, plain_metas(1, 64, 96), rescale=False)[0][0]
    dets, labels = model.bbox_head.get_bboxes(*outs, metas, rescale=True)[0]
    assert dets.shape == (7, 5)
    torch.testing.assert_close(dets[:, :4], (raw[:, :4] - torch.tensor([8., 4., 8., 4.])) / 2)
    nms_dets, _ = model.bbox_head.get_bboxes(*outs, metas, rescale=True, with_nms=True)[0]
    assert len(nms_dets) <= 5


def test_config_errors_name_key_and_file(tmp_path):
    from yolc_kd.config import load_config

    bad = tmp_path / "bad.py"
    bad.write_text("model = dict(type='YOLC')\nmodle_typo = 1\n")
    with pytest.raises(UserError, match=r"bad\.py.*unknown key 'modle_typo'"):
        load_config(bad)
    bad.write_text("model = dict(type='YOLC')\ndistill_cfg = dict(kd_weight_global_hm='1')\n")
    with pytest.raises(UserError, match=r"distill_cfg\.kd_weight_global_hm.*bad\.py|bad\.py.*distill_cfg\.kd_weight_global_hm"):
        load_config(bad)
    bad.write_text("model = dict(type='YOLC')\ndistill_cfg = dict(teacher='x')\n")
    with pytest.raises(UserError, match="distill_cfg.teacher"):
        load_config(bad)
    bad.write_text("model = dict(\n")
    with pytest.raises(UserError, match="bad.py"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.py")


def test_config_base_inheritance_and_defaults():
    from yolc_kd.config import load_config

    cfg = load_config(REPO / "configs" / "yolc_hrnet_w18_visdrone_kd.py", with_defaults=True)
    assert cfg["model"]["backbone"]["extra"]["stage4"]["num_channels"] == (18, 36, 72, 144)
    assert cfg["model"]["backbone"]["extra"]["stage4"]["num_blocks"] == (4, 4, 4, 4)  # inherited
    assert cfg["distill"].max_patches_per_img == 4 and cfg["distill"].hm_kd == "soft_focal"
    assert cfg["optimizer"]["momentum"] == 0.9
    model = build_detector(cfg["model"])
    assert model.bbox_head.num_classes == 10


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    from yolc_kd.checkpoint import load_checkpoint, save_checkpoint

    model = build_detector(tiny_model_cfg(num_classes=3))
    path = save_checkpoint(tmp_path / "a.pth", model, meta=dict(CLASSES=["a", "b", "c"], iter=3))
    other = build_detector(tiny_model_cfg(num_classes=3))
    assert load_checkpoint(other, path)["iter"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    # plain state dict works too
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    load_checkpoint(other, tmp_path / "plain.pth")
    with pytest.raises(UserError, match="3 classes, the config 5"):
        load_checkpoint(build_detector(tiny_model_cfg(num_classes=5)), path)
    with pytest.raises(UserError, match="does not fit"):
        load_checkpoint(build_detector(tiny_model_cfg(widths=(8, 16, 32, 48))), path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        load_checkpoint(other, tmp_path / "junk.pth")


class _Custom:
    pass


def test_checkpoint_needing_pickle_is_refused(tmp_path):
    from yolc_kd.checkpoint import load_checkpoint

    model = build_detector(tiny_model_cfg())
    torch.save({"state_dict": model.state_dict(), "meta": {"obj": _Custom()}}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        load_checkpoint(model, tmp_path / "evil.pth")
    load_checkpoint(model, tmp_path / "evil.pth", trust=True)


@pytest.mark.parametrize("content", [b"garbage", b"this is not a checkpoint", b""])
def test_garbage_checkpoint_is_one_clear_error(tmp_path, content):
    from yolc_kd.checkpoint import load_checkpoint

    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(UserError, match="not a readable torch checkpoint") as info:
        load_checkpoint(build_detector(tiny_model_cfg()), tmp_path / "x.pth")
    assert "trust" not in str(info.value)


def test_relative_teacher_config_resolves_against_the_file_naming_it(tmp_path):
    from yolc_kd.config import load_config

    child = tmp_path / "sub" / "child.py"
    child.parent.mkdir()
    child.write_text(f"_base_ = {str(REPO / 'configs' / 'tiny_student_synth.py')!r}\n")
    cfg = load_config(child, with_defaults=True)
    assert cfg["distill"].teacher_config == str((REPO / "configs" / "tiny_teacher_synth.py").resolve())
