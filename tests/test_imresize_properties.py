"""Property tests of ``matconvnet_port.imresize`` (no reference data needed)."""

import math

import numpy as np
import pytest
import torch

from matconvnet_port.imresize import imresize, resize_matrix, resize_weights

METHODS = ["bicubic", "bilinear", "nearest", "lanczos2", "lanczos3"]


# ---------------------------------------------------------------- slow reference
# A direct, loop-based evaluation of MATLAB's imresize formula, written
# independently of the vectorised implementation (scalar kernels, explicit
# mirror table, 2-D double sum per output pixel).

def _k_cubic(t):
    a = abs(t)
    if a <= 1:
        return 1.5 * a ** 3 - 2.5 * a ** 2 + 1
    if a <= 2:
        return -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2
    return 0.0


def _k_linear(t):
    return max(0.0, 1.0 - abs(t))


def _k_box(t):
    return 1.0 if -0.5 <= t < 0.5 else 0.0


def _k_lanczos(a):
    def k(t):
        if abs(t) >= a:
            return 0.0
        if t == 0:
            return 1.0
        return a * math.sin(math.pi * t) * math.sin(math.pi * t / a) / (math.pi ** 2 * t ** 2)
    return k


_SLOW = {"bicubic": (_k_cubic, 4), "bilinear": (_k_linear, 2), "nearest": (_k_box, 1),
         "lanczos2": (_k_lanczos(2), 4), "lanczos3": (_k_lanczos(3), 6)}


def _slow_taps(n_in, n_out, method, aa):
    kern, width = _SLOW[method]
    s = n_out / n_in
    if s < 1 and aa:
        h = lambda t: s * kern(s * t)  # noqa: E731
        width = width / s
    else:
        h = kern
    mirror = list(range(1, n_in + 1)) + list(range(n_in, 0, -1))
    rows = []
    for x in range(1, n_out + 1):
        u = x / s + 0.5 * (1 - 1 / s)
        left = math.floor(u - width / 2)
        taps = [left + p for p in range(math.ceil(width) + 2)]
        w = [h(u - t) for t in taps]
        tot = sum(w)
        rows.append([(mirror[(t - 1) % (2 * n_in)] - 1, wi / tot) for t, wi in zip(taps, w)])
    return rows


def _slow_imresize(a, out_hw, method, aa):
    rr = _slow_taps(a.shape[0], out_hw[0], method, aa)
    cc = _slow_taps(a.shape[1], out_hw[1], method, aa)
    out = np.zeros(out_hw)
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            out[i, j] = sum(wi * wj * a[pi, pj] for pi, wi in rr[i] for pj, wj in cc[j])
    return out


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("out_hw,aa", [
    ((13, 17), None),   # enlarge both
    ((4, 3), True),     # shrink both, antialiased
    ((4, 3), False),    # shrink both, plain
    ((11, 5), True),    # mixed: enlarge rows, shrink columns
    ((7, 9), None),     # identity
    ((3, 14), None),
])
def test_matches_direct_formula(method, out_hw, aa):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, size=(7, 9))
    want = _slow_imresize(a, out_hw, method, aa if aa is not None else method != "nearest")
    got = imresize(a, out_hw, method, antialiasing=aa)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_default_antialiasing_follows_matlab():
    a = np.random.default_rng(1).normal(size=(12, 12))
    # nearest: off by default; bicubic: on by default
    np.testing.assert_array_equal(imresize(a, (5, 5), "nearest"), imresize(a, (5, 5), "nearest", False))
    np.testing.assert_array_equal(imresize(a, (5, 5)), imresize(a, (5, 5), "bicubic", True))
    assert not np.allclose(imresize(a, (5, 5)), imresize(a, (5, 5), antialiasing=False))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_at_same_size(method, dtype):
    a = np.random.default_rng(2).uniform(0, 255, size=(6, 8, 2, 3)).astype(dtype)
    b = imresize(a, (6, 8), method)
    assert b.dtype == dtype and b is not a
    np.testing.assert_array_equal(b, a)
    # the resize matrix itself is the identity (up to the Lanczos sinc rounding)
    np.testing.assert_allclose(resize_matrix(8, 8, method=method), np.eye(8), atol=1e-15)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("out_hw", [(3, 4), (13, 29), (5, 40), (1, 1)])
def test_constant_stays_constant(method, out_hw):
    a = np.full((9, 11), 137.25)
    np.testing.assert_allclose(imresize(a, out_hw, method), 137.25, rtol=1e-14)
    a32 = a.astype(np.float32)
    np.testing.assert_allclose(imresize(a32, out_hw, method), 137.25, rtol=2e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_in,n_out,aa", [(28, 64, True), (28, 13, True), (28, 13, False),
                                           (5, 1, True), (1, 7, True), (10, 3, True), (3, 10, True)])
def test_weights_sum_to_one(method, n_in, n_out, aa):
    w, idx = resize_weights(n_in, n_out, method=method, antialiasing=aa)
    assert w.shape == idx.shape and w.shape[0] == n_out
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-14)
    assert idx.min() >= 0 and idx.max() < n_in
    assert np.all(np.any(w != 0, axis=0))  # all-zero tap columns were dropped
    np.testing.assert_allclose(resize_matrix(n_in, n_out, method=method, antialiasing=aa).sum(axis=1), 1.0,
                               rtol=1e-14)


