"""Large images: peak RSS and time of `yolc-kd infer` on one drone-size image, and the tile overlap the models need.

Cases (each `yolc-kd infer` run in its own process, its peak RSS from getrusage; see _cache_rss.run_measured):
  tiny:  the shipped tiny teacher on one synthetic 6000x4000 image (a 1500x1000 `yolc-kd synth` image tiled
         4 x 4), full `yolc-kd infer` (fused crop-refine as configured), with the default pixel budget;
         --untiled also runs it with --max-pixels 0 (the whole image in one pass, as before tiling).
  w48:   the HRNet-w48 teacher (configs/yolc_hrnet_w48_visdrone.py) with RANDOM weights on one 4000x3000 image,
         full-image pass only (--max-patches 0: with random weights the patches are arbitrary), default budget.
  seam:  how far a tile's cut edge changes the outputs (float32): the model on a 128 x W strip vs on its left
         half, max abs difference of heatmap / refine maps by distance from the cut, for the tiny teacher (shipped
         weights) and w18 / w48 (random weights, the head's convs re-drawn with Kaiming init so it is not flat);
         plus the theoretical receptive field radius (float64 gradient of one output pixel: farthest input reached).

    python benchmarks/bench_large_image.py [--cases tiny w48 seam] [--untiled] [--timeout 3000] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from _cache_rss import run_measured
from _common import emit, log  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_CKPT = REPO / "src" / "yolc_kd" / "assets" / "tiny_teacher_synth.pth"
SEAM_DISTANCES = (0, 32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640)


def big_image(folder: Path, size: Tuple[int, int], seed: int) -> Path:
    """One synthetic (w, h) image: a `yolc-kd synth` image of a quarter of each side, tiled 4 x 4 (tiny objects
    stay tiny). Returns the folder holding it."""
    from PIL import Image

    from yolc_kd.data.synth import make_synthetic_dataset

    w, h = size
    src = make_synthetic_dataset(folder / "synth", 1, seed, size=(w // 4, h // 4), num_classes=4)
    tile = np.asarray(Image.open(next((src / "images").iterdir())).convert("RGB"))
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(tile, (4, 4, 1))).save(images / f"big_{w}x{h}.png")
    return images


def infer_case(name: str, tmp: Path, config: Path, ckpt: Path, images: Path, extra: List[str],
               timeout: int) -> Dict[str, Any]:
    """`yolc-kd infer` on the folder in its own process: wall s, peak RSS, detections; plus the estimate and the
    tile plan of the pass (what the memory check compares with MemAvailable)."""
    from yolc_kd.config import load_config
    from yolc_kd.data.augment import TestTransform
    from yolc_kd.data.images import read_image_size
    from yolc_kd.models import build_detector, tiling

    out = tmp / f"{name}.json"
    cmd = ["timeout", str(timeout), sys.executable, "-m", "yolc_kd", "infer", "--config", str(config), "--ckpt",
           str(ckpt), "--images", str(images), "--out", str(out), "--device", "cpu", *extra]
    log(f"{name}: {' '.join(cmd[3:])}")
    rc, rss_kib, wall = run_measured(cmd, tmp / f"{name}.log")
    (w, h), = {read_image_size(p) for p in images.iterdir()}
    th, tw = TestTransform().target_hw(h, w)
    model = build_detector(load_config(config, with_defaults=True)["model"])
    max_pixels = int(extra[extra.index("--max-pixels") + 1]) if "--max-pixels" in extra else None
    budget = model.tile_cfg["max_pixels"] if max_pixels is None else max_pixels
    estimate, how = model.memory_estimate(1, th, tw, max_pixels)
    tiles = tiling.batch_tiles(1, th, tw, budget, model.tile_cfg["tile_overlap"])
    computed = sum(t.pixels for t in tiles) if tiles else th * tw
    del model
    row = dict(case=name, image=f"{w}x{h}", padded=f"{tw}x{th}", rc=rc, wall_s=round(wall, 1),
               peak_rss_gib=round(rss_kib / 2 ** 20, 2), estimate_gib=round(estimate / 2 ** 30, 2), estimate=how,
               max_pixels=budget, tiles=len(tiles) if tiles else 1, computed_vs_image=round(computed / (th * tw), 2),
               detections=len(json.loads(out.read_text())) if rc == 0 and out.exists() else None,
               log_tail=(tmp / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:])
    log(f"{name}: {row}")
    return row


def seam_profile(config: Path, ckpt: Optional[Path] = None, width: int = 3072, height: int = 128) -> Dict[str, Any]:
    """Max abs difference (heatmap, refine) between the model on a strip and on its left half, by distance from
    the cut (float32), and the theoretical receptive field radius (float64 gradient support)."""
    import torch

    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector

    torch.manual_seed(0)
    model = build_detector(load_config(config, with_defaults=True)["model"]).eval()
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    else:  # YOLC's head init (std 0.001) gives near-constant outputs that hide how far a change reaches
        for m in model.bbox_head.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
    x = torch.randn(1, 3, height, width)
    cut = width // 2
    with torch.inference_mode():
        h0, _, r0 = model.bbox_head(model.extract_feat(x))
        h1, _, r1 = model.bbox_head(model.extract_feat(x[..., :cut].contiguous()))
    dh = (h0[0][..., :cut] - h1[0]).abs().amax(dim=(0, 1, 2)).flip(0)  # index = distance from the cut
    dr = (r0[0][..., :cut // 4] - r1[0]).abs().amax(dim=(0, 1, 2)).flip(0)
    rows = {d: (float(dh[d:].max()), float(dr[d // 4:].max())) for d in SEAM_DISTANCES if d < cut}
    model = model.double()
    xd = x.double().requires_grad_(True)
    heat, _, refine = model.bbox_head(model.extract_feat(xd))
    radius = {}
    # exact support: the gradient of one output pixel is nonzero wherever an input pixel reaches it (a forward
    # perturbation loses the far, tiny changes to rounding even in float64)
    for name, out, (y, x0) in (("heatmap", heat[0], (height // 2, cut)),
                               ("refine", refine[0], (height // 8, cut // 4))):
        grad, = torch.autograd.grad(out[0, :, y, x0].sum(), xd, retain_graph=True)
        cols = (grad[0].abs().amax(dim=(0, 1)) > 0).nonzero().flatten()
        centre = x0 * (width // out.shape[3])
        reach = int(max(centre - cols.min(), cols.max() - centre)) if len(cols) else 0
        radius[name] = reach if 0 < cols.min() and cols.max() < width - 1 else f">= {reach} (the strip's end)"
    return dict(config=config.name, weights="shipped" if ckpt else "random (Kaiming head)",
                heat_max=float(h0[0].max()), refine_absmax=float(r0[0].abs().max()),
                max_abs_diff_beyond={str(d): dict(heatmap=f"{v[0]:.2e}", refine=f"{v[1]:.2e}")
                                     for d, v in rows.items()},
                theoretical_rf_radius_px=radius)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["tiny", "w48", "seam"], choices=("tiny", "w48", "seam"))
    parser.add_argument("--untiled", action="store_true", help="also the tiny case with --max-pixels 0")
    parser.add_argument("--timeout", type=int, default=3000, help="seconds per infer run (killed after)")
    parser.add_argument("--keep", default=None, help="keep the images and outputs in this folder")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    results: Dict[str, Any] = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                threads=torch.get_num_threads(), python=platform.python_version(),
                                                torch=torch.__version__), runs=[], seam=[])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(args.keep) if args.keep else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        if "tiny" in args.cases:
            images = big_image(tmp / "tiny_data", (6000, 4000), seed=1)
            results["runs"].append(infer_case("tiny_6000x4000", tmp, CONFIGS / "tiny_teacher_synth.py", TINY_CKPT,
                                              images, [], args.timeout))
            if args.untiled:
                results["runs"].append(infer_case("tiny_6000x4000_untiled", tmp, CONFIGS / "tiny_teacher_synth.py",
                                                  TINY_CKPT, images, ["--max-pixels", "0"], args.timeout))
        if "w48" in args.cases:
            from yolc_kd.checkpoint import save_checkpoint
            from yolc_kd.config import load_config
            from yolc_kd.models import build_detector

            torch.manual_seed(0)
            config = CONFIGS / "yolc_hrnet_w48_visdrone.py"
            model = build_detector(load_config(config, with_defaults=True)["model"])
            ckpt = save_checkpoint(tmp / "w48_random.pth", model)
            del model
            images = big_image(tmp / "w48_data", (4000, 3000), seed=2)
            results["runs"].append(infer_case("w48_4000x3000", tmp, config, ckpt, images, ["--max-patches", "0"],
                                              args.timeout))
        if "seam" in args.cases:
            for config, ckpt in ((CONFIGS / "tiny_teacher_synth.py", TINY_CKPT),
                                 (CONFIGS / "yolc_hrnet_w18_visdrone_kd.py", None),
                                 (CONFIGS / "yolc_hrnet_w48_visdrone.py", None)):
                t0 = time.perf_counter()
                results["seam"].append(seam_profile(config, ckpt))
                log(f"seam {config.name}: {results['seam'][-1]} ({time.perf_counter() - t0:.0f} s)")
    emit(results, args.out)


if __name__ == "__main__":
    main()
