"""MATLAB-style entry points: ``vl_nnconv``, ``vl_nnpool``, ... in MatConvNet layout.

These are thin adapters over :mod:`matconvnet_port.functional` so MATLAB code
ports line by line::

    y = vl_nnconv(x, f, b, pad=1, stride=2)               % y = vl_nnconv(x, f, b, 'pad', 1, 'stride', 2)
    dzdx, dzdf, dzdb = vl_nnconv(x, f, b, dzdy, pad=1, stride=2)

Layout: feature maps are ``H x W x C x N`` arrays as MatConvNet stores them;
missing trailing dimensions mean 1 (MATLAB drops them: a single image may be
``H x W x C``). Filters are ``FH x FW x FC x K``, biases any shape with K
elements. Inputs are numpy float32/float64 arrays or torch tensors (any
device); the results are of the same kind as ``x`` (numpy in, numpy out).
Results of convolution and pooling are 4-D; element-wise layers (ReLU,
sigmoid, softmax, LRN, batch normalisation, dropout) return the shape of
``x`` as MATLAB does, so ``y + x`` works for any shape; derivatives have the
shape of the input they belong to (so ``dzdb`` is 1 x K when ``b`` is 1 x K).
Losses return a 0-d value (a numpy scalar for numpy input).

MatConvNet's backend switches (``cudnn``, ``no_cudnn``, ``verbose``,
``cudnn_workspace_limit``) are accepted so that ported call sites need no
edit; they change nothing here (the backend is PyTorch's). ``no_der_data``,
``no_der_filters``, ``no_der_biases`` return empty derivatives, as in MatConvNet.
Errors are one-line ``ValueError``s that start with the function's name.

Passing ``dzdy`` (the derivative of some scalar objective with respect to the
output) turns any call into its backward call, exactly as in MatConvNet;
the derivatives come from PyTorch's autograd through the same functions.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch

from . import functional as fn
from .errors import labelled
from .precision import exact_fp32

__all__ = [
    "vl_nnconv", "vl_nnconvt", "vl_nnpool", "vl_nnrelu", "vl_nnsigmoid", "vl_nnsoftmax",
    "vl_nnsoftmaxloss", "vl_nnloss", "vl_nnnormalize", "vl_nnbnorm", "vl_nndropout", "vl_nncrop", "vl_nnroipool",
    "hwcn_to_nchw", "nchw_to_hwcn",
]


# ---------------------------------------------------------------------------
# Layout and type conversion
# ---------------------------------------------------------------------------

def _tensor(a, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """numpy array / tensor / number -> tensor (on ``like``'s device and dtype if given)."""
    if isinstance(a, torch.Tensor):
        t = a
    else:
        arr = np.asarray(a)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if like is not None:
        t = t.to(device=like.device, dtype=like.dtype if t.is_floating_point() or like.is_floating_point() else None)
    return t


def _float_input(a, name: str) -> torch.Tensor:
    t = _tensor(a, name)
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 (single) or float64 (double), got {t.dtype}")
    return t


def hwcn_to_nchw(t: torch.Tensor, name: str = "x") -> torch.Tensor:
    """MatConvNet H x W x C x N (trailing singletons optional) -> PyTorch N x C x H x W."""
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dimensions (H x W x C x N), got {t.dim()}")
    if t.dim() < 4:
        t = t.reshape(tuple(t.shape) + (1,) * (4 - t.dim()))
    return t.permute(3, 2, 0, 1)


def nchw_to_hwcn(t: torch.Tensor) -> torch.Tensor:
    """PyTorch N x C x H x W -> MatConvNet H x W x C x N."""
    return t.permute(2, 3, 1, 0)


def _is_empty(a) -> bool:
    return a is None or (hasattr(a, "size") and not callable(a.size) and a.size == 0) or \
        (isinstance(a, torch.Tensor) and a.numel() == 0) or (isinstance(a, (list, tuple)) and len(a) == 0)


def _out(t: torch.Tensor, as_numpy: bool, shape=None):
    """Result back to the caller's kind (and to the caller's shape for derivatives)."""
    t = t.detach()
    if shape is not None:
        t = t.reshape(shape)
    if not as_numpy:
        return t.contiguous() if t.dim() else t
    arr = t.cpu().numpy()
    return arr[()] if arr.ndim == 0 else np.ascontiguousarray(arr)


def _fp32(entry: Callable) -> Callable:
    """Entry points compute in IEEE float32 on CUDA too (no TF32), as MatConvNet did; their
    errors name the function (as MATLAB's do), whichever helper found the problem."""
    name = entry.__name__

    @functools.wraps(entry)
    def wrapped(*args, **kwargs):
        try:
            with exact_fp32():
                return entry(*args, **kwargs)
        except (ValueError, TypeError) as e:
            raise labelled(e, name) from None
    return wrapped


BACKEND_OPTIONS = ("cudnn", "no_cudnn", "verbose", "cudnn_workspace_limit")


def _backend(**options) -> None:
    """MatConvNet's backend switches: accepted, without effect (PyTorch picks the kernels)."""
    unknown = [k for k in options if k not in BACKEND_OPTIONS]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}")


