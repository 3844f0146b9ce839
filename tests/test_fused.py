"""The study's fused trainer computes what cnn_train computes, model by model.

Tolerances: the fused network stores images and filters transposed and
(for 'grouped') convolves all models in one call, or (for 'gemm') as matrix
products on channels-last memory, so its sums run in another order than
cnn_train's; SGD amplifies such float32 rounding differences step by step
(one step agrees to ~1e-7, six steps here to ~1e-5 for 'loop' and ~1e-4 for
'grouped'), hence 1e-4 and 1e-3 relative to the largest weight.
"""

import os
import sys

import numpy as np
import pytest
import torch

from matconvnet_port import cnn_mnist_init, functional as fn
from matconvnet_port.fused import (FusedLeNet, FusedTrainer, autotune_plan, build, candidate_plans, default_plan,
                                    keep_freed_memory, parse_conv, plan_label)
from matconvnet_port.matio import read_mat
from matconvnet_port.models import ALL_MASKS, CONV_SHAPES
from matconvnet_port.train import cnn_train, default_order

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_data")
MASKS = [ALL_MASKS[i] for i in (0, 5, 10, 15, 4)]


@pytest.fixture(scope="module")
def data():
    log = read_mat(os.path.join(REF, "train", "train_log.mat"))
    images = log["images_uint8"].astype(np.float32) - log["data_mean"][:, :, None, None]
    sets = log["set"].reshape(-1)
    imdb = {"images": {"data": images, "labels": log["labels"], "set": log["set"]}}
    return imdb, np.flatnonzero(sets == 1)[:300] + 1, np.flatnonzero(sets == 3)[:200] + 1


def image_tensors(imdb, count=None):
    """The imdb's first ``count`` images as n x 1 x H x W and their labels, as the trainer takes them."""
    images = imdb["images"]["data"][:, :, :, :count]
    return (torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))),
            torch.from_numpy(imdb["images"]["labels"].reshape(-1)[:count]))


def conv_weights(net):
    return [[layer["weights"][0], layer["weights"][1]] for layer in net.layers if layer["type"] == "conv"]


PLANS = [("loop", "nchw", None, False, 1e-4), ("grouped", "nchw", None, False, 1e-3),
         # the CPU default (GEMM for conv1/3/4, the library's grouped conv2), 2 models per pass,
         # with and without composing conv3 and conv4 where no ReLU separates them
         ("gemm,grouped,gemm,gemm", "nhwc", 2, False, 1e-3), ("gemm,grouped,gemm,gemm", "nhwc", 2, True, 1e-3),
         ("gemm", "nhwc", None, True, 1e-3),
         # CUDA autotune candidates, here on the CPU: composition beside cuDNN-style grouped convs
         ("grouped", "nchw", None, True, 1e-3), ("loop", "nchw", None, True, 1e-3),
         ("grouped,grouped,gemm,gemm", "nhwc", None, True, 1e-3),
         # conv2 per model in NCHW slices of channels-last activations ('streams' is 'loop' off CUDA)
         ("gemm,loop,gemm,gemm", "nhwc", None, False, 1e-3), ("gemm,streams,gemm,gemm", "nhwc", None, True, 1e-3),
         ("gemm,gemm_wgrad,gemm,gemm", "nhwc", None, True, 1e-3), ("gemm,streams,streams,gemm", "nhwc", None, True, 1e-3),
         # the composed layer by the convolution library (the CPU default from N = 36 on)
         ("gemm,grouped,gemm,gemm", "nhwc", 2, "library", 1e-3), ("gemm,streams,gemm,gemm", "nhwc", None, "library", 1e-3),
         ("grouped", "nchw", None, "library", 1e-3)]


def cnn_train_alone(imdb, mask, train, val, exp_dir):
    """One mask trained alone by cnn_train, 2 epochs from cnn_mnist_init(seed=7): the reference."""
    return cnn_train(cnn_mnist_init(mask, seed=7), imdb,
                     lambda db, b: (db["images"]["data"][:, :, :, b - 1], db["images"]["labels"][:, b - 1]),
                     exp_dir=str(exp_dir), num_epochs=2, batch_size=100, train=train, val=val, random_seed=7,
                     progress=False, device="cpu")


