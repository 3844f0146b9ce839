"""netio: loading every reference network, round trips, the on-disk layout, and bad files.

The saved layout is checked with ``scipy.io.loadmat`` independently of our
own reader, so that a file MatConvNet's ``load`` + ``vl_simplenn`` /
``dagnn.DagNN.loadobj`` accept is what we write.
"""

import glob
import os
import shutil
import struct

import h5py
import numpy as np
import pytest
import scipy.io as sio

from matconvnet_port import matio
from matconvnet_port.dagnn import DagNN
from matconvnet_port.errors import MatFormatError
from matconvnet_port.netio import load_checkpoint, load_net, save_checkpoint, save_net
from matconvnet_port.simplenn import SimpleNN, vl_simplenn

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_data")
EPOCH2 = os.path.join(REF, "train", "net-epoch-2.mat")
NETS = (["train/net-init.mat", "train/net-epoch-1.mat", "train/net-epoch-2.mat", "train/net-epoch-2-v73.mat",
         "train/net-epoch-2-legacy-beta16.mat", "dagnn_lenet.mat", "lenet.mat"]
        + sorted(os.path.relpath(p, REF) for p in glob.glob(os.path.join(REF, "train_steps", "*", "net-*.mat"))))
LENET_FILTERS = [(5, 5, 1, 20), (5, 5, 20, 50), (4, 4, 50, 500), (1, 1, 500, 10)]


def ref(name):
    return os.path.join(REF, name)


def conv_weights(net):
    """[(filters, biases)] of the conv layers of a SimpleNN or DagNN."""
    if isinstance(net, DagNN):
        out = []
        for layer in net.layers:
            if layer["type"] == "dagnn.Conv":
                out.append(tuple(net.params[p].value for p in layer["params"]))
        return out
    return [tuple(layer["weights"]) for layer in net.layers if layer["type"] == "conv"]


def assert_identical(a, b, where="net"):
    """Same structure, same keys in the same order, arrays equal bit for bit with dtype and shape."""
    assert type(a) is type(b) or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)), \
        f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, SimpleNN):
        assert_identical(a.layers, b.layers, f"{where}.layers")
        assert_identical(a.meta, b.meta, f"{where}.meta")
    elif isinstance(a, DagNN):
        assert_identical(a.saveobj(), b.saveobj(), where)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: fields {list(a)} vs {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, matio.StructArray):
        assert a.shape == b.shape and a.fieldnames == b.fieldnames, where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}({k + 1})")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} elements"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}{{{k + 1}}}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        if a.dtype == object:
            for k, (x, y) in enumerate(zip(a.reshape(-1), b.reshape(-1))):
                assert_identical(x, y, f"{where}{{{k + 1}}}")
        else:
            assert a.tobytes() == b.tobytes(), f"{where}: values differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NETS)
def test_every_reference_net_loads(name):
    net = load_net(ref(name))
    weights = conv_weights(net)
    assert [f.shape for f, _ in weights] == LENET_FILTERS
    for f, b in weights:
        assert f.dtype == np.float32 and b.dtype == np.float32
        assert b.size == f.shape[3]
    if isinstance(net, SimpleNN):
        assert len(net.layers) == 8
        assert all(isinstance(layer["type"], str) and isinstance(layer.get("name", ""), str) for layer in net.layers)
        assert isinstance(net.meta, dict)
    else:
        assert name == "dagnn_lenet.mat"


@pytest.mark.parametrize("name", ["train/net-epoch-2-v73.mat", "train/net-epoch-2-legacy-beta16.mat",
                                  "dagnn_lenet.mat"])
def test_other_containers_hold_the_epoch2_weights_bit_for_bit(name):
    expected = conv_weights(load_net(EPOCH2))
    got = conv_weights(load_net(ref(name)))
    for (f0, b0), (f1, b1) in zip(expected, got):
        assert f0.tobytes() == f1.tobytes() and f0.shape == f1.shape
        assert b0.tobytes() == b1.tobytes() and b0.size == b1.size


