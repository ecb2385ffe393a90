"""Typed settings: distill_cfg is resolved once into DistillSettings (the dict never leaves config/settings), the
options YOLC's configs declare are used or refused in one line, crop_size_order is a config key."""
import ast
from pathlib import Path

import pytest

from conftest import REPO, tiny_model_cfg
from yolc_kd.config import augment_config, load_config
from yolc_kd.data.augment import AugmentConfig
from yolc_kd.errors import UserError
from yolc_kd.settings import DistillSettings

PKG = Path(__file__).resolve().parents[1] / "src" / "yolc_kd"


def _config(tmp_path, text: str, model=None) -> Path:
    path = tmp_path / "c.py"
    path.write_text(f"model = {(model or tiny_model_cfg(3))!r}\n{text}")
    return path


def test_distill_cfg_is_resolved_once_into_typed_settings(tmp_path):
    cfg = load_config(_config(tmp_path, "distill_cfg = dict(hm_kd='mse', max_patches_per_img=3)\n"), with_defaults=True)
    assert "distill_cfg" not in cfg and isinstance(cfg["distill"], DistillSettings)
    assert (cfg["distill"].hm_kd, cfg["distill"].max_patches_per_img, cfg["distill"].enable) == ("mse", 3, True)
    assert cfg["distill"].box_kd == DistillSettings().box_kd  # the rest: the dataclass defaults
    absent = load_config(_config(tmp_path, ""), with_defaults=True)["distill"]
    assert absent.enable is None and absent.replace(enable=True) == DistillSettings()


def test_settings_check_values_built_in_code_too():
    with pytest.raises(UserError, match=r"'distill_cfg\.max_patches_per_img' must be in 1\.\.16"):
        DistillSettings(max_patches_per_img=0)
    with pytest.raises(UserError, match=r"'distill_cfg\.hm_kd_beta' must be int/float, got bool"):
        DistillSettings().replace(hm_kd_beta=True)
    with pytest.raises(UserError, match=r"^config c\.py: 'distill_cfg\.enable' must be bool, got NoneType$"):
        DistillSettings.from_config(dict(enable=None), "c.py")


def test_the_distill_cfg_dict_stays_in_the_config_module():
    """Outside config.py, no module reads a config's distill_cfg entry: they receive DistillSettings."""
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "config.py" and path.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "distill_cfg":
                raise AssertionError(f"{path.relative_to(PKG)}:{node.lineno} reads 'distill_cfg'")


def test_num_classes_must_be_the_heads(tmp_path):
    assert load_config(_config(tmp_path, "num_classes = 3\n"))["num_classes"] == 3
    with pytest.raises(UserError, match=r"'num_classes' must be an int, got str"):
        load_config(_config(tmp_path, "num_classes = '3'\n"))
    with pytest.raises(UserError, match=r"^config .*c\.py: 'num_classes' is 10 but model\.bbox_head\.num_classes is 3$"):
        load_config(_config(tmp_path, "num_classes = 10\n"))


def test_img_norm_cfg_must_be_the_pipelines_normalisation(tmp_path):
    w48 = load_config(REPO / "configs" / "yolc_hrnet_w48_visdrone.py", with_defaults=True)
    assert w48["img_norm_cfg"]["std"] == list(augment_config(w48).std)
    yolc = "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)\n"
    load_config(_config(tmp_path, yolc))  # no pipeline: YOLC's normalisation
    with pytest.raises(UserError, match=r"'img_norm_cfg' .* is not what the train pipeline normalises with") as err:
        load_config(_config(tmp_path, "img_norm_cfg = dict(mean=[0, 0, 0], std=[255, 255, 255], to_rgb=True)\n"))
    assert "\n" not in str(err.value) and "c.py" in str(err.value)


def test_crop_size_order_is_a_config_key(tmp_path):
    pipeline = [dict(type="RandomCenterCropPad", crop_size=(128, 96), ratios=(1.0,), border=32, mean=[0, 0, 0],
                     std=[1, 1, 1], to_rgb=True), dict(type="Resize", img_scale=(128, 96), keep_ratio=True)]
    wh = augment_config(load_config(_config(tmp_path, f"train_pipeline = {pipeline!r}\n"), with_defaults=True))
    hw = augment_config(load_config(_config(tmp_path, f"train_pipeline = {pipeline!r}\ncrop_size_order = 'hw'\n"),
                                    with_defaults=True))
    assert wh.crop_hw(1.0) == (96, 128) and hw.crop_hw(1.0) == (128, 96)  # mmdet's literal (h, w)
    with pytest.raises(UserError, match=r"^config .*c\.py: 'crop_size_order' must be 'wh' or 'hw', got 'xy'$"):
        load_config(_config(tmp_path, "crop_size_order = 'xy'\n"))


def test_a_crop_std_that_would_do_nothing_is_refused():
    pipeline = [dict(type="RandomCenterCropPad", crop_size=(128, 96), ratios=(1.0,), mean=[0, 0, 0],
                     std=[58.395, 57.12, 57.375]), dict(type="Resize", img_scale=(128, 96))]
    with pytest.raises(UserError, match=r"RandomCenterCropPad std .* would do nothing"):
        AugmentConfig.from_pipeline(pipeline)
