"""A new user's first hour without a traceback, through `yolc_kd.cli.main`:

* the whole dataset is checked before the first step of train, precompute and infer (--ann): no image found
  names the likely image root; some missing is one line with the count and the first names, or (train
  --skip-bad, precompute/infer without --strict) skipped with one counted warning;
* a UserError raised in a DataLoader worker (a truncated PNG, --workers 1) reaches the user as the same one
  line as without workers; with --skip-bad training goes on and still writes its checkpoints and metrics;
* precompute exits 1 when it wrote no usable view and warns with counts when it skipped some;
* every count argument and config count setting is refused with one line naming it."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from conftest import make_setup, write_config
from yolc_kd.cli import main
from yolc_kd.data.coco import CocoDetection, root_hint
from yolc_kd.data.loading import OneLineLoader, check_images, worker_message
from yolc_kd.data.synth import make_synthetic_dataset
from yolc_kd.errors import UserError


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(rc, err, *needles) -> str:
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith("yolc-kd ") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def truncate(path: Path) -> None:
    """Keep the first half of a real PNG's bytes (PIL reads the header, decoding fails)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def with_extra_image(ann: Path, out: Path, file_name: str) -> Path:
    """A copy of a COCO file with one more image entry (whose file need not exist)."""
    data = json.loads(ann.read_text())
    data["images"].append(dict(id=max(i["id"] for i in data["images"]) + 1, file_name=file_name,
                               width=128, height=96))
    out.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("checks")
    good = make_synthetic_dataset(root / "good", 6, seed=2, size=(128, 96), num_classes=3)
    trunc = root / "trunc"
    shutil.copytree(good, trunc)
    truncate(trunc / "images" / "000002.png")
    all_trunc = root / "all_trunc"
    shutil.copytree(good, all_trunc)
    for png in (all_trunc / "images").glob("*.png"):
        truncate(png)
    s = make_setup(root / "setup", n_images=4)  # student config + random teacher, for precompute and infer
    return SimpleNamespace(root=root, good=good, trunc=trunc, all_trunc=all_trunc, cfg=write_config(root / "cfg.py"),
                           setup=s)


def train(w, work, ann, images, *extra):
    return ["train", "--config", w.cfg, "--ann", ann, "--images", images, "--work-dir", work, "--no-progress",
            "--max-iters", 2, *extra]


def precompute(w, out, ann, images, *extra):
    s = w.setup
    return ["precompute", "--config", s.config, "--ckpt", s.ckpt, "--out", out, "--variants", 1, "--shard-size", 4,
            "--batch-size", 2, "--no-progress", "--ann", ann, "--images", images, *extra]


def infer(w, out, ann, images, *extra):
    s = w.setup
    return ["infer", "--config", s.config, "--ckpt", s.ckpt, "--ann", ann, "--images", images, "--out", out, *extra]


# ----------------------------------------------------------------------------- the image root

@pytest.mark.parametrize("workers", [0, 1])
def test_train_with_the_root_one_folder_too_deep_names_the_root(w, tmp_path, capsys, workers):
    # file_name is "images/000000.png": --images good/images looks for good/images/images/000000.png
    rc, _, err = run_cli(capsys, *train(w, tmp_path / "w", w.good / "annotations.json", w.good / "images",
                                        "--workers", workers))
    line = one_line_error(rc, err, "0 of 6 images found under", f"try --images {w.good}")
    assert line.endswith(f"file_name is relative to the image root, try --images {w.good}")
    assert not (tmp_path / "w").exists()  # stopped before the first step


@pytest.mark.parametrize("command", ["precompute", "infer"])
def test_precompute_and_infer_name_the_root_too(w, tmp_path, capsys, command):
    argv = dict(precompute=precompute, infer=infer)[command](w, tmp_path / "out", w.good / "annotations.json",
                                                             w.good / "images")
    one_line_error(*run_cli(capsys, *argv)[::2], "0 of 6 images found under", f"try --images {w.good}")
    assert not (tmp_path / "out").exists()


