"""DagNN: evaluation order, errors, blocks, to_torch, saveobj/loadobj and fromSimpleNN."""

import os

import numpy as np
import pytest
import torch

from matconvnet_port.dagnn import DagNN
from matconvnet_port.errors import MatFormatError
from matconvnet_port.netio import load_net
from matconvnet_port.simplenn import SimpleNN, vl_simplenn

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_data")
RNG = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def relu_block():
    return {"leak": 0}


# ---------------------------------------------------------------------------
# Order and errors
# ---------------------------------------------------------------------------

def test_order_follows_dependencies_not_list_order():
    dag = DagNN()
    dag.add_layer("sum", "dagnn.Sum", ["a", "b"], "c")
    dag.add_layer("left", "dagnn.ReLU", "a0", "a")
    dag.add_layer("right", "dagnn.Sigmoid", "input", "b")
    dag.add_layer("first", "dagnn.ReLU", "input", "a0")
    names = [dag.layers[i]["name"] for i in dag.execution_order()]
    assert names.index("first") < names.index("left") < names.index("sum")
    assert names.index("right") < names.index("sum")
    # MatConvNet's rebuild: by decreasing height (longest path to an output), ties in list order
    assert names == ["first", "left", "right", "sum"]


def test_order_of_a_chain_is_the_chain():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    assert dag.execution_order() == list(range(8))


def test_cycle_is_an_error_naming_a_layer():
    dag = DagNN()
    dag.add_layer("one", "dagnn.ReLU", "input", "a")
    dag.add_layer("two", "dagnn.Sum", ["a", "c"], "b")
    dag.add_layer("three", "dagnn.ReLU", "b", "c")
    with pytest.raises(ValueError, match="cycle through layer '(two|three)'"):
        dag.execution_order()
    with pytest.raises(ValueError, match="cycle"):
        dag.eval({"input": randn(2, 2, 1, 1)})


def test_self_loop_and_duplicate_writer_are_errors():
    dag = DagNN()
    dag.add_layer("loop", "dagnn.ReLU", "a", "a")
    with pytest.raises(ValueError, match="cycle through layer 'loop'"):
        dag.execution_order()
    dag = DagNN()
    dag.add_layer("p", "dagnn.ReLU", "input", "a")
    dag.add_layer("q", "dagnn.Sigmoid", "input", "a")
    with pytest.raises(ValueError, match="'a' is the output of two layers, 'p' and 'q'"):
        dag.execution_order()


def test_missing_input_and_unknown_names():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    with pytest.raises(ValueError, match="layer 'layer1' needs input variable 'input'"):
        dag.eval({"label": np.ones((1, 2))})
    with pytest.raises(ValueError, match="'image' is not a variable"):
        dag.eval({"image": randn(28, 28, 1, 2)})
    with pytest.raises(ValueError, match="unsupported block type 'dagnn.Tanh'"):
        DagNN().add_layer("t", "dagnn.Tanh", "input", "y")
    with pytest.raises(ValueError, match="already a layer"):
        dag.add_layer("layer1", "dagnn.ReLU", "x1", "z")


def test_without_labels_the_loss_is_skipped():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    dag.eval({"input": randn(28, 28, 1, 2, scale=64)})
    assert dag.vars["prediction"].value.shape == (1, 1, 10, 2)
    assert dag.vars["objective"].value is None
    with pytest.raises(ValueError, match="'objective'.*not computed"):
        dag.eval({"input": randn(28, 28, 1, 2)}, {"objective": 1})


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------

def test_sum_and_concat_forward_and_backward():
    dag = DagNN()
    dag.add_layer("r", "dagnn.ReLU", "input", "a", block=relu_block())
    dag.add_layer("s", "dagnn.Sigmoid", "input", "b")
    dag.add_layer("sum", "dagnn.Sum", ["a", "b"], "c")
    dag.add_layer("cat", "dagnn.Concat", ["a", "c"], "d", block={"dim": 3})
    x = randn(3, 4, 2, 2)
    dzdd = randn(3, 4, 4, 2)
    dag.eval({"input": x}, {"d": dzdd})
    a, b = np.maximum(x, 0), 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(dag.vars["c"].value, a + b, rtol=1e-6)
    np.testing.assert_allclose(dag.vars["d"].value, np.concatenate([a, a + b], axis=2), rtol=1e-6)
    np.testing.assert_array_equal(dag.vars["c"].der, dzdd[:, :, 2:])  # Concat splits the derivative
    np.testing.assert_array_equal(dag.vars["b"].der, dzdd[:, :, 2:])  # Sum copies it to every input
    np.testing.assert_allclose(dag.vars["a"].der, dzdd[:, :, :2] + dzdd[:, :, 2:], rtol=1e-6)
    sig = b * (1 - b)
    expected = (x > 0) * dag.vars["a"].der + sig * dzdd[:, :, 2:]
    np.testing.assert_allclose(dag.vars["input"].der, expected, rtol=1e-5, atol=1e-7)


