"""The paper grid's sizes one after the other vs side by side (``--lanes``), in one run.

    python benchmarks/bench_lanes.py [--device cuda] [--sizes 28 32 ... 64] [--steps 300] [--lanes 2 3]

Work: for every N, the 16 masks as the search trains them (the plan
``autotune_plan`` picks on CUDA, ``default_plan`` on a CPU; one fused
trainer per N, CUDA graphs), ``--steps`` SGD steps of batch 100 on random
digits -- a miniature of one seed of the grid, whose every N trains 12000
steps. Measured in the same run, on the same trainers:

(a) one after the other: each N's steps alone (what ``--lanes 1`` does),
(b) side by side: all N through :func:`matconvnet_port.search.lanes.run_in_lanes`
    with K lanes, paired by cost as the search pairs them.

Printed: each N's milliseconds per step alone, both totals, their ratio (a)/(b),
the grid's nominal fp32 TFLOP/s (and fraction of the datasheet peak on CUDA)
either way, and the training time of one seed of the paper grid projected
from each (x 12000 / steps; validation, about a minute on an H100, not included).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bench_search import FP32_PEAK, flops_per_image, sync
from matconvnet_port.search.runner import initial_weights
from matconvnet_port.fused import FusedTrainer, autotune_plan, build, default_plan, plan_label, run_to_end
from matconvnet_port.models import ALL_MASKS
from matconvnet_port.precision import set_precision
from matconvnet_port.search.grid import PAPER_SIZES, cost_per_image
from matconvnet_port.search.lanes import run_in_lanes

BATCH = 100
GRID_STEPS = 12000  # 20 epochs x 60000 images / batch 100


def trainers(sizes, steps, device) -> dict:
    """N -> (trainer on random digits, plan label), warmed up (graph captured)."""
    weights = list(initial_weights(0))  # cnn_mnist_init(seed=0), as the search starts seed 0
    masks = sorted(ALL_MASKS, reverse=True)
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in sizes:
        images = (torch.randn(steps * BATCH, 1, n, n, generator=g) * 50).to(device)
        labels = torch.randint(1, 11, (steps * BATCH,), generator=g).to(device)
        if device.type == "cuda":
            plan, _ = autotune_plan(masks, weights, images, labels, batch_size=BATCH)
        else:
            plan = default_plan(device.type, n, len(masks))
        trainer = FusedTrainer(build(plan, masks, weights, device), images, labels, batch_size=BATCH,
                               chunk_size=plan["chunk_size"])
        trainer.train_epoch(1, np.arange(1, 2 * BATCH + 1))  # warm-up: graph capture, cuDNN's search
        out[n] = (trainer, plan_label(plan))
        print(f"N={n}: {plan_label(plan)}", flush=True)
    sync(device)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(PAPER_SIZES))
    parser.add_argument("--steps", type=int, default=300, help="training steps per N")
    parser.add_argument("--lanes", type=int, nargs="+", default=[2], help="lane counts to time")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_precision("fp32")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in FP32_PEAK.items() if k in name), None)
    print(f"device: {name}; torch {torch.__version__}; 16 models per N, batch {BATCH}, {args.steps} steps per N, fp32")
    sizes = sorted(set(args.sizes))
    work = {n: trainers([n], args.steps, device)[n] for n in sizes}
    indices = np.arange(1, args.steps * BATCH + 1)
    flops = sum(flops_per_image(n)["train"] for n in sizes) * 16 * BATCH * args.steps

    def tflops(seconds):
        rate = flops / seconds / 1e12
        return f"{rate:.1f} TFLOP/s" + (f" = {100 * rate / peak:.0f} % of the {peak:.0f} TFLOP/s fp32 peak"
                                         if peak and device.type == "cuda" else "")

    alone = {}
    for n in sizes:
        start = time.perf_counter()
        run_to_end(work[n][0].train_epoch_steps(2, indices))
        sync(device)
        alone[n] = time.perf_counter() - start
    sequential = sum(alone.values())
    scale = GRID_STEPS / args.steps
    grid = "one seed of the grid" if sizes == list(PAPER_SIZES) else f"N = {', '.join(map(str, sizes))} of one seed"
    print(f"\n(a) one after the other: {sequential:.2f} s ({tflops(sequential)}); "
          f"{grid}, training: {sequential * scale / 60:.1f} min")
    for n in sizes:
        print(f"    N={n}: {1e3 * alone[n] / args.steps:6.2f} ms/step  ({work[n][1]})")
    result = {"device": name, "torch": torch.__version__, "steps": args.steps, "sizes": sizes,
              "ms_per_step": {n: 1e3 * alone[n] / args.steps for n in sizes}, "sequential_s": sequential,
              "plans": {n: work[n][1] for n in sizes}, "lanes": {}}
    for lanes in args.lanes:
        start = time.perf_counter()
        run_in_lanes(sizes, lambda n: work[n][0].train_epoch_steps(2, indices), lanes=lanes, device=device,
                     cost=cost_per_image)
        sync(device)
        together = time.perf_counter() - start
        result["lanes"][lanes] = together
        print(f"(b) {lanes} lanes side by side: {together:.2f} s ({tflops(together)}); ratio (a)/(b) "
              f"{sequential / together:.2f}x; {grid}, training: {together * scale / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
