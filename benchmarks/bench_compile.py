"""Does torch.compile speed up the fused LeNets? One plan's forward + backward, eager vs compiled.

    python benchmarks/bench_compile.py [--device cuda] [--sizes 64] [--steps 20] [--mode default]
                                       [--conv gemm,grouped,gemm,gemm] [--memory-format nhwc] [--compose gemm|library|none]

Issue 6 lists ``torch.compile`` among the ways to train the 16 masks fast.
For each N this times, on the same batch, the 16 models' loss forward and
backward (batch 100, fp32, no optimizer step) three ways: the fused trainer's
own path run eagerly (the baseline), the same Python function under
``torch.compile`` (TorchInductor), and -- for reference -- the trainer's full
step as the search runs it (CUDA graph replay on CUDA, the SGD update
included). It also prints the compile time, how many graphs Dynamo split the
function into (each break returns to Python) and the largest relative
difference between the compiled and the eager gradients.

Inductor cannot trace ``out=`` into a strided view, so the compiled function
runs with ``functional.PRODUCTS_IN_PLACE = False`` (batched products copied
into place instead; other ``out=`` uses still break the graph, as printed); conv2 defaults to cuDNN's grouped convolution because
the 'streams' plans switch CUDA streams inside the step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench_search import sync
from matconvnet_port import functional as fn
from matconvnet_port.fused import build, labels_per_model, parse_conv, per_model, time_plan
from matconvnet_port.models import ALL_MASKS
from matconvnet_port.search.runner import initial_weights

BATCH = 100


def timed(step, steps: int, device) -> float:
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=20, help="timed forward+backward passes per variant")
    parser.add_argument("--conv", default="gemm,grouped,gemm,gemm")
    parser.add_argument("--memory-format", default="nhwc", choices=("nchw", "nhwc"))
    parser.add_argument("--compose", choices=["gemm", "library", "none"], default="gemm",
                        help="how conv3 and conv4 are composed where no ReLU separates them (default gemm)")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    args = parser.parse_args()
    device = torch.device(args.device)
    masks = list(ALL_MASKS)
    plan = {"memory_format": args.memory_format, "conv": parse_conv(args.conv), "chunk_size": len(masks),
            "compose": False if args.compose == "none" else args.compose}
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{len(masks)} models, batch {BATCH}, fp32; torch.compile mode={args.mode}")
    generator = torch.Generator().manual_seed(0)
    for n in args.sizes:
        model = build(plan, masks, initial_weights(0), device)
        x = torch.randn(BATCH, 1, n, n, generator=generator).to(device)
        index = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
        count = len(masks)

        def loss_of(x, index):
            scores = per_model(model(x), count)
            return fn.softmaxloss_per_image(scores, labels_per_model(index, count)).sum() / BATCH

        def step(f):
            def run():
                for p in model.parameters():
                    p.grad = None
                f(x, index).backward()
            return run

        eager_s = timed(step(loss_of), args.steps, device)
        eager_grads = [p.grad.clone() for p in model.parameters()]
        images = torch.randn(BATCH * 4, 1, n, n, generator=generator).to(device)
        labels = torch.randint(1, 11, (BATCH * 4,), generator=generator).to(device)
        trainer_s = time_plan(plan, masks, initial_weights(0), images, labels, batch_size=BATCH, steps=3)[0]

        saved = fn.PRODUCTS_IN_PLACE
        fn.PRODUCTS_IN_PLACE = False
        try:
            explained = torch._dynamo.explain(loss_of)(x, index)
            torch._dynamo.reset()
            compiled = torch.compile(loss_of, mode=args.mode)
            start = time.perf_counter()
            step(compiled)()
            sync(device)
            compile_s = time.perf_counter() - start
            compiled_grads = [p.grad.clone() for p in model.parameters()]
            compiled_s = timed(step(compiled), args.steps, device)
        finally:
            fn.PRODUCTS_IN_PLACE = saved
        differ = max(float((c - e).abs().max() / e.abs().max().clamp_min(1e-30))
                     for c, e in zip(compiled_grads, eager_grads))
        print(f"N={n}: eager {eager_s * 1e3:.2f} ms | compiled {compiled_s * 1e3:.2f} ms "
              f"(ratio eager/compiled {eager_s / compiled_s:.2f}x; compile {compile_s:.0f} s; "
              f"{explained.graph_count} graphs, {explained.graph_break_count} breaks; gradients differ by "
              f"{differ:.1e} relative) | trainer's full step as the search runs it {trainer_s * 1e3:.2f} ms")
        for reason in {r.reason.splitlines()[0] for r in explained.break_reasons}:
            print(f"    break: {reason[:150]}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