def test_root_hints(w, tmp_path):
    images = w.good / "images"
    assert root_hint(images, "images/000000.png").endswith(f"try --images {w.good}")  # a parent
    (tmp_path / "top" / "sub" / "images").mkdir(parents=True)
    shutil.copy(images / "000000.png", tmp_path / "top" / "sub" / "images")
    assert root_hint(tmp_path / "top", "images/000000.png").endswith(f"try --images {tmp_path / 'top' / 'sub'}")
    assert root_hint(w.good, "000000.png").endswith(f"try --images {images}")
    assert "starts with the folder 'pics'" in root_hint(images, "pics/000000.png")  # file_name has a folder too many
    assert "already ends with 'images'" in root_hint(tmp_path / "images", "images/x.png")
    assert root_hint(tmp_path / "nowhere", "x.png") == f"the image root {tmp_path / 'nowhere'} does not exist"
    assert root_hint(w.good, "images/none.png") == ""


def test_a_json_without_sizes_and_a_wrong_root_names_the_root(w, tmp_path, capsys):
    data = json.loads((w.good / "annotations.json").read_text())
    for im in data["images"]:
        del im["width"], im["height"]
    ann = tmp_path / "nosize.json"
    ann.write_text(json.dumps(data))
    rc, _, err = run_cli(capsys, *train(w, tmp_path / "w", ann, w.good / "images"))
    one_line_error(rc, err, "has no width/height", "'images/000000.png'", f"try --images {w.good}")


def test_a_json_without_images_is_refused(w, tmp_path, capsys):
    data = json.loads((w.good / "annotations.json").read_text())
    data["images"], data["annotations"] = [], []
    ann = tmp_path / "empty.json"
    ann.write_text(json.dumps(data))
    one_line_error(*run_cli(capsys, *train(w, tmp_path / "w", ann, w.good))[::2], "lists no images")


def test_check_images_is_a_stat_per_image(w, tmp_path):
    ann = with_extra_image(w.good / "annotations.json", tmp_path / "a.json", "images/gone.png")
    coco = CocoDetection(ann, w.good)
    assert coco.missing_images() == [6]
    with pytest.raises(UserError, match=r"^1 of 7 images not found under .*: images/gone.png; pass --skip-bad"):
        check_images(coco, skip_bad=False)
    warnings = []
    assert check_images(coco, skip_bad=True, warn=warnings.append) == [6]
    assert warnings == [f"warning: skipping 1 of 7 images not found under {w.good}: images/gone.png"]
    assert check_images(CocoDetection(w.good / "annotations.json", w.good), skip_bad=False) == []


# ----------------------------------------------------------------------------- some images missing

def test_train_with_missing_images_stops_or_skips_them(w, tmp_path, capsys):
    ann = w.good / "annotations.json"
    for k, name in enumerate(("gone1.png", "gone2.png", "gone3.png", "gone4.png")):
        ann = with_extra_image(ann, tmp_path / f"a{k}.json", f"images/{name}")
    rc, _, err = run_cli(capsys, *train(w, tmp_path / "plain", ann, w.good))
    one_line_error(rc, err, "4 of 10 images not found under", "images/gone1.png, images/gone2.png, "
                   "images/gone3.png (+1 more)", "pass --skip-bad to skip them")
    rc, out, err = run_cli(capsys, *train(w, tmp_path / "skip", ann, w.good, "--skip-bad"))
    assert rc == 0, err
    assert "warning: skipping 4 of 10 images not found under" in out
    assert "trained to iteration 2" in out and "4 missing images skipped" in out
    assert "damaged samples" not in out  # filtered before the first step, not met in every epoch
    assert (tmp_path / "skip" / "latest.pth").exists()
    assert len((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()) == 2


def test_precompute_skips_and_counts_missing_images_or_stops_with_strict(w, tmp_path, capsys):
    ann = with_extra_image(w.good / "annotations.json", tmp_path / "a.json", "images/gone.png")
    rc, out, err = run_cli(capsys, *precompute(w, tmp_path / "strict", ann, w.good, "--strict"))
    one_line_error(rc, err, "1 of 7 images not found under", "images/gone.png", "without --strict they are skipped")
    assert not (tmp_path / "strict").exists()
    rc, out, err = run_cli(capsys, *precompute(w, tmp_path / "soft", ann, w.good))
    assert rc == 0, err
    assert "warning: skipping 1 of 7 images not found" in out
    assert "warning: skipping image id 7" not in out  # reported once, in the counted line
    assert "warning: skipped 1 of 7 images (unreadable): images/gone.png" in out
    assert "6 views of 7 images" in out and "this run wrote 6 views" in out
    manifest = json.loads((tmp_path / "soft" / "zarr.json").read_text())["attributes"]["yolc_kd_cache"]
    assert [e["image_id"] for e in manifest["skipped"]] == [7]


def test_infer_with_missing_images_skips_them_or_stops_with_strict(w, tmp_path, capsys):
    ann = with_extra_image(w.good / "annotations.json", tmp_path / "a.json", "images/gone.png")
    rc, _, err = run_cli(capsys, *infer(w, tmp_path / "s.json", ann, w.good, "--strict"))
    one_line_error(rc, err, "1 of 7 images not found under", "images/gone.png", "without --strict")
    rc, out, err = run_cli(capsys, *infer(w, tmp_path / "p.json", ann, w.good))
    assert rc == 0, err
    assert "infer: 6 images" in out and "skipped 1 unreadable image(s): images/gone.png" in err


# ----------------------------------------------------------------------------- errors in DataLoader workers

@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_png_is_one_line_with_and_without_workers(w, tmp_path, capsys, workers):
    rc, _, err = run_cli(capsys, *train(w, tmp_path / "w", w.trunc / "annotations.json", w.trunc,
                                        "--workers", workers, "--max-iters", 3))
    line = one_line_error(rc, err, "corrupt or truncated image", "000002.png")
    assert "DataLoader worker" not in line and "Traceback" not in err


def test_truncated_png_with_skip_bad_goes_on_in_a_worker(w, tmp_path, capsys):
    work = tmp_path / "w"
    rc, out, err = run_cli(capsys, *train(w, work, w.trunc / "annotations.json", w.trunc, "--workers", 1,
                                          "--max-iters", 3, "--skip-bad"))
    assert rc == 0, err
    assert "warning: skipped damaged sample image id 3 variant 0: corrupt or truncated image" in out
    assert "trained to iteration 3" in out and "1 damaged samples skipped" in out
    assert (work / "latest.pth").exists() and (work / "iter_2.pth").exists()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3]


