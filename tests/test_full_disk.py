"""A full disk is one line naming the path and the free space, and leaves no partial file: the diskio helper on a
simulated ENOSPC (no mount needed), then each writer on a real small tmpfs (checkpoints, the Zarr cache,
predictions JSON, pictures, make-crops, synth); skipped where mounting is refused."""
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from conftest import assert_same_arrays, cli_args, make_setup, write_config
from yolc_kd import diskio
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.cli import main
from yolc_kd.crops import save_cluster_png
from yolc_kd.data.synth import make_synthetic_dataset
from yolc_kd.errors import UserError
from yolc_kd.infer.predict import write_json_atomic
from yolc_kd.infer.viz import save_detections

pytestmark = pytest.mark.usefixtures("one_thread")


def leftovers(root: Path) -> list:
    """Temporary or partial files under root (ours: .NAME.tmpPID; zarr's: *.partial)."""
    return sorted(str(p) for p in Path(root).rglob("*") if ".tmp" in p.name or p.name.endswith(".partial"))


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def error_lines(err: str, command: str) -> list:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"yolc-kd {command}: error:")]


# ----------------------------------------------------------------------------- the helper, simulated ENOSPC

def test_format_size():
    assert [diskio.format_size(n) for n in (0, 1023, 1024, 12_345, 3 << 20, 200 << 20)] == \
        ["0 B", "1023 B", "1 KiB", "12.1 KiB", "3 MiB", "200 MiB"]


def test_atomic_write_on_enospc_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "preds.json"
    out.write_text("[1]\n")
    real_dump = json.dump

    def full_disk_dump(obj, fh, **kwargs):
        fh.write("[" + "0, " * 1000)
        fh.flush()
        raise enospc()

    monkeypatch.setattr(json, "dump", full_disk_dump)
    with pytest.raises(UserError) as info:
        diskio.write_json(out, list(range(10)))
    monkeypatch.setattr(json, "dump", real_dump)
    msg = str(info.value)
    assert msg.startswith(f"cannot write {out}: no space left on device (") and " free on " in msg
    assert "removed partial file" in msg and "\n" not in msg
    assert out.read_text() == "[1]\n" and leftovers(tmp_path) == []


def test_edquot_names_the_quota_and_other_errors_stay_themselves(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"disk quota exceeded \(.* free on "):
        with diskio.atomic_write(tmp_path / "a.bin") as fh:
            fh.write(b"x")
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(ValueError, match="a bug"):  # not an I/O failure: re-raised as it is
        with diskio.atomic_write(tmp_path / "b.bin") as fh:
            fh.write(b"x")
            raise ValueError("a bug")
    assert leftovers(tmp_path) == [] and not (tmp_path / "a.bin").exists() and not (tmp_path / "b.bin").exists()


class FillingFile(io.RawIOBase):
    """A file whose disk fills after `room` bytes: what torch.save meets on a full disk."""

    def __init__(self, fh, room: int):
        self.fh, self.room, self.name = fh, room, fh.name

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise enospc()
        self.room -= len(data)
        return self.fh.write(data)


def test_checkpoint_on_enospc_through_torch_is_one_line(tmp_path, monkeypatch):
    """torch.save turns the file's OSError into RuntimeError('... unexpected pos ...'), the OSError its context."""
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillingFile(f, 5000)))
    with pytest.raises(UserError) as info:
        save_checkpoint(tmp_path / "iter_3.pth", torch.nn.Linear(100, 100))
    assert str(info.value).startswith(f"cannot write {tmp_path / 'iter_3.pth'}: no space left on device (")
    assert list(tmp_path.iterdir()) == []


