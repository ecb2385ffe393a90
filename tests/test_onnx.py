"""`yolc-kd export` to ONNX and `yolc-kd infer --onnx`: export round trip of a tiny model (checked at two sizes,
then compared again here), ONNX fused inference = PyTorch's, ONNX DeformConv, and the one-line errors (a mismatch
leaves no file, a missing deploy package, a fixed-size graph fed another size, a graph of another class count).

One dynamic export of the tiny model (tens of seconds on a busy 2-core CPU) is shared by the module; the error
tests swap the exporter for a copy of that file."""
import contextlib
import io
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import PIPELINE, tiny_model_cfg
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.cli import main
from yolc_kd.data.synth import make_synthetic_dataset
from yolc_kd.errors import UserError
from yolc_kd.models import build_detector

onnx = pytest.importorskip("onnx", reason="the deploy extra (pip install -e '.[test]' pulls it)")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from yolc_kd.deploy import onnx_export  # noqa: E402
from yolc_kd.deploy.onnx_runtime import OnnxNetwork  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("pedestrian", "people", "bicycle")


def _model_cfg() -> dict:
    cfg = tiny_model_cfg(num_classes=3)
    cfg["test_cfg"]["crop"] = dict(min_patch_size=8, max_patches=2)  # 128x96 images still get patches
    return cfg


def _tiny_model() -> torch.nn.Module:
    """Random weights, except that the heatmap follows the image content (peaks), boxes are a few pixels and the
    DCN offsets vary over the map (a freshly initialised head gives a flat heatmap and zero-size boxes)."""
    torch.manual_seed(0)
    model = build_detector(_model_cfg()).eval()
    head = model.bbox_head
    with torch.no_grad():
        for m in head.local_head.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.normal_(0, 0.5)
        head.reg_conv[2].weight.mul_(0.3)
        head.reg_conv[2].bias.fill_(1.0)
        head.bbox_offset.weight.normal_(0, 0.3)
        head.xywh_init.bias.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0]))
        head.xywh_refine.weight.normal_(0, 0.01)
        head.xywh_refine.weight[2:4] += 1.5 / (9 * head.xywh_refine.weight.shape[1])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny config + checkpoint and its dynamic ONNX export made by the command; the command's stdout."""
    root = tmp_path_factory.mktemp("onnx")
    config = root / "tiny.py"
    config.write_text(f"model = {_model_cfg()!r}\nclasses = {CLASSES!r}\ntrain_pipeline = {PIPELINE!r}\n")
    ckpt = save_checkpoint(root / "tiny.pth", _tiny_model())
    out = root / "tiny.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--config", str(config), "--ckpt", str(ckpt), "--out", str(out)])
    assert rc == 0
    data = make_synthetic_dataset(root / "data", 4, seed=2, size=(128, 96), num_classes=3)
    return SimpleNamespace(root=root, config=config, ckpt=ckpt, onnx=out, stdout=buf.getvalue(), data=data)


