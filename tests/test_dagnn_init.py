"""DagNN.init_params: MatConvNet's initParams (Conv, ConvTranspose, BatchNorm), with torch's generator.

MATLAB's randn stream cannot be reproduced, so the random values are checked
for their distribution and scale (``randn * sqrt(2 / fan-in)``), the
deterministic ones exactly, and the net for running and saving afterwards.
"""

import os

import numpy as np
import pytest
import torch

from matconvnet_port.dagnn import DagNN
from matconvnet_port.netio import load_net, save_net

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_data")


def small_net() -> DagNN:
    """conv (bias) -> bnorm -> relu -> pool -> convt (bias) -> conv (no bias) -> loss."""
    dag = DagNN()
    dag.add_layer("conv1", "dagnn.Conv", "input", "x1", ["c1f", "c1b"], {"size": [3, 3, 3, 8], "pad": 1})
    dag.add_layer("bn1", "dagnn.BatchNorm", "x1", "x2", ["bn1m", "bn1b", "bn1x"], {"numChannels": 8})
    dag.add_layer("relu1", "dagnn.ReLU", "x2", "x3")
    dag.add_layer("pool1", "dagnn.Pooling", "x3", "x4", [], {"poolSize": [2, 2], "stride": 2})
    dag.add_layer("up", "dagnn.ConvTranspose", "x4", "x5", ["upf", "upb"], {"size": [4, 4, 6, 8], "upsample": 2,
                                                                          "crop": [1, 1, 1, 1]})
    dag.add_layer("score", "dagnn.Conv", "x5", "prediction", ["sf"], {"size": [1, 1, 6, 5], "hasBias": False})
    dag.add_layer("loss", "dagnn.Loss", ["prediction", "label"], "objective")
    return dag


def values(dag: DagNN) -> dict:
    return {name: np.array(p.value, copy=True) for name, p in dag.params.items()}


# ---------------------------------------------------------------------------
# Shapes, dtypes, deterministic values
# ---------------------------------------------------------------------------

def test_every_param_gets_matconvnets_shape_and_single():
    dag = small_net()
    dag.init_params()
    shapes = {name: p.value.shape for name, p in dag.params.items()}
    assert shapes == {"c1f": (3, 3, 3, 8), "c1b": (8, 1),           # randn(size), zeros(size(4), 1)
                      "bn1m": (8, 1), "bn1b": (8, 1), "bn1x": (8, 2),  # numChannels x 1, x 1, x 2
                      "upf": (4, 4, 6, 8), "upb": (6, 1),            # convt: zeros(size(3), 1)
                      "sf": (1, 1, 6, 5)}
    assert all(p.value.dtype == np.float32 for p in dag.params.values())
    # ReLU, Pooling and Loss have no parameters and gained none
    for layer in dag.layers:
        if layer["type"] in ("dagnn.ReLU", "dagnn.Pooling", "dagnn.Loss"):
            assert layer["params"] == []
    assert list(dag.params) == ["c1f", "c1b", "bn1m", "bn1b", "bn1x", "upf", "upb", "sf"]


def test_biases_and_batch_norm_values():
    dag = small_net()
    dag.init_params(seed=3)
    assert not dag.params["c1b"].value.any() and not dag.params["upb"].value.any()
    assert (dag.params["bn1m"].value == 1).all()
    assert not dag.params["bn1b"].value.any() and not dag.params["bn1x"].value.any()
    for name in ("c1f", "upf", "sf"):  # filters are random, not zeros or ones
        assert len(np.unique(dag.params[name].value)) == dag.params[name].value.size


def test_only_values_change():
    """initParams assigns .value; learning rates, weight decays, trainMethod and der stay."""
    dag = small_net()
    dag.params["c1f"].learningRate, dag.params["c1f"].weightDecay = 0.5, 0.0
    dag.params["c1f"].der = np.ones((3, 3, 3, 8), np.float32)
    dag.init_params()
    assert (dag.params["c1f"].learningRate, dag.params["c1f"].weightDecay) == (0.5, 0.0)
    assert (dag.params["c1f"].der == 1).all()
    assert dag.params["bn1x"].learningRate == 0.1  # set by add_layer, as dagnn.BatchNorm.attach does
    assert dag.params["bn1x"].extra["trainMethod"] == "average"


