"""The vl_nn* entry points called as MATLAB code calls them: shapes, empty arguments, switches, errors.

The numbers themselves are checked against MatConvNet in parity/; here, that a line ported from
MATLAB means what it meant there (``size(y) == size(x)`` for element-wise layers, ``[]`` for a
missing derivative, per-image attribute labels, moments in column-major order, MatConvNet's
option switches) and that a bad argument is one line naming the function.
"""

import numpy as np
import pytest

from matconvnet_port import (vl_nnbnorm, vl_nnconv, vl_nnconvt, vl_nndropout, vl_nnloss, vl_nnnormalize,
                             vl_nnpool, vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax, vl_nnsoftmaxloss)

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(5, 6), (4, 4, 3), (4, 4, 3, 2), (7, 1)])
@pytest.mark.parametrize("layer", [vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax,
                                   lambda x, *d: vl_nnnormalize(x, [3, 1, 1e-4, 0.75], *d)])
def test_elementwise_layers_keep_the_shape_of_x(layer, shape):
    x = rand(*shape)
    y = layer(x)
    assert y.shape == x.shape          # so a residual y + x means what it meant in MATLAB
    assert layer(x, np.ones_like(x)).shape == x.shape
    np.testing.assert_array_equal(layer(x, []), y)  # an empty dzdy is a forward call


def test_lists_are_arrays_of_their_numpy_shape():
    y = vl_nnrelu([[1.0, -1.0]])
    assert y.shape == (1, 2) and y.tolist() == [[1.0, 0.0]]
    y, moments = vl_nnbnorm([[[1.0, 2.0]], [[3.0, 5.0]]], [1.0, 1.0], [0.0, 0.0])
    assert y.shape == (2, 1, 2) and moments.shape == (2, 2)


