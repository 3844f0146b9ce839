"""``imresize`` size forms ``[M NaN]`` / ``[NaN N]`` and integer / logical images.

MATLAB behaviour relied on (Image Processing Toolbox ``imresize.m``,
``fixupSize`` / ``deriveScaleFromSize`` / ``resizeAlongDim`` /
``preprocessImage`` / ``postprocessImage``):

* ``[M NaN]``: the missing length is ``ceil(M * cols / rows)`` and both
  dimensions' kernels use ``scale = M / rows``; two NaNs are an error;
* integer classes are resized in double, one dimension at a time, each pass
  stored in the input's class (double -> int: nearest, halves away from
  zero, saturated);
* logical: resized as ``im2uint8`` (0 / 255) and returned as ``B > 128``.

The references below apply :func:`resize_matrix` by hand and round with
``decimal`` (exact for a float), not with the module's helpers.
"""

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch

from matconvnet_port.imresize import imresize, resize_matrix

NP_INTS = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32]
TORCH_INTS = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32}


# ---------------------------------------------------------------- references

def _ceil_div(a, b):
    return -(-a // b)


def _round_half_away(x):
    # Decimal(float) is exact and ROUND_HALF_UP rounds halves away from zero.
    f = np.vectorize(lambda v: float(Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP)))
    return f(np.asarray(x, np.float64)) if np.size(x) else np.asarray(x, np.float64)


def _pass(y, mat, d):
    """Apply ``mat`` (out x in) along dimension ``d`` of ``y``, in float64."""
    return np.moveaxis(np.tensordot(mat, np.asarray(y, np.float64), axes=([1], [d])), 0, d)


def _ref_resize(a, out_hw, method="bicubic", aa=None, scales=None):
    """MATLAB's two passes by hand; an integer ``a`` is rounded and clipped after each."""
    in_hw = a.shape[:2]
    if scales is None:
        scales = (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1])
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    y = a
    for d in order:
        y = _pass(y, resize_matrix(in_hw[d], out_hw[d], scales[d], method, aa), d)
        if np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            y = np.clip(_round_half_away(y), info.min, info.max).astype(a.dtype)
    return y


def _random_int(dtype, shape, seed):
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


# ---------------------------------------------------------------- [M NaN] / [NaN N]

# (rows, cols, M); (3, 15, 25): 25 * 15 / 3 = 125 exactly, but (25 / 3) * 15
# = 125.00000000000001 in floating point, so ceil(scale * cols) would say 126.
ROW_GIVEN = [(7, 10, 4), (3, 15, 25), (28, 20, 64), (9, 6, 5), (10, 3, 1), (6, 9, 6)]