def test_trailing_singletons_dropped_as_in_matlab():
    """size [3 3] is [3 3 1 1] (set.size); MATLAB's randn([3 3 1 1]) is 3 x 3, its bias 1 x 1."""
    dag = DagNN()
    dag.add_layer("c", "dagnn.Conv", "input", "y", ["f", "b"], {"size": [3, 3]})
    dag.add_layer("d", "dagnn.Conv", "y", "z", ["g"], {"size": np.array([[1.0, 1.0, 7.0, 1.0]]), "hasBias": False})
    dag.init_params()
    assert dag.params["f"].value.shape == (3, 3) and dag.params["b"].value.shape == (1, 1)
    assert dag.params["g"].value.shape == (1, 1, 7)


# ---------------------------------------------------------------------------
# Distribution and scale
# ---------------------------------------------------------------------------

def check_he_normal(w: np.ndarray, fan_in: int):
    """Zero-mean normal with std sqrt(2 / fan_in), to tolerances of about 5 standard errors."""
    n, sigma = w.size, np.sqrt(2.0 / fan_in)
    x = w.astype(np.float64).reshape(-1)
    assert abs(x.mean()) < 5 * sigma / np.sqrt(n)
    assert abs(x.std() / sigma - 1) < 5 / np.sqrt(2 * n)
    # normal, not e.g. uniform with that std (which has 57.7% within one std)
    within = np.mean(np.abs(x) < sigma)
    assert abs(within - 0.682689) < 5 * np.sqrt(0.68 * 0.32 / n)


def test_conv_filters_scale_with_fan_in_h_w_cin():
    dag = DagNN()
    dag.add_layer("c", "dagnn.Conv", "input", "y", ["f", "b"], {"size": [5, 5, 20, 500]})
    dag.init_params(seed=7)
    check_he_normal(dag.params["f"].value, 5 * 5 * 20)


def test_convt_filters_scale_with_fan_in_h_w_size4():
    """ConvTranspose's size is [FH FW K C]: MatConvNet scales by prod(size([1 2 4]))."""
    dag = DagNN()
    dag.add_layer("t", "dagnn.ConvTranspose", "input", "y", ["f", "b"], {"size": [5, 5, 500, 20]})
    dag.init_params(seed=7)
    check_he_normal(dag.params["f"].value, 5 * 5 * 20)
    assert dag.params["b"].value.shape == (500, 1)


def test_values_are_torch_draws_in_column_major_order():
    """The documented stream: torch.randn from the generator, element k of MATLAB's linear order
    being draw k; layers draw one after another, in list order."""
    dag = small_net()
    dag.init_params(seed=11)
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(n, generator=g).numpy() for n in (3 * 3 * 3 * 8, 4 * 4 * 6 * 8, 1 * 1 * 6 * 5)]
    np.testing.assert_array_equal(dag.params["c1f"].value.reshape(-1, order="F"),
                                  draws[0] * np.float32(np.sqrt(2 / 27)))
    np.testing.assert_array_equal(dag.params["upf"].value.reshape(-1, order="F"),
                                  draws[1] * np.float32(np.sqrt(2 / 128)))
    np.testing.assert_array_equal(dag.params["sf"].value.reshape(-1, order="F"),
                                  draws[2] * np.float32(np.sqrt(2 / 6)))


# ---------------------------------------------------------------------------
# Seeds and generators
# ---------------------------------------------------------------------------

def test_same_seed_same_values_other_seed_other_values():
    a, b, c = small_net(), small_net(), small_net()
    a.init_params(seed=5)
    b.init_params(seed=5)
    c.init_params(seed=6)
    va, vb, vc = values(a), values(b), values(c)
    for name in va:
        np.testing.assert_array_equal(va[name], vb[name])
    for name in ("c1f", "upf", "sf"):
        assert not np.array_equal(va[name], vc[name])
    a.init_params(seed=5)  # again on the same net: the same values
    for name, value in values(a).items():
        np.testing.assert_array_equal(value, va[name])


