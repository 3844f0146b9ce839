"""vl_nnroipool and dagnn.ROIPooling against a loop-by-loop transcription of MatConvNet's MEX code.

MatConvNet wrote no ROI-pooling reference here, so ``mex_roipool`` below restates
``matlab/src/bits/nnroipooling.cu`` (forward and backward, max) in numpy on MATLAB-layout
arrays: its own loops, its float32 arithmetic, its column-major scan -- a second reading of the
source, independent of the port's tensor code.
"""

import math

import numpy as np
import pytest
import torch

from matconvnet_port import MatFormatError, functional as fn, load_net, save_net, vl_nnroipool
from matconvnet_port.dagnn import DagNN
from matconvnet_port.inspect import layer_table

RNG = np.random.default_rng(11)


def c_round(v):
    """C's round(), half away from zero, exactly."""
    r = math.floor(abs(v))
    return math.copysign(r + (abs(v) - r >= 0.5), v)


def mex_roipool(x, rois, subdivisions, transform, dzdy=None):
    """(y, dzdx) as the MEX loops compute them, x H x W x C x N (single or double), rois 5 x K."""
    real = x.dtype.type
    t = np.asarray(transform, np.float64).reshape(-1, order="F")
    tr = [t[0], 0, 0, t[-1], 1 - t[0], 1 - t[-1]] if t.size <= 2 else list(t)
    h_, w_, depth, size = x.shape
    k = rois.shape[1]
    sh, sw = subdivisions
    y = np.zeros((sh, sw, depth, k), x.dtype)
    dx = np.zeros_like(x)
    for roi in range(k):
        u1_, v1_, u2_, v2_ = (float(real(v)) for v in rois[1:, roi])  # the rois in x's type, then double
        u1 = real(tr[0] * u1_ + tr[2] * v1_ + tr[4])
        v1 = real(tr[1] * u1_ + tr[3] * v1_ + tr[5])
        u2 = real(tr[0] * u2_ + tr[2] * v2_ + tr[4])
        v2 = real(tr[1] * u2_ + tr[3] * v2_ + tr[5])
        image = min(max(int(real(rois[0, roi])) - 1, 0), size - 1)  # (int) truncates toward zero
        start_h, start_w = int(c_round(float(v1))) - 1, int(c_round(float(u1))) - 1
        height = max(int(c_round(float(v2))) - 1 - start_h + 1, 1)
        width = max(int(c_round(float(u2))) - 1 - start_w + 1, 1)
        bin_h, bin_w = real(height) / real(sh), real(width) / real(sw)
        for z in range(depth):
            for pw in range(sw):
                ws = min(max(int(np.floor(real(pw) * bin_w)) + start_w, 0), w_)
                we = min(max(int(np.ceil(real(pw + 1) * bin_w)) + start_w, 0), w_)
                for ph in range(sh):
                    hs = min(max(int(np.floor(real(ph) * bin_h)) + start_h, 0), h_)
                    he = min(max(int(np.ceil(real(ph + 1) * bin_h)) + start_h, 0), h_)
                    if he <= hs or we <= ws:
                        continue  # y stays 0, no derivative
                    best, at = -np.inf, None
                    for w in range(ws, we):
                        for h in range(hs, he):
                            best = max(best, x[h, w, z, image])  # std::max(value, x): NaN never wins
                    value = -np.inf
                    for w in range(ws, we):
                        for h in range(hs, he):
                            if x[h, w, z, image] > value:  # accumulate_backward
                                value, at = x[h, w, z, image], (h, w)
                    y[ph, pw, z, roi] = best
                    if dzdy is not None and at is not None:
                        dx[at[0], at[1], z, image] += dzdy[ph, pw, z, roi]
    return y, dx


def random_rois(k, n, h, w):
    """Boxes inside, across and outside the image, fractional corners (some at .5), image indices
    0..n+1 with fractional and negative ones (truncated toward zero, then clamped)."""
    t = RNG.integers(0, n + 2, k) + RNG.choice([0.0, 0.7, -0.5], k)
    u = np.sort(RNG.uniform(-2, w + 3, (2, k)), axis=0)
    v = np.sort(RNG.uniform(-2, h + 3, (2, k)), axis=0)
    u[:, ::5], v[:, ::5] = np.round(u[:, ::5]) + 0.5, np.round(v[:, ::5]) - 0.5
    return np.vstack([t, u[0], v[0], u[1], v[1]]).astype(np.float32)


