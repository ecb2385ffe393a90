"""distill_cfg.enable is the config's KD switch: enable=True with a teacher and no --cache is online KD, --cache is
offline KD, enable=False is no KD (a KD source asked for with it is one line of error); a config without
distill_cfg distils only when the command line asks."""
import pytest
from conftest import make_setup, train_cli

from yolc_kd.errors import UserError
from yolc_kd.settings import DistillSettings
from yolc_kd.train.recipe import KDSource, describe_kd, kd_mode

pytestmark = pytest.mark.usefixtures("one_thread")

ON = DistillSettings.from_config(dict(enable=True))
ON_WITH_TEACHER = DistillSettings.from_config(dict(enable=True, teacher_ckpt="t.pth"))
OFF = DistillSettings.from_config(dict(enable=False, teacher_ckpt="t.pth"))
ABSENT = DistillSettings.from_config(None)


@pytest.mark.parametrize("dcfg, kd, mode", [
    (ON_WITH_TEACHER, KDSource(), "online"),                      # the seed: enable + teacher_ckpt -> online KD
    (ON_WITH_TEACHER, KDSource(cache="soft"), "offline"),         # --cache -> offline KD
    (ON, KDSource(cache="soft"), "offline"),
    (ON, KDSource(online=True, teacher_ckpt="t.pth"), "online"),
    (ON, KDSource(teacher_ckpt="t.pth"), "online"),               # --teacher-ckpt is a teacher
    (ON_WITH_TEACHER, KDSource(online=True), "online"),
    (OFF, KDSource(), "none"),                                    # enable=False -> no KD, teacher_ckpt ignored
    (ABSENT, KDSource(), "none"),
    (ABSENT, KDSource(cache="soft"), "offline"),                  # no distill_cfg: KD where asked, defaults
    (ABSENT, KDSource(online=True, teacher_ckpt="t.pth"), "online"),
])
def test_kd_mode_follows_enable_and_the_command_line(dcfg, kd, mode):
    assert kd_mode(dcfg, kd) == mode


@pytest.mark.parametrize("dcfg, kd, message", [
    (OFF, KDSource(cache="soft"), r"--cache asks for KD but distill_cfg.enable=False in c.py turns it off"),
    (OFF, KDSource(online=True, teacher_ckpt="t.pth"), r"--online and --teacher-ckpt asks for KD but .*enable=False"),
    (OFF, KDSource(teacher_ckpt="t.pth"), r"--teacher-ckpt asks for KD"),
    (ON, KDSource(), r"distill_cfg.enable=True in c.py asks for KD but no teacher is given: pass --cache DIR"),
    (ON, KDSource(cache="soft", online=True), "--cache and --online exclude each other"),
    (ON, KDSource(cache="soft", teacher_ckpt="t.pth"), "--teacher-ckpt names a live teacher but --cache"),
])
def test_contradictions_are_one_line(dcfg, kd, message):
    with pytest.raises(UserError, match=message):
        kd_mode(dcfg, kd, "c.py")


def test_the_first_log_line_says_which_kd():
    assert describe_kd("online", ON_WITH_TEACHER, KDSource()) == \
        "online KD from a live teacher (t.pth; distill_cfg.enable=True and no --cache)"
    assert describe_kd("offline", ON, KDSource(cache="soft")) == "offline KD from the cache soft"
    assert describe_kd("none", OFF, KDSource()) == "no KD (distill_cfg.enable=False)"
    assert describe_kd("none", ABSENT, KDSource()) == "no KD (no distill_cfg)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("kd_switch"))


def _train(setup, tmp_path, name: str, dcfg: str, *extra: str) -> int:
    config = tmp_path / f"{name}.py"
    config.write_text(f"_base_ = {str(setup.config)!r}\ndistill_cfg = dict({dcfg})\n"
                      "runner = dict(type='IterBasedRunner', max_iters=1)\nlog_config = dict(interval=1)\n")
    return train_cli(str(config), str(setup.ann), str(setup.data), tmp_path / name, *extra)


def test_enable_with_a_teacher_trains_online_kd(setup, tmp_path, capsys):
    assert _train(setup, tmp_path, "on", f"enable=True, teacher_ckpt={str(setup.ckpt)!r}") == 0
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("train: "))
    assert first.startswith(f"train: online KD from a live teacher ({setup.ckpt}; distill_cfg.enable=True")
    assert (tmp_path / "on" / "metrics.jsonl").read_text().count("loss_kd") > 0  # the KD terms were trained


def test_enable_false_trains_without_kd_and_refuses_a_source(setup, tmp_path, capsys):
    assert _train(setup, tmp_path, "off", f"enable=False, teacher_ckpt={str(setup.ckpt)!r}") == 0
    out = capsys.readouterr().out
    assert "train: no KD (distill_cfg.enable=False)" in out
    assert "loss_kd" not in (tmp_path / "off" / "metrics.jsonl").read_text()
    assert _train(setup, tmp_path, "off_online", "enable=False", "--online", "--teacher-ckpt", str(setup.ckpt)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "enable=False" in err[0] and "Traceback" not in err[0]