def _compose_id(compose):
    return {False: "", True: "-compose", "library": "-compose=library"}[compose]


@pytest.mark.parametrize("impl,memory_format,chunk,compose,tol", PLANS,
                         ids=[f"{p[1]}-{p[0]}-{p[2]}{_compose_id(p[3])}" for p in PLANS])
def test_each_fused_model_matches_cnn_train_alone(data, impl, memory_format, chunk, compose, tol, tmp_path):
    imdb, train, val = data
    images, labels = image_tensors(imdb)
    model = FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=7)), conv=impl, memory_format=memory_format,
                       compose=compose)
    trainer = FusedTrainer(model, images, labels, batch_size=100, seed=7, chunk_size=chunk)
    for epoch in (1, 2):
        fused_train = trainer.train_epoch(epoch, train)
    fused_val = trainer.evaluate(val)
    for k, mask in enumerate(MASKS):
        net, info = cnn_train_alone(imdb, mask, train, val, tmp_path / f"{memory_format}{k}")
        for (fa, ba), (fb, bb) in zip(conv_weights(net), model.model_weights(k)):
            assert np.abs(fa - fb).max() / np.abs(fa).max() <= tol, f"mask {mask}: filters differ"
            # biases start at 0 and are ~1e-6 after six steps, sums of cancelling gradient terms:
            # measure them on their layer's scale (the filters'), as the weights are
            assert np.abs(ba.reshape(-1) - bb.reshape(-1)).max() / np.abs(fa).max() <= tol
        assert fused_train.objective[k] == pytest.approx(info["train"][1]["objective"], rel=1e-4)
        assert fused_val.objective[k] == pytest.approx(info["val"][1]["objective"], rel=1e-4)
        assert abs(fused_val.top1err[k] - info["val"][1]["top1err"]) * len(val) <= 1
        assert abs(fused_val.top5err[k] - info["val"][1]["top5err"]) * len(val) <= 1


@pytest.mark.parametrize("size", [32, 36])
def test_default_plan_matches_cnn_train_at_larger_n_with_a_partial_last_batch(size, tmp_path):
    """The CPU default at N = 32 and (composing conv3 and conv4 by the library) N = 36; 250 training
    images, so each epoch ends with a batch of 50."""
    from matconvnet_port.mnist import get_mnist_imdb
    imdb = get_mnist_imdb(input_size=size, train_subset=250, val_subset=100)
    sets = imdb["images"]["set"].reshape(-1)
    train, val = np.flatnonzero(sets == 1) + 1, np.flatnonzero(sets == 3) + 1
    images, labels = image_tensors(imdb)
    plan = default_plan("cpu", size, len(MASKS))
    assert bool(plan["compose"]) == (size >= 36)
    model = build(plan, MASKS, conv_weights(cnn_mnist_init(seed=7)), torch.device("cpu"))
    trainer = FusedTrainer(model, images, labels, batch_size=100, seed=7, chunk_size=plan["chunk_size"])
    for epoch in (1, 2):
        fused_train = trainer.train_epoch(epoch, train)
    fused_val = trainer.evaluate(val)
    for k, mask in enumerate(MASKS):
        net, info = cnn_train_alone(imdb, mask, train, val, tmp_path / str(k))
        for (fa, ba), (fb, bb) in zip(conv_weights(net), model.model_weights(k)):
            assert np.abs(fa - fb).max() / np.abs(fa).max() <= 1e-3, f"mask {mask}: filters differ"
            assert np.abs(ba.reshape(-1) - bb.reshape(-1)).max() / np.abs(fa).max() <= 1e-3
        assert fused_train.objective[k] == pytest.approx(info["train"][1]["objective"], rel=1e-4)
        assert fused_val.objective[k] == pytest.approx(info["val"][1]["objective"], rel=1e-4)
        assert abs(fused_val.top1err[k] - info["val"][1]["top1err"]) * len(val) <= 1


