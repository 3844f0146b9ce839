"""vl_nncrop, dagnn.Crop (FCN's) and dagnn.Scale: MATLAB's indexing and bsxfun, written out independently.

MatConvNet wrote no reference for these (the shared references cover the LeNet's layers), so the
expected values here come from the MATLAB source's formulas applied with numpy, plus float64
finite-difference checks of the derivatives.
"""

import numpy as np
import pytest
import torch

from matconvnet_port import MatFormatError, functional as fn, load_net, save_net, vl_nncrop
from matconvnet_port.dagnn import DagNN
from matconvnet_port.inspect import layer_table

RNG = np.random.default_rng(7)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("crop", [[0, 0, 0, 0], [1, 2, 0, 3], 1, [6, 0, 2, 2], [4, 4, 0, 0]])
def test_vl_nncrop_is_matlab_indexing_and_its_derivative_puts_dzdy_back(crop):
    x = rand(7, 8, 3, 2)
    t, b, l, r = np.broadcast_to(crop, 4)
    # x(1+t : end-b, 1+l : end-r, :, :), an empty range where the crop exceeds x
    expected = x[t:max(t, 7 - b), l:max(l, 8 - r)]
    y = vl_nncrop(x, crop)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)
    dzdy = rand(*y.shape)
    if not dzdy.size:  # MATLAB: `if nargin <= 2 || isempty(dzdy)`, the forward call
        assert vl_nncrop(x, crop, dzdy).shape == y.shape
        return
    dzdx = np.zeros_like(x)
    dzdx[t:max(t, 7 - b), l:max(l, 8 - r)] = dzdy
    np.testing.assert_array_equal(vl_nncrop(x, crop, dzdy), dzdx)
    np.testing.assert_array_equal(vl_nncrop(None, crop, dzdy, [7, 8, 3, 2]), dzdx)


def test_vl_nncrop_keeps_the_callers_kind_and_input_size_shape():
    x = torch.randn(5, 6, 2, dtype=torch.float64)
    y = vl_nncrop(x, [1, 1, 2, 0])
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and tuple(y.shape) == (3, 4, 2, 1)
    assert vl_nncrop(None, [1, 1, 2, 0], y, [5, 6, 2]).shape == (5, 6, 2)


@pytest.mark.parametrize("call, words", [
    (lambda: vl_nncrop(rand(5, 5), [-1, 0, 0, 0]), "vl_nncrop: crop must be non-negative"),
    (lambda: vl_nncrop(rand(5, 5), [1, 0]), "vl_nncrop: crop must have 1 or 4 elements"),
    (lambda: vl_nncrop(rand(5, 5), 1, rand(2, 2)), "vl_nncrop: dzdy must have the size of the output (3 x 3"),
    (lambda: vl_nncrop(None, 1, rand(2, 2), [5, 5]), "vl_nncrop: dzdy must have the size of the output (3 x 3"),
    (lambda: vl_nncrop(None, 1, rand(3, 3), [5, 5.5]), "vl_nncrop: input_size must be 2 to 4"),
])
def test_vl_nncrop_errors_are_one_line(call, words):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_crop_and_scale_derivatives_by_finite_differences():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn.crop(t, [1, 2, 0, 1]), (x,))
    w = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 1, 6, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn.scale, (x, w, b))


def crop_net(crop):
    dag = DagNN()
    dag.add_layer("crop", "dagnn.Crop", ["x", "like"], "y", block={"crop": crop})
    return dag