@pytest.mark.parametrize("rows,cols,m", ROW_GIVEN)
def test_rows_given(rows, cols, m):
    a = np.random.default_rng(rows * 100 + cols).normal(size=(rows, cols))
    n = _ceil_div(m * cols, rows)
    s = m / rows
    got = imresize(a, (m, np.nan))
    assert got.shape == (m, n)
    # both dimensions use the row scale, as with a scalar scale factor
    want = resize_matrix(rows, m, s) @ a @ resize_matrix(cols, n, s).T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # = imresize(A, s) where the shapes agree (a tap depends on x and s only,
    # so the leading block of a larger scalar-scale result is the same)
    by_scale = imresize(a, s)
    assert by_scale.shape[0] >= m and by_scale.shape[1] >= n
    np.testing.assert_allclose(got, by_scale[:m, :n], rtol=0, atol=1e-12)
    if n / cols != s:  # not the per-dimension scales of an explicit (M, N)
        assert not np.allclose(got, imresize(a, (m, n)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows,cols,m", ROW_GIVEN)
def test_cols_given(rows, cols, m):
    # the same cases transposed: N given, rows derived
    a = np.random.default_rng(rows * 100 + cols).normal(size=(cols, rows))
    n_given, m_out = m, _ceil_div(m * cols, rows)
    s = n_given / rows
    got = imresize(a, [float("nan"), n_given])
    assert got.shape == (m_out, n_given)
    want = resize_matrix(cols, m_out, s) @ a @ resize_matrix(rows, n_given, s).T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    by_scale = imresize(a, s)
    np.testing.assert_allclose(got, by_scale[:m_out, :n_given], rtol=0, atol=1e-12)


def test_matlab_example_shape():
    # MATLAB's help: imresize(RGB, [64 NaN]) on a 384 x 512 x 3 image -> 64 x 86 x 3
    a = np.zeros((384, 512, 3), np.float32)
    assert imresize(a, [64, np.nan]).shape == (64, 86, 3)
    assert imresize(a, [np.nan, 86]).shape == (65, 86, 3)  # ceil(86 * 384 / 512) = ceil(64.5)


@pytest.mark.parametrize("spelling", [
    lambda m: (m, float("nan")),
    lambda m: [m, np.nan],
    lambda m: np.array([m, np.nan]),
    lambda m: (np.int64(m), np.float32("nan")),
])
def test_nan_spellings(spelling):
    a = np.random.default_rng(11).normal(size=(7, 10))
    np.testing.assert_array_equal(imresize(a, spelling(4)), imresize(a, (4, float("nan"))))


def test_nan_form_torch_and_axes():
    a = np.random.default_rng(12).uniform(0, 255, size=(7, 10, 2, 3))
    want = imresize(a, (4, np.nan))
    assert want.shape == (4, 6, 2, 3)
    np.testing.assert_allclose(imresize(torch.from_numpy(a), (4, np.nan)).numpy(), want, rtol=0, atol=1e-12)
    nchw = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    np.testing.assert_allclose(imresize(nchw, (4, np.nan), axes=(2, 3)), want.transpose(3, 2, 0, 1),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("size,match", [
    ((np.nan, np.nan), "NaN"),
    ([float("nan")] * 2, "NaN"),
    ((3, np.nan, 4), "2 entries"),
    ((np.nan,), "2 entries"),
    ((0, np.nan), "out_size"),
    ((np.nan, -2), "out_size"),
    ((2.5, np.nan), "out_size"),
    (np.nan, "out_size"),
])
def test_nan_form_errors(size, match):
    with pytest.raises(ValueError, match=match) as e:
        imresize(np.zeros((4, 6)), size)
    assert "out_size" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- integer images

@pytest.mark.parametrize("dtype", NP_INTS)
@pytest.mark.parametrize("method", ["bicubic", "bilinear", "nearest", "lanczos3"])
@pytest.mark.parametrize("out_size,aa", [
    ((13, 17), None),  # enlarge both
    ((4, 3), None),    # shrink both, antialiased
    ((4, 3), False),
    ((11, 5), None),   # columns (smaller scale) first
    ((3, 14), None),   # rows first
    ((7, 9), None),    # identity
])
def test_integer_matches_two_rounded_passes(dtype, method, out_size, aa):
    a = _random_int(dtype, (7, 9, 2), seed=NP_INTS.index(dtype))
    got = imresize(a, out_size, method, antialiasing=aa)
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, _ref_resize(a, out_size, method, aa))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_integer_smooth_image(dtype):
    # mid-range values, where rounding (not saturation) decides every pixel
    y, x = np.mgrid[0:12, 0:10]
    a = (60 + 5 * x + 3 * y + (x * y) % 7).astype(dtype)
    for size in [(25, 21), (5, 4), (12, 3), (30, 10)]:
        np.testing.assert_array_equal(imresize(a, size), _ref_resize(a, size))


def test_integer_nan_form_uses_given_scale():
    a = _random_int(np.uint8, (7, 10), seed=20)
    s = 4 / 7
    np.testing.assert_array_equal(imresize(a, (4, np.nan)), _ref_resize(a, (4, 6), scales=(s, s)))


def test_exact_half_rounds_away_from_zero():
    # 'bilinear' halving of [0 1]: weights exactly 1/2 and 1/2 -> 0.5 exactly
    assert imresize(np.array([[0.0, 1.0]]), (1, 1), "bilinear")[0, 0] == 0.5
    assert imresize(np.array([[0, 1]], np.uint8), (1, 1), "bilinear")[0, 0] == 1
    assert imresize(np.array([[0, -1]], np.int8), (1, 1), "bilinear")[0, 0] == -1
    assert imresize(np.array([[2, 3]], np.int16), (1, 1), "bilinear")[0, 0] == 3   # 2.5 -> 3, not 2
    assert imresize(np.array([[-3, -2]], np.int32), (1, 1), "bilinear")[0, 0] == -3


def test_intermediate_is_rounded():
    # rows first (tie): [0 1; 1 2] -> [0.5 1.5] -> stored as [1 2] -> 1.5 -> 2.
    # One rounding at the end would give (0 + 1 + 1 + 2) / 4 = 1; halves to even, [0 2] -> 1.
    a = np.array([[0, 1], [1, 2]])
    assert imresize(a.astype(np.float64), (1, 1), "bilinear")[0, 0] == 1.0
    assert imresize(a.astype(np.uint8), (1, 1), "bilinear")[0, 0] == 2
    assert imresize(-a.astype(np.int8), (1, 1), "bilinear")[0, 0] == -2


def test_rounding_helper_edges():
    # the float just below 1/2: floor(|y| + 0.5) would round it up, as the sum rounds to 1.0
    from matconvnet_port.imresize import _round_saturate
    below = np.nextafter(0.5, 0.0)
    y = np.array([below, -below, 0.5, -0.5, 1.5, 2.5, -2.5, 2 ** 52 + 1.0, 254.5, 255.5, -128.5, -129.0])
    want = np.clip(_round_half_away(y), -128, 255)
    np.testing.assert_array_equal(_round_saturate(y, -128, 255), want)
    np.testing.assert_array_equal(_round_saturate(torch.from_numpy(y), -128, 255).numpy(), want)
    assert want[:4].tolist() == [0, 0, 1, -1]  # the reference itself: halves away from zero


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32])
def test_bicubic_overshoot_saturates(dtype):
    info = np.iinfo(dtype)
    step = np.array([[info.min] * 3 + [info.max] * 3], dtype)
    f = imresize(step.astype(np.float64), (1, 12))
    assert f.min() < info.min and f.max() > info.max  # the overshoot is real
    got = imresize(step, (1, 12))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.clip(_round_half_away(f), info.min, info.max).astype(dtype))
    assert got[0, 3] == got[0, 4] == info.min and got[0, 7] == got[0, 8] == info.max  # clipped, not wrapped
    # 2-D: the first pass saturates too, before the second one sees it
    sq = np.full((6, 6), info.min, dtype)
    sq[3:, 3:] = info.max
    np.testing.assert_array_equal(imresize(sq, (12, 12)), _ref_resize(sq, (12, 12)))


