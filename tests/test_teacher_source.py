"""The teacher seam: a live teacher is a target source held by the trainer, never by the student model;
building it leaves the student's RNG alone; the layering rules of the package."""
import ast
import io
import tokenize
from pathlib import Path

import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.errors import UserError
from yolc_kd.kd import KDLoss, KDTargets, student_losses
from yolc_kd.models import build_detector
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import build_teacher
from yolc_kd.train.teacher_source import LiveTeacherSource

DCFG = DistillSettings(max_patches_per_img=2, min_patch_size=16, kd_weight_global_hm=2.0,
            kd_weight_global_coarse=0.5, kd_weight_local_refine=0.25)
PKG = Path(__file__).resolve().parents[1] / "src" / "yolc_kd"


@pytest.fixture()
def teacher_ckpt(tmp_path):
    torch.manual_seed(1)
    teacher = build_detector(tiny_model_cfg(num_classes=3))
    return save_checkpoint(tmp_path / "teacher.pth", teacher), teacher


def _batch(n=2):
    gt_b = [torch.tensor([[10., 10., 30., 26.]]), torch.tensor([[40., 30., 60., 52.]])][:n]
    gt_l = [torch.tensor([0]), torch.tensor([2])][:n]
    return dict(img=torch.randn(n, 3, 96, 128), img_metas=plain_metas(n, 96, 128), gt_bboxes=gt_b, gt_labels=gt_l)


def _source(path, dcfg=DCFG):
    return LiveTeacherSource(build_teacher(dcfg, tiny_model_cfg(num_classes=3), ckpt=str(path)), dcfg)


def test_live_teacher_is_frozen_and_outside_the_student(teacher_ckpt):
    path, _ = teacher_ckpt
    source = _source(path)
    student = build_detector(tiny_model_cfg(num_classes=3)).train()
    assert not source.teacher.training and all(not p.requires_grad for p in source.teacher.parameters())
    assert not any("teacher" in k for k in student.state_dict())
    batch = _batch()
    targets = source.targets(batch)
    assert isinstance(targets, KDTargets)  # made before the student's forward
    losses = student_losses(student, batch["img"], batch["img_metas"], batch["gt_bboxes"], batch["gt_labels"],
                            targets, KDLoss(DCFG))
    assert {"loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in source.teacher.parameters())
    assert all(p.grad is not None for p in student.backbone.parameters() if p.requires_grad)


def test_low_precision_teacher_gives_float32_targets(teacher_ckpt):
    """What --amp does on CUDA (an fp16 teacher) shown with bfloat16 on the CPU: the KD loss gets float32."""
    path, _ = teacher_ckpt
    source = _source(path)
    batch = _batch()
    full = source.targets(batch)
    source.teacher.to(torch.bfloat16)
    low = source.targets(dict(batch, img=batch["img"].to(torch.bfloat16)))
    assert low.heatmap.dtype == low.coarse.dtype == low.refine.dtype == low.patch_scales.dtype == torch.float32
    assert low.patch_valid.dtype == torch.bool
    assert torch.allclose(low.heatmap, full.heatmap, atol=0.05)  # same teacher, bfloat16 rounding


def test_teacher_equal_to_student_gives_zero_kd(teacher_ckpt):
    path, teacher = teacher_ckpt
    source = _source(path, DCFG.replace(online_targets="float"))  # "cached" rounds the targets as the cache does
    student = build_detector(tiny_model_cfg(num_classes=3))
    student.load_state_dict(teacher.state_dict())
    student.eval()  # same weights and BN statistics: student outputs equal the teacher's
    batch = _batch(1)
    losses = student_losses(student, batch["img"], batch["img_metas"], [torch.zeros(0, 4)],
                            [torch.zeros(0, dtype=torch.long)], source.targets(batch), KDLoss(DCFG))
    for key in ("loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine"):
        assert float(losses[key].detach()) == pytest.approx(0.0, abs=1e-5), key  # GWD: float noise


def test_use_teacher_crop_false_is_one_clear_line():
    """KD patches are the teacher's LSM crops, fixed by the targets before the student's forward."""
    with pytest.raises(UserError, match=r"^config c\.py: 'distill_cfg\.use_teacher_crop' must be True") as err:
        DistillSettings.from_config(dict(use_teacher_crop=False), "c.py")
    assert "\n" not in str(err.value)


def test_the_student_cuts_its_kd_patches_where_the_targets_say(teacher_ckpt):
    """The student's patch refine maps are its own refine maps of the targets' crops, all in one forward."""
    path, _ = teacher_ckpt
    batch = _batch()
    targets = _source(path).targets(batch)
    assert int(targets.patch_valid.sum()) > 0
    student = build_detector(tiny_model_cfg(num_classes=3)).eval()
    calls = []
    student.patch_refine = lambda patches, f=student.patch_refine: calls.append(patches.shape[0]) or f(patches)
    plan = targets.patch_plan(batch["img"].shape[2:])
    _, outputs = student.forward_train(batch["img"], batch["img_metas"], batch["gt_bboxes"], batch["gt_labels"],
                                       patches=plan)
    assert calls == [int(targets.patch_valid.sum())]  # one batched forward over every valid patch
    expected = student.bbox_head.forward_boxes(student.extract_feat(plan.cut(batch["img"]))[0])[1]
    assert torch.equal(outputs.patch_refine, expected)


def test_missing_teacher_checkpoint_is_a_clear_error():
    with pytest.raises(UserError, match="teacher checkpoint"):
        build_teacher(DCFG, tiny_model_cfg())


def test_building_a_teacher_leaves_the_student_init_alone(teacher_ckpt):
    path, _ = teacher_ckpt
    torch.manual_seed(7)
    plain = build_detector(tiny_model_cfg(num_classes=3)).state_dict()
    torch.manual_seed(7)
    build_teacher(DCFG, tiny_model_cfg(num_classes=3), ckpt=str(path))
    after_teacher = build_detector(tiny_model_cfg(num_classes=3)).state_dict()
    assert all(torch.equal(plain[k], after_teacher[k]) for k in plain)


def test_no_module_under_models_imports_kd():
    for path in sorted((PKG / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "yolc_kd":
                names = [f"yolc_kd.{a.name}" for a in node.names]
            assert not any(n == "yolc_kd.kd" or n.startswith("yolc_kd.kd.") for n in names), f"{path.name}: {names}"


def test_models_know_nothing_of_teachers():
    """Outside comments, no name or string under models/ mentions a teacher."""
    for path in sorted((PKG / "models").glob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type in (tokenize.NAME, tokenize.STRING) and "teacher" in tok.string.lower():
                if tok.type == tokenize.STRING and tok.line.strip().startswith(('"""', "'''")):
                    continue  # a docstring is a comment
                raise AssertionError(f"{path.name}:{tok.start[0]}: {tok.line.strip()}")


def test_no_command_imports_another_command():
    commands = {p.stem for p in (PKG / "commands").glob("*.py") if p.stem != "__init__"}
    for path in sorted((PKG / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                parts = name.split(".")
                assert not (parts[:2] == ["yolc_kd", "commands"] and len(parts) > 2 and parts[2] in commands), \
                    f"{path.name} imports {name}"