def test_shared_parameter_derivatives_accumulate():
    dag = DagNN()
    dag.add_layer("c1", "dagnn.Conv", "input", "a", ["f", "b"], {"size": [3, 3, 2, 4]})
    dag.add_layer("c2", "dagnn.Conv", "input", "b2", ["f", "b"], {"size": [3, 3, 2, 4]})
    dag.add_layer("sum", "dagnn.Sum", ["a", "b2"], "y")
    dag.params["f"].value, dag.params["b"].value = randn(3, 3, 2, 4), randn(4, 1)
    single = DagNN()
    single.add_layer("c1", "dagnn.Conv", "input", "a", ["f", "b"], {"size": [3, 3, 2, 4]})
    single.params["f"].value, single.params["b"].value = dag.params["f"].value, dag.params["b"].value
    x, dzdy = randn(5, 6, 2, 2), randn(3, 4, 4, 2)
    dag.eval({"input": x}, {"y": dzdy})
    single.eval({"input": x}, {"a": dzdy})
    assert dag.params["b"].der.shape == (4, 1) and dag.params["f"].der.shape == (3, 3, 2, 4)
    np.testing.assert_allclose(dag.params["f"].der, 2 * single.params["f"].der, rtol=1e-5)
    np.testing.assert_allclose(dag.params["b"].der, 2 * single.params["b"].der, rtol=1e-5)


def test_batchnorm_test_mode_uses_moments_and_moment_derivative_is_batch_moments_times_n():
    dag = DagNN()
    dag.add_layer("bn", "dagnn.BatchNorm", "input", "y", ["g", "b", "m"], {"epsilon": 1e-4})
    g, b = np.full((3, 1), 2, np.float32), np.full((3, 1), 0.5, np.float32)
    m = np.array([[1, 2], [0, 1], [-1, 4]], np.float32)
    dag.params["g"].value, dag.params["b"].value, dag.params["m"].value = g, b, m
    x = randn(4, 4, 3, 5)
    dag.eval({"input": x}, {"y": np.ones((4, 4, 3, 5), np.float32)}, mode="test")
    expected = 2 * (x - m[:, 0].reshape(1, 1, 3, 1)) / m[:, 1].reshape(1, 1, 3, 1) + 0.5
    np.testing.assert_allclose(dag.vars["y"].value, expected, rtol=1e-5, atol=1e-6)
    mean = x.mean(axis=(0, 1, 3))
    np.testing.assert_allclose(dag.params["m"].der[:, 0], 5 * mean, rtol=1e-4, atol=1e-5)
    # MatConvNet's backward differentiates the batch-statistics map: sum of dzdx over a channel is 0
    np.testing.assert_allclose(dag.vars["input"].der.sum(axis=(0, 1, 3)), 0, atol=1e-4)


def test_dropout_identity_in_test_mode():
    dag = DagNN()
    dag.add_layer("drop", "dagnn.DropOut", "input", "y", block={"rate": 0.5})
    x = randn(3, 3, 2, 2)
    dag.eval({"input": x}, mode="test")
    np.testing.assert_array_equal(dag.vars["y"].value, x)
    dag.eval({"input": x}, mode="normal")
    y = dag.vars["y"].value
    assert ((y == 0) | np.isclose(y, 2 * x)).all()


# ---------------------------------------------------------------------------
# to_torch, saveobj / loadobj, fromSimpleNN
# ---------------------------------------------------------------------------

def test_to_torch_matches_eval():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    x = randn(36, 36, 1, 2, scale=64)
    labels = np.array([[3.0, 7.0]])
    dag.eval({"input": x, "label": labels})
    module = dag.to_torch()
    xt = torch.from_numpy(x).permute(3, 2, 0, 1)
    with torch.no_grad():
        scores = module(input=xt)
        objective = module(input=xt, label=torch.tensor([3.0, 7.0]))
    np.testing.assert_allclose(scores.permute(2, 3, 1, 0).numpy(), dag.vars["prediction"].value, rtol=1e-6)
    np.testing.assert_allclose(objective.numpy(), dag.vars["objective"].value.reshape(()), rtol=1e-6)
    assert dict(module.named_parameters())["params.layer1f"].shape == (20, 1, 5, 5)
    chosen = dag.to_torch(output="x4")
    assert chosen(input=xt).shape == (2, 50, 6, 6)