def test_generator_argument_is_used_and_advanced():
    a, b = small_net(), small_net()
    a.init_params(seed=9)
    g = torch.Generator().manual_seed(9)
    b.init_params(seed=123, generator=g)  # the generator wins over the seed
    for name, value in values(a).items():
        np.testing.assert_array_equal(value, b.params[name].value)
    b.init_params(generator=g)  # the stream went on: new values
    assert not np.array_equal(a.params["c1f"].value, b.params["c1f"].value)


# ---------------------------------------------------------------------------
# MATLAB's assignment (deal) and shared parameters
# ---------------------------------------------------------------------------

def test_single_value_goes_to_every_param_as_deal_does():
    """Conv with hasBias false and two params: deal(filters) copies the filters into both."""
    dag = DagNN()
    dag.add_layer("c", "dagnn.Conv", "input", "y", ["f", "b"], {"size": [3, 3, 2, 4], "hasBias": False})
    dag.init_params()
    f, b = dag.params["f"].value, dag.params["b"].value
    assert f.shape == (3, 3, 2, 4) and np.array_equal(f, b)
    assert not np.shares_memory(f, b)
    y = dag.to_torch()(input=torch.randn(1, 2, 5, 5))  # the bias is not used: the layer runs
    assert y.shape == (1, 4, 3, 3)


def test_shared_param_keeps_the_later_layers_value():
    dag = DagNN()
    dag.add_layer("a", "dagnn.Conv", "input", "y", ["w"], {"size": [3, 3, 2, 2], "hasBias": False})
    dag.add_layer("b", "dagnn.Conv", "y", "z", ["w"], {"size": [3, 3, 2, 2], "hasBias": False})
    dag.init_params(seed=2)
    g = torch.Generator().manual_seed(2)
    first, second = (torch.randn(36, generator=g).numpy() for _ in range(2))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(dag.params["w"].value.reshape(-1, order="F"),
                                  second * np.float32(np.sqrt(2 / 18)))


def test_blocks_without_params_leave_params_alone():
    dag = DagNN()
    dag.add_layer("r", "dagnn.ReLU", "input", "y")
    dag.add_layer("s", "dagnn.Sum", ["y", "input"], "z")
    before = repr(dag.params), [dict(layer) for layer in dag.layers]
    dag.init_params()
    assert (repr(dag.params), [dict(layer) for layer in dag.layers]) == before


# ---------------------------------------------------------------------------
# The net after init: runs, saves, loads
# ---------------------------------------------------------------------------

def test_initialised_net_runs_forward_and_backward():
    dag = small_net()
    dag.init_params()
    dag.validate()
    x = np.random.default_rng(0).standard_normal((8, 8, 3, 2)).astype(np.float32)
    label = np.random.default_rng(1).integers(1, 6, (8, 8, 1, 2)).astype(np.float32)
    dag.eval({"input": x, "label": label}, {"objective": 1})
    assert dag.vars["prediction"].value.shape == (8, 8, 5, 2)
    assert np.isfinite(dag.vars["objective"].value).all()
    assert dag.params["c1f"].der.shape == (3, 3, 3, 8) and np.abs(dag.params["c1f"].der).sum() > 0
    module = dag.to_torch()  # training mode: batch moments (the initial moments are zeros: sigma 0)
    with torch.no_grad():
        scores = module(input=torch.from_numpy(x).permute(3, 2, 0, 1))
    assert scores.shape == (2, 5, 8, 8) and torch.isfinite(scores).all()


def test_convt_with_groups_gets_k_times_groups_biases_and_runs():
    dag = DagNN()
    dag.add_layer("t", "dagnn.ConvTranspose", "input", "y", ["f", "b"], {"size": [3, 3, 4, 6], "numGroups": 2})
    dag.init_params()
    assert dag.params["b"].value.shape == (8, 1)
    dag.validate()
    dag.eval({"input": np.ones((5, 5, 6, 1), np.float32)})
    assert dag.vars["y"].value.shape == (7, 7, 8, 1)


