"""`yolc-kd verify`: a sound cache passes (quick, --deep, --recompute); damaged bytes, missing files, a truncated
manifest and wrong values are each reported naming the array and the samples; `train --cache` refuses a cache
made with another teacher or augmentation, naming the fields."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import zarr

from conftest import cli_args, make_setup, save_random_teacher, subprocess_env, teacher_model_cfg, verify_cache
from yolc_kd.cache.verify import format_ranges
from yolc_kd.cli import main


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    torch.set_num_threads(1)
    s = make_setup(tmp_path_factory.mktemp("verify"), n_images=4)  # 8 samples, shards of 2
    s.cache = s.root / "soft"
    assert main(cli_args(s, s.cache)) == 0
    return s


@pytest.fixture
def copy(made, tmp_path):
    out = tmp_path / "soft"
    shutil.copytree(made.cache, out)
    return out


def verify(capsys, *argv):
    capsys.readouterr()
    rc = main(["verify", *map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err


def faults(lines):
    return [line for line in lines if not line.startswith("verify:")]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_format_ranges():
    assert format_ranges([7, 0, 1, 2, 5, 8]) == "0..2, 5, 7..8"
    assert format_ranges(range(0, 20, 2), limit=2) == "0, 2, +8 more range(s)"


def test_sound_cache_passes_quick_deep_and_recompute(made, capsys):
    rc, out, _ = verify(capsys, made.cache)
    assert rc == 0 and out[-1].startswith("verify:") and "OK" in out[-1] and len(out) == 1
    rc, out, err = verify(capsys, made.cache, "--deep", "--recompute", "2", "--config", made.config,
                          "--ckpt", made.ckpt)
    assert rc == 0, out + [err]
    assert "teacher recomputed on 2 sample(s)" in out[-1] and not faults(out)


def test_verify_module_needs_no_torch(made):
    code = ("import sys; from yolc_kd.cache.verify import check_cache; f = check_cache(sys.argv[1], deep=True)[0]; "
            "assert f == [], f; assert 'torch' not in sys.modules, 'cache.verify imported torch'")
    res = subprocess.run([sys.executable, "-c", code, str(made.cache)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1500:]


@pytest.mark.parametrize("name, rel, deep", [
    ("heatmap", "heatmap/c/1/0/0/0", True),        # maps: one inner chunk per sample, decoded with --deep
    ("coarse", "coarse/c/1/0/0/0", True),
    ("patch_boxes", "patch_boxes/c/1/0/0", False),  # small arrays are decoded by the quick check
])
def test_flipped_byte_names_the_array_and_samples(copy, capsys, name, rel, deep):
    flip_byte(copy / rel, 20)  # inside the first inner chunk of shard 1 (samples 2..3)
    rc, out, _ = verify(capsys, copy, *(["--deep"] if deep else []))
    found = faults(out)
    assert rc == 1 and len(found) == 1, out
    assert f"array '{name}'" in found[0] and "shard 1" in found[0] and "crc32c" in found[0]
    assert ("sample 2 " if name in ("heatmap", "coarse") else "samples 2..3") in found[0]


def test_damaged_shard_index_is_found_without_deep(copy, capsys):
    flip_byte(copy / "refine" / "c" / "3" / "0" / "0" / "0" / "0", -8)  # the index sits at the end
    rc, out, _ = verify(capsys, copy)
    assert rc == 1 and faults(out) == ["array 'refine', samples 6..7 (shard 3): shard index fails its crc32c check"]


def test_deleted_and_emptied_shard_files_are_named(copy, capsys):
    (copy / "coarse" / "c" / "2" / "0" / "0" / "0").unlink()
    (copy / "status" / "c" / "1").write_bytes(b"")  # zarr itself would read an empty file as all zero
    rc, out, _ = verify(capsys, copy)
    found = faults(out)
    assert rc == 1 and len(found) == 2, out
    assert any("array 'coarse', samples 4..5 (shard 2)" in f and "missing" in f for f in found)
    assert any("array 'status', samples 2..3 (shard 1)" in f and "empty" in f for f in found)


def test_truncated_manifest_is_named(copy, capsys):
    root = copy / "zarr.json"
    root.write_bytes(root.read_bytes()[:150])
    rc, out, _ = verify(capsys, copy, "--deep")
    found = faults(out)
    assert rc == 1 and len(found) == 1 and found[0].startswith("manifest") and "zarr.json" in found[0]


def test_uncommitted_shard_and_incomplete_manifest_are_named(copy, capsys):
    g = zarr.open_group(str(copy), mode="r+")
    g["shard_done"][1] = 0
    m = dict(g.attrs["yolc_kd_cache"], complete=False)
    g.update_attributes({"yolc_kd_cache": m})
    rc, out, _ = verify(capsys, copy)
    found = faults(out)
    assert rc == 1 and len(found) == 2, out
    assert any("complete is false" in f for f in found)
    assert any("array 'shard_done', samples 2..3" in f and "not committed" in f for f in found)


def test_wrong_values_are_named(copy, capsys):
    """Values rewritten through zarr (valid checksums): only the value checks can find them."""
    g = zarr.open_group(str(copy), mode="r+")
    for name in ("image_id", "variant", "aug_params"):  # sample 5 (image 3, variant 1) written twice: also at 2
        g[name][2] = g[name][5]
    g["status"][5] = 0
    boxes = g["patch_boxes"][:]
    boxes[6, 0] = [100, 0, 50, 96]  # x + w = 150 > 128
    g["patch_boxes"][:] = boxes
    g["num_valid_patches"][0] = 0
    g["seed"][1] = 99
    rc, out, _ = verify(capsys, copy)
    found = faults(out)
    assert rc == 1
    expected = [("image_id", "sample 2 "), ("variant", "sample 2 "), ("aug_params", "sample 2 "),
                ("status", "sample 5 "), ("patch_boxes", "sample 6 "), ("num_valid_patches", "sample 0 "),
                ("seed", "sample 1 ")]
    for name, where in expected:
        assert any(f"array '{name}', {where}" in f for f in found), (name, found)
    assert any("counts.samples_written" in f for f in found)  # the manifest counted 8 stored samples
    assert len(found) == len(expected) + 1, found


def test_recompute_catches_values_with_valid_checksums(made, copy, capsys):
    g = zarr.open_group(str(copy), mode="r+")
    g["coarse"][:] = g["coarse"][:] + 32  # half a grid cell
    assert verify_cache(copy, deep=True) == []  # structurally sound
    rc, out, _ = verify(capsys, copy, "--recompute", "2", "--config", made.config, "--ckpt", made.ckpt)
    found = faults(out)
    assert rc == 1 and len(found) == 1 and found[0].startswith("recompute: array 'coarse', samples "), out


def _made_on(copy, **run):
    """The cache's manifest as if precompute had run elsewhere (run fields overridden)."""
    g = zarr.open_group(str(copy), mode="r+")
    m = json.loads(json.dumps(g.attrs["yolc_kd_cache"]))
    m["run"].update(run)
    g.update_attributes({"yolc_kd_cache": m})


