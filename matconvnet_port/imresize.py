"""MATLAB's ``imresize`` for float, integer and logical images, in numpy and in PyTorch.

The study brings 28 x 28 MNIST digits to N x N the way a MATLAB user would,
``imresize(img, [N N])``, so this module reproduces MATLAB's algorithm
(Image Processing Toolbox, ``imresize`` with its ``contributions`` /
``resizeAlongDim`` steps) rather than PIL's or OpenCV's, whose coordinate
mapping, kernel and border handling differ.

The algorithm, for one dimension of length ``n_in`` resized to ``n_out``:

* ``scale = n_out / n_in`` (or the scalar factor the caller gave; for a size
  ``[M NaN]`` the missing length is ``ceil(M * n_cols / n_rows)`` and both
  dimensions use ``scale = M / n_rows``, likewise ``[NaN N]``);
* output pixel ``x = 1 .. n_out`` samples input coordinate
  ``u = x / scale + 0.5 * (1 - 1 / scale)`` (1-based pixel centres);
* kernel ``k``: Keys cubic with ``a = -0.5`` (width 4) for ``'bicubic'``,
  triangle (width 2) for ``'bilinear'``, box ``[-0.5, 0.5)`` (width 1) for
  ``'nearest'``, Lanczos-2/3 (width 4/6);
* when shrinking (``scale < 1``) with antialiasing the kernel is stretched,
  ``h(t) = scale * k(scale * t)``, and its width divided by ``scale``;
* taps ``left + 0 .. left + P - 1`` with ``left = floor(u - width / 2)`` and
  ``P = ceil(width) + 2``; weights ``h(u - tap)`` normalised to sum 1;
* out-of-range taps are mirrored symmetrically (1-based index ``t`` maps to
  ``[1..n, n..1][(t - 1) mod 2n]``); tap columns whose weights are all zero
  are dropped;
* the dimension with the smaller scale is resized first (ties: rows first),
  and the intermediate result is stored in the input's class, as MATLAB
  does: for an integer image that means rounded (halves away from zero) and
  saturated to the type's range after each of the two passes;
* a logical image is resized as uint8 (0 / 255) and thresholded, ``> 128``.

Weights are built once per dimension in float64 numpy and applied as a dense
``n_out x n_in`` matrix with a tensor contraction in the input's backend
(numpy or torch, any device), accumulating in float64 (float32 on devices
without float64) and casting back to the input dtype.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

try:  # torch is a dependency of the package, but keep numpy use importable alone
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = ["imresize", "resize_weights", "resize_matrix", "METHODS"]

# MATLAB's integer image classes (imresize also takes single, double and logical)
_NP_INTS = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32)
_TORCH_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32) if torch is not None else ()


def _cubic(x):
    # Keys (1981) cubic convolution kernel with a = -0.5, as MATLAB's 'bicubic'.
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def _triangle(x):
    return np.maximum(1.0 - np.abs(x), 0.0)


def _box(x):
    # Half-open so that a sample exactly between two pixels takes exactly one.
    return ((x >= -0.5) & (x < 0.5)).astype(np.float64)


def _lanczos(a):
    def kernel(x):
        return np.sinc(x) * np.sinc(x / a) * (np.abs(x) < a)
    return kernel


# name -> (kernel, support width, antialiasing default)
_KERNELS = {
    "bicubic": (_cubic, 4.0, True),
    "bilinear": (_triangle, 2.0, True),
    "nearest": (_box, 1.0, False),
    "lanczos2": (_lanczos(2.0), 4.0, True),
    "lanczos3": (_lanczos(3.0), 6.0, True),
}
# MATLAB accepts these kernel names as synonyms of the methods above.
_ALIASES = {"cubic": "bicubic", "linear": "bilinear", "triangle": "bilinear", "box": "nearest"}

METHODS = tuple(_KERNELS) + tuple(_ALIASES)


def _canonical_method(method):
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"imresize: method must be one of {', '.join(METHODS)}; got {method!r}")
    m = method.lower()
    return _ALIASES.get(m, m)


def resize_weights(in_length, out_length, scale=None, method="bicubic", antialiasing=None):
    """Per-output-pixel taps and weights of MATLAB's ``imresize`` along one dimension.

    Mirrors the ``contributions`` step of MATLAB's ``imresize``.

    Parameters
    ----------
    in_length, out_length : int
        Input and output lengths (> 0).
    scale : float, optional
        The scale factor; defaults to ``out_length / in_length`` (MATLAB uses the
        factor the user gave when ``imresize`` is called with a scalar scale).
    method : str
        ``'bicubic'`` (default), ``'bilinear'``, ``'nearest'``, ``'lanczos2'``,
        ``'lanczos3'`` or a MATLAB synonym (``'cubic'``, ``'linear'``,
        ``'triangle'``, ``'box'``).
    antialiasing : bool, optional
        Stretch the kernel by ``1/scale`` when shrinking. ``None`` = MATLAB's
        default: on, except for ``'nearest'``.

    Returns
    -------
    weights : ndarray, float64, ``out_length x P``
        ``weights[x, p]`` multiplies input pixel ``indices[x, p]``; each row sums to 1.
    indices : ndarray, int64, ``out_length x P``
        0-based input indices after symmetric mirroring.
    """
    method = _canonical_method(method)
    in_length = _positive_int(in_length, "in_length")
    out_length = _positive_int(out_length, "out_length")
    if scale is None:
        scale = out_length / in_length
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"imresize: scale must be a positive finite number; got {scale!r}")
    kernel, width, aa_default = _KERNELS[method]
    if antialiasing is None:
        antialiasing = aa_default
    if scale < 1 and antialiasing:
        base = kernel

        def kernel(t):
            return scale * base(scale * t)
        width = width / scale

    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    n_taps = int(math.ceil(width)) + 2
    taps = left[:, None] + np.arange(n_taps, dtype=np.float64)[None, :]  # 1-based
    weights = kernel(u[:, None] - taps)
    weights = weights / weights.sum(axis=1, keepdims=True)

    # Symmetric mirroring (edge pixel repeated): period 2n over [1..n, n..1].
    taps0 = taps.astype(np.int64) - 1
    period = 2 * in_length
    r = np.mod(taps0, period)
    indices = np.where(r < in_length, r, period - 1 - r)

    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def resize_matrix(in_length, out_length, scale=None, method="bicubic", antialiasing=None):
    """Dense ``out_length x in_length`` float64 matrix ``R`` with ``y = R @ x``.

    Same options as :func:`resize_weights`; taps that mirror onto the same
    input pixel are summed.
    """
    w, idx = resize_weights(in_length, out_length, scale, method, antialiasing)
    mat = np.zeros((w.shape[0], in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(w.shape[0])[:, None], idx.shape)
    np.add.at(mat, (rows, idx), w)
    return mat


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, Real):
        raise ValueError(f"imresize: {name} must be a positive integer; got {v!r}")
    if isinstance(v, Integral):
        iv = int(v)
    else:
        if not math.isfinite(float(v)) or float(v) != int(v):
            raise ValueError(f"imresize: {name} must be a positive integer; got {v!r}")
        iv = int(v)
    if iv <= 0:
        raise ValueError(f"imresize: {name} must be a positive integer; got {v!r}")
    return iv


def _parse_size(out_size, in_hw):
    """Return (output (M, N), per-dimension scales) as MATLAB derives them."""
    if isinstance(out_size, Real) and not isinstance(out_size, bool):
        s = float(out_size)
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"imresize: out_size scale factor must be positive and finite; got {out_size!r}")
        # MATLAB: output size = ceil(scale * input size), but the kernel uses the given factor.
        out = tuple(int(math.ceil(s * n)) for n in in_hw)
        return out, (s, s)
    try:
        vals = list(out_size)
    except TypeError:
        raise ValueError(f"imresize: out_size must be (M, N) or a scale factor; got {out_size!r}") from None
    if len(vals) != 2:
        raise ValueError(f"imresize: out_size must have 2 entries (M, N); got {out_size!r}")
    nan = [isinstance(v, Real) and not isinstance(v, bool) and math.isnan(v) for v in vals]
    if all(nan):
        raise ValueError(f"imresize: out_size may have one NaN entry, not two; got {out_size!r}")
    if any(nan):
        k = nan.index(False)  # the dimension the caller gave
        m = _positive_int(vals[k], "out_size")
        # MATLAB (fixupSize) evaluates m * other / given, exact for these integers;
        # (m / given) * other can land just above an integer and ceil one too far.
        other = int(math.ceil(m * in_hw[1 - k] / in_hw[k]))
        s = m / in_hw[k]  # deriveScaleFromSize: the given dimension's scale, for both
        return ((m, other) if k == 0 else (other, m)), (s, s)
    out = tuple(_positive_int(v, "out_size") for v in vals)
    return out, (out[0] / in_hw[0], out[1] / in_hw[1])


def _is_torch(a):
    return torch is not None and isinstance(a, torch.Tensor)


def imresize(A, out_size, method="bicubic", antialiasing=None, *, axes=(0, 1)):
    """Resize images as MATLAB's ``B = imresize(A, [M N], method)`` does.

    Parameters
    ----------
    A : numpy array or torch tensor
        numpy float32/float64, uint8/int8/uint16/int16/int32/uint32 or bool;
        torch floating, uint8/int8/int16/int32 or bool. ``H x W``,
        ``H x W x C`` or ``H x W x C x K`` (MATLAB layout: dimension 0 is the
        row, dimension 1 the column; every trailing dimension is resized
        independently, e.g. the channels and images of an imdb batch).
    out_size : (M, N), (M, NaN), (NaN, N) or float
        Output rows and columns, or a scale factor ``s`` (output size
        ``ceil(s * [H W])`` and kernel scale ``s``, as in MATLAB). With one
        NaN the aspect ratio is kept as MATLAB keeps it: ``(M, NaN)`` gives
        ``N = ceil(M * W / H)`` and kernel scale ``M / H`` for both
        dimensions (so the columns use ``M / H``, not ``N / W``);
        ``(NaN, N)`` likewise.
    method : str
        ``'bicubic'`` (default; Keys cubic, a = -0.5), ``'bilinear'``,
        ``'nearest'`` (box kernel), ``'lanczos2'``, ``'lanczos3'``, or the
        MATLAB synonyms ``'cubic'``, ``'linear'``, ``'triangle'``, ``'box'``.
    antialiasing : bool, optional
        ``None`` (default) follows MATLAB: on for every method except
        ``'nearest'``. It only matters when a dimension shrinks.
    axes : (int, int), keyword-only
        Which dimensions of ``A`` are the rows and the columns; the default
        ``(0, 1)`` is MATLAB's layout. E.g. ``axes=(2, 3)`` resizes a PyTorch
        ``K x C x H x W`` batch in place of its MATLAB-layout twin.

    Returns
    -------
    Array of the same kind, dtype (and torch device) as ``A``, with the row
    and column dimensions replaced by ``M`` and ``N``; C-contiguous.

    Each dimension is resized with :func:`resize_matrix`,
    ``B = R_rows @ A @ R_cols.T`` per channel/image, smaller-scale dimension
    first (rows first on a tie) and the intermediate converted to ``A``'s
    dtype (MATLAB keeps the class between the two passes). Accumulation is
    in float64 (float32 on torch devices without float64 support). For an
    integer ``A`` each pass's result is rounded to nearest, halves away from
    zero, and saturated to the type's range, as MATLAB converts double to
    an integer class; so the intermediate is rounded too. A bool ``A`` is
    resized as uint8 ``0 / 255`` and the result is ``> 128``, as MATLAB does
    for logical images. A dimension whose size and scale are unchanged is
    left exactly as it is. NaN/Inf propagate to every output pixel whose
    taps touch them.

    Raises ``ValueError`` (one line, naming the argument) for an unsupported
    dtype (the message names it), fewer than 2 or more than 4 dimensions, an
    empty image, a non-positive size, a size with two NaNs, bad ``axes`` or
    an unknown method.
    """
    method = _canonical_method(method)
    if antialiasing is not None and not isinstance(antialiasing, (bool, np.bool_)):
        raise ValueError(f"imresize: antialiasing must be True, False or None; got {antialiasing!r}")
    is_t = _is_torch(A)
    if is_t:
        if not (A.is_floating_point() or A.dtype in _TORCH_INTS or A.dtype == torch.bool):
            raise ValueError(f"imresize: A must be a floating, uint8, int8, int16, int32 or bool tensor; got {A.dtype}")
        logical = A.dtype == torch.bool
    else:
        if not isinstance(A, np.ndarray):
            raise ValueError(f"imresize: A must be a numpy array or torch tensor; got {type(A).__name__}")
        if A.dtype.type not in (np.float32, np.float64, np.bool_) + _NP_INTS:
            raise ValueError("imresize: A must be float32, float64, uint8, int8, uint16, int16, int32, uint32 "
                             f"or bool; got {A.dtype}")
        logical = A.dtype.type is np.bool_
    if not 2 <= A.ndim <= 4:
        raise ValueError(f"imresize: A must be H x W, H x W x C or H x W x C x K; got {A.ndim}-D shape {tuple(A.shape)}")
    try:
        ax = tuple(int(a) for a in axes)
    except TypeError:
        raise ValueError(f"imresize: axes must be two distinct dimensions of A; got {axes!r}") from None
    ax = tuple(a + A.ndim if a < 0 else a for a in ax)
    if len(ax) != 2 or ax[0] == ax[1] or not all(0 <= a < A.ndim for a in ax):
        raise ValueError(f"imresize: axes must be two distinct dimensions of A; got {axes!r}")
    if min(A.shape) == 0:
        raise ValueError(f"imresize: A must not be empty; got shape {tuple(A.shape)}")
    in_hw = (int(A.shape[ax[0]]), int(A.shape[ax[1]]))
    out_hw, scales = _parse_size(out_size, in_hw)
    if logical:  # MATLAB: im2uint8, resize in uint8, then B > 128
        A = A.to(torch.uint8) * 255 if is_t else A.astype(np.uint8) * np.uint8(255)

    # Stable sort: the smaller scale first, rows first on a tie (MATLAB's order).
    order = sorted((0, 1), key=lambda d: scales[d])
    out = A
    for d in order:
        if in_hw[d] == out_hw[d] and scales[d] == 1.0:
            continue  # the resize matrix is exactly the identity
        mat = resize_matrix(in_hw[d], out_hw[d], scales[d], method, antialiasing)
        out = _apply(out, mat, ax[d])
    if out is A:
        out = A.clone() if is_t else A.copy()
    return out > 128 if logical else out


def _apply(A, mat, axis):
    """Contract ``mat`` (out x in) with dimension ``axis`` of ``A``; result in ``A``'s dtype.

    ``A`` is viewed as ``pre x in x post`` so that no transposition is needed:
    one GEMM when ``post == 1`` (``A2 @ mat.T``) or ``pre == 1`` (``mat @ A2``),
    else a batched matmul over ``pre``.
    """
    shape = tuple(A.shape)
    n_in, n_out = shape[axis], mat.shape[0]
    pre = int(np.prod(shape[:axis], dtype=np.int64))
    post = int(np.prod(shape[axis + 1:], dtype=np.int64))
    new_shape = shape[:axis] + (n_out,) + shape[axis + 1:]
    if _is_torch(A):
        work = torch.float32 if A.device.type == "mps" else torch.float64
        m = torch.from_numpy(mat).to(device=A.device, dtype=work)
        a = A.to(work).contiguous()
    else:
        m, a = mat, np.ascontiguousarray(A, dtype=np.float64)
    # the same three products in either library (both spell matmul `@`)
    if post == 1:
        y = a.reshape(pre, n_in) @ m.T
    elif pre == 1:
        y = m @ a.reshape(n_in, post)
    else:
        y = m @ a.reshape(pre, n_in, post)
    y = y.reshape(new_shape)
    if _is_torch(A):
        if not A.is_floating_point():
            info = torch.iinfo(A.dtype)
            y = _round_saturate(y, info.min, info.max)
        return y.to(A.dtype)
    if A.dtype.kind in "iu":
        info = np.iinfo(A.dtype)
        y = _round_saturate(y, info.min, info.max)
    return y.astype(A.dtype, copy=False)


def _round_saturate(y, lo, hi):
    """MATLAB's double -> integer class: nearest, halves away from zero, clipped to ``[lo, hi]``.

    ``np.round`` / ``torch.round`` round halves to even, and ``floor(|y| + 0.5)``
    rounds 0.49999999999999994 up (the sum rounds to 1); ``y - trunc(y)`` is
    exact, so comparing it with 0.5 is not fooled.
    """
    if _is_torch(y):
        t = torch.trunc(y)
        return torch.where((y - t).abs() >= 0.5, t + torch.sign(y), t).clamp(lo, hi)
    t = np.trunc(y)
    return np.clip(np.where(np.abs(y - t) >= 0.5, t + np.sign(y), t), lo, hi)
