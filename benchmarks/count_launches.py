"""How many operations that launch a kernel one training step of the fused study makes, per plan.

    python benchmarks/count_launches.py [--size 28] [--conv gemm,grouped,gemm,gemm] [--memory-format nhwc]
                                        [--compose gemm|library|none] [--where OP] [--bandwidth 3.35]

Small N are launch-bound on a GPU (a step of the 16 LeNets at N = 28 is ~3 ms of a few hundred small
kernels on an H100), so the count is a speed measure that needs no GPU. The step runs on the CPU as
it would on CUDA (every model in one pass, the GEMM convolutions in one block, CUDA's ReLU paths,
batched products in place on the channels-last layout) under a
``TorchDispatchMode`` that counts every ATen operation except views, allocations and copies of a
tensor onto itself. An operation can launch more than one kernel (cuDNN's, the copies inside a
convolution's backward) and the multi-tensor SGD update is seen per tensor: the count is a
comparison between versions and plans, not a kernel census. ``--where OP`` lists where OP is called.

It also adds up the bytes each operation reads and writes (its tensor arguments and results, broadcast
dimensions once; an ``out=`` tensor counts as read and written): the memory traffic of the step's
memory-bound glue (everything but the matrix products and convolutions) divided by the device's
bandwidth (``--bandwidth``, TB/s; 3.35 = H100 SXM) is a lower bound on the glue's time -- at N = 64 on
the H100 glue took ~9 ms of a ~22 ms eager step.
"""

from __future__ import annotations

import argparse
import collections
import traceback

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import matconvnet_port.functional as fn
from matconvnet_port.search.runner import initial_weights
from matconvnet_port.fused import FusedTrainer, build, parse_conv, plan_label
from matconvnet_port.models import ALL_MASKS

NO_KERNEL = {"view", "_unsafe_view", "as_strided", "permute", "transpose", "t", "expand", "slice", "select",
             "unsqueeze", "squeeze", "alias", "detach", "reshape", "split", "split_with_sizes", "unbind", "chunk",
             "narrow", "unflatten", "_reshape_alias", "lift_fresh", "empty", "empty_strided", "new_empty",
             "new_empty_strided", "empty_like"}


# compute-bound operations: not counted as glue traffic
COMPUTE = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "mkldnn_convolution",
           "cudnn_convolution", "_convolution")


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension counts once)."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        count *= size if stride != 0 else 1
    return count * t.element_size()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class LaunchCounter(TorchDispatchMode):
    def __init__(self, where: str | None = None):
        super().__init__()
        self.counts = collections.Counter()
        self.traffic = collections.Counter()  # bytes read + written per operation
        self.where_op, self.where, self.where_bytes = where, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name not in NO_KERNEL and not (name == "copy_" and _onto_itself(args[0], args[1])):
            self.counts[name] += 1
            out = func(*args, **(kwargs or {}))
            moved = sum(_nbytes(t) for t in _tensors((args, kwargs, out)))
            self.traffic[name] += moved
            if name == self.where_op:
                frames = [f for f in traceback.extract_stack() if "matconvnet_port" in f.filename][::-1][:3]
                site = " < ".join(f"{f.name}:{f.lineno}" for f in frames) or "(autograd)"
                self.where[site] += 1
                self.where_bytes[site] += moved
            return out
        return func(*args, **(kwargs or {}))

    def glue_bytes(self) -> int:
        return sum(b for name, b in self.traffic.items() if name not in COMPUTE)


def _onto_itself(dst, src) -> bool:
    return (isinstance(src, torch.Tensor) and dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()
            and dst.shape == src.shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--conv", default="gemm,grouped,gemm,gemm")
    parser.add_argument("--memory-format", default="nhwc")
    parser.add_argument("--compose", choices=["gemm", "library", "none"], default="gemm",
                        help="how conv3 and conv4 are composed where no ReLU separates them (default gemm)")
    parser.add_argument("--where", metavar="OP", help="list the call sites of this operation")
    parser.add_argument("--bandwidth", type=float, default=3.35, metavar="TB/s",
                        help="device memory bandwidth for the glue's time bound (default 3.35: H100 SXM)")
    args = parser.parse_args()
    fn.GEMM_BLOCK_BYTES = 1 << 60  # one block, as on CUDA
    fn.MASKED_RELU_NUMEL = fn.MASKED_RELU_NUMEL_CUDA  # CUDA's choice of ReLU path
    fn.PRODUCTS_IN_PLACE = True  # CUDA's batched products, no copies around them
    weights = list(initial_weights(0))  # cnn_mnist_init(seed=0), as the search starts seed 0
    masks = sorted(ALL_MASKS, reverse=True)
    plan = {"memory_format": args.memory_format, "conv": parse_conv(args.conv), "chunk_size": len(masks),
            "compose": False if args.compose == "none" else args.compose}
    n = args.size
    images, labels = torch.randn(200, 1, n, n) * 50, torch.randint(1, 11, (200,))
    trainer = FusedTrainer(build(plan, masks, weights, torch.device("cpu")), images, labels)
    trainer.train_epoch(1, np.arange(1, 101))  # warm-up: caches (channel masks, permutations) filled
    x, index = trainer.images[:100], trainer.class_index[:100]
    totals = torch.zeros(3, len(masks), dtype=torch.float64)
    counter = LaunchCounter(args.where)
    with counter:
        trainer._step(x, index, 0.001, totals)
    glue = counter.glue_bytes()
    print(f"N={n}, {plan_label(plan)}: {sum(counter.counts.values())} kernel-launching operations per step; "
          f"glue traffic {glue / 1e9:.2f} GB = {glue / (args.bandwidth * 1e12) * 1e3:.2f} ms at "
          f"{args.bandwidth:g} TB/s")
    print("  count  GB moved  operation")
    for name, count in counter.counts.most_common():
        kind = " (compute)" if name in COMPUTE else ""
        print(f"  {count:5d}  {counter.traffic[name] / 1e9:8.3f}  {name}{kind}")
    for site, count in counter.where.most_common():
        print(f"  {args.where} x{count}, {counter.where_bytes[site] / 1e9:.3f} GB: {site}")


if __name__ == "__main__":
    main()
