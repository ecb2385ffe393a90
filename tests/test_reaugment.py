"""Re-augmentation of cached views: the mirrored targets are the mirror of the teacher's targets (exact
geometry), patches that cannot be mirrored cell for cell are dropped, and the sampler walks 2K views."""
import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd.cache.arrays import dequantize_targets
from yolc_kd.cache.codec import BOXES
from yolc_kd.kd import KDTargets
from yolc_kd.models import build_detector
from yolc_kd.settings import DistillSettings
from yolc_kd.train.data import VariantSampler
from yolc_kd.train.reaugment import flip_sample, flip_targets


def _decoded_centres_px(coarse: torch.Tensor, decode) -> torch.Tensor:
    return decode(coarse)[..., :2] * 4  # (B, cells, 2) box centres in input pixels (stride 4)


def test_mirrored_box_maps_decode_to_mirrored_boxes():
    decode = build_detector(tiny_model_cfg()).bbox_head.decode_xywh_to_bbox
    h, w = 32, 48
    coarse = torch.randn(1, 4, h // 4, w // 4)
    t = KDTargets(heatmap=torch.rand(1, 3, h, w), coarse=coarse, patch_boxes=torch.zeros(1, 1, 4),
                  patch_scales=torch.zeros(1, 1), patch_valid=torch.zeros(1, 1, dtype=torch.bool),
                  refine=torch.zeros(1, 1, 4, 4, 6))
    f = flip_targets(t, (h, w))
    torch.testing.assert_close(f.heatmap, t.heatmap.flip(-1))
    orig = _decoded_centres_px(coarse, decode).reshape(h // 4, w // 4, 2)
    mirr = _decoded_centres_px(f.coarse, decode).reshape(h // 4, w // 4, 2)
    # the box predicted at cell x is predicted at cell W/4-1-x of the mirror, with its centre at W - cx
    torch.testing.assert_close(mirr[:, :, 0].flip(-1), w - orig[:, :, 0])
    torch.testing.assert_close(mirr[:, :, 1].flip(-1), orig[:, :, 1])
    torch.testing.assert_close(f.coarse[:, 2:], coarse[:, 2:].flip(-1))  # sizes unchanged
    torch.testing.assert_close(flip_targets(f, (h, w)).coarse, coarse)  # twice = identity


def test_fixed_point_mirror_equals_float_mirror():
    q = torch.randint(-3000, 3000, (1, 4, 8, 12), dtype=torch.int16)
    t = KDTargets(heatmap=torch.randint(0, 255, (1, 3, 32, 48), dtype=torch.uint8), coarse=q,
                  patch_boxes=torch.zeros(1, 1, 4), patch_scales=torch.zeros(1, 1),
                  patch_valid=torch.zeros(1, 1, dtype=torch.bool), refine=torch.zeros(1, 1, 4, 4, 6, dtype=torch.int16))
    stored_then_flipped = dequantize_targets(flip_targets(t, (32, 48)))
    flipped_float = flip_targets(dequantize_targets(t), (32, 48))
    torch.testing.assert_close(stored_then_flipped.coarse, flipped_float.coarse, atol=BOXES.step / 4, rtol=0)
    torch.testing.assert_close(stored_then_flipped.heatmap, flipped_float.heatmap)


def test_patches_mirror_inside_their_width_or_are_dropped():
    h, w = 64, 96  # patch canvas (32, 32)
    boxes = torch.tensor([[[8., 4., 16., 16.], [40., 10., 15., 20.]]])  # 16 px -> 24 (x1.5): ok; 15 -> 22: dropped
    scales = torch.tensor([[1.5, 1.5]])
    valid = torch.tensor([[True, True]])
    refine = torch.randn(1, 2, 4, 8, 8)
    t = KDTargets(heatmap=torch.rand(1, 3, h, w), coarse=torch.randn(1, 4, h // 4, w // 4), patch_boxes=boxes,
                  patch_scales=scales, patch_valid=valid, refine=refine)
    f = flip_targets(t, (h, w))
    assert f.patch_valid.tolist() == [[True, False]]
    assert f.patch_boxes[0, 0].tolist() == [w - 8 - 16, 4., 16., 16.]
    cells = 24 // 4
    torch.testing.assert_close(f.refine[0, 0, 1:, :, :cells], refine[0, 0, 1:, :, :cells].flip(-1))
    torch.testing.assert_close(f.refine[0, 0, 0, :, :cells], 1 - refine[0, 0, 0, :, :cells].flip(-1))
    assert float(f.refine[0, 1].abs().sum()) == 0.0


def test_flip_sample_mirrors_view_boxes_and_targets():
    img = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(3, 16, 12)[:, :8]
    sample = dict(img=img, boxes=torch.tensor([[1., 2., 5., 6.]]), labels=torch.tensor([0]),
                  meta=dict(plain_metas(1, 8, 12)[0], flip=False), image_id=1, variant=0)
    out = flip_sample(sample)
    assert torch.equal(out["img"], img.flip(-1)) and out["meta"]["flip"] is True
    assert out["boxes"].tolist() == [[7., 2., 11., 6.]]
    assert torch.equal(flip_sample(out)["img"], img) and flip_sample(out)["boxes"].tolist() == [[1., 2., 5., 6.]]


def test_mirrored_sample_box_drawn_in_image_lands_where_its_box_map_decodes():
    """One flip moves everything: a ground-truth box drawn into the view, its heatmap peak and the coarse cells
    encoding it (as the teacher predicts it around its centre) all land on the mirrored box."""
    decode = build_detector(tiny_model_cfg()).bbox_head.decode_xywh_to_bbox
    h, w = 32, 48
    box = torch.tensor([[6., 9., 19., 25.]])
    img = torch.zeros(3, h, w)
    img[:, 9:25, 6:19] = 1.0
    cx, cy, hw, hh = 12.5 / 4, 17.0 / 4, 6.5 / 4, 8.0 / 4
    coarse = torch.zeros(1, 4, h // 4, w // 4)
    for y in range(3, 6):
        for x in range(2, 5):
            coarse[0, :, y, x] = torch.tensor([cx - x, cy - y, hw, hh])
    heat = torch.zeros(1, 3, h, w)
    heat[0, 1, 17, 12] = 1.0
    t = KDTargets(heatmap=heat, coarse=coarse, patch_boxes=torch.zeros(1, 1, 4), patch_scales=torch.zeros(1, 1),
                  patch_valid=torch.zeros(1, 1, dtype=torch.bool), refine=torch.zeros(1, 1, 4, 4, 6))
    out = flip_sample(dict(img=img, boxes=box, labels=torch.tensor([1]), meta=dict(flip=False), kd_targets=t))
    mirrored = out["boxes"][0]
    assert mirrored.tolist() == [w - 19., 9., w - 6., 25.]
    ys, xs = out["img"][0].nonzero(as_tuple=True)
    assert [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] == mirrored.tolist()
    peak = out["kd_targets"].heatmap[0, 1].nonzero().tolist()
    assert peak == [[17, w - 1 - 12]]  # pixel 12 covers [12, 13): its mirror covers [35, 36)
    centre = (mirrored[:2] + mirrored[2:]) / 2
    cell = int(centre[1] // 4) * (w // 4) + int(centre[0] // 4)
    dcx, dcy, dhw, dhh = (decode(out["kd_targets"].coarse)[0, cell] * 4).tolist()
    assert [dcx - dhw, dcy - dhh, dcx + dhw, dcy + dhh] == pytest.approx(mirrored.tolist(), abs=1e-5)


def test_off_grid_patch_whose_rounded_mirror_is_a_pixel_off_is_dropped():
    """A crop box off the pixel grid: the student cuts the mirrored patch at round(W - x - w), which is not the
    mirror of the teacher's patch at round(x) (here 1 pixel apart), so its refine maps cannot move cell for cell
    and the patch is dropped; the same patch with integer corners (what LSM gives) is mirrored."""
    from yolc_kd import crops

    h, w = 64, 96
    off = torch.tensor([[[10.4, 4., 16.4, 16.]]])  # cut at [10, 26): its mirror [70, 86); round(69.2) = 69
    x1, _, x2, _ = crops.crop_bounds(off[0, 0].tolist(), (h, w))
    m1, _, m2, _ = crops.crop_bounds([w - 10.4 - 16.4, 4., 16.4, 16.], (h, w))
    assert (x1, x2) == (10, 26) and (m1, m2) == (69, 85) != (w - x2, w - x1)
    for boxes, kept in ((off, False), (off.round(), True)):
        t = KDTargets(heatmap=torch.rand(1, 3, h, w), coarse=torch.randn(1, 4, h // 4, w // 4), patch_boxes=boxes,
                      patch_scales=torch.tensor([[1.5]]), patch_valid=torch.tensor([[True]]),
                      refine=torch.randn(1, 1, 4, 8, 8))
        assert flip_targets(t, (h, w)).patch_valid.tolist() == [[kept]]


def test_sampler_walks_k_views_then_their_mirrors():
    s = VariantSampler(4, seed=0, num_variants=2, flip=True)
    seen = []
    for epoch in range(4):
        s.set_epoch(epoch)
        items = list(s)
        assert sorted(i for i, *_ in items) == [0, 1, 2, 3]
        seen.append({(v, bool(rest and rest[0])) for _, v, *rest in items})
    assert seen == [{(0, False)}, {(1, False)}, {(0, True)}, {(1, True)}]
    plain = VariantSampler(4, seed=0, num_variants=2)
    plain.set_epoch(2)
    assert {len(it) for it in plain} == {2}


def test_views_needed_follows_the_schedule():
    from yolc_kd.train.schedule import views_needed

    from yolc_kd.schedule_settings import ScheduleSettings

    cfg = dict(schedule=ScheduleSettings(runner="EpochBasedRunner", max_epochs=12))
    assert views_needed(cfg, 200, 8, flip=True) == 6
    assert views_needed(cfg, 200, 8, flip=DistillSettings().cache_flip) == 12  # no mirroring by default
    assert views_needed(cfg, 200, 8, max_iters=120, flip=True) == 3  # 25 iterations per epoch: 4.8 epochs -> 5 -> 3 mirrored
    assert views_needed(dict(schedule=ScheduleSettings(runner="IterBasedRunner", max_iters=400)), 200, 4, flip=False) == 8


def test_precompute_variants_auto_and_bad_values(tmp_path, capsys):
    from conftest import cli_args, make_setup
    from yolc_kd.cache.reader import CacheReader
    from yolc_kd.cli import main

    s = make_setup(tmp_path, n_images=2)
    for bad, msg in (("0", "--variants must be at least 1"), ("many", "--variants must be a count or auto")):
        args = cli_args(s, tmp_path / "bad")
        args[args.index("--variants") + 1] = bad
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    args = cli_args(s, tmp_path / "auto", "--train-iters", "3")  # batch 2 of 2 images: 1 iteration per epoch
    args[args.index("--variants") + 1] = "auto"
    assert main(args) == 0
    assert CacheReader(tmp_path / "auto").num_variants == 3  # 3 epochs, one view each (no mirroring by default)