@pytest.mark.parametrize("masked_numel", [0, 1 << 30])  # a kernel per run of flags; broadcast masks
def test_channel_relu_is_relu_with_a_per_channel_leak_of_0_or_1(masked_numel, monkeypatch):
    monkeypatch.setattr(fn, "MASKED_RELU_NUMEL", masked_numel)
    x = torch.randn(3, 12, 5, 4, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0  # MatConvNet's derivative at exactly 0 is 0 for a ReLU
    flags = [True, True, False, True, False, False, True, True, True, False, True, False]
    leak = torch.tensor([0.0 if f else 1.0 for f in flags], dtype=x.dtype).reshape(1, -1, 1, 1)
    g = torch.randn_like(x)
    for layout in (torch.contiguous_format, torch.channels_last):  # channel runs / broadcast floor
        a = x.clone().contiguous(memory_format=layout).requires_grad_(True)
        b = x.clone().requires_grad_(True)
        ya, yb = fn.channel_relu(a, flags), fn.relu(b, leak)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        (ga,), (gb,) = torch.autograd.grad(ya, a, g), torch.autograd.grad(yb, b, g)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: fn.channel_relu(t, flags), (torch.randn(2, 12, 3, 3, dtype=torch.float64, requires_grad=True),))


def test_channel_relu_paths_agree_on_zeros_and_non_finite_numbers(monkeypatch):
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.5, -2.0, 3e-39])
    x = special[torch.randperm(8 * 32, generator=torch.Generator().manual_seed(0)) % 8].reshape(2, 8, 4, 4)
    g = special[torch.randperm(8 * 32, generator=torch.Generator().manual_seed(1)) % 8].reshape(2, 8, 4, 4)
    flags = [True, False, True, True, False, True, False, False]  # 6 runs
    out = []
    for numel in (0, 1 << 30):
        monkeypatch.setattr(fn, "MASKED_RELU_NUMEL", numel)
        a = x.clone().requires_grad_(True)
        y = fn.channel_relu(a, flags)
        out.append((y.detach(), torch.autograd.grad(y, a, g)[0]))
    for u, v in zip(*out):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def test_row_ties_on_transposed_images_are_matconvnet_column_ties():
    x = torch.randint(1, 4, (2, 3, 6, 8)).double().requires_grad_(True)  # many ties
    g = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    (col,) = torch.autograd.grad(fn.pool(x, 2, stride=2), x, g)
    xt = x.detach().transpose(2, 3).contiguous().requires_grad_(True)
    (row,) = torch.autograd.grad(fn.pool(xt, 2, stride=2, tie_order="row"), xt, g.transpose(2, 3))
    torch.testing.assert_close(row.transpose(2, 3), col, rtol=0, atol=0)


def test_model_weights_round_trip_and_shapes():
    weights = conv_weights(cnn_mnist_init(seed=1))
    model = FusedLeNet(MASKS, weights)
    for k in range(len(MASKS)):
        for (f, b), (f0, b0), shape in zip(model.model_weights(k), weights, CONV_SHAPES):
            assert f.shape == shape
            np.testing.assert_array_equal(f, f0)
            np.testing.assert_array_equal(b.reshape(-1), b0.reshape(-1))


def test_evaluate_counts_dead_relus_only_where_there_are_relus(data):
    imdb, _, val = data
    images, labels = image_tensors(imdb)
    model = FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=0)))
    with torch.no_grad():  # kill every unit of conv1 in model 3 (mask 1111): negative bias
        model.biases[0][3 * 20:4 * 20] = -1e6
    stats = FusedTrainer(model, images, labels).evaluate(val)
    for k, mask in enumerate(MASKS):
        for i in range(4):
            assert np.isnan(stats.dead_relu[i + 1][k]) == (not mask[i])
    assert stats.dead_relu[1][3] == 1.0
    assert 0 <= stats.image_err.min() and stats.image_err.max() <= 1


