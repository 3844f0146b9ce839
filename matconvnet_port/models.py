"""MatConvNet's MNIST LeNet (``examples/mnist/cnn_mnist_init.m``) and the study's ReLU masks.

The network: conv 5x5x1x20 -> max pool 2x2/2 -> conv 5x5x20x50 -> max pool
2x2/2 -> conv 4x4x50x500 -> ReLU -> conv 1x1x500x10 -> softmaxloss. The
study puts a ReLU after each of the four convs or not: a *mask* of four bits,
conv1 first. The paper names a mask by its layers, ``C`` for a conv and
``CR`` for a conv followed by a ReLU: stock MatConvNet is ``C C CR C``
(bits ``0010``), the paper's winner ``C CR C CR`` (``0101``).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .simplenn import SimpleNN, vl_simplenn_tidy

__all__ = ["cnn_mnist_init", "mask_name", "mask_bits", "parse_mask", "ALL_MASKS", "STOCK_MASK",
           "PAPER_BEST_MASK", "CONV_SHAPES"]

# filter shapes FH x FW x FC x K of conv1..conv4
CONV_SHAPES = ((5, 5, 1, 20), (5, 5, 20, 50), (4, 4, 50, 500), (1, 1, 500, 10))

STOCK_MASK = (0, 0, 1, 0)
PAPER_BEST_MASK = (0, 1, 0, 1)
# The 16 masks in the order of the reference lenet.mat: row m is the binary
# expansion of m (0-based) with conv1 as the least significant bit.
ALL_MASKS = tuple(tuple((m >> i) & 1 for i in range(4)) for m in range(16))


def mask_name(mask) -> str:
    """(0, 1, 0, 1) -> 'C CR C CR'."""
    return " ".join("CR" if bit else "C" for bit in _check_mask(mask))


def mask_bits(mask) -> str:
    """(0, 1, 0, 1) -> '0101' (conv1 first)."""
    return "".join(str(bit) for bit in _check_mask(mask))


def _check_mask(mask) -> tuple[int, ...]:
    if isinstance(mask, str):  # 'C CR C CR' or '0101'
        return parse_mask(mask)
    bits = tuple(int(b) for b in mask)
    if len(bits) != 4 or any(b not in (0, 1) for b in bits):
        raise ValueError(f"a ReLU mask has 4 bits (conv1 first), got {mask!r}")
    return bits


def parse_mask(text: str) -> tuple[int, int, int, int]:
    """'C CR C CR', 'CCRCCR', '0101' or '[0 1 0 1]' -> (0, 1, 0, 1); ValueError otherwise."""
    s = str(text).strip().upper()
    digits = re.sub(r"[\s,\[\]()]", "", s)
    if re.fullmatch(r"[01]{4}", digits):
        return tuple(int(ch) for ch in digits)  # type: ignore[return-value]
    tokens = re.findall(r"CR|C", s.replace(" ", ""))
    if len(tokens) == 4 and "".join(tokens) == s.replace(" ", ""):
        return tuple(int(t == "CR") for t in tokens)  # type: ignore[return-value]
    raise ValueError(f"unknown mask {text!r}: use names like 'C CR C CR' or bits like 0101 (conv1 first)")


def _randn(generator: torch.Generator, shape) -> np.ndarray:
    # MATLAB fills randn(FH, FW, FC, K) in column-major order; do the same so
    # a weight tensor is one contiguous stream of the generator
    draws = torch.randn(int(np.prod(shape)), generator=generator, dtype=torch.float64)
    return draws.numpy().astype(np.float32).reshape(shape, order="F")


def cnn_mnist_init(relu_mask=STOCK_MASK, batch_normalization: bool = False, seed: int = 0,
                   weights: list | None = None) -> SimpleNN:
    """The MNIST LeNet of MatConvNet's ``cnn_mnist_init``, with ReLUs where ``relu_mask`` says.

    Returns a tidied :class:`SimpleNN`: layers ``conv [bnorm] [relu] pool
    conv [bnorm] [relu] pool conv [bnorm] [relu] conv [relu] softmaxloss``
    (a ReLU after conv i iff ``relu_mask[i]``; batch norm after conv1..3 when
    ``batch_normalization``, which drops those convs' biases as MatConvNet
    does). Filters are ``0.01 * randn`` float32 from a torch generator seeded
    with ``seed`` (MATLAB's ``rng(0); randn`` stream cannot be reproduced; to
    start from MATLAB's own draws pass ``weights``, a list of the four
    [filters, biases] pairs, e.g. from ``reference_data/lenet.mat``), biases
    zero. ``meta.inputSize`` [28 28 1] and ``meta.trainOpts`` (learningRate
    0.001, numEpochs 20, batchSize 100) as MatConvNet sets them.
    """
    mask = _check_mask(relu_mask)
    generator = torch.Generator().manual_seed(int(seed))
    if weights is None:
        weights = [[0.01 * _randn(generator, shape), np.zeros((1, shape[3]), np.float32)]
                   for shape in CONV_SHAPES]
    elif len(weights) != 4:
        raise ValueError("weights must hold four [filters, biases] pairs (conv1..conv4)")
    layers: list[dict] = []
    for i, (f, b) in enumerate(weights):
        f = np.asarray(f, np.float32)
        if f.reshape(f.shape + (1,) * (4 - f.ndim)).shape != CONV_SHAPES[i]:
            raise ValueError(f"weights[{i}][0] must be {CONV_SHAPES[i]}, got {f.shape}")
        b = np.asarray(b, np.float32).reshape(1, -1)
        with_bn = batch_normalization and i < 3
        layers.append({"type": "conv", "weights": [f.copy(), np.zeros((0, 0), np.float32) if with_bn else b.copy()],
                       "stride": 1, "pad": 0})
        if with_bn:
            k = CONV_SHAPES[i][3]
            layers.append({"type": "bnorm",
                           "weights": [np.ones((k, 1), np.float32), np.zeros((k, 1), np.float32)],
                           "learningRate": np.array([[1, 1, 0.05]]), "weightDecay": np.array([[0.0, 0.0]])})
        if mask[i]:
            layers.append({"type": "relu"})
        if i < 2:
            layers.append({"type": "pool", "method": "max", "pool": np.array([[2.0, 2.0]]),
                           "stride": 2, "pad": 0})
    layers.append({"type": "softmaxloss"})
    meta = {"inputSize": np.array([[28.0, 28.0, 1.0]]),
            "trainOpts": {"learningRate": 0.001, "numEpochs": 20, "batchSize": 100}}
    return vl_simplenn_tidy(SimpleNN(layers, meta))