def test_simplenn_fields_are_matconvnets():
    net = load_net(EPOCH2)
    conv, pool, relu, loss = net.layers[0], net.layers[1], net.layers[5], net.layers[7]
    assert conv["type"] == "conv" and conv["name"] == "layer1" and conv["precious"] is False
    assert isinstance(conv["weights"], list) and len(conv["weights"]) == 2
    assert conv["weights"][1].shape == (1, 20)
    assert float(np.asarray(conv["stride"]).reshape(-1)[0]) == 1
    assert np.array_equal(conv["learningRate"], [[1, 1]])
    assert pool["method"] == "max" and np.array_equal(pool["pool"], [[2, 2]]) and pool["weights"] == []
    assert relu["type"] == "relu"
    assert net.layers[6]["precious"] is True  # cnn_train marks the prediction layer precious (stored as double 1)
    assert loss["type"] == "softmaxloss" and loss["class"].shape == (1, 100)
    assert net.meta["classes"]["name"] == [str(k) for k in range(1, 11)]
    assert np.array_equal(net.meta["inputSize"], [[28, 28, 1]])


def test_legacy_beta16_is_upgraded_as_vl_simplenn_tidy_does():
    net = load_net(ref("train/net-epoch-2-legacy-beta16.mat"))
    conv = net.layers[0]
    assert "filters" not in conv and "biases" not in conv and "filtersLearningRate" not in conv
    assert np.array_equal(conv["learningRate"], [[1, 2]]) and np.array_equal(conv["weightDecay"], [[1, 0]])
    assert net.layers[-1] == {"type": "softmax", "name": "prob"}
    assert set(net.meta) == {"classes", "normalization"}
    assert net.meta["normalization"]["averageImage"].shape == (28, 28)
    assert net.meta["classes"]["description"][0] == "digit 0"


def test_checkpoint_state_and_stats():
    net, state, stats = load_checkpoint(EPOCH2)
    assert isinstance(net, SimpleNN)
    solver = state["solverState"]
    assert len(solver) == 8 and [len(s) for s in solver] == [2, 0, 2, 0, 2, 0, 2, 0]
    for (f, b), (mf, mb) in zip(conv_weights(net), [s for s in solver if s]):
        assert mf.shape == f.shape and mb.shape == b.shape and mf.dtype == np.float32
    assert [sorted(e) for e in stats["train"]] == [sorted(["objective", "top1err", "top5err", "num", "time"])] * 2
    assert len(stats["val"]) == 2 and stats["train"][1]["num"] == 2000.0
    assert stats["val"][1]["objective"] == pytest.approx(0.7415801)
    assert state["stats"]["train"]["num"] == 2000.0


# ---------------------------------------------------------------------------
# Round trips and the written layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v7", "v7.3"])
@pytest.mark.parametrize("name", NETS)
def test_load_save_load_is_bit_identical(tmp_path, name, fmt):
    first = load_net(ref(name))
    out = tmp_path / "net.mat"
    save_net(out, first, format=fmt)
    assert matio.mat_format(out) == ("v5" if fmt == "v7" else "v7.3")
    assert_identical(first, load_net(out))


def _cell_list(cell):
    assert cell.dtype == object and cell.ndim == 2 and cell.shape[0] == 1, cell.shape
    return list(cell[0])