def _derivatives(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                 dzdy: torch.Tensor) -> list[torch.Tensor | None]:
    """d(<dzdy, forward(*inputs)>)/d(inputs); inputs that do not influence y get zeros."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        y = forward(*leaves)
        if dzdy.numel() != y.numel():
            size = " x ".join(map(str, (y.shape[2], y.shape[3], y.shape[1], y.shape[0]) if y.dim() == 4
                                  else tuple(y.shape))) or "a scalar"
            raise ValueError(f"dzdy must have the size of the output ({size}), got {dzdy.numel()} elements")
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, wanted, dzdy.reshape(y.shape).to(y.dtype), allow_unused=True) \
            if y.requires_grad else [None] * len(wanted)
    it = iter(grads)
    out = []
    for t in leaves:
        if t is None:
            out.append(None)
            continue
        g = next(it)
        out.append(torch.zeros_like(t) if g is None else g)
    return out


def _dzdy_nchw(dzdy, x: torch.Tensor) -> torch.Tensor:
    return hwcn_to_nchw(_tensor(dzdy, "dzdy", like=x), "dzdy")


def _filters(f, x: torch.Tensor, name: str = "f") -> torch.Tensor | None:
    if _is_empty(f):
        return None
    t = _float_input(f, name).to(x.device)
    if t.dtype != x.dtype:
        raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}")
    return hwcn_to_nchw(t, name)


def _vector(b, x: torch.Tensor, name: str) -> torch.Tensor | None:
    if _is_empty(b):
        return None
    t = _float_input(b, name).to(x.device)
    if t.dtype != x.dtype:
        raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}")
    return t.reshape(-1)


def _labels(c, x: torch.Tensor, name: str = "c") -> torch.Tensor:
    """MatConvNet labels (N elements, or H x W x D x N) -> N elements or N x D x H x W."""
    t = _tensor(c, name).to(x.device)
    n = x.shape[0]
    if t.numel() == n:
        return t.reshape(n)
    nchw = hwcn_to_nchw(t, name)
    if nchw.shape[0] != n or tuple(nchw.shape[2:]) != tuple(x.shape[2:]):  # said in MATLAB's layout
        h, w = x.shape[2], x.shape[3]
        raise ValueError(f"{name} must have N = {n} elements (one label per image) or be H x W x D x N = "
                         f"{h} x {w} x D x {n}, got {' x '.join(map(str, t.shape))}")
    return nchw


def _shape(a) -> tuple[int, ...] | None:
    """The caller's array shape (a list's as numpy sees it); None for None."""
    if a is None:
        return None
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


def _number(value, name: str) -> float:
    """A scalar option as a float; a one-line error otherwise."""
    try:
        if isinstance(value, (str, bytes)) or value is None:
            raise TypeError
        values = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.empty(0)
    if values.size != 1 or not np.isfinite(values[0]):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(values[0])


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

@_fp32
def vl_nnconv(x, f, b=None, dzdy=None, *, pad=0, stride=1, dilate=1, no_der_data=False, no_der_filters=False,
              no_der_biases=False, **backend):
    """CNN convolution -- MatConvNet ``VL_NNCONV``.

    ``y = vl_nnconv(x, f, b, pad=0, stride=1, dilate=1)``
    ``dzdx, dzdf, dzdb = vl_nnconv(x, f, b, dzdy, pad=.., stride=.., dilate=..)``

    ``x`` H x W x C x N, ``f`` FH x FW x FC x K (None/empty: identity filter
    bank), ``b`` K elements (None/empty: no bias). ``pad`` [top bottom left
    right], ``stride`` [sy sx], ``dilate`` [dy dx]; groups when C > FC.
    Output ``Ho x Wo x K x N``, ``Ho = floor((H + pt + pb - ((FH-1)*dy + 1)) / sy) + 1``.
    ``no_der_data`` / ``no_der_filters`` / ``no_der_biases``: that derivative comes back empty.
    See :func:`matconvnet_port.functional.conv`.
    """
    _backend(**backend)
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    ft = _filters(f, xt)
    bt = _vector(b, xt, "b")

    def forward(xx, ff, bb):
        return fn.conv(xx, ff, bb, pad=pad, stride=stride, dilate=dilate)

    return _filter_layer(forward, (x, f, b), (xt, ft, bt), dzdy, as_numpy,
                         (no_der_data, no_der_filters, no_der_biases))


def _filter_layer(forward, given, tensors, dzdy, as_numpy: bool, skipped):
    """The output of ``forward(x, f, b)`` (H x W x C x N tensors), or its derivatives shaped as the
    arguments ``given`` were -- a filter bank or bias that was empty gets MATLAB's [] back."""
    x, f, b = given
    xt = tensors[0]
    if dzdy is None:
        return _out(nchw_to_hwcn(forward(*tensors)), as_numpy)
    dx, df, db = _derivatives(forward, list(tensors), _dzdy_nchw(dzdy, xt))
    dzdx = _out(nchw_to_hwcn(dx), as_numpy, _shape(x))
    dzdf = _out(nchw_to_hwcn(df), as_numpy, _shape(f)) if df is not None else _empty_like(f, as_numpy, xt)
    dzdb = _out(db, as_numpy, _shape(b)) if db is not None else _empty_like(b, as_numpy, xt)
    return tuple(_unless(s, d, as_numpy, xt) for s, d in zip(skipped, (dzdx, dzdf, dzdb)))


