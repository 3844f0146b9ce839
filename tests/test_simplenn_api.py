"""SimpleNN as a user edits it: vl_simplenn_tidy defaults, copies, edits, to_torch, test mode, old format."""

import copy
import os

import numpy as np
import pytest
import torch

from matconvnet_port.netio import load_net
from matconvnet_port.simplenn import SimpleNN, vl_simplenn, vl_simplenn_tidy

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_data")
EPOCH2 = os.path.join(REF, "train", "net-epoch-2.mat")


@pytest.fixture(scope="module")
def lenet():
    return load_net(EPOCH2)


def batch(seed=0, size=28, n=3):
    rng = np.random.default_rng(seed)
    x = (64 * rng.standard_normal((size, size, 1, n))).astype(np.float32)
    labels = rng.integers(1, 11, size=(1, n)).astype(np.float64)
    return x, labels


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(3, 2, 0, 1)


def test_tidy_fills_matconvnet_defaults():
    tidy = vl_simplenn_tidy(SimpleNN([{"type": "relu"}, {"type": "conv", "weights": [np.ones((1, 1, 2, 3), np.float32),
                                                                                      np.zeros((1, 3), np.float32)]},
                                      {"type": "pool", "pool": 2}, {"type": "dropout"}]))
    relu, conv, pool, dropout = tidy.layers
    assert relu == {"type": "relu", "weights": [], "leak": 0, "name": "layer1", "precious": False}
    assert (conv["pad"], conv["stride"], conv["dilate"], conv["opts"], conv["name"]) == (0, 1, 1, [], "layer2")
    assert pool["method"] == "max" and pool["stride"] == 1 and pool["pad"] == 0
    assert dropout["rate"] == 0.5


def test_hand_written_relu_net_runs():
    x = np.random.default_rng(1).standard_normal((4, 5, 2, 3)).astype(np.float32)
    x[0, 0, 0, 0] = 0
    dzdy = np.ones_like(x)
    res = vl_simplenn(SimpleNN([{"type": "relu"}]), x, dzdy)
    assert np.array_equal(res[-1].x, np.maximum(x, 0))
    assert np.array_equal(res[0].dzdx, (x > 0).astype(np.float32))  # derivative 0 at exactly 0


def test_deepcopy_is_independent(lenet):
    x, labels = batch()
    net = copy.deepcopy(lenet)
    net.layers[-1]["class"] = labels
    before = vl_simplenn(net, x)[-1].x
    other = copy.deepcopy(net)
    other.layers[0]["weights"][0][:] = 0
    other.layers[2]["pad"] = 1
    assert lenet.layers[0]["weights"][0].any() and net.layers[0]["weights"][0].any()
    assert np.array_equal(vl_simplenn(net, x)[-1].x, before)
    assert not np.array_equal(vl_simplenn(other, x)[-1].x, before)


def test_reassigning_layers_drops_the_loss(lenet):
    x, labels = batch()
    net = copy.deepcopy(lenet)
    net.layers[-1]["class"] = labels
    full = vl_simplenn(net, x)
    net.layers = net.layers[:-1]
    scores = vl_simplenn(net, x)
    assert len(scores) == len(full) - 1
    np.testing.assert_array_equal(scores[-1].x, full[-2].x)


def test_to_torch_matches_vl_simplenn(lenet):
    x, labels = batch(2, size=36)
    net = copy.deepcopy(lenet)
    net.layers[-1]["class"] = labels
    res = vl_simplenn(net, x)
    del net.layers[-1]["class"]
    module = net.to_torch()
    with torch.no_grad():
        scores = module(nchw(x))                     # stops before the loss when no labels are passed
        loss = module(nchw(x), torch.from_numpy(labels.reshape(-1)))
    np.testing.assert_allclose(scores.permute(2, 3, 1, 0).numpy(), res[-2].x, rtol=1e-6, atol=1e-6)
    assert scores.shape == (3, 10, 3, 3)
    np.testing.assert_allclose(loss.numpy(), res[-1].x, rtol=1e-6)