def test_recompute_on_another_device_compares_within_a_step(made, copy, capsys):
    """A cache made on a GPU, recomputed on the CPU: the maps may differ by the numerics (TF32, other kernels),
    so they are compared within one more quantisation step + 1 %; one step passes there and not on the cache's
    own device, half a grid cell fails on both."""
    args = ("--recompute", "2", "--config", made.config, "--ckpt", made.ckpt)
    g = zarr.open_group(str(copy), mode="r+")
    g["coarse"][:] = g["coarse"][:] + 1  # one step (2^-6 cell): 1.5 steps from the teacher at worst
    rc, out, _ = verify(capsys, copy, *args)
    assert rc == 1 and any(f.startswith("recompute: array 'coarse'") for f in faults(out)), out
    _made_on(copy, device="cuda:0", device_name="NVIDIA H100 80GB HBM3", deterministic=False)
    rc, out, _ = verify(capsys, copy, *args)
    assert rc == 0, out
    assert any(line.startswith("note: recompute compared within one more quantisation step + 1% of the value: the "
                               "cache was made on cuda:0, this run uses cpu") for line in out), out
    g["coarse"][:] = g["coarse"][:] + 63  # half a grid cell more: beyond the looser bound as well
    rc, out, _ = verify(capsys, copy, *args)
    found = [f for f in faults(out) if not f.startswith("note:")]
    assert rc == 1 and len(found) == 1 and found[0].startswith("recompute: array 'coarse'"), out
    assert "beyond the quantisation bound + one step + 1 %" in found[0]


