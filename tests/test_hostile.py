"""Hostile input through `yolc-kd train` (supervised), `precompute` and `infer` (yolc_kd.cli.main):

* per-image faults (missing file, truncated JPEG, undecodable file with a non-UTF-8 name) are skipped with a
  warning and the rest is processed: precompute records them in the manifest (`--strict` fails instead),
  infer lists them, train skips them with `--skip-bad` (without it: one error line);
* grayscale, RGBA, 16-bit PNGs, images smaller than the crop, images without annotations, degenerate /
  outside boxes, unknown category ids and non-UTF-8 file names simply work;
* duplicate image ids, `../` in file names, unknown or mistyped config keys, checkpoints of another class
  count or architecture, and checkpoints that need pickle code are refused with exactly one stderr line
  (the last one explaining --trust-checkpoint, which then loads it)."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from conftest import make_setup, teacher_model_cfg
from conftest import write_config
from yolc_kd.cache.arrays import STATUS_OK, STATUS_SKIPPED
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.cli import main
from yolc_kd.data.synth import make_synthetic_dataset
from yolc_kd.models import build_detector

BOX = [10, 10, 8, 8]


def _build_hostile(root: Path) -> SimpleNamespace:
    """4 clean synthetic images plus one image per hostile case, all in one COCO file."""
    data = make_synthetic_dataset(root, 4, seed=5, size=(128, 96), num_classes=3)
    ann = json.loads((data / "annotations.json").read_text())
    img = np.asarray(Image.open(data / "images" / "000000.png").convert("RGB"))
    ids = {}

    def add(key, name, w, h, boxes=((BOX, 1),)):
        iid = max(i["id"] for i in ann["images"]) + 1
        ann["images"].append(dict(id=iid, file_name=name, width=w, height=h))
        for bbox, cat in boxes:
            ann["annotations"].append(dict(id=len(ann["annotations"]) + 1000, image_id=iid, bbox=list(bbox),
                                           category_id=cat, area=1, iscrowd=0))
        ids[key] = iid

    images = data / "images"
    Image.fromarray(img[..., 0]).save(images / "gray.png")
    add("gray", "images/gray.png", 128, 96)
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 90, np.uint8)])).save(images / "rgba.png")
    add("rgba", "images/rgba.png", 128, 96)
    Image.fromarray(img[..., 1].astype(np.uint16) * 257).save(images / "deep16.png")
    assert Image.open(images / "deep16.png").mode.startswith("I;16")
    add("deep16", "images/deep16.png", 128, 96)
    Image.fromarray(img[:30, :40]).save(images / "small.png")  # smaller than the 128x96 crop
    add("small", "images/small.png", 40, 30, boxes=(([5, 5, 6, 6], 2),))
    Image.fromarray(img).save(images / "noann.png")
    add("noann", "images/noann.png", 128, 96, boxes=())
    Image.fromarray(img).save(images / "badboxes.png")
    add("badboxes", "images/badboxes.png", 128, 96,
        boxes=(([10, 10, 0, 5], 1), ([10, 10, -3, 5], 1), ([500, 500, 8, 8], 1), (BOX, 99)))
    add("missing", "images/missing.png", 128, 96)
    jpeg = io.BytesIO()
    Image.fromarray(img).save(jpeg, format="JPEG")
    (images / "trunc.jpg").write_bytes(jpeg.getvalue()[:300])
    add("trunc", "images/trunc.jpg", 128, 96)
    bytes_names = True
    try:  # file names that are not UTF-8: the json carries them surrogate-escaped (os.fsdecode)
        with open(os.fsencode(images) + b"/caf\xe9.png", "wb") as fh:
            fh.write((images / "000001.png").read_bytes())
        with open(os.fsencode(images) + b"/bad\xff.png", "wb") as fh:
            fh.write(b"\x89PNG garbage")
    except (OSError, UnicodeError):
        bytes_names = False
    if bytes_names:
        add("latin1", "images/caf\udce9.png", 128, 96)
        add("badname", "images/bad\udcff.png", 128, 96)
    (data / "annotations.json").write_text(json.dumps(ann))  # ensure_ascii: lone surrogates as \udcXX
    unreadable = ["missing", "trunc"] + (["badname"] if bytes_names else [])
    return SimpleNamespace(data=data, ann=data / "annotations.json", ids=ids, bytes_names=bytes_names,
                           unreadable=unreadable, n=len(ann["images"]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    s = make_setup(root / "setup", n_images=4)  # student config (tiny teacher = student model) + teacher.pth
    s.hostile = _build_hostile(root / "hostile")
    s.train_config = write_config(root / "train_cfg.py")
    s.plain_config = root / "plain.py"  # the student without KD (distill_cfg.enable=False)
    s.plain_config.write_text(f"_base_ = {str(s.config)!r}\ndistill_cfg = dict(enable=False)\n")
    return s


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, *needles):
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith("yolc-kd ") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def precompute_args(s, out, *extra, ann=None, images=None):
    return ["precompute", "--config", s.config, "--ckpt", s.ckpt, "--out", out, "--variants", "1", "--shard-size", "4",
            "--batch-size", "2", "--no-progress", "--ann", ann or s.hostile.ann, "--images", images or s.hostile.data,
            *extra]


# ----------------------------------------------------------------------------- per-image faults: skipped

@pytest.fixture(scope="module")
def hostile_cache(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_cache") / "soft"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main([str(a) for a in precompute_args(world, out)])
    assert rc == 0
    return SimpleNamespace(path=out, out=stdout.getvalue(), group=zarr.open_group(str(out), mode="r"))


def test_precompute_skips_unreadable_images_and_records_them(world, hostile_cache, capsys):
    h = world.hostile
    for why in ("category id outside", "zero/negative width or height", "entirely outside its image"):
        assert why in hostile_cache.out  # bad annotations are dropped with a warning, the image is kept
    g = hostile_cache.group
    m = g.attrs["yolc_kd_cache"]
    assert m["complete"] and m["counts"]["images"] == h.n
    assert m["counts"]["images_skipped"] == len(h.unreadable)
    assert m["counts"]["samples_written"] == h.n - len(h.unreadable)
    assert sorted(e["image_id"] for e in m["skipped"]) == sorted(h.ids[k] for k in h.unreadable)
    reasons = {e["image_id"]: e["reason"] for e in m["skipped"]}
    assert "missing.png" in reasons[h.ids["missing"]] and "trunc.jpg" in reasons[h.ids["trunc"]]
    status = dict(zip(g["image_id"][:].tolist(), g["status"][:].tolist()))  # K = 1: sample = image
    for key in ("gray", "rgba", "deep16", "small", "noann", "badboxes"):
        assert status[h.ids[key]] == STATUS_OK, key
    for key in h.unreadable:
        assert status[h.ids[key]] == STATUS_SKIPPED, key
    assert run_cli(capsys, "verify", hostile_cache.path, "--deep", "--no-progress")[0] == 0


def test_precompute_handles_non_utf8_file_names(world, hostile_cache):
    h = world.hostile
    if not h.bytes_names:
        pytest.skip("this filesystem refuses non-UTF-8 file names")
    g = hostile_cache.group
    status = dict(zip(g["image_id"][:].tolist(), g["status"][:].tolist()))
    assert status[h.ids["latin1"]] == STATUS_OK and status[h.ids["badname"]] == STATUS_SKIPPED
    entry = next(e for e in g.attrs["yolc_kd_cache"]["skipped"] if e["image_id"] == h.ids["badname"])
    assert entry["file_name"] == "images/bad\udcff.png"  # the json's name, surrogate-escaped, round-trips
    assert "bad\\udcff.png" in entry["reason"]  # the message is printable (backslash-escaped)
    assert "bad\\udcff.png" in hostile_cache.out


def test_precompute_strict_fails_at_the_first_unreadable_image(world, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *precompute_args(world, tmp_path / "soft", "--strict"))
    assert_one_line_error(rc, err, "--strict", "missing.png")


def test_train_skip_bad_goes_on_and_plain_train_stops_with_one_line(world, tmp_path, capsys):
    h = world.hostile
    iters = (h.n + 1) // 2  # one epoch at batch 2
    base = ["train", "--config", world.train_config, "--ann", h.ann, "--images", h.data, "--no-progress",
            "--max-iters", iters]
    rc, out, err = run_cli(capsys, *base, "--work-dir", tmp_path / "skip", "--skip-bad")
    assert rc == 0, err
    assert f"trained to iteration {iters}" in out and "damaged samples skipped" in out
    for name in ("missing.png", "trunc.jpg") + (("bad\\udcff.png",) if h.bytes_names else ()):
        assert f"{name}" in out, name  # one warning per skipped image
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(1, iters + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    rc, _, err = run_cli(capsys, *base, "--work-dir", tmp_path / "plain")
    assert_one_line_error(rc, err)
    assert any(name in err for name in ("missing.png", "trunc.jpg", "bad\\udcff.png"))


def test_infer_on_a_coco_file_skips_unreadable_images(world, tmp_path, capsys):
    h = world.hostile
    rc, out, err = run_cli(capsys, "infer", "--config", world.config, "--ckpt", world.ckpt, "--images", h.data,
                           "--ann", h.ann, "--out", tmp_path / "preds.json")
    assert rc == 0, err
    assert f"infer: {h.n - len(h.unreadable)} images" in out
    assert f"skipped {len(h.unreadable)} unreadable image(s)" in err and "trunc.jpg" in err
    preds = json.loads((tmp_path / "preds.json").read_text())
    readable = set(range(1, h.n + 1)) - {h.ids[k] for k in h.unreadable}
    assert {p["image_id"] for p in preds} == readable  # every other image, in every pixel format, was run
    rc, _, err = run_cli(capsys, "infer", "--config", world.config, "--ckpt", world.ckpt, "--images",
                         h.data / "images", "--out", tmp_path / "strict.json", "--strict")
    assert rc == 1 and err.strip().splitlines()[-1].startswith("yolc-kd infer: error: ")
    assert len(err.strip().splitlines()) == 1


def test_infer_on_a_folder_reads_every_pixel_format(world, tmp_path, capsys):
    h = world.hostile
    rc, out, err = run_cli(capsys, "infer", "--config", world.config, "--ckpt", world.ckpt, "--images",
                           h.data / "images", "--out", tmp_path / "preds.json")
    assert rc == 0, err
    side = json.loads((tmp_path / "preds.images.json").read_text())
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in side["images"]}
    for name in ("gray.png", "rgba.png", "deep16.png", "noann.png", "000000.png"):
        assert sizes[name] == (128, 96), name
    assert sizes["small.png"] == (40, 30)
    assert "trunc.jpg" not in sizes and "trunc.jpg" in err
    if h.bytes_names:
        assert sizes["caf\udce9.png"] == (128, 96)  # json round-trips the surrogate escape
        assert "bad\udcff.png" not in sizes and "bad\\udcff.png" in err  # printable: backslash-escaped
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert {p["image_id"] for p in preds} <= {i["id"] for i in side["images"]}


# ----------------------------------------------------------------------------- refused inputs: one line

def _ann_variant(world, tmp_path, name, change):
    ann = json.loads(world.ann.read_text())
    change(ann)
    path = tmp_path / name
    path.write_text(json.dumps(ann))
    return path


def _commands(world, tmp_path, ann=None, images=None, config=None, ckpt=None):
    """The three commands on the given data / config / checkpoint (ckpt: the teacher of precompute and online KD,
    the model of infer)."""
    config = config or world.config
    ckpt = ckpt or world.ckpt
    data = ["--ann", ann, "--images", images or world.data] if ann else []
    infer_data = ["--ann", ann, "--images", images or world.data] if ann else ["--images", world.data / "images"]
    return dict(
        train=["train", "--config", config, *data, "--work-dir", tmp_path / "w", "--max-iters", 1, "--no-progress",
               *(["--online", "--teacher-ckpt", ckpt] if ckpt != world.ckpt else [])],
        precompute=["precompute", "--config", config, "--ckpt", ckpt, *data, "--out", tmp_path / "soft",
                    "--variants", 1, "--no-progress"],
        infer=["infer", "--config", config, "--ckpt", ckpt, *infer_data, "--out", tmp_path / "preds.json"])


COMMANDS = ("train", "precompute", "infer")


@pytest.mark.parametrize("command", COMMANDS)
def test_duplicate_image_ids_are_refused(world, tmp_path, capsys, command):
    def dup(ann):
        ann["images"][2]["id"] = ann["images"][1]["id"]

    argv = _commands(world, tmp_path, ann=_ann_variant(world, tmp_path, "dup.json", dup))[command]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], "duplicate image id 2")


@pytest.mark.parametrize("command", COMMANDS)
def test_path_traversal_in_file_names_is_refused(world, tmp_path, capsys, command):
    secret = world.root / "secret.png"
    shutil.copy(world.data / "images" / "000000.png", secret)

    def escape(ann):
        ann["images"][1]["file_name"] = "../secret.png"

    argv = _commands(world, tmp_path, ann=_ann_variant(world, tmp_path, "trav.json", escape))[command]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], "'../secret.png'", "escapes the image root")
    assert not (tmp_path / "soft").exists() and not (tmp_path / "preds.json").exists()


CONFIG_FAULTS = {
    "unknown_key": ("bogus_key = 1\n", "unknown key 'bogus_key'"),
    "wrong_type": ("seed = 'abc'\n", "'seed' must be an int, got str"),
    "distill_wrong_type": ("distill_cfg = dict(max_patches_per_img='2')\n", "'distill_cfg.max_patches_per_img'"),
    "distill_unknown_key": ("distill_cfg = dict(max_patchs=2)\n", "unknown key 'distill_cfg.max_patchs'"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_config_with_unknown_key_or_wrong_type_is_refused(world, tmp_path, capsys, command, fault):
    text, needle = CONFIG_FAULTS[fault]
    config = tmp_path / "bad.py"
    config.write_text(f"_base_ = {str(world.config)!r}\n{text}")
    assert_one_line_error(*run_cli(capsys, *_commands(world, tmp_path, config=config)[command])[::2], needle)


@pytest.mark.parametrize("command", ("train", "precompute"))
def test_config_with_a_mistyped_section_value_is_refused(world, tmp_path, capsys, command):
    config = tmp_path / "bad.py"
    config.write_text(f"_base_ = {str(world.config)!r}\ndata = dict(samples_per_gpu='two')\n")
    assert_one_line_error(*run_cli(capsys, *_commands(world, tmp_path, config=config)[command])[::2],
                          "samples_per_gpu")


def _foreign_checkpoint(world, kind):
    path = world.root / f"{kind}.pth"
    if not path.exists():
        cfg = teacher_model_cfg()
        if kind == "classes4":
            cfg["bbox_head"]["num_classes"] = 4
        elif kind == "arch":
            cfg["bbox_head"]["feat_channel"] = 8
        torch.manual_seed(0)
        model = build_detector(cfg)
        if kind == "pickle":  # a checkpoint whose meta holds an arbitrary Python object
            sd = torch.load(world.ckpt, weights_only=True)
            torch.save(dict(sd, meta=dict(args=SimpleNamespace(lr=0.1))), path)
        else:
            save_checkpoint(path, model)
    return path


CKPT_FAULTS = {
    "classes4": ("checkpoint has 4 classes, the config 3",),
    "arch": ("does not fit the model",),
    "pickle": ("needs arbitrary pickle code", "--trust-checkpoint"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", sorted(CKPT_FAULTS))
def test_foreign_or_unsafe_checkpoint_is_refused(world, tmp_path, capsys, command, kind):
    argv = _commands(world, tmp_path, ckpt=_foreign_checkpoint(world, kind))[command]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], *CKPT_FAULTS[kind])


def test_pickle_checkpoint_loads_with_trust_checkpoint(world, tmp_path, capsys):
    argv = _commands(world, tmp_path, ckpt=_foreign_checkpoint(world, "pickle"))["infer"]
    rc, out, err = run_cli(capsys, *argv, "--trust-checkpoint")
    assert rc == 0, err
    assert json.loads((tmp_path / "preds.json").read_text()) is not None


def test_resume_from_a_checkpoint_of_another_model_is_refused(world, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(_foreign_checkpoint(world, "classes4"), work / "latest.pth")
    rc, _, err = run_cli(capsys, "train", "--config", world.plain_config, "--work-dir", work, "--max-iters", 2,
                         "--no-progress", "--resume")
    assert_one_line_error(rc, err, "4 classes")


def test_resume_from_a_pickle_checkpoint_explains_trust(world, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(_foreign_checkpoint(world, "pickle"), work / "latest.pth")
    rc, _, err = run_cli(capsys, "train", "--config", world.plain_config, "--work-dir", work, "--max-iters", 2,
                         "--no-progress", "--resume")
    assert_one_line_error(rc, err, "--trust-checkpoint")


def test_resume_from_a_pickle_checkpoint_with_trust(world, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(_foreign_checkpoint(world, "pickle"), work / "latest.pth")
    rc, _, err = run_cli(capsys, "train", "--config", world.plain_config, "--work-dir", work, "--max-iters", 1,
                         "--no-progress", "--resume", "--trust-checkpoint")
    assert rc == 0, err
