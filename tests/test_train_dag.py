"""cnn_train_dag: a DagNN made from a SimpleNN trains as cnn_train (held to real MatConvNet runs) trains
the SimpleNN; checkpoints, resume, batch norm and the DagNN-only options."""

import os

import numpy as np
import pytest

from matconvnet_port import cnn_mnist_init
from matconvnet_port.dagnn import DagNN
from matconvnet_port.netio import load_checkpoint
from matconvnet_port.train import cnn_train, find_last_checkpoint
from matconvnet_port.train_dag import cnn_train_dag

from test_train import _small_imdb, get_batch, max_rel


def dag_batch(imdb, batch):
    """cnn_mnist.m's getDagNNBatch: {'input', images, 'label', labels}."""
    images, labels = get_batch(imdb, batch)
    return ["input", images, "label", labels]


def mnist_dag(seed, **options):
    """cnn_mnist.m's DagNN: fromSimpleNN plus the top-1 / top-5 error layers."""
    dag = DagNN.from_simplenn(cnn_mnist_init(seed=seed, **options))
    dag.add_layer("top1err", "dagnn.Loss", ["prediction", "label"], "top1err", block={"loss": "classerror"})
    dag.add_layer("top5err", "dagnn.Loss", ["prediction", "label"], "top5err",
                  block={"loss": "topkerror", "opts": ["topK", 5]})
    return dag


def _same_weights(dag, simple, tol):
    worst = 0.0
    for i, layer in enumerate(simple.layers):
        for j, w in enumerate(layer.get("weights") or []):
            if np.asarray(w).size:
                name = dag.layers[i]["params"][j]
                err = max_rel(dag.params[name].value, w)
                worst = max(worst, err)
                assert err <= tol, f"layer {i + 1} weight {j + 1}: {err:.2e}"
    return worst


@pytest.mark.parametrize("options", [{}, {"num_sub_batches": 2}, {"normalise": False, "num_sub_batches": 3},
                                     {"nesterov_update": True, "learning_rate": [0.002, 0.001]}])
def test_a_converted_net_trains_as_cnn_train(tmp_path, options):
    imdb, train, val = _small_imdb(300, 100)
    kw = dict(num_epochs=2, batch_size=100, train=train, val=val, progress=False, device="cpu", **options)
    simple, info_s = cnn_train(cnn_mnist_init(seed=5), imdb, get_batch, exp_dir=str(tmp_path / "s"), **kw)
    dag, info_d = cnn_train_dag(mnist_dag(5), imdb, dag_batch, exp_dir=str(tmp_path / "d"), **kw)
    worst = _same_weights(dag, simple, 1e-5)
    print(f"{options}: worst relative weight difference after 2 epochs {worst:.1e}")
    for mode in ("train", "val"):
        for e in range(2):
            s, d = info_s[mode][e], info_d[mode][e]
            assert d["num"] == s["num"]
            assert abs(d["objective"] - s["objective"]) <= 1e-5 * abs(s["objective"])
            assert abs(d["top1err"] - s["top1err"]) * s["num"] <= 1e-3  # the same images wrong
            assert abs(d["top5err"] - s["top5err"]) * s["num"] <= 1e-3


def test_batch_norm_moments_are_averaged_as_cnn_train_does(tmp_path):
    """trainMethod 'average' (the moments, learning rate 0.1 in a DagNN, as BatchNorm.attach sets it;
    0.05 in cnn_mnist_init's SimpleNN): set the SimpleNN's to 0.1 too and the two train alike."""
    imdb, train, val = _small_imdb(200, 100)
    net = cnn_mnist_init(seed=4, batch_normalization=True)
    dag = DagNN.from_simplenn(net)
    for layer in net.layers:
        if layer["type"] == "bnorm":
            layer["learningRate"] = np.array([[1, 1, 0.1]])
    moments = [layer["params"][2] for layer in dag.layers if layer["type"] == "dagnn.BatchNorm"]
    for name in moments:
        dag.params[name].learningRate = 0.1
        dag.params[name].extra["trainMethod"] = "average"
    kw = dict(num_epochs=1, batch_size=100, train=train, val=val, progress=False, device="cpu", num_sub_batches=2)
    simple, _ = cnn_train(net, imdb, get_batch, exp_dir=str(tmp_path / "s"), **kw)
    dag, _ = cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path / "d"), **kw)
    _same_weights(dag, simple, 1e-4)
    assert all(np.abs(dag.params[name].value).max() > 0 for name in moments)


def test_interrupted_run_resumes_exactly_and_checkpoints_hold_the_dagnn(tmp_path):
    imdb, train, val = _small_imdb(200, 100)
    kw = dict(num_epochs=3, batch_size=100, train=train, val=val, progress=False, device="cpu")
    full, info_full = cnn_train_dag(mnist_dag(3), imdb, dag_batch, exp_dir=str(tmp_path / "full"), **kw)

    def stop(epoch, mode, b, stats):
        if epoch == 2 and b == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cnn_train_dag(mnist_dag(3), imdb, dag_batch, exp_dir=str(tmp_path / "cut"), batch_callback=stop, **kw)
    assert find_last_checkpoint(str(tmp_path / "cut")) == 1
    resumed, info = cnn_train_dag(mnist_dag(3), imdb, dag_batch, exp_dir=str(tmp_path / "cut"), **kw)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name].value, full.params[name].value)
    assert [s["objective"] for s in info["train"]] == [s["objective"] for s in info_full["train"]]
    net, state, stats = load_checkpoint(str(tmp_path / "cut" / "net-epoch-3.mat"))
    assert isinstance(net, DagNN) and len(state["solverState"]) == len(net.params)  # one cell per parameter
    first = list(net.params)[0]
    assert np.asarray(state["solverState"][0]).shape == net.params[first].value.shape
    assert len(stats["train"]) == 3


def test_dag_options_are_checked(tmp_path):
    imdb, train, val = _small_imdb(100, 100)
    kw = dict(exp_dir=str(tmp_path), num_epochs=1, batch_size=100, train=train, val=val, progress=False,
              device="cpu")
    with pytest.raises(ValueError, match="der_outputs: 'loss' is not a variable"):
        cnn_train_dag(mnist_dag(1), imdb, dag_batch, der_outputs=["loss", 1], **kw)
    dag = mnist_dag(1)
    dag.params[list(dag.params)[0]].extra["trainMethod"] = "adam"
    with pytest.raises(ValueError, match="unknown trainMethod 'adam'"):
        cnn_train_dag(dag, imdb, dag_batch, **kw)
    with pytest.raises(ValueError, match="num_sub_batches must be a positive integer"):
        cnn_train_dag(mnist_dag(1), imdb, dag_batch, num_sub_batches=0, **kw)
    assert find_last_checkpoint(str(tmp_path)) == 0
    dag = mnist_dag(1)
    before = {n: p.value.copy() for n, p in dag.params.items()}
    cnn_train_dag(dag, imdb, dag_batch, **kw)
    assert all(np.array_equal(dag.params[n].value, v) for n, v in before.items())  # the caller's net is kept
