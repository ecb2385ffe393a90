"""The image-level cache (`precompute --kind image`): rows equal the teacher on the scaled image, a view's targets
land where the view puts the image (identity, mirror), training reads it through the CLI, and the masked KD losses
ignore what a view does not show."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_setup
from yolc_kd.cache.arrays import dequantize_targets
from yolc_kd.cache.codec import BOXES, HEATMAP
from yolc_kd.cache.image_view import move_heatmaps, source_window
from yolc_kd.cache.reader import CacheReader
from yolc_kd.cli import main
from yolc_kd.config import load_config
from yolc_kd.data.augment import AugmentConfig, normalise
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.view import CropPaste, HFlip, ViewTransform
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets, heatmap_kd, kd_losses
from yolc_kd.precompute.image_level import ImageRows, auto_scales, parse_scales, view_scale_range
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import build_teacher, image_targets
from yolc_kd.train.image_source import ImageCacheSource

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("image_cache"))


def _precompute(s, out, *extra):
    return main(["precompute", "--config", str(s.config), "--ckpt", str(s.ckpt), "--out", str(out), "--kind", "image",
                 "--no-progress", *extra])


@pytest.fixture(scope="module")
def mirrored_cache(setup):
    """An image-level cache at scale 1 with the mirrored images (precompute --mirror): rows plain, mirrored."""
    out = setup.root / "image_s1_mirrored"
    assert _precompute(setup, out, "--scales", "1.0", "--mirror", "on") == 0
    return out


@pytest.fixture(scope="module")
def unit_cache(setup):
    """An image-level cache at scale 1 only (the views of the setup's config are all at scale 1), plain rows."""
    out = setup.root / "image_s1"
    assert _precompute(setup, out, "--scales", "1.0", "--mirror", "off") == 0
    return out


def _source(cache):
    return ImageCacheSource(CacheReader(cache), max_patches=2, min_patch_size=16)


def _identity_view(hw):
    h, w = hw
    return ViewTransform((CropPaste((h, w), (0, 0, w, h), (0, 0), (h, w)),))


def test_auto_scales_cover_the_view_scales():
    lo, hi = 1 / 1.2, 1 / 0.8
    scales = auto_scales(lo, hi, 3)
    worst = max(min(abs(np.log(v / s)) for s in scales) for v in np.linspace(lo, hi, 101))
    assert len(scales) == 3 and worst <= np.log(hi / lo) / 6 + 1e-3
    assert auto_scales(1.0, 1.0) == (1.0,)
    assert parse_scales("0.9,1.1", lo, hi) == (0.9, 1.1) and len(parse_scales("2", lo, hi)) == 2
    for bad in ("abc", "0", "-1,2", "12"):
        with pytest.raises(UserError):
            parse_scales(bad, lo, hi)
    cfg = AugmentConfig(ratios=(0.8, 1.0, 1.25))
    lo2, hi2 = view_scale_range(cfg, [(100, 100)])
    assert lo2 == pytest.approx(0.8, abs=0.01) and hi2 == pytest.approx(1.25, abs=0.01)


def test_rows_are_the_teacher_on_the_whole_scaled_image(setup, unit_cache):
    reader = CacheReader(unit_cache)
    lay = reader.layout
    assert lay.kind == "image" and lay.scales == (1.0,) and reader.manifest["kind"] == "image"
    cfg = load_config(setup.config, with_defaults=True)
    coco = CocoDetection(setup.ann, setup.data)
    teacher = build_teacher(cfg["distill"], cfg["model"], None, str(setup.ckpt))
    aug = AugmentConfig.from_pipeline(cfg["train_pipeline"])
    rows = ImageRows(coco, aug, lay.image_rows(), [coco.image_info(i)["id"] for i in range(len(coco))], [0, 1])
    for i in (0, 1):
        item = rows[i]
        with torch.no_grad():
            t = image_targets(teacher, item["imgs"][0], item["content"][0], (96, 128), cfg["distill"],
                              lay.max_patches)
        row = reader.read_sample(i)
        h, w = item["content"][0]
        p = t.heatmap[0].numpy()
        err = np.abs(HEATMAP.decode(row["heatmap"])[:, :h, :w] - p[:, :h, :w])
        assert (err <= HEATMAP.tolerance(p[:, :h, :w])).all()
        assert not row["heatmap"][:, h:].any() and not row["heatmap"][:, :, w:].any()
        c = t.coarse[0].numpy()
        np.testing.assert_allclose(BOXES.decode(row["coarse"])[:, :c.shape[1], :c.shape[2]], c,
                                   atol=BOXES.step / 2 + 1e-6)
        np.testing.assert_array_equal(row["patch_valid"], t.patch_valid[0].numpy())
        np.testing.assert_array_equal(row["patch_boxes"], t.patch_boxes[0].numpy())


def test_identity_view_gets_the_row_itself(setup, unit_cache):
    src = _source(unit_cache)
    coco = CocoDetection(setup.ann, setup.data)
    for i in range(len(coco)):
        image = coco.load_image(i)
        hw = image.shape[:2]
        got = src.sample_targets(coco.image_info(i)["id"], 0, image, SimpleNamespace(view=_identity_view(hw)))
        row = src.reader.read_sample(i)
        heat, valid = move_heatmaps([(got.heatmap_window, got.heatmap_move)], hw, torch.device("cpu"))
        assert bool(valid.all())
        torch.testing.assert_close(heat[0], torch.from_numpy(HEATMAP.decode(row["heatmap"])[:, :hw[0], :hw[1]]),
                                   rtol=0, atol=1e-6)
        t = got.targets
        assert bool(t.coarse_valid.all())
        torch.testing.assert_close(t.coarse[0], torch.from_numpy(row["coarse"][:, :hw[0] // 4, :hw[1] // 4]))
        big = [k for k in np.flatnonzero(row["patch_valid"]) if min(row["patch_boxes"][k][2:]) >= 16]
        big = sorted(big, key=lambda k: (-row["patch_boxes"][k][2] * row["patch_boxes"][k][3], k))[:2]
        assert int(t.patch_valid.sum()) == len(big)
        for j, k in enumerate(big):  # the student's patch is the teacher's: the refine maps move unchanged
            torch.testing.assert_close(t.patch_boxes[0, j], torch.from_numpy(row["patch_boxes"][k]))
            torch.testing.assert_close(t.patch_scales[0, j], torch.tensor(float(row["patch_scales"][k])))
            ok = t.refine_valid[0, j, 0]
            bw, bh = (int(round(float(v) * float(row["patch_scales"][k]))) for v in row["patch_boxes"][k][2:])
            rows_ok, cols_ok = -(-min(bh, 4 * ok.shape[0]) // 4), -(-min(bw, 4 * ok.shape[1]) // 4)
            assert bool(ok[:rows_ok - 1, :cols_ok - 1].all()) and not bool(ok[rows_ok:].any())  # the patch's cells
            stored = torch.from_numpy(row["refine"][k])
            torch.testing.assert_close(t.refine[0, j], torch.where(ok, stored, torch.zeros((), dtype=stored.dtype)))


def test_mirrored_view_mirrors_heatmap_boxes_and_crops(setup, unit_cache):
    src = _source(unit_cache)
    coco = CocoDetection(setup.ann, setup.data)
    image = coco.load_image(2)
    h, w = image.shape[:2]
    image_id = coco.image_info(2)["id"]
    plain = src.sample_targets(image_id, 0, image, SimpleNamespace(view=_identity_view((h, w))))
    mirror_view = _identity_view((h, w)).then(HFlip((h, w)))
    mirrored = src.sample_targets(image_id, 0, image, SimpleNamespace(view=mirror_view))
    cpu = torch.device("cpu")
    heat_a, _ = move_heatmaps([(plain.heatmap_window, plain.heatmap_move)], (h, w), cpu)
    heat_b, _ = move_heatmaps([(mirrored.heatmap_window, mirrored.heatmap_move)], (h, w), cpu)
    torch.testing.assert_close(heat_b, heat_a.flip(-1))
    a, b = dequantize_targets(plain.targets), dequantize_targets(mirrored.targets)

    def centres(coarse):  # decoded box centres (x, y) in pixels and half sizes, per cell
        _, _, gh, gw = coarse.shape
        gy, gx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        return torch.stack([(gx + coarse[0, 0]) * 4, (gy + coarse[0, 1]) * 4, coarse[0, 2] * 4, coarse[0, 3] * 4])

    ca, cb = centres(a.coarse), centres(b.coarse).flip(-1)
    torch.testing.assert_close(cb[0], w - ca[0], atol=4 * BOXES.step, rtol=0)
    torch.testing.assert_close(cb[1:], ca[1:], atol=4 * BOXES.step, rtol=0)
    assert int(a.patch_valid.sum()) == int(b.patch_valid.sum()) > 0
    for j in range(int(a.patch_valid.sum())):  # the same crops, mirrored; nothing dropped
        x, y, bw, bh = a.patch_boxes[0, j].tolist()
        torch.testing.assert_close(b.patch_boxes[0, j], torch.tensor([w - x - bw, y, bw, bh]))
        assert bool(b.refine_valid[0, j].any())


def test_source_window_covers_what_the_view_shows():
    view = ViewTransform((CropPaste((300, 400), (50, 40, 250, 190), (10, 0), (160, 240)),))
    x0, y0, x1, y1 = source_window(view, (300, 400))
    assert x0 % 4 == 0 and y0 % 4 == 0 and x0 <= 50 - 10 - 1 and y0 <= 40 and x1 >= 250 - 10 and y1 >= 190
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300


def test_train_from_image_cache_and_its_mistakes(setup, unit_cache, tmp_path, capsys):
    coco_args = ["--ann", str(setup.ann), "--images", str(setup.data)]
    assert main(["train", "--config", str(setup.config), *coco_args, "--cache", str(unit_cache), "--work-dir",
                 str(tmp_path / "w"), "--max-iters", "2", "--no-progress"]) == 0
    assert "offline KD from the image-level cache" in capsys.readouterr().out
    # another augmentation: the image-level cache still serves it (views are drawn at training time)
    other = tmp_path / "other_aug.py"
    other.write_text(setup.config.read_text().replace("ratios=(1.0,)", "ratios=(0.9, 1.1)"))
    assert main(["train", "--config", str(other), *coco_args, "--cache", str(unit_cache), "--work-dir",
                 str(tmp_path / "w2"), "--max-iters", "1", "--no-progress"]) == 0
    # another normalisation: the teacher saw other inputs, one line naming the field
    norm = tmp_path / "other_norm.py"
    norm.write_text(setup.config.read_text().replace("std=[58.395, 57.12, 57.375]", "std=[50.0, 50.0, 50.0]"))
    capsys.readouterr()
    assert main(["train", "--config", str(norm), *coco_args, "--cache", str(unit_cache), "--work-dir",
                 str(tmp_path / "w4"), "--max-iters", "1", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "augment.std" in err[0]
    # a changed image file: one line naming the image
    data = tmp_path / "changed"
    import shutil
    shutil.copytree(setup.data, data)
    coco = CocoDetection(setup.ann, setup.data)
    first = data / coco.image_info(0)["file_name"]
    from PIL import Image
    img = np.asarray(Image.open(first)).copy()
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(first)
    capsys.readouterr()
    assert main(["train", "--config", str(setup.config), "--ann", str(data / "annotations.json"), "--images",
                 str(data), "--cache", str(unit_cache), "--work-dir", str(tmp_path / "w3"), "--max-iters", "3",
                 "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different image" in err[0] and "Traceback" not in err[0]


def test_variants_with_image_kind_is_one_line(setup, tmp_path, capsys):
    assert _precompute(setup, tmp_path / "c", "--variants", "3") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--variants is for --kind view" in err[0]


def test_masked_heatmap_kd_ignores_what_the_view_does_not_show():
    torch.manual_seed(0)
    p_t = torch.rand(2, 3, 16, 24)
    p_s = torch.rand(2, 3, 16, 24, requires_grad=True)
    mask = torch.zeros(2, 1, 16, 24, dtype=torch.bool)
    mask[:, :, 2:12, 3:20] = True
    for mode in ("soft_focal", "mse", "kl"):
        settings = DistillSettings(hm_kd=mode)
        full = heatmap_kd(p_s, p_t, settings)
        torch.testing.assert_close(heatmap_kd(p_s, p_t, settings, mask=torch.ones_like(mask)), full)
        masked = heatmap_kd(p_s, p_t, settings, mask=mask)
        changed = torch.where(mask, p_s, torch.rand_like(p_s))
        torch.testing.assert_close(heatmap_kd(changed, p_t, settings, mask=mask), masked)
        grad, = torch.autograd.grad(masked, p_s)
        assert float(grad.masked_select(~mask.expand_as(grad)).abs().max()) == 0.0


def test_masked_box_kd_ignores_invalid_cells():
    torch.manual_seed(1)
    b, c, h, w, k = 1, 3, 32, 48, 2
    decode = lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4)  # noqa: E731
    heat = torch.rand(b, c, h, w)
    t = KDTargets(heatmap=heat, coarse=torch.randn(b, 4, h // 4, w // 4),
                  patch_boxes=torch.tensor([[[0.0, 0.0, 24.0, 16.0], [0, 0, 0, 0]]]), patch_scales=torch.ones(b, k),
                  patch_valid=torch.tensor([[True, False]]), refine=torch.randn(b, k, 4, 4, 6))
    coarse_valid = torch.zeros(b, 1, h // 4, w // 4, dtype=torch.bool)
    coarse_valid[..., :4, :6] = True
    refine_valid = torch.zeros(b, k, 1, 4, 6, dtype=torch.bool)
    refine_valid[0, 0, 0, :2] = True
    masked = KDTargets(**{**t.__dict__, "coarse_valid": coarse_valid, "refine_valid": refine_valid})
    coarse_s, refine_s = torch.randn(b, 4, h // 4, w // 4), torch.randn(1, 4, 4, 6)
    for box_kd in ("weighted", "mse"):
        dcfg = DistillSettings(box_kd=box_kd, hm_kd="mse")
        base = kd_losses(heat, coarse_s, refine_s, masked, dcfg, decode)
        noisy_c = torch.where(coarse_valid, coarse_s, torch.randn_like(coarse_s))
        noisy_r = torch.where(refine_valid[0, 0], refine_s, torch.randn_like(refine_s))
        again = kd_losses(heat, noisy_c, noisy_r, masked, dcfg, decode)
        torch.testing.assert_close(again["loss_kd_global_coarse"], base["loss_kd_global_coarse"])
        torch.testing.assert_close(again["loss_kd_local_refine"], base["loss_kd_local_refine"])
        unmasked = kd_losses(heat, noisy_c, noisy_r, t, dcfg, decode)
        assert float(unmasked["loss_kd_global_coarse"]) != float(base["loss_kd_global_coarse"])


def test_a_cache_from_before_the_image_kind_still_resumes_trains_and_verifies(setup, tmp_path, capsys):
    """A per-view cache whose manifest predates the `kind` field (and every later field: the layout's kind,
    scales and mirrored) is a view cache, and an image-level cache from before `mirrored` has plain rows: a rerun
    of its precompute resumes it, verify passes, training reads it."""
    import zarr

    from yolc_kd.cache.manifest import LATER_FIELDS
    from yolc_kd.cache.schema import MANIFEST_KEY
    base = ["--config", str(setup.config), "--ckpt", str(setup.ckpt), "--no-progress"]
    for name, extra, dropped in (("old", ["--variants", "2"], tuple(LATER_FIELDS)),
                                 ("old_image", ["--kind", "image", "--scales", "1.0", "--mirror", "off"], ("mirrored",))):
        out = tmp_path / name
        args = ["precompute", *base, "--out", str(out), *extra]
        assert main(args) == 0
        group = zarr.open_group(str(out), mode="r+")
        m = {k: v for k, v in dict(group.attrs[MANIFEST_KEY]).items() if k not in dropped}
        m["layout"] = {k: v for k, v in m["layout"].items() if k not in dropped}
        group.update_attributes({MANIFEST_KEY: m})
        capsys.readouterr()
        args = [a for a in args if a not in ("--mirror", "off")]  # the rerun with the defaults resumes it
        assert main(args) == 0, name
        assert "this run wrote 0 " in capsys.readouterr().out, name
        assert main(["verify", str(out)]) == 0, name
        assert main(["train", "--config", str(setup.config), "--ann", str(setup.ann), "--images", str(setup.data),
                     "--cache", str(out), "--work-dir", str(tmp_path / f"w_{name}"), "--max-iters", "1",
                     "--no-progress"]) == 0, name


def test_masked_kd_losses_with_no_crop_in_the_batch():
    """A batch of image-level targets whose views keep no crop: the local term is a zero in the graph."""
    b, c, h, w, k = 2, 3, 32, 48, 2
    decode = lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4)  # noqa: E731
    heat_s = torch.rand(b, c, h, w, requires_grad=True)
    t = KDTargets(heatmap=torch.rand(b, c, h, w), coarse=torch.randn(b, 4, h // 4, w // 4),
                  patch_boxes=torch.zeros(b, k, 4), patch_scales=torch.zeros(b, k),
                  patch_valid=torch.zeros(b, k, dtype=torch.bool), refine=torch.zeros(b, k, 4, 4, 6),
                  heatmap_valid=torch.ones(b, 1, h, w, dtype=torch.bool),
                  coarse_valid=torch.ones(b, 1, h // 4, w // 4, dtype=torch.bool),
                  refine_valid=torch.zeros(b, k, 1, 4, 6, dtype=torch.bool))
    for box_kd in ("weighted", "mse"):
        out = kd_losses(heat_s, torch.randn(b, 4, h // 4, w // 4), torch.zeros(0, 4, 4, 6), t,
                        DistillSettings(box_kd=box_kd), decode)
        assert float(out["loss_kd_local_refine"].detach()) == 0.0 and out["loss_kd_local_refine"].requires_grad


def test_aligned_views_take_the_row_cell_for_cell(setup, unit_cache):
    """An aligned view (distill_cfg.image_views='aligned') is a window of the image at a cached scale on the
    teacher's grid: the row moves into it exactly (no resampling), heatmap and coarse maps are the row's window."""
    from yolc_kd.cache.image_view import row_to_view
    from yolc_kd.data.aligned_views import AlignedViews

    cfg = load_config(setup.config, with_defaults=True)
    aug = AugmentConfig.from_pipeline(cfg["train_pipeline"])
    views = AlignedViews(aug, (1.0,))
    src = _source(unit_cache)
    coco = CocoDetection(setup.ann, setup.data)
    flips = set()
    for i in range(len(coco)):
        image = coco.load_image(i)
        boxes, labels = coco.annotations(i)
        image_id = coco.image_info(i)["id"]
        for p in range(3):
            s = views(image, boxes, labels, (3, image_id, p))
            again = views(image, boxes, labels, (3, image_id, p))
            assert torch.equal(s.img, again.img) and s.view == again.view  # a key gives one view
            move = row_to_view(image.shape[:2], 1.0, False, s.view)
            assert move.moves_cells(4) and move.moves_cells(1)
            x0, y0 = s.params["aligned"]["window_xy"]
            assert x0 % 8 == 0 and y0 % 8 == 0 and tuple(s.img.shape[-2:]) == (96, 128)
            flips.add(bool(s.params["flipped"]))
            got = src.sample_targets(image_id, 0, image, s)
            heat, valid = move_heatmaps([(got.heatmap_window, got.heatmap_move)], (96, 128), torch.device("cpu"))
            row = HEATMAP.decode(src.reader.read_sample(i)["heatmap"])
            window, ok = move.apply_map(torch.from_numpy(row), 1, out_size=(96, 128))
            torch.testing.assert_close(heat[0], torch.where(ok, window, torch.zeros(())), rtol=0, atol=1e-6)
            assert torch.equal(valid[0, 0], ok)
            if len(s.boxes):
                assert (s.boxes[:, 2] <= 128).all() and (s.boxes[:, 3] <= 96).all()
    assert flips == {False, True}


def test_image_views_setting_picks_the_views(setup, unit_cache, tmp_path):
    from yolc_kd.data.aligned_views import AlignedViews
    from yolc_kd.data.augment import TrainAugment
    from yolc_kd.train.recipe import train_augment

    aug = AugmentConfig()
    src = _source(unit_cache)
    assert isinstance(train_augment(aug, src, DistillSettings()), AlignedViews)  # the default: aligned views
    assert type(train_augment(aug, src, DistillSettings(image_views="free"))) is TrainAugment
    assert type(train_augment(aug, None, DistillSettings(image_views="aligned"))) is TrainAugment  # no image cache
    with pytest.raises(UserError, match="image_views"):
        DistillSettings.from_config(dict(image_views="snapped"))


def test_map_windows_equal_zarr_and_a_damaged_shard_is_one_line(setup, unit_cache, tmp_path, capsys):
    import shutil

    import zarr

    reader = CacheReader(unit_cache)
    group = zarr.open_group(str(unit_cache), mode="r")
    requests = [("heatmap", (1, slice(None), slice(8, 200), slice(40, 300))), ("coarse", (0, slice(1, 3))),
                ("refine", (1, 0)), ("patch_valid", (slice(0, 2),))]
    for (name, sel), got in zip(requests, reader.read_requests(requests)):
        assert np.array_equal(got, group[name][sel]), name  # maps past zarr (shard_windows), the rest through it
    damaged = tmp_path / "damaged"
    shutil.copytree(unit_cache, damaged)
    for shard in (damaged / "heatmap" / "c").rglob("*"):
        if shard.is_file():
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 3] ^= 0xFF
            shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["train", "--config", str(setup.config), "--ann", str(setup.ann), "--images", str(setup.data),
                 "--cache", str(damaged), "--work-dir", str(tmp_path / "w"), "--max-iters", "1",
                 "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "array 'heatmap' is damaged" in err[0] and "Traceback" not in err[0]


def test_zero_outside_a_rectangle_and_any_mask():
    from yolc_kd.cache.image_view import _zero_outside

    x = torch.rand(3, 6, 7) + 0.1
    for valid in (torch.zeros(6, 7, dtype=torch.bool), torch.ones(6, 7, dtype=torch.bool)):
        y = x.clone()
        _zero_outside(y, valid)
        assert torch.equal(y, x * valid)
    rect = torch.zeros(6, 7, dtype=torch.bool)
    rect[1:4, 2:6] = True
    ring = torch.ones(6, 7, dtype=torch.bool)
    ring[2:4, 2:4] = False  # not a rectangle: the masked fill
    for valid in (rect, ring):
        y = x.clone()
        _zero_outside(y, valid)
        assert torch.equal(y, x * valid)


def test_mirrored_rows_are_the_teacher_on_the_mirrored_image_and_serve_mirrored_views(setup, mirrored_cache):
    """precompute --mirror: row 2i+1 is the teacher on image i mirrored; an aligned mirrored view is on the mirrored
    row's grid, takes that row cell for cell (no mirroring left in the move) and gets its heatmap window."""
    from yolc_kd.cache.image_view import row_to_view, view_mirrored
    from yolc_kd.data.aligned_views import AlignedViews

    reader = CacheReader(mirrored_cache)
    lay = reader.layout
    assert lay.mirrored and lay.variants == 2 and lay.image_rows() == ((1.0, False), (1.0, True))
    assert reader.manifest["mirrored"] is True
    cfg = load_config(setup.config, with_defaults=True)
    coco = CocoDetection(setup.ann, setup.data)
    teacher = build_teacher(cfg["distill"], cfg["model"], None, str(setup.ckpt))
    aug = AugmentConfig.from_pipeline(cfg["train_pipeline"])
    image = coco.load_image(0)
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(normalise(image[:, ::-1], aug).transpose(2, 0, 1)))
    canvas = torch.zeros(1, 3, -(-h // 32) * 32, -(-w // 32) * 32)
    canvas[0, :, :h, :w] = x
    with torch.no_grad():
        t = image_targets(teacher, canvas, (h, w), (96, 128), cfg["distill"], lay.max_patches)
    row = reader.read_sample(1)  # image 0, mirrored
    assert json.loads(str(row["aug_params"]))["mirrored"] is True
    p = t.heatmap[0].numpy()[:, :h, :w]
    assert (np.abs(HEATMAP.decode(row["heatmap"])[:, :h, :w] - p) <= HEATMAP.tolerance(p)).all()
    views = AlignedViews(aug, lay.scales, mirrored_rows=True)
    src = _source(mirrored_cache)
    boxes, labels = coco.annotations(0)
    mirrored_seen = 0
    for k in range(8):
        s = views(image, boxes, labels, (5, int(coco.image_info(0)["id"]), k))
        flipped = view_mirrored(s.view)
        move = row_to_view((h, w), 1.0, flipped, s.view)
        assert move.moves_cells(4) and move.moves_cells(1) and not view_mirrored(move)
        got = src.sample_targets(int(coco.image_info(0)["id"]), k, image, s)
        heat, valid = move_heatmaps([(got.heatmap_window, got.heatmap_move)], (96, 128), torch.device("cpu"))
        stored = HEATMAP.decode(reader.read_sample(int(flipped))["heatmap"])
        window, ok = move.apply_map(torch.from_numpy(stored), 1, out_size=(96, 128))
        torch.testing.assert_close(heat[0], torch.where(ok, window, torch.zeros(())), rtol=0, atol=1e-6)
        mirrored_seen += flipped
    assert 0 < mirrored_seen < 8


def test_image_flags_are_for_the_image_kind(setup, tmp_path, capsys):
    base = ["precompute", "--config", str(setup.config), "--ckpt", str(setup.ckpt), "--out", str(tmp_path / "v"),
            "--no-progress"]
    for extra, msg in ((["--kind", "view", "--mirror", "on"], "--mirror is for --kind image"),
                       (["--variants", "2", "--scales", "1.0"], "--scales is for --kind image"),
                       (["--variants", "2", "--regions", "3"], "--regions is for --kind image"),
                       (["--kind", "image", "--train-iters", "9"], "--train-iters sizes --variants auto")):
        assert main(base + extra) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (extra, err)
    assert not (tmp_path / "v").exists()


def test_default_kind_is_image_unless_variants_or_a_view_cache(setup, tmp_path, capsys):
    """--kind auto: image-level for a new cache, per-view with --variants (or --train-iters), and a rerun without
    flags resumes whatever kind is at --out."""
    base = ["precompute", "--config", str(setup.config), "--ckpt", str(setup.ckpt), "--no-progress", "--out"]
    assert main(base + [str(tmp_path / "img")]) == 0
    assert CacheReader(tmp_path / "img").manifest["kind"] == "image"
    assert main(base + [str(tmp_path / "view"), "--variants", "1"]) == 0
    assert CacheReader(tmp_path / "view").manifest["kind"] == "view"
    capsys.readouterr()
    assert main(base + [str(tmp_path / "view"), "--variants", "1"]) == 0  # resumed: nothing left to write
    assert "this run wrote 0 views" in capsys.readouterr().out
    assert main(base + [str(tmp_path / "view")]) != 0  # taken as the per-view cache it is: --variants auto differs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variants (cache 1, now" in err[0] and "kind (cache" not in err[0], err
    assert main(base + [str(tmp_path / "img"), "--scales", "1.0"]) == 0  # the image cache resumed
    assert "this run wrote 0 rows" in capsys.readouterr().out


def test_auto_rows_fit_three_teacher_forwards(setup, tmp_path):
    """--scales auto --mirror auto: a flipping augmentation gets mirrored rows at one scale (2 forwards per image),
    one that never flips plain rows (the setup's views are all at scale 1: one scale)."""
    assert parse_scales("auto", 0.8, 1.25) == auto_scales(0.8, 1.25, 3)
    assert parse_scales("auto", 0.8, 1.25, mirrored=True) == auto_scales(0.8, 1.25, 1)
    assert _precompute(setup, tmp_path / "flips") == 0
    lay = CacheReader(tmp_path / "flips").layout
    assert lay.mirrored and lay.scales == (1.0,) and lay.variants == 2
    still = tmp_path / "still.py"
    still.write_text(setup.config.read_text().replace("flip_ratio=0.5", "flip_ratio=0.0"))
    assert "flip_ratio=0.0" in still.read_text()
    assert main(["precompute", "--config", str(still), "--ckpt", str(setup.ckpt), "--out", str(tmp_path / "still"),
                 "--kind", "image", "--no-progress"]) == 0
    lay = CacheReader(tmp_path / "still").layout
    assert not lay.mirrored and lay.variants == 1