def _empty_like(a, as_numpy: bool, x: torch.Tensor):
    shape = (0, 0) if _is_empty(a) else _shape(a)  # MATLAB's [] is 0 x 0 (np.size(tensor) is a method)
    t = torch.zeros(shape, dtype=x.dtype, device=x.device)
    return _out(t, as_numpy)


def _unless(skipped: bool, derivative, as_numpy: bool, x: torch.Tensor):
    """A derivative, or the 0 x 0 array MatConvNet returns for one that ``NoDer*`` switched off."""
    return _empty_like(None, as_numpy, x) if skipped else derivative


@_fp32
def vl_nnconvt(x, f, b=None, dzdy=None, *, upsample=1, crop=0, num_groups=1, no_der_data=False,
               no_der_filters=False, no_der_biases=False, **backend):
    """CNN convolution transpose -- MatConvNet ``VL_NNCONVT``.

    ``y = vl_nnconvt(x, f, b, upsample=1, crop=0, num_groups=1)``;
    ``dzdx, dzdf, dzdb = vl_nnconvt(x, f, b, dzdy, ...)``.
    ``f`` is FH x FW x K x D (filter k is ``f(:,:,k,:)``, D = input depth);
    output ``(uy (H-1) + FH - ct - cb) x (ux (W-1) + FW - cl - cr) x K*G x N``.
    ``no_der_*`` as for :func:`vl_nnconv`. See :func:`matconvnet_port.functional.convt`.
    """
    _backend(**backend)
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    # FH x FW x K x D -> D x K x FH x FW, PyTorch's conv_transpose2d order
    ft = _filters(f, xt)
    if ft is None:
        raise ValueError("f must not be empty for vl_nnconvt")
    bt = _vector(b, xt, "b")

    def forward(xx, ff, bb):
        return fn.convt(xx, ff, bb, upsample=upsample, crop=crop, num_groups=num_groups)

    return _filter_layer(forward, (x, f, b), (xt, ft, bt), dzdy, as_numpy,
                         (no_der_data, no_der_filters, no_der_biases))


@_fp32
def vl_nnpool(x, pool, dzdy=None, *, pad=0, stride=1, method="max", **backend):
    """CNN spatial pooling -- MatConvNet ``VL_NNPOOL``.

    ``y = vl_nnpool(x, pool, pad=0, stride=1, method='max')``;
    ``dzdx = vl_nnpool(x, pool, dzdy, ...)``. ``pool`` [ph pw] (scalar =
    square), ``pad`` [top bottom left right] (< window), ``method`` 'max' or
    'avg' (divides by the in-image part of the window).
    Output ``floor((H + pt + pb - ph) / sy) + 1`` high (likewise wide).
    See :func:`matconvnet_port.functional.pool`.
    """
    _backend(**backend)
    return _filter_free_layer(x, dzdy, lambda t: fn.pool(t, pool, pad=pad, stride=stride, method=method))