def test_dagnn_params_with_an_extra_field_save_after_adding_a_layer(tmp_path):
    """A struct array has one set of fields: a param added by add_layer to a net whose params carry
    ``trainMethod`` is written with 'gradient', the value MATLAB's addParam gives it (an empty one
    would stop cnn_train_dag from updating it); another extra field is written empty."""
    dag = load_net(ref("dagnn_lenet.mat"))
    loaded = list(dag.params)
    for p in dag.params.values():
        p.extra["trainMethod"] = "gradient"
        p.extra["note"] = "loaded"
    dag.add_layer("extra_conv", "dagnn.Conv", "x6", "extra", ["extra_f", "extra_b"],
                  {"size": [1, 1, 500, 3], "hasBias": True})
    dag.params["extra_f"].value = np.ones((1, 1, 500, 3), np.float32)
    dag.params["extra_b"].value = np.zeros((1, 3), np.float32)
    path = tmp_path / "dag_extra.mat"
    save_net(path, dag)
    params = load_net(path).params
    assert [params[name].extra["trainMethod"] for name in loaded] == ["gradient"] * len(loaded)
    assert params["extra_f"].extra["trainMethod"] == "gradient"
    assert np.asarray(params["extra_f"].extra["note"]).size == 0 and params[loaded[0]].extra["note"] == "loaded"


def test_saved_simplenn_layout_read_by_scipy(tmp_path):
    out = tmp_path / "net.mat"
    save_net(out, load_net(EPOCH2))
    data = sio.loadmat(out, struct_as_record=False, squeeze_me=False)
    assert [k for k in data if not k.startswith("__")] == ["net"]
    net = data["net"][0, 0]
    layers = _cell_list(net.layers)
    assert len(layers) == 8
    for layer in layers:
        assert layer.shape == (1, 1)
        layer = layer[0, 0]
        assert layer.type.dtype.kind == "U"  # char
        weights = layer.weights
        assert weights.dtype == object
        if str(layer.type[0]) == "conv":
            assert weights.shape == (1, 2)
            assert weights[0, 0].dtype == np.float32 and weights[0, 0].ndim == 4
            assert weights[0, 1].dtype == np.float32 and weights[0, 1].shape[0] == 1
        else:
            assert weights.size == 0
        assert layer.precious.dtype == np.uint8  # scipy's view of a MATLAB logical
    assert matio.read_mat(out)["net"]["layers"][0, 6]["precious"].dtype == bool
    meta = net.meta[0, 0]
    assert meta.inputSize.shape == (1, 3)
    assert _cell_list(meta.classes[0, 0].name)[9][0] == "10"


def test_saved_dagnn_layout_read_by_scipy(tmp_path):
    out = tmp_path / "dag.mat"
    save_net(out, load_net(ref("dagnn_lenet.mat")))
    net = sio.loadmat(out, struct_as_record=False, squeeze_me=False)["net"][0, 0]
    assert net.vars.shape == (1, 10) and net.params.shape == (1, 8) and net.layers.shape == (1, 8)
    assert [str(v.name[0]) for v in net.vars[0]][:2] == ["input", "x1"]
    p = net.params[0, 0]
    assert str(p.name[0]) == "layer1f" and p.value.dtype == np.float32 and p.value.shape == (5, 5, 1, 20)
    assert p.learningRate.shape == (1, 1) and p.learningRate.dtype == np.float64
    conv, loss = net.layers[0, 0], net.layers[0, 7]
    assert str(conv.type[0]) == "dagnn.Conv"
    assert [str(s[0]) for s in _cell_list(conv.inputs)] == ["input"]
    assert [str(s[0]) for s in _cell_list(conv.params)] == ["layer1f", "layer1b"]
    assert np.array_equal(conv.block[0, 0].pad, [[0, 0, 0, 0]])
    assert [str(s[0]) for s in _cell_list(loss.inputs)] == ["prediction", "label"]
    assert str(loss.block[0, 0].loss[0]) == "softmaxlog"


