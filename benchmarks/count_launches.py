"""How many operations that launch a kernel one training step of the fused study makes, per plan.

    python benchmarks/count_launches.py [--size 28] [--conv gemm,grouped,gemm,gemm] [--memory-format nhwc]
                                        [--no-compose] [--where OP]

Small N are launch-bound on a GPU (a step of the 16 LeNets at N = 28 is ~3 ms of a few hundred small
kernels on an H100), so the count is a speed measure that needs no GPU. The step runs on the CPU as
it would on CUDA (every model in one pass, the GEMM convolutions in one block, CUDA's ReLU paths;
the few copies that only the CPU makes around batched products are counted too) under a
``TorchDispatchMode`` that counts every ATen operation except views, allocations and copies of a
tensor onto itself. An operation can launch more than one kernel (cuDNN's, the copies inside a
convolution's backward) and the multi-tensor SGD update is seen per tensor: the count is a
comparison between versions and plans, not a kernel census. ``--where OP`` lists where OP is called.
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
             "new_empty_strided"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self, where: str | None = None):
        super().__init__()
        self.counts = collections.Counter()
        self.where_op, self.where = where, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name not in NO_KERNEL and not (name == "copy_" and _onto_itself(args[0], args[1])):
            self.counts[name] += 1
            if name == self.where_op:
                frames = [f for f in traceback.extract_stack() if "matconvnet_port" in f.filename][::-1][:3]
                self.where[" < ".join(f"{f.name}:{f.lineno}" for f in frames) or "(autograd)"] += 1
        return func(*args, **(kwargs or {}))


def _onto_itself(dst, src) -> bool:
    return (isinstance(src, torch.Tensor) and dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()
            and dst.shape == src.shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--conv", default="gemm,grouped,gemm,gemm")
    parser.add_argument("--memory-format", default="nhwc")
    parser.add_argument("--no-compose", action="store_true")
    parser.add_argument("--where", metavar="OP", help="list the call sites of this operation")
    args = parser.parse_args()
    fn.GEMM_BLOCK_BYTES = 1 << 60  # one block, as on CUDA
    fn.MASKED_RELU_NUMEL = getattr(fn, "MASKED_RELU_NUMEL_CUDA", None)  # CUDA's choice of ReLU path
    weights = list(initial_weights(0))  # cnn_mnist_init(seed=0), as the search starts seed 0
    masks = sorted(ALL_MASKS, reverse=True)
    plan = {"memory_format": args.memory_format, "conv": parse_conv(args.conv), "chunk_size": len(masks),
            "compose": not args.no_compose}
    n = args.size
    images, labels = torch.randn(200, 1, n, n) * 50, torch.randint(1, 11, (200,))
    trainer = FusedTrainer(build(plan, masks, weights, torch.device("cpu")), images, labels)
    trainer.train_epoch(1, np.arange(1, 101))  # warm-up: caches (channel masks, permutations) filled
    x, index = trainer.images[:100], trainer.class_index[:100]
    totals = torch.zeros(3, len(masks), dtype=torch.float64)
    counter = LaunchCounter(args.where)
    with counter:
        trainer._step(x, index, 0.001, totals)
    print(f"N={n}, {plan_label(plan)}: {sum(counter.counts.values())} kernel-launching operations per step")
    for name, count in counter.counts.most_common():
        print(f"  {count:4d} {name}")
    for site, count in counter.where.most_common():
        print(f"  {args.where} x{count}: {site}")


if __name__ == "__main__":
    main()
