"""MatConvNet's layers as stateless PyTorch functions (NCHW, autograd).

This module holds the maths of the port, once. Everything else -- the
MATLAB-style ``vl_nn*`` entry points (``matconvnet_port.vl_nn``), the thin
Modules (``matconvnet_port.layers``), ``vl_simplenn``/DagNN and the fused
study trainer -- calls these functions.

Conventions (differences from MatConvNet are only in layout):

* Tensors are ``N x C x H x W`` (PyTorch's order). MatConvNet's ``H x W x C x N``
  maps to it by ``x.permute(3, 2, 0, 1)``; filters ``FH x FW x FC x K`` map to
  PyTorch's ``K x FC x FH x FW`` by the same permutation.
* Padding is ``[top bottom left right]`` (scalar = all four), stride ``[sy sx]``,
  dilation ``[dy dx]``, pooling window ``[ph pw]`` (scalar = square).
* Labels are MatConvNet's: 1-based class indices, 0 = ignore this location.
* float32 and float64, CPU and CUDA. Derivatives come from autograd; where
  MatConvNet's derivative is not the derivative of its forward function (the
  test-mode batch-norm backward, the clamped ``log`` loss, the flat error
  "losses") a custom autograd rule reproduces MatConvNet.

Every function raises ``ValueError`` with a one-line message naming the
argument at fault for shapes or options MatConvNet would reject.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "conv", "conv_gemm", "linear_pair_gemm", "linear_pair_conv", "convt", "pool", "relu", "channel_relu", "sigmoid", "softmax", "softmaxloss",
    "softmaxloss_per_image", "crop", "scale", "roipool", "roi_transform", "loss", "lrn", "bnorm", "bnorm_moments", "bnorm_moments_as", "dropout",
    "conv_output_size", "pool_output_size",
    "LOSS_TYPES",
]


# ---------------------------------------------------------------------------
# Option parsing
# ---------------------------------------------------------------------------

def _ints(value, n: int, name: str) -> tuple[int, ...]:
    """Expand a MatConvNet option (scalar or vector) to ``n`` integers."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ValueError(f"{name} must be a number or a vector of numbers, got {value!r}")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    elif hasattr(value, "reshape") and not isinstance(value, (int, float)):
        value = list(value.reshape(-1))  # numpy arrays from .mat files
    if isinstance(value, (int, float)):
        value = [value]
    value = list(value)
    if len(value) == 1:
        value = value * n
    if len(value) != n:
        raise ValueError(f"{name} must have 1 or {n} elements, got {len(value)}")
    out = []
    for v in value:
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            int(v)  # NaN and infinities fail here too
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be a number or a vector of numbers, got {value!r}") from None
        if float(v) != int(v):
            raise ValueError(f"{name} must be integers, got {value}")
        out.append(int(v))
    return tuple(out)


def _pad4(pad, name="pad") -> tuple[int, int, int, int]:
    p = _ints(pad, 4, name)
    if min(p) < 0:
        raise ValueError(f"{name} must be non-negative, got {list(p)}")
    return p  # type: ignore[return-value]


def _pos2(value, name) -> tuple[int, int]:
    v = _ints(value, 2, name)
    if min(v) < 1:
        raise ValueError(f"{name} must be positive, got {list(v)}")
    return v  # type: ignore[return-value]


def _check_4d(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")


def conv_output_size(in_size: int, filter_size: int, pad_before: int, pad_after: int,
                     stride: int = 1, dilate: int = 1) -> int:
    """MatConvNet's output size: ``floor((H + pt + pb - ((FH-1)*d + 1)) / s) + 1``."""
    extent = (filter_size - 1) * dilate + 1
    return (in_size + pad_before + pad_after - extent) // stride + 1


def pool_output_size(in_size: int, pool_size: int, pad_before: int, pad_after: int,
                     stride: int = 1) -> int:
    """MatConvNet's pooling output size: ``floor((H + pt + pb - ph) / s) + 1``."""
    return conv_output_size(in_size, pool_size, pad_before, pad_after, stride, 1)


# ---------------------------------------------------------------------------
# Convolution (vl_nnconv) and its transpose (vl_nnconvt)
# ---------------------------------------------------------------------------

def conv(x: torch.Tensor, f: torch.Tensor | None, b: torch.Tensor | None = None,
         pad=0, stride=1, dilate=1) -> torch.Tensor:
    """Cross-correlation with a filter bank -- MatConvNet ``vl_nnconv``.

    Shapes: ``x`` N x C x H x W; ``f`` K x FC x FH x FW (PyTorch order of
    MatConvNet's FH x FW x FC x K); ``b`` K (or None); result N x K x Ho x Wo.

    Options: ``pad`` [top bottom left right] (zeros), ``stride`` [sy sx],
    ``dilate`` [dy dx]. Filter groups: when C > FC the filters form
    G = C / FC groups; filters g*K/G .. (g+1)*K/G - 1 see input channels
    g*FC .. (g+1)*FC - 1 (C and K must be divisible by G).
    With ``f`` None (MatConvNet's empty filter bank) the layer is the identity:
    pad, subsample by ``stride``, add ``b`` (b then has C elements).

    Formula: ``y[n,k,i,j] = b[k] + sum_{c,u,v} f[k,c,u,v] *
    xpad[n, g*FC + c, i*sy + u*dy, j*sx + v*dx]`` (no filter flip), with
    ``Ho = floor((H + pt + pb - ((FH-1)*dy + 1)) / sy) + 1`` (likewise Wo).
    """
    _check_4d(x)
    pt, pb, pl, pr = _pad4(pad)
    sy, sx = _pos2(stride, "stride")
    dy, dx = _pos2(dilate, "dilate")
    n, c, h, w = x.shape
    if b is not None and b.numel() > 0 and b.dtype != x.dtype:
        raise ValueError(f"b has dtype {b.dtype} but x has {x.dtype}")
    if f is None or f.numel() == 0:
        k = c
        if b is not None and b.numel() not in (0, c):
            raise ValueError(f"b must have {c} elements (one per input channel) when f is empty, got {b.numel()}")
        y = F.pad(x, (pl, pr, pt, pb)) if (pt or pb or pl or pr) else x
        y = y[:, :, ::sy, ::sx]
    else:
        if f.dim() != 4:
            raise ValueError(f"f must be 4-D K x FC x FH x FW, got shape {tuple(f.shape)}")
        if f.dtype != x.dtype:
            raise ValueError(f"f has dtype {f.dtype} but x has {x.dtype}")
        k, fc, fh, fw = f.shape
        if fc < 1 or c % fc != 0:
            raise ValueError(f"x has {c} channels, not a multiple of the filter depth {fc} (filter groups)")
        groups = c // fc
        if k % groups != 0:
            raise ValueError(f"f has {k} filters, not divisible by the {groups} filter groups")
        ho = conv_output_size(h, fh, pt, pb, sy, dy)
        wo = conv_output_size(w, fw, pl, pr, sx, dx)
        if ho < 1 or wo < 1:
            raise ValueError(
                f"f ({fh}x{fw}, dilate [{dy} {dx}]) is larger than the padded input "
                f"({h + pt + pb}x{w + pl + pr})")
        if b is not None and b.numel() not in (0, k):
            raise ValueError(f"b must have {k} elements (one per filter), got {b.numel()}")
        # the bias goes into the convolution kernel itself: one launch fewer, forward and backward
        bias = b.reshape(k) if b is not None and b.numel() > 0 else None
        if pt == pb and pl == pr:
            return F.conv2d(x, f, bias, (sy, sx), (pt, pl), (dy, dx), groups)
        # asymmetric padding cannot be expressed by conv2d's own padding
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), f, bias, (sy, sx), 0, (dy, dx), groups)
    if b is not None and b.numel() > 0:
        y = y + b.reshape(1, k, 1, 1)
    return y


# im2col columns per block of images on the CPU: a block's columns stay in cache between
# being written and being multiplied (and its input derivative between product and col2im)
GEMM_BLOCK_BYTES = 8 << 20
# at most this many numbers per column row, the bias is a column of ones (see _GemmConv)
NARROW_COLUMNS = 64
# batched products read and write the channels-last layout in place (True), or through contiguous
# copies (False); None: in place on CUDA only, where cuBLAS takes the strided matrices as they are
# (benchmarks/count_launches.py sets True to count CUDA's step on the CPU)
PRODUCTS_IN_PLACE: bool | None = None


def _in_place(t: torch.Tensor) -> bool:
    return t.is_cuda if PRODUCTS_IN_PLACE is None else PRODUCTS_IN_PLACE


