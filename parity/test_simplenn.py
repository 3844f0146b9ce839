"""vl_simplenn on the MNIST LeNet against MatConvNet (reference_data/lenet.mat).

The net is read with ``netio.load_net`` (the ``net`` variable) and arranged
for each of the 16 ReLU placements exactly as the reference did: conv1
[relu] pool conv2 [relu] pool conv3 [relu] conv4 [relu] softmaxloss,
tidied, labels in ``layers[-1]['class']``, ``res = vl_simplenn(net, x, 1)``.
Pins, for 28x28 inputs (1x1 score map) and 36x36 inputs (3x3 score map,
loss summed over positions and divided by N): the loss, the scores, the
input derivative and every stored filter/bias derivative; and, for the stock
placement, every ``res(i).x``, ``res(i).dzdx``, ``res(i).dzdw``.
"""

import os

import numpy as np
import pytest

from matconvnet_port.netio import load_net
from matconvnet_port.simplenn import SimpleNN, vl_simplenn, vl_simplenn_tidy
from refdata import DEVICES, REFERENCE_DIR, check, load, text, to_device

REF = load("lenet.mat")
MASKS = [tuple(int(b) for b in row) for row in REF["masks"]]
SIZES = [0, 1]  # cases{1}: 28x28, cases{2}: 36x36


@pytest.fixture(scope="module")
def lenet():
    return load_net(os.path.join(REFERENCE_DIR, "lenet.mat"))


def arrange(net: SimpleNN, mask, labels) -> SimpleNN:
    """conv1 [relu] pool conv2 [relu] pool conv3 [relu] conv4 [relu] softmaxloss, as the reference built it."""
    convs = [dict(layer) for layer in net.layers if layer["type"] == "conv"]
    pools = [dict(layer) for layer in net.layers if layer["type"] == "pool"]
    layers = []
    for i, conv in enumerate(convs):
        layers.append(conv)
        if mask[i]:
            layers.append({"type": "relu"})
        if i < 2:
            layers.append(pools[i])
    layers.append({"type": "softmaxloss"})
    for layer in layers:
        layer.pop("name", None)  # the reference named layers by position (vl_simplenn_tidy)
    tidy = vl_simplenn_tidy(SimpleNN(layers, net.meta))
    tidy.layers[-1]["class"] = labels
    return tidy


def _case(k):
    return REF["cases"][0, k][0, 0]


@pytest.mark.parametrize("size", SIZES, ids=["28x28", "36x36"])
@pytest.mark.parametrize("m", range(16), ids=["".join(map(str, mask)) for mask in MASKS])
def test_vl_simplenn_relu_placement_matches_matconvnet(lenet, size, m):
    case = _case(size)
    run = case.runs[0, m][0, 0]
    mask = MASKS[m]
    assert tuple(int(b) for b in run.mask.reshape(-1)) == mask
    net = arrange(lenet, mask, case.labels)
    assert [layer["type"] for layer in net.layers] == [text(t) for t in run.layer_types[0]]
    name = f"{int(case.input_size[0, 0])}px mask {''.join(map(str, mask))}"

    res = vl_simplenn(net, case.x, 1.0)

    check(name, "loss", res[-1].x, run.loss)
    check(name, "prediction", res[-2].x, run.prediction)
    check(name, "dzdx_input", res[0].dzdx, run.dzdx_input)
    conv_index = [int(k) - 1 for k in run.conv_layer_index.reshape(-1)]
    assert [net.layers[k]["type"] for k in conv_index] == ["conv"] * 4
    for i, k in enumerate(conv_index):
        ref_df, ref_db = run.dzdw_conv[0, i][0, 0], run.dzdw_conv[0, i][0, 1]
        kept = ref_df.shape[3]  # conv2/conv3: only the first 5 filters are stored
        check(name, f"dzdf conv{i + 1}", res[k].dzdw[0][:, :, :, :kept], ref_df)
        check(name, f"dzdb conv{i + 1}", res[k].dzdw[1], ref_db)


@pytest.mark.parametrize("device", DEVICES)
def test_vl_simplenn_full_res_matches_matconvnet(lenet, device):
    case = _case(0)
    full = case.full_run[0, 0]
    mask = tuple(int(b) for b in full.mask.reshape(-1))
    assert mask == (0, 0, 1, 0)
    net = arrange(lenet, mask, case.labels)
    res = vl_simplenn(net, to_device(case.x, device), 1.0)
    assert len(res) == full.x.shape[1] == len(net.layers) + 1
    for i in range(len(res)):
        name = f"full_run {device} res({i + 1})"
        check(name, "x", res[i].x, full.x[0, i])
        check(name, "dzdx", res[i].dzdx, full.dzdx[0, i])
        ref_dzdw = full.dzdw[0, i]
        if ref_dzdw.size == 0:
            assert res[i].dzdw is None, f"{name}: a weightless layer got dzdw"
            continue
        assert len(res[i].dzdw) == ref_dzdw.shape[1]
        for j in range(ref_dzdw.shape[1]):
            check(name, f"dzdw{{{j + 1}}}", res[i].dzdw[j], ref_dzdw[0, j])


def test_loaded_weights_are_the_reference_weights(lenet):
    ref_layers = [REF["net"][0, 0].layers[0, i][0, 0] for i in range(REF["net"][0, 0].layers.shape[1])]
    for layer, ref in zip(lenet.layers, ref_layers):
        if text(ref.type) == "conv":
            assert np.array_equal(layer["weights"][0], ref.weights[0, 0])
            assert np.array_equal(layer["weights"][1], ref.weights[0, 1])