def test_diverged_models_are_those_whose_conv4_is_all_nan(data):
    imdb, _, _ = data
    images, labels = image_tensors(imdb)
    trainer = FusedTrainer(FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=0))), images, labels)
    filters, biases = trainer.model.weights[3], trainer.model.biases[3]
    with torch.no_grad():
        filters[10:20] = float("nan")      # model 1: conv4 all NaN -> NaN scores for good
        biases[10:20] = float("nan")
        filters[20:30] = float("nan")      # model 2: its biases still finite
        filters[30:40] = float("inf")      # model 3: infinite, not NaN: not counted
        biases[30:40] = float("inf")
    assert trainer.diverged_models() == [1]
    stats = trainer.evaluate(np.arange(1, 101))
    assert np.isnan(stats.objective[1]) and not np.isnan(stats.objective[0])


def test_composed_models_evaluate_layer_by_layer(data):
    """compose only changes how training steps run: evaluation (and its dead-ReLU counts) is the same."""
    imdb, _, val = data
    images, labels = image_tensors(imdb)
    stats = [FusedTrainer(FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=3)), conv="gemm", memory_format="nhwc",
                                     compose=compose), images, labels).evaluate(val)
             for compose in (False, True, "library")]
    for other in stats[1:]:
        for name in ("objective", "top1err", "image_err"):
            np.testing.assert_array_equal(getattr(stats[0], name), getattr(other, name))
        for i in range(1, 5):
            np.testing.assert_array_equal(stats[0].dead_relu[i], other.dead_relu[i])


def test_labels_are_validated_once():
    with pytest.raises(ValueError, match="labels"):
        FusedTrainer(FusedLeNet(MASKS[:1], conv_weights(cnn_mnist_init())), torch.zeros(2, 1, 28, 28),
                     torch.tensor([0, 3]))


def test_autotune_returns_a_measured_plan(data):
    imdb, _, _ = data
    images, labels = image_tensors(imdb, 400)
    candidates = candidate_plans("cpu", 2)
    best, timings = autotune_plan(MASKS[:2], conv_weights(cnn_mnist_init()), images, labels, steps=1)
    assert set(timings) == {plan_label(p) for p in candidates} and len(timings) == len(candidates)
    assert best in candidates and timings[plan_label(best)] == min(timings.values())


def autotune_with_build(data, monkeypatch, build, count):
    """autotune_plan over the first ``count`` CPU candidates of 2 models, building each plan's model
    with ``build(plan, candidates, real_build, *args)``; returns (candidates, best, timings)."""
    import matconvnet_port.fused as fused
    images, labels = image_tensors(data[0], 200)
    candidates = candidate_plans("cpu", 2)[:count]
    real_build = fused.build
    monkeypatch.setattr(fused, "build", lambda plan, *args: build(plan, candidates, real_build, *args))
    best, timings = autotune_plan(MASKS[:2], conv_weights(cnn_mnist_init()), images, labels, steps=1,
                                  candidates=candidates)
    monkeypatch.setattr(fused, "build", real_build)
    return candidates, best, timings