class _GemmConv(torch.autograd.Function):
    """Grouped, unpadded, stride-1 correlation as im2col + (batched) GEMM on channels-last memory.

    Memory order N x H x W x C: a window of the input is FH x FW runs of C
    contiguous numbers, so im2col is one strided copy, and with the filters'
    own channels-last order (K x FH x FW x FC) the product is a plain matrix
    product per group. On the CPU the images go in blocks whose columns fit
    in cache; the columns are rebuilt in backward rather than kept. For narrow
    columns (conv1: 25 numbers) the bias rides in the product as a column of
    ones -- a separate bias pass over the wide output would cost as much as
    the product -- and its derivative comes out of the filter product.
    With ``pool`` the layer is followed by 2 x 2 max pooling with stride 2
    (windows tiling the map, PyTorch's row-major tie rule) *inside* each
    block, so the full-resolution output and its derivative never leave the
    cache -- for conv1 at large N the widest tensors of the network.
    """

    @staticmethod
    def _columns(x, groups, fh, fw, ones: bool = False):
        n, h, w, c = x.shape  # channels-last view of the input
        fc = c // groups
        ho, wo = h - fh + 1, w - fw + 1
        sn, sh, sw, _ = x.stride()
        # groups x (n*ho*wo) x (fh*fw*fc): row (n, i, j) holds the window at (i, j) of group g
        window = x.as_strided((groups, n, ho, wo, fh, fw, fc), (fc, sn, sh, sw, sh, sw, 1))
        if not ones:
            return window.reshape(groups, n * ho * wo, fh * fw * fc)
        width = fh * fw * fc
        cols = x.new_empty(groups, n * ho * wo, width + 1)
        cols[:, :, :width].view(groups, n, ho, wo, fh, fw, fc).copy_(window)
        cols[:, :, width].fill_(1)
        return cols

    @staticmethod
    def _blocks(x, groups, fh, fw, fc, k, pool):
        n, h, w, _ = x.shape
        ho, wo = h - fh + 1, w - fw + 1
        per_image = groups * ho * wo * fh * fw * fc * x.element_size()
        if pool:  # the block's full-resolution output must stay in cache too
            per_image = max(per_image, 4 * ho * wo * k * x.element_size())
        size = n if x.device.type != "cpu" else max(1, min(n, GEMM_BLOCK_BYTES // per_image))
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    @staticmethod
    def _product(xl, fm, b, ones, groups, fh, fw, out):
        """out (images x ho x wo x K, channels-last) = the block's correlation; returns the
        block's columns."""
        k = out.shape[3]
        cols = _GemmConv._columns(xl, groups, fh, fw, ones)
        if groups == 1:  # 2-D products take transposed operands as they are (bmm may copy them)
            if b is None or ones:
                torch.mm(cols[0], fm[0].t(), out=out.view(-1, k))
            else:
                torch.addmm(b, cols[0], fm[0].t(), out=out.view(-1, k))
        else:
            rows = out.view(-1, groups, k // groups).transpose(0, 1)
            product = torch.bmm if b is None else functools.partial(torch.baddbmm, b.reshape(groups, 1, k // groups))
            # cuBLAS writes group g's columns of the channels-last output in place (a matrix with
            # leading dimension K); on the CPU the batched product into that view measured slower
            if _in_place(out):
                product(cols, fm.transpose(1, 2), out=rows)
            else:
                rows.copy_(product(cols, fm.transpose(1, 2)))
        return cols

    @staticmethod
    def _rows(t, groups):
        """A channels-last block (images x ho x wo x K) as groups x rows x K/g: the layout of an
        output derivative in the batched products. On CUDA a view (cuBLAS takes each group's
        matrix with leading dimension K as it is); on the CPU a contiguous copy, which its
        batched products ran faster with (7-8 % of a step at N = 28 and 64)."""
        rows = t.reshape(-1, groups, t.shape[-1] // groups).transpose(0, 1)
        return rows if _in_place(t) else rows.contiguous()

    @staticmethod
    def _add_filter_grad(dfm, g, xl, groups, fh, fw, ones=False, cols=None):
        """dfm (groups x K/g x width) += g' cols: g (groups x rows x K/g) is the block's output
        derivative, cols its input's columns: kept from forward where the input was one block
        (a GPU), rebuilt here otherwise (the CPU's blocks keep nothing but their input)."""
        if cols is None:
            cols = _GemmConv._columns(xl, groups, fh, fw, ones)
        if groups == 1:
            dfm[0].addmm_(g[0].t(), cols[0])
        else:
            dfm.baddbmm_(g.transpose(1, 2), cols)

    @staticmethod
    def _input_grad(xl, groups):
        """(zeroed derivative of the channels-last input, its view groups x n x h x w x fc for col2im)."""
        n, h, w, c = xl.shape
        dxl = torch.zeros_like(xl)
        return dxl, dxl.reshape(n, h, w, groups, c // groups).permute(3, 0, 1, 2, 4)

    @staticmethod
    def _col2im(dxg, dcols, i, j):
        """Add a block's column derivatives (groups x images x ho x wo x fh x fw x fc) back onto
        images i..j-1 of the input derivative.

        Tap (u, v) adds onto rows u..u+ho-1 and columns v..v+wo-1. Taps whose u differ by a
        multiple of ho (and v by one of wo) cover disjoint, adjacent rectangles: one strided add
        serves each such class, min(ho, fh) x min(wo, fw) adds instead of fh x fw -- one at all
        for a fully connected layer (LeNet's conv3 at N = 28), where every add is a kernel launch.
        """
        g, n, ho, wo, fh, fw, fc = dcols.shape
        for r in range(min(ho, fh)):
            a = -(-(fh - r) // ho)  # taps u = r, r + ho, ... below fh
            for c in range(min(wo, fw)):
                b = -(-(fw - c) // wo)
                # target rows r + p*ho + i (tap p of the class, output row i), columns alike
                target = dxg[:, i:j, r:r + a * ho, c:c + b * wo, :].unflatten(2, (a, ho)).unflatten(4, (b, wo))
                taps = dcols[:, :, :, :, r::ho, c::wo, :]           # g x n x ho x wo x a x b x fc
                target += taps.permute(0, 1, 4, 2, 5, 3, 6)          # -> g x n x a x ho x b x wo x fc

    @staticmethod
    def forward(ctx, x, f, b, pool):
        k, fc, fh, fw = f.shape
        n, c, h, w = x.shape
        groups, kg = c // fc, k // (c // fc)
        ho, wo = h - fh + 1, w - fw + 1
        xl = x.permute(0, 2, 3, 1).contiguous()
        fm = f.permute(0, 2, 3, 1).reshape(groups, kg, fh * fw * fc)  # g x K/g x (fh*fw*fc)
        ones = b is not None and groups == 1 and fh * fw * fc <= NARROW_COLUMNS
        if ones:
            fm = torch.cat([fm, b.reshape(1, k, 1)], dim=2)
        blocks = _GemmConv._blocks(xl, groups, fh, fw, fc, k, pool)
        ctx.cols = None  # one block's columns, kept for the filter derivative
        if not pool:
            y = x.new_empty(n, ho, wo, k)  # channels-last; group g owns channels g*K/g ..
            for i, j in blocks:
                cols = _GemmConv._product(xl[i:j], fm, b, ones, groups, fh, fw, y[i:j])
            ctx.cols = cols if len(blocks) == 1 else None
            ctx.save_for_backward(xl, fm)
        elif len(blocks) == 1:  # (a GPU) pooling's own outputs are the results, no copies
            full = x.new_empty(n, ho, wo, k)
            ctx.cols = _GemmConv._product(xl, fm, b, ones, groups, fh, fw, full)
            pooled, index = F.max_pool2d_with_indices(_nan_as_minus_inf_(full).permute(0, 3, 1, 2), 2, 2)
            y, where = pooled.permute(0, 2, 3, 1), index.permute(0, 2, 3, 1)
            ctx.save_for_backward(xl, fm, where, y)
        else:
            y = x.new_empty(n, ho // 2, wo // 2, k)
            where = torch.empty((n, ho // 2, wo // 2, k), dtype=torch.long, device=x.device)
            full = x.new_empty(blocks[0][1], ho, wo, k)  # one block at full resolution, reused
            for i, j in blocks:
                _GemmConv._product(xl[i:j], fm, b, ones, groups, fh, fw, full[:j - i])
                block = _nan_as_minus_inf_(full[:j - i])  # as pool(): NaN never wins
                pooled, index = F.max_pool2d_with_indices(block.permute(0, 3, 1, 2), 2, 2)
                y[i:j].copy_(pooled.permute(0, 2, 3, 1))
                where[i:j].copy_(index.permute(0, 2, 3, 1))
            ctx.save_for_backward(xl, fm, where, y)
        ctx.shape = (groups, fh, fw, b is not None, ones, pool)
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dy):
        groups, fh, fw, has_bias, ones, pool = ctx.shape
        xl, fm = ctx.saved_tensors[:2]
        k = dy.shape[1]
        ho, wo = xl.shape[1] - fh + 1, xl.shape[2] - fw + 1
        kg, fc = k // groups, xl.shape[3] // groups
        width = fh * fw * fc
        gl = dy.permute(0, 2, 3, 1)  # n x ho x wo x K (pooled size with pool)
        if pool and _may_hold_minus_inf(ctx.saved_tensors[3]):
            # as pool(): a window with nothing above -inf (NaN skipped) passes no derivative
            gl = gl.masked_fill(ctx.saved_tensors[3] == -math.inf, 0)
        want_f, want_x = ctx.needs_input_grad[0:2][::-1]
        want_f = want_f or (ones and ctx.needs_input_grad[2])
        want_b = has_bias and ctx.needs_input_grad[2] and not ones
        dx = df = db = dxg = None
        if want_f:
            dfm = fm.new_zeros(groups, kg, width + ones)
        if want_b:
            db = fm.new_zeros(k)
        if want_x:
            dxl, dxg = _GemmConv._input_grad(xl, groups)
        blocks = _GemmConv._blocks(xl, groups, fh, fw, fc, k, pool)
        if pool:  # pooling's backward reads only the size and layout of its input
            like = xl.new_empty(blocks[0][1], ho, wo, k).permute(0, 3, 1, 2)
        for i, j in blocks:
            if pool:  # the block's derivative before pooling, in cache
                gb = torch.ops.aten.max_pool2d_with_indices_backward(
                    gl[i:j].permute(0, 3, 1, 2), like[:j - i], [2, 2], [2, 2], [0, 0], [1, 1], False,
                    ctx.saved_tensors[2][i:j].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            else:
                gb = gl[i:j]
            if want_b:
                db += gb.sum((0, 1, 2))
            g = _GemmConv._rows(gb, groups)
            if want_f:
                _GemmConv._add_filter_grad(dfm, g, xl[i:j], groups, fh, fw, ones, cols=ctx.cols)
            if want_x:
                dcols = torch.bmm(g, fm[:, :, :width]).reshape(groups, j - i, ho, wo, fh, fw, fc)
                _GemmConv._col2im(dxg, dcols, i, j)
        if want_f:
            dfm = dfm.reshape(k, width + ones)
            df = dfm[:, :width].reshape(k, fh, fw, fc).permute(0, 3, 1, 2)
            if ones and ctx.needs_input_grad[2]:
                db = dfm[:, width].contiguous()
        if want_x:
            dx = dxl.permute(0, 3, 1, 2)
        return dx, df, db, None


class _LibraryConvGemmFilterGrad(torch.autograd.Function):
    """Grouped, unpadded, stride-1 correlation: the convolution library (cuDNN, oneDNN) for the
    output and the input derivative, im2col + batched GEMM (:class:`_GemmConv`'s) for the filter
    derivative -- the part of a grouped convolution's backward pass where cuDNN's float32
    kernels are slowest, while its forward and input-derivative kernels avoid materialising
    the columns."""

    @staticmethod
    def forward(ctx, x, f, b):
        groups = x.shape[1] // f.shape[1]
        ctx.save_for_backward(x, f)
        ctx.shape = (groups, b is not None)
        return F.conv2d(x, f, b, groups=groups)

    @staticmethod
    def backward(ctx, dy):
        x, f = ctx.saved_tensors
        groups, has_bias = ctx.shape
        k, fc, fh, fw = f.shape
        dx = df = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(dy, x, f, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                                     groups, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            xl = x.permute(0, 2, 3, 1).contiguous()
            gl = dy.permute(0, 2, 3, 1)
            dfm = f.new_zeros(groups, k // groups, fh * fw * fc)
            for i, j in _GemmConv._blocks(xl, groups, fh, fw, fc, k, False):
                _GemmConv._add_filter_grad(dfm, _GemmConv._rows(gl[i:j], groups), xl[i:j], groups, fh, fw)
            df = dfm.reshape(k, fh, fw, fc).permute(0, 3, 1, 2)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, df, db


def conv_gemm(x: torch.Tensor, f: torch.Tensor, b: torch.Tensor | None = None, *, max_pool: bool = False,
              library_forward: bool = False) -> torch.Tensor:
    """:func:`conv` without padding, stride or dilation, computed by im2col and matrix products.

    The same function as ``conv(x, f, b)`` (filter groups included) --
    ``y[n,k,i,j] = b[k] + sum_{c,u,v} f[k,c,u,v] x[n, g*FC + c, i+u, j+v]`` --
    with the same derivatives, evaluated differently: on channels-last
    memory, as one (batched over groups) matrix product per pass. Where the
    convolution library is slow for a layer's shape (small channel counts,
    fully connected layers, many groups on the CPU) this is faster; the fused
    study trainer measures which to use per layer. The result is an NCHW
    tensor in channels-last memory format (so are the derivatives of x and f).

    ``max_pool=True`` returns ``pool(conv(x, f, b), 2, stride=2, tie_order='row')``
    instead (the output's height and width must be even), computed block by
    block so the full-resolution output and its derivative stay in cache.

    ``library_forward=True``: the convolution library computes the output and
    the input derivative, and only the filter derivative is a GEMM (the
    library's weakest kernel for many small groups on CUDA); not with ``max_pool``.
    """
    _check_4d(x)
    if f is None or f.dim() != 4:
        raise ValueError(f"f must be 4-D K x FC x FH x FW, got {None if f is None else tuple(f.shape)}")
    if f.dtype != x.dtype or (b is not None and b.numel() > 0 and b.dtype != x.dtype):
        raise ValueError(f"f and b must have x's dtype {x.dtype}")
    k, fc, fh, fw = f.shape
    c, h, w = x.shape[1:]
    if fc < 1 or c % fc != 0 or k % (c // fc) != 0:
        raise ValueError(f"x has {c} channels and f is {k} x {fc}: not a valid filter grouping")
    if fh > h or fw > w:
        raise ValueError(f"f ({fh}x{fw}) is larger than the input ({h}x{w})")
    if b is not None and b.numel() == 0:
        b = None
    if b is not None and b.numel() != k:
        raise ValueError(f"b must have {k} elements (one per filter), got {b.numel()}")
    if max_pool and ((h - fh + 1) % 2 or (w - fw + 1) % 2):
        raise ValueError(f"max_pool needs an even output size, got {h - fh + 1}x{w - fw + 1}")
    if library_forward:
        if max_pool:
            raise ValueError("library_forward does not take max_pool (pool the result instead)")
        return _LibraryConvGemmFilterGrad.apply(x, f, b)
    return _GemmConv.apply(x, f, b, bool(max_pool))


class _LinearPairGemm(torch.autograd.Function):
    """conv(conv(x, f1, b1), f2, b2) with a 1x1 f2 and nothing between: one product with the composed bank.

    Per group: Y = X W1' + 1 b1', Z = Y W2' + 1 b2' = X (W2 W1)' + 1 (W2 b1 + b2)'. With
    G = dZ' X and s = dZ' 1 the derivatives are dW1 = W2' G, db1 = W2' s, dW2 = G W1' + s b1',
    db2 = s, dX = dZ (W2 W1) -- every product has the narrow second layer on one side.
    """

    @staticmethod
    def forward(ctx, x, f1, b1, f2, b2):
        _, fc, fh, fw = f1.shape
        k2 = f2.shape[0]
        n, c, h, w = x.shape
        groups = c // fc
        ho, wo = h - fh + 1, w - fw + 1
        xl = x.permute(0, 2, 3, 1).contiguous()
        w1, w2, wc, bc = _composed_bank(f1, b1, f2, b2, groups)            # wc: g x k2g x width
        z = x.new_empty(n, ho, wo, k2)
        blocks = _GemmConv._blocks(xl, groups, fh, fw, fc, k2, False)
        for i, j in blocks:
            cols = _GemmConv._product(xl[i:j], wc, bc, False, groups, fh, fw, z[i:j])
        ctx.cols = cols if len(blocks) == 1 else None  # kept for dZ' X (one block: a GPU)
        ctx.save_for_backward(xl, w1, b1, w2, wc)
        ctx.shape = (groups, fh, fw)
        return z.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dz):
        xl, w1, b1, w2, wc = ctx.saved_tensors
        groups, fh, fw = ctx.shape
        _, k2, ho, wo = dz.shape
        k2g, k1g, width = k2 // groups, w1.shape[1], w1.shape[2]
        fc = xl.shape[3] // groups
        zl = dz.permute(0, 2, 3, 1)
        gram = w1.new_zeros(groups, k2g, width)  # dZ' X per group
        dx = dxg = None
        if ctx.needs_input_grad[0]:
            dxl, dxg = _GemmConv._input_grad(xl, groups)
        for i, j in _GemmConv._blocks(xl, groups, fh, fw, fc, k2, False):
            g = _GemmConv._rows(zl[i:j], groups)
            _GemmConv._add_filter_grad(gram, g, xl[i:j], groups, fh, fw, cols=ctx.cols)
            if dxg is not None:
                _GemmConv._col2im(dxg, torch.bmm(g, wc).reshape(groups, j - i, ho, wo, fh, fw, fc), i, j)
        if dxg is not None:
            dx = dxl.permute(0, 3, 1, 2)
        s = zl.sum((0, 1, 2)).reshape(groups, k2g, 1)
        w2t = w2.transpose(1, 2)
        df1 = torch.bmm(w2t, gram).reshape(groups * k1g, fh, fw, fc).permute(0, 3, 1, 2)
        db1 = torch.bmm(w2t, s).reshape(-1)
        df2 = torch.baddbmm(s * b1.reshape(groups, 1, k1g), gram, w1.transpose(1, 2))
        return dx, df1, db1, df2.reshape(k2, k1g, 1, 1), s.reshape(-1)


def _composed_bank(f1, b1, f2, b2, groups: int):
    """Per group, the two banks as matrices and the composed one: W1 (g x K1/g x FH*FW*FC, a row per
    filter in channels-last order), W2 (g x K2/g x K1/g), Wc = W2 W1 and bc = W2 b1 + b2 (K2)."""
    k1, fc, fh, fw = f1.shape
    k2 = f2.shape[0]
    w1 = f1.permute(0, 2, 3, 1).reshape(groups, k1 // groups, fh * fw * fc)
    w2 = f2.reshape(groups, k2 // groups, k1 // groups)
    bc = torch.baddbmm(b2.reshape(groups, -1, 1), w2, b1.reshape(groups, -1, 1)).reshape(k2)
    return w1, w2, torch.bmm(w2, w1), bc


def _check_linear_pair(x, f1, b1, f2, b2) -> None:
    _check_4d(x)
    if f1.dim() != 4 or f2.dim() != 4 or f2.shape[2:] != (1, 1):
        raise ValueError(f"f1 must be K1 x FC x FH x FW and f2 K2 x C2 x 1 x 1, got {tuple(f1.shape)}, {tuple(f2.shape)}")
    k1, fc = f1.shape[:2]
    c = x.shape[1]
    if fc < 1 or c % fc or k1 % (c // fc) or f2.shape[0] % (c // fc) or f2.shape[1] * (c // fc) != k1:
        raise ValueError(f"x has {c} channels, f1 is {tuple(f1.shape)}, f2 {tuple(f2.shape)}: not a grouping "
                         f"shared by both layers")
    if f1.shape[2] > x.shape[2] or f1.shape[3] > x.shape[3]:
        raise ValueError(f"f1 ({f1.shape[2]}x{f1.shape[3]}) is larger than the input ({x.shape[2]}x{x.shape[3]})")
    if b1.numel() != k1 or b2.numel() != f2.shape[0]:
        raise ValueError(f"b1 must have {k1} and b2 {f2.shape[0]} elements, got {b1.numel()} and {b2.numel()}")
    if len({x.dtype, f1.dtype, b1.dtype, f2.dtype, b2.dtype}) != 1:
        raise ValueError("x, f1, b1, f2 and b2 must have one dtype")


def linear_pair_gemm(x: torch.Tensor, f1: torch.Tensor, b1: torch.Tensor, f2: torch.Tensor,
                     b2: torch.Tensor) -> torch.Tensor:
    """``conv(conv(x, f1, b1), f2, b2)`` for a 1 x 1 ``f2`` with no nonlinearity between them.

    Two linear layers in a row are one linear map: computed as one
    convolution with the composed filter bank ``f2 * f1`` (im2col + GEMM, as
    :func:`conv_gemm`; groups as in :func:`conv`, the same G for both), with
    the derivatives of both layers' filters and biases (see
    :class:`_LinearPairGemm`). The same function and derivatives as the two
    calls, in other float rounding; the cost of the wide middle layer is
    gone. LeNet's conv3 -> conv4 is such a pair wherever no ReLU follows
    conv3. Unpadded, stride 1; result NCHW in channels-last memory.
    :func:`linear_pair_conv` is the same map by the convolution library.
    """
    _check_linear_pair(x, f1, b1, f2, b2)
    return _LinearPairGemm.apply(x, f1, b1.reshape(-1), f2, b2.reshape(-1))


def linear_pair_conv(x: torch.Tensor, f1: torch.Tensor, b1: torch.Tensor, f2: torch.Tensor,
                     b2: torch.Tensor) -> torch.Tensor:
    """:func:`linear_pair_gemm`'s map, by the convolution library: ``conv(x, f2 * f1, f2 * b1 + b2)``.

    Per group the composed bank is ``Wc = W2 W1`` and the bias ``bc = W2 b1 + b2``
    (two small batched products); the one convolution with ``Wc`` is the
    library's grouped convolution (:func:`conv`: cuDNN, oneDNN), and the
    derivatives of f1, b1, f2, b2 flow back through the two products (autograd:
    ``dW1 = W2' dWc``, ``dW2 = dWc W1' + dbc b1'``, ``db1 = W2' dbc``,
    ``db2 = dbc``, the identities :class:`_LinearPairGemm` spells out). Where
    the composed bank is narrow (LeNet: 10 filters per model) the library
    avoids im2col's columns, which outweigh the arithmetic: on a 2-core CPU
    this ran conv3 -> conv4 of 4 or 8 models at N = 64 2.3-2.8x faster than
    :func:`linear_pair_gemm` (``benchmarks/bench_compose.py``). Same function
    and derivatives, other float rounding.
    """
    _check_linear_pair(x, f1, b1, f2, b2)
    _, fc, fh, fw = f1.shape
    _, _, wc, bc = _composed_bank(f1, b1, f2, b2, x.shape[1] // fc)
    # channels-last, as the products made it, whatever x's layout: with an NCHW input oneDNN ran the
    # layer 1.7-2.2x faster so than with an NCHW bank (bench_compose.py --input-layout nchw)
    return conv(x, wc.reshape(-1, fh, fw, fc).permute(0, 3, 1, 2), bc)


def convt(x: torch.Tensor, f: torch.Tensor, b: torch.Tensor | None = None,
          upsample=1, crop=0, num_groups: int = 1) -> torch.Tensor:
    """Convolution transpose -- MatConvNet ``vl_nnconvt``.

    Shapes: ``x`` N x D x H x W; ``f`` D x K x FH x FW (PyTorch order of
    MatConvNet's FH x FW x K x D: filter k is ``f[:, k]``); ``b`` K*G (or None);
    result N x K*G x Ho x Wo with ``Ho = uy*(H-1) + FH - crop_top - crop_bottom``.

    Definition: if ``U = conv(V, F)`` is the linear map ``U = M V`` then
    ``convt(X, F) = M' X`` (groups as in :func:`conv`, ``num_groups`` must
    divide D). Options: ``upsample`` [uy ux], ``crop`` [top bottom left right].
    """
    _check_4d(x)
    uy, ux = _pos2(upsample, "upsample")
    ct, cb, cl, cr = _pad4(crop, "crop")
    if f is None or f.dim() != 4:
        raise ValueError("f must be 4-D D x K x FH x FW")
    d = x.shape[1]
    if f.shape[0] != d:
        raise ValueError(f"f has depth {f.shape[0]} but x has {d} channels")
    if num_groups < 1 or d % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} does not divide the input depth {d}")
    y = F.conv_transpose2d(x, f, None, (uy, ux), 0, 0, num_groups)
    ho, wo = y.shape[2] - ct - cb, y.shape[3] - cl - cr
    if ho < 1 or wo < 1:
        raise ValueError(f"crop {[ct, cb, cl, cr]} leaves an empty output")
    y = y[:, :, ct:ct + ho, cl:cl + wo]
    if b is not None and b.numel() > 0:
        if b.numel() != y.shape[1]:
            raise ValueError(f"b must have {y.shape[1]} elements, got {b.numel()}")
        y = y + b.reshape(1, -1, 1, 1)
    return y


# ---------------------------------------------------------------------------
# Pooling (vl_nnpool)
# ---------------------------------------------------------------------------

def _valid_counts(size: int, window: int, pad_before: int, stride: int, out: int) -> list[int]:
    """Number of in-image pixels in each pooling window along one dimension."""
    counts = []
    for i in range(out):
        start = i * stride - pad_before
        counts.append(min(start + window, size) - max(start, 0))
    return counts


def pool(x: torch.Tensor, pool_size, pad=0, stride=1, method: str = "max",
         tie_order: str = "column") -> torch.Tensor:
    """Spatial max or average pooling -- MatConvNet ``vl_nnpool``.

    Shapes: ``x`` N x C x H x W -> N x C x Ho x Wo with
    ``Ho = floor((H + pt + pb - ph) / sy) + 1``.
    Options: ``pool_size`` [ph pw], ``pad`` [top bottom left right] (each side
    must be smaller than the window, as MatConvNet requires), ``stride``
    [sy sx], ``method`` 'max' or 'avg'.

    * max: padding never wins (as if padded with -inf). The derivative of
      each window goes to the *first* maximum in MatConvNet's column-major
      scan (top to bottom within a column, columns left to right); overlapping
      windows accumulate. NaN never wins either (MatConvNet's ``std::max``
      from -inf skips it): a window of NaN and -inf only gives -inf and
      passes no derivative, as MatConvNet's strict ``x > max`` never fires.
    * avg: the sum over the window divided by the number of in-image pixels
      of that window (not by ph*pw).

    ``tie_order='row'`` sends the derivative of tied maxima to the first one
    in row-major order instead (PyTorch's rule). Code that stores images
    transposed (N x C x W x H: MATLAB's own memory order) gets MatConvNet's
    column-major rule from it without the transposes ``'column'`` costs.
    """
    _check_4d(x)
    ph, pw = _pos2(pool_size, "pool")
    pt, pb, pl, pr = _pad4(pad)
    sy, sx = _pos2(stride, "stride")
    if max(pt, pb) >= ph or max(pl, pr) >= pw:
        raise ValueError(f"pad {[pt, pb, pl, pr]} must be smaller than the pooling window {[ph, pw]}")
    h, w = x.shape[2:]
    ho = pool_output_size(h, ph, pt, pb, sy)
    wo = pool_output_size(w, pw, pl, pr, sx)
    if ho < 1 or wo < 1:
        raise ValueError(f"pooling window {[ph, pw]} is larger than the padded input {[h + pt + pb, w + pl + pr]}")
    padded = pt or pb or pl or pr
    if method == "max":
        if tie_order not in ("row", "column"):
            raise ValueError(f"tie_order must be 'column' or 'row', got {tie_order!r}")
        if padded:
            x = F.pad(x, (pl, pr, pt, pb), value=-math.inf)
        if tie_order == "row":
            return _MaxPool.apply(x, (ph, pw), (sy, sx))
        # PyTorch keeps the first maximum of a row-major scan; on the transposed
        # image that is MatConvNet's column-major first maximum, which decides
        # where the derivative of tied windows goes.
        return _MaxPool.apply(x.transpose(2, 3), (pw, ph), (sx, sy)).transpose(2, 3)
    if method == "avg":
        if not padded:
            return F.avg_pool2d(x, (ph, pw), (sy, sx))
        total = F.avg_pool2d(F.pad(x, (pl, pr, pt, pb)), (ph, pw), (sy, sx), divisor_override=1)
        rows = torch.tensor(_valid_counts(h, ph, pt, sy, ho), dtype=x.dtype, device=x.device)
        cols = torch.tensor(_valid_counts(w, pw, pl, sx, wo), dtype=x.dtype, device=x.device)
        return total / (rows[:, None] * cols[None, :])
    raise ValueError(f"method must be 'max' or 'avg', got {method!r}")


def _nan_as_minus_inf(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, infinities kept: what MATLAB's ``max`` (and MatConvNet's C ``std::max``) see."""
    return torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _nan_as_minus_inf_(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num_(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _nan_to_zero_(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num_(x, nan=0.0, posinf=math.inf, neginf=-math.inf)


# The NaN rules below cost a pass over the data that a healthy network never needs. On the CPU one
# reduction (a read, no write; the host waits for nothing) tells whether to pay it: a NaN makes the
# sum NaN (so may +inf and -inf together: then the pass runs and changes nothing). On CUDA (any
# accelerator) the pass always runs -- asking would stall the stream and break graph capture.
def _may_hold_nan(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or x.numel() > 0 and math.isnan(float(x.detach().sum()))


def _may_hold_minus_inf(y: torch.Tensor) -> bool:
    """For max pooling's output (no NaN in it): is any window empty?"""
    return y.device.type != "cpu" or y.numel() > 0 and float(y.detach().min()) == -math.inf


def first_max_index(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """MATLAB's ``[~, i] = max(x, [], dim)`` (0-based): the first maximum, NaN ignored (all NaN: the
    first element). ``torch.argmax`` would pick a NaN, and NaN as -inf would win a tie with a later
    -inf (MATLAB's max of [NaN -Inf] is the -Inf, index 2)."""
    key = _nan_as_minus_inf(x)
    index = key.argmax(dim=dim, keepdim=keepdim)
    if not _may_hold_nan(x):
        return index
    # where the maximum is -inf every element is NaN or -inf: the first that is not NaN (none: the first)
    first_number = (~torch.isnan(x)).to(torch.uint8).argmax(dim=dim, keepdim=keepdim)
    return torch.where(key.amax(dim=dim, keepdim=keepdim) == -math.inf, first_number, index)


class _MaxPool(torch.autograd.Function):
    """Unpadded max pooling as MatConvNet's ``acc_max``: NaN never wins (it is -inf to the search), and
    a window with nothing above -inf passes no derivative (MatConvNet's strict ``x > max`` finds no
    maximum there; PyTorch's backward would pick its first element)."""

    @staticmethod
    def forward(ctx, x, kernel, stride):
        clean = _nan_as_minus_inf(x) if _may_hold_nan(x) else x
        y, index = F.max_pool2d_with_indices(clean, kernel, stride)
        empty = (y == -math.inf) if _may_hold_minus_inf(y) else None
        ctx.save_for_backward(x, index, empty)
        ctx.window = (kernel, stride)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, index, empty = ctx.saved_tensors
        if empty is not None:
            grad = grad.masked_fill(empty, 0)
        kernel, stride = ctx.window
        dx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, list(kernel), list(stride), [0, 0], [1, 1],
                                                            False, index)
        return dx, None, None


# ---------------------------------------------------------------------------
# Element-wise and channel-wise nonlinearities
# ---------------------------------------------------------------------------

def relu(x: torch.Tensor, leak=0.0) -> torch.Tensor:
    """Rectified linear unit -- MatConvNet ``vl_nnrelu``.

    ``y = x`` where ``x > 0``, else ``leak * x``. The derivative is 1 where
    ``x > 0`` and ``leak`` elsewhere -- at exactly 0 it is ``leak`` (0 for the
    plain ReLU), as MatConvNet's ``x > 0`` test gives.
    ``leak`` may also be a tensor broadcastable to ``x`` (e.g. 1 x C x 1 x 1:
    a per-channel leak; leak 1 makes a channel pass through unchanged).

    NaN, as MatConvNet: the plain ReLU is MATLAB's ``max(x, 0)``, which ignores
    NaN, so a NaN input gives 0 (PyTorch's ``relu`` gives NaN), and its
    derivative is the product ``dzdy .* (x > 0)``, so an infinite or NaN
    ``dzdy`` at ``x <= 0`` gives NaN (``threshold_backward`` gives 0). The
    leaky ReLU's ``x .* leak`` keeps NaN in both.
    """
    if isinstance(leak, torch.Tensor):  # per element: the plain ReLU where the leak is 0
        return torch.where(leak == 0, _ReLU.apply(x), torch.where(x > 0, x, x * leak))
    if leak == 0:
        return _ReLU.apply(x)
    return torch.where(x > 0, x, x * leak)


# MATLAB's max(x, 0), which ignores NaN: clamp_min (which keeps NaN), then NaN -> 0 where there may be
# any (fmax and where(x > 0, ...) measured 2-2.5x slower than clamp_min on the CPU). The output is +0
# or positive, so sign(y) is MatConvNet's (x > 0) as a float and grad * sign(y) its product derivative
# in vectorised passes (a bool factor takes the slow mixed-type path).
def _matlab_relu(x, out=None):
    y = torch.clamp_min(x, 0, out=out) if out is not None else torch.clamp_min(x, 0)
    return _nan_to_zero_(y) if _may_hold_nan(y) else y


class _ReLU(torch.autograd.Function):
    """``max(x, 0)`` with MATLAB's NaN rule (NaN -> 0), derivative ``dzdy .* (y > 0)``."""

    @staticmethod
    def forward(ctx, x):
        y = _matlab_relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * torch.sign(y)


class _ChannelReLU(torch.autograd.Function):
    """ReLU on some channel ranges, identity on the others (one pass, no broadcast masks)."""

    @staticmethod
    def forward(ctx, x, runs):
        y = torch.empty_like(x)
        for start, end, rectify in runs:
            if rectify:  # MATLAB's max(x, 0): NaN -> 0, as relu
                _matlab_relu(x[:, start:end], out=y[:, start:end])
            else:
                y[:, start:end] = x[:, start:end]
        ctx.runs = runs
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        dx = torch.empty_like(grad)
        for start, end, rectify in ctx.runs:
            if rectify:  # as relu: dzdy .* (x > 0), a product (a non-finite dzdy at x <= 0 gives NaN)
                torch.mul(grad[:, start:end], torch.sign(y[:, start:end]), out=dx[:, start:end])
            else:
                dx[:, start:end] = grad[:, start:end]
        return dx, None


class _MaskedChannelReLU(torch.autograd.Function):
    """ReLU where a broadcast channel mask says so, identity elsewhere: a fixed number of passes
    (2 forward, 3 backward) however many runs the flags form."""

    @staticmethod
    def forward(ctx, x, rectified):
        y = torch.where(rectified, _matlab_relu(x), x)
        ctx.save_for_backward(y, rectified)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rectified = ctx.saved_tensors
        # relu's rule, as _ChannelReLU: dzdy .* (y > 0) on the rectified channels
        return torch.where(rectified, grad * torch.sign(y), grad), None


# Flags forming more runs than this, on a tensor of at most MASKED_RELU_NUMEL numbers (on CUDA
# MASKED_RELU_NUMEL_CUDA), are applied with broadcast masks: the extra passes over a small tensor cost
# less than a kernel launch per run (the 16 runs of the fused study's class scores: 32 launches per
# step -> 5). Break-even on an H100: ~1.5 passes of 2 TB/s against ~2.5 us per launch saved, ~13M
# numbers for 16 runs; on a 2-core CPU a pass costs far more than an operation's overhead.
MASKED_RELU_RUNS = 4
MASKED_RELU_NUMEL = 1 << 18
MASKED_RELU_NUMEL_CUDA = 1 << 22


def channel_relu(x: torch.Tensor, rectified: Sequence[bool]) -> torch.Tensor:
    """:func:`relu` on the channels with ``rectified[c]`` true, the identity elsewhere.

    The same function and derivative as ``relu(x, leak)`` with a per-channel
    leak of 0 (rectified) or 1 (not), computed per run of equal flags instead
    of with broadcast masks (which cost several passes over x): the study's
    fused trainer applies each model's ReLU mask this way. Small tensors with
    many runs take broadcast masks instead (:data:`MASKED_RELU_RUNS`); the
    numbers are the same.
    """
    _check_4d(x)
    if len(rectified) != x.shape[1]:
        raise ValueError(f"rectified has {len(rectified)} flags for {x.shape[1]} channels")
    flags = tuple(map(bool, rectified))
    runs = _channel_runs(flags)
    if len(runs) == 1:
        return relu(x) if runs[0][2] else x
    limit = MASKED_RELU_NUMEL_CUDA if x.is_cuda else MASKED_RELU_NUMEL
    if len(runs) > MASKED_RELU_RUNS and x.numel() <= limit:
        return _MaskedChannelReLU.apply(x, _channel_mask(flags, x.device))
    return _ChannelReLU.apply(x, runs)


@functools.lru_cache(maxsize=256)
def _channel_mask(flags: tuple, device: torch.device) -> torch.Tensor:
    """The flags as a 1 x C x 1 x 1 boolean tensor on ``device``, made once (the first call precedes
    any CUDA graph capture: the fused trainer warms up eagerly)."""
    return torch.tensor(flags, dtype=torch.bool, device=device).reshape(1, -1, 1, 1)


@functools.lru_cache(maxsize=256)
def _channel_runs(flags: tuple) -> tuple:
    """((start, stop, rectified), ...) for the runs of equal flags -- the fused trainer asks for
    the same few masks at every step, so they are worked out once."""
    runs, start = [], 0
    for c in range(1, len(flags) + 1):
        if c == len(flags) or flags[c] != flags[start]:
            runs.append((start, c, flags[start]))
            start = c
    return tuple(runs)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Logistic sigmoid -- MatConvNet ``vl_nnsigmoid``: ``y = 1 / (1 + exp(-x))``."""
    return torch.sigmoid(x)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over channels at every location -- MatConvNet ``vl_nnsoftmax``.

    ``y[n,k,i,j] = exp(x[n,k,i,j]) / sum_q exp(x[n,q,i,j])``.
    """
    _check_4d(x)
    return torch.softmax(x, dim=1)


# ---------------------------------------------------------------------------
# Crop and scale (vl_nncrop, dagnn.Scale)
# ---------------------------------------------------------------------------

def crop(x: torch.Tensor, crop) -> torch.Tensor:
    """Spatial crop -- MatConvNet ``vl_nncrop``.

    ``x`` N x C x H x W, ``crop`` [top bottom left right] (non-negative
    integers; a scalar for all four). Output ``x[:, :, top:H-bottom, left:W-right]``,
    ``max(0, H - top - bottom) x max(0, W - left - right)`` (empty when the
    crop exceeds the input, as MATLAB's empty ranges). The derivative puts
    ``dzdy`` back in place and zeros elsewhere.
    """
    _check_4d(x)
    top, bottom, left, right = _pad4(crop, "crop")
    h, w = x.shape[2], x.shape[3]
    return x[:, :, top:max(top, h - bottom), left:max(left, w - right)]


def scale(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Scale and shift with broadcasting -- MatConvNet ``dagnn.Scale``.

    ``y = bsxfun(@plus, bsxfun(@times, x, w), b)``: all three N x C x H x W
    (4-D), broadcast as ``bsxfun`` does (each dimension equal or 1; usually
    one multiplier and bias per channel, 1 x C x 1 x 1). The derivatives
    with respect to ``w`` and ``b`` are summed over the dimensions they are
    broadcast along.
    """
    named = (("x", x), ("w", w)) + ((("b", b),) if b is not None else ())
    for name, t in named:
        _check_4d(t, name)
    try:
        torch.broadcast_shapes(*(t.shape for _, t in named))
    except RuntimeError:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named)
        raise ValueError(f"x, w and b must agree in each dimension or be 1 there (N x C x H x W), got {shapes}") from None
    y = x * w
    return y if b is None else y + b


# ---------------------------------------------------------------------------
# Region-of-interest pooling (vl_nnroipool, dagnn.ROIPooling)
# ---------------------------------------------------------------------------

def roi_transform(transform) -> tuple[float, ...]:
    """``vl_nnroipool``'s 'Transform' as its six numbers [a b c d e f]: u' = a u + c v + e, v' = b u + d v + f.

    A scalar T scales about pixel 1 (a = d = T, e = f = 1 - T), [Tu Tv] per axis, a 2 x 3 matrix
    [a c e; b d f] is the affine map (MATLAB's column-major order of its six numbers).
    """
    t = np.asarray(transform, dtype=np.float64)
    if t.size in (1, 2):
        tu, tv = t.reshape(-1)[0], t.reshape(-1)[-1]
        return (float(tu), 0.0, 0.0, float(tv), 1.0 - float(tu), 1.0 - float(tv))
    if t.shape == (2, 3) or t.size == 6:
        flat = t.reshape(-1, order="F") if t.ndim == 2 else t.reshape(-1)
        return tuple(float(v) for v in flat)
    raise ValueError(f"transform must be 1 x 1, 2 x 1 or 2 x 3, got {t.size} numbers")


def _roi_bins(start: int, extent: int, count: int, limit: int, real) -> list[tuple[int, int]]:
    """[first, last) pixels of each of ``count`` tiles of an ROI, as MatConvNet's loops compute them
    (tile sizes and their products in the data's precision ``real``: np.float32 for single)."""
    size = real(extent) / real(count)
    out = []
    for p in range(count):
        lo, hi = int(np.floor(real(p) * size)), int(np.ceil(real(p + 1) * size))
        out.append((min(max(lo + start, 0), limit), min(max(hi + start, 0), limit)))
    return out


def _round_half_away(v: float) -> int:
    """C's round(): half away from zero, exactly (floor(|v| + 0.5) rounds 0.49999999999999994 up)."""
    r = math.floor(abs(v))
    return int(math.copysign(r + (abs(v) - r >= 0.5), v))


def _roi_tiles(rois: torch.Tensor, shape, subdivisions, transform, real) -> list:
    """Per ROI: (image index, [(h0, h1) per tile row], [(w0, w1) per tile column]), as the MEX code computes
    them: the corners mapped in double, stored in the data's type, rounded, the tiles clipped to the image."""
    n, _, height, width = shape
    sh, sw = subdivisions
    a, b, c, d, e, f = transform
    out = []
    for t, u1_, v1_, u2_, v2_ in rois.reshape(-1, 5).tolist():
        u1_, v1_, u2_, v2_ = (float(real(v)) for v in (u1_, v1_, u2_, v2_))  # the rois in x's type
        u1, v1 = float(real(a * u1_ + c * v1_ + e)), float(real(b * u1_ + d * v1_ + f))
        u2, v2 = float(real(a * u2_ + c * v2_ + e)), float(real(b * u2_ + d * v2_ + f))
        top, left = _round_half_away(v1) - 1, _round_half_away(u1) - 1
        rows = _roi_bins(top, max(_round_half_away(v2) - 1 - top + 1, 1), sh, height, real)
        cols = _roi_bins(left, max(_round_half_away(u2) - 1 - left + 1, 1), sw, width, real)
        out.append((min(max(int(real(t)) - 1, 0), n - 1), rows, cols))  # (int) truncates toward zero
    return out


def _nonempty_tiles(tiles):
    """(roi, image, h0, h1, w0, w1, ph, pw) of every tile of :func:`_roi_tiles` that holds a pixel, in
    MatConvNet's loop order."""
    for q, (image, rows, cols) in enumerate(tiles):
        for pw, (wa, wb) in enumerate(cols):
            for ph, (ha, hb) in enumerate(rows):
                if hb > ha and wb > wa:
                    yield q, image, ha, hb, wa, wb, ph, pw


def _tile_scan(data: np.ndarray, image: int, ha: int, hb: int, wa: int, wb: int) -> np.ndarray:
    """A tile's values, C x pixels, in MatConvNet's scan: columns outer, rows inner."""
    return data[image, :, ha:hb, wa:wb].transpose(0, 2, 1).reshape(data.shape[1], -1)


class _RoiAverage(torch.autograd.Function):
    """roipool's 'avg' on the tiles of :func:`_roi_tiles`, as MatConvNet's loops: forward
    ``value += x`` over the tile (columns outer, rows inner) in the data's type, then ``value * scale``;
    backward ``dzdy * scale`` added to each pixel of the tile."""

    @staticmethod
    def forward(ctx, x, tiles, subdivisions):
        data = x.detach().cpu().numpy()
        real = data.dtype.type
        y = np.zeros((len(tiles), x.shape[1], *subdivisions), data.dtype)
        for q, image, ha, hb, wa, wb, ph, pw in _nonempty_tiles(tiles):
            values = _tile_scan(data, image, ha, hb, wa, wb)
            scale = _RoiAverage._scale(real, ha, hb, wa, wb)
            y[q, :, ph, pw] = np.cumsum(values, axis=1, dtype=data.dtype)[:, -1] * scale  # one by one, in order
        ctx.tiles, ctx.x_shape = tiles, x.shape
        return torch.from_numpy(y).to(x.device)

    @staticmethod
    def backward(ctx, dzdy):
        g = dzdy.detach().cpu().numpy()
        dx = np.zeros(ctx.x_shape, g.dtype)
        for q, image, ha, hb, wa, wb, ph, pw in _nonempty_tiles(ctx.tiles):
            scale = _RoiAverage._scale(g.dtype.type, ha, hb, wa, wb)
            dx[image, :, ha:hb, wa:wb] += (g[q, :, ph, pw] * scale)[:, None, None]
        return torch.from_numpy(dx).to(dzdy.device), None, None

    @staticmethod
    def _scale(real, ha, hb, wa, wb):
        return real(1) / real((hb - ha) * (wb - wa))


def roipool(x: torch.Tensor, rois, subdivisions=(1, 1), transform=1.0, method: str = "max") -> torch.Tensor:
    """Region-of-interest pooling -- MatConvNet ``vl_nnroipool`` (Fast R-CNN's), as its CPU code.

    ``x`` N x C x H x W; ``rois`` K x 5 (or anything of 5K numbers, read as
    K rows): ``[t u1 v1 u2 v2]`` with ``t`` the 1-based image (truncated,
    then clamped to 1..N as MatConvNet does) and (u, v) 1-based
    (horizontal, vertical) corners, mapped by :func:`roi_transform` in
    double and stored in the data's type. Output K x C x SH x SW: the
    corners are rounded half away from zero, the ROI of
    ``max(v2 - v1 + 1, 1)`` x ``max(u2 - u1 + 1, 1)`` pixels is cut into
    SH x SW tiles ``[floor(p * size), ceil((p + 1) * size))`` (in the data's
    precision) clipped to the image, and each tile is max- (or 'avg'-)
    pooled; an empty tile gives 0. 'max' skips NaN (a tile of NaN and -inf
    gives -inf) and its derivative goes to the first maximum of the
    column-major scan, as MatConvNet's CPU code (its GPU code scans rows
    first). 'avg' is the mean over the clipped tile, as MatConvNet's GPU
    code and documentation have it (its CPU code at the reference commit
    computes the max for 'avg' too): the tile's values summed one by one in
    the data's type, column by column, times 1 / (its pixel count), and its
    derivative ``dzdy * scale`` added to each of the tile's pixels -- so a NaN
    or an infinity stays in its own tiles (an integral image would carry it,
    and the rounding of large values, into every tile below and to the right).
    Max: one gather for all tiles, whose backward pass is a single scatter.
    """
    _check_4d(x)
    sh, sw = _pos2(subdivisions, "subdivisions")
    method = str(method).lower()
    if method not in ("max", "avg"):
        raise ValueError(f"method must be 'max' or 'avg', got {method!r}")
    tf = roi_transform(transform)
    r = torch.as_tensor(rois).detach().to("cpu", torch.float64).reshape(-1)
    if r.numel() == 0 or r.numel() % 5:
        raise ValueError(f"rois must be a 5 x K array with K >= 1, got {r.numel()} numbers")
    if not torch.isfinite(r).all():
        raise ValueError("rois must be finite numbers")
    real = np.float32 if x.dtype == torch.float32 else np.float64
    n, channels, height, width = x.shape
    tiles = _roi_tiles(r, x.shape, (sh, sw), tf, real)
    k = len(tiles)
    if method == "avg":
        return _RoiAverage.apply(x, tiles, (sh, sw))
    # max: each tile's first maximum in MATLAB's scan (columns outer, rows inner), NaN skipped, found on
    # a CPU copy; then one gather from x, whose derivative is one scatter
    data = x.detach().cpu().numpy()
    index = np.zeros((k, channels, sh, sw), np.int64)
    fill = np.zeros((k, channels, sh, sw), data.dtype)  # 0 for an empty tile, -inf for one without a number
    gathered = np.zeros((k, channels, sh, sw), bool)
    plane = height * width
    for q, image, ha, hb, wa, wb, ph, pw in _nonempty_tiles(tiles):
        tile = _tile_scan(data, image, ha, hb, wa, wb)
        tile = np.where(np.isnan(tile), -np.inf, tile)
        at = tile.argmax(axis=1)  # the first maximum
        found = tile[np.arange(channels), at] > -np.inf
        w_at, h_at = np.divmod(at, hb - ha)
        index[q, :, ph, pw] = (image * channels + np.arange(channels)) * plane + (ha + h_at) * width + wa + w_at
        gathered[q, :, ph, pw] = found
        fill[q, :, ph, pw] = np.where(found, 0, -np.inf)
    values = x.reshape(-1)[torch.from_numpy(index).to(x.device)]
    return torch.where(torch.from_numpy(gathered).to(x.device), values, torch.from_numpy(fill).to(x.device))


# ---------------------------------------------------------------------------
# Losses (vl_nnsoftmaxloss, vl_nnloss)
# ---------------------------------------------------------------------------

CATEGORICAL_LOSSES = ("classerror", "topkerror", "log", "softmaxlog", "mhinge", "mshinge")
BINARY_LOSSES = ("binaryerror", "binarylog", "logistic", "hinge")
LOSS_TYPES = CATEGORICAL_LOSSES + BINARY_LOSSES


def _label_map(c: torch.Tensor, x: torch.Tensor, channels: int, name: str = "c") -> torch.Tensor:
    """Labels as N x channels x H x W, from MatConvNet's per-image or per-location forms.

    ``c`` with exactly N elements holds one label per image, repeated at every
    location; otherwise it must be N x channels x H x W.
    """
    n, _, h, w = x.shape
    if not isinstance(c, torch.Tensor):
        c = torch.as_tensor(c)
    c = c.to(device=x.device)
    if c.numel() == n and channels == 1:
        return c.reshape(n, 1, 1, 1).expand(n, 1, h, w)
    if c.dim() != 4 or tuple(c.shape) != (n, channels, h, w):
        raise ValueError(
            f"{name} must have {n} elements (one label per image) or shape "
            f"{(n, channels, h, w)} (N x {channels} x H x W), got {tuple(c.shape)}")
    return c


def _categorical(c: torch.Tensor, num_classes: int, name: str = "c") -> tuple[torch.Tensor, torch.Tensor]:
    """1-based labels -> (0-based index, in-use mask); 0 means "ignore"."""
    c = c.to(torch.float64)
    if not torch.equal(c, torch.round(c)):
        raise ValueError(f"{name} must hold integer class labels")
    lo, hi = (c.min().item(), c.max().item()) if c.numel() else (1, 1)
    if lo < 0 or hi > num_classes:
        raise ValueError(f"{name} holds labels in [{lo:g}, {hi:g}], outside 0..{num_classes} "
                         f"(1-based classes, 0 = ignore)")
    valid = c > 0
    index = (c - 1).clamp_min(0).to(torch.long)
    return index, valid


def softmaxloss(x: torch.Tensor, c, normalise: bool = True) -> torch.Tensor:
    """Softmax followed by the log loss -- MatConvNet ``vl_nnsoftmaxloss``.

    Shapes: ``x`` N x D x H x W scores; ``c`` 1-based labels: N elements (one
    per image, applied at every location), N x 1 x H x W (one per location,
    0 = ignore) or N x 2 x H x W (channel 0 labels, channel 1 instance
    weights). Result: a 0-d tensor

    ``y = 1/N * sum_{n,i,j} mass[n,i,j] * (log sum_q exp x[n,q,i,j] - x[n,c,i,j])``

    summed over *every* spatial location (an H x W map contributes H*W terms
    per image), ``mass`` = (c > 0) times the weights. MatConvNet master
    divides by N (``normalise=True``); v1.0-beta25 does not (``False``).
    """
    _check_4d(x)
    n, d, h, w = x.shape
    if not isinstance(c, torch.Tensor):
        c = torch.as_tensor(c)
    c = c.to(device=x.device)
    weights = None
    if c.dim() == 4 and c.shape[1] == 2 and c.numel() != n:
        c, weights = _label_map(c, x, 2)[:, :1], c[:, 1:2].to(x.dtype)
    else:
        c = _label_map(c, x, 1)
    index, valid = _categorical(c, d)
    mass = valid.to(x.dtype)
    if weights is not None:
        mass = mass * weights
    y = softmaxloss_per_image(x, index, mass).sum()
    return y / n if normalise else y


def _log_sum_exp(x: torch.Tensor) -> torch.Tensor:
    """``Xmax + log(sum(exp(X - Xmax), 3))`` over channels as ``vl_nnsoftmaxloss``/``vl_nnloss`` compute
    it, with ``Xmax = max(X, [], 3)``, which ignores NaN. A +inf score gives NaN (inf - inf), where
    ``torch.logsumexp`` gives inf; the derivative is ``ex ./ sum(ex)``, NaN wherever the sum is.
    Xmax is a constant to the derivative, as in MatConvNet's backward."""
    m = (_nan_as_minus_inf(x) if _may_hold_nan(x) else x).amax(dim=1, keepdim=True).detach()
    return m + torch.log(torch.exp(x - m).sum(dim=1, keepdim=True))


def softmaxloss_per_image(x: torch.Tensor, index: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """The per-image sums of :func:`softmaxloss` (N values, not divided by N).

    ``index`` holds 0-based class indices, N x 1 x H x W or N x 1 x 1 x 1
    (one per image); ``mass`` the per-location weights (None: all 1). No label
    checks and no host synchronisation: for callers that validated the labels
    once (the study's trainer runs this inside CUDA graphs).
    """
    n, _, h, w = x.shape
    t = _log_sum_exp(x) - x.gather(1, index.expand(n, 1, h, w))
    if mass is not None:
        t = mass * t
    return t.sum(dim=(1, 2, 3))


def _loss_terms(name: str, x, c, index):
    """The per-location terms ``t`` of loss ``name`` (the table of :func:`loss`), differentiable in x."""
    if name in ("log", "softmaxlog", "mhinge", "mshinge"):
        xc = x.gather(1, index)
        if name == "log":
            return -torch.log(xc)
        if name == "softmaxlog":
            return _log_sum_exp(x) - xc
        if name == "mhinge":
            return torch.where(xc < 1, 1 - xc, torch.zeros_like(xc))
        others = x.scatter(1, index, -math.inf)
        # MATLAB's max(Q, [], 3) ignores NaN scores of the other classes
        xq = torch.where(torch.isnan(others), -math.inf, others).max(dim=1, keepdim=True).values
        return torch.where(xc - xq < 1, 1 - xc + xq, torch.zeros_like(xc))
    if name == "binarylog":
        return -torch.log(c * (x - 0.5) + 0.5)
    if name == "logistic":
        a = -c * x
        b = a.clamp_min(0)
        return b + torch.log(torch.exp(-b) + torch.exp(a - b))
    m = c * x  # hinge
    return torch.where(m < 1, 1 - m, torch.zeros_like(m))


class _ClosedFormLoss(torch.autograd.Function):
    """``sum(w * t(x)) / n`` whose derivative in ``x`` is ``vl_nnloss.m``'s closed form
    (:func:`_loss_derivative`) and in ``w`` is ``t(x) / n``. The backward is torch operations on the
    saved inputs, so a double backward (``create_graph=True``) differentiates it."""

    @staticmethod
    def forward(ctx, x, w, n, name, c, index):
        ctx.save_for_backward(x, w)
        ctx.meta = (n, name, c, index)
        return (w * _loss_terms(name, x, c, index)).sum() / n

    @staticmethod
    def backward(ctx, dzdy):
        x, w = ctx.saved_tensors
        n, name, c, index = ctx.meta
        dx = _loss_derivative(name, x, c, index, w / n, dzdy) if ctx.needs_input_grad[0] else None
        dw = dzdy / n * _loss_terms(name, x, c, index) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None


def _loss_derivative(name: str, x, c, index, w, dzdy):
    """``vl_nnloss.m``'s derivative of loss ``name``. ``w``: its instanceWeights (label mask x instance x
    class weights, / N when normalising). Its products keep MATLAB's order, so an infinite dzdy or a NaN
    weight gives what MATLAB gives (Inf * 0 = NaN where a margin is inactive)."""
    wd = dzdy * w
    if name == "log":  # max(X(ci), 1e-8): MATLAB's max ignores NaN
        xc = x.gather(1, index)
        return torch.zeros_like(x).scatter(1, index, -wd / torch.where(torch.isnan(xc), 1e-8, xc.clamp_min(1e-8)))
    if name == "mhinge":
        return torch.zeros_like(x).scatter(1, index, -wd * (x.gather(1, index) < 1))
    if name == "mshinge":
        q = first_max_index(x.scatter(1, index, -math.inf), 1, keepdim=True)
        ww = wd * (x.gather(1, index) - x.gather(1, q) < 1)
        return torch.zeros_like(x).scatter(1, index, -ww).scatter(1, q, ww)  # Y(qi) after Y(ci), as MATLAB
    if name == "binarylog":
        return -wd / (x + (c - 1) * 0.5)
    if name == "logistic":
        return -wd * c / (1 + torch.exp(c * x))
    return -wd * c * (c * x < 1)  # hinge


def loss(x: torch.Tensor, c, loss: str = "softmaxlog", instance_weights=None,
         class_weights=None, top_k: int = 5, threshold: float = 0.0,
         normalise: bool = True) -> torch.Tensor:
    """Categorical and attribute losses -- MatConvNet ``vl_nnloss``.

    Shapes: ``x`` N x D x H x W. ``c``: for the categorical losses 1-based
    labels with N elements (one per image, every location) or N x 1 x H x W
    (0 = ignore); for the binary (attribute) losses N x D x H x W in {-1, +1}
    (0 = ignore; with D = 1 also N elements, one per image, as ``vl_nnloss.m`` repeats
    them over space). Result: a 0-d tensor ``y = sum_{locations} w * t`` divided
    by N when ``normalise`` (MatConvNet master; beta25 had no division),
    where ``w`` is (c != 0) times ``instance_weights`` (broadcast to the label
    shape) times ``class_weights[c]`` (categorical losses, D elements).

    Per-location terms ``t`` (x_c is the score of the true class):

    ==============  ====================================================
    classerror      argmax_q x_q != c (first maximum, NaN ignored); derivative 0
    topkerror       c not among the ``top_k`` largest scores; derivative 0
    log             -log(x_c), x probabilities; derivative -1/max(x_c, 1e-8)
    softmaxlog      log sum_q exp(x_q) - x_c
    mhinge          max(0, 1 - x_c)
    mshinge         max(0, 1 - x_c + max_{q != c} x_q) (NaN scores ignored in the max)
    binaryerror     sign(x - threshold) != c; derivative 0
    binarylog       -log(c (x - 1/2) + 1/2), x probabilities
    logistic        log(1 + exp(-c x))
    hinge           max(0, 1 - c x)
    ==============  ====================================================

    The derivative with respect to ``x`` is ``vl_nnloss.m``'s closed form,
    term by term in MATLAB's order (not autograd's chain through the forward):
    the hinges' where the margin is strictly active (``x_c < 1`` etc.), and
    on non-finite scores, an infinite ``dzdy`` or a NaN weight the same
    values as MATLAB (``Inf * 0`` is NaN where a margin is inactive; mshinge
    when every other class is NaN or -inf: MATLAB's ``max`` returns the true
    class itself, whose ``Y(qi) = +W`` overwrites ``Y(ci) = -W``; logistic at
    ``c x = -inf``: ``-c``); no derivative flows to the weights (MatConvNet
    has none). softmaxlog is the exception: its derivative is autograd's, as
    :func:`softmaxloss`'s is, so that a DagNN converted from a SimpleNN net
    trains to the same numbers (under an infinite ``dzdy`` it is NaN at the
    true class, MATLAB's -Inf).
    """
    _check_4d(x)
    name = loss.lower() if isinstance(loss, str) else loss
    if name not in LOSS_TYPES:
        raise ValueError(f"loss must be one of {', '.join(LOSS_TYPES)}; got {loss!r}")
    n, d, h, w = x.shape
    if not isinstance(c, torch.Tensor):
        c = torch.as_tensor(c)
    c = c.to(device=x.device)
    categorical = name in CATEGORICAL_LOSSES
    if categorical:
        c = _label_map(c, x, 1)
        index, valid = _categorical(c, d)
        weight = valid.to(x.dtype)
    else:
        if c.numel() == n and d == 1:  # one attribute, a label per image: repeated over space
            c = c.reshape(n, 1, 1, 1).expand(n, 1, h, w).contiguous()
        if c.dim() != 4 or tuple(c.shape) != tuple(x.shape):
            raise ValueError(f"c must have the shape of x {tuple(x.shape)} for the binary loss "
                             f"{name!r}, got {tuple(c.shape)}")
        if not bool(((c == 1) | (c == -1) | (c == 0)).all()):
            raise ValueError("c must hold attribute labels in {-1, 0, +1} for binary losses")
        c = c.to(x.dtype)
        weight = (c != 0).to(x.dtype)
    if instance_weights is not None:
        iw = torch.as_tensor(instance_weights, dtype=x.dtype, device=x.device)
        try:
            weight = weight * iw
        except RuntimeError as e:
            raise ValueError(f"instance_weights of shape {tuple(iw.shape)} do not broadcast to "
                             f"the labels {tuple(weight.shape)}") from e
        if tuple(weight.shape) != tuple(c.shape):  # MATLAB's instanceWeights(:)' * t(:): one weight a label
            raise ValueError(f"instance_weights of shape {tuple(iw.shape)} widen the labels {tuple(c.shape)}: "
                             "give at most one weight per label")
    if class_weights is not None:
        if not categorical:
            raise ValueError("class_weights apply to categorical losses only")
        cw = torch.as_tensor(class_weights, dtype=x.dtype, device=x.device).reshape(-1)
        if cw.numel() != d:
            raise ValueError(f"class_weights must have {d} elements (one per class), got {cw.numel()}")
        weight = weight * cw[index]

    scale = n if normalise else 1
    if name in ("classerror", "topkerror", "binaryerror"):
        with torch.no_grad():
            if name == "classerror":
                t = (first_max_index(x, 1, keepdim=True) != index).to(x.dtype)
            elif name == "topkerror":
                k = min(int(top_k), d)
                # MATLAB's sort is stable: among tied scores the lower class index ranks first
                order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
                t = 1 - (order == index).any(dim=1, keepdim=True).to(x.dtype)
            else:
                t = (torch.sign(x - threshold) != c).to(x.dtype)
        # error counts are flat: no derivative flows (callers treat it as zero)
        return (weight * t).sum() / scale
    if name == "softmaxlog":
        # autograd's derivative, as :func:`softmaxloss` (vl_nnsoftmaxloss, which SimpleNN nets and the study
        # train with) has it: a DagNN converted from a SimpleNN net must train to the same numbers
        return (weight * _loss_terms(name, x, None, index)).sum() / scale
    return _ClosedFormLoss.apply(x, weight, scale, name, c, index if categorical else None)


# ---------------------------------------------------------------------------
# Local response normalisation (vl_nnnormalize)
# ---------------------------------------------------------------------------

def _fast_pow_bits(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """MatConvNet's CPU ``fast_pow(base, exponent)`` for positive ``base``.

    log2 and exp2 are cubic polynomials on the mantissa, evaluated on the IEEE
    bit pattern (single: 23-bit mantissa, double: 52-bit); relative error up
    to ~0.5 % against the exact power.
    """
    if base.dtype == torch.float32:
        int_t, mant, one_bits = torch.int32, 23, 127 << 23
    elif base.dtype == torch.float64:
        int_t, mant, one_bits = torch.int64, 52, 1023 << 52
    else:
        raise ValueError(f"lrn supports float32/float64, got {base.dtype}")
    plog3, plog2, plog1 = 0.164042561333445, -0.606737602222409, 1.442695040888963
    pexp3, pexp2, pexp1 = 0.079441541679836, 0.227411277760219, 0.693147180559945
    ix = base.view(int_t) - one_bits
    mx = ((ix & ((1 << mant) - 1)) + one_bits).view(base.dtype) - 1
    fx = (ix >> mant).to(base.dtype)
    mx2 = mx * mx
    mx3 = mx2 * mx
    t = exponent * (fx + mx * plog1 + mx2 * plog2 + mx3 * plog3)
    fz = torch.floor(t)
    rz = t - fz
    rz2 = rz * rz
    rz3 = rz2 * rz
    tz = fz + rz * pexp1 + rz2 * pexp2 + rz3 * pexp3
    return ((tz * float(1 << mant)).to(int_t) + one_bits).view(base.dtype)


class _FastPow(torch.autograd.Function):
    """``L ** e`` with MatConvNet's approximation; derivative ``e * P / L``.

    The derivative uses the approximate power itself, exactly as MatConvNet's
    CPU backward does (``Lbeta / L``), so forward and backward both match it.
    """

    @staticmethod
    def forward(ctx, base, exponent):
        p = _fast_pow_bits(base, exponent)
        ctx.save_for_backward(base, p)
        ctx.exponent = exponent
        return p

    @staticmethod
    def backward(ctx, grad):
        base, p = ctx.saved_tensors
        return grad * (ctx.exponent * p / base), None


def lrn(x: torch.Tensor, param: Sequence[float], approximate_power: bool = True) -> torch.Tensor:
    """Cross-channel local response normalisation -- MatConvNet ``vl_nnnormalize``.

    ``param = [N kappa alpha beta]``; ``x`` N x C x H x W (any batch size);

    ``y[k] = x[k] / (kappa + alpha * sum_{q in Q(k)} x[q]^2) ^ beta``,
    ``Q(k) = [k - floor((N-1)/2), k + ceil((N-1)/2)]`` clipped to the channels
    (for even N the window reaches further *forward*, unlike PyTorch's
    ``LocalResponseNorm``); alpha is per element, not divided by N.

    ``approximate_power=True`` (default) reproduces MatConvNet's CPU code,
    which evaluates the power with a polynomial log2/exp2 approximation
    (up to ~0.5 % off the exact value, forward and backward); ``False`` uses
    the exact power (MatConvNet's GPU code and the formula above).
    """
    _check_4d(x)
    if len(param) != 4:
        raise ValueError(f"param must be [N kappa alpha beta], got {list(param)}")
    size, kappa, alpha, beta = (float(p) for p in param)
    if size < 1 or size != int(size):
        raise ValueError(f"param(1) (the window size N) must be a positive integer, got {size:g}")
    size = int(size)
    before = (size - 1) // 2
    after = size - 1 - before
    squares = F.pad(x * x, (0, 0, 0, 0, before, after))
    window_sum = F.avg_pool3d(squares.unsqueeze(1), (size, 1, 1), stride=1,
                              divisor_override=1).squeeze(1)
    base = kappa + alpha * window_sum
    if approximate_power:
        if bool((base <= 0).any()):
            raise ValueError("kappa + alpha * sum(x^2) must be positive for the approximate power")
        scale = _FastPow.apply(base, -beta)
    else:
        scale = base.pow(-beta)
    return x * scale


# ---------------------------------------------------------------------------
# Batch normalisation (vl_nnbnorm)
# ---------------------------------------------------------------------------

class _BnormGivenMoments(torch.autograd.Function):
    """Batch norm with fixed moments and MatConvNet's backward.

    Forward ``y = g/sigma * (x - mu) + b``. MatConvNet's backward with given
    moments uses the *training-mode* formulas with those moments substituted
    (``dzdx`` includes the mean-of-derivative terms), which is not the
    derivative of this forward map; we reproduce it for parity.
    """

    @staticmethod
    def forward(ctx, x, g, b, mu, sigma):
        ctx.save_for_backward(x, g, mu, sigma)
        return (g / sigma).reshape(1, -1, 1, 1) * (x - mu.reshape(1, -1, 1, 1)) + b.reshape(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, dy):
        x, g, mu, sigma = ctx.saved_tensors
        return (*_bnorm_backward(x, g, mu, sigma, dy), None, None)


def _bnorm_backward(x, g, mean, sigma, dy):
    """(dzdx, dzdg, dzdb): bnorm_cpu.cpp's compute_ders and batch_normalize_backward,
    ``dzdg = (sum(dy .* x) - mean * sum(dy)) / sigma`` (that order: under an infinite dy, Inf - Inf is NaN
    there), ``dzdb = sum(dy)``, ``dzdx = G1 (dy - dzdb / m) - G2 (x - mean)``, ``G1 = g / sigma``,
    ``G2 = G1 dzdg / (m sigma)``, m = N H W."""
    mass = x.shape[0] * x.shape[2] * x.shape[3]
    view = (1, -1, 1, 1)
    dzdb = dy.sum(dim=(0, 2, 3))
    dzdg = ((dy * x).sum(dim=(0, 2, 3)) - mean * dzdb) / sigma
    g1 = g / sigma
    g2 = g1 * dzdg / (mass * sigma)
    dzdx = g1.reshape(view) * (dy - (dzdb / mass).reshape(view)) - g2.reshape(view) * (x - mean.reshape(view))
    return dzdx, dzdg, dzdb


class _BnormTraining(torch.autograd.Function):
    """Batch norm with the batch's moments, as MatConvNet's ``bnorm_cpu.cpp``: the moments in one pass,
    ``mean = sum(x) / m``, ``sigma = sqrt(sum(x.^2) / m - mean^2 + epsilon)`` (m = N H W, in the data's
    type), and its backward (:func:`_bnorm_backward`).
    The one-pass variance is MatConvNet's: it loses digits when a channel's mean is large against its
    spread (a two-pass variance is more accurate, and would not be MatConvNet's numbers)."""

    @staticmethod
    def forward(ctx, x, g, b, epsilon):
        mean, sigma = _bnorm_moments_one_pass(x, epsilon)
        ctx.save_for_backward(x, g)
        ctx.epsilon = epsilon
        ctx.mark_non_differentiable(mean, sigma)
        view = (1, -1, 1, 1)
        return (g / sigma).reshape(view) * (x - mean.reshape(view)) + b.reshape(view), mean, sigma

    @staticmethod
    def backward(ctx, dy, _dmean, _dsigma):
        x, g = ctx.saved_tensors
        # recomputed, as compute_ders_and_moments does: a double backward then sees them depend on x
        mean, sigma = _bnorm_moments_one_pass(x, ctx.epsilon)
        return (*_bnorm_backward(x, g, mean, sigma, dy), None)


def _bnorm_moments_one_pass(x: torch.Tensor, epsilon: float):
    mass = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.sum(dim=(0, 2, 3)) / mass
    return mean, torch.sqrt((x * x).sum(dim=(0, 2, 3)) / mass - mean * mean + epsilon)


def bnorm_moments(moments: torch.Tensor, c: int) -> torch.Tensor:
    """Batch-norm moments as C x 2 [mean, sigma] from any array of 2C elements, read in MATLAB's
    column-major order as ``vl_nnbnorm`` reads them (the C means first; a C x 2 array is itself)."""
    if moments.numel() != 2 * c:
        raise ValueError(f"moments must have 2C = {2 * c} elements (C x 2 [mean, sigma]), got shape "
                         f"{tuple(moments.shape)}")
    flat = moments.permute(*reversed(range(moments.dim()))).reshape(-1) if moments.dim() > 1 else moments.reshape(-1)
    return flat.reshape(2, c).t()


def bnorm_moments_as(moments: torch.Tensor, shape) -> torch.Tensor:
    """C x 2 moments in ``shape`` (2C elements), filled in column-major order: the inverse of
    :func:`bnorm_moments`, to give moments back in the array shape they came in."""
    shape = tuple(shape)
    return moments.t().reshape(tuple(reversed(shape))).permute(*reversed(range(len(shape))))


def bnorm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, moments: torch.Tensor | None = None,
          epsilon: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch normalisation -- MatConvNet ``vl_nnbnorm``.

    Shapes: ``x`` N x C x H x W; ``g``, ``b`` C (multipliers, biases);
    ``moments`` C x 2 = [mean, sigma] (or any 2C-element array, read column-major:
    :func:`bnorm_moments`). Returns ``(y, moments)``, the moments C x 2.

    Training (``moments`` None): per channel ``mean`` over N, H, W, biased
    variance, ``sigma = sqrt(var + epsilon)``, ``y = g * (x - mean) / sigma + b``;
    the batch moments are returned (without gradient). The variance and the
    backward are MatConvNet's formulas (see :class:`_BnormTraining`): the
    variance in one pass, ``sum(x.^2)/m - mean^2``.
    Test (``moments`` given): the same formula with the given moments, which
    are used as they are (epsilon is not added again); the backward is
    MatConvNet's (see :class:`_BnormGivenMoments`).
    """
    _check_4d(x)
    c = x.shape[1]
    g = g.reshape(-1)
    b = b.reshape(-1)
    if g.numel() != c or b.numel() != c:
        raise ValueError(f"g and b must have {c} elements (one per channel), got {g.numel()} and {b.numel()}")
    view = (1, c, 1, 1)
    if moments is None:
        y, mean, sigma = _BnormTraining.apply(x, g, b, epsilon)
        return y, torch.stack([mean, sigma], dim=1).detach()
    moments = bnorm_moments(moments, c)
    y = _BnormGivenMoments.apply(x, g, b, moments[:, 0].detach(), moments[:, 1].detach())
    return y, moments


# ---------------------------------------------------------------------------
# Dropout (vl_nndropout)
# ---------------------------------------------------------------------------

def dropout(x: torch.Tensor, rate: float = 0.5, mask: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout -- MatConvNet ``vl_nndropout`` (training mode).

    ``y = x * mask`` where ``mask`` is 0 with probability ``rate`` and
    ``1 / (1 - rate)`` otherwise (drawn when not given). Returns ``(y, mask)``.
    Test mode is the identity (``vl_simplenn`` skips the layer).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if mask is None:
        keep = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator) >= rate
        mask = keep.to(x.dtype) * (1.0 / (1.0 - rate))
    elif tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    return x * mask, mask