def test_checkpoint_written_as_cnn_train_writes_it(tmp_path):
    net, state, stats = load_checkpoint(ref("train/net-epoch-1.mat"))
    out = tmp_path / "net-epoch-1.mat"
    save_checkpoint(out, net, state, stats)
    ours = sio.loadmat(out, struct_as_record=False, squeeze_me=False)
    theirs = sio.loadmat(ref("train/net-epoch-1.mat"), struct_as_record=False, squeeze_me=False)
    solver, ref_solver = ours["state"][0, 0].solverState, theirs["state"][0, 0].solverState
    assert solver.shape == ref_solver.shape == (1, 8)
    for mine, expected in zip(solver[0], ref_solver[0]):
        assert mine.shape == expected.shape  # 1x2 cells, and 1x0 for weightless layers
        for a, b in zip(mine.reshape(-1), expected.reshape(-1)):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    for part in ("train", "val"):
        mine, expected = ours["stats"][0, 0], theirs["stats"][0, 0]
        a, b = getattr(mine, part), getattr(expected, part)
        assert a.shape == b.shape == (1, 1)
        for field in b[0, 0]._fieldnames:
            x, y = getattr(a[0, 0], field), getattr(b[0, 0], field)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), field
        s_mine = getattr(ours["state"][0, 0].stats[0, 0], part)[0, 0]
        assert s_mine.objective.dtype == np.float32
    again = load_checkpoint(out)
    assert_identical(again[0], net)
    assert len(again[1]["solverState"]) == 8 and again[2] == stats


def test_checkpoint_two_epochs_round_trip(tmp_path):
    net, state, stats = load_checkpoint(EPOCH2)
    out = tmp_path / "ckpt.mat"
    save_checkpoint(out, net, state, stats, format="v7.3")
    net2, state2, stats2 = load_checkpoint(out)
    assert_identical(net, net2)
    assert stats2 == stats
    assert_identical(state["solverState"], state2["solverState"])


# ---------------------------------------------------------------------------
# Bad input: one-line MatFormatError naming the file
# ---------------------------------------------------------------------------

def assert_error(path, *needles, variable=None):
    with pytest.raises(MatFormatError) as exc:
        load_net(path, variable)
    message = str(exc.value)
    assert "\n" not in message, message
    assert os.path.basename(str(path)) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nothere.mat", "no such file")


def test_not_a_mat_file(tmp_path):
    path = tmp_path / "notes.mat"
    path.write_text("this is text, not a MAT-file\n" * 10)
    assert_error(path, "not a MAT-file")