def test_mirroring_is_symmetric():
    # taps left of pixel 1 mirror as 0 -> 1, -1 -> 2 (1-based): the edge pixel repeats
    w, idx = resize_weights(4, 8)
    assert idx[0].tolist()[:3] == [1, 0, 0]


def test_one_d_vs_two_d():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 6))
    # resizing only the rows = applying the row matrix; only the columns likewise
    np.testing.assert_allclose(imresize(a, (20, 6)), resize_matrix(9, 20) @ a, atol=1e-12)
    np.testing.assert_allclose(imresize(a, (9, 4)), a @ resize_matrix(6, 4).T, atol=1e-12)
    # a 2-D resize is the two 1-D resizes in sequence, either way round (float64)
    both = imresize(a, (20, 4))
    np.testing.assert_allclose(imresize(imresize(a, (9, 4)), (20, 4)), both, atol=1e-12)
    np.testing.assert_allclose(imresize(imresize(a, (20, 6)), (20, 4)), both, atol=1e-12)
    # a column vector behaves as a 1-D signal
    v = rng.normal(size=(9, 1))
    np.testing.assert_allclose(imresize(v, (20, 1))[:, 0], resize_matrix(9, 20) @ v[:, 0], atol=1e-12)


def test_channels_and_batch_are_independent():
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 255, size=(7, 5, 3, 4)).astype(np.float32)
    b = imresize(a, (12, 9))
    assert b.shape == (12, 9, 3, 4) and b.dtype == np.float32
    for c in range(3):
        for n in range(4):
            np.testing.assert_array_equal(b[:, :, c, n], imresize(a[:, :, c, n], (12, 9)))
    np.testing.assert_array_equal(imresize(a[:, :, :, 0], (12, 9)), b[:, :, :, 0])


def test_axes_keyword():
    a = np.random.default_rng(5).normal(size=(7, 5, 3, 4))
    nchw = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    got = imresize(nchw, (10, 8), axes=(2, 3))
    np.testing.assert_allclose(got, imresize(a, (10, 8)).transpose(3, 2, 0, 1), atol=1e-12)
    # non-contiguous input works too
    np.testing.assert_allclose(imresize(a.transpose(1, 0, 2, 3), (8, 10)),
                               imresize(a, (10, 8)).transpose(1, 0, 2, 3), atol=1e-12)


@pytest.mark.parametrize("method", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_matches_numpy(method, dtype):
    a = np.random.default_rng(6).uniform(0, 255, size=(28, 28, 1, 5)).astype(dtype)
    for size in [(64, 64), (13, 40)]:
        want = imresize(a, size, method)
        got = imresize(torch.from_numpy(a), size, method)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.from_numpy(a).dtype
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_numpy():
    a = np.random.default_rng(7).uniform(0, 255, size=(28, 28, 1, 64)).astype(np.float32)
    got = imresize(torch.from_numpy(a).cuda(), (64, 64))
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), imresize(a, (64, 64)), rtol=1e-6, atol=0)


def test_scalar_scale():
    a = np.random.default_rng(8).normal(size=(7, 10))
    b = imresize(a, 0.5)
    assert b.shape == (4, 5)  # ceil(0.5 * [7 10])
    # MATLAB uses the given factor (0.5), not 4/7, for the rows
    np.testing.assert_allclose(b, resize_matrix(7, 4, 0.5) @ a @ resize_matrix(10, 5, 0.5).T, atol=1e-12)
    assert imresize(a, 2).shape == (14, 20)


@pytest.mark.parametrize("bad,match", [
    (dict(A=np.zeros((4, 4), np.int64)), "A must be float32.*int64"),
    (dict(A=np.zeros((4, 4), np.complex64)), "A must be float32.*complex64"),
    (dict(A=torch.zeros(4, 4, dtype=torch.int64)), "A must be a floating.*int64"),
    (dict(A=[[1.0, 2.0]]), "A must be a numpy"),
    (dict(A=np.zeros(4)), "A must be H x W"),
    (dict(A=np.zeros((2, 2, 2, 2, 2))), "A must be H x W"),
    (dict(A=np.zeros((0, 4))), "A must not be empty"),
    (dict(out_size=(0, 4)), "out_size"),
    (dict(out_size=(-3, 4)), "out_size"),
    (dict(out_size=(3.5, 4)), "out_size"),
    (dict(out_size=(3, 4, 5)), "out_size"),
    (dict(out_size=(float("nan"), float("nan"))), "out_size"),
    (dict(out_size=-2.0), "out_size"),
    (dict(out_size="big"), "out_size"),
    (dict(method="spline"), "method"),
    (dict(antialiasing="yes"), "antialiasing"),
    (dict(axes=(0, 0)), "axes"),
    (dict(axes=(0, 5)), "axes"),
])
def test_bad_input(bad, match):
    kw = dict(A=np.zeros((4, 4)), out_size=(3, 3))
    kw.update(bad)
    A = kw.pop("A")
    out_size = kw.pop("out_size")
    with pytest.raises(ValueError, match=match) as e:
        imresize(A, out_size, **kw)
    assert "\n" not in str(e.value)
