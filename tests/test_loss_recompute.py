"""The heatmap losses recompute their full-resolution intermediates in backward (recomputed_in_backward) instead
of keeping them: losses and every gradient must be bit-identical to the plain computation."""
import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd import crops, kd
from yolc_kd.models import build_detector
from yolc_kd.models import losses as model_losses
from yolc_kd.settings import DistillSettings


def _plain(monkeypatch):
    """recomputed_in_backward as a plain call (the computation before the memory change)."""
    monkeypatch.setattr(model_losses, "checkpoint", lambda fn, *tensors, **_: fn(*tensors))


def _student_step(hm_kd: str, num_threads: int = 1):
    torch.set_num_threads(num_threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_detector(tiny_model_cfg(num_classes=3)).train()
    with torch.no_grad():
        model.bbox_head.local_head[-1].bias.fill_(-2.0)
    h, w = 96, 128
    img = torch.randn(2, 3, h, w, generator=gen)
    metas = plain_metas(2, h, w)
    boxes = [torch.tensor([[10.0, 12.0, 30.0, 40.0], [60.0, 20.0, 70.0, 31.0]]), torch.tensor([[5.0, 50.0, 44.0, 90.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    canvas = crops.patch_canvas((h, w))
    targets = kd.KDTargets(
        heatmap=torch.rand(2, 3, h, w, generator=gen) ** 4, coarse=torch.randn(2, 4, h // 4, w // 4, generator=gen),
        patch_boxes=torch.tensor([[[0.0, 0.0, 64.0, 48.0], [0, 0, 0, 0]], [[40.0, 30.0, 48.0, 40.0], [0, 0, 0, 0]]]),
        patch_scales=torch.ones(2, 2), patch_valid=torch.tensor([[True, False], [True, False]]),
        refine=torch.randn(2, 2, 4, canvas[0] // 4, canvas[1] // 4, generator=gen))
    settings = DistillSettings(hm_kd=hm_kd, min_patch_size=16, max_patches_per_img=2)
    losses = kd.student_losses(model, img, metas, boxes, labels, targets, kd.KDLoss(settings))
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("hm_kd", ["soft_focal", "kl", "mse"])
def test_recomputed_losses_and_gradients_are_bit_identical(monkeypatch, hm_kd):
    losses, grads = _student_step(hm_kd)
    with monkeypatch.context() as m:
        _plain(m)
        plain_losses, plain_grads = _student_step(hm_kd)
    assert losses.keys() == plain_losses.keys()
    for key in losses:
        assert torch.equal(losses[key], plain_losses[key]), key
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


def test_without_gradients_the_loss_runs_plainly():
    called = []
    p = torch.rand(1, 2, 8, 8)
    out = model_losses.recomputed_in_backward(lambda a: called.append(1) or a.sum(), p)
    assert called == [1] and torch.equal(out, p.sum())
    with torch.no_grad():
        q = p.clone().requires_grad_()
        assert not model_losses.recomputed_in_backward(lambda a: a.sum(), q).requires_grad


def test_recompute_keeps_no_intermediate_for_backward(monkeypatch):
    """What autograd keeps for the soft-focal heatmap KD's backward: recomputed, nothing but its two inputs (alive
    anyway) and scalars; plain, six or more new heatmap-sized tensors."""
    def saved(p_s, p_t):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kd.soft_focal_heatmap_kd(p_s, p_t, DistillSettings().hm_kd_beta, DistillSettings().hm_kd_peak_thr)
        inputs = {p_s.untyped_storage().data_ptr(), p_t.untyped_storage().data_ptr()}
        return [n for ptr, n in storages.items() if ptr not in inputs and n >= p_t.numel()]

    p_s = torch.rand(2, 3, 64, 64).requires_grad_()
    p_t = torch.rand(2, 3, 64, 64)
    assert saved(p_s, p_t) == []
    with monkeypatch.context() as m:
        _plain(m)
        assert len(saved(p_s, p_t)) >= 6