def test_every_sample_damaged_with_skip_bad_is_one_line_not_an_endless_loop(w, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *train(w, tmp_path / "w", w.all_trunc / "annotations.json", w.all_trunc,
                                        "--workers", 1, "--skip-bad"))
    one_line_error(rc, err, "all 6 samples of an epoch were skipped as damaged", "corrupt or truncated image")


class _Raises(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise UserError(f"bad item {i}: a message: with colons")


def test_a_user_error_raised_in_a_worker_comes_back_as_its_message():
    loader = OneLineLoader(_Raises(), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert str(info.value) == "bad item 0: a message: with colons"
    assert worker_message(UserError("plain")) is None


def test_precompute_with_no_usable_view_exits_1(w, tmp_path, capsys):
    rc, out, err = run_cli(capsys, *precompute(w, tmp_path / "soft", w.all_trunc / "annotations.json", w.all_trunc,
                                               "--workers", 1))
    one_line_error(rc, err, "holds no usable view: all 6 images were unreadable",
                   "corrupt or truncated image", f"remove {tmp_path / 'soft'} and rerun")
    assert out.count("warning: skipping image id") == 6  # each unreadable image named once


def test_precompute_warns_with_counts_when_it_skipped_some(w, tmp_path, capsys):
    rc, out, err = run_cli(capsys, *precompute(w, tmp_path / "soft", w.trunc / "annotations.json", w.trunc,
                                               "--workers", 1))
    assert rc == 0, err
    assert "warning: skipped 1 of 6 images (unreadable): images/000002.png" in out.splitlines()
    assert "5 views of 6 images" in out
    rc, _, err = run_cli(capsys, *precompute(w, tmp_path / "strict", w.trunc / "annotations.json", w.trunc,
                                             "--workers", 1, "--strict"))
    one_line_error(rc, err, "corrupt or truncated image", "000002.png", "--strict")


# ----------------------------------------------------------------------------- counts

def _cli_counts(w, tmp_path):
    good, ann = w.good, w.good / "annotations.json"
    tr = train(w, tmp_path / "w", ann, good)
    pre = precompute(w, tmp_path / "soft", ann, good)
    inf = infer(w, tmp_path / "p.json", ann, good)
    ev = ["eval", "--ann", ann, "--preds", tmp_path / "p.json"]
    syn = ["synth", "--out", tmp_path / "syn", "--num-images", 1]
    return {
        "train --max-iters": (tr + ["--max-iters", 0], "--max-iters must be at least 1, got 0"),
        "train --batch-size": (tr + ["--batch-size", 0], "--batch-size must be at least 1, got 0"),
        "train --workers": (tr + ["--workers", -1], "--workers must be at least 0, got -1"),
        "train --log-interval": (tr + ["--log-interval", 0], "--log-interval must be at least 1, got 0"),
        "precompute --variants": (pre + ["--variants", 0], "--variants must be at least 1, got 0"),
        "precompute --batch-size": (pre + ["--batch-size", 0], "--batch-size must be at least 1, got 0"),
        "precompute --shard-size": (pre + ["--shard-size", 0], "--shard-size must be at least 1, got 0"),
        "precompute --threads": (pre + ["--threads", 0], "--threads must be at least 1, got 0"),
        "precompute --workers": (pre + ["--workers", -2], "--workers must be at least 0, got -2"),
        "infer --batch-size": (inf + ["--batch-size", 0], "--batch-size must be at least 1, got 0"),
        "infer --max-patches": (inf + ["--max-patches", -1], "--max-patches must be at least 0, got -1"),
        "eval --max-dets": (ev + ["--max-dets", 10, 0], "--max-dets must be at least 1, got 0"),
        "verify --recompute": (["verify", tmp_path / "soft", "--recompute", -1], "--recompute must be >= 0"),
        "synth --num-images": (["synth", "--out", tmp_path / "syn", "--num-images", 0],
                               "--num-images must be at least 1, got 0"),
        "synth --size": (syn + ["--size", "10x10"], "--size must be at least 64x64, got 10x10"),
        "synth --size text": (syn + ["--size", "0"], "--size must look like WIDTHxHEIGHT"),
        "synth --classes": (syn + ["--classes", 0], "--classes must be between 1 and 10, got 0"),
        "synth --classes 11": (syn + ["--classes", 11], "--classes must be between 1 and 10, got 11"),
    }


CLI_COUNTS = ["train --max-iters", "train --batch-size", "train --workers", "train --log-interval",
              "precompute --variants", "precompute --batch-size", "precompute --shard-size", "precompute --threads",
              "precompute --workers", "infer --batch-size", "infer --max-patches", "eval --max-dets",
              "verify --recompute", "synth --num-images", "synth --size", "synth --size text", "synth --classes",
              "synth --classes 11"]


@pytest.mark.parametrize("case", CLI_COUNTS)
def test_count_arguments_are_one_line(w, tmp_path, capsys, case):
    argv, needle = _cli_counts(w, tmp_path)[case]
    one_line_error(*run_cli(capsys, *argv)[::2], needle)
    assert not (tmp_path / "w").exists() and not (tmp_path / "soft").exists() and not (tmp_path / "syn").exists()


CONFIG_COUNTS = {
    "data.samples_per_gpu": "data = dict(samples_per_gpu=0)",
    "data.workers_per_gpu": "data = dict(workers_per_gpu=-1)",
    "runner.max_iters": "runner = dict(type='IterBasedRunner', max_iters=0)",
    "runner.max_epochs": "runner = dict(_delete_=True, type='EpochBasedRunner', max_epochs=0)",
    "log_config.interval": "log_config = dict(interval=0)",
    "checkpoint_config.interval": "checkpoint_config = dict(interval=0)",
    "evaluation.interval": "evaluation = dict(interval=0)",
}


@pytest.mark.parametrize("command", ["train", "precompute"])
@pytest.mark.parametrize("key", sorted(CONFIG_COUNTS))
def test_config_counts_are_one_line_naming_the_key(w, tmp_path, capsys, command, key):
    base = w.cfg if command == "train" else w.setup.config
    config = tmp_path / "bad.py"
    config.write_text(f"_base_ = {str(base)!r}\n{CONFIG_COUNTS[key]}\n")
    ann = w.good / "annotations.json"
    if command == "train":
        argv = train(w, tmp_path / "w", ann, w.good)
    else:
        argv = precompute(w, tmp_path / "soft", ann, w.good)
    argv[argv.index("--config") + 1] = config
    if command == "train":
        argv.remove("--max-iters")
        argv.remove(2)
    minimum = 0 if key == "data.workers_per_gpu" else 1
    one_line_error(*run_cli(capsys, *argv)[::2], f"'{key}' must be at least {minimum}", str(config))


def test_a_wrong_validation_root_is_refused_before_training(w, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *train(w, tmp_path / "w", w.good / "annotations.json", w.good,
                                        "--val-ann", w.good / "annotations.json", "--val-images", w.good / "images"))
    one_line_error(rc, err, "0 of 6 images found under", f"try --val-images {w.good}")
    assert not (tmp_path / "w").exists()
