"""NaN and infinities go through the layers as they go through MatConvNet.

MATLAB's ``max`` ignores NaN (``max(NaN, 0)`` is 0, ``[~, i] = max([NaN 2 1])``
is 2) and MatConvNet's CPU pooling accumulates with ``std::max`` from -inf,
which skips NaN; PyTorch's ``relu``, ``max_pool2d`` and ``argmax`` pick the
NaN instead. A net that has partly diverged therefore computes different
numbers in the two unless the port follows MATLAB -- a NaN channel behind a
ReLU is a dead channel in MatConvNet, not a NaN network. The references here
are transcriptions of ``vl_nnrelu.m``, ``pooling_cpu.cpp`` and ``vl_nnloss.m``
in numpy (no MatConvNet reference file holds a NaN); every comparison is exact
in float64, NaN where the transcription has NaN.
"""

import numpy as np
import pytest
import torch

from matconvnet_port import functional as fn
from matconvnet_port.vl_nn import vl_nnloss, vl_nnpool, vl_nnrelu

NAN, INF = float("nan"), float("inf")
SPECIAL = np.array([NAN, INF, -INF, 0.0, -0.0, 1.0, 2.0, -1.0, 2.0, -3.0])


pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf * 0


def specials(shape, seed):
    return np.random.default_rng(seed).choice(SPECIAL, size=shape)


def assert_same(actual, expected):
    torch.testing.assert_close(torch.as_tensor(np.asarray(actual, dtype=np.float64)),
                               torch.as_tensor(np.asarray(expected, dtype=np.float64)),
                               rtol=0, atol=0, equal_nan=True)


# -- vl_nnrelu.m: y = max(x, single(0)); dzdx = dzdy .* (x > single(0)) ------------------------

def test_relu_follows_matlab_max_and_its_product_derivative():
    x, g = specials((3, 4, 5, 6), 0), specials((3, 4, 5, 6), 1)
    t = torch.tensor(x, requires_grad=True)
    y = fn.relu(t)
    assert_same(y.detach(), np.fmax(x, 0))                     # NaN -> 0
    assert_same(torch.autograd.grad(y, t, torch.tensor(g))[0], g * (x > 0))  # inf * 0 -> NaN
    # the MATLAB-style entry point, H x W x C x N
    xm, gm = x.transpose(2, 3, 1, 0), g.transpose(2, 3, 1, 0)
    assert_same(vl_nnrelu(xm), np.fmax(xm, 0))
    assert_same(vl_nnrelu(xm, gm), gm * (xm > 0))


def test_leaky_relu_keeps_nan_as_matlab_does():
    """vl_nnrelu.m with a leak: y = x .* (leak + (1 - leak) * (x > 0)), dzdx = dzdy .* (the same)."""
    x, g = specials((2, 3, 4, 4), 2), specials((2, 3, 4, 4), 12)
    t = torch.tensor(x, requires_grad=True)
    y = fn.relu(t, leak=0.1)
    assert_same(y.detach(), x * (0.1 + 0.9 * (x > 0)))
    assert_same(torch.autograd.grad(y, t, torch.tensor(g))[0], g * (0.1 + 0.9 * (x > 0)))