def test_saveobj_loadobj_and_mat_file_round_trip(tmp_path):
    dag = small_net()
    dag.init_params(seed=4)
    again = DagNN.loadobj(dag.saveobj())
    path = tmp_path / "init.mat"
    save_net(path, dag)
    from_file = load_net(path)
    for name, param in dag.params.items():
        for other in (again, from_file):
            assert other.params[name].value.shape == param.value.shape
            assert other.params[name].value.dtype == np.float32
            assert other.params[name].value.tobytes() == param.value.tobytes()


def test_filters_of_a_matconvnet_net_keep_their_shapes():
    """Re-initialising MatConvNet's LeNet gives filters shaped as MATLAB stored them."""
    dag = load_net(os.path.join(REF, "dagnn_lenet.mat"))
    stored = {name: p.value.shape for name, p in dag.params.items()}
    dag.init_params()
    for name, p in dag.params.items():
        if name.endswith("f"):
            assert p.value.shape == stored[name]
        else:  # fromSimpleNN kept SimpleNN's 1 x K biases; initParams makes K x 1 zeros
            assert p.value.shape == stored[name][::-1] and not p.value.any()


# ---------------------------------------------------------------------------
# Errors: one line, naming the layer; the net unchanged
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, block, params, message", [
    ("dagnn.Conv", {}, ["f", "b"], r"layer 'bad': block.size must be \[FH FW FC K\] .*got \[0 0 0 0\] \(not set\)"),
    ("dagnn.Conv", {"size": [3, 3, 0, 4]}, ["f", "b"], r"layer 'bad': block.size .*got \[3 3 0 4\]$"),
    ("dagnn.Conv", {"size": [3, 3, 2.5, 4]}, ["f", "b"], r"layer 'bad': block.size .*got \[3 3 2.5 4\]"),
    ("dagnn.Conv", {"size": [3, 3, 2, 4, 2]}, ["f", "b"], r"layer 'bad': block.size .*got \[3 3 2 4 2\]"),
    ("dagnn.Conv", {"size": "3x3"}, ["f", "b"], r"layer 'bad': block.size: expected"),
    ("dagnn.Conv", {"size": [3, 3, 2, 4], "hasBias": [1, 0]}, ["f", "b"], r"layer 'bad': block.hasBias"),
    ("dagnn.ConvTranspose", {}, ["f", "b"], r"layer 'bad': block.size must be \[FH FW K C\]"),
    ("dagnn.ConvTranspose", {"size": [3, 3, 2, 4], "numGroups": 0}, ["f", "b"], r"layer 'bad': block.numGroups"),
    ("dagnn.BatchNorm", {}, ["m", "b", "x"], r"layer 'bad': block.numChannels must be .*got \[\] \(not set\)"),
    ("dagnn.BatchNorm", {"numChannels": [2, 3]}, ["m", "b", "x"], r"layer 'bad': block.numChannels .*got \[2 3\]"),
    ("dagnn.Conv", {"size": [3, 3, 2, 4]}, ["f"],
     r"layer 'bad': its dagnn.Conv block initialises 2 parameters, the layer has 1 \('f'\)"),
    ("dagnn.BatchNorm", {"numChannels": 4}, ["m", "b"],
     r"layer 'bad': its dagnn.BatchNorm block initialises 3 parameters, the layer has 2 \('m', 'b'\)"),
    ("dagnn.ReLU", {}, ["w"], r"layer 'bad': its dagnn.ReLU block initialises 0 parameters, the layer has 1"),
])
def test_errors_name_the_layer_and_change_nothing(kind, block, params, message):
    dag = DagNN()
    dag.add_layer("good", "dagnn.Conv", "input", "y", ["gf", "gb"], {"size": [3, 3, 1, 2]})
    dag.add_layer("bad", kind, "y", "z", params, block)
    before = values(dag)
    with pytest.raises(ValueError, match=message) as info:
        dag.init_params()
    assert "\n" not in str(info.value)
    after = values(dag)  # the good layer before the bad one was not assigned either
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and after[k].size == 0 for k in after)
