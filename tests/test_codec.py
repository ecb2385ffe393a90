"""The cache's value codecs (cache/codec.py): the numpy and torch back-ends give the same codes and values bit for
bit on random inputs and at every edge (rounding ties, the zeroing threshold, clipping, NaN and inf), the codes at
those edges are the documented ones, KDTargets go through the table's codecs, and a live teacher hands the KD
loss the cache's numbers with distill_cfg.online_targets "cached" (the default) or the floats with "float"."""
import numpy as np
import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd.cache.arrays import dequantize_targets, quantization, quantize_targets
from yolc_kd.cache.codec import BOXES, HEATMAP
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.config import load_config
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.models import build_detector
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import build_teacher, teacher_targets

pytestmark = pytest.mark.usefixtures("one_thread")

# (input, code) at the heatmap's edges: below 1/255 -> 0, ties round up, clipped to 0..255, NaN -> 0
HEAT_EDGES = [(0.0, 0), (1.0, 255), (np.nan, 0), (1.0 / 255, 1), (np.float32(1.0 / 255) - 1e-9, 0), (0.5 / 255, 0),
              (1.5 / 255, 2), (2.5 / 255, 3), (254.501 / 255, 255), (254.49 / 255, 254), (-0.1, 0), (1.2, 255),
              (np.inf, 255), (-np.inf, 0), (np.nextafter(np.float32(0.5 / 255), 1), 0), (0.6, 153)]
# (input in steps of 2^-6 cells, code): ties to even, clipped to +-32767, NaN -> 0, +-inf -> the clip
BOX_EDGES = [(0.5, 0), (1.5, 2), (-0.5, 0), (-2.5, -2), (32767 + 3 * 64, 32767), (-32767 - 3 * 64, -32767),
             (np.nan, 0), (np.inf, 32767), (-np.inf, -32767), (1e9 * 64, 32767), (7.25, 7), (-3.75, -4)]


def _heat(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.random((2, 3, 16, 20), dtype=np.float32)
    p.flat[:len(HEAT_EDGES)] = [x for x, _ in HEAT_EDGES]
    return p


def _boxes(seed: int) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal((2, 4, 16, 20)) * 40).astype(np.float32)
    x.flat[:len(BOX_EDGES)] = [v * BOXES.step for v, _ in BOX_EDGES]
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_and_torch_give_the_same_codes_and_values(seed):
    for codec, x, edges in ((HEATMAP, _heat(seed), HEAT_EDGES), (BOXES, _boxes(seed), BOX_EDGES)):
        q = codec.encode(x)
        qt = codec.encode(torch.from_numpy(x))
        assert isinstance(q, np.ndarray) and isinstance(qt, torch.Tensor)
        assert q.dtype == np.dtype(codec.stored) and qt.dtype == getattr(torch, codec.stored)
        np.testing.assert_array_equal(qt.numpy(), q)
        assert q.flat[:len(edges)].tolist() == [c for _, c in edges]
        y, yt = codec.decode(q), codec.decode(qt)
        assert y.dtype == np.float32 and yt.dtype == torch.float32
        np.testing.assert_array_equal(yt.numpy(), y)
        with np.errstate(invalid="ignore"):  # the bound holds for probabilities and for any finite box value
            bounded = (x >= 0) & (x <= 1) if codec is HEATMAP else np.isfinite(x)
        assert (np.abs(y.astype(np.float64) - x)[bounded] <= codec.tolerance(x)[bounded]).all()
        assert codec.encoded(q) and codec.encoded(qt) and not codec.encoded(x) and not codec.encoded(yt)


def test_every_input_dtype_goes_through_float32_on_both_back_ends():
    heat, boxes = _heat(2), _boxes(3)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for codec, x in ((HEATMAP, heat), (BOXES, boxes)):
            xt = torch.from_numpy(x).to(dtype)
            np.testing.assert_array_equal(codec.encode(xt).numpy(), codec.encode(xt.float().numpy()))
    np.testing.assert_array_equal(BOXES.encode(boxes.astype(np.float64)), BOXES.encode(boxes))


def test_decoding_in_place_is_the_plain_decode():
    q = HEATMAP.encode(torch.from_numpy(_heat(4)))
    out = torch.full(q.shape, 7.0)
    assert HEATMAP.decode(q, out=out) is out and torch.equal(out, HEATMAP.decode(q))


def test_box_unit_is_the_step_for_codes_and_one_for_floats():
    x = torch.from_numpy(_boxes(5))
    assert BOXES.unit(BOXES.encode(x)) == 2.0 ** -6 and BOXES.unit(x) == 1.0


def test_the_manifest_describes_the_codecs_from_their_parameters():
    assert quantization() == dict(
        heatmap="q = 0 if p < 1/255 else floor(255 p + 0.5); p = q / 255", heatmap_max_error=1 / 510,
        heatmap_max_error_below_1_255="p (zeroed)",
        maps="q = round(x / 2^-6) as int16, clipped to +-32767; x = q * 2^-6 grid cells", maps_max_error=2.0 ** -7)


def _targets(heat: np.ndarray, boxes: np.ndarray) -> KDTargets:
    b = heat.shape[0]
    return KDTargets(heatmap=torch.from_numpy(heat), coarse=torch.from_numpy(boxes),
                     patch_boxes=torch.rand(b, 2, 4), patch_scales=torch.rand(b, 2),
                     patch_valid=torch.tensor([[True, False]] * b), refine=torch.from_numpy(boxes[:, None, :, :2]
                                                                                         .repeat(2, 1)))


def test_targets_go_through_the_tables_codecs():
    heat, boxes = _heat(0), _boxes(0)
    t = _targets(heat, boxes)
    q = quantize_targets(t)
    assert q.heatmap.dtype == torch.uint8 and q.coarse.dtype == q.refine.dtype == torch.int16
    np.testing.assert_array_equal(q.heatmap.numpy(), HEATMAP.encode(heat))
    np.testing.assert_array_equal(q.coarse.numpy(), BOXES.encode(boxes))
    np.testing.assert_array_equal(q.refine.numpy(), BOXES.encode(t.refine.numpy()))
    assert torch.equal(q.patch_boxes, t.patch_boxes) and torch.equal(q.patch_valid, t.patch_valid)
    f = dequantize_targets(q)
    np.testing.assert_array_equal(f.heatmap.numpy(), HEATMAP.decode(HEATMAP.encode(heat)))
    np.testing.assert_array_equal(f.coarse.numpy(), BOXES.decode(BOXES.encode(boxes)))
    assert float(f.heatmap.max()) <= 1.0 and np.isclose(float(f.heatmap[0, 0, 0, 1]), 1.0)
    assert dequantize_targets(f) is f  # float targets (a live teacher's) pass through


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
    np.testing.assert_array_equal(got.heatmap.numpy(), HEATMAP.decode(HEATMAP.encode(raw.heatmap.numpy())))
    np.testing.assert_array_equal(got.coarse.numpy(), BOXES.decode(BOXES.encode(raw.coarse.numpy())))
    np.testing.assert_array_equal(got.refine.numpy(), BOXES.decode(BOXES.encode(raw.refine.numpy())))
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