@pytest.mark.parametrize("crop", [[0, 0], [1, 2], [5, 0], [0, 9]])
@pytest.mark.parametrize("like_size", [(4, 4), (7, 8), (2, 6)])
def test_dagnn_crop_crops_to_input_2_from_offset_crop_where_it_fits(crop, like_size):
    x = rand(7, 8, 3, 2)
    dag = crop_net(crop)
    dag.eval({"x": x, "like": np.zeros(like_size + (1, 2), np.float32)})
    # getAdaptedCrops: top = dv - max(0, dv - crop(1)) = min(crop(1), dv), likewise left
    top, left = min(crop[0], 7 - like_size[0]), min(crop[1], 8 - like_size[1])
    np.testing.assert_array_equal(dag.vars["y"].value, x[top:top + like_size[0], left:left + like_size[1]])
    dzdy = rand(*like_size, 3, 2)
    dag.eval({"x": x, "like": np.zeros(like_size + (1, 2), np.float32)}, {"y": dzdy})
    expected = np.zeros_like(x)
    expected[top:top + like_size[0], left:left + like_size[1]] = dzdy
    np.testing.assert_array_equal(dag.vars["x"].der, expected)
    assert dag.vars["like"].der is None or not np.any(dag.vars["like"].der)  # only its size is used


def test_dagnn_crop_to_a_larger_input_is_a_one_line_error_naming_the_layer():
    dag = crop_net([0, 0])
    with pytest.raises(ValueError) as e:
        dag.eval({"x": rand(4, 4, 1, 1), "like": rand(5, 3, 1, 1)})
    assert "layer 'crop'" in str(e.value) and "smaller than input 2 (5 x 3)" in str(e.value)
    assert "\n" not in str(e.value)


def scale_net(has_bias=True, multipliers_as_input=False):
    dag = DagNN()
    inputs, params = (["x", "m"], ["b"] if has_bias else []) if multipliers_as_input else \
        (["x"], ["w", "b"] if has_bias else ["w"])
    dag.add_layer("scale", "dagnn.Scale", inputs, "y", params, block={"size": [1, 1, 3], "hasBias": has_bias})
    return dag


@pytest.mark.parametrize("w_shape, b_shape", [((1, 1, 3), (1, 1, 3)), ((5, 4, 3), (1, 1)), ((1, 1), (5, 1)),
                                              ((1, 4, 1, 2), (5, 4, 3, 2))])