@pytest.mark.parametrize("subdivisions", [(1, 1), (2, 3), (6, 6), (7, 4)])
@pytest.mark.parametrize("transform", [1, 0.0625, [0.5, 0.25], [[0.5, 0.1, 1.5], [0.05, 0.25, -2]]])
def test_vl_nnroipool_is_the_mex_codes_max_pooling_forward_and_backward(subdivisions, transform):
    x = RNG.standard_normal((9, 11, 3, 2)).astype(np.float32)
    x[:, :, 0, 0] = np.round(x[:, :, 0, 0])  # ties: the derivative goes to the first maximum scanned
    rois = random_rois(12, 2, 9, 11)
    t = np.asarray(transform, np.float64)
    scaled = rois.copy()
    if t.size == 1 and t != 1:  # a feature map 1/16 of the image: boxes given in image pixels
        scaled[1:] = rois[1:] * 16
    y_ref, _ = mex_roipool(x, scaled, subdivisions, transform)
    y = vl_nnroipool(x, scaled, subdivisions=list(subdivisions), transform=transform)
    assert y.shape == y_ref.shape
    np.testing.assert_array_equal(y, y_ref)
    dzdy = RNG.standard_normal(y.shape).astype(np.float32)
    _, dx_ref = mex_roipool(x, scaled, subdivisions, transform, dzdy)
    np.testing.assert_allclose(vl_nnroipool(x, scaled, dzdy, subdivisions=list(subdivisions), transform=transform),
                               dx_ref, rtol=1e-6, atol=1e-6)


def test_roipool_average_is_the_mean_of_the_clipped_tile_and_differentiable():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = [1, 0, 0, 4, 3]  # starts outside the image: the tile is clipped to it
    y = fn.roipool(x, rois, (1, 1), 1, "avg")
    torch.testing.assert_close(y.reshape(-1), x[0, :, :3, :4].mean(dim=(1, 2)))
    assert torch.autograd.gradcheck(lambda t: fn.roipool(t, rois, (2, 2), 1, "avg"), (x,))


@pytest.mark.parametrize("call, words", [
    (lambda: vl_nnroipool(np.zeros((4, 4, 1), np.float32), np.zeros((4, 1), np.float32)), "rois must be a 5 x K"),
    (lambda: vl_nnroipool(np.zeros((4, 4, 1), np.float32), np.ones((5, 1), np.float32), method="min"), "method must"),
    (lambda: vl_nnroipool(np.zeros((4, 4, 1), np.float32), np.ones((5, 1), np.float32), subdivisions=0),
     "subdivisions must be positive"),
    (lambda: vl_nnroipool(np.zeros((4, 4, 1), np.float32), np.ones((5, 1), np.float32), transform=[1, 2, 3]),
     "transform must be 1 x 1, 2 x 1 or 2 x 3"),
    (lambda: vl_nnroipool(np.zeros((4, 4, 1), np.float32), np.full((5, 1), np.nan, np.float32)), "rois must be finite"),
])
def test_vl_nnroipool_errors_are_one_line(call, words):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(f"vl_nnroipool: {words}") and "\n" not in str(e.value)


def roi_net(flatten):
    dag = DagNN()
    dag.add_layer("roipool", "dagnn.ROIPooling", ["x", "rois"], "y",
                  block={"subdivisions": [3, 2], "transform": 0.5, "flatten": flatten})
    return dag


@pytest.mark.parametrize("flatten", [False, True])
def test_dagnn_roipooling_is_vl_nnroipool_and_flattens_in_matlab_order(flatten, tmp_path):
    x, rois = RNG.standard_normal((8, 8, 4, 2)).astype(np.float32), random_rois(5, 2, 16, 16)
    dag = roi_net(flatten)
    save_net(tmp_path / "net.mat", dag)
    dag = load_net(tmp_path / "net.mat")
    ref = vl_nnroipool(x, rois, subdivisions=[3, 2], transform=0.5)
    dzdy = RNG.standard_normal((1, 1, 24, 5) if flatten else (3, 2, 4, 5)).astype(np.float32)
    dag.eval({"x": x, "rois": rois}, {"y": dzdy})
    y = dag.vars["y"].value
    assert y.shape == ((1, 1, 24, 5) if flatten else (3, 2, 4, 5))
    np.testing.assert_array_equal(y.reshape(-1, order="F"), ref.reshape(-1, order="F"))  # reshape(y, 1, 1, [], K)
    np.testing.assert_array_equal(dag.vars["x"].der,
                                  vl_nnroipool(x, rois, dzdy.reshape(3, 2, 4, 5, order="F"), subdivisions=[3, 2],
                                               transform=0.5))
    rows = layer_table(dag, (8, 8, 4))
    assert rows[0]["type"] == "roipooling" and rows[0]["size"].startswith("1x1x24" if flatten else "3x2x4")