@_fp32
def vl_nncrop(x, crop, dzdy=None, input_size=None):
    """Spatial crop -- MatConvNet ``VL_NNCROP``.

    ``y = vl_nncrop(x, crop)`` is ``x(1+top : end-bottom, 1+left : end-right, :, :)``
    with ``crop`` [top bottom left right] (non-negative integers; empty where
    the crop exceeds ``x``); ``dzdx = vl_nncrop(x, crop, dzdy)`` is ``dzdy`` put
    back in place in zeros of the shape of ``x``; ``vl_nncrop(None, crop, dzdy,
    input_size)`` gives it without ``x``, for an input of ``input_size`` (H W [C [N]]).
    (MatConvNet makes that derivative single whatever ``dzdy`` is; here it keeps ``dzdy``'s type.)
    See :func:`matconvnet_port.functional.crop`.
    """
    crop = fn._pad4(crop, "crop")
    if input_size is None or _is_empty(dzdy):
        return _filter_free_layer(x, dzdy, lambda t: fn.crop(t, crop), empty_is_forward=True)
    try:
        dims = [int(d) for d in np.asarray(input_size, dtype=np.float64).reshape(-1) if d == int(d) and d >= 0]
    except (TypeError, ValueError, OverflowError):
        dims = []
    if not 2 <= len(dims) == np.size(input_size) <= 4:
        raise ValueError(f"input_size must be 2 to 4 non-negative integers (H W [C [N]]), got {input_size!r}")
    as_numpy = not isinstance(dzdy, torch.Tensor)
    g = hwcn_to_nchw(_float_input(dzdy, "dzdy"), "dzdy")
    h, w, c, n = dims + [1] * (4 - len(dims))
    dzdx = g.new_zeros((n, c, h, w))
    inside = fn.crop(dzdx, crop)
    if inside.shape != g.shape:
        size = " x ".join(map(str, (inside.shape[2], inside.shape[3], inside.shape[1], inside.shape[0])))
        raise ValueError(f"dzdy must have the size of the output ({size}), got {_shape(dzdy)}")
    inside.copy_(g)  # a view into dzdx
    return _out(nchw_to_hwcn(dzdx), as_numpy, tuple(dims))