@pytest.mark.parametrize("name", ["train/net-epoch-2.mat", "train/net-epoch-2-v73.mat"])
def test_truncated_file(tmp_path, name):
    path = tmp_path / "truncated.mat"
    data = open(ref(name), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    assert_error(path)


def test_mat_file_without_a_network(tmp_path):
    path = tmp_path / "data.mat"
    matio.write_mat(path, {"images": np.zeros((2, 2), np.float32), "labels": [1, 2]})
    assert_error(path, "no MatConvNet network", "images")
    assert_error(path, "labels", variable="labels")
    assert_error(path, "no variable 'net'", variable="net")


def test_dagnn_object_v73(tmp_path):
    # MATLAB writes a classdef object as a uint32 dataset with the class name and
    # MATLAB_object_decode = 3; its data lives in #subsystem#
    path = tmp_path / "dagobject.mat"
    matio.write_mat(path, {"other": 1.0}, format="v7.3")
    with h5py.File(path, "r+") as f:
        ds = f.create_dataset("net", data=np.array([[0xDD000000], [2], [1], [1], [1], [1]], dtype=np.uint32))
        ds.attrs["MATLAB_class"] = np.bytes_(b"dagnn.DagNN")
        ds.attrs["MATLAB_object_decode"] = np.int32(3)
        f.create_group("#subsystem#")
    assert_error(path, "dagnn.DagNN", "saveobj")


def _el(mdtype, payload):
    return struct.pack("<II", mdtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def test_dagnn_object_v5(tmp_path):
    # a v5 MCOS element (mxOPAQUE_CLASS, type 'MCOS', class 'dagnn.DagNN'), as MATLAB writes one
    flags = _el(6, struct.pack("<II", 17, 0))
    metadata = _el(14, _el(6, struct.pack("<II", 13, 0)) + _el(5, struct.pack("<2i", 6, 1)) + _el(1, b"")
                   + _el(6, struct.pack("<6I", 0xDD000000, 2, 1, 1, 1, 1)))
    element = _el(14, flags + _el(1, b"net") + _el(1, b"MCOS") + _el(1, b"dagnn.DagNN") + metadata)
    header = b"MATLAB 5.0 MAT-file, Platform: test".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"
    path = tmp_path / "dagobject5.mat"
    path.write_bytes(header + element)
    assert_error(path, "dagnn.DagNN", "saveobj")


def _broken_copy(tmp_path, edit, fmt="v7"):
    """net-epoch-2.mat's net with ``edit(net_struct)`` applied, written with matio."""
    net = matio.read_mat_variable(EPOCH2, "net")
    edit(net)
    path = tmp_path / "broken.mat"
    matio.write_mat(path, {"net": net}, format=fmt)
    return path


def test_unknown_layer_type(tmp_path):
    path = _broken_copy(tmp_path, lambda net: net["layers"][0, 3].update(type="maxout"))
    assert_error(path, "net.layers{4}.type", "maxout")


def test_missing_layer_type(tmp_path):
    path = _broken_copy(tmp_path, lambda net: net["layers"][0, 2].pop("type"))
    assert_error(path, "net.layers{3}", "type")


def test_wrong_bias_count(tmp_path):
    def edit(net):
        net["layers"][0, 2]["weights"][0, 1] = np.zeros((1, 49), np.float32)
    assert_error(_broken_copy(tmp_path, edit, "v7.3"), "net.layers{3}.weights{2}", "49 biases for 50 filters")


def test_filters_of_more_than_four_dimensions(tmp_path):
    def edit(net):
        net["layers"][0, 0]["weights"][0, 0] = np.zeros((5, 5, 1, 20, 2), np.float32)
    assert_error(_broken_copy(tmp_path, edit), "net.layers{1}.weights{1}", "4-D")


def test_wrong_weight_dtype(tmp_path):
    def edit(net):
        net["layers"][0, 4]["weights"][0, 0] = np.zeros((4, 4, 50, 500), np.uint8)
    assert_error(_broken_copy(tmp_path, edit), "net.layers{5}.weights{1}", "uint8")


def test_bnorm_sizes_inconsistent(tmp_path):
    def edit(net):
        net["layers"][0, 5] = {"type": "bnorm", "weights": [np.ones((500, 1), np.float32),
                                                            np.zeros((400, 1), np.float32)]}
    assert_error(_broken_copy(tmp_path, edit), "net.layers{6}.weights{2}", "bnorm")


@pytest.mark.parametrize("index, field, value, needles", [
    (1, "pool", None, ("net.layers{2}", "field 'pool'")),           # a pool without its window
    (5, "leak", np.zeros((0, 0)), ("net.layers{6}.leak", "0 double values")),
    (0, "pad", "same", ("net.layers{1}.pad", "'same'")),
    (3, "stride", np.array([[2.0, 2.0, 2.0]]), ("net.layers{4}.stride", "1 or 2")),
    (0, "pad", np.array([[1.0, 2.0]]), ("net.layers{1}.pad", "1 or 4")),  # vl_nnconv takes 1 or 4
    (0, "stride", np.zeros((1, 1)), ("net.layers{1}.stride", "positive integers", "[0.0]")),
    (1, "pad", np.array([[-1.0]]), ("net.layers{2}.pad", "non-negative integers")),
    (2, "pad", np.array([[0.5]]), ("net.layers{3}.pad", "non-negative integers")),
    (3, "stride", np.array([[np.nan]]), ("net.layers{4}.stride", "positive integers")),
    (1, "method", "median", ("net.layers{2}.method", "'max' or 'avg'", "'median'")),
    (0, "precious", np.array([[np.nan]]), ("net.layers{1}.precious", "logical(NaN)")),
])
def test_bad_layer_option_names_the_field(tmp_path, index, field, value, needles):
    def edit(net):
        if value is None:
            net["layers"][0, index].pop(field)
        else:
            net["layers"][0, index][field] = value
    assert_error(_broken_copy(tmp_path, edit), *needles)


def test_a_double_network_stays_double(tmp_path):
    """MatConvNet runs double networks: loading must not round them to single, nor saving change their class."""
    def to_double(net):
        for layer in net["layers"][0]:
            if "weights" in layer and np.asarray(layer["weights"]).size:
                for j in range(layer["weights"].shape[1]):
                    layer["weights"][0, j] = np.asarray(layer["weights"][0, j], np.float64) + 1e-12
    path = _broken_copy(tmp_path, to_double)
    net = load_net(path)
    stored = matio.read_mat_variable(path, "net")
    for k, layer in enumerate(net.layers):
        for j, w in enumerate(layer.get("weights", [])):
            assert w.dtype == np.float64 and w.tobytes() == np.asarray(stored["layers"][0, k]["weights"][0, j]).tobytes()
    save_net(tmp_path / "again.mat", net)
    again = load_net(tmp_path / "again.mat")
    for a, b in zip(again.layers, net.layers):
        for wa, wb in zip(a.get("weights", []), b.get("weights", [])):
            assert wa.dtype == np.float64 and wa.tobytes() == wb.tobytes()
    f = net.layers[0]["weights"][0]
    assert not np.array_equal(f.astype(np.float32).astype(np.float64), f)  # not single underneath
    net.layers[-1]["class"] = np.array([[3.0, 7.0]])
    res = vl_simplenn(net, np.random.default_rng(0).standard_normal((28, 28, 1, 2)))  # double all through
    assert res[-2].x.dtype == np.float64


def test_bad_legacy_learning_rate_names_the_field(tmp_path):
    path = tmp_path / "legacy.mat"
    data = matio.read_mat(ref("train/net-epoch-2-legacy-beta16.mat"))
    data["layers"][0, 2]["filtersLearningRate"] = np.zeros((0, 0))
    matio.write_mat(path, data)
    assert_error(path, "layers{3}.filtersLearningRate", "numeric scalar")


def test_legacy_bnorm_gets_a_learning_rate_for_its_moments(tmp_path):
    """tidy appends the moments as weights{3}; an upgraded per-array learning rate must cover them, with
    cnn_train's default 1 (as ones(1, 3) would give), or training indexes past its end."""
    path = tmp_path / "legacy_bnorm.mat"
    data = matio.read_mat(ref("train/net-epoch-2-legacy-beta16.mat"))
    data["layers"][0, 5] = {"type": "bnorm", "name": "bn", "filters": np.ones((500, 1), np.float32),
                            "biases": np.zeros((500, 1), np.float32), "filtersLearningRate": np.array([[2.0]]),
                            "biasesLearningRate": np.array([[3.0]]), "filtersWeightDecay": np.array([[0.0]]),
                            "biasesWeightDecay": np.array([[0.0]])}
    matio.write_mat(path, data)
    bn = load_net(path).layers[5]
    assert np.array_equal(bn["learningRate"], [[2, 3, 1]]) and np.array_equal(bn["weightDecay"], [[0, 0]])


def test_dagnn_unknown_block_and_bad_param(tmp_path):
    base = matio.read_mat_variable(ref("dagnn_lenet.mat"), "net")
    layers = base["layers"].to_list()
    layers[5] = dict(layers[5], type="dagnn.Tanh")
    path = tmp_path / "dag_bad.mat"
    matio.write_mat(path, {"net": dict(base, layers=matio.StructArray(layers))})
    assert_error(path, "net.layers(6).type", "dagnn.Tanh")

    params = base["params"].to_list()
    params[1] = dict(params[1], value=np.zeros((1, 21), np.float32))
    matio.write_mat(path, {"net": dict(base, params=matio.StructArray(params))})
    assert_error(path, "net.params(2).value", "21 biases for 20 filters")

    params[1] = dict(params[1], value=np.zeros((1, 20), np.int16))
    matio.write_mat(path, {"net": dict(base, params=matio.StructArray(params))})
    assert_error(path, "net.params(2).value", "int16")


def test_dagnn_nan_flags_are_errors(tmp_path):
    """MATLAB's logical(NaN) is an error, so a NaN hasBias or precious must not read as true."""
    base = matio.read_mat_variable(ref("dagnn_lenet.mat"), "net")
    path = tmp_path / "dag_nan_flag.mat"
    layers = base["layers"].to_list()
    layers[0] = dict(layers[0], block=dict(layers[0]["block"], hasBias=np.array([[np.nan]])))
    matio.write_mat(path, {"net": dict(base, layers=matio.StructArray(layers))})
    assert_error(path, "net.layers(1).block.hasBias", "logical(NaN)")
    variables = base["vars"].to_list()
    variables[0] = dict(variables[0], precious=np.array([[np.nan]]))
    matio.write_mat(path, {"net": dict(base, vars=matio.StructArray(variables))})
    assert_error(path, "net.vars(1).precious", "logical(NaN)")
    variables[0] = dict(variables[0], precious=np.array([[2.0]]))  # nonzero is true, as in MATLAB
    matio.write_mat(path, {"net": dict(base, vars=matio.StructArray(variables))})
    assert load_net(path).vars[variables[0]["name"]].precious


def test_dagnn_cycle_is_an_error(tmp_path):
    base = matio.read_mat_variable(ref("dagnn_lenet.mat"), "net")
    layers = base["layers"].to_list()
    layers[0] = dict(layers[0], inputs=matio.cell(["x6"]))  # layer1 now reads what layer6 writes
    path = tmp_path / "cycle.mat"
    matio.write_mat(path, {"net": dict(base, layers=matio.StructArray(layers))})
    assert_error(path, "cycle")


def test_error_in_top_level_legacy_file_names_the_field(tmp_path):
    path = tmp_path / "legacy.mat"
    shutil.copy(ref("train/net-epoch-2-legacy-beta16.mat"), path)
    data = matio.read_mat(path)
    data["layers"][0, 0]["filters"] = data["layers"][0, 0]["filters"].astype(np.int32)
    matio.write_mat(path, data)
    assert_error(path, "layers{1}.weights{1}", "int32")


@pytest.mark.parametrize("layer, needle", [
    ({"type": "conv", "weights": [np.ones((3, 3, 1, 2), np.float32), np.zeros((1, 5), np.float32)]},
     "net.layers{1}.weights{2}: 5 biases for 2 filters"),
    ({"type": "maxout"}, "net.layers{1}.type: unsupported layer type 'maxout'"),
    ({"type": "pool", "pool": 2, "stride": 0}, "net.layers{1}.stride: expected positive integers"),
])
def test_save_net_refuses_what_load_net_would(tmp_path, layer, needle):
    path = tmp_path / "net.mat"
    with pytest.raises(MatFormatError) as exc:
        save_net(path, SimpleNN([layer]))
    assert str(exc.value) == f"{path}: {needle}" or str(exc.value).startswith(f"{path}: {needle}")
    assert not path.exists()


def _dag_with_loss_inputs(inputs):
    dag = DagNN()
    dag.add_layer("conv", "dagnn.Conv", "input", "prediction", ["f", "b"], {"size": [3, 3, 1, 4], "hasBias": True})
    dag.add_layer("loss", "dagnn.Loss", inputs, "objective")
    dag.init_params()
    return dag


def test_save_net_refuses_a_dagnn_that_load_net_would(tmp_path):
    """A built DagNN is checked as load_net checks a file's: a one-input Loss is not written."""
    path = tmp_path / "net.mat"
    with pytest.raises(MatFormatError) as exc:
        save_net(path, _dag_with_loss_inputs("prediction"))
    assert str(exc.value) == f"{path}: net.layers(2).inputs: a dagnn.Loss layer needs two inputs (prediction, label)"
    assert not path.exists()
    save_net(path, _dag_with_loss_inputs(["prediction", "label"]))  # the same net with its label loads back
    assert load_net(path).layers[1]["inputs"] == ["prediction", "label"]


def test_dagnn_eval_of_a_one_input_loss_is_a_one_line_error():
    dag = _dag_with_loss_inputs("prediction")
    with pytest.raises(MatFormatError) as exc:
        dag.eval({"input": np.zeros((5, 5, 1, 2), np.float32)})
    assert str(exc.value) == "net.layers(2).inputs: a dagnn.Loss layer needs two inputs (prediction, label)"


def test_numeric_options_set_with_numpy_are_written_as_double(tmp_path):
    """MatConvNet's MEX functions take only double options ("STRIDE is not a plain matrix") and
    vl_taccummex a double learning rate: numpy ints and singles a user sets must not reach the file."""
    from matconvnet_port.models import cnn_mnist_init
    net = cnn_mnist_init(seed=0)
    net.layers[1]["pool"], net.layers[1]["stride"] = np.array([2, 2]), np.int64(2)
    net.layers[0]["learningRate"] = np.array([1, 2], np.float32)
    save_net(tmp_path / "simple.mat", net)
    s = sio.loadmat(tmp_path / "simple.mat", squeeze_me=False, struct_as_record=False)["net"][0, 0]
    pool, conv = s.layers[0, 1][0, 0], s.layers[0, 0][0, 0]
    assert pool.pool.dtype == pool.stride.dtype == conv.learningRate.dtype == np.float64
    assert conv.weights[0, 0].dtype == np.float32 and pool.type[0] == "pool"  # data and text as they were
    dag = DagNN.from_simplenn(net)
    dag.layers[1]["block"]["poolSize"] = np.array([2, 2], np.int32)
    dag.params[dag.layers[0]["params"][0]].learningRate = np.float32(1)
    save_net(tmp_path / "dag.mat", dag)
    d = sio.loadmat(tmp_path / "dag.mat", squeeze_me=False, struct_as_record=False)["net"][0, 0]
    assert d.layers[0, 1].block[0, 0].poolSize.dtype == d.params[0, 0].learningRate.dtype == np.float64
    assert d.layers[0, 0].block[0, 0].hasBias.dtype == np.uint8  # logical stays logical


def test_pool_method_in_any_case_and_a_dagnn_struct_without_vars_is_named(tmp_path):
    """vl_nnpool compares its method case-insensitively; a DagNN struct missing 'vars' was reported as
    a SimpleNN whose layers are not a cell array, with no word about the missing field."""
    from matconvnet_port.models import cnn_mnist_init
    from matconvnet_port.netio import net_to_struct
    net = cnn_mnist_init(seed=0)
    net.layers[1]["method"] = "MAX"
    save_net(tmp_path / "pool.mat", net)
    x = np.random.default_rng(0).standard_normal((28, 28, 1, 2)).astype(np.float32)
    plain, loaded = cnn_mnist_init(seed=0), load_net(tmp_path / "pool.mat")
    plain.layers[-1]["class"] = loaded.layers[-1]["class"] = np.array([1.0, 2.0])
    np.testing.assert_array_equal(vl_simplenn(loaded, x)[6].x, vl_simplenn(plain, x)[6].x)
    struct = net_to_struct(DagNN.from_simplenn(plain))
    del struct["vars"]
    matio.write_mat(tmp_path / "novars.mat", {"net": struct})
    with pytest.raises(MatFormatError, match="it has no field 'vars'"):
        load_net(tmp_path / "novars.mat")
