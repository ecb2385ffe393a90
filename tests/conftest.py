import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from yolc_kd import crops  # noqa: E402
from yolc_kd.cache.arrays import names as array_names  # noqa: E402
from yolc_kd.cache.verify import check_cache  # noqa: E402
from yolc_kd.checkpoint import save_checkpoint  # noqa: E402
from yolc_kd.data.synth import make_synthetic_dataset  # noqa: E402
from yolc_kd.models import build_detector  # noqa: E402

torch.set_num_threads(2)

# The suite runs on the CPU wherever it runs: `--device auto` (every command's default) reads $YOLC_KD_DEVICE,
# and torchrun / CLI subprocesses inherit it. The exact-equality tests (cache = live teacher, offline = online KD)
# hold on the CPU only. YOLC_KD_TEST_DEVICE=cuda also runs the tests marked `cuda` (they name their device):
#   YOLC_KD_TEST_DEVICE=cuda python -m pytest -q -m cuda
TEST_DEVICE = os.environ.get("YOLC_KD_TEST_DEVICE", "cpu").strip().lower() or "cpu"
os.environ["YOLC_KD_DEVICE"] = "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; runs with YOLC_KD_TEST_DEVICE=cuda")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cuda":
        return
    skip = pytest.mark.skip(reason="CUDA test: set YOLC_KD_TEST_DEVICE=cuda on a machine with a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    """The CUDA device of a `cuda` test; a failure (not a skip) when YOLC_KD_TEST_DEVICE=cuda finds no GPU."""
    if not torch.cuda.is_available():
        pytest.fail("YOLC_KD_TEST_DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cuda", 0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: the tiny model is ~100x slower with 2 threads when the CPUs are busy
    (thread hand-off). Use as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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


def findclusters(head, heatmap: np.ndarray) -> np.ndarray:
    """YOLC's YOLCHead.findclusters: the LSM cluster finder (crops.find_clusters) with the head's lsm_cfg on one
    (1,1,H,W) max-over-classes heatmap -> (K,4) int [x, y, w, h] in heatmap pixels."""
    lsm = head.lsm_cfg
    return crops.find_clusters(heatmap, grid=lsm.grid, topk_cells=lsm.topk_cells, threshold=float(lsm.threshold))[1]


def verify_cache(path, deep: bool = False, progress: bool = False, annotations=None) -> list:
    """Faults of the cache at `path`, one line each (empty: sound): check_cache without its notes."""
    return check_cache(path, deep, progress, annotations)[0]


def plain_metas(n: int, h: int, w: int):
    return [dict(batch_input_shape=(h, w), pad_shape=(h, w, 3), img_shape=(h, w, 3),
                 scale_factor=np.ones(4, np.float32), border=np.zeros(4, np.float32)) for _ in range(n)]


# ----------------------------------------------------------------------------- tiny training config
PIPELINE = [
    dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PhotoMetricDistortion"),
    dict(type="RandomCenterCropPad", crop_size=(128, 96), ratios=(0.9, 1.0, 1.1), mean=[0, 0, 0], std=[1, 1, 1],
         to_rgb=True, test_pad_mode=None),
    dict(type="Resize", img_scale=(128, 96), keep_ratio=True), dict(type="RandomFlip", flip_ratio=0.5),
    dict(type="Normalize", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(annotations, image root) of 6 synthetic 128x96 images, 3 classes: the training tests' data."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synth"), 6, seed=3, size=(128, 96), num_classes=3)
    return str(root / "annotations.json"), str(root)


def train_cli(cfg, ann, images, work, *extra) -> int:
    """`yolc-kd train` on a config and data, without a progress bar: its exit code."""
    from yolc_kd.cli import main

    return main(["train", "--config", cfg, "--ann", ann, "--images", images, "--work-dir", str(work),
                 "--no-progress", *extra])


def write_config(path, extra: str = "") -> str:
    model = tiny_model_cfg(num_classes=3)
    path.write_text(
        f"model = {model!r}\nclasses = ('pedestrian', 'people', 'bicycle')\ntrain_pipeline = {PIPELINE!r}\n"
        "data = dict(samples_per_gpu=2, workers_per_gpu=0)\noptimizer = dict(type='Adam', lr=0.001)\n"
        "lr_config = dict(policy='step', warmup='linear', warmup_iters=2, warmup_ratio=0.1, step=[100])\n"
        "runner = dict(type='IterBasedRunner', max_iters=4)\ncheckpoint_config = dict(interval=2)\n"
        "log_config = dict(interval=1)\n" + extra)
    return str(path)


# ----------------------------------------------------------------------------- precompute set-up (random teacher)
SEED, VARIANTS, SHARD, BATCH = 3, 2, 2, 2


def teacher_model_cfg() -> dict:
    cfg = tiny_model_cfg(num_classes=3)
    cfg["test_cfg"]["lsm"] = dict(topk_cells=60)  # a random teacher's heatmap is flat: let LSM find patches
    return cfg


def save_random_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_detector(teacher_model_cfg()).eval()
    with torch.no_grad():  # spread the head's outputs so heatmap, boxes and crops are not constant
        for name, p in model.named_parameters():
            if name.startswith("bbox_head"):
                p.add_(torch.randn_like(p) * 0.3)
        model.bbox_head.local_head[-1].bias.fill_(-3.0)
    return save_checkpoint(path, model)


def make_setup(root: Path, n_images: int = 6) -> SimpleNamespace:
    data = make_synthetic_dataset(root / "data", n_images, seed=1, size=(128, 96), num_classes=3)
    ckpt = save_random_teacher(root / "teacher.pth", 0)
    config = root / "student.py"
    config.write_text(f"""
model = {teacher_model_cfg()!r}
classes = ('pedestrian', 'people', 'bicycle')
seed = {SEED}
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PhotoMetricDistortion'),
    dict(type='RandomCenterCropPad', crop_size=(128, 96), ratios=(1.0,), border=32, mean=[0, 0, 0], std=[1, 1, 1],
         to_rgb=True, test_pad_mode=None),
    dict(type='Resize', img_scale=(128, 96), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
]
data = dict(samples_per_gpu=2, workers_per_gpu=0,
            train=dict(ann_file={str(data / 'annotations.json')!r}, img_prefix={str(data)!r}))
distill_cfg = dict(teacher_config=None, max_patches_per_img=2, min_patch_size=16)
""")
    return SimpleNamespace(root=root, data=data, ann=data / "annotations.json", ckpt=ckpt, config=config)


def cli_args(s: SimpleNamespace, out: Path, *extra: str) -> list:
    return ["precompute", "--config", str(s.config), "--ckpt", str(s.ckpt), "--out", str(out), "--variants",
            str(VARIANTS), "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--no-progress", *extra]


def read_all(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][:] for name in array_names()}


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = read_all(a), read_all(b)
    for name in array_names():
        u, v = x[name], y[name]
        assert u.shape == v.shape and u.dtype == v.dtype, name
        if u.dtype.kind in "fiub":
            assert u.tobytes() == v.tobytes(), f"array {name} differs"
        else:
            assert list(u) == list(v), f"array {name} differs"


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def kill_9_inside_precompute(args: list, out: Path) -> None:
    """Run `python -m yolc_kd *args` (a precompute writing the cache `out`) and kill -9 it somewhere after its
    first shard is committed; fails if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "yolc_kd", *args], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = out / "shard_done" / "c"
    deadline = time.time() + 120
    while not (first.is_dir() and any(first.iterdir())) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.05))  # somewhere inside the next shards
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {proc.stderr.read().decode()[-500:]}"
