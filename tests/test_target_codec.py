"""KDTargets through the cache's quantisation in torch: bit for bit what the cache writer stores (numpy), and
what a live teacher hands the KD loss with distill_cfg.online_targets "cached" (the default) or "float"."""
import numpy as np
import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd.cache.schema import (BOX_MAX, BOX_STEP, HEATMAP_LEVELS, dequantize_boxes, dequantize_heatmap,
                                  quantize_boxes, quantize_heatmap)
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.config import load_config
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.models import build_detector
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import build_teacher, teacher_targets
from yolc_kd.train.target_codec import dequantize_targets, quantize_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(heat: np.ndarray, boxes: np.ndarray) -> KDTargets:
    b = heat.shape[0]
    return KDTargets(heatmap=torch.from_numpy(heat), coarse=torch.from_numpy(boxes),
                     patch_boxes=torch.rand(b, 2, 4), patch_scales=torch.rand(b, 2),
                     patch_valid=torch.tensor([[True, False]] * b), refine=torch.from_numpy(boxes[:, None, :, :2]
                                                                                         .repeat(2, 1)))


def test_quantisation_is_the_writers_bit_for_bit_at_every_edge():
    rng = np.random.default_rng(0)
    heat = rng.random((2, 3, 16, 20), dtype=np.float32)
    heat.flat[:12] = [0.0, 1.0, np.nan, 1.0 / 255, np.float32(1.0 / 255) - 1e-9, 0.5 / 255, 1.5 / 255, 2.5 / 255,
                      254.5 / 255, -0.1, 1.2, np.nextafter(np.float32(0.5 / 255), 1)]
    boxes = (rng.standard_normal((2, 4, 16, 20)) * 40).astype(np.float32)
    boxes.flat[:10] = [0.5 * BOX_STEP, 1.5 * BOX_STEP, -0.5 * BOX_STEP, -2.5 * BOX_STEP, BOX_MAX + 3, -BOX_MAX - 3,
                       np.nan, np.inf, -np.inf, 1e9]
    t = _targets(heat, boxes)
    q = quantize_targets(t)
    assert q.heatmap.dtype == torch.uint8 and q.coarse.dtype == q.refine.dtype == torch.int16
    np.testing.assert_array_equal(q.heatmap.numpy(), quantize_heatmap(heat))
    np.testing.assert_array_equal(q.coarse.numpy(), quantize_boxes(boxes))
    np.testing.assert_array_equal(q.refine.numpy(), quantize_boxes(t.refine.numpy()))
    assert torch.equal(q.patch_boxes, t.patch_boxes) and torch.equal(q.patch_valid, t.patch_valid)
    f = dequantize_targets(q)
    np.testing.assert_array_equal(f.heatmap.numpy(), dequantize_heatmap(quantize_heatmap(heat)))
    np.testing.assert_array_equal(f.coarse.numpy(), dequantize_boxes(quantize_boxes(boxes)))
    assert float(f.heatmap.max()) <= 1.0 and np.isclose(float(f.heatmap[0, 0, 0, 1]), HEATMAP_LEVELS / 255)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(1)
    path = save_checkpoint(tmp_path_factory.mktemp("codec") / "teacher.pth", build_detector(tiny_model_cfg(3)))
    return path


def _live(path, **over):
    from yolc_kd.train.teacher_source import LiveTeacherSource

    dcfg = DistillSettings(max_patches_per_img=2, min_patch_size=16, **over)
    return LiveTeacherSource(build_teacher(dcfg, tiny_model_cfg(3), ckpt=str(path)), dcfg)


def test_live_teacher_targets_are_the_caches_numbers_by_default(teacher):
    batch = dict(img=torch.randn(2, 3, 96, 128), img_metas=plain_metas(2, 96, 128))
    cached, unrounded = _live(teacher), _live(teacher, online_targets="float")
    got = cached.targets(batch)
    raw = teacher_targets(cached.teacher, batch["img"], batch["img_metas"], cached.settings)
    np.testing.assert_array_equal(got.heatmap.numpy(), dequantize_heatmap(quantize_heatmap(raw.heatmap.numpy())))
    np.testing.assert_array_equal(got.coarse.numpy(), dequantize_boxes(quantize_boxes(raw.coarse.numpy())))
    np.testing.assert_array_equal(got.refine.numpy(), dequantize_boxes(quantize_boxes(raw.refine.numpy())))
    assert int(got.patch_valid.sum()) > 0 and torch.equal(got.patch_boxes, raw.patch_boxes)
    plain = unrounded.targets(batch)
    assert torch.equal(plain.heatmap, raw.heatmap) and torch.equal(plain.coarse, raw.coarse)
    assert not torch.equal(plain.heatmap, got.heatmap)  # the rounding is real, and at most half a level
    assert float((plain.heatmap - got.heatmap).abs().max()) <= 1 / 255


def test_an_unknown_online_targets_value_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text(f"model = {tiny_model_cfg(3)!r}\ndistill_cfg = dict(online_targets='quantised')\n")
    with pytest.raises(UserError, match=r"'distill_cfg.online_targets' must be one of 'cached', 'float', "
                                        r"got 'quantised'"):
        load_config(cfg, with_defaults=True)