def test_autotune_skips_a_plan_that_fails_on_the_device(data, monkeypatch, capsys):
    """A candidate that fails (out of device memory, say) is reported and skipped, not fatal."""
    def out_of_memory(plan, candidates, real_build, *args):
        if plan is candidates[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_build(plan, *args)

    candidates, best, timings = autotune_with_build(data, monkeypatch, out_of_memory, 2)
    assert best is candidates[1] and list(timings) == [plan_label(candidates[1])]
    assert f"skipped plan {plan_label(candidates[0])}: OutOfMemoryError: CUDA out of memory" in capsys.readouterr().err

    def candidate_bug(plan, candidates, real_build, *args):  # any error of one candidate, not only the device's
        if plan is candidates[1]:
            raise TypeError("unsupported operand")
        return real_build(plan, *args)

    candidates, best, timings = autotune_with_build(data, monkeypatch, candidate_bug, 2)
    assert best is candidates[0] and list(timings) == [plan_label(candidates[0])]
    assert f"skipped plan {plan_label(candidates[1])}: TypeError: unsupported operand" in capsys.readouterr().err

    def no_kernel(*args):
        raise RuntimeError("no kernel")

    with pytest.raises(RuntimeError, match="every candidate plan failed"):
        autotune_with_build(data, monkeypatch, no_kernel, 2)


def test_autotune_rejects_a_plan_that_computes_something_else(data, monkeypatch, capsys):
    """A candidate whose first-step gradients differ from the reference candidate's is never chosen."""
    def wrong_conv2(plan, candidates, real_build, *args):
        model = real_build(plan, *args)
        if plan is candidates[1]:  # a wrong kernel, as it were: conv2's filters off by 20 %
            with torch.no_grad():
                model.weights[1].mul_(1.2)
        return model

    candidates, best, timings = autotune_with_build(data, monkeypatch, wrong_conv2, 3)
    assert len(timings) == 3 and best is not candidates[1]  # timed, but never chosen
    err = capsys.readouterr().err
    assert f"will not use plan {plan_label(candidates[1])}: its first-step gradients differ" in err
    assert f"plan {plan_label(candidates[0])}:" not in err and f"plan {plan_label(candidates[2])}:" not in err


def test_autotune_consensus_flags_only_real_outliers():
    from matconvnet_port.fused import _fastest_usable, _first_step_outliers
    t = torch.randn(50, 20, 5, 5)
    u = torch.randn(50)
    close = {"a": [t, u], "b": [t * (1 + 1e-6), u], "fft": [t + 1.7e-3 * t.abs().max(), u]}
    assert _first_step_outliers(close) == {}  # FFT-style rounding is not an error
    wrong = dict(close, bug=[t, u * 1.3])
    assert set(_first_step_outliers(wrong)) == {"bug"}
    assert set(_first_step_outliers(dict(close, nan=[t * float("nan"), u]))) == {"nan"}
    assert set(_first_step_outliers({"a": [t, u], "b": [t, -u]})) == {"a", "b"}  # two disagree: both
    timings = {"a": 3.0, "bug": 1.0, "c": 2.0}
    assert _fastest_usable(timings, {"bug": 0.3}) == "c"  # the fastest is wrong: never chosen
    assert _fastest_usable(timings, {"a": 1, "bug": 1, "c": 1}) == "a"  # no consensus: the reference


def test_plans_are_parsed_and_labelled():
    assert parse_conv("gemm") == ("gemm",) * 4
    assert parse_conv(" grouped, loop ,gemm,gemm") == ("grouped", "loop", "gemm", "gemm")
    assert parse_conv("gemm,streams,gemm,gemm") == ("gemm", "streams", "gemm", "gemm")
    for bad in ("fast", "gemm,gemm", "grouped,grouped,gemm,gemm,gemm"):
        with pytest.raises(ValueError, match="conv must be one of"):
            parse_conv(bad)
    with pytest.raises(ValueError, match="memory_format"):
        FusedLeNet(MASKS, conv_weights(cnn_mnist_init()), memory_format="nwhc")
    assert plan_label(default_plan("cpu", 28, 16)) == "nhwc gemm,grouped,gemm,gemm x8"
    assert plan_label(default_plan("cpu", 64, 16)) == "nhwc gemm,grouped,gemm,gemm x8 +compose=library"
    assert plan_label({"conv": "grouped"}) == "nchw grouped"
    # plans saved before the library composition existed said True for the GEMM one
    assert plan_label({"conv": "gemm", "compose": True}) == plan_label({"conv": "gemm", "compose": "gemm"}) \
        == "nchw gemm +compose"
    with pytest.raises(ValueError, match="compose must be"):
        FusedLeNet(MASKS, conv_weights(cnn_mnist_init()), compose="fft")


def test_relu_and_pooling_commute_exactly_ties_included():
    """FusedLeNet pools before its ReLUs when the windows tile the map: same values and derivatives."""
    x = torch.randint(-2, 3, (3, 6, 8, 6)).double()  # integers: many ties, exact zeros
    flags = [True, False, True, True, False, True]
    g = torch.randn(3, 6, 4, 3, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        a = x.clone().contiguous(memory_format=layout).requires_grad_(True)
        b = x.clone().contiguous(memory_format=layout).requires_grad_(True)
        ya = fn.pool(fn.channel_relu(a, flags), 2, stride=2, tie_order="row")
        yb = fn.channel_relu(fn.pool(b, 2, stride=2, tie_order="row"), flags)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        (ga,), (gb,) = torch.autograd.grad(ya, a, g), torch.autograd.grad(yb, b, g)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_equals_eager_steps(data):
    imdb, train, val = data
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    images, labels = image_tensors(imdb)
    images = images.cuda()
    results = []
    for graph in (False, True):
        model = FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=2)), conv="loop").cuda()
        trainer = FusedTrainer(model, images, labels, seed=2, use_cuda_graph=graph)
        stats = [trainer.train_epoch(e, train) for e in (1, 2)]
        results.append((model.model_weights(1), stats[-1].objective))
    for (fa, _), (fb, _) in zip(results[0][0], results[1][0]):
        assert np.abs(fa - fb).max() / np.abs(fa).max() <= 1e-5
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_cuda_matches_cpu(data):
    imdb, train, val = data
    torch.backends.cudnn.allow_tf32 = False
    images, labels = image_tensors(imdb)
    out = []
    for device in ("cpu", "cuda"):
        model = FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=4)), conv="grouped").to(device)
        trainer = FusedTrainer(model, images.to(device), labels, seed=4)
        trainer.train_epoch(1, train)
        out.append(model.model_weights(2))
    for (fa, _), (fb, _) in zip(*out):
        assert np.abs(fa - fb).max() / np.abs(fa).max() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("plan", [p for p in candidate_plans("cuda", len(MASKS))
                                  if p["memory_format"] == "nhwc" or p["compose"]],
                         ids=lambda p: plan_label(p).replace(" ", "-"))
