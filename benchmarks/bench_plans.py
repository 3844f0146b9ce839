"""Every way the fused trainer can run the 16 masks at one N, timed side by side, and where the time goes.

    python benchmarks/bench_plans.py [--device cuda] [--sizes 28 64] [--steps 10] [--profile]

For each N and each candidate plan of ``fused.candidate_plans`` (memory
format, convolution per layer, models per pass, composition): milliseconds
per training step of the 16 models (batch 100, CUDA graphs on GPU, as the
search runs it), throughput, and on CUDA the achieved TFLOP/s -- nominal
(the LeNet's FLOPs) and executed (what a composed plan really computes) --
against the fp32 datasheet peak. On CUDA the first plan is timed again with
cuDNN's algorithm search off, to show what ``cudnn.benchmark`` buys.
``--profile``: the fastest plan's kernels, by device time, over a few eager
steps (a captured graph hides its kernels from the profiler; they are the
same kernels).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_search import FP32_PEAK, executed_flops_per_image, flops_per_image, sync
from matconvnet_port.search.runner import initial_weights
from matconvnet_port.fused import FusedTrainer, candidate_plans, plan_label, time_plan
from matconvnet_port.mnist import get_mnist_imdb
from matconvnet_port.models import ALL_MASKS
from matconvnet_port.precision import set_precision

BATCH = 100


def profile(trainer: FusedTrainer, device, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trainer.use_cuda_graph = False
    trainer.train_epoch(1, np.arange(1, 2 * BATCH + 1))  # eager warm-up
    sync(device)
    with torch_profile(activities=activities) as prof:
        trainer.train_epoch(1, np.arange(1, 3 * BATCH + 1))
        sync(device)
    averages = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=70))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per plan")
    parser.add_argument("--profile", action="store_true", help="print the fastest plan's kernels per N")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_precision("fp32")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((v for k, v in FP32_PEAK.items() if k in name), None) if device.type == "cuda" else None
    print(f"device: {name}; torch {torch.__version__}; 16 models, batch {BATCH}, {args.steps} timed steps per plan, "
          f"fp32" + (f"; datasheet fp32 peak {peak} TFLOP/s" if peak else ""))
    weights = list(initial_weights(0))  # cnn_mnist_init(seed=0), as the search starts seed 0
    masks = sorted(ALL_MASKS, reverse=True)
    for size in args.sizes:
        n = BATCH * max(args.steps + 1, 3)
        imdb = get_mnist_imdb(input_size=size, train_subset=n, val_subset=1)
        images = torch.from_numpy(np.ascontiguousarray(imdb["images"]["data"][:, :, :, :n].transpose(3, 2, 0, 1)))
        images, labels = images.to(device), torch.from_numpy(imdb["images"]["labels"].reshape(-1)[:n])
        plans = candidate_plans(device.type, len(masks), size)
        rows = []
        for i, plan in enumerate(plans):
            for cudnn_benchmark in ((True, False) if device.type == "cuda" and i == 0 else (True,)):
                torch.backends.cudnn.benchmark = cudnn_benchmark
                label = plan_label(plan) + ("" if cudnn_benchmark else " (cudnn.benchmark off)")
                try:
                    seconds, trainer, _ = time_plan(plan, masks, weights, images, labels, batch_size=BATCH,
                                                    steps=args.steps)
                except RuntimeError as e:  # one failing candidate must not hide the others' timings
                    print(f"N={size} {label}: failed: {str(e).splitlines()[0]}")
                    continue
                rows.append((seconds, label, plan, trainer))
        torch.backends.cudnn.benchmark = True
        print(f"\nN={size}: {'plan':44s} {'ms/step':>8s} {'img*models/s':>13s} {'nominal TFLOP/s':>16s} "
              f"{'executed TFLOP/s':>17s}")
        for seconds, label, plan, _ in sorted(rows, key=lambda r: r[0]):
            nominal = flops_per_image(size)["train"] * 16 * BATCH / seconds / 1e12
            executed = executed_flops_per_image(size, masks, bool(plan.get("compose"))) * BATCH / seconds / 1e12
            line = f"{'':6s}{label:44s} {seconds * 1e3:8.2f} {16 * BATCH / seconds:13.0f} {nominal:16.2f} {executed:17.2f}"
            if peak:
                line += f"   ({nominal / peak:.0%} / {executed / peak:.0%} of peak)"
            print(line, flush=True)
        if args.profile and rows:
            seconds, label, _, trainer = min(rows, key=lambda r: r[0])
            print(f"\nN={size}: kernels of {label}, 3 eager steps")
            profile(trainer, device)


if __name__ == "__main__":
    main()