def test_bnorm_and_dropout_outputs_keep_the_shape_of_x():
    x = rand(4, 5, 3)
    y, moments = vl_nnbnorm(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    assert y.shape == x.shape and moments.shape == (3, 2)
    y, mask = vl_nndropout(x)
    assert y.shape == mask.shape == x.shape
    assert vl_nndropout(x, y, mask=mask).shape == x.shape


def test_bnorm_reads_moments_in_column_major_order():
    """vl_nnbnorm.cu reads any 2C-element array column-major: the C means, then the C sigmas."""
    x = rand(4, 5, 3, 2)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    mean, sigma = np.array([.5, -1, 2], np.float32), np.array([1, 2, 4], np.float32)
    expected = (x - mean[None, None, :, None]) / sigma[None, None, :, None]
    for moments in (np.stack([mean, sigma], 1), np.concatenate([mean, sigma]),
                    np.concatenate([mean, sigma])[None, :]):
        y, back = vl_nnbnorm(x, g, b, moments=moments)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(back, moments)  # returned in the caller's shape and order
        *_, back = vl_nnbnorm(x, g, b, np.ones_like(x), moments=moments)
        np.testing.assert_array_equal(back, moments)
    with pytest.raises(ValueError, match="vl_nnbnorm: moments must have 2C = 6 elements"):
        vl_nnbnorm(x, g, b, moments=np.ones(5, np.float32))


@pytest.mark.parametrize("loss", ["logistic", "hinge", "binaryerror", "binarylog"])
def test_one_attribute_takes_one_label_per_image(loss):
    """vl_nnloss.m repeats N labels over space; with D = 1 they are valid attribute labels."""
    x = rand(2, 3, 1, 4)
    if loss == "binarylog":
        x = 1 / (1 + np.exp(-x))
    labels = np.array([1, -1, 1, -1], np.float32)
    full = np.broadcast_to(labels.reshape(1, 1, 1, 4), x.shape).copy()
    # equal up to the order of a float32 sum (the two label arrays have different memory layouts)
    np.testing.assert_allclose(vl_nnloss(x, labels, loss=loss), vl_nnloss(x, full, loss=loss), rtol=1e-6)
    dzdy = np.float32(0.5)
    np.testing.assert_array_equal(vl_nnloss(x, labels, dzdy, loss=loss), vl_nnloss(x, full, dzdy, loss=loss))
    with pytest.raises(ValueError, match="vl_nnloss: c must have the shape of x"):
        vl_nnloss(rand(2, 3, 2, 4), labels, loss=loss)  # two attributes need a label each


@pytest.mark.parametrize("call", [lambda x, c: vl_nnloss(x, c, [], loss="classerror"),
                                  lambda x, c: vl_nnsoftmaxloss(x, c, [])])
def test_losses_with_an_empty_dzdy_are_forward_calls(call):
    """dagnn.Loss calls vl_nnloss(x, c, [], 'loss', ...) for its forward pass."""
    x, c = rand(1, 1, 5, 4), [1, 2, 3, 4]
    value = call(x, c)
    assert np.ndim(value) == 0 and value == call(x, c)


def test_no_der_switches_return_empty_derivatives_and_backend_switches_change_nothing():
    x, f, b = rand(6, 7, 3, 2), rand(3, 3, 3, 4), rand(4)
    dzdy = rand(4, 5, 4, 2)
    full = vl_nnconv(x, f, b, dzdy)
    some = vl_nnconv(x, f, b, dzdy, no_der_filters=True, cudnn=True, verbose=True)
    np.testing.assert_array_equal(some[0], full[0])
    np.testing.assert_array_equal(some[2], full[2])
    assert some[1].shape == (0, 0)
    dx, df, db = vl_nnconv(x, f, b, dzdy, no_der_data=True, no_der_biases=True, no_cudnn=True)
    assert dx.shape == db.shape == (0, 0)
    np.testing.assert_array_equal(df, full[1])
    xt = rand(4, 5, 4, 2)
    assert vl_nnconvt(xt, f, None, x[:, :, :, :], no_der_filters=True, cudnn_workspace_limit=1e9)[1].shape == (0, 0)
    np.testing.assert_array_equal(vl_nnpool(x, 2, cudnn=True), vl_nnpool(x, 2))


@pytest.mark.parametrize("call, words", [
    (lambda: vl_nnconv(rand(5, 6, 3, 2), rand(3, 3, 3, 4), None, rand(3, 3, 4, 2)),
     "vl_nnconv: dzdy must have the size of the output (3 x 4 x 4 x 2)"),
    (lambda: vl_nnconv(rand(5, 6, 3), rand(3, 3, 3, 4), None, pad=[1, 2]), "vl_nnconv: pad must have 1 or 4"),
    (lambda: vl_nnconv(rand(5, 6, 3), rand(3, 3, 3, 4), None, pad=None), "vl_nnconv: pad must be a number"),
    (lambda: vl_nnpool(rand(6, 6), 2, stride="12"), "vl_nnpool: stride must be a number"),
    (lambda: vl_nnpool(rand(6, 6), 2, stride=float("nan")), "vl_nnpool: stride must be a number"),
    (lambda: vl_nnrelu(rand(3, 3), leak="a"), "vl_nnrelu: leak must be a finite number"),
    (lambda: vl_nnrelu(rand(3, 3), leak=None), "vl_nnrelu: leak must be a finite number"),
    (lambda: vl_nndropout(rand(3, 3), rate="0.5"), "vl_nndropout: rate must be a finite number"),
    (lambda: vl_nnnormalize(rand(3, 3, 4), "abc"), "vl_nnnormalize: param must be 4 numbers"),
    (lambda: vl_nnconv(rand(5, 6, 3), rand(3, 3, 3, 4), None, stride_x=2), "vl_nnconv: unknown option 'stride_x'"),
    (lambda: vl_nnsoftmaxloss(rand(4, 4, 10, 2), np.ones((1, 3))),
     "vl_nnsoftmaxloss: c must have N = 2 elements (one label per image) or be H x W x D x N = 4 x 4 x D x 2, got 1 x 3"),
])
def test_bad_arguments_are_one_line_errors_naming_the_function(call, words):
    with pytest.raises((ValueError, TypeError)) as exc:
        call()
    assert str(exc.value).startswith(words) and "\n" not in str(exc.value), str(exc.value)


def test_vl_nnconvt_derivatives_are_vl_nnconvs_by_adjointness():
    """<conv(v, f), x> = <v, convt(x, f)> with convt upsampling as conv strides, so convt's derivative
    with respect to its input is conv's output, and both give the same filter derivative; the bias
    derivative sums dzdy over space and images. (MatConvNet writes no convt reference; this ties the
    entry point's three derivatives, shapes included, to vl_nnconv's, which has one.)"""
    x, f, b = rand(4, 5, 3, 2), rand(3, 3, 2, 3), rand(1, 2)  # convt: FH x FW x K=2 x D=3
    dzdy = rand(9, 11, 2, 2)  # (2 (4 - 1) + 3) x (2 (5 - 1) + 3) x K x N
    dx, df, db = vl_nnconvt(x, f, b, dzdy, upsample=2)
    np.testing.assert_allclose(dx, vl_nnconv(dzdy, f, None, stride=2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(df, vl_nnconv(dzdy, f, None, x, stride=2)[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, dzdy.sum(axis=(0, 1, 3)).reshape(1, 2), rtol=1e-5, atol=1e-5)
    assert (dx.shape, df.shape, db.shape) == (x.shape, f.shape, b.shape)


def test_an_empty_torch_bias_gets_matlabs_empty_derivative():
    import torch
    x, f = torch.randn(5, 5, 2, 1), torch.randn(3, 3, 2, 4)
    dzdb = vl_nnconv(x, f, torch.empty(0), torch.randn(3, 3, 4, 1))[2]
    assert isinstance(dzdb, torch.Tensor) and tuple(dzdb.shape) == (0, 0)
    assert vl_nnconv(x.numpy(), f.numpy(), np.zeros((0, 0), np.float32), np.ones((3, 3, 4, 1), np.float32))[2].shape == (0, 0)


def test_empty_dzdy_is_a_forward_call_for_m_layers_and_refused_by_mex_ones():
    """README: [] for dzdy is a forward call where MatConvNet's .m layers take it so; the MEX layers refuse it."""
    x, empty = rand(4, 4, 2, 1), np.zeros((0, 0), np.float32)
    np.testing.assert_array_equal(vl_nnrelu(x, empty), vl_nnrelu(x))
    for call in (lambda: vl_nnpool(x, 2, empty), lambda: vl_nnconv(x, rand(3, 3, 2, 1), None, empty)):
        with pytest.raises(ValueError, match="dzdy must have the size of the output"):
            call()
