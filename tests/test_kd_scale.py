"""Scale of the KD terms at the start of training: with weights 1.0 every KD term is within
0.1x..10x of the supervised heatmap loss, at the tiny scale and at 1024x640 with 10 classes (heatmap prior 0.01).
At YOLC's own 0.5 init the supervised heatmap loss grows with C*H*W; the last test pins what holds there.

Student: random init. Teacher: looks like the shipped trained teacher (a random-weight teacher's heatmap is flat
0.5 and its boxes ~0): 0.4-high gaussians at the GT (the project's target code) over a 0.01 background, and box
maps in which cells near an object predict it."""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pytest
import torch

from conftest import REPO, plain_metas, tiny_model_cfg
from yolc_kd import crops
from yolc_kd.config import load_config
from yolc_kd.kd import KDTargets, kd_losses
from yolc_kd.models import build_detector
from yolc_kd.models.targets import yolc_targets
from yolc_kd.settings import DistillSettings

KD_KEYS = ("loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine")
# the shipped tiny teacher on the demo's held-out images: median peak 0.395 at the GT centres, median 0.012 elsewhere
PEAK, BACKGROUND = 0.4, 0.01
UNIT = DistillSettings(kd_weight_global_hm=1.0, kd_weight_global_coarse=1.0, kd_weight_local_refine=1.0)


def shipped_prior(config: str) -> Optional[float]:
    """heatmap_prior_prob of a shipped student config (None: YOLC's init, heatmaps start at 0.5)."""
    return load_config(REPO / "configs" / config)["model"]["bbox_head"].get("heatmap_prior_prob")


