"""Floating-point mode of CUDA matrix and convolution kernels.

MatConvNet computed in IEEE float32 (cuBLAS/cuDNN before TF32 existed), but
PyTorch lets cuDNN convolutions use TF32 by default on Ampere and newer GPUs,
which rounds operands to 10 mantissa bits (relative errors ~1e-3). Everything
in this package that promises parity runs under :func:`exact_fp32`; TF32 is
used only when a user asks for it (``--precision tf32``).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32")


def set_precision(precision: str) -> None:
    """Set the process-wide mode: 'fp32' (IEEE, default for this package) or 'tf32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


@contextlib.contextmanager
def exact_fp32():
    """Run the block with TF32 off (restoring the caller's settings afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