def test_saveobj_loadobj_round_trip():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    again = DagNN.loadobj(dag.saveobj())
    assert list(again.vars) == list(dag.vars) and list(again.params) == list(dag.params)
    for name, param in dag.params.items():
        assert again.params[name].value.tobytes() == param.value.tobytes()
    assert [layer["block"].keys() for layer in again.layers] == [layer["block"].keys() for layer in dag.layers]


def test_loadobj_rejects_bad_structs():
    s = load_net(os.path.join(REF, "dagnn_lenet.mat")).saveobj()
    with pytest.raises(MatFormatError, match="no field 'vars'"):
        DagNN.loadobj({k: v for k, v in s.items() if k != "vars"})
    s["layers"][0]["block"]["pad"] = np.array([[1.0, 2.0, 3.0]])
    with pytest.raises(MatFormatError, match=r"net.layers\(1\).block.*pad"):
        DagNN.loadobj(s)


def test_loadobj_without_a_block_is_an_error_not_the_defaults():
    """MatConvNet's loadobj reads every layer's block; defaults here would run 1 x 1 pools silently."""
    s = load_net(os.path.join(REF, "dagnn_lenet.mat")).saveobj()
    del s["layers"][1]["block"]
    with pytest.raises(MatFormatError, match=r"net.layers\(2\): no field 'block'"):
        DagNN.loadobj(s)


def test_from_simplenn_builds_the_saved_dagnn():
    ref = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    ours = DagNN.from_simplenn(load_net(os.path.join(REF, "train", "net-epoch-2.mat")))
    assert list(ours.vars) == list(ref.vars)
    assert [(v.name, v.precious) for v in ours.vars.values()] == [(v.name, v.precious) for v in ref.vars.values()]
    for name, param in ref.params.items():
        mine = ours.params[name]
        assert mine.value.tobytes() == param.value.tobytes() and mine.value.shape == param.value.shape
        assert (mine.learningRate, mine.weightDecay) == (param.learningRate, param.weightDecay)
    for mine, theirs in zip(ours.layers, ref.layers):
        assert {k: mine[k] for k in ("name", "type", "inputs", "outputs", "params")} == \
               {k: theirs[k] for k in ("name", "type", "inputs", "outputs", "params")}
        assert set(mine["block"]) == set(theirs["block"])
        for key, value in theirs["block"].items():
            if isinstance(value, list):
                assert mine["block"][key] == value, key
            else:
                assert np.array_equal(np.asarray(mine["block"][key]), np.asarray(value)), key
    assert ours.meta.keys() == ref.meta.keys()


def _varied_simplenn(rng):
    """conv (asymmetric pad, stride) bnorm leaky-relu avg-pool lrn conv relu conv softmaxloss."""
    w = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    moments = np.stack([rng.standard_normal(6), rng.uniform(0.5, 2, 6)], axis=1).astype(np.float32)
    return SimpleNN([
        {"type": "conv", "weights": [w(3, 3, 2, 6), w(1, 6)], "pad": [1, 0, 2, 1], "stride": [1, 2]},
        {"type": "bnorm", "weights": [1 + w(6, 1), w(6, 1), moments]},
        {"type": "relu", "leak": 0.1},
        {"type": "pool", "method": "avg", "pool": [2, 3], "pad": [1, 0, 1, 1], "stride": 2},
        {"type": "normalize", "param": [3, 1, 0.1, 0.75]},
        {"type": "conv", "weights": [w(2, 2, 6, 8), w(1, 8)], "dilate": 1},
        {"type": "relu"},
        {"type": "conv", "weights": [w(1, 1, 8, 5), w(1, 5)]},
        {"type": "softmaxloss"},
    ])