def test_a_per_channel_leak_of_0_is_the_plain_relu_on_nan():
    x, g = specials((2, 3, 4, 4), 13), specials((2, 3, 4, 4), 14)
    leak = torch.tensor([0.0, 0.2, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    t = torch.tensor(x, requires_grad=True)
    y = fn.relu(t, leak)
    lk = leak.numpy()
    want = np.where(lk == 0, np.fmax(x, 0), x * (lk + (1 - lk) * (x > 0)))
    assert_same(y.detach(), want)
    assert_same(torch.autograd.grad(y, t, torch.tensor(g))[0], g * np.where(lk == 0, x > 0, lk + (1 - lk) * (x > 0)))


@pytest.mark.parametrize("masked_numel", [0, 1 << 30])  # a kernel per run of flags; broadcast masks
@pytest.mark.parametrize("flags", [[True] * 6, [True, False, True, True, False, True]])
def test_channel_relu_follows_relu_on_nan(flags, masked_numel, monkeypatch):
    monkeypatch.setattr(fn, "MASKED_RELU_NUMEL", masked_numel)
    x, g = specials((2, 6, 4, 4), 3), specials((2, 6, 4, 4), 4)
    t = torch.tensor(x, requires_grad=True)
    y = fn.channel_relu(t, flags)
    on = np.array(flags)[None, :, None, None]
    assert_same(y.detach(), np.where(on, np.fmax(x, 0), x))
    assert_same(torch.autograd.grad(y, t, torch.tensor(g))[0], np.where(on, g * (x > 0), g))


# -- pooling_cpu.cpp: acc_max -------------------------------------------------------------------

def matconvnet_max_pool(x, g, window, pad, stride):
    """Forward and backward of one H x W map as MatConvNet's CPU code runs them: windows clipped
    to the image, scanned columns outer, rows inner; forward ``value = std::max(value, x)`` from
    -inf; backward: the derivative goes to the first x with ``x > value`` (strict, running)."""
    (ph, pw), (pt, pb, pl, pr), (sy, sx) = window, pad, stride
    h, w = x.shape
    ho, wo = (h + pt + pb - ph) // sy + 1, (w + pl + pr - pw) // sx + 1
    y, dx = np.empty((ho, wo)), np.zeros_like(x)
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * sy - pt, j * sx - pl
            rows, cols = range(max(r0, 0), min(r0 + ph, h)), range(max(c0, 0), min(c0 + pw, w))
            value = -INF
            for c in cols:
                for r in rows:
                    value = x[r, c] if value < x[r, c] else value  # std::max(value, x)
            y[i, j] = value
            best, at = -INF, None
            for c in cols:
                for r in rows:
                    if x[r, c] > best:
                        best, at = x[r, c], (r, c)
            if at is not None:
                dx[at] += g[i, j]
    return y, dx


def always_take_the_nan_passes(monkeypatch):
    """What CUDA does: the NaN passes run without a reduction asking first."""
    monkeypatch.setattr(fn, "_may_hold_nan", lambda t: True)
    monkeypatch.setattr(fn, "_may_hold_minus_inf", lambda t: True)


@pytest.mark.parametrize("always", [False, True], ids=["gated", "always"])
@pytest.mark.parametrize("window,pad,stride", [((2, 2), (0, 0, 0, 0), (2, 2)), ((3, 2), (1, 2, 0, 1), (2, 1)),
                                               ((3, 3), (2, 2, 2, 2), (1, 1))])
def test_max_pool_skips_nan_and_passes_nothing_from_an_empty_window(window, pad, stride, always, monkeypatch):
    if always:
        always_take_the_nan_passes(monkeypatch)
    x = specials((2, 3, 7, 6), 5)
    x[0, 0, :4, :4] = NAN            # windows of NaN only
    x[0, 1, :3, :3] = -INF           # and of -inf only
    t = torch.tensor(x, requires_grad=True)
    y = fn.pool(t, window, pad=pad, stride=stride)
    g = np.random.default_rng(6).integers(-4, 5, tuple(y.shape)).astype(np.float64)  # exact sums
    (dx,) = torch.autograd.grad(y, t, torch.tensor(g))
    want_y, want_dx = np.empty(tuple(y.shape)), np.zeros_like(x)
    for n in range(2):
        for c in range(3):
            want_y[n, c], want_dx[n, c] = matconvnet_max_pool(x[n, c], g[n, c], window, pad, stride)
    assert np.isneginf(want_y).any()  # the case is exercised
    assert_same(y.detach(), want_y)
    assert_same(dx, want_dx)
    # 'row' order differs only in where tied maxima send their derivative: not the values
    assert_same(fn.pool(torch.tensor(x), window, pad=pad, stride=stride, tie_order="row"), want_y)
    # the MATLAB-style entry point
    xm, gm = x.transpose(2, 3, 1, 0), g.transpose(2, 3, 1, 0)
    assert_same(vl_nnpool(xm, list(window), pad=list(pad), stride=list(stride)), want_y.transpose(2, 3, 1, 0))
    assert_same(vl_nnpool(xm, list(window), gm, pad=list(pad), stride=list(stride)), want_dx.transpose(2, 3, 1, 0))


@pytest.mark.parametrize("always", [False, True], ids=["gated", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_conv_with_pooling_skips_nan_as_pool_does(dtype, always, monkeypatch):
    """The fused trainer's conv + 2x2 pooling in cache blocks: a NaN bias makes a channel all NaN,
    so every window of it is empty (-inf, no derivative: its bias derivative is 0); a NaN
    and an infinite pixel make some windows part NaN (the finite maximum wins) or infinite."""
    if always:
        always_take_the_nan_passes(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 4, 9, 9, generator=gen, dtype=dtype)
    x[1, 0, 4, 4], x[3, 2, 0, 7] = NAN, INF
    f = torch.randn(6, 4, 2, 2, generator=gen, dtype=dtype)
    b = torch.randn(6, generator=gen, dtype=dtype)
    b[2] = NAN
    g = torch.randn(5, 6, 4, 4, generator=gen, dtype=dtype)
    results = []
    for path in ("gemm", "parity"):
        for block_bytes in ((1 << 10), (1 << 30)) if path == "gemm" else (None,):
            ts = [t.clone().requires_grad_(True) for t in (x, f, b)]
            if path == "gemm":
                old, fn.GEMM_BLOCK_BYTES = fn.GEMM_BLOCK_BYTES, block_bytes  # several blocks, one block
                try:
                    y = fn.conv_gemm(*ts, max_pool=True)
                finally:
                    fn.GEMM_BLOCK_BYTES = old
            else:
                y = fn.pool(fn.conv(*ts), 2, stride=2, tie_order="row")
            results.append((y.detach(), *torch.autograd.grad(y, ts, g)))
    y = results[0][0]
    assert torch.isneginf(y[:, 2]).all() and results[0][3][2] == 0  # nothing flows back to bias 2
    partly_nan = y[1, [0, 1, 3, 4, 5], 1:3, 1:3]  # windows next to the NaN pixel: some NaN, some not
    assert torch.isfinite(partly_nan).any() and torch.isinf(y[3]).any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for other in results[1:]:
        for u, v in zip(results[0], other):
            torch.testing.assert_close(u, v, rtol=tol, atol=tol, equal_nan=True)


def test_relu_and_pooling_still_commute_on_nan_and_infinities():
    """FusedLeNet pools before its ReLUs: with MATLAB's NaN rules both orders give the same values
    and (for a finite dzdy) the same derivatives."""
    x = specials((3, 6, 8, 6), 8)
    flags = [True, False, True, True, False, True]
    g = torch.randn(3, 6, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    a, b = torch.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ya = fn.pool(fn.channel_relu(a, flags), 2, stride=2, tie_order="row")
    yb = fn.channel_relu(fn.pool(b, 2, stride=2, tie_order="row"), flags)
    assert_same(ya.detach(), yb.detach())
    assert_same(torch.autograd.grad(ya, a, g)[0], torch.autograd.grad(yb, b, g)[0])


# -- vl_nnloss.m: classerror's [~, chat] = max(X, [], 3); mshinge's max(Q, [], 3) -------------------

def test_classerror_takes_matlab_max_which_ignores_nan():
    # per location: scores of 4 classes
    scores = np.array([[NAN, 1.0, 3.0, 2.0],    # max ignores NaN -> class 3
                       [NAN, NAN, NAN, NAN],    # all NaN -> index 1
                       [2.0, NAN, 2.0, -INF],   # first maximum -> class 1
                       [-INF, -INF, INF, NAN]])  # -> class 3
    x = scores.T.reshape(1, 1, 4, 4)  # H x W x D x N
    for labels, wrong in (([3, 1, 1, 3], 0.0), ([1, 2, 3, 4], 4.0)):
        assert vl_nnloss(x, np.array(labels, dtype=np.float64), loss="classerror", normalise=False) == wrong


def matlab_max_index(v) -> int:
    """MATLAB's [~, i] = max(v) (0-based): the first maximum of the elements that are not NaN; all NaN: 0."""
    numbers = ~np.isnan(v)
    if not numbers.any():
        return 0
    return int(np.flatnonzero(numbers & (v == v[numbers].max()))[0])


@pytest.mark.parametrize("always", [False, True], ids=["cpu-gated", "always"])
def test_first_max_index_is_matlab_max_even_when_nan_precedes_minus_inf(always, monkeypatch):
    """[NaN -Inf]: MATLAB's max is the -Inf, index 2 (review: NaN as -inf won the tie)."""
    if always:
        monkeypatch.setattr(fn, "_may_hold_nan", lambda t: True)
    rows = np.random.default_rng(3).choice(np.array([NAN, -INF, 1.0, INF]), size=(400, 4), p=[.4, .4, .1, .1])
    rows[:3] = [[NAN, -INF, NAN, NAN], [NAN, NAN, NAN, NAN], [-INF, NAN, -INF, 1.0]]
    got = fn.first_max_index(torch.tensor(rows), 1)
    assert got.tolist() == [matlab_max_index(r) for r in rows]
    assert got[:3].tolist() == [1, 0, 3]


def test_mshinge_ignores_nan_scores_of_the_other_classes():
    scores = np.array([[0.5, NAN, 1.0], [0.5, NAN, NAN]])  # true class 1 both
    x = torch.tensor(scores).reshape(2, 3, 1, 1)
    got = fn.loss(x, torch.tensor([1, 1]), loss="mshinge", normalise=False)
    # Q = X with Q(ci) = -inf: max(0, 1 - 0.5 + max([-inf NaN 1])) = 1.5 (PyTorch's max: NaN);
    # max(0, 1 - 0.5 + max([-inf NaN NaN]) = -inf) = 0
    assert float(got) == 1.5


def test_log_loss_derivative_takes_matlab_max_on_a_nan_probability():
    """vl_nnloss.m: Y(ci) = (-dzdy * w) ./ max(X(ci), 1e-8); max(NaN, 1e-8) is 1e-8."""
    p = torch.tensor([[0.5, NAN], [NAN, 0.25]], dtype=torch.float64).reshape(2, 2, 1, 1).requires_grad_(True)
    y = fn.loss(p, torch.tensor([2, 2]), loss="log", normalise=False)
    (dp,) = torch.autograd.grad(y, p)
    assert_same(dp.reshape(2, 2), [[0.0, -1e8], [0.0, -4.0]])


def test_in_place_work_on_a_pooled_output_keeps_its_derivative():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    y = fn.pool(x, 2, stride=2)
    y.mul_(2)
    (dx,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(2 * fn.pool(x, 2, stride=2).sum(), x)
    assert_same(dx, want)


def test_the_always_path_cuda_takes_equals_the_gated_cpu_path(monkeypatch):
    """On the CPU the NaN passes run only when a reduction finds a NaN (or -inf window); CUDA runs them
    always. On finite data both give the same numbers."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64, generator=gen)
    f = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen)
    flags = [True, False, True, True, False, True]
    out = []
    for always in (False, True):
        if always:
            monkeypatch.setattr(fn, "_may_hold_nan", lambda t: True)
            monkeypatch.setattr(fn, "_may_hold_minus_inf", lambda t: True)
        ts = [x.clone().requires_grad_(True), f.clone().requires_grad_(True)]
        y = fn.channel_relu(fn.conv_gemm(*ts, max_pool=True), flags)
        y = fn.relu(fn.pool(y, 2, stride=1, pad=[1, 0, 0, 1]))
        out.append((y.detach(), *torch.autograd.grad(y.sum(), ts)))
    for u, v in zip(*out):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def matlab_softmaxloss(x, c, dzdy=1.0):
    """vl_nnsoftmaxloss.m on D x N scores (one location): loss and derivative, MATLAB's max."""
    xmax = np.nanmax(np.where(np.isnan(x), -INF, x), axis=0, keepdims=True)
    ex = np.exp(x - xmax)
    picked = x[c - 1, np.arange(x.shape[1])]
    loss = np.sum(xmax[0] + np.log(ex.sum(0)) - picked)
    y = ex / ex.sum(0, keepdims=True)
    y[c - 1, np.arange(x.shape[1])] -= 1
    return loss, y * dzdy


def test_softmaxloss_follows_matlab_on_infinite_and_nan_scores():
    scores = np.array([[1.0, 2.0, 0.5], [INF, 1.0, 0.0], [NAN, 1.0, 2.0], [-INF, 0.0, 1.0],
                       [-INF, -INF, -INF], [INF, INF, 1.0]])  # N x D
    labels = np.array([2, 1, 3, 2, 1, 3])
    want_loss, want_dx = matlab_softmaxloss(scores.T, labels)
    assert np.isnan(want_loss) and np.isnan(want_dx[:, 1]).all() and np.isfinite(want_dx[:, 0]).all()
    for i in range(len(labels)):  # image by image: the finite ones must stay finite
        t = torch.tensor(scores[i:i + 1].reshape(1, 3, 1, 1), requires_grad=True)
        y = fn.softmaxloss(t, torch.tensor(labels[i:i + 1]), normalise=False)
        want_y, want_d = matlab_softmaxloss(scores[i:i + 1].T, labels[i:i + 1])
        assert_same(y.detach(), want_y)
        torch.testing.assert_close(torch.autograd.grad(y, t)[0].reshape(3), torch.tensor(want_d[:, 0]),
                                   rtol=1e-15, atol=1e-15, equal_nan=True)
        z = fn.loss(t, torch.tensor(labels[i:i + 1]), loss="softmaxlog", normalise=False)
        assert_same(z.detach(), want_y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_takes_the_same_nan_rules():
    """On CUDA the NaN passes always run (no host reads): the same values and derivatives as the CPU."""
    x = torch.tensor(specials((3, 6, 8, 8), 15), dtype=torch.float32)
    x[0, 0] = NAN  # whole windows of NaN
    f = torch.randn(6, 6, 3, 3, generator=torch.Generator().manual_seed(16))
    labels = torch.tensor([1, 5, 10])
    flags = [True, False, True, True, False, True]

    def run(device):
        ts = [t.to(device).requires_grad_(True) for t in (x, f)]
        y = fn.channel_relu(fn.conv_gemm(fn.relu(ts[0]), ts[1], max_pool=True), flags)
        y = fn.pool(y, 2, stride=1, pad=[1, 0, 0, 1])
        scores = fn.conv(y, torch.ones(10, 6, 3, 3, device=device))
        loss = fn.softmaxloss(scores, labels.to(device))
        err = fn.loss(scores, labels.to(device), loss="classerror")
        return [t.detach().cpu() for t in (y, loss, err, *torch.autograd.grad(loss, ts, allow_unused=True))]

    for u, v in zip(run("cpu"), run("cuda")):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5, equal_nan=True)


# -- vl_nnloss.m's derivatives: closed forms, products in MATLAB's order -------------------------------

def matlab_loss_derivative(name, x, c, dz):
    """vl_nnloss.m's backward on N x D x H x W float64 arrays; c categorical N x 1 x H x W (1-based, 0 =
    ignore) or binary like x; dz = dzdy * instanceWeights, shaped like c."""
    with np.errstate(all="ignore"):
        if name in ("log", "mhinge", "mshinge"):
            ci = np.maximum(c - 1, 0).astype(np.int64)  # MATLAB's ci: an ignored label points at class 1
            xc = np.take_along_axis(x, ci, 1)
        y = np.zeros_like(x)
        if name == "log":
            np.put_along_axis(y, ci, -dz / np.fmax(xc, 1e-8), 1)  # fmax: MATLAB's max ignores NaN
        elif name == "mhinge":
            np.put_along_axis(y, ci, -dz * (xc < 1), 1)
        elif name == "mshinge":
            q = x.copy()
            np.put_along_axis(q, ci, -INF, 1)
            qi = np.array([[[[matlab_max_index(q[i, :, a, b])] for b in range(x.shape[3])]
                            for a in range(x.shape[2])] for i in range(x.shape[0])]).transpose(0, 3, 1, 2)
            w = dz * ((xc - np.take_along_axis(x, qi, 1)) < 1)
            np.put_along_axis(y, ci, -w, 1)
            np.put_along_axis(y, qi, w, 1)
        elif name == "binarylog":
            y = -dz / (x + (c - 1) * 0.5)
        elif name == "logistic":
            y = -dz * c / (1 + np.exp(c * x))
        else:  # hinge
            y = -dz * c * ((c * x) < 1)
    return y


@pytest.mark.parametrize("name", ["log", "mhinge", "mshinge", "binarylog", "logistic", "hinge"])  # softmaxlog: see fn.loss
@pytest.mark.parametrize("dzdy", [1.0, 0.5, INF, NAN], ids=["1", "0.5", "inf", "nan"])
def test_loss_derivatives_are_vl_nnloss_closed_forms(name, dzdy):
    """Review: autograd's chain gave 0 where MATLAB's Inf * 0 is NaN (mhinge, hinge, mshinge with an
    infinite dzdy or a NaN instance weight) and the wrong sign of infinity for binarylog at x = 1, c = -1.
    Exact in float64, special values included. (softmaxlog keeps autograd's derivative, as softmaxloss
    does: a documented difference under an infinite dzdy.)"""
    rng = np.random.default_rng(hash(name) % 1000)
    x = rng.choice(np.array([NAN, INF, -INF, 0.0, 1.0, 0.5, 1e-20, 2.0, -1.0, 0.25]), size=(6, 4, 2, 3))
    if name in ("log", "mhinge", "mshinge"):
        c = rng.integers(0, 5, size=(6, 1, 2, 3)).astype(np.float64)
    else:
        c = rng.choice(np.array([-1.0, 0.0, 1.0]), size=x.shape)
    iw = rng.choice(np.array([1.0, 2.0, 0.0, NAN, INF]), size=c.shape)
    want = matlab_loss_derivative(name, x, c, dzdy * ((c != 0) * iw))
    t = torch.tensor(x, requires_grad=True)
    y = fn.loss(t, torch.tensor(c), loss=name, instance_weights=torch.tensor(iw), normalise=False)
    (got,) = torch.autograd.grad(y, t, torch.tensor(dzdy, dtype=torch.float64))
    assert_same(got, want)
    if name == "binarylog":  # the review's case: a saturated probability of 1 for a negative label
        one = torch.tensor([[[[1.0]]]], dtype=torch.float64, requires_grad=True)
        (d,) = torch.autograd.grad(fn.loss(one, torch.tensor([[[[-1.0]]]]), loss="binarylog", normalise=False), one)
        assert float(d) == -INF


# -- bnorm_cpu.cpp: one-pass moments and its backward (training mode) ------------------------------------

def mcn_bnorm(x, g, b, dy, eps):
    """compute_ders_and_moments + batch_normalize_backward on N x C x H x W, sums in the data's type."""
    T = x.dtype.type
    n, c, h, w = x.shape
    mass = T(n * h * w)
    y, dx = np.empty_like(x), np.empty_like(x)
    dg, db, moments = np.zeros(c, x.dtype), np.zeros(c, x.dtype), np.zeros((c, 2), x.dtype)
    with np.errstate(all="ignore"):
        for ch in range(c):
            xs, ds = x[:, ch].reshape(-1), dy[:, ch].reshape(-1)
            s, s2, dm, dbb = T(xs.sum()), T((xs * xs).sum()), T((ds * xs).sum()), T(ds.sum())
            mean = T(s / mass)
            sigma = T(np.sqrt(T(s2 / mass) - mean * mean + T(eps)))
            moments[ch] = mean, sigma
            y[:, ch] = T(g[ch] / sigma) * (x[:, ch] - mean) + b[ch]
            dg[ch] = T((dm - mean * dbb) / sigma)
            db[ch] = dbb
            g1 = T(g[ch] / sigma)
            g2 = T(g1 * dg[ch] / (mass * sigma))
            dx[:, ch] = g1 * (dy[:, ch] - T(dbb / mass)) - g2 * (x[:, ch] - mean)
    return y, moments, dx, dg, db


def test_bnorm_takes_matconvnets_one_pass_variance_and_backward():
    """Review: a two-pass variance gave sigma 0.0103 where MatConvNet's sum(x.^2)/m - mean^2 in single gives
    0.433 (a channel of mean 1000 and spread 2e-3), and -Inf for dzdg under an infinite dzdy where
    MatConvNet's (sum(dy.*x) - mean*sum(dy))/sigma is NaN."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
    x[:, 0] = 1000 + np.arange(32, dtype=np.float32).reshape(8, 2, 2) * np.float32(1e-4)  # large mean, tiny spread
    x[:, 2] = np.abs(x[:, 2]) + 1  # a positive channel: Inf * x - mean * Inf is Inf - Inf
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy[3, 2, 1, 0] = INF
    g, b = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, 0.5, -1.0], np.float32)
    want = mcn_bnorm(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), dy.astype(np.float64), 1e-4)
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, g, b)]
    y, moments = fn.bnorm(*ts)
    got = (y, moments, *torch.autograd.grad(y, ts, torch.tensor(dy, dtype=torch.float64)))
    for u, v in zip(got, want):  # float64: the formulas, not the summation order, decide
        torch.testing.assert_close(u.detach(), torch.tensor(v), rtol=1e-9, atol=1e-12, equal_nan=True)
    assert np.isnan(want[3][2])  # dzdg under the infinite dzdy: NaN, as MatConvNet's
    # in single, the review's case: compute_moments' sequential sums give sigma 0.4331 (two-pass: 0.0103)
    x32 = (np.float32(1000) + np.arange(8, dtype=np.float32) * np.float32(1e-3)).reshape(8, 1, 1, 1)
    s = s2 = np.float32(0)
    for v in x32.ravel():
        s, s2 = np.float32(s + v), np.float32(s2 + v * v)
    mean = np.float32(s / np.float32(8))
    sigma = np.sqrt(np.float32(s2 / np.float32(8)) - mean * mean + np.float32(1e-4))
    got32 = fn.bnorm(torch.tensor(x32), torch.ones(1), torch.zeros(1))[1]
    torch.testing.assert_close(got32[0], torch.tensor([mean, sigma]), rtol=1e-6, atol=0)
    assert abs(float(sigma) - 0.4331) < 1e-3


# -- the closed forms stay torch functions: second derivatives, weight derivatives (review) ------------------

@pytest.mark.parametrize("name", ["log", "mhinge", "mshinge", "binarylog", "logistic", "hinge", "softmaxlog"])
def test_losses_differentiate_twice_and_in_their_weights(name):
    """A custom backward on detached inputs had broken double backward (log, binarylog, logistic raised)
    and dropped the instance weights' gradient."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(3, 4, 2, 2, dtype=torch.float64, generator=gen) * 0.8 + 0.1).requires_grad_(True)
    if name in ("log", "mhinge", "mshinge", "softmaxlog"):
        c = torch.randint(1, 5, (3, 1, 2, 2), generator=gen)
    else:
        c = torch.randint(0, 2, x.shape, generator=gen) * 2 - 1
    iw = torch.rand(c.shape, dtype=torch.float64, generator=gen).requires_grad_(True)
    f = lambda a, w: fn.loss(a, c, loss=name, instance_weights=w)
    assert torch.autograd.gradcheck(f, (x, iw))
    assert torch.autograd.gradgradcheck(f, (x, iw))


def test_categorical_instance_weights_wider_than_the_labels_are_refused():
    """The forward summed D weighted copies that the derivative did not see; MATLAB refuses it too."""
    x = torch.rand(2, 3, 1, 1)
    with pytest.raises(ValueError, match="widen the labels"):
        fn.loss(x, torch.tensor([1, 2]), loss="mhinge", instance_weights=torch.ones(2, 3, 1, 1))


def test_training_bnorm_differentiates_twice():
    """Its backward treated the batch moments as constants: second derivatives were silently wrong."""
    gen = torch.Generator().manual_seed(8)
    ts = [torch.randn(3, 2, 3, 2, dtype=torch.float64, generator=gen).requires_grad_(True),
          torch.rand(2, dtype=torch.float64, generator=gen).add(0.5).requires_grad_(True),
          torch.randn(2, dtype=torch.float64, generator=gen).requires_grad_(True)]
    f = lambda x, g, b: fn.bnorm(x, g, b)[0]
    assert torch.autograd.gradcheck(f, ts)
    assert torch.autograd.gradgradcheck(f, ts)
