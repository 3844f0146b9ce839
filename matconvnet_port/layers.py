"""Thin ``torch.nn`` Modules over :mod:`matconvnet_port.functional` (NCHW).

Each Module owns its parameters (in PyTorch's layout) and calls the
functional form; the maths is not repeated here. ``training`` mode is
MatConvNet's ``'normal'`` mode and ``eval()`` its ``'test'`` mode (dropout
becomes the identity, batch norm uses its stored moments).

Loss Modules take ``forward(x, c)`` with MatConvNet's 1-based labels.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as fn

__all__ = ["Conv", "ConvTranspose", "Pool", "ReLU", "Sigmoid", "SoftMax", "SoftMaxLoss", "Loss",
           "LRN", "BatchNorm", "DropOut"]


class Conv(nn.Module):
    """MatConvNet ``conv`` layer: ``weight`` K x FC x FH x FW, ``bias`` K (or None).

    Options as :func:`matconvnet_port.functional.conv` (pad [t b l r], stride,
    dilate; groups from C / FC). ``weight`` None is the identity filter bank.
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 pad=0, stride=1, dilate=1):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.pad, self.stride, self.dilate = fn._pad4(pad), fn._pos2(stride, "stride"), fn._pos2(dilate, "dilate")

    def forward(self, x):
        return fn.conv(x, self.weight, self.bias, pad=self.pad, stride=self.stride, dilate=self.dilate)

    def extra_repr(self):
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"weight={shape}, pad={self.pad}, stride={self.stride}, dilate={self.dilate}"


class ConvTranspose(nn.Module):
    """MatConvNet ``convt`` layer: ``weight`` D x K x FH x FW, ``bias`` K*G (or None)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 upsample=1, crop=0, num_groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.upsample, self.crop, self.num_groups = fn._pos2(upsample, "upsample"), fn._pad4(crop, "crop"), num_groups

    def forward(self, x):
        return fn.convt(x, self.weight, self.bias, upsample=self.upsample, crop=self.crop,
                        num_groups=self.num_groups)


class Pool(nn.Module):
    """MatConvNet ``pool`` layer (``method`` 'max' or 'avg')."""

    def __init__(self, pool_size, pad=0, stride=1, method: str = "max"):
        super().__init__()
        self.pool_size, self.pad = fn._pos2(pool_size, "pool"), fn._pad4(pad)
        self.stride, self.method = fn._pos2(stride, "stride"), str(method).lower()  # vl_nnpool: any case

    def forward(self, x):
        return fn.pool(x, self.pool_size, pad=self.pad, stride=self.stride, method=self.method)

    def extra_repr(self):
        return f"{self.method}, pool={self.pool_size}, pad={self.pad}, stride={self.stride}"


class ReLU(nn.Module):
    """MatConvNet ``relu`` layer (``leak`` a float or a broadcastable tensor)."""

    def __init__(self, leak=0.0):
        super().__init__()
        self.leak = leak

    def forward(self, x):
        return fn.relu(x, self.leak)


class Sigmoid(nn.Module):
    """MatConvNet ``sigmoid`` layer."""

    def forward(self, x):
        return fn.sigmoid(x)


class SoftMax(nn.Module):
    """MatConvNet ``softmax`` layer (over channels)."""

    def forward(self, x):
        return fn.softmax(x)


class SoftMaxLoss(nn.Module):
    """MatConvNet ``softmaxloss`` layer: ``forward(x, c)`` -> 0-d loss (divided by N if ``normalise``)."""

    def __init__(self, normalise: bool = True):
        super().__init__()
        self.normalise = normalise

    def forward(self, x, c):
        return fn.softmaxloss(x, c, normalise=self.normalise)


class Loss(nn.Module):
    """MatConvNet ``loss`` layer / ``dagnn.Loss``: ``forward(x, c)`` with :func:`~matconvnet_port.functional.loss`."""

    def __init__(self, loss: str = "softmaxlog", **options):
        super().__init__()
        self.loss, self.options = loss, options

    def forward(self, x, c):
        return fn.loss(x, c, loss=self.loss, **self.options)

    def extra_repr(self):
        return f"loss={self.loss!r}"


class LRN(nn.Module):
    """MatConvNet ``normalize``/``lrn`` layer, ``param = [N kappa alpha beta]``."""

    def __init__(self, param, approximate_power: bool = True):
        super().__init__()
        self.param, self.approximate_power = [float(p) for p in param], approximate_power

    def forward(self, x):
        return fn.lrn(x, self.param, approximate_power=self.approximate_power)


class BatchNorm(nn.Module):
    """MatConvNet ``bnorm`` layer: ``weight`` (g), ``bias`` (b) C; ``moments`` C x 2 [mean, sigma].

    Training mode normalises with the batch moments and keeps the last ones in
    ``batch_moments`` (the trainer folds them into ``moments`` as MatConvNet's
    ``cnn_train`` does); eval mode uses ``moments``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, moments: torch.Tensor | None = None,
                 epsilon: float = 1e-4):
        super().__init__()
        c = weight.numel()
        self.weight = nn.Parameter(weight.reshape(c))
        self.bias = nn.Parameter(bias.reshape(c))
        if moments is None:
            moments = torch.zeros(c, 2, dtype=weight.dtype, device=weight.device)
        self.moments = nn.Parameter(fn.bnorm_moments(moments, c).contiguous())  # any 2C, column-major
        self.epsilon = epsilon
        self.batch_moments: torch.Tensor | None = None

    def forward(self, x):
        if self.training:
            y, self.batch_moments = fn.bnorm(x, self.weight, self.bias, None, self.epsilon)
            return y
        return fn.bnorm(x, self.weight, self.bias, self.moments, self.epsilon)[0]


class DropOut(nn.Module):
    """MatConvNet ``dropout`` layer (inverted; the identity in eval mode). ``mask`` holds the last mask."""

    def __init__(self, rate: float = 0.5):
        super().__init__()
        self.rate = rate
        self.mask: torch.Tensor | None = None

    def forward(self, x):
        if not self.training:
            return x
        y, self.mask = fn.dropout(x, self.rate)
        return y
