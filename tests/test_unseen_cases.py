"""vl_nnconv and vl_nnpool on configurations the reference files never show.

Each is compared with a direct, loop-by-loop evaluation of MatConvNet's
definition (written here from its documentation, independently of
``functional``): cross-correlation with [top bottom left right] zero padding,
stride, dilation and filter groups; pooling with -inf/in-window padding rules
and, for the derivative, the first maximum in column-major order. Random
shapes, options and seeds; float64 so that only the semantics can differ.
"""

import numpy as np
import pytest

from matconvnet_port import vl_nnconv, vl_nnpool


def conv_reference(x, f, b, pad, stride, dilate):
    h, w, c, n = x.shape
    fh, fw, fc, k = f.shape
    pt, pb, pl, pr = pad
    (sy, sx), (dy, dx) = stride, dilate
    groups = c // fc
    xp = np.zeros((h + pt + pb, w + pl + pr, c, n))
    xp[pt:pt + h, pl:pl + w] = x
    ho = (h + pt + pb - ((fh - 1) * dy + 1)) // sy + 1
    wo = (w + pl + pr - ((fw - 1) * dx + 1)) // sx + 1
    y = np.zeros((ho, wo, k, n))
    per_group = k // groups
    for q in range(k):
        g = q // per_group
        for i in range(ho):
            for j in range(wo):
                patch = xp[i * sy:i * sy + (fh - 1) * dy + 1:dy, j * sx:j * sx + (fw - 1) * dx + 1:dx,
                           g * fc:(g + 1) * fc, :]
                y[i, j, q, :] = np.tensordot(f[:, :, :, q], patch, axes=([0, 1, 2], [0, 1, 2])) + b[q]
    return y


def pool_reference(x, dzdy, pool, pad, stride, method):
    h, w, c, n = x.shape
    ph, pw = pool
    pt, pb, pl, pr = pad
    sy, sx = stride
    ho = (h + pt + pb - ph) // sy + 1
    wo = (w + pl + pr - pw) // sx + 1
    y = np.zeros((ho, wo, c, n))
    dzdx = np.zeros_like(x)
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * sy - pt, j * sx - pl
            rows = range(max(r0, 0), min(r0 + ph, h))
            cols = range(max(c0, 0), min(c0 + pw, w))
            for ch in range(c):
                for im in range(n):
                    if method == "avg":
                        count = len(rows) * len(cols)
                        y[i, j, ch, im] = sum(x[r, s, ch, im] for r in rows for s in cols) / count
                        for r in rows:
                            for s in cols:
                                dzdx[r, s, ch, im] += dzdy[i, j, ch, im] / count
                    else:
                        best = None
                        for s in cols:          # column-major scan: columns left to right,
                            for r in rows:      # top to bottom within a column; first max wins
                                if best is None or x[r, s, ch, im] > x[best[0], best[1], ch, im]:
                                    best = (r, s)
                        y[i, j, ch, im] = x[best[0], best[1], ch, im]
                        dzdx[best[0], best[1], ch, im] += dzdy[i, j, ch, im]
    return y, dzdx


@pytest.mark.parametrize("seed", range(12))
def test_vl_nnconv_random_configurations(seed):
    rng = np.random.default_rng(100 + seed)
    groups = int(rng.integers(1, 4))
    fc, per_group = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    fh, fw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    dilate = [int(rng.integers(1, 3)), int(rng.integers(1, 3))]
    pad = [int(v) for v in rng.integers(0, 3, 4)]
    stride = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
    h = (fh - 1) * dilate[0] + 1 + int(rng.integers(0, 6))
    w = (fw - 1) * dilate[1] + 1 + int(rng.integers(0, 6))
    x = rng.standard_normal((h, w, fc * groups, int(rng.integers(1, 4))))
    f = rng.standard_normal((fh, fw, fc, per_group * groups))
    b = rng.standard_normal(per_group * groups)
    ours = vl_nnconv(x, f, b, pad=pad, stride=stride, dilate=dilate)
    np.testing.assert_allclose(ours, conv_reference(x, f, b, pad, stride, dilate), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["max", "avg"])
@pytest.mark.parametrize("seed", range(8))
def test_vl_nnpool_random_configurations(seed, method):
    rng = np.random.default_rng(200 + seed)
    pool = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
    pad = [int(rng.integers(0, pool[0])), int(rng.integers(0, pool[0])),
           int(rng.integers(0, pool[1])), int(rng.integers(0, pool[1]))]
    stride = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
    h, w = pool[0] + int(rng.integers(0, 6)), pool[1] + int(rng.integers(0, 6))
    # small integers: many ties, so the derivative's tie rule is exercised
    x = rng.integers(-2, 3, (h, w, 2, 2)).astype(np.float64)
    y = vl_nnpool(x, pool, pad=pad, stride=stride, method=method)
    dzdy = rng.standard_normal(y.shape)
    dzdx = vl_nnpool(x, pool, dzdy, pad=pad, stride=stride, method=method)
    ref_y, ref_dzdx = pool_reference(x, dzdy, pool, pad, stride, method)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dzdx, ref_dzdx, rtol=1e-12, atol=1e-12)
