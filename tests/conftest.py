import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)
def _find_shared() -> Path:
    """The project's shared/ folder: $YOLC_KD_SHARED, beside the checkout, or /work/shared."""
    candidates = [os.environ.get("YOLC_KD_SHARED"), Path(__file__).resolve().parents[2] / "shared", "/work/shared"]
    for c in candidates:
        if c and (Path(c) / "reference").is_dir():
            return Path(c)
    return Path(__file__).resolve().parents[2] / "shared"


SHARED = _find_shared()
REFERENCE = SHARED / "reference" / "yolc_original_small.npz"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"reference outputs of the original YOLC not found at {REFERENCE}")
    return np.load(REFERENCE)


@pytest.fixture(scope="session")
def ref_model(reference):
    from yolc_kd.models import build_detector

    model = build_detector(json.loads(str(reference["model_cfg"])))
    sd = {k[4:]: torch.from_numpy(np.array(reference[k])) for k in reference.files if k.startswith("sd::")}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def tiny_model_cfg(num_classes: int = 3, widths=(8, 16, 32, 64), neck: int = 32, feat: int = 16) -> dict:
    def stage(n, block, ch):
        return dict(num_modules=1, num_branches=n, block=block, num_blocks=[1] * n, num_channels=list(ch))

    return dict(
        type="YOLC",
        backbone=dict(type="HRNet", extra=dict(stage1=stage(1, "BOTTLENECK", [16]), stage2=stage(2, "BASIC", widths[:2]),
                                               stage3=stage(3, "BASIC", widths[:3]), stage4=stage(4, "BASIC", widths))),
        neck=dict(type="HRFPN", in_channels=list(widths), out_channels=neck, num_outs=1),
        bbox_head=dict(type="YOLCHead", num_classes=num_classes, in_channel=neck, feat_channel=feat),
        test_cfg=dict(topk=100, local_maximum_kernel=3, max_per_img=100, nms_cfg=dict(iou_threshold=0.6)))


def plain_metas(n: int, h: int, w: int):
    return [dict(batch_input_shape=(h, w), pad_shape=(h, w, 3), img_shape=(h, w, 3),
                 scale_factor=np.ones(4, np.float32), border=np.zeros(4, np.float32)) for _ in range(n)]