def _error_line(capsys, command: str) -> str:
    """The one error line (beside export's progress note) of a failed command."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("export: tracing")]
    assert len(err) == 1, err
    assert err[0].startswith(f"yolc-kd {command}: error: ")
    return err[0]


# ----------------------------------------------------------------------------- export round trip

def test_export_round_trip_at_two_sizes(exported):
    # the command checked 1x3x128x160 (the config's 128x96 test input) and a second batch and size
    assert "onnxruntime vs PyTorch max |diff| at 1x3x128x160" in exported.stdout
    assert "; at 2x3x" in exported.stdout and "grid_sample DCN" in exported.stdout
    graph = onnx.load(str(exported.onnx))
    ops = {n.op_type for n in graph.graph.node}
    assert "GridSample" in ops and "DeformConv" not in ops
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["yolc_kd.dcn"] == "grid_sample" and meta["yolc_kd.num_classes"] == "3"
    model = _tiny_model()
    net = OnnxNetwork(exported.onnx, num_classes=3)
    assert net.fixed_hw is None
    for shape in ((1, 3, 96, 64), (3, 3, 64, 192)):  # sizes the export never saw
        img = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model.bbox_head(model.extract_feat(img))
        got = net(img)
        for e, g in zip(expected, got):
            assert g[0].shape == e[0].shape
            assert torch.allclose(g[0], e[0], atol=1e-5, rtol=1e-5), (g[0] - e[0]).abs().max()


def test_infer_onnx_gives_pytorch_detections(exported, tmp_path, capsys):
    ann, images = exported.data / "annotations.json", exported.data
    base = ["infer", "--config", str(exported.config), "--ann", str(ann), "--images", str(images),
            "--batch-size", "2"]
    assert main(base + ["--ckpt", str(exported.ckpt), "--out", str(tmp_path / "pt.json")]) == 0
    assert main(base + ["--onnx", str(exported.onnx), "--out", str(tmp_path / "ox.json"),
                        "--viz", str(tmp_path / "viz")]) == 0
    out = capsys.readouterr().out
    assert "AP    @[.50:.95]" in out
    pt, ox = (json.loads((tmp_path / n).read_text()) for n in ("pt.json", "ox.json"))
    assert len(pt) > 20  # the spread head detects: the comparison is not empty

    def by_image(preds):
        out = {}
        for p in sorted(preds, key=lambda p: (-p["score"], p["bbox"])):
            out.setdefault(p["image_id"], []).append(p)
        return out

    a, b = by_image(pt), by_image(ox)
    assert a.keys() == b.keys()
    for image_id in a:
        assert len(a[image_id]) == len(b[image_id])
        for p, q in zip(a[image_id], b[image_id]):
            assert p["category_id"] == q["category_id"]
            assert abs(p["score"] - q["score"]) <= 1e-4
            assert np.abs(np.subtract(p["bbox"], q["bbox"])).max() <= 0.011  # bboxes are written to 2 decimals
    assert len(list((tmp_path / "viz").iterdir())) == 4


def test_model_stand_in_is_used_and_removable(exported):
    model = _tiny_model()
    calls = []
    net = OnnxNetwork(exported.onnx)

    def counting(img):
        calls.append(tuple(img.shape))
        return net(img)

    img = torch.randn(1, 3, 128, 160)
    metas = [dict(batch_input_shape=(128, 160), pad_shape=(128, 160, 3), img_shape=(96, 128, 3),
                  scale_factor=np.ones(4, np.float32), border=np.array([16, 112, 16, 144], np.float32))]
    reference = model.simple_test(img, metas)
    model.use_network(counting)
    swapped = model.simple_test(img, metas)
    assert calls and calls[0] == (1, 3, 128, 160)  # the full image, then the patch canvas
    assert torch.allclose(reference[0][0], swapped[0][0], atol=1e-3) and torch.equal(reference[0][1], swapped[0][1])
    model.use_network(None)
    n = len(calls)
    model.simple_test(img, metas)
    assert len(calls) == n


# ----------------------------------------------------------------------------- DeformConv and fixed-size graphs

class _Head(torch.nn.Module):
    """The head alone (features in, the three maps out): a graph small enough to export in seconds."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, image: torch.Tensor):
        heat, coarse, refine = self.head([image])
        return heat[0], coarse[0], refine[0]


def test_deform_conv_export_fixed_size(tmp_path):
    model = _tiny_model()
    head = _Head(model.bbox_head).eval()
    path = tmp_path / "head.onnx"
    feat = torch.randn(1, 32, 24, 40, generator=torch.Generator().manual_seed(3))
    with onnx_export.dcn_path(model, "deform_conv") as layers, torch.no_grad():
        assert layers == 1
        onnx_export.export_graph(head, path, feat, opset=20, dynamic=False)
    assert "DeformConv" in {n.op_type for n in onnx.load(str(path)).graph.node}
    net = OnnxNetwork(path)
    assert net.fixed_hw == (24, 40)
    batch = torch.cat([feat, feat.flip(-1)])  # a batch-1 graph runs a batch one image at a time
    with torch.no_grad():
        expected = head(batch)  # PyTorch's CPU (grid_sample) path as the reference
    for e, g in zip(expected, net(batch)):
        assert torch.allclose(g[0], e, atol=1e-4, rtol=1e-4), (g[0] - e).abs().max()
    with pytest.raises(UserError, match="exported for 40x24 inputs only.*--dynamic"):
        net(torch.randn(1, 32, 32, 40))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 2, 2)])
def test_weights_first_dcn_equals_torchvision(stride, padding, dilation):
    from torchvision.ops import deform_conv2d

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 12, 20, generator=g)
    weight, bias = torch.randn(4, 16, 3, 3, generator=g) * 0.2, torch.randn(4, generator=g)
    ho, wo = ((n + 2 * padding - 2 * dilation - 1) // stride + 1 for n in (12, 20))
    offset = torch.randn(2, 18, ho, wo, generator=g) * 3  # many points between pixels, some outside the map
    expected = deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation)
    got = onnx_export.deform_conv2d_weights_first(x, offset, weight, bias, stride, padding, dilation)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_dcn_path_restores_the_layers():
    model = _tiny_model()
    layer = model.bbox_head.xywh_refine
    feat = torch.randn(1, 16, 8, 8)
    offset = torch.randn(1, 18, 8, 8)
    before = layer(feat, offset)
    with onnx_export.dcn_path(model, "deform_conv"):
        assert "forward" in layer.__dict__
        assert torch.allclose(layer(feat, offset), before, atol=1e-5)
    assert "forward" not in layer.__dict__
    with pytest.raises(UserError, match="--dcn must be one of"):
        with onnx_export.dcn_path(model, "bilinear"):
            pass


