"""One grouped convolution of the fused study network, pass by pass, in every implementation.

    python benchmarks/bench_grouped_conv.py [--device cuda] [--sizes 28 64] [--layer 2] [--models 16]

The fused network's conv2 (or ``--layer`` 3) for 16 models at input size N,
batch 100: milliseconds of the forward pass, the input derivative (dgrad)
and the filter derivative (wgrad), each timed alone, for cuDNN's / oneDNN's
grouped convolution on NCHW and on channels-last memory, one dense
convolution per model (in turn, and on CUDA over side streams), and
im2col + batched GEMM (``functional.conv_gemm``), plus the achieved TFLOP/s
of the three passes together. Where the study's training step spends most
of its time (conv2: ``bench_plans.py --profile``), this says which kernels
to use or to write.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_layers import timed
from matconvnet_port import functional as fn
from matconvnet_port.fused import STREAMS
from matconvnet_port.models import CONV_SHAPES
from matconvnet_port.precision import set_precision

BATCH = 100


def input_side(size: int, layer: int) -> int:
    side = size
    for i in range(layer - 1):
        side = side - CONV_SHAPES[i][0] + 1
        if i < 2:
            side //= 2
    return side


def library_passes(x, f, groups):
    def dgrad(dy):
        return torch.ops.aten.convolution_backward(dy, x, f, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups,
                                                   [True, False, False])[0]

    def wgrad(dy):
        return torch.ops.aten.convolution_backward(dy, x, f, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups,
                                                   [False, True, False])[1]
    return (lambda: F.conv2d(x, f, groups=groups)), dgrad, wgrad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    parser.add_argument("--layer", type=int, default=2, choices=[2, 3])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    set_precision("fp32")
    torch.backends.cudnn.benchmark = True
    fh, fw, fc, k = CONV_SHAPES[args.layer - 1]
    m = args.models
    print(f"conv{args.layer}: {m} models x ({fh}x{fw}x{fc}x{k}), batch {BATCH}, fp32, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for size in args.sizes:
        side = input_side(size, args.layer)
        out = side - fh + 1
        flops = 2 * BATCH * out * out * fh * fw * fc * k * m  # one pass
        x = torch.randn(BATCH, m * fc, side, side, device=device)
        f = torch.randn(m * k, fc, fh, fw, device=device) * 0.05
        dy = torch.randn(BATCH, m * k, out, out, device=device)
        rows = []
        for name, layout in (("grouped NCHW", torch.contiguous_format), ("grouped channels-last", torch.channels_last)):
            xl, fl, dyl = (t.contiguous(memory_format=layout) for t in (x, f, dy))
            fwd, dgrad, wgrad = library_passes(xl, fl, m)
            rows.append((name, timed(fwd, device, args.reps), timed(lambda: dgrad(dyl), device, args.reps),
                         timed(lambda: wgrad(dyl), device, args.reps)))
        per_model = [library_passes(xs.contiguous(), fs.contiguous(), 1)
                     for xs, fs in zip(x.chunk(m, 1), f.chunk(m, 0))]
        dys = [d.contiguous() for d in dy.chunk(m, 1)]
        rows.append(("dense per model, in turn",
                     timed(lambda: [p[0]() for p in per_model], device, args.reps),
                     timed(lambda: [p[1](d) for p, d in zip(per_model, dys)], device, args.reps),
                     timed(lambda: [p[2](d) for p, d in zip(per_model, dys)], device, args.reps)))
        if device.type == "cuda":
            streams = [torch.cuda.Stream(device) for _ in range(STREAMS)]

            def spread(which):
                def run():
                    current = torch.cuda.current_stream()
                    for s in streams:
                        s.wait_stream(current)
                    for j, (p, d) in enumerate(zip(per_model, dys)):
                        with torch.cuda.stream(streams[j % len(streams)]):
                            p[which]() if which == 0 else p[which](d)
                    for s in streams:
                        current.wait_stream(s)
                return run
            rows.append((f"dense per model, {STREAMS} streams", timed(spread(0), device, args.reps),
                         timed(spread(1), device, args.reps), timed(spread(2), device, args.reps)))
        # im2col + GEMM: each derivative is the backward pass of one kept graph (timed alone, not as a
        # difference of two noisy medians, which can come out negative)
        xg = x.clone().requires_grad_(True)
        fg = f.clone().requires_grad_(True)
        y_x, y_f = fn.conv_gemm(xg, f), fn.conv_gemm(x, fg)
        gemm_fwd = timed(lambda: fn.conv_gemm(x, f), device, args.reps)
        gemm_dgrad = timed(lambda: torch.autograd.grad(y_x, xg, dy, retain_graph=True), device, args.reps)
        gemm_wgrad = timed(lambda: torch.autograd.grad(y_f, fg, dy, retain_graph=True), device, args.reps)
        rows.append(("im2col + batched GEMM", gemm_fwd, gemm_dgrad, gemm_wgrad))
        print(f"\nN={size}: conv{args.layer} input {BATCH}x{m * fc}x{side}x{side}, {flops / 1e9:.1f} GFLOP per pass")
        print(f"  {'implementation':32s} {'forward':>9s} {'dgrad':>9s} {'wgrad':>9s} {'total ms':>9s} {'TFLOP/s':>8s}")
        for name, a, b, c in rows:
            total = a + b + c
            print(f"  {name:32s} {a * 1e3:9.3f} {b * 1e3:9.3f} {c * 1e3:9.3f} {total * 1e3:9.3f} "
                  f"{3 * flops / total / 1e12:8.2f}", flush=True)
        best = [min(rows, key=lambda r: r[i]) for i in (1, 2, 3)]
        print(f"  fastest per pass: forward {best[0][0]}, dgrad {best[1][0]}, wgrad {best[2][0]} -> "
              f"{sum(r[i + 1] for i, r in enumerate(best)) * 1e3:.3f} ms, "
              f"{3 * flops / sum(r[i + 1] for i, r in enumerate(best)) / 1e12:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