def test_cuda_plans_match_cpu_under_graph_replay(data, plan):
    """The CUDA autotune's channels-last and composed candidates (GEMM convs, composition) captured as
    CUDA graphs."""
    imdb, train, _ = data
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    images, labels = image_tensors(imdb)
    out = []
    for device in ("cpu", "cuda"):
        model = build(plan, MASKS, conv_weights(cnn_mnist_init(seed=6)), device)
        trainer = FusedTrainer(model, images.to(device), labels, seed=6, chunk_size=plan["chunk_size"])
        trainer.train_epoch(1, train)
        out.append([model.model_weights(k) for k in range(len(MASKS))])
    for k in range(len(MASKS)):
        for (fa, _), (fb, _) in zip(out[0][k], out[1][k]):
            assert np.abs(fa - fb).max() / np.abs(fa).max() <= 1e-4


def test_chunked_passes_equal_one_pass(data):
    """Training the models a few at a time (the CPU plan at large N) changes nothing but speed."""
    imdb, train, _ = data
    images, labels = image_tensors(imdb)
    out = []
    for chunk in (None, 2):
        model = FusedLeNet(MASKS, conv_weights(cnn_mnist_init(seed=5)), conv="loop")
        stats = FusedTrainer(model, images, labels, seed=5, chunk_size=chunk).train_epoch(1, train[:200])
        out.append((model, stats))
    for k in range(len(MASKS)):
        for (fa, _), (fb, _) in zip(out[0][0].model_weights(k), out[1][0].model_weights(k)):
            assert np.abs(fa - fb).max() / np.abs(fa).max() <= 1e-5
    np.testing.assert_allclose(out[0][1].objective, out[1][1].objective, rtol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_stops_page_faults_on_reused_memory():
    """Freed large tensors come back without new page faults (a trim threshold that wrapped
    around to 0 once made every step fault its whole working set in again)."""
    import resource

    assert keep_freed_memory()

    def churn():
        a = torch.empty(12_000_000).fill_(1)  # 48 MB, then a smaller block above it, then free both
        b = torch.empty(3_000_000).fill_(2)
        del a
        c = torch.empty(8_000_000).fill_(3)
        del b, c

    for _ in range(5):  # the heap grows to its steady shape
        churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2000, f"{faults} page faults (~{faults * 4 // 1024} MB) re-faulted"
