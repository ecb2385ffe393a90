"""Typed crop settings: a model's test_cfg.crop (and test_cfg.lsm's keys) are checked once, when the model is
built, into CropSettings with its defaults in one place; a bad value is one line naming the key."""
import pytest

from conftest import REPO, tiny_model_cfg
from yolc_kd import crops
from yolc_kd.config import load_config
from yolc_kd.crop_settings import CropSettings, LSMSettings
from yolc_kd.errors import ModelConfigError
from yolc_kd.models import build_detector


def test_defaults_and_a_configs_crop_settings():
    d = CropSettings()
    assert d.to_dict() == dict(max_patches=4, min_patch_size=64, enlarge=1.2, upscale=1.5, fusion="nms",
                               patch_limit="input", patch_budget=None)  # YOLC's test_cfg.crop
    assert crops.crop_config(None) == d and crops.crop_config(dict(topk=100)) == d
    assert crops.crop_config(dict(crop=dict(max_patches=2, patch_budget=0.34))) == d.replace(max_patches=2,
                                                                                             patch_budget=0.34)
    student = load_config(REPO / "src" / "yolc_kd" / "configs" / "tiny_student_synth.py")["model"]
    model = build_detector(student)
    assert model.crop_cfg == CropSettings(max_patches=2, min_patch_size=48, enlarge=1.2, upscale=1.5, fusion="nms",
                                          patch_budget=0.34)



def test_lsm_settings_are_yolcs_constants_unless_the_config_says_otherwise():
    """LSM's defaults are YOLC's findclusters constants (16x10 grid, 15 cells, 10/11), in LSMSettings only; a
    model's test_cfg.lsm overrides them and its head hands the typed settings to crops.lsm_regions."""
    d = LSMSettings()
    assert (d.grid, d.topk_cells, d.threshold, d.viz_dir) == ((16, 10), 15, 10.0 / 11.0, None)
    got = LSMSettings.from_test_cfg(dict(lsm=dict(grid=[8, 5], topk_cells=4)))
    assert got == LSMSettings(grid=(8, 5), topk_cells=4) and got.grid == (8, 5)
    cfg = tiny_model_cfg(3)
    cfg["test_cfg"] = dict(cfg["test_cfg"], lsm=dict(topk_cells=3))
    assert build_detector(cfg).bbox_head.lsm_cfg == LSMSettings(topk_cells=3)
    with pytest.raises(ModelConfigError, match="test_cfg.lsm.topk_cells must be an integer >= 1, got 0"):
        LSMSettings(topk_cells=0)

BAD = [
    (dict(crop=dict(max_patch=2)), "unknown key test_cfg.crop.max_patch (known: max_patches, "),
    (dict(crop=dict(fusion="wbf")), "test_cfg.crop.fusion must be one of 'nms', 'replace', 'none', got 'wbf'"),
    (dict(crop=dict(patch_limit="half")), "test_cfg.crop.patch_limit must be 'input' or 'quarter', got 'half'"),
    (dict(crop=dict(patch_budget=0)), "test_cfg.crop.patch_budget must be None or a number > 0, got 0"),
    (dict(crop=dict(enlarge=0.5)), "test_cfg.crop.enlarge must be >= 1, got 0.5"),
    (dict(crop=dict(upscale="2")), "'test_cfg.crop.upscale' must be int/float, got str '2'"),
    (dict(crop=dict(max_patches=2.0)), "'test_cfg.crop.max_patches' must be int, got float 2.0"),
    (dict(crop=dict(min_patch_size=0)), "test_cfg.crop.min_patch_size must be >= 1, got 0"),
    (dict(crop=[4]), "test_cfg.crop must be a dict, got list"),
    (dict(lsm=dict(topk=15)), "unknown key test_cfg.lsm.topk (known: grid, topk_cells, threshold, viz_dir)"),
    (dict(lsm=dict(grid=(16,))), "test_cfg.lsm.grid must be two integers >= 1"),
    (dict(lsm=dict(topk_cells=0)), "test_cfg.lsm.topk_cells must be an integer >= 1, got 0"),
    (dict(lsm=dict(threshold=-1)), "test_cfg.lsm.threshold must be a number > 0, got -1"),
]


@pytest.mark.parametrize("test_cfg, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_crop_settings_are_refused_in_one_line_when_the_model_is_built(test_cfg, message):
    cfg = tiny_model_cfg()
    cfg["test_cfg"].update(test_cfg)
    with pytest.raises(ModelConfigError) as exc:
        build_detector(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_configs_bad_crop_setting_names_the_file(tmp_path):
    model = tiny_model_cfg()
    model["test_cfg"]["crop"] = dict(fusion="wbf")
    path = tmp_path / "c.py"
    path.write_text(f"model = {model!r}\n")
    with pytest.raises(ModelConfigError, match=rf"^config {path}: test_cfg\.crop\.fusion must be one of"):
        load_config(path)
