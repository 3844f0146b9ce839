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
    worst = _same_weights(dag, simple, 0.0)  # the same functions in the same order: the same bits
    print(f"{options}: worst relative weight difference after 2 epochs {worst:.1e}")
    for mode in ("train", "val"):
        for e in range(2):
            s, d = info_s[mode][e], info_d[mode][e]
            assert d["num"] == s["num"]
            assert abs(d["objective"] - s["objective"]) <= 1e-5 * abs(s["objective"])
            assert abs(d["top1err"] - s["top1err"]) * s["num"] <= 1e-3  # the same images wrong
            assert abs(d["top5err"] - s["top5err"]) * s["num"] <= 1e-3


@pytest.mark.parametrize("normalise", [True, False])
def test_batch_norm_trains_as_cnn_train_does(tmp_path, normalise):
    """Uneven sub-batches (34, 33, 33 images), where master's plain mean of the moments and beta25's
    image-weighted one differ: the converted net ends with cnn_train's weights and moments, bit for bit."""
    imdb, train, val = _small_imdb(100, 100)
    net = cnn_mnist_init(seed=4, batch_normalization=True)
    dag = DagNN.from_simplenn(net)
    kw = dict(num_epochs=1, batch_size=100, train=train, val=val, progress=False, device="cpu", num_sub_batches=3,
              normalise=normalise)
    simple, _ = cnn_train(net, imdb, get_batch, exp_dir=str(tmp_path / "s"), **kw)
    dag, _ = cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path / "d"), **kw)
    _same_weights(dag, simple, 0.0)
    moments = [layer["params"][2] for layer in dag.layers if layer["type"] == "dagnn.BatchNorm"]
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


def test_a_one_element_parameter_resumes_with_its_momentum(tmp_path):
    """A conv with one filter has a 1 x 1 bias: its saved momentum is a value, not cnn_train_dag's initial 0."""
    imdb, train, val = _small_imdb(200, 100)
    dag = DagNN()
    dag.add_layer("c1", "dagnn.Conv", "input", "x1", ["f1", "b1"], {"size": [5, 5, 1, 1], "hasBias": True})
    dag.add_layer("c2", "dagnn.Conv", "x1", "prediction", ["f2", "b2"], {"size": [24, 24, 1, 10], "hasBias": True})
    dag.add_layer("loss", "dagnn.Loss", ["prediction", "label"], "objective")
    dag.init_params(seed=2)
    dag.params["f1"].value *= 0.05
    dag.params["f2"].value *= 0.05
    kw = dict(num_epochs=2, batch_size=100, train=train, val=val, progress=False, device="cpu")
    full, _ = cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path / "full"), **kw)
    cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path / "cut"), **dict(kw, num_epochs=1))
    _, state, _ = load_checkpoint(str(tmp_path / "cut" / "net-epoch-1.mat"))
    assert np.asarray(state["solverState"][1]).size == 1 and np.abs(state["solverState"][1]).max() > 0
    resumed, _ = cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path / "cut"), **kw)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name].value, full.params[name].value)


def test_moments_of_uneven_sub_batches_are_weighted_by_images_in_beta25(tmp_path):
    """beta25: dagnn.BatchNorm scales its moments derivative by the images and cnn_train_dag divides by the
    batch size, so three sub-batches of 34, 33, 33 images give the first bnorm the whole batch's mean column."""
    imdb, train, val = _small_imdb(100, 100)
    kw = dict(num_epochs=1, batch_size=100, train=train, val=val, progress=False, device="cpu",
              order=lambda e, mode, idx: idx)
    first = lambda dag: next(layer["params"][2] for layer in dag.layers if layer["type"] == "dagnn.BatchNorm")  # noqa: E731
    net = DagNN.from_simplenn(cnn_mnist_init(seed=4, batch_normalization=True))
    whole, _ = cnn_train_dag(net, imdb, dag_batch, exp_dir=str(tmp_path / "a"), **kw)
    split, _ = cnn_train_dag(net, imdb, dag_batch, exp_dir=str(tmp_path / "b"), num_sub_batches=3, normalise=False,
                             **kw)
    mean_whole = np.asarray(whole.params[first(whole)].value)[:, 0]
    mean_split = np.asarray(split.params[first(split)].value)[:, 0]
    assert np.abs(mean_whole).max() > 0 and max_rel(mean_split, mean_whole) < 1e-5


