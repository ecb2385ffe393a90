"""The full-image pass in overlapping tiles (models/tiling.py): the plan, the stitched maps against the untiled
ones, the detections, the pixel budget of `yolc-kd infer` (--max-pixels, --large-image) and the memory check."""
import json

import numpy as np
import pytest
import torch
from conftest import plain_metas, tiny_model_cfg
from PIL import Image

from yolc_kd.cli import main
from yolc_kd.errors import ModelConfigError, UserError
from yolc_kd.infer import predict as P
from yolc_kd.models import build_detector, tiling
from yolc_kd.models.yolc_head import gaussian_blur3x3, local_maximum

pytestmark = pytest.mark.usefixtures("one_thread")

# The test model's outputs stop changing 160 px from a cut edge (float32, measured as in BENCHMARKS.md "Large
# images"); with 192 px of overlap the stitched heatmap is the untiled one up to float noise
OVERLAP = 192


def _model(**test_cfg) -> torch.nn.Module:
    """Random weights; the heatmap branch scaled up so the heatmap follows the image (peaks, LSM clusters)."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    cfg["test_cfg"].update({"crop": dict(min_patch_size=8), "tile_overlap": OVERLAP, **test_cfg})
    model = build_detector(cfg).eval()
    with torch.no_grad():
        for m in model.bbox_head.local_head.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.normal_(0, 0.5)
        head = model.bbox_head  # boxes of ~1.5 cells that vary with the content (not zero-size)
        head.reg_conv[2].weight.mul_(0.1)
        head.reg_conv[2].bias.fill_(1.0)
        head.xywh_init.weight.zero_()
        head.xywh_init.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
        head.xywh_refine.weight.mul_(0.1)
        head.xywh_refine.weight[2:4] += 1.5 / (9 * head.xywh_refine.weight.shape[1])
    return model


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A normalised input with smooth structure (blobs), as a photo has, plus noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 3, h // 32, w // 32, generator=g)
    noise = torch.randn(1, 3, h, w, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear") + 0.3 * noise


# ----------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("h,w,budget,overlap", [(640, 640, 200_000, 192), (4032, 6016, 4_194_304, 384),
                                                (320, 1024, 120_000, 64), (96, 128, 5_000, 0)])
def test_cores_tile_the_input_exactly_on_the_32_grid(h, w, budget, overlap):
    tiles = tiling.plan_tiles(h, w, budget, overlap)
    assert len(tiles) > 1
    owner = np.zeros((h, w), np.int64)
    for y0, y1, x0, x1, cy0, cy1, cx0, cx1 in tiles:
        assert (y1 - y0) * (x1 - x0) <= budget
        assert all(v % 32 == 0 for v in (y0, x0, cy0, cx0))
        # the window holds the core and `overlap` pixels of context on every side that is not the input's border
        assert y0 == max(0, cy0 - overlap) and y1 == min(h, cy1 + overlap)
        assert x0 == max(0, cx0 - overlap) and x1 == min(w, cx1 + overlap)
        owner[cy0:cy1, cx0:cx1] += 1
    assert (owner == 1).all()


def test_an_input_within_the_budget_is_one_tile_and_a_batch_within_it_is_not_tiled():
    assert tiling.plan_tiles(256, 320, 256 * 320, 384) == [(0, 256, 0, 320, 0, 256, 0, 320)]
    assert tiling.batch_tiles(2, 256, 320, 2 * 256 * 320, 384) is None
    assert tiling.batch_tiles(2, 256, 320, 0, 384) is None  # 0: no budget
    tiles = tiling.batch_tiles(2, 256, 320, 256 * 320, 384)  # over it: one image per forward
    assert [(t.b, t.pixels) for t in tiles] == [(0, 256 * 320), (1, 256 * 320)]


def test_a_budget_below_the_smallest_tile_is_one_line():
    with pytest.raises(UserError, match="below the smallest tile .* 384-pixel overlap"):
        tiling.plan_tiles(2048, 2048, 500_000, 384)
    with pytest.raises(ValueError, match="multiples of 32"):
        tiling.plan_tiles(100, 2048, 50_000, 0)


@pytest.mark.parametrize("key,value,match", [("max_pixels", -1, "max_pixels must be an integer >= 0"),
                                             ("max_pixels", 1.5, "max_pixels must be an integer"),
                                             ("tile_overlap", 100, "multiple of 32"),
                                             ("tile_overlap", True, "tile_overlap must be an integer")])
def test_bad_tiling_settings_are_refused_when_the_model_is_built(key, value, match):
    cfg = tiny_model_cfg()
    cfg["test_cfg"][key] = value
    with pytest.raises(ModelConfigError, match=match):
        build_detector(cfg)


# ----------------------------------------------------------------------------- stitched maps = untiled maps

def test_stitched_maps_equal_the_untiled_maps_up_to_float_noise():
    """Forced tiny budget: 512x896 in 2x2 tiles of <= 300k pixels, each cut on one side in x and one in y.
    Measured: heatmap max abs difference 1.2e-6 (values up to 1.0); refine 8e-6 (values up to 1.5), spread evenly,
    not at the seams: a plain crop of the input already differs by 5e-6 (the deformable conv's sampling grid is
    normalised by the map's size)."""
    model = _model()
    img = _image(512, 896)
    tiles = tiling.batch_tiles(1, 512, 896, 300_000, OVERLAP)
    assert len(tiles) == 4 and {(t.y0 > 0, t.x0 > 0) for t in tiles} == {(a, b) for a in (0, 1) for b in (0, 1)}
    with torch.no_grad():
        heat, _, refine = model.bbox_head(model.extract_feat(img))
        stitched = tiling.run_tiled(img, tiles, lambda window: model._tile_maps(window, True))
    heat, refine = heat[0], refine[0]
    assert stitched["heat"].shape == heat.shape and stitched["refine"].shape == refine.shape
    diff = (stitched["heat"] - heat).abs().max().item()
    assert diff < 1e-5, diff
    assert (stitched["refine"] - refine).abs().max().item() < 5e-5
    blurred = gaussian_blur3x3(heat)
    assert (stitched["lsm"] - blurred.amax(1, keepdim=True)).abs().max().item() < 1e-5
    peaks = local_maximum(blurred, 3)
    strong = peaks > 0.1
    assert strong.sum() > 10  # the same peaks where they matter
    assert torch.equal(strong, stitched["peaks"] > 0.1)


def test_a_short_overlap_shows_at_the_seams():
    """The overlap is what makes the tiles agree: without it the maps differ visibly at the cuts."""
    model = _model(tile_overlap=0)
    img = _image(512, 896)
    with torch.no_grad():
        heat = model.bbox_head(model.extract_feat(img))[0][0]
        stitched = tiling.run_tiled(img, tiling.batch_tiles(1, 512, 896, 300_000, 0),
                                    lambda window: model._tile_maps(window, True))
    assert (stitched["heat"] - heat).abs().max().item() > 1e-2


def test_simple_test_in_tiles_gives_the_untiled_detections_and_crops():
    model = _model()
    img = torch.cat([_image(480, 640, 1), _image(480, 640, 2)])
    metas = plain_metas(2, 480, 640)
    metas[1]["img_shape"], metas[1]["border"] = (440, 600, 3), np.array([16, 456, 24, 624], np.float32)
    whole, we = model.simple_test(img, metas, rescale=True, return_extras=True, max_pixels=0)
    tiled, te = model.simple_test(img, metas, rescale=True, return_extras=True, max_pixels=250_000)
    assert sum(len(r) for r in we["regions"]) >= 1
    for a, b in zip(we["regions"], te["regions"]):
        np.testing.assert_array_equal(a, b)
    assert (we["heatmap"] - te["heatmap"]).abs().max().item() < 1e-5
    for (d1, l1), (d2, l2) in zip(whole, tiled):
        assert len(d1) > 10 and torch.equal(l1, l2)
        assert torch.allclose(d1, d2, atol=1e-3)
    lent = model.lsm_coords(img, metas, max_pixels=250_000)  # the crop model's tiled pass picks the same crops
    assert [len(r) for r in model.inference_patch_plan(img, metas, lent, 4).regions] == [len(r) for r in we["regions"]]
    _, none = model.simple_test(img, metas, return_extras=True, max_pixels=250_000, keep_heatmap=False, fusion="none")
    assert none["heatmap"] is None


def test_the_patch_canvas_over_the_budget_runs_in_tiles_too(monkeypatch):
    model = _model()
    img, metas = _image(480, 640, 3), plain_metas(1, 480, 640)
    seen = []
    forward = model._tile_maps
    monkeypatch.setattr(model, "_tile_maps", lambda w, keep: seen.append(tuple(w.shape[2:])) or forward(w, keep))
    whole_image = [np.array([[0, 0, 640, 480]])]  # one patch as large as the image: a 480x640 canvas
    model.simple_test(img, metas, max_pixels=250_000, crop_coords=whole_image)
    assert len(seen) == 2 * len(tiling.batch_tiles(1, 480, 640, 250_000, OVERLAP))  # the canvas's tiles follow
    assert max(h * w for h, w in seen) <= 250_000


# ----------------------------------------------------------------------------- predictor and command

def _write_image(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(low).resize((w, h), Image.BILINEAR).save(path)
    return path


def test_predictor_tiles_or_downscales_an_image_over_the_budget():
    model = _model()
    rng = np.random.default_rng(0)
    img = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((620, 470)))
    whole = P.Predictor(model, {}, device="cpu", max_pixels=0)([img], keep_heatmap=True)[0]
    tiled = P.Predictor(model, {}, device="cpu", max_pixels=250_000)([img], keep_heatmap=True)[0]
    np.testing.assert_array_equal(whole.regions, tiled.regions)
    np.testing.assert_allclose(whole.boxes, tiled.boxes, atol=1e-3)
    assert np.abs(whole.heatmap - tiled.heatmap).max() < 1e-5
    small = P.Predictor(model, {}, device="cpu", max_pixels=100_000, large_image="downscale")
    nh, nw = small.input_hw(470, 620)
    assert (nh, nw) != (470, 620) and np.prod(small.transform.target_hw(nh, nw)) <= 100_000
    pred = small([img], keep_heatmap=True)[0]
    assert len(whole.boxes) > 10 and len(pred.boxes) > 0  # in the image's own pixels
    assert (pred.boxes[:, [0, 2]] <= 620).all() and (pred.boxes[:, [1, 3]] <= 470).all()
    assert pred.boxes[:, 2].max() > 0.8 * 620 or pred.boxes[:, 3].max() > 0.8 * 470
    assert pred.heatmap.shape == (3, nh, nw)
    with pytest.raises(UserError, match="max_pixels must be a non-negative integer"):
        P.Predictor(model, {}, device="cpu", max_pixels=-5)
    with pytest.raises(UserError, match="large_image must be one of tile, downscale"):
        P.Predictor(model, {}, device="cpu", large_image="crop")


def test_an_image_that_cannot_fit_is_one_line_before_any_work(tmp_path, monkeypatch):
    model = _model()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2000000 kB\nMemAvailable:     100000 kB\n")  # 98 MiB
    monkeypatch.setattr(tiling, "MEMINFO", meminfo)
    folder = tmp_path / "imgs"
    folder.mkdir()
    _write_image(folder / "a.png", 64, 96)
    _write_image(folder / "b.png", 400, 600, 1)
    calls = []
    predictor = P.Predictor(model, {}, device="cpu", max_pixels=0)
    monkeypatch.setattr(predictor.model, "simple_test", lambda *a, **k: calls.append(1))
    source = P.folder_source(folder, ("a", "b", "c"))
    with pytest.raises(UserError, match=r"b.png \(600x400\) needs about .* MiB \(one untiled pass over 0.3 MP\) "
                                        r"but 98 MiB of memory is available: set --max-pixels"):
        P.predict_images(predictor, source, progress=False)
    assert not calls  # refused before the first image ran
    estimate, how = model.memory_estimate(1, 2016, 3008, max_pixels=1_000_000)
    assert "tiles of <= 0.9 MP" in how and estimate < model.memory_estimate(1, 2016, 3008, max_pixels=0)[0]


def test_prefetch_keeps_the_order_and_hands_errors_to_the_loop(tmp_path):
    good = [P.ImageItem(i, _write_image(tmp_path / f"{i}.png", 32, 48, i), f"{i}.png") for i in range(4)]
    bad = P.ImageItem(9, tmp_path / "missing.png", "missing.png")
    items = good[:2] + [bad] + good[2:]
    seen = list(P._read_ahead(items))
    assert [item.image_id for item, _ in seen] == [0, 1, 9, 2, 3]
    assert isinstance(seen[2][1], UserError) and "missing.png" in str(seen[2][1])
    assert all(isinstance(a, np.ndarray) and a.shape == (32, 48, 3) for i, (_, a) in enumerate(seen) if i != 2)


def _config(tmp_path, **test_cfg):
    cfg = tiny_model_cfg()
    cfg["test_cfg"].update(crop=dict(min_patch_size=8), tile_overlap=OVERLAP, **test_cfg)
    path = tmp_path / "cfg.py"
    path.write_text(f"model = {cfg!r}\nclasses = ('a', 'b', 'c')\n")
    return path


def test_infer_command_max_pixels_and_large_image(tmp_path, capsys):
    from yolc_kd.checkpoint import save_checkpoint

    folder = tmp_path / "imgs"
    folder.mkdir()
    _write_image(folder / "big.png", 470, 620)
    ckpt = save_checkpoint(tmp_path / "m.pth", _model())
    cfg = _config(tmp_path)
    base = ["infer", "--config", str(cfg), "--ckpt", str(ckpt), "--images", str(folder), "--device", "cpu"]
    outs = {}
    for name, extra in (("whole", ["--max-pixels", "0"]), ("tiled", ["--max-pixels", "250000"]),
                        ("down", ["--max-pixels", "100000", "--large-image", "downscale"])):
        assert main(base + ["--out", str(tmp_path / f"{name}.json")] + extra) == 0
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(outs["whole"]) == len(outs["tiled"]) > 0
    for a, b in zip(outs["whole"], outs["tiled"]):
        assert a["category_id"] == b["category_id"] and np.allclose(a["bbox"], b["bbox"], atol=0.02)
    assert outs["down"] and outs["down"] != outs["whole"]
    capsys.readouterr()
    for extra, message in ((["--max-pixels", "-1"], "--max-pixels must be at least 0"),
                           (["--max-pixels", "0", "--large-image", "downscale"], "--large-image downscale needs"),
                           (["--amp-dtype", "bfloat16"], "--amp-dtype needs --amp"),
                           (["--max-pixels", "100000"], "below the smallest tile")):
        assert main(base + ["--out", str(tmp_path / "x.json")] + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