def test_when_numerics_differ_from_the_cache():
    from yolc_kd.precompute.recompute import numerics_difference

    here = dict(device="cpu", cpu_threads=1, torch=torch.__version__)
    assert numerics_difference(here, "cpu") is None
    assert numerics_difference(dict(device="cpu"), "cpu") is None  # an older cache records no torch version
    assert "torch 1.0" in numerics_difference(dict(here, torch="1.0"), "cpu")
    assert "made on cuda:1" in numerics_difference(dict(device="cuda:1", device_name="X"), "cpu")


def test_recompute_with_another_checkpoint_is_a_fault(made, capsys, tmp_path):
    other = save_random_teacher(tmp_path / "other.pth", 1)
    rc, out, _ = verify(capsys, made.cache, "--recompute", "2", "--config", made.config, "--ckpt", other)
    assert rc == 1 and any("teacher.ckpt_sha256" in f for f in faults(out))


def test_recompute_needs_a_config(made, capsys):
    rc, _, err = verify(capsys, made.cache, "--recompute", "2")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--config" in err


def _train_on_cache(made, config, work):
    return main(["train", "--config", str(config), "--cache", str(made.cache), "--work-dir", str(work),
                 "--max-iters", "1", "--no-progress"])


def test_train_refuses_a_cache_of_another_augmentation(made, tmp_path, capsys):
    config = tmp_path / "noflip.py"
    text = made.config.read_text().replace("flip_ratio=0.5", "flip_ratio=0.0")
    assert text != made.config.read_text()
    config.write_text(text)
    capsys.readouterr()
    assert _train_on_cache(made, config, tmp_path / "w") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "augment.flip_ratio (cache 0.5, config 0.0)" in err[0]
    assert not (tmp_path / "w" / "latest.pth").exists()


def test_train_refuses_a_cache_of_another_teacher_architecture(made, tmp_path, capsys):
    teacher = teacher_model_cfg()
    teacher["bbox_head"]["feat_channel"] = 8
    config = tmp_path / "teacher.py"
    config.write_text(f"_base_ = {str(made.config)!r}\ndistill_cfg = dict(teacher_config={teacher!r})\n")
    capsys.readouterr()
    assert _train_on_cache(made, config, tmp_path / "w") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.model.bbox_head.feat_channel (cache 16, config 8)" in err[0]


def test_train_refuses_a_cache_of_another_teacher_checkpoint(made, tmp_path, capsys):
    other = save_random_teacher(tmp_path / "other.pth", 1)
    config = tmp_path / "other_ckpt.py"
    config.write_text(f"_base_ = {str(made.config)!r}\ndistill_cfg = dict(teacher_ckpt={str(other)!r})\n")
    capsys.readouterr()
    assert _train_on_cache(made, config, tmp_path / "w") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.ckpt_sha256" in err[0]


def test_manifest_counts_must_agree(copy, capsys):
    g = zarr.open_group(str(copy), mode="r+")
    m = json.loads(json.dumps(g.attrs["yolc_kd_cache"]))
    m["counts"]["samples_skipped"] = 3
    m["variants"] = 3
    g.update_attributes({"yolc_kd_cache": m})
    rc, out, _ = verify(capsys, copy)
    found = faults(out)
    assert rc == 1 and any("counts.samples_skipped is 3" in f for f in found)
    assert any("manifest: variants is 3 but layout implies 2" in f for f in found)


# ----------------------------------------------------------------------------- all-zero shards