def _bnorm_dropout_net(rng):
    g = rng.uniform(0.5, 1.5, (3, 1)).astype(np.float32)
    b = rng.standard_normal((3, 1)).astype(np.float32)
    moments = np.stack([rng.standard_normal(3), rng.uniform(0.5, 2, 3)], axis=1).astype(np.float32)
    return SimpleNN([{"type": "bnorm", "weights": [g, b, moments]}, {"type": "dropout", "rate": 0.5}]), g, b, moments


def test_test_mode_uses_bnorm_moments_and_skips_dropout():
    rng = np.random.default_rng(3)
    net, g, b, moments = _bnorm_dropout_net(rng)
    x = rng.standard_normal((4, 4, 3, 2)).astype(np.float32)
    y = vl_simplenn(net, x, mode="test")[-1].x
    expected = g.reshape(1, 1, 3, 1) * (x - moments[:, 0].reshape(1, 1, 3, 1)) / moments[:, 1].reshape(1, 1, 3, 1) \
        + b.reshape(1, 1, 3, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    res = vl_simplenn(net, x, mode="normal")
    normalised = res[1].x
    np.testing.assert_allclose(normalised.mean(axis=(0, 1, 3)), b.reshape(-1), atol=1e-5)  # batch statistics
    dropped = res[2].x
    assert ((dropped == 0) | np.isclose(dropped, 2 * normalised)).all() and (dropped == 0).any()


def test_old_format_net_is_upgraded_and_runs(lenet):
    legacy = load_net(os.path.join(REF, "train", "net-epoch-2-legacy-beta16.mat"))
    x, _ = batch(4)
    prob = vl_simplenn(legacy, x)[-1].x
    scores = vl_simplenn(SimpleNN(lenet.layers[:-1], lenet.meta), x)[-1].x
    expected = np.exp(scores - scores.max(axis=2, keepdims=True))
    expected /= expected.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(prob, expected, rtol=1e-5, atol=1e-7)


def test_tidy_upgrades_a_hand_written_old_format_dict():
    f = np.ones((1, 1, 1, 2), np.float32)
    old = {"layers": [{"type": "conv", "filters": f, "biases": np.zeros((1, 2), np.float32)}],
           "classes": {"name": ["a", "b"]}, "normalization": {"imageSize": [8, 8, 1]}}
    tidy = vl_simplenn_tidy(old)
    assert "filters" not in tidy.layers[0] and tidy.layers[0]["weights"][0] is not f
    assert np.array_equal(tidy.layers[0]["weights"][0], f)
    assert tidy.meta["classes"]["name"] == ["a", "b"] and "normalization" in tidy.meta


def test_weights_written_back_are_copies_not_views_of_the_module():
    """load_torch_weights must not alias the live parameters: training on would change the net."""
    import torch
    from matconvnet_port import cnn_mnist_init
    net = cnn_mnist_init()
    module = net.to_torch()
    net.load_torch_weights(module)
    before = [w.copy() for layer in net.layers for w in layer.get("weights", [])]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    after = [w for layer in net.layers for w in layer.get("weights", [])]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_relu_with_a_negative_leak_is_a_plain_relu():
    """vl_simplenn passes 'leak' only when l.leak > 0."""
    x = np.array([[-1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(vl_simplenn(SimpleNN([{"type": "relu", "leak": -0.1}]), x)[-1].x.ravel(), [0, 2])
    np.testing.assert_allclose(vl_simplenn(SimpleNN([{"type": "relu", "leak": 0.1}]), x)[-1].x.ravel(), [-0.1, 2])


def test_loss_layer_is_softmaxlog_whatever_it_holds_as_vl_simplenn_calls_it():
    """vl_simplenn calls vl_nnloss(x, l.class): a layer's 'loss' or 'opts' never reach it."""
    from matconvnet_port import vl_nnloss
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 3)).astype(np.float32)
    c = np.array([[1.0, 3.0, 5.0]])
    plain = vl_simplenn(SimpleNN([{"type": "loss", "class": c}]), x)[-1].x
    np.testing.assert_allclose(plain, vl_nnloss(x, c), rtol=1e-6)
    with pytest.warns(UserWarning, match="ignores a loss layer's 'loss'"):
        other = vl_simplenn(SimpleNN([{"type": "loss", "class": c, "loss": "classerror"}]), x)[-1].x
    np.testing.assert_array_equal(other, plain)


def test_an_error_while_running_names_the_layer():
    net = SimpleNN([{"type": "relu"}, {"type": "conv", "name": "c2",
                                       "weights": [np.ones((3, 3, 5, 2), np.float32), np.zeros((1, 2), np.float32)]}])
    with pytest.raises(ValueError) as exc:
        vl_simplenn(net, np.zeros((8, 8, 3, 1), np.float32))
    assert str(exc.value).startswith("layer 2 (conv 'c2'): x has 3 channels") and "\n" not in str(exc.value)


def test_bnorm_moments_of_any_2c_shape_read_as_vl_nnbnorm_reads_them():
    """SimpleNN, DagNN.from_simplenn and vl_nnbnorm agree on 1 x 2C moments (column-major: means first)."""
    from matconvnet_port import vl_nnbnorm
    from matconvnet_port.dagnn import DagNN
    x = np.random.default_rng(1).standard_normal((4, 5, 2, 3)).astype(np.float32)
    g, b = np.array([[1.0, 2.0]], np.float32), np.array([[0.5, -1.0]], np.float32)
    m = np.array([[0.5, -1.0, 1.0, 2.0]], np.float32)  # 1 x 2C: means 0.5, -1; sigmas 1, 2
    net = SimpleNN([{"type": "bnorm", "weights": [g, b, m]}])
    expected = vl_nnbnorm(x, g, b, moments=m)[0]
    np.testing.assert_allclose(vl_simplenn(net, x, mode="test")[-1].x, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose((x[:, :, 1] + 1.0) / 2.0 * 2.0 - 1.0, expected[:, :, 1], rtol=1e-5, atol=1e-5)
    dag = DagNN.from_simplenn(net)
    dag.eval({"input": x}, mode="test")
    np.testing.assert_allclose(dag.vars[dag.layers[-1]["outputs"][0]].value, expected, rtol=1e-6, atol=1e-6)
    res = vl_simplenn(net, x, np.ones_like(x))
    assert res[0].dzdw[2].shape == m.shape  # the moments' update in their own shape, column-major
    batch = vl_nnbnorm(x, g, b, epsilon=1e-5)[1] * x.shape[3]
    np.testing.assert_allclose(res[0].dzdw[2], batch.reshape(-1, order="F").reshape(m.shape, order="F"), rtol=1e-5)


def test_from_simplenn_computes_what_vl_simplenn_computes_for_loss_and_leak():
    from matconvnet_port.dagnn import DagNN
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 3)).astype(np.float32)
    c = np.array([[1.0, 3.0, 5.0]])
    with pytest.warns(UserWarning):
        net = SimpleNN([{"type": "relu", "leak": -0.5}, {"type": "loss", "class": c, "loss": "classerror"}])
        simple = vl_simplenn(net, x)[-1].x
    dag = DagNN.from_simplenn(net)
    dag.eval({"input": x, "label": c})
    np.testing.assert_allclose(dag.vars[dag.layers[-1]["outputs"][0]].value.reshape(()), simple, rtol=1e-6)


def test_matlab_switches_are_accepted_and_change_nothing(lenet):
    """conserveMemory / sync / cudnn in a ported vl_simplenn call: the same numbers, every res kept."""
    x, labels = batch(3)
    net = copy.deepcopy(lenet)
    net.layers[-1]["class"] = labels
    plain = vl_simplenn(net, x, np.float32(1))
    switched = vl_simplenn(net, x, np.float32(1), conserve_memory=True, sync=True, cudnn=False)
    for a, b in zip(plain, switched):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.dzdx, b.dzdx)
    with pytest.raises(TypeError):
        vl_simplenn(net, x, back_prop_depth=2)  # not implemented: refused, not ignored
