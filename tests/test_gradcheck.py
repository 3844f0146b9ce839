"""Finite-difference checks of every layer's derivative, in float64 (as MatConvNet's xtest does).

``torch.autograd.gradcheck`` compares the analytic derivative (what the
vl_nn* derivative calls return) with central differences. Inputs are drawn
away from the kinks where a derivative is not defined (ReLU at 0, tied
maxima, hinge margins at 1), as xtest does. Where MatConvNet's derivative is
deliberately not the derivative of its forward function (test-mode batch
norm's dzdx, the flat error losses) the test says so and checks what holds.
"""

import itertools

import numpy as np
import pytest
import torch

from matconvnet_port import functional as fn
from matconvnet_port import vl_nnconv, vl_nnpool

torch.manual_seed(0)


def rand(*shape, requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


def check(f, *inputs):
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pad,stride,dilate,groups", [
    (0, 1, 1, 1), ([1, 0, 2, 1], [2, 1], 1, 1), (1, 2, [2, 1], 1), ([0, 1, 1, 0], 1, 1, 2), (2, 3, 2, 3)])
def test_conv(pad, stride, dilate, groups):
    x = rand(2, 6, 9, 8)
    f = rand(3 * groups, 6 // groups, 3, 2)
    b = rand(f.shape[0])
    check(lambda x, f, b: fn.conv(x, f, b, pad=pad, stride=stride, dilate=dilate), x, f, b)


def _blocking(block_bytes, monkeypatch):
    if block_bytes == "in_place":
        monkeypatch.setattr(fn, "PRODUCTS_IN_PLACE", True)
    elif block_bytes:
        monkeypatch.setattr(fn, "GEMM_BLOCK_BYTES", block_bytes)


# filter sizes against the 7 x 8 input: outputs larger and smaller than the filter, and 1 x 1 (a fully
# connected layer), so that col2im's classes of non-overlapping taps hold one to several taps
@pytest.mark.parametrize("groups,filter_size,bias", [(1, (3, 2), True), (2, (3, 3), True), (3, (1, 1), False),
                                                     (1, (5, 5), False), (6, (2, 3), True), (1, (7, 8), True),
                                                     (2, (6, 3), False)])
# one block; one image per block (the CPU's blocking); one block with the batched products reading and
# writing the channels-last layout in place (what CUDA runs)
@pytest.mark.parametrize("block_bytes", [None, 1, "in_place"])
@pytest.mark.parametrize("library_forward", [False, True])  # all GEMM; only the filter derivative
def test_conv_gemm_equals_conv_and_its_derivatives(groups, filter_size, bias, block_bytes, library_forward,
                                                   monkeypatch):
    _blocking(block_bytes, monkeypatch)
    x = rand(3, 6, 7, 8)
    f = rand(2 * groups, 6 // groups, *filter_size)
    b = rand(f.shape[0]) if bias else None
    inputs = (x, f, b) if bias else (x, f)
    y = fn.conv_gemm(x, f, b, library_forward=library_forward)
    if not library_forward:
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, fn.conv(x, f, b), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for ours, ref in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(fn.conv(x, f, b), inputs, g)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    check(lambda *a: fn.conv_gemm(*a, library_forward=library_forward), *inputs)


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (3, True)])
@pytest.mark.parametrize("block_bytes", [None, 1, "in_place"])
def test_conv_gemm_max_pool_is_conv_then_pool_ties_included(groups, bias, block_bytes, monkeypatch):
    _blocking(block_bytes, monkeypatch)
    # small integers: many tied maxima, whose derivative must go where pool sends it
    x = torch.randint(-2, 3, (3, 6, 9, 8)).double().requires_grad_(True)
    f = torch.randint(-1, 2, (2 * groups, 6 // groups, 2, 3)).double().requires_grad_(True)
    b = torch.randint(-2, 3, (f.shape[0],)).double().requires_grad_(True) if bias else None
    inputs = (x, f, b) if bias else (x, f)
    ours = fn.conv_gemm(x, f, b, max_pool=True)
    ref = fn.pool(fn.conv(x, f, b), 2, stride=2, tie_order="row")
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    check(lambda *a: fn.conv_gemm(*a, max_pool=True), rand(2, 6, 9, 8), rand(2 * groups, 6 // groups, 2, 3),
          *([rand(2 * groups)] if bias else []))


def assert_linear_pair_is_two_convolutions(pair, x, f1, b1, f2, b2):
    """``pair`` (a composed conv3 -> conv4) against the two convolutions: values, derivatives, errors."""
    groups = x.shape[1] // f1.shape[1]
    inputs = (x, f1, b1, f2, b2)
    ours = pair(*inputs)
    ref = fn.conv(fn.conv(x, f1, b1), f2, b2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    check(pair, *inputs)
    with pytest.raises(ValueError, match="1 x 1"):
        pair(x, f1, b1, rand(2 * groups, 4, 2, 1), b2)
    with pytest.raises(ValueError, match="grouping"):
        pair(x, f1, b1, rand(2 * groups, 3, 1, 1), b2)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("block_bytes", [None, 1, "in_place"])
def test_linear_pair_gemm_is_two_convolutions(groups, block_bytes, monkeypatch):
    _blocking(block_bytes, monkeypatch)
    assert_linear_pair_is_two_convolutions(fn.linear_pair_gemm, rand(3, 6, 7, 6), rand(4 * groups, 6 // groups, 3, 2),
                                           rand(4 * groups), rand(2 * groups, 4, 1, 1), rand(2 * groups))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_linear_pair_conv_is_two_convolutions(groups, layout):
    def laid_out(t):
        return t.detach().contiguous(memory_format=layout).requires_grad_(True)

    assert_linear_pair_is_two_convolutions(fn.linear_pair_conv, laid_out(rand(3, 6, 7, 6)),
                                           laid_out(rand(4 * groups, 6 // groups, 3, 2)), rand(4 * groups),
                                           rand(2 * groups, 4, 1, 1), rand(2 * groups))


def test_conv_gemm_rejects_what_it_does_not_cover():
    x = rand(2, 6, 5, 5)
    for f, message in ((rand(4, 4, 3, 3), "filter grouping"), (rand(4, 6, 6, 1), "larger than the input"),
                       (rand(4, 6, 3, 3).float(), "dtype")):
        with pytest.raises(ValueError, match=message):
            fn.conv_gemm(x, f)
    with pytest.raises(ValueError, match="b must have 4"):
        fn.conv_gemm(x, rand(4, 6, 3, 3), rand(3))
    with pytest.raises(ValueError, match="even output size"):
        fn.conv_gemm(x, rand(4, 6, 3, 3), max_pool=True)  # 3 x 3 output
    with pytest.raises(ValueError, match="library_forward does not take max_pool"):
        fn.conv_gemm(x, rand(4, 6, 2, 2), max_pool=True, library_forward=True)


def test_conv_identity_filters():
    check(lambda x, b: fn.conv(x, None, b, pad=[1, 0, 0, 2], stride=[2, 1]), rand(2, 3, 5, 6), rand(3))


@pytest.mark.parametrize("upsample,crop,groups", [(1, 0, 1), ([2, 3], [1, 0, 0, 2], 1), (2, 1, 2)])
def test_convt(upsample, crop, groups):
    x = rand(2, 4, 4, 5)
    check(lambda x, f, b: fn.convt(x, f, b, upsample=upsample, crop=crop, num_groups=groups),
          x, rand(4, 3, 3, 2), rand(3 * groups))


def test_convt_is_the_adjoint_of_conv():
    """vl_nnconvt's definition: <conv(v, F), x> = <v, convt(x, F)>."""
    # conv's filters K x C x FH x FW are convt's D x K' x FH x FW with D = K: the same tensor
    v, x, f = rand(2, 3, 9, 8, requires_grad=False), rand(2, 4, 4, 4, requires_grad=False), rand(4, 3, 3, 2)
    lhs = (fn.conv(v, f, None, stride=2) * x).sum()
    rhs = (v * fn.convt(x, f, None, upsample=2)).sum()
    assert torch.allclose(lhs, rhs)


def distinct(*shape):
    """Values far apart so no two elements of a pooling window tie (the max is differentiable)."""
    n = int(np.prod(shape))
    return (torch.randperm(n, dtype=torch.float64) / n * 10).reshape(shape).requires_grad_(True)


@pytest.mark.parametrize("method", ["max", "avg"])
@pytest.mark.parametrize("pool_size,pad,stride", [(2, 0, 2), ([3, 2], [1, 0, 1, 1], [1, 2]), (3, [2, 2, 0, 1], 1)])
def test_pool(method, pool_size, pad, stride):
    check(lambda x: fn.pool(x, pool_size, pad=pad, stride=stride, method=method), distinct(2, 2, 7, 6))


def away_from_zero(*shape):
    x = rand(*shape, requires_grad=False)
    return (x + 0.1 * torch.sign(x)).requires_grad_(True)


@pytest.mark.parametrize("leak", [0.0, 0.2])
def test_relu(leak):
    check(lambda x: fn.relu(x, leak), away_from_zero(2, 3, 4, 5))


def test_channel_relu():
    check(lambda x: fn.channel_relu(x, [True, False, False, True]), away_from_zero(2, 4, 3, 3))


def test_sigmoid_and_softmax():
    check(fn.sigmoid, rand(2, 3, 4, 5))
    check(fn.softmax, rand(2, 5, 3, 4))


@pytest.mark.parametrize("labels", ["image", "location", "weights"])
def test_softmaxloss(labels):
    x = rand(3, 5, 2, 4)
    if labels == "image":
        c = torch.tensor([1.0, 5.0, 3.0])
    elif labels == "location":
        c = torch.randint(0, 6, (3, 1, 2, 4)).double()
    else:
        c = torch.cat([torch.randint(1, 6, (3, 1, 2, 4)).double(), torch.rand(3, 1, 2, 4, dtype=torch.float64)], 1)
    check(lambda x: fn.softmaxloss(x, c), x)


@pytest.mark.parametrize("loss", ["softmaxlog", "log", "mhinge", "mshinge"])
def test_categorical_losses(loss):
    c = torch.randint(0, 5, (3, 1, 2, 2)).double()
    x = rand(3, 4, 2, 2) * 3
    if loss == "log":
        # probabilities well above the loss's clamp, whatever the random stream (test order) gives
        x = (0.1 + 0.9 * fn.softmax(x.detach() / 3)).requires_grad_(True)
    else:
        x = x.detach().requires_grad_(True)
    if loss == "mhinge":  # push every score at least 0.05 away from the kink at x_c = 1
        with torch.no_grad():
            x += 0.05 * torch.sign(x - 1 + 1e-9)
    if loss == "mshinge":  # the kink is at x_c - max_{q != c} x_q = 1: move x_c off it
        with torch.no_grad():
            for n, _, i, j in (c > 0).nonzero().tolist():
                k = int(c[n, 0, i, j]) - 1
                margin = x[n, k, i, j] - torch.cat([x[n, :k, i, j], x[n, k + 1:, i, j]]).max()
                if abs(float(margin) - 1) < 0.05:
                    x[n, k, i, j] += 0.1
    weights = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    check(lambda x: fn.loss(x, c, loss=loss, instance_weights=weights), x)


@pytest.mark.parametrize("loss", ["binarylog", "logistic", "hinge"])
def test_binary_losses(loss):
    c = torch.randint(-1, 2, (2, 3, 2, 2)).double()
    x = rand(2, 3, 2, 2) * 2
    if loss == "binarylog":
        x = torch.sigmoid(x.detach()).requires_grad_(True)
    elif loss == "hinge":
        # move c x (the margin) 0.1 further from the kink at 1: along c, so also for c = -1
        x = (x.detach() + 0.1 * c * torch.sign(c * x.detach() - 1)).requires_grad_(True)
    check(lambda x: fn.loss(x, c, loss=loss), x)


@pytest.mark.parametrize("loss", ["classerror", "topkerror", "binaryerror"])
def test_error_counts_have_zero_derivative(loss):
    c = torch.randint(1, 5, (3,)).double() if loss != "binaryerror" else torch.randint(-1, 2, (3, 4, 2, 2)).double()
    x = rand(3, 4, 2, 2)
    y = fn.loss(x, c, loss=loss)
    assert not y.requires_grad  # the vl_nn* adapters report zeros, as MatConvNet does


@pytest.mark.parametrize("size", [5, 4, 1])
def test_lrn_exact_power(size):
    # the default reproduces MatConvNet's approximate CPU power, whose derivative
    # is MatConvNet's formula evaluated with that power -- not the derivative of a
    # piecewise polynomial -- so finite differences check the exact-power form
    check(lambda x: fn.lrn(x, [size, 1.5, 0.1, 0.75], approximate_power=False), rand(2, 6, 3, 2))


def test_lrn_approximate_power_derivative_is_within_the_approximation_error():
    x = rand(2, 6, 3, 2)
    g = torch.randn(2, 6, 3, 2, dtype=torch.float64)
    (a,) = torch.autograd.grad(fn.lrn(x, [5, 1.5, 0.1, 0.75]), x, g)
    (e,) = torch.autograd.grad(fn.lrn(x, [5, 1.5, 0.1, 0.75], approximate_power=False), x, g)
    assert (a - e).abs().max() / e.abs().max() < 1e-2


def test_bnorm_training_mode():
    check(lambda x, g, b: fn.bnorm(x, g, b)[0], rand(3, 4, 2, 3) + 2, rand(4), rand(4))


def test_bnorm_test_mode_parameter_derivatives():
    # dzdg and dzdb are true derivatives in test mode; MatConvNet's dzdx is not
    # (it applies the training-mode formula with the given moments), see parity/test_bnorm.py
    x = rand(3, 4, 2, 3, requires_grad=False)
    moments = torch.stack([torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5], 1)
    check(lambda g, b: fn.bnorm(x, g, b, moments)[0], rand(4), rand(4))


def test_dropout_with_fixed_mask():
    x = rand(2, 3, 4, 4)
    mask = (torch.rand(2, 3, 4, 4, dtype=torch.float64) > 0.5).double() * 2
    check(lambda x: fn.dropout(x, 0.5, mask)[0], x)


def test_vl_nn_derivative_calls_equal_autograd_in_float64():
    """The MATLAB-layout derivative calls are the autograd derivatives (float64 in, float64 out)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 6, 4, 2))
    f = rng.standard_normal((3, 3, 2, 6))
    b = rng.standard_normal((1, 6))
    dzdy = rng.standard_normal(vl_nnconv(x, f, b, pad=1).shape)
    dzdx, dzdf, dzdb = vl_nnconv(x, f, b, dzdy, pad=1)
    assert dzdx.dtype == np.float64 and dzdf.shape == f.shape and dzdb.shape == b.shape
    eps = 1e-6
    for (i, j, c, n) in itertools.islice(itertools.product(range(7), range(6), range(4), range(2)), 0, 336, 37):
        xp, xm = x.copy(), x.copy()
        xp[i, j, c, n] += eps
        xm[i, j, c, n] -= eps
        numeric = ((vl_nnconv(xp, f, b, pad=1) - vl_nnconv(xm, f, b, pad=1)) * dzdy).sum() / (2 * eps)
        assert abs(numeric - dzdx[i, j, c, n]) < 1e-6 * max(1, abs(numeric))
    p = vl_nnpool(x, [2, 3], pad=[1, 0, 1, 1], stride=2)
    dzdp = rng.standard_normal(p.shape)
    d = vl_nnpool(x, [2, 3], dzdp, pad=[1, 0, 1, 1], stride=2)
    assert d.shape == x.shape and np.isclose(d.sum(), dzdp.sum())  # max pooling routes each derivative once
