"""Forward+backward time of the parity conv and pool layers vs plain PyTorch, on LeNet shapes.

    python benchmarks/bench_layers.py [--device cpu|cuda] [--batch 100] [--repeats 20]

For each LeNet layer shape (N = 28 and 64, batch 100) it times, in the same
run, ``matconvnet_port.functional.conv`` against ``torch.nn.functional.conv2d``
and ``matconvnet_port.functional.pool`` (MatConvNet's column-major tie rule)
against ``torch.nn.functional.max_pool2d``, forward plus backward, and prints
the ratio ours / plain (1.0 = no overhead). Median of ``--repeats`` timings.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from matconvnet_port import functional as fn
from matconvnet_port.precision import exact_fp32


def timed(step, device, repeats):
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(forward, inputs):
    def step():
        y = forward(*inputs)
        torch.autograd.grad(y, [t for t in inputs if t.requires_grad], torch.ones_like(y))
    return step


def lenet_shapes(size):
    h1 = size - 4
    p1 = h1 // 2
    h2 = p1 - 4
    p2 = h2 // 2
    convs = [("conv1", 1, 20, 5, size), ("conv2", 20, 50, 5, p1), ("conv3", 50, 500, 4, p2), ("conv4", 500, 10, 1, p2 - 3)]
    pools = [("pool1", 20, h1), ("pool2", 50, h2)]
    return convs, pools


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer':<12} {'shape':<22} {'plain ms':>9} {'ours ms':>9} {'ratio':>6}")
    ratios = []
    with exact_fp32():
        for size in args.sizes:
            convs, pools = lenet_shapes(size)
            for name, c, k, f, h in convs:
                x = torch.randn(args.batch, c, h, h, device=device, requires_grad=c > 1)
                w = torch.randn(k, c, f, f, device=device, requires_grad=True)
                b = torch.randn(k, device=device, requires_grad=True)
                plain = timed(fwd_bwd(lambda x, w, b: F.conv2d(x, w, b), (x, w, b)), device, args.repeats)
                ours = timed(fwd_bwd(lambda x, w, b: fn.conv(x, w, b), (x, w, b)), device, args.repeats)
                ratios.append(ours / plain)
                print(f"{name}@N={size:<4} {str((args.batch, c, h, h)):<22} {plain * 1e3:9.3f} {ours * 1e3:9.3f} {ours / plain:6.2f}")
            for name, c, h in pools:
                x = torch.randn(args.batch, c, h, h, device=device, requires_grad=True)
                plain = timed(fwd_bwd(lambda x: F.max_pool2d(x, 2, 2), (x,)), device, args.repeats)
                ours = timed(fwd_bwd(lambda x: fn.pool(x, 2, stride=2), (x,)), device, args.repeats)
                row = timed(fwd_bwd(lambda x: fn.pool(x, 2, stride=2, tie_order="row"), (x,)), device, args.repeats)
                ratios.append(ours / plain)
                print(f"{name}@N={size:<4} {str((args.batch, c, h, h)):<22} {plain * 1e3:9.3f} {ours * 1e3:9.3f} "
                      f"{ours / plain:6.2f}   (tie_order='row': {row / plain:.2f})")
    print(f"geometric-mean ratio ours/plain: {statistics.geometric_mean(ratios):.2f} "
          f"(worst {max(ratios):.2f})")


if __name__ == "__main__":
    main()