def test_statistics_are_per_location_and_ignore_average_is_honoured(tmp_path):
    """At N = 32 the LeNet's prediction is 2 x 2: dagnn.Loss averages over the 4 locations of each image
    as well (cnn_train over images only), and a Loss with ignoreAverage reports nothing."""
    from matconvnet_port.imresize import imresize
    imdb, train, val = _small_imdb(200, 100)
    imdb = {"images": dict(imdb["images"], data=imresize(imdb["images"]["data"], [32, 32]))}
    kw = dict(num_epochs=1, batch_size=100, train=train, val=val, progress=False, device="cpu")
    _, info_s = cnn_train(cnn_mnist_init(seed=6), imdb, get_batch, exp_dir=str(tmp_path / "s"), **kw)
    dag = mnist_dag(6)
    dag.layers[-1]["block"]["ignoreAverage"] = True
    _, info_d = cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path / "d"), **kw)
    for mode in ("train", "val"):
        assert "top5err" not in info_d[mode][0]
        assert abs(info_d[mode][0]["objective"] - info_s[mode][0]["objective"] / 4) <= 1e-5 * info_d[mode][0]["objective"]
        assert abs(info_d[mode][0]["top1err"] - info_s[mode][0]["top1err"] / 4) <= 1e-6


def test_batches_are_cast_to_the_trained_precision_and_der_outputs_are_needed(tmp_path):
    imdb, train, val = _small_imdb(100, 100)
    kw = dict(exp_dir=str(tmp_path), num_epochs=1, batch_size=100, train=train, val=val, progress=False,
              device="cpu")
    double_batch = lambda imdb, batch: ["input", get_batch(imdb, batch)[0].astype(np.float64),  # noqa: E731
                                        "label", get_batch(imdb, batch)[1]]
    _, info = cnn_train_dag(mnist_dag(1), imdb, double_batch, **kw)  # float64 images, float32 training
    assert np.isfinite(info["train"][0]["objective"])
    with pytest.raises(ValueError, match="der_outputs must name at least one output when training"):
        cnn_train_dag(mnist_dag(1), imdb, dag_batch, der_outputs=[], **dict(kw, resume=False))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_with_numpy_batches_matches_the_cpu_run(tmp_path):
    """get_batch hands numpy arrays; the trainer moves them to the module's device (fp32, no TF32)."""
    imdb, train, val = _small_imdb(200, 100)
    kw = dict(num_epochs=1, batch_size=100, train=train, val=val, progress=False)
    cpu, _ = cnn_train_dag(mnist_dag(2), imdb, dag_batch, exp_dir=str(tmp_path / "cpu"), device="cpu", **kw)
    gpu, _ = cnn_train_dag(mnist_dag(2), imdb, dag_batch, exp_dir=str(tmp_path / "gpu"), device="cuda", **kw)
    for name in cpu.params:
        assert max_rel(gpu.params[name].value, cpu.params[name].value) < 1e-4, name


def test_cnn_train_names_a_dagnn_checkpoint_it_cannot_resume(tmp_path):
    imdb, train, val = _small_imdb(100, 100)
    kw = dict(exp_dir=str(tmp_path), num_epochs=2, batch_size=100, train=train, val=val, progress=False, device="cpu")
    cnn_train_dag(mnist_dag(1), imdb, dag_batch, **dict(kw, num_epochs=1))
    with pytest.raises(ValueError) as exc:
        cnn_train(cnn_mnist_init(seed=1), imdb, get_batch, **kw)
    assert "net-epoch-1.mat: holds a DagNN" in str(exc.value) and "\n" not in str(exc.value)


def test_checkpoint_statistics_are_single_whatever_the_loss_outputs_are_named(tmp_path):
    """Every cnn_train_dag statistic is a dagnn.Loss block's average, single as its output is."""
    import scipy.io as sio
    imdb, train, val = _small_imdb(100, 100)
    dag = mnist_dag(2)
    dag.rename_var("top1err", "error")
    cnn_train_dag(dag, imdb, dag_batch, exp_dir=str(tmp_path), num_epochs=1, batch_size=100, train=train, val=val,
                  progress=False, device="cpu")
    saved = sio.loadmat(str(tmp_path / "net-epoch-1.mat"), squeeze_me=False, struct_as_record=False)
    entry = saved["stats"][0, 0].val[0, 0]
    assert entry.error.dtype == entry.objective.dtype == entry.top5err.dtype == np.float32
    assert entry.num.dtype == entry.time.dtype == np.float64