@pytest.mark.parametrize("mode", ["normal", "test"])
def test_from_simplenn_evaluates_like_vl_simplenn(mode):
    rng = np.random.default_rng(7)
    net = _varied_simplenn(rng)
    x = rng.standard_normal((9, 11, 2, 3)).astype(np.float32)
    labels = rng.integers(1, 6, size=(1, 3)).astype(np.float64)
    net.layers[-1]["class"] = labels
    res = vl_simplenn(net, x, 1.0, mode=mode)
    dag = DagNN.from_simplenn(net)
    assert [layer["type"] for layer in dag.layers][1] == "dagnn.BatchNorm"
    dag.eval({"input": x, "label": labels}, {"objective": 1}, mode=mode)
    np.testing.assert_allclose(dag.vars["objective"].value.reshape(()), res[-1].x, rtol=1e-5)
    np.testing.assert_allclose(dag.vars["prediction"].value, res[-2].x, rtol=1e-5, atol=1e-6)
    if mode == "test":
        return  # MatConvNet's DagNN and SimpleNN differentiate test-mode batch norm differently
    np.testing.assert_allclose(dag.vars["input"].der, res[0].dzdx, rtol=1e-4, atol=1e-6)
    for i, layer in enumerate(dag.layers):
        for j, name in enumerate(layer["params"]):
            np.testing.assert_allclose(dag.params[name].der, res[i].dzdw[j].reshape(dag.params[name].der.shape),
                                       rtol=1e-4, atol=1e-5, err_msg=name)


def test_an_error_while_running_names_the_layer():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    with pytest.raises(ValueError) as exc:
        dag.eval({"input": np.zeros((28, 28, 3, 1), np.float32)})  # 3 channels into a 1-channel conv
    assert str(exc.value).startswith(f"layer '{dag.layers[0]['name']}': ") and "\n" not in str(exc.value)


def _bnorm_dag(moments):
    dag = DagNN()
    dag.add_layer("bn", "dagnn.BatchNorm", "input", "y", ["g", "b", "m"])
    dag.params["g"].value = np.array([1.0, 2.0, 0.5], np.float32)
    dag.params["b"].value = np.array([0.0, 1.0, -1.0], np.float32)
    dag.params["m"].value = moments
    return dag


def test_batchnorm_moments_read_column_major_and_empty_moments_use_the_batch():
    """As vl_nnbnorm: any 2C-element moments, the C means first; none given: the batch's, in test mode too."""
    from matconvnet_port import vl_nnbnorm
    x = randn(4, 5, 3, 2)
    g, b = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, 1.0, -1.0], np.float32)
    m = np.array([[0.5, 1.0], [-1.0, 2.0], [2.0, 4.0]], np.float32)  # C x 2 [mean sigma]
    expected = vl_nnbnorm(x, g, b, moments=m)[0]
    for moments in (m, m.reshape(-1, order="F").reshape(6, 1), m.reshape(-1, order="F")[None, :]):
        dag = _bnorm_dag(moments)
        dag.eval({"input": x}, {"y": np.ones_like(x)}, mode="test")
        np.testing.assert_allclose(dag.vars["y"].value, expected, rtol=1e-6, atol=1e-6)
        assert dag.params["m"].der.shape == moments.shape
        np.testing.assert_allclose(dag.params["m"].der.reshape(-1, order="F"),
                                   (vl_nnbnorm(x, g, b, epsilon=1e-5)[1] * 2).reshape(-1, order="F"), rtol=1e-5)
    dag = _bnorm_dag(np.zeros((0, 0), np.float32))
    dag.eval({"input": x}, mode="test")
    np.testing.assert_allclose(dag.vars["y"].value, vl_nnbnorm(x, g, b, epsilon=1e-5)[0], rtol=1e-6, atol=1e-6)
    dag.params["g"].value = np.zeros((0, 0), np.float32)
    with pytest.raises(ValueError, match="layer 'bn': the multipliers and biases"):
        dag.eval({"input": x})


def test_add_layer_is_strict_about_block_properties_and_sets_batchnorm_moments_as_attach():
    dag = DagNN()
    with pytest.raises(ValueError, match="dagnn.Pooling has no property 'poolsize'"):
        dag.add_layer("p", "dagnn.Pooling", "input", "y", block={"poolsize": [2, 2]})
    dag.add_layer("bn", "dagnn.BatchNorm", "input", "y", ["g", "b", "m"])
    assert dag.params["m"].learningRate == 0.1 and dag.params["m"].extra["trainMethod"] == "average"
    assert dag.params["g"].learningRate == 1.0
    saved = {p["name"]: p for p in dag.saveobj()["params"]}
    assert saved["m"]["trainMethod"] == "average" and saved["g"]["trainMethod"] == "gradient"  # addParam's default


def test_loading_an_unknown_block_property_warns_and_keeps_it():
    s = load_net(os.path.join(REF, "dagnn_lenet.mat")).saveobj()
    s["layers"][1]["block"]["poolsize"] = np.array([[3.0, 3.0]])
    with pytest.warns(UserWarning, match=r"net.layers\(2\).block: dagnn.Pooling property 'poolsize'"):
        dag = DagNN.loadobj(s)
    assert "poolsize" in dag.layers[1]["block"]