def test_torch_write_failure_without_errno_is_read_from_the_free_space(tmp_path, monkeypatch):
    """torch writing through its own file stream keeps no errno: little free space means a full disk."""
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    for free, expected in ((4096, "no space left on device"), (10 << 30, "torch's writer failed (")):
        monkeypatch.setattr(diskio, "free_space", lambda path, free=free: (free, Path("/mnt/x")))
        with pytest.raises(UserError, match=expected.replace("(", r"\(")):
            with diskio.atomic_path(tmp_path / "c.pth") as tmp:
                tmp.write_bytes(b"PK")
                raise failure
    with pytest.raises(RuntimeError, match="simulated"):  # any other RuntimeError is no I/O failure
        with diskio.atomic_path(tmp_path / "c.pth"):
            raise RuntimeError("simulated")
    assert list(tmp_path.iterdir()) == []


def test_append_cuts_a_partial_line_back(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    diskio.append_text(log, '{"iter": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise enospc()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError, match=rf"cannot write {log}: no space left on device \(.* free on "):
        diskio.append_text(log, '{"iter": 2}\n')
    monkeypatch.setattr(os, "write", real_write)
    assert log.read_text() == '{"iter": 1}\n'


def test_symlink_switch_failure_leaves_the_old_link(tmp_path, monkeypatch):
    (tmp_path / "iter_2.pth").write_bytes(b"2")
    diskio.replace_symlink(tmp_path / "latest.pth", "iter_2.pth")
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(enospc()))
    with pytest.raises(UserError, match="cannot write .*latest.pth: no space left on device"):
        diskio.replace_symlink(tmp_path / "latest.pth", "iter_4.pth")
    assert os.readlink(tmp_path / "latest.pth") == "iter_2.pth" and leftovers(tmp_path) == []


def test_cli_prints_an_escaping_oserror_as_one_line(tmp_path, monkeypatch, capsys):
    import yolc_kd.commands.eval as eval_command

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "gt.json"))

    monkeypatch.setattr(eval_command, "evaluate_coco", unreadable)
    assert main(["eval", "--ann", str(tmp_path / "gt.json"), "--preds", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err
    assert error_lines(err, "eval") == [f"yolc-kd eval: error: {tmp_path / 'gt.json'}: permission denied"]


# ----------------------------------------------------------------------------- a real full disk (tmpfs)

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(size: str = "2m") -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        try:
            run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot mount tmpfs: {exc}")
        if run.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {run.stderr.strip() or run.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all but about `leave` bytes of the disk's free space with one file (delete it to free them)."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def assert_names_full_disk(msg: str, path: Path, disk: Path) -> None:
    assert str(path) in msg and "no space left on device" in msg and f" free on {disk}" in msg, msg


def test_train_checkpoint_on_full_disk_keeps_the_previous_one_and_resumes(small_disk, tiny_data, tmp_path, capsys):
    disk = small_disk("6m")  # iter_2.pth (weights and Adam state, about 4 MB) fits, iter_4.pth does not
    work = disk / "work"
    argv = ["train", "--config", write_config(tmp_path / "cfg.py"), "--ann", tiny_data[0], "--images", tiny_data[1],
            "--work-dir", str(work), "--max-iters", "4", "--no-progress", "--workers", "0"]
    assert main(argv) == 1
    lines = error_lines(capsys.readouterr().err, "train")
    assert len(lines) == 1 and lines[0].startswith(f"yolc-kd train: error: cannot write {work / 'iter_4.pth'}: ")
    assert_names_full_disk(lines[0], work / "iter_4.pth", disk)
    assert leftovers(disk) == [] and not (work / "iter_4.pth").exists()
    assert torch.load(work / "latest.pth", weights_only=True)["meta"]["iter"] == 2
    assert all(json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines())

    if subprocess.run(["mount", "-o", "remount,size=12m", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot resize the tmpfs")
    assert main(argv + ["--resume"]) == 0  # room again: the run goes on from iter_2.pth
    assert torch.load(work / "latest.pth", weights_only=True)["meta"]["iter"] == 4 and leftovers(disk) == []


def test_precompute_on_full_disk_is_one_line_and_a_rerun_completes(small_disk, tmp_path, capsys):
    setup = make_setup(tmp_path / "setup")  # 6 images x 2 views, shards of 2 samples: about 190 KB of cache
    reference = tmp_path / "ref"
    assert main(cli_args(setup, reference)) == 0
    disk = small_disk("2m")
    filler = fill(disk, 200 << 10)  # the store and a shard or two fit
    out = disk / "soft"
    capsys.readouterr()
    assert main(cli_args(setup, out)) == 1
    lines = error_lines(capsys.readouterr().err, "precompute")
    assert len(lines) == 1 and lines[0].startswith(f"yolc-kd precompute: error: cannot write {out}"), lines
    assert "no space left on device" in lines[0] and f" free on {disk})" in lines[0]
    assert leftovers(disk) == []
    assert 1 <= int(zarr.open_group(str(out), mode="r")["shard_done"][:].sum()) < 6  # some shards committed

    filler.unlink()  # space again: the rerun writes the shards that were not committed
    assert main(cli_args(setup, out)) == 0
    assert main(["verify", str(out), "--no-progress"]) == 0
    assert_same_arrays(out, reference)


def test_predictions_json_on_full_disk(small_disk):
    disk = small_disk("2m")
    out = disk / "preds.json"
    write_json_atomic(out, [])
    results = [dict(image_id=i, category_id=1, bbox=[1.5, 2.5, 3.5, 4.5], score=0.5) for i in range(40_000)]
    with pytest.raises(UserError) as info:
        write_json_atomic(out, results)
    assert_names_full_disk(str(info.value), out, disk)
    assert json.loads(out.read_text()) == [] and leftovers(disk) == []


@pytest.mark.parametrize("picture", ["detections", "lsm"])
def test_picture_on_full_disk(small_disk, picture):
    disk = small_disk("2m")
    fill(disk, 8 << 10)
    out = disk / "viz" / "val_0.png"
    rng = np.random.default_rng(0)
    with pytest.raises(UserError) as info:
        if picture == "detections":
            save_detections(out, rng.integers(0, 255, (256, 384, 3), dtype=np.uint8), [[10, 10, 50, 50]], [0], [0.9])
        else:
            save_cluster_png(rng.integers(0, 2, (256, 384), dtype=np.uint8) * 255, np.array([[8, 8, 40, 40]]), out)
    assert_names_full_disk(str(info.value), out, disk)
    assert not out.exists() and leftovers(disk) == []


def assert_whole_images(folder: Path) -> int:
    """Every image under folder decodes to its end; returns how many there are."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in files:
        with Image.open(p) as im:
            im.load()
    return len(files)


def test_make_crops_on_full_disk(small_disk, tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "src", 4, seed=0, size=(384, 256), num_classes=4)
    disk = small_disk("2m")
    fill(disk, 200 << 10)  # the originals fit (copied: another filesystem), not all of the 1024x640 crops
    out = disk / "crops"
    assert main(["make-crops", "--ann", str(data / "annotations.json"), "--images", str(data), "--out", str(out),
                 "--min-size", "16", "--no-progress"]) == 1
    lines = error_lines(capsys.readouterr().err, "make-crops")
    assert len(lines) == 1 and lines[0].startswith(f"yolc-kd make-crops: error: cannot write {out / 'images'}")
    assert "no space left on device" in lines[0] and f" free on {disk}" in lines[0]
    assert leftovers(disk) == [] and not (out / "annotations.json").exists()
    assert assert_whole_images(out / "images") >= 1


def test_synth_on_full_disk(small_disk, capsys):
    disk = small_disk("2m")
    out = disk / "synth"
    assert main(["synth", "--out", str(out), "--num-images", "40", "--size", "384x256", "--classes", "4"]) == 1
    lines = error_lines(capsys.readouterr().err, "synth")
    assert len(lines) == 1 and lines[0].startswith(f"yolc-kd synth: error: cannot write {out / 'images'}")
    assert "no space left on device" in lines[0] and f" free on {disk}" in lines[0]
    assert leftovers(disk) == [] and not (out / "annotations.json").exists()
    assert assert_whole_images(out / "images") >= 1
