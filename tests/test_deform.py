"""The CPU sampled deformable conv equals torchvision's op (values and gradients)."""
import pytest
import torch
from torchvision.ops import deform_conv2d

from yolc_kd.models.deform import DeformConv2d, deform_conv2d_sampled


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
def test_sampled_matches_torchvision(stride, padding, dilation):
    gen = torch.Generator().manual_seed(stride * 10 + padding + dilation)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    ho = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (11 + 2 * padding - dilation * 2 - 1) // stride + 1
    # large offsets: many sampling points fall outside the image, where both ops read zeros
    offset = (torch.randn(2, 18, ho, wo, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    ref = deform_conv2d(x, offset, w, bias, stride=stride, padding=padding, dilation=dilation)
    out = deform_conv2d_sampled(x, offset, w, bias, stride, padding, dilation)
    torch.testing.assert_close(out, ref)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    inputs = (x, offset, w, bias)
    for a, b in zip(torch.autograd.grad(ref, inputs, g), torch.autograd.grad(out, inputs, g)):
        torch.testing.assert_close(b, a)


def test_module_keeps_torchvision_names_and_falls_back_for_masks():
    m = DeformConv2d(4, 2, 3, padding=1, bias=False)
    assert set(m.state_dict()) == {"weight"}
    x, off = torch.randn(1, 4, 6, 7), torch.randn(1, 18, 6, 7)
    mask = torch.rand(1, 9, 6, 7)
    torch.testing.assert_close(m(x, off, mask), deform_conv2d(x, off, m.weight, None, padding=1, mask=mask))
    torch.testing.assert_close(m(x, off), deform_conv2d(x, off, m.weight, None, padding=1), rtol=1e-5, atol=1e-5)
