"""conv3 -> conv4 of the masks without a ReLU between them: the two layers, or one composed layer two ways.

    python benchmarks/bench_compose.py [--device cpu|cuda] [--models 4 8] [--sizes 28 36 48 64] [--repeats 7]
                                       [--input-layout nhwc|nchw]

Where no ReLU follows conv3, LeNet's conv3 (4x4x50x500) and the 1x1 conv4 (500 -> 10) are one
linear map. For M such models (grouped, channels-last, batch 100, fp32) it times forward + backward
(derivatives of the input and of all four filter and bias tensors) of

  (a) the two layers one by one, the library's grouped convolution each (``functional.conv``): the baseline;
  (b) ``functional.linear_pair_gemm``: the composed 4x4x50x10 bank by im2col + batched GEMM;
  (c) ``functional.linear_pair_conv``: the composed bank by the library's grouped convolution;
  (d) the same with the composed bank in NCHW memory (``linear_pair_conv`` keeps it channels-last);

and prints milliseconds (median of ``--repeats``) and the speed-up of (b), (c) and (d) over (a). The fused
trainer's plan picks (b) or (c) (``compose`` = 'gemm' or 'library'); on CUDA autotune measures both.
The input is channels-last (as the trainer's activations) unless ``--input-layout nchw``; with an NCHW
input, (c) against (d) shows why ``linear_pair_conv`` keeps its bank channels-last.
"""

from __future__ import annotations

import argparse

import torch

from bench_layers import fwd_bwd, lenet_shapes, timed
from matconvnet_port import functional as fn
from matconvnet_port.precision import exact_fp32


def conv3_input_size(n: int) -> int:
    return lenet_shapes(n)[0][2][4]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 36, 48, 64])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--input-layout", choices=["nhwc", "nchw"], default="nhwc")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer runs (timed's warm-up absorbs the search)
    print(f"device: {device}; torch {torch.__version__}; batch {args.batch}, fp32, forward + backward, "
          f"median of {args.repeats}; {args.input_layout} input")
    print(f"{'N':>3} {'models':>6} {'conv3 in':>8}  {'(a) two layers':>14}  {'(b) gemm':>14}  {'(c) library':>14}"
          f"  {'(d) NCHW bank':>14}")
    with exact_fp32():
        for size in args.sizes:
            for m in args.models:
                ms = time_pair(size, m, args.batch, device, args.repeats, args.input_layout == "nhwc")
                s = conv3_input_size(size)
                print(f"{size:3d} {m:6d} {f'{s}x{s}':>8}  {ms['two']:11.1f} ms  {ms['gemm']:7.1f} ms "
                      f"{ms['two'] / ms['gemm']:4.1f}x  {ms['library']:7.1f} ms {ms['two'] / ms['library']:4.1f}x  "
                      f"{ms['nchw']:7.1f} ms {ms['two'] / ms['nchw']:4.1f}x", flush=True)


def time_pair(size: int, m: int, batch: int, device, repeats: int, channels_last: bool = True) -> dict:
    """Milliseconds of forward + backward of conv3 -> conv4 for m models at input size ``size``, each way."""
    gen = torch.Generator().manual_seed(0)
    last = torch.channels_last

    def tensor(*shape, scale=1.0, layout=torch.contiguous_format):
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(device).contiguous(memory_format=layout).requires_grad_(True)

    s = conv3_input_size(size)
    inputs = (tensor(batch, 50 * m, s, s, layout=last if channels_last else torch.contiguous_format),
              tensor(500 * m, 50, 4, 4, scale=0.01, layout=last), tensor(500 * m, scale=0.01),
              tensor(10 * m, 500, 1, 1, scale=0.01, layout=last), tensor(10 * m, scale=0.01))

    def nchw_bank(x, f1, b1, f2, b2):  # linear_pair_conv but for the bank's memory order
        _, fc, fh, fw = f1.shape
        _, _, wc, bc = fn._composed_bank(f1, b1, f2, b2, x.shape[1] // fc)
        return fn.conv(x, wc.reshape(-1, fh, fw, fc).permute(0, 3, 1, 2).contiguous(), bc)

    ways = (("two", lambda x, f1, b1, f2, b2: fn.conv(fn.conv(x, f1, b1), f2, b2)),
            ("gemm", fn.linear_pair_gemm), ("library", fn.linear_pair_conv), ("nchw", nchw_bank))
    return {name: timed(fwd_bwd(forward, inputs), device, repeats) * 1e3 for name, forward in ways}


if __name__ == "__main__":
    main()