@_fp32
def vl_nnroipool(x, rois, dzdy=None, *, method="max", subdivisions=(1, 1), transform=1, **backend):
    """Region-of-interest pooling -- MatConvNet ``VL_NNROIPOOL``.

    ``y = vl_nnroipool(x, rois, method='max', subdivisions=[SH SW], transform=1)``;
    ``dzdx = vl_nnroipool(x, rois, dzdy, ...)``. ``rois`` 5 x K: ``[t u1 v1 u2 v2]``
    per column (image, 1-based corners, u horizontal); output SH x SW x C x K.
    ``transform``: a scale T about pixel 1, [Tu Tv], or a 2 x 3 affine map of
    the corners. See :func:`matconvnet_port.functional.roipool` for the
    rounding and tiling, which follow MatConvNet's MEX code.
    """
    _backend(**backend)
    r = _float_input(rois, "rois")
    # MATLAB's column-major order of the 5K numbers: ROI k is rois(:, k)
    r = r.permute(*reversed(range(r.dim()))).reshape(-1) if r.dim() > 1 else r
    if dzdy is not None:  # the MEX code compares shapes, not element counts
        expected = (*fn._pos2(subdivisions, "subdivisions"), (tuple(_shape(x)) + (1,) * 4)[2], r.numel() // 5)
        got = tuple(_shape(dzdy))
        if len(got) > 4 or got + (1,) * (4 - len(got)) != expected:
            raise ValueError(f"dzdy must be SH x SW x C x K = {' x '.join(map(str, expected))}, "
                             f"got {' x '.join(map(str, got))}")
    return _filter_free_layer(x, dzdy, lambda t: fn.roipool(t, r, subdivisions, transform, method))


def _filter_free_layer(x, dzdy, forward: Callable[[torch.Tensor], torch.Tensor], empty_is_forward: bool = False):
    """A layer of ``x`` alone whose output is 4-D (pooling, cropping), or its derivative shaped as ``x``.
    An empty ``dzdy`` is a forward call for the .m layers (``empty_is_forward``); MEX ones refuse it."""
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    if dzdy is None or (empty_is_forward and _is_empty(dzdy)):
        return _out(nchw_to_hwcn(forward(xt)), as_numpy)
    (dx,) = _derivatives(forward, [xt], _dzdy_nchw(dzdy, xt))
    return _out(nchw_to_hwcn(dx), as_numpy, _shape(x))


def _elementwise(x, dzdy, forward: Callable[[torch.Tensor], torch.Tensor]):
    """A layer whose output has the shape of its input (MATLAB keeps ``size(y) == size(x)``)."""
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    if _is_empty(dzdy):
        return _out(nchw_to_hwcn(forward(xt)), as_numpy, _shape(x))
    (dx,) = _derivatives(forward, [xt], _dzdy_nchw(dzdy, xt))
    return _out(nchw_to_hwcn(dx), as_numpy, _shape(x))


@_fp32
def vl_nnrelu(x, dzdy=None, *, leak=0.0):
    """Rectified linear unit -- MatConvNet ``VL_NNRELU``.

    ``y = vl_nnrelu(x, leak=0)``; ``dzdx = vl_nnrelu(x, dzdy, leak=0)``.
    ``y = max(x, 0)`` (``leak * x`` for x <= 0 when leaky); the derivative
    uses ``x > 0`` (at exactly 0 it is ``leak``).
    """
    leak = _number(leak, "leak")
    return _elementwise(x, dzdy, lambda t: fn.relu(t, leak))


@_fp32
def vl_nnsigmoid(x, dzdy=None):
    """Sigmoid -- MatConvNet ``VL_NNSIGMOID``: ``y = 1 / (1 + exp(-x))``."""
    return _elementwise(x, dzdy, fn.sigmoid)


@_fp32
def vl_nnsoftmax(x, dzdy=None):
    """Softmax over the third (channel) dimension -- MatConvNet ``VL_NNSOFTMAX``."""
    return _elementwise(x, dzdy, fn.softmax)


def _scalar_loss(x, c, dzdy, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    ct = _labels(c, xt)
    if _is_empty(dzdy):  # vl_nnloss(x, c, [], ...) is a forward call, as in MATLAB
        return _out(forward(xt, ct), as_numpy)
    (dx,) = _derivatives(lambda xx: forward(xx, ct), [xt], _tensor(dzdy, "dzdy", like=xt))
    return _out(nchw_to_hwcn(dx), as_numpy, _shape(x))


@_fp32
def vl_nnsoftmaxloss(x, c, dzdy=None, *, normalise=True):
    """Softmax log-loss -- MatConvNet ``VL_NNSOFTMAXLOSS``.

    ``y = vl_nnsoftmaxloss(x, c)``; ``dzdx = vl_nnsoftmaxloss(x, c, dzdy)``.
    ``c``: N labels (one per image), H x W x 1 x N (per location, 0 =
    ignore) or H x W x 2 x N (labels and instance weights). The loss is
    summed over locations and images and divided by N (``normalise=False``:
    v1.0-beta25, no division). See :func:`matconvnet_port.functional.softmaxloss`.
    """
    return _scalar_loss(x, c, dzdy, lambda xx, cc: fn.softmaxloss(xx, cc, normalise=normalise))


@_fp32
def vl_nnloss(x, c, dzdy=None, *, loss="softmaxlog", instance_weights=None, class_weights=None,
              top_k=5, threshold=0.0, normalise=True):
    """Classification and attribute losses -- MatConvNet ``VL_NNLOSS``.

    ``y = vl_nnloss(x, c, loss='softmaxlog', instance_weights=None,
    class_weights=None, top_k=5, normalise=True)``; ``dzdx = vl_nnloss(x, c, dzdy, ...)``.
    ``instance_weights`` H x W x 1 x N (categorical) or H x W x D x N (binary),
    broadcast; ``class_weights`` D elements. See
    :func:`matconvnet_port.functional.loss` for the loss types and formulas.
    """
    xt0 = _float_input(x, "x")
    iw = None
    if instance_weights is not None:
        iw = _tensor(instance_weights, "instance_weights", like=xt0)
        if iw.dim() >= 2:
            iw = hwcn_to_nchw(iw, "instance_weights")
    cw = None if class_weights is None else _tensor(class_weights, "class_weights", like=xt0)

    def forward(xx, cc):
        return fn.loss(xx, cc, loss=loss, instance_weights=iw, class_weights=cw, top_k=top_k,
                       threshold=threshold, normalise=normalise)

    return _scalar_loss(x, c, dzdy, forward)


@_fp32
def vl_nnnormalize(x, param, dzdy=None, *, approximate_power=True, **backend):
    """Local response normalisation across channels -- MatConvNet ``VL_NNNORMALIZE``.

    ``param = [N kappa alpha beta]``; ``y = x / (kappa + alpha * sum_{window} x^2)^beta``.
    ``approximate_power=True`` reproduces MatConvNet's CPU power approximation.
    See :func:`matconvnet_port.functional.lrn`.
    """
    _backend(**backend)
    try:
        param = [float(p) for p in np.asarray(param, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        raise ValueError(f"param must be 4 numbers [N kappa alpha beta], got {param!r}") from None
    return _elementwise(x, dzdy, lambda t: fn.lrn(t, param, approximate_power=approximate_power))


@_fp32
def vl_nnbnorm(x, g, b, dzdy=None, *, moments=None, epsilon=1e-4, **backend):
    """Batch normalisation -- MatConvNet ``VL_NNBNORM``.

    ``y, moments = vl_nnbnorm(x, g, b, moments=None, epsilon=1e-4)``;
    ``dzdx, dzdg, dzdb, moments = vl_nnbnorm(x, g, b, dzdy, moments=None, epsilon=1e-4)``.
    ``g``, ``b`` C elements; ``moments`` C x 2 [mean, sigma], sigma = sqrt(var + epsilon)
    (any 2C-element array, read in MATLAB's column-major order: the C means first).
    With ``moments`` given the layer runs in test mode (see
    :func:`matconvnet_port.functional.bnorm` for MatConvNet's test-mode backward).
    """
    _backend(**backend)
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    gt = _vector(g, xt, "g")
    bt = _vector(b, xt, "b")
    if gt is None or bt is None:
        raise ValueError("g and b must not be empty")
    # any 2C-element moments, read column-major as vl_nnbnorm.cu does (the C means first)
    mt = None if _is_empty(moments) else fn.bnorm_moments(_tensor(moments, "moments", like=xt), xt.shape[1])

    def moments_out(m):  # C x 2, or in the caller's moments' shape, filled in the same order
        return _out(m if mt is None else fn.bnorm_moments_as(m, np.shape(moments)), as_numpy)

    if _is_empty(dzdy):
        y, m = fn.bnorm(xt, gt, bt, mt, epsilon)
        return _out(nchw_to_hwcn(y), as_numpy, _shape(x)), moments_out(m)
    _, m = fn.bnorm(xt.detach(), gt.detach(), bt.detach(), mt, epsilon)
    dx, dg, db = _derivatives(lambda xx, gg, bb: fn.bnorm(xx, gg, bb, mt, epsilon)[0], [xt, gt, bt],
                              _dzdy_nchw(dzdy, xt))
    return (_out(nchw_to_hwcn(dx), as_numpy, _shape(x)), _out(dg, as_numpy, _shape(g)),
            _out(db, as_numpy, _shape(b)), moments_out(m))


@_fp32
def vl_nndropout(x, dzdy=None, *, rate=0.5, mask=None):
    """Inverted dropout -- MatConvNet ``VL_NNDROPOUT``.

    ``y, mask = vl_nndropout(x, rate=0.5)`` (``mask`` 0 or 1/(1-rate));
    ``dzdx = vl_nndropout(x, dzdy, mask=mask)``; ``y, mask = vl_nndropout(x, mask=mask)``
    applies a given mask.
    """
    rate = _number(rate, "rate")
    as_numpy = not isinstance(x, torch.Tensor)
    xt = hwcn_to_nchw(_float_input(x, "x"))
    mt = None if mask is None else hwcn_to_nchw(_tensor(mask, "mask", like=xt), "mask")
    if _is_empty(dzdy):
        y, m = fn.dropout(xt, rate, mt)
        return _out(nchw_to_hwcn(y), as_numpy, _shape(x)), _out(nchw_to_hwcn(m), as_numpy, _shape(x))
    if mt is None:
        raise ValueError("the derivative of vl_nndropout needs the mask of the forward call (mask=...)")
    (dx,) = _derivatives(lambda xx: fn.dropout(xx, rate, mt)[0], [xt], _dzdy_nchw(dzdy, xt))
    return _out(nchw_to_hwcn(dx), as_numpy, _shape(x))
