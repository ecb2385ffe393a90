"""Student KD training: offline (cache) equals online (live teacher), no teacher in offline mode,
2-process torchrun training."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from conftest import cli_args, make_setup, subprocess_env
from yolc_kd.cache.reader import CacheReader
from yolc_kd.cli import main
from yolc_kd.kd import KDLoss, student_losses
from yolc_kd.teacher import build_teacher
from yolc_kd.train.cache_source import CacheTargetSource
from yolc_kd.train.teacher_source import LiveTeacherSource


@pytest.fixture(scope="module")
def kd_setup(tmp_path_factory):
    s = make_setup(tmp_path_factory.mktemp("kdtrain"), n_images=4)
    s.cache = s.root / "soft"
    assert main(cli_args(s, s.cache)) == 0
    return s


def _one_batch(s, online: bool):
    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig, TrainAugment
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.train.cache_source import open_cache_source
    from yolc_kd.train.data import TrainSamples, collate_train

    cfg = load_config(s.config, with_defaults=True)
    coco = CocoDetection(s.ann, s.data, classes=cfg["classes"])
    aug_cfg = AugmentConfig.from_pipeline(cfg["train_pipeline"])
    source = None if online else open_cache_source(s.cache, cfg, aug_cfg, coco)
    ds = TrainSamples(coco, TrainAugment(aug_cfg), int(cfg["seed"]), source)
    return cfg, collate_train([ds[(0, 1)], ds[(1, 0)]])


def test_offline_and_online_give_the_same_losses(kd_setup):
    from yolc_kd.models import build_detector

    torch.set_num_threads(1)  # the cache was made single-threaded
    cfg, offline = _one_batch(kd_setup, online=False)
    _, online = _one_batch(kd_setup, online=True)
    assert "kd_targets" in offline and "kd_targets" not in online
    settings = cfg["distill"]
    torch.manual_seed(0)
    student = build_detector(cfg["model"]).train()
    cache = CacheTargetSource(CacheReader(kd_setup.cache))
    teacher = build_teacher(settings, cfg["model"], ckpt=str(kd_setup.ckpt))
    args = (offline["gt_bboxes"], offline["gt_labels"])
    l_off = student_losses(student, offline["img"], offline["img_metas"], *args, cache.targets(offline),
                           KDLoss(settings))
    assert torch.equal(offline["img"], online["img"])
    assert int(offline["kd_targets"].patch_valid.sum()) > 0
    # a batch of other views than precompute's (2 at a time, by image): the teacher's numbers do not change
    live = LiveTeacherSource(teacher, settings)  # online_targets "cached": rounded as the cache stores them
    l_on = student_losses(student, online["img"], online["img_metas"], *args, live.targets(online), KDLoss(settings))
    for key in l_off:
        assert float(l_off[key].detach()) == float(l_on[key].detach()), key  # every loss exactly equal
    # online_targets "float": the KD terms differ by the cache's rounding (1/255 heatmap steps, 1/64-cell boxes)
    unrounded = LiveTeacherSource(teacher, settings.replace(online_targets="float"))
    l_float = student_losses(student, online["img"], online["img_metas"], *args, unrounded.targets(online),
                             KDLoss(settings))
    for key in ("loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine"):
        a, b = float(l_off[key].detach()), float(l_float[key].detach())
        assert a != b and abs(a - b) <= 0.02 * abs(b) + 1e-4, (key, a, b)


def test_offline_and_online_training_end_in_the_same_weights(kd_setup, tmp_path):
    """Same seed, one CPU thread as the cache's precompute, as many epochs as cached views: `train --cache` and
    `train --online` log the same losses at every step and save bit-identical students, the weight average and
    the precise-BN statistics (recomputed after the last step, from views both modes have) included."""
    k = CacheReader(kd_setup.cache).num_variants
    torch.set_num_threads(1)
    cfg = tmp_path / "student.py"
    cfg.write_text(f"_base_ = {str(kd_setup.config)!r}\nprecise_bn = dict(num_batches=2)\n"
                   f"custom_hooks = [dict(type='ExpMomentumEMAHook', momentum=0.05, total_iter=4)]\n")
    common = ["--config", str(cfg), "--batch-size", "2", "--max-iters", str(2 * k), "--log-interval", "1",
              "--no-progress"]  # 4 images at batch 2: k epochs
    assert main(["train", *common, "--cache", str(kd_setup.cache), "--work-dir", str(tmp_path / "off")]) == 0
    assert main(["train", *common, "--online", "--teacher-ckpt", str(kd_setup.ckpt),
                 "--work-dir", str(tmp_path / "on")]) == 0

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k.startswith("loss")} for x in lines]

    off, on = losses("off"), losses("on")
    assert len(off) == 2 * k + 1 and off == on and "loss_kd_local_refine" in off[0]  # + the precise-BN line
    a = torch.load(tmp_path / "off" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "on" / "latest.pth", weights_only=True)
    for part in ("state_dict", "train_state_dict"):  # the average (what infer loads) and the trained weights
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][n], b[part][n]) for n in a[part]), part


def test_offline_training_never_builds_a_teacher(kd_setup, tmp_path, monkeypatch):
    import yolc_kd.teacher as teacher

    def forbidden(*a, **k):
        raise AssertionError("a teacher was constructed in offline mode")

    monkeypatch.setattr(teacher, "build_teacher", forbidden)
    assert main(["train", "--config", str(kd_setup.config), "--cache", str(kd_setup.cache), "--work-dir",
                 str(tmp_path / "w"), "--max-iters", "2", "--no-progress"]) == 0
    record = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine"} <= set(record)


def test_a_cache_with_fewer_views_than_epochs_gets_one_note(kd_setup, tmp_path, capsys):
    k = CacheReader(kd_setup.cache).num_variants
    base = ["train", "--config", str(kd_setup.config), "--cache", str(kd_setup.cache), "--batch-size", "4",
            "--no-progress"]  # 4 images: one iteration per epoch
    capsys.readouterr()
    assert main(base + ["--work-dir", str(tmp_path / "enough"), "--max-iters", str(k)]) == 0
    assert "views repeat" not in capsys.readouterr().out
    assert main(base + ["--work-dir", str(tmp_path / "short"), "--max-iters", str(k + 1)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "views repeat" in line]
    assert len(notes) == 1 and f"holds {k} view(s) per image and this run makes {k + 1} passes over the data" in notes[0]
    assert f"--train-iters {k + 1}" in notes[0]


def test_online_training_cli(kd_setup, tmp_path):
    assert main(["train", "--config", str(kd_setup.config), "--online", "--teacher-ckpt", str(kd_setup.ckpt),
                 "--work-dir", str(tmp_path / "w"), "--max-iters", "2", "--no-progress"]) == 0
    ckpt = torch.load(tmp_path / "w" / "latest.pth", weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])  # student-only checkpoint


def test_torchrun_two_processes_train_and_loss_falls(kd_setup, tmp_path):
    work = tmp_path / "ddp"
    config = tmp_path / "fast.py"  # a learning rate at which a few steps show
    config.write_text(f"_base_ = {str(kd_setup.config)!r}\noptimizer = dict(type='Adam', lr=0.01)\n"
                      "lr_config = dict(policy='step', step=[100])\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "yolc_kd", "train", "--config", str(config), "--cache", str(kd_setup.cache),
           "--work-dir", str(work), "--max-iters", "8", "--log-interval", "1", "--no-progress", "--workers", "0"]
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [json.loads(l)["loss"] for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses


def test_lsm_visualize_writes_the_crops_local_kd_used(kd_setup, tmp_path):
    from PIL import Image

    config = tmp_path / "viz.py"
    config.write_text(f"_base_ = {str(kd_setup.config)!r}\ndistill_cfg = dict(lsm_visualize=True)\n")
    work = tmp_path / "w"
    assert main(["train", "--config", str(config), "--cache", str(kd_setup.cache), "--work-dir", str(work),
                 "--max-iters", "3", "--no-progress", "--workers", "0"]) == 0
    pngs = sorted((work / "lsm").glob("*.png"))
    assert len(pngs) == 2 * 2  # the first two batches of two views each
    assert all(p.name.startswith(("iter000000_", "iter000001_")) for p in pngs)
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    assert all(im.shape[:2] == (96, 128) for im in imgs)
    red = [int(((im[..., 0] == 255) & (im[..., 1] == 0) & (im[..., 2] == 0)).sum()) for im in imgs]
    assert sum(red) > 0, red  # the teacher's crop boxes are outlined on the LSM binary map
    # off by default: the same run without the flag writes none
    assert main(["train", "--config", str(kd_setup.config), "--cache", str(kd_setup.cache), "--work-dir",
                 str(tmp_path / "w2"), "--max-iters", "1", "--no-progress", "--workers", "0"]) == 0
    assert not (tmp_path / "w2" / "lsm").exists()


def test_every_student_of_a_seed_starts_from_the_same_weights_and_order(kd_setup, tmp_path, monkeypatch):
    """No KD, offline KD and online KD with one --seed: bit-identical initial weights, the same image order."""
    from yolc_kd.train import recipe
    from yolc_kd.train.loop import Trainer, TrainOptions

    seen = {}

    def capture(self):
        self.sampler.set_epoch(0)
        seen[self.opts.work_dir.name] = ({k: v.clone() for k, v in self.model.state_dict().items()},
                                         [i for i, *_ in self.sampler])
        return dict(iters=0, last={}, bad_samples=0, work_dir=str(self.work_dir))

    monkeypatch.setattr(Trainer, "run", capture)
    kinds = dict(plain=recipe.KDSource(), offline=recipe.KDSource(cache=str(kd_setup.cache)),
                 online=recipe.KDSource(online=True, teacher_ckpt=str(kd_setup.ckpt)))
    plain = tmp_path / "plain.py"
    plain.write_text(f"_base_ = {str(kd_setup.config)!r}\ndistill_cfg = dict(enable=False)\n")
    for name, kd in kinds.items():
        config = plain if name == "plain" else kd_setup.config
        recipe.run_training(str(config), None, None, TrainOptions(work_dir=tmp_path / name, seed=11), kd)
    (w0, o0), *others = seen.values()
    for w, o in others:
        assert o == o0 and all(torch.equal(w0[k], w[k]) for k in w0)