def test_eval_takes_matlab_flat_name_value_lists():
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    x, c = randn(28, 28, 1, 2), np.array([3.0, 7.0])
    dag.eval(["input", x, "label", c], ["objective", 1.0])
    flat = (dag.vars["objective"].value.copy(), dag.vars["input"].der.copy())
    dag.eval({"input": x, "label": c}, {"objective": 1.0})
    np.testing.assert_array_equal(flat[0], dag.vars["objective"].value)
    np.testing.assert_array_equal(flat[1], dag.vars["input"].der)
    with pytest.raises(ValueError, match="inputs must be a dict"):
        dag.eval(["input", x, "label"])


def test_a_module_trained_with_torch_writes_its_weights_back():
    """to_torch -> a torch optimiser step -> load_torch_weights: the net's values are the module's
    parameters in MatConvNet layout (filters H x W x C x K, biases as stored), so that eval and
    save_net see the trained network."""
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    shapes = {name: p.value.shape for name, p in dag.params.items()}
    module = dag.to_torch()
    x = torch.randn(4, 1, 28, 28)
    label = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    module(input=x, label=label).sum().backward()
    opt.step()
    dag.load_torch_weights(module)
    for name, p in dag.params.items():
        assert p.value.shape == shapes[name]
        np.testing.assert_array_equal(p.value, module.param_to_matconvnet(name))
    with torch.no_grad():
        ours = module(input=x)
    dag.eval({"input": x.permute(2, 3, 1, 0).numpy()})
    np.testing.assert_allclose(dag.vars["prediction"].value, ours.permute(2, 3, 1, 0).numpy(), rtol=1e-5, atol=1e-6)
    other = DagNN()
    other.add_layer("c", "dagnn.Conv", "input", "y", ["g", "h"], {"size": [1, 1, 1, 1], "hasBias": True})
    other.init_params()
    with pytest.raises(ValueError, match="the module has no parameter 'g'"):
        other.load_torch_weights(module)


def test_remove_and_rename_as_for_deployment():
    """cnn_imagenet_deploy's moves: remove the loss layers, add a softmax, rename things; what no layer
    uses any more goes (rebuild), what stays keeps its values, and the net still evaluates."""
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    x = randn(28, 28, 1, 3, scale=50)
    dag.eval({"input": x}, mode="test")
    before = dag.vars["prediction"].value.copy()
    loss = next(layer["name"] for layer in dag.layers if layer["type"] == "dagnn.Loss")
    dag.remove_layer(loss)
    assert "label" not in dag.vars and "objective" not in dag.vars
    dag.add_layer("prob", "dagnn.SoftMax", "prediction", "prob")
    dag.rename_layer("prob", "softmax")
    first = dag.layers[0]["params"][0]
    dag.rename_param(first, "conv1_filters")
    assert dag.layers[0]["params"][0] == "conv1_filters" and first not in dag.params
    dag.eval({"input": x}, mode="test")
    np.testing.assert_array_equal(dag.vars["prediction"].value, before)
    p = dag.vars["prob"].value
    np.testing.assert_allclose(p.sum(axis=2), 1, rtol=1e-5)
    dag.remove_layer(dag.layers[0]["name"])  # conv1 goes: its parameters with it
    assert "conv1_filters" not in dag.params
    for call, words in ((lambda: dag.remove_layer("nope"), "there is no layer 'nope'"),
                        (lambda: dag.rename_layer("softmax", dag.layers[0]["name"]), "existing layer"),
                        (lambda: dag.rename_param("missing", "x"), "not an existing parameter")):
        with pytest.raises(ValueError, match=words):
            call()


def test_a_conv_with_has_bias_and_one_parameter_or_a_complex_option_is_refused(tmp_path):
    """MatConvNet's Conv.forward reads params{2} unless hasBias is false; float() of a complex stride
    would drop its imaginary part with a mere warning."""
    dag = DagNN()
    dag.add_layer("conv", "dagnn.Conv", ["x"], "y", ["f"], block={"size": [3, 3, 1, 2]})
    dag.params["f"].value = randn(3, 3, 1, 2)
    with pytest.raises(MatFormatError, match=r"net.layers\(1\).params: a dagnn.Conv layer with hasBias true takes 2"):
        dag.validate()
    dag.layers[0]["block"]["hasBias"] = False
    dag.validate()
    dag.layers[0]["block"]["stride"] = np.array([1 + 1j, 1])
    with pytest.raises(MatFormatError, match=r"net.layers\(1\).block.stride: expected real numbers"):
        dag.validate()