def test_dagnn_scale_is_bsxfun_and_its_parameter_derivatives_sum_over_the_broadcast(w_shape, b_shape):
    x, w, b = rand(5, 4, 3, 2), rand(*w_shape), rand(*b_shape)
    dag = scale_net()
    dag.params["w"].value, dag.params["b"].value = w, b
    dzdy = rand(5, 4, 3, 2)
    dag.eval({"x": x}, {"y": dzdy})

    def matlab(a):  # MATLAB pads a shape with trailing 1s; numpy broadcasts from the right, so pad explicitly
        return a.reshape(a.shape + (1,) * (4 - a.ndim))

    np.testing.assert_allclose(dag.vars["y"].value, x * matlab(w) + matlab(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dag.vars["x"].der, dzdy * matlab(w), rtol=1e-6, atol=1e-6)
    # the derivative of each parameter summed over the dimensions it is broadcast along (Scale.backward's
    # rule for w; for b MATLAB sums over w's singleton dimensions instead -- the same when b is shaped as
    # w, as in the first case; a deliberate difference otherwise, see dagnn._Scale)
    w_sum = tuple(k for k in range(4) if matlab(w).shape[k] == 1)
    b_sum = tuple(k for k in range(4) if matlab(b).shape[k] == 1)
    np.testing.assert_allclose(dag.params["w"].der, (dzdy * x).sum(axis=w_sum, keepdims=True).reshape(w_shape),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dag.params["b"].der, dzdy.sum(axis=b_sum, keepdims=True).reshape(b_shape),
                               rtol=1e-5, atol=1e-5)


def test_dagnn_scale_takes_its_multipliers_as_an_input_or_no_bias():
    x, m, b = rand(5, 4, 3, 2), rand(1, 1, 3), rand(1, 1, 3)
    dag = scale_net(multipliers_as_input=True)
    dag.params["b"].value = b
    dag.eval({"x": x, "m": m})
    np.testing.assert_allclose(dag.vars["y"].value, x * m[..., None] + b[..., None], rtol=1e-6)
    plain = scale_net(has_bias=False)
    plain.params["w"].value = m
    plain.eval({"x": x})
    np.testing.assert_allclose(plain.vars["y"].value, x * m[..., None], rtol=1e-6)


def test_dagnn_scale_without_enough_arguments_or_with_clashing_shapes_is_refused():
    dag = DagNN()
    dag.add_layer("scale", "dagnn.Scale", ["x"], "y", ["w"], block={"hasBias": True})
    with pytest.raises(MatFormatError, match=r"net.layers\(1\): a dagnn.Scale layer takes x, the multipliers "
                                             r"and the biases .* got 1 inputs and 1 parameters"):
        dag.validate()
    dag = scale_net()
    dag.params["w"].value, dag.params["b"].value = rand(1, 1, 4), rand(1, 1, 3)
    with pytest.raises(ValueError, match="layer 'scale'.*must agree in each dimension"):
        dag.eval({"x": rand(5, 4, 3, 2)})


def test_dagnn_scale_init_params_are_initparams():
    dag = scale_net()
    dag.layers[0]["block"]["size"] = [1, 1, 64]
    dag.init_params(seed=1)
    w, b = dag.params["w"].value, dag.params["b"].value
    assert w.shape == (1, 1, 64) and w.dtype == np.float32
    assert b.shape == (1, 1) and not b.any()  # zeros(size(4), 1): one bias, broadcast by bsxfun
    assert 0.5 < w.std() / np.sqrt(2 / 64) < 1.5  # randn(size) * sqrt(2 / prod(size(1:3)))


def test_crop_and_scale_round_trip_through_a_mat_file_and_show_in_inspect(tmp_path):
    dag = crop_net([1, 1])
    dag.add_layer("scale", "dagnn.Scale", ["y"], "z", ["w", "b"], block={"size": [1, 1, 3], "hasBias": True})
    dag.init_params(seed=0)
    save_net(tmp_path / "net.mat", dag)
    back = load_net(tmp_path / "net.mat")
    assert [layer["type"] for layer in back.layers] == ["dagnn.Crop", "dagnn.Scale"]
    x, like = rand(7, 8, 3, 1), rand(4, 4, 1, 1)
    dag.eval({"x": x, "like": like})
    back.eval({"x": x, "like": like})
    np.testing.assert_array_equal(back.vars["z"].value, dag.vars["z"].value)
    rows = layer_table(back, (7, 8, 3))
    assert [r["type"] for r in rows] == ["crop", "scale"] and rows[1]["params"] == 4


def test_a_bad_crop_property_names_the_field():
    dag = crop_net([-1, 0])
    with pytest.raises(MatFormatError, match=r"net.layers\(1\).block.crop: must be non-negative"):
        dag.validate()


def test_a_scale_parameter_shared_with_a_conv_filter_bank_is_refused():
    dag = DagNN()
    dag.add_layer("conv", "dagnn.Conv", ["x"], "y", ["f"], block={"size": [1, 1, 3, 3], "hasBias": False})
    dag.add_layer("scale", "dagnn.Scale", ["y"], "z", ["f"], block={"hasBias": False})
    dag.params["f"].value = rand(1, 1, 3, 3)
    with pytest.raises(MatFormatError, match=r"net.layers\(2\).params: a dagnn.Scale parameter that is also a filter"):
        dag.validate()


def test_inspect_shows_a_crop_to_the_networks_input():
    """FCN's pattern: upsample, then crop back to the input's size."""
    dag = DagNN()
    dag.add_layer("up", "dagnn.ConvTranspose", ["input"], "up", ["f"], block={"upsample": 2, "hasBias": False})
    dag.add_layer("crop", "dagnn.Crop", ["up", "input"], "out", block={"crop": [1, 1]})
    dag.params["f"].value = rand(4, 4, 3, 3)
    rows = layer_table(dag, (7, 8, 3))
    assert [r["size"] for r in rows] == ["16x18x3", "7x8x3"]