def scene(h: int, w: int, num_classes: int, n: int = 30, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """n small boxes (6..24 px, x1y1x2y2) in two clusters, as in aerial views; random classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.3 * w, 0.35 * h], [0.7 * w, 0.65 * h]])[torch.arange(n) % 2]
    ctr = centres + (torch.rand(n, 2, generator=g) - 0.5) * torch.tensor([0.25 * w, 0.3 * h])
    size = 6 + 18 * torch.rand(n, 2, generator=g)
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], 1).clamp(min=0)
    return boxes.round(), torch.randint(0, num_classes, (n,), generator=g)


def raw_boxes(boxes: torch.Tensor, grid_hw: Sequence[int], reach: float = 3.0) -> torch.Tensor:
    """(4,gh,gw) raw xywh maps of a trained-looking teacher: a stride-4 cell within `reach` cells of an object
    predicts its nearest object, other cells a small box of the data's typical size."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    raw = torch.tensor([0.5, 0.5, 1.5, 1.5]).repeat(cells.shape[0], 1)
    if boxes.shape[0]:
        ctr = (boxes[:, :2] + boxes[:, 2:]) / 8  # grid units
        half = (boxes[:, 2:] - boxes[:, :2]) / 8
        dist, j = torch.cdist(cells, ctr).min(dim=1)
        near = dist <= reach
        raw[near] = torch.cat([ctr[j] - cells, half[j]], 1)[near]
    return raw.T.reshape(4, gh, gw)


def teacher_targets(gt_b: List[torch.Tensor], gt_l: List[torch.Tensor], hw: Sequence[int], num_classes: int,
                    patch: Sequence[float]) -> KDTargets:
    """KDTargets of the trained-looking teacher with one valid patch per view (slot 0 of 2) at `patch`."""
    h, w = hw
    b = len(gt_b)
    heat = yolc_targets(gt_b, gt_l, (b, 4, h // 4, w // 4), (h, w), num_classes)[0]["center_heatmap_target"]
    heat = (PEAK * heat + BACKGROUND).clamp(0, 1)
    coarse = torch.stack([raw_boxes(bx, (h // 4, w // 4)) for bx in gt_b])
    canvas = crops.patch_canvas((h, w))
    x0, y0, pw, ph = patch
    s = min(1.5, canvas[0] / ph, canvas[1] / pw)
    boxes, scales = torch.zeros(b, 2, 4), torch.zeros(b, 2)
    boxes[:, 0], scales[:, 0] = torch.tensor([x0, y0, pw, ph]), s
    valid = torch.zeros(b, 2, dtype=torch.bool)
    valid[:, 0] = True
    refine = torch.zeros(b, 2, 4, canvas[0] // 4, canvas[1] // 4)
    for i, bx in enumerate(gt_b):  # GT in the patch frame: shifted to the crop, scaled like the crop
        local = (bx - torch.tensor([x0, y0, x0, y0])) * s
        c = (local[:, :2] + local[:, 2:]) / 2
        inside = (c[:, 0] >= 0) & (c[:, 1] >= 0) & (c[:, 0] < pw * s) & (c[:, 1] < ph * s)
        refine[i, 0] = raw_boxes(local[inside], (canvas[0] // 4, canvas[1] // 4))
    return KDTargets(heatmap=heat, coarse=coarse, patch_boxes=boxes, patch_scales=scales, patch_valid=valid,
                     refine=refine)


@torch.no_grad()
def start_losses(num_classes: int, hw: Tuple[int, int], prior: Optional[float], dcfgs: Mapping[str, Mapping],
                 batch: int = 1, seed: int = 0) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Supervised losses of a random-init student, and its KD terms against the trained-looking teacher for
    every distill_cfg of dcfgs (one forward)."""
    torch.manual_seed(seed)
    cfg = tiny_model_cfg(num_classes=num_classes, widths=(8, 16, 32, 64), neck=16, feat=8)
    cfg["bbox_head"]["heatmap_prior_prob"] = prior
    student = build_detector(cfg).train()
    h, w = hw
    img = torch.randn(batch, 3, h, w)
    scenes = [scene(h, w, num_classes, seed=seed + i) for i in range(batch)]
    gt_b, gt_l = [s[0] for s in scenes], [s[1] for s in scenes]
    targets = teacher_targets(gt_b, gt_l, hw, num_classes, (0.1 * w, 0.1 * h, 0.4 * w, 0.5 * h))  # cluster 1
    heat, coarse, refine = student.bbox_head(student.extract_feat(img))
    sup = student.bbox_head.loss(heat, coarse, refine, gt_b, gt_l, plain_metas(batch, h, w))
    plan = crops.KDPatchPlan.from_targets(targets.patch_boxes, targets.patch_scales, targets.patch_valid, (h, w))
    patch_refine = student.patch_refine(plan.cut(img))
    decode = student.bbox_head.decode_xywh_to_bbox
    kd = {name: kd_losses(heat[0], coarse[0], patch_refine, targets, UNIT.replace(**d), decode)
          for name, d in dcfgs.items()}
    return {k: float(v) for k, v in sup.items()}, {n: {k: float(v) for k, v in t.items()} for n, t in kd.items()}


VARIANTS = {"default": {}, "mse_distance": dict(box_kd_distance="mse")}


def _ratios(sup: Mapping[str, float], kd: Mapping[str, float], key: str = "loss_center_heatmap") -> Dict[str, float]:
    return {k: kd[k] / sup[key] for k in KD_KEYS}


def shipped_kd_weights(config: str) -> Dict[str, float]:
    settings = load_config(REPO / "configs" / config)["distill"]
    return {k: float(v) for k, v in settings.to_dict().items() if k.startswith("kd_weight_")}


@pytest.mark.parametrize("config,num_classes,hw,batch", [
    ("tiny_student_synth.py", 4, (256, 384), 2),             # the tiny config: 384x256, 4 classes
    ("yolc_hrnet_w18_visdrone_kd.py", 10, (640, 1024), 1),   # the w18 config: 1024x640, 10 classes
], ids=["tiny_384x256x4", "visdrone_1024x640x10"])
def test_kd_terms_within_10x_of_supervised_heatmap_loss_at_start(config, num_classes, hw, batch):
    """At unit weights and at the shipped config's weights (both scale-free, so the same at both scales)."""
    weights = shipped_kd_weights(config)
    assert all(0.1 <= w <= 10 for w in weights.values()), weights
    dcfgs = dict(VARIANTS, shipped=weights)
    sup, kd = start_losses(num_classes, hw, shipped_prior(config), dcfgs, batch=batch)
    for name, terms in kd.items():
        for key, r in _ratios(sup, terms).items():
            assert 0.1 <= r <= 10, f"{name} {key}: {r:.3g}x the supervised heatmap loss"


def test_seed_heatmap_mse_is_tiny_at_start():
    """Why the seed's formulas need a heatmap weight ~1e6: their MSE is a mean over >99.8 % background."""
    sup, kd = start_losses(4, (256, 384), 0.01, {"seed": dict(hm_kd="mse", box_kd="mse")}, batch=2)
    assert _ratios(sup, kd["seed"])["loss_kd_global_hm"] < 1e-3


def test_shipped_students_start_their_heatmap_at_one_percent():
    assert shipped_prior("tiny_student_synth.py") == shipped_prior("yolc_hrnet_w18_visdrone_kd.py") == 0.01


def test_yolc_init_at_1024x640_heatmap_kd_tracks_the_supervised_loss():
    """YOLC's own init (heatmaps at 0.5): the supervised heatmap loss is then a sum over every background pixel /
    number of objects, so grows with C*H*W; the soft-focal term grows with it, the box terms stay at the scale of
    the supervised box losses."""
    sup, kd = start_losses(10, (640, 1024), None, {"default": {}})
    assert 0.1 <= _ratios(sup, kd["default"])["loss_kd_global_hm"] <= 10
    for key, sup_key in (("loss_kd_global_coarse", "loss_xywh_coarse"), ("loss_kd_local_refine", "loss_xywh_refine")):
        r = kd["default"][key] / (sup[sup_key] + sup[sup_key + "_l1"])
        assert 0.1 <= r <= 10, f"{key}: {r:.3g}x the supervised box loss"