@pytest.mark.parametrize("tdtype", list(TORCH_INTS))
def test_torch_integer_matches_numpy(tdtype):
    a = torch.from_numpy(_random_int(TORCH_INTS[tdtype], (9, 7, 3), seed=30))
    assert a.dtype == tdtype
    for size in [(20, 15), (4, 3), (9, 2), (5, np.nan)]:
        got = imresize(a, size)
        assert isinstance(got, torch.Tensor) and got.dtype == tdtype
        np.testing.assert_array_equal(got.numpy(), imresize(a.numpy(), size))
    # and the halves there too
    assert imresize(torch.tensor([[0, 1], [1, 2]], dtype=tdtype), (1, 1), "bilinear").item() == 2


# ---------------------------------------------------------------- logical images

@pytest.mark.parametrize("size,method", [((14, 11), "bicubic"), ((4, 3), "bicubic"), ((9, 4), "bilinear"),
                                         ((5, 5), "nearest"), ((9, 7), "bicubic")])
def test_logical_is_uint8_thresholded(size, method):
    a = np.random.default_rng(40).random((9, 7)) < 0.4
    got = imresize(a, size, method)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, _ref_resize(a.astype(np.uint8) * np.uint8(255), size, method) > 128)
    gt = imresize(torch.from_numpy(a), size, method)
    assert gt.dtype == torch.bool
    np.testing.assert_array_equal(gt.numpy(), got)


def test_logical_threshold_is_above_128():
    # bilinear halving of [false true]: 127.5 -> uint8 128, and 128 is not > 128.
    # [false true; true true]: rows first, [127.5 255] -> [128 255] -> 191.5 -> 192 > 128.
    assert not imresize(np.array([[False, True]]), (1, 1), "bilinear")[0, 0]
    assert imresize(np.array([[False, True], [True, True]]), (1, 1), "bilinear")[0, 0]


# ---------------------------------------------------------------- unsupported dtypes

@pytest.mark.parametrize("a,name", [
    (np.zeros((4, 4), np.int64), "int64"),
    (np.zeros((4, 4), np.uint64), "uint64"),
    (np.zeros((4, 4), np.float16), "float16"),
    (np.zeros((4, 4), np.complex128), "complex128"),
    (np.zeros((4, 4), object), "object"),
    (torch.zeros(4, 4, dtype=torch.int64), "torch.int64"),
    (torch.zeros(4, 4, dtype=torch.complex64), "torch.complex64"),
])
def test_unsupported_dtype_is_named(a, name):
    with pytest.raises(ValueError, match=f"A must be .*got {name}$") as e:
        imresize(a, (3, 3))
    assert "\n" not in str(e.value)