def test_a_bad_roipooling_property_names_the_field():
    dag = roi_net(False)
    dag.layers[0]["block"]["method"] = "median"
    with pytest.raises(MatFormatError, match=r"net.layers\(1\).block.method: must be 'max' or 'avg'"):
        dag.validate()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roipool_tiles_in_the_datas_precision_and_odd_inputs(dtype):
    """Extent 25 in 11 tiles ends the last tile at 25 in float32 and at 26 in float64; NaN is skipped
    and a tile of NaN and -inf gives -inf with no derivative; one ROI may be a 5-vector or 1 x 1 x 5."""
    x = RNG.standard_normal((30, 30, 2, 1)).astype(dtype)
    x[3:6, 3:6, 0, 0] = np.nan
    x[3:5, 3:5, 1, 0] = -np.inf
    x[5, 3:5, 1, 0] = np.nan
    rois = np.array([[1, 1, 1, 25, 25], [1, 4, 4, 5, 6], [1, 2.5, 1.5, 30, 30]], dtype).T
    for sub in ((11, 11), (3, 2)):
        y_ref, dx_ref = mex_roipool(x, rois, sub, 1, np.ones((*sub, 2, 3), dtype))
        y = vl_nnroipool(x, rois, subdivisions=list(sub))
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(vl_nnroipool(x, rois, np.ones_like(y), subdivisions=list(sub)), dx_ref)
    one = rois[:, 0]
    for given in (one, one.reshape(1, 1, 5)):
        np.testing.assert_array_equal(vl_nnroipool(x, given, subdivisions=[2, 2]),
                                      vl_nnroipool(x, one.reshape(5, 1), subdivisions=[2, 2]))


def test_roipool_takes_method_names_in_any_case_and_checks_dzdys_shape():
    x, rois = RNG.standard_normal((6, 6, 2)).astype(np.float32), np.array([1, 1, 1, 6, 6], np.float32)
    np.testing.assert_array_equal(vl_nnroipool(x, rois, method="MAX"), vl_nnroipool(x, rois))
    with pytest.raises(ValueError, match=r"vl_nnroipool: dzdy must be SH x SW x C x K = 2 x 3 x 2 x 1, got 1 x 1 x 12"):
        vl_nnroipool(x, rois, np.ones((1, 1, 12), np.float32), subdivisions=[2, 3])


def test_roipool_rounds_as_c_does_even_where_adding_a_half_rounds_up():
    """0.49999999999999994 + 0.5 is 1.0 in double: floor(v + 0.5) would round it up, C's round() does not."""
    x = np.arange(36, dtype=np.float64).reshape(6, 6, 1, order="F")
    rois = np.array([1, 0.49999999999999994, 1, 3, 3])
    y = vl_nnroipool(x, rois, subdivisions=[1, 2])
    np.testing.assert_array_equal(y, mex_roipool(x[:, :, :, None], rois.reshape(5, 1), (1, 2), 1)[0])
    assert y.reshape(-1).tolist() == [2.0, 14.0]


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_roipool_average_keeps_a_nan_or_infinity_in_its_own_tiles(special):
    """Review: the float64 integral image carried x(1,1) = NaN (or Inf, then Inf - Inf) into every tile
    below and right of it; MatConvNet sums each tile's own pixels."""
    x = torch.arange(16.0, dtype=torch.float64).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = special
    x.requires_grad_(True)
    y = fn.roipool(x, [1, 1, 1, 4, 4], (2, 2), 1, "avg")
    want = torch.tensor([[special, 4.5], [10.5, 12.5]], dtype=torch.float64)
    torch.testing.assert_close(y.detach().reshape(2, 2), want, rtol=0, atol=0, equal_nan=True)
    dzdy = torch.tensor([[1.0, float("inf")], [1.0, 1.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
    (dx,) = torch.autograd.grad(y, x, dzdy)
    inf_tile = torch.zeros(4, 4, dtype=torch.bool)
    inf_tile[:2, 2:] = True
    assert torch.isinf(dx[0, 0][inf_tile]).all() and (dx[0, 0][~inf_tile] == 0.25).all()


def test_roipool_average_of_small_values_beside_a_huge_one_is_exact():
    """Beside 1e30 an integral image's differences lose the small values' digits entirely."""
    x = torch.ones(1, 1, 4, 4, dtype=torch.float32)
    x[0, 0, 0, 0] = 1e30
    y = fn.roipool(x, [1, 1, 1, 4, 4], (2, 2), 1, "avg").reshape(2, 2)
    assert y[1, 1] == 1.0 and y[0, 1] == 1.0 and y[1, 0] == 1.0 and y[0, 0] == np.float32(0.25) * np.float32(1e30 + 3)