@pytest.fixture(scope="module")
def zero_coarse(tmp_path_factory):
    """A cache of a teacher whose box maps quantise to zero: every `coarse` shard is all zero."""
    s = make_setup(tmp_path_factory.mktemp("zero"), n_images=2)  # 4 samples, shards of 2
    ckpt = torch.load(s.ckpt, weights_only=True)
    for key in ("bbox_head.xywh_init.weight", "bbox_head.xywh_init.bias"):
        ckpt["state_dict"][key].zero_()
    torch.save(ckpt, s.ckpt)
    s.cache = s.root / "soft"
    assert main(cli_args(s, s.cache)) == 0
    assert not zarr.open_group(str(s.cache), mode="r")["coarse"][:].any()
    return s


def _copy_of(cache, tmp_path):
    out = tmp_path / "soft"
    shutil.copytree(cache, out)
    return out


def test_all_zero_shards_are_written_and_verify_clean(zero_coarse, capsys):
    cache = zero_coarse.cache
    assert zarr.open_group(str(cache), mode="r").attrs["yolc_kd_cache"]["all_shard_files"] is True
    files = sorted(p.relative_to(cache / "coarse").as_posix() for p in (cache / "coarse").rglob("c/**/*")
                   if p.is_file())
    assert files == ["c/0/0/0/0", "c/1/0/0/0"]
    rc, out, _ = verify(capsys, cache, "--deep")
    assert rc == 0 and not faults(out), out


def test_deleted_all_zero_shard_file_is_a_fault(zero_coarse, tmp_path, capsys):
    cache = _copy_of(zero_coarse.cache, tmp_path)
    (cache / "coarse" / "c" / "1" / "0" / "0" / "0").unlink()
    rc, out, _ = verify(capsys, cache)
    assert rc == 1 and faults(out) == ["array 'coarse', samples 2..3 (shard 1): shard file coarse/c/1/0/0/0 is "
                                       "missing although shard 1 is committed"]


@pytest.mark.parametrize("offset, deep, what", [
    (2, True, "sample 0 (shard 0): damaged chunk: crc32c mismatch"),   # inside the first inner chunk
    (-1, False, "samples 0..1 (shard 0): shard index fails its crc32c check"),  # the index's checksum
])
def test_flipped_byte_in_an_all_zero_shard_is_a_fault(zero_coarse, tmp_path, capsys, offset, deep, what):
    cache = _copy_of(zero_coarse.cache, tmp_path)
    flip_byte(cache / "coarse" / "c" / "0" / "0" / "0" / "0", offset)
    rc, out, _ = verify(capsys, cache, *(["--deep"] if deep else []))
    assert rc == 1 and faults(out) == [f"array 'coarse', {what}"], out


def test_old_cache_without_all_zero_shard_files_still_verifies(zero_coarse, tmp_path):
    """A cache from before all_shard_files: zarr skipped the all-zero shard, the manifest has no flag."""
    cache = _copy_of(zero_coarse.cache, tmp_path)
    (cache / "coarse" / "c" / "1" / "0" / "0" / "0").unlink()
    g = zarr.open_group(str(cache), mode="r+")
    m = dict(g.attrs["yolc_kd_cache"])
    del m["all_shard_files"]
    g.update_attributes({"yolc_kd_cache": m})
    assert verify_cache(cache, deep=True) == []
    (cache / "status" / "c" / "1").unlink()  # a status shard is never all zero: still a fault in an old cache
    assert [f for f in verify_cache(cache) if "status/c/1 is missing" in f]


def test_chunk_dropped_by_a_default_zarr_write_is_a_fault(copy, capsys):
    g = zarr.open_group(str(copy), mode="r+")  # zarr's default config drops an all-zero inner chunk from its shard
    g["coarse"][2] = 0
    rc, out, _ = verify(capsys, copy)
    assert rc == 1 and faults(out) == ["array 'coarse', samples 2..3 (shard 1): shard index has no inner chunk at "
                                       "sample offset(s) 0 of the shard (zarr would read zeros)"]


def test_manifest_flag_must_be_a_bool(copy):
    g = zarr.open_group(str(copy), mode="r+")
    g.update_attributes({"yolc_kd_cache": dict(g.attrs["yolc_kd_cache"], all_shard_files="yes")})
    assert verify_cache(copy) == ["manifest: all_shard_files is 'yes', expected true or false"]