def test_deform_conv_without_runtime_kernel_needs_no_check(monkeypatch):
    monkeypatch.setattr(onnx_export, "has_kernel", lambda op, opset, provider="CPUExecutionProvider": False)
    with pytest.raises(UserError, match="no CPU DeformConv kernel.*--no-check"):
        onnx_export.check_requirements(20, "deform_conv", check=True)
    onnx_export.check_requirements(20, "deform_conv", check=False)  # the user keeps the unchecked file
    onnx_export.check_requirements(20, "grid_sample", check=True)


# ----------------------------------------------------------------------------- one-line errors

def _export_args(s, out, *extra):
    return ["export", "--config", str(s.config), "--ckpt", str(s.ckpt), "--out", str(out), *extra]


def test_mismatch_is_an_error_and_leaves_no_file(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "export_graph", lambda net, path, *a, **k: shutil.copy(exported.onnx, path))
    run = OnnxNetwork.run

    def perturbed(self, image):
        maps = run(self, image)
        maps[0] = maps[0] + 0.01
        return maps

    monkeypatch.setattr(OnnxNetwork, "run", perturbed)
    out = tmp_path / "out" / "model.onnx"
    assert main(_export_args(exported, out)) == 1
    line = _error_line(capsys, "export")
    assert "does not match PyTorch: heatmap differs by up to 0.01" in line
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temporary file either


def test_export_failure_says_why(exported, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        try:
            raise NotImplementedError("no translation for aten::frobnicate")
        except NotImplementedError as exc:
            raise RuntimeError("Failed to convert the exported program to an ONNX model.\nmore text") from exc

    monkeypatch.setattr(torch.onnx, "export", fail)
    assert main(_export_args(exported, tmp_path / "m.onnx")) == 1
    assert _error_line(capsys, "export").endswith(
        "torch cannot export this model to ONNX: NotImplementedError: no translation for aten::frobnicate")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("extra, message", [
    (["--opset", "17"], "--opset must be between 18 and"),
    (["--dcn", "deform_conv", "--opset", "18"], "--dcn deform_conv needs --opset 19 or later"),
    (["--tolerance", "0"], "--tolerance must be > 0"),
])
def test_bad_export_arguments(exported, tmp_path, capsys, extra, message):
    assert main(_export_args(exported, tmp_path / "m.onnx", *extra)) == 1
    assert message in _error_line(capsys, "export")


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_deploy_package_export(exported, tmp_path, monkeypatch, capsys, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    assert main(_export_args(exported, tmp_path / "m.onnx")) == 1
    line = _error_line(capsys, "export")
    assert f"needs the Python package {package}" in line and "pip install 'yolc-kd[deploy]'" in line


def _infer_args(s, out, *extra):
    return ["infer", "--config", str(s.config), "--images", str(s.data / "images"), "--out", str(out),
            *map(str, extra)]


def test_missing_onnxruntime_infer(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(_infer_args(exported, tmp_path / "p.json", "--onnx", exported.onnx)) == 1
    line = _error_line(capsys, "infer")
    assert "needs the Python package onnxruntime" in line and "pip install 'yolc-kd[deploy]'" in line


def test_infer_onnx_errors(exported, tmp_path, capsys):
    assert main(_infer_args(exported, tmp_path / "p.json", "--onnx", exported.onnx, "--ckpt", exported.ckpt)) == 1
    assert "--ckpt and --onnx" in _error_line(capsys, "infer")
    assert main(_infer_args(exported, tmp_path / "p.json")) == 1
    assert "--ckpt CKPT or --onnx" in _error_line(capsys, "infer")
    assert main(_infer_args(exported, tmp_path / "p.json", "--onnx", exported.onnx, "--amp")) == 1
    assert "--amp does not apply to --onnx" in _error_line(capsys, "infer")
    assert main(_infer_args(exported, tmp_path / "p.json", "--onnx", tmp_path / "none.onnx")) == 1
    assert "ONNX model not found" in _error_line(capsys, "infer")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert main(_infer_args(exported, tmp_path / "p.json", "--onnx", garbage)) == 1
    assert "onnxruntime cannot load" in _error_line(capsys, "infer")
    four = tmp_path / "four.py"  # the same network with 4 classes: the 3-class graph does not fit it
    cfg = _model_cfg()
    cfg["bbox_head"]["num_classes"] = 4
    four.write_text(f"model = {cfg!r}\n")
    args = _infer_args(exported, tmp_path / "p.json", "--onnx", exported.onnx)
    args[args.index("--config") + 1] = str(four)
    assert main(args) == 1
    assert "predicts 3 classes but the config's model has 4" in _error_line(capsys, "infer")
    assert not (tmp_path / "p.json").exists()


def test_not_a_yolc_graph(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    with pytest.raises(UserError, match="is not a yolc-kd export"):
        OnnxNetwork(path)
