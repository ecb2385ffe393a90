"""`yolc-kd verify` on an image-level cache (precompute --kind image): a fresh cache passes quick, --deep and
--recompute; a damaged chunk, wrong aug_params, a deleted shard file, maps outside the scaled image and maps or
images that changed since precompute are each reported naming the array and the rows; kill -9 during
`precompute --kind image` and a rerun give the arrays of an uninterrupted run."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import zarr

from conftest import (assert_same_arrays, cli_args, kill_9_inside_precompute, make_setup, subprocess_env,
                      verify_cache)
from yolc_kd.cache.reader import CacheReader
from yolc_kd.cache.schema import WRITE_CONFIG, padded
from yolc_kd.data.view_steps import scaled_hw
from yolc_kd.cache.verify import check_cache
from yolc_kd.cli import main

SCALES = (0.75, 1.0, 1.5)  # 3 rows per image; 1.5 x 128x96 fills a 256x256 row canvas partly


def image_args(s, out, default_shards=False):
    """precompute --kind image at SCALES, plain rows (no --variants), with conftest's shards of 2 rows or the
    default shard size (one image's rows a shard)."""
    args = cli_args(s, out, "--kind", "image", "--scales", ",".join(map(str, SCALES)), "--mirror", "off")
    drop = ["--variants"] + (["--shard-size"] if default_shards else [])
    return [a for k, a in enumerate(args) if a not in drop and (k == 0 or args[k - 1] not in drop)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """4 images x 3 scales = 12 rows, one image a shard (the default shard size): rows 3k..3k+2 = image k."""
    torch.set_num_threads(1)
    s = make_setup(tmp_path_factory.mktemp("imgverify"), n_images=4)
    s.cache = s.root / "image_cache"
    assert main(image_args(s, s.cache, default_shards=True)) == 0
    return s


@pytest.fixture
def copy(made, tmp_path):
    out = tmp_path / "image_cache"
    shutil.copytree(made.cache, out)
    return out


def verify(capsys, *argv):
    capsys.readouterr()
    rc = main(["verify", *map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err


def faults(lines):
    return [line for line in lines if not line.startswith(("verify:", "note:"))]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def recompute_args(made, n):
    return ("--recompute", str(n), "--config", made.config, "--ckpt", made.ckpt)


def test_fresh_image_cache_passes_quick_deep_and_recompute(made, capsys):
    reader = CacheReader(made.cache)
    lay = reader.layout
    assert lay.kind == "image" and lay.scales == SCALES and lay.variants == 3 and lay.shard_size == 3
    assert lay.max_patches != 2  # the crop slots are not distill.max_patches_per_img (the old false fault)
    assert zarr.open_group(str(made.cache), mode="r")["num_valid_patches"][:].sum() > 0  # crops to compare
    rc, out, _ = verify(capsys, made.cache)
    assert rc == 0 and len(out) == 1 and "OK (quick check; 12 stored and 0 skipped image-scale rows" in out[0], out
    rc, out, err = verify(capsys, made.cache, "--deep", *recompute_args(made, 2))
    assert rc == 0 and len(out) == 1, out + [err]
    assert "OK (deep check, teacher recomputed on 2 sample(s)" in out[0]


def test_every_row_recomputes_equal(made, capsys):
    rc, out, err = verify(capsys, made.cache, *recompute_args(made, 100))
    assert rc == 0 and "teacher recomputed on 12 sample(s)" in out[-1], out + [err]


def test_image_verify_needs_no_torch(made):
    code = ("import sys; from yolc_kd.cache.verify import check_cache; f = check_cache(sys.argv[1], deep=True)[0]; "
            "assert f == [], f; assert 'torch' not in sys.modules, 'cache.verify imported torch'")
    res = subprocess.run([sys.executable, "-c", code, str(made.cache)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1500:]


def test_row_sizes_as_precompute_makes_them():
    """The one row-size rule (cache/schema.py) that precompute, training and verify share: Python's round of
    each side times the scale, at least one pixel; the teacher's input padded to multiples of 32."""
    assert scaled_hw((96, 128), 1.1693) == (112, 150) and scaled_hw((7, 3), 0.05) == (1, 1)
    assert scaled_hw((1080, 1920), 0.893) == (964, 1715) and scaled_hw((229, 343), 0.5) == (114, 172)
    assert [padded(n) for n in (1, 32, 33, 964, 1715)] == [32, 32, 64, 992, 1728]


@pytest.mark.parametrize("rel, deep, where", [
    ("heatmap/c/1/0/0/0", True, "sample 3 (shard 1)"),       # a map tile of row 3, decoded with --deep
    ("patch_boxes/c/2/0/0", False, "samples 6..8 (shard 2)"),  # small arrays: one chunk a shard, read by quick
])
def test_damaged_chunk_names_the_array_and_rows(copy, capsys, rel, deep, where):
    flip_byte(copy / rel, 20)  # inside the shard's first inner chunk
    rc, out, _ = verify(capsys, copy, *(["--deep"] if deep else []))
    name = rel.split("/")[0]
    assert rc == 1 and faults(out) == [f"array '{name}', {where}: damaged chunk: crc32c mismatch"], out


def _rewrite_params(cache, rows, edit):
    g = zarr.open_group(str(cache), mode="r+")
    for r in rows:
        p = json.loads(str(g["aug_params"][r]))
        edit(p)
        g["aug_params"][r] = json.dumps(p, sort_keys=True, separators=(",", ":"))


def _scale_up(p):
    p["scale"] = p["scale"] * 1.1


def _one_more_row(p):
    p["scaled_hw"][0] += 1


def _view_row(p):
    p.clear()
    p["key"] = [3, 1, 1]


def _other_size(p):  # consistent in itself, not the image the annotation file describes
    p["ori_hw"] = [p["ori_hw"][0] + 8, p["ori_hw"][1]]
    p["scaled_hw"] = list(scaled_hw(p["ori_hw"], p["scale"]))


def _too_big(p):  # larger than the 256x256 row canvas
    p["ori_hw"], p["scaled_hw"] = [200, 128], [300, 192]


@pytest.mark.parametrize("rows, edit, where, what", [
    ([4], _scale_up, "sample 4 (shard 1)", "scale is not the layout's scale of the row's variant "
                                           "(layout.scales[variant // mirrors])"),
    ([5], _one_more_row, "sample 5 (shard 1)", "scaled_hw is not round(ori_hw * scale)"),
    ([7], _view_row, "sample 7 (shard 2)", "not an image row (kind is not 'image')"),
    ([3, 4, 5], _other_size, "samples 3..5 (shard 1)", "ori_hw differs from the image's height and width in the "
                                                       "annotation file"),
    ([11], _too_big, "sample 11 (shard 3)", "scaled image larger than the 256x256 row canvas (layout.input_hw)"),
])
def test_wrong_aug_params_are_named(copy, capsys, rows, edit, where, what):
    """aug_params rewritten through zarr (valid checksums): only the image-row checks can find them."""
    _rewrite_params(copy, rows, edit)
    rc, out, _ = verify(capsys, copy)
    assert rc == 1 and faults(out) == [f"array 'aug_params', {where}: {what}"], out


def test_rows_of_one_image_must_agree(copy, capsys):
    g = zarr.open_group(str(copy), mode="r+")
    g["fingerprint"][4] = g["fingerprint"][0]  # image 0's fingerprint on a row of image 1
    g["variant"][10] = 0
    rc, out, _ = verify(capsys, copy)
    assert rc == 1 and sorted(faults(out)) == [
        "array 'fingerprint', samples 3..5 (shard 1): rows of one image have different fingerprints (each is the "
        "image's own)",
        "array 'variant', sample 10 (shard 3): scale index disagrees with index % variants (sample written at the "
        "wrong place or twice)"], out


def test_image_sizes_are_checked_only_against_a_known_annotation_file(made, copy, capsys, tmp_path):
    _rewrite_params(copy, [0, 1, 2], _other_size)
    g = zarr.open_group(str(copy), mode="r+")
    m = json.loads(json.dumps(g.attrs["yolc_kd_cache"]))
    m["annotations"]["path"] = str(tmp_path / "moved.json")  # the manifest's file is gone: sizes unknown
    g.update_attributes({"yolc_kd_cache": m})
    found, notes = check_cache(copy)
    assert found == [] and len(notes) == 1 and "not checked against an annotation file" in notes[0]
    rc, out, _ = verify(capsys, copy)
    assert rc == 0 and out[0].startswith("note: ") and len(out) == 2, out
    rc, out, _ = verify(capsys, copy, "--ann", made.ann)
    assert rc == 1 and faults(out) == ["array 'aug_params', samples 0..2 (shard 0): ori_hw differs from the "
                                       "image's height and width in the annotation file"], out
    rc, _, err = verify(capsys, copy, "--ann", tmp_path / "nothing.json")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "nothing.json: no such file" in err


def test_deleted_shard_files_are_named(copy, capsys):
    (copy / "coarse" / "c" / "1" / "0" / "0" / "0").unlink()
    (copy / "aug_params" / "c" / "2").unlink()
    rc, out, _ = verify(capsys, copy)
    assert rc == 1 and sorted(faults(out)) == [
        "array 'aug_params', samples 6..8 (shard 2): shard file aug_params/c/2 is missing although shard 2 is "
        "committed",
        "array 'coarse', samples 3..5 (shard 1): shard file coarse/c/1/0/0/0 is missing although shard 1 is "
        "committed"], out


def test_deep_finds_maps_outside_the_scaled_image(copy, capsys):
    """Row 3 is image 1 at scale 0.75: a 72x96 image (teacher input 96x96, coarse 24x24) on a 256x256 canvas."""
    g = zarr.open_group(str(copy), mode="r+")
    assert json.loads(str(g["aug_params"][3]))["scaled_hw"] == [72, 96]
    heat, coarse = g["heatmap"].with_config(WRITE_CONFIG), g["coarse"].with_config(WRITE_CONFIG)
    heat[3, 0, 72, 10] = 7    # one pixel below the image
    coarse[3, 1, 10, 24] = 5  # one cell right of the teacher's input
    coarse[4, 1, 23, 31] = 5  # row 4 (scale 1, 96x128, input 96x128: coarse 24x32): inside, not a fault here
    assert verify_cache(copy) == []  # the quick check does not decode map chunks
    rc, out, _ = verify(capsys, copy, "--deep")
    assert rc == 1 and sorted(faults(out)) == [
        "array 'coarse', sample 3 (shard 1): non-zero values beyond the teacher's input (scaled_hw padded to 32, "
        "at the map stride)",
        "array 'heatmap', sample 3 (shard 1): non-zero values outside the row's scaled image (aug_params "
        "scaled_hw)"], out


def test_recompute_finds_changed_maps_and_a_changed_image(made, copy, capsys, tmp_path):
    g = zarr.open_group(str(copy), mode="r+")
    coarse = g["coarse"].with_config(WRITE_CONFIG)
    coarse[7] = coarse[7] + 32  # half a grid cell everywhere in row 7
    data = tmp_path / "data"
    shutil.copytree(made.data, data)
    files = sorted((data / "images").iterdir())
    shutil.copyfile(files[3], files[0])  # image 0 (rows 0..2) is another picture of the same size now
    assert verify_cache(copy) == []
    rc, out, _ = verify(capsys, copy, *recompute_args(made, 100), "--images", data)
    found = sorted(faults(out))
    assert rc == 1 and len(found) == 2, out
    assert found[0].startswith("recompute: array 'coarse', sample 7 (shard 2): differs from the recomputed teacher "
                               "beyond the quantisation bound (by "), out
    assert found[1] == ("recompute: array 'fingerprint', samples 0..2 (shard 0): the image differs from the one the "
                        "teacher saw (image file changed)")


def test_kill_9_then_rerun_is_bit_identical(made, tmp_path, capsys):
    """Shards of 2 rows (an image's 3 rows span two shards): the rerun fills the rest of a half-done image."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main(image_args(made, ref)) == 0
    kill_9_inside_precompute(image_args(made, out), out)
    partial = CacheReader(out)
    done = [j for j in range(partial.layout.num_shards) if partial.shard_done(j)]
    print(f"killed with shards {done} of {partial.layout.num_shards} committed", file=sys.__stderr__)
    assert not partial.complete and 0 < len(done) < partial.layout.num_shards == 6
    assert main(image_args(made, out)) == 0  # the rerun (in this process: one interpreter start less)
    assert CacheReader(out).complete and not list(out.rglob("*.partial"))
    assert_same_arrays(out, ref)
    rc, lines, _ = verify(capsys, out, "--deep", *recompute_args(made, 2))
    assert rc == 0 and not faults(lines), lines


def test_mirrored_image_cache_passes_and_a_swapped_mirror_is_named(made, tmp_path, capsys):
    """precompute --mirror: quick, --deep and --recompute on every row pass; a row whose aug_params lose their
    mirror flag is named."""
    out = tmp_path / "mirrored"
    assert main(image_args(made, out, default_shards=True) + ["--mirror", "on"]) == 0
    lay = CacheReader(out).layout
    assert lay.mirrored and lay.variants == 6 and lay.shard_size == 6
    rc, lines, err = verify(capsys, out, "--deep", *recompute_args(made, 24))
    assert rc == 0 and len(lines) == 1 and "teacher recomputed on 24 sample(s)" in lines[0], lines + [err]
    params = zarr.open_group(str(out), mode="r+")["aug_params"]
    p = json.loads(str(params[1]))
    assert p["mirrored"] is True
    del p["mirrored"]
    params[1] = json.dumps(p, sort_keys=True, separators=(",", ":"))
    rc, lines, _ = verify(capsys, out)
    bad = faults(lines)
    assert rc != 0 and any("sample 1 " in line and "mirrored is not the layout's" in line for line in bad), lines
