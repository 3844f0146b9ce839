"""The study's training path vs a naive PyTorch baseline, on the same data and work.

    python benchmarks/bench_search.py [--device cpu|cuda] [--sizes 28 64] [--images 2000] [--interleave]

Work: 16 LeNets (the 16 ReLU masks), one epoch over ``--images`` MNIST
images resized to N x N, batch 100, SGD with momentum 0.9 and weight decay
5e-4, IEEE float32 (TF32 off).

(a) naive: 16 separate plain ``torch.nn`` LeNets trained one after the other,
    the loop a PyTorch user would write (``nn.Sequential``, ``optim.SGD``,
    ``F.cross_entropy`` summed over the output map), data already on the device,
    no per-step ``.item()``; it runs first, in the process as a user has it;
(b) ours: the search's training path, :class:`matconvnet_port.fused.FusedTrainer`
    (the 16 models as one network, CUDA graphs on GPU) with the plan the search
    uses -- memory format, convolution per layer, models per pass: measured by
    ``autotune_plan`` on CUDA (timed separately), ``default_plan`` on the CPU
    (``--autotune`` measures there too); on the CPU it keeps freed memory
    (``fused.keep_freed_memory``), which the naive loop does not do --
    ``--same-allocator`` gives the naive loop that too.

Printed per N: images x models per second for each, the ratio (b)/(a), and on
CUDA the achieved fraction of the fp32 FLOP bound -- against the datasheet
peak and against a dense fp32 matrix product measured in the same run -- and
a projection of the full paper grid (16 masks x 10 sizes x 20 epochs x 60000
images, one seed) from the measured throughput.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matconvnet_port.search.runner import initial_weights
from matconvnet_port.fused import FusedTrainer, autotune_plan, build, default_plan, plan_label
from matconvnet_port.mnist import get_mnist_imdb
from matconvnet_port.models import ALL_MASKS, CONV_SHAPES
from matconvnet_port.precision import set_precision

# fp32 (non-tensor-core) datasheet peaks, TFLOP/s
FP32_PEAK = {"H100": 67.0, "H200": 67.0, "A100": 19.5}
PAPER_SIZES = list(range(28, 65, 4))


def layer_macs(size: int) -> list[int]:
    """Multiply-adds per image of conv1..conv4 of the LeNet at input N."""
    spatial, macs = size, []
    for i, (fh, fw, fc, k) in enumerate(CONV_SHAPES):
        spatial = spatial - fh + 1
        macs.append(spatial * spatial * fh * fw * fc * k)
        if i < 2:
            spatial //= 2
    return macs


def flops_per_image(size: int) -> dict:
    """Multiply-adds x 2 of the LeNet at input N: forward, and the training step
    (forward + input and weight gradients, no input gradient for conv1)."""
    macs = layer_macs(size)
    fwd = 2 * sum(macs)
    bwd = 2 * sum(m * (1 if i == 0 else 2) for i, m in enumerate(macs))
    return {"forward": fwd, "train": fwd + bwd}


def executed_flops_per_image(size: int, masks, compose: bool) -> float:
    """Training FLOPs per image summed over ``masks`` as a plan executes them: with ``compose``,
    a model without a ReLU after conv3 runs conv3 -> conv4 as one composed 4x4x50x10 layer
    (forward, filter and input products: 3 x its forward), not as the two layers."""
    macs = layer_macs(size)
    pair = 2 * (macs[2] + macs[3]) * 3  # conv3 + conv4, fwd + 2 bwd
    composed = 2 * macs[2] // CONV_SHAPES[2][3] * CONV_SHAPES[3][3] * 3  # the 10-wide composed bank
    nominal = flops_per_image(size)["train"]
    return float(sum(nominal - (pair - composed if compose and not mask[2] else 0) for mask in masks))


def naive_lenet(mask) -> nn.Sequential:
    layers = []
    for i, (fh, fw, fc, k) in enumerate(CONV_SHAPES):
        layers.append(nn.Conv2d(fc, k, (fh, fw)))
        if mask[i]:
            layers.append(nn.ReLU())
        if i < 2:
            layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_models(images, device, batch_size=100) -> list[nn.Sequential]:
    models = [naive_lenet(mask).to(device) for mask in ALL_MASKS]
    # warm-up outside the timed region (cuDNN algorithm choice, allocator)
    for model in models[:2]:
        model(images[:batch_size]).sum().backward()
        model.zero_grad(set_to_none=True)
    sync(device)
    return models


def naive_epoch(model, images, targets, batch_size=100) -> None:
    """One epoch of one plain LeNet: the loop a PyTorch user writes."""
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
    n = images.shape[0]
    order = torch.randperm(n, device=images.device)
    for t in range(0, n, batch_size):
        idx = order[t:t + batch_size]
        out = model(images[idx])
        y = targets[idx].reshape(-1, 1, 1).expand(-1, out.shape[2], out.shape[3])
        loss = F.cross_entropy(out, y, reduction="sum") / idx.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_naive(images, labels, device, batch_size=100) -> float:
    models = naive_models(images, device, batch_size)
    targets = labels.to(device=device, dtype=torch.long) - 1
    start = time.perf_counter()
    for model in models:
        naive_epoch(model, images, targets, batch_size)
    sync(device)
    return time.perf_counter() - start


def our_trainer(images, labels, device, batch_size=100, autotune=None) -> tuple[FusedTrainer, str, dict]:
    """Our path as the search runs it: on CUDA the plan autotune_plan measures, on the CPU
    fused.default_plan (the search does not autotune there; ``autotune=True`` times the
    candidates too and uses the fastest). Warmed up (CUDA graph captured)."""
    weights = list(initial_weights(0))  # cnn_mnist_init(seed=0), as the search starts seed 0
    masks = sorted(ALL_MASKS, reverse=True)
    timings = {}
    if autotune is None:
        autotune = device.type == "cuda"
    if autotune:
        # a timed step or two per candidate: a CPU step of 16 models at N=64 takes seconds
        plan, timings = autotune_plan(masks, weights, images, labels, batch_size=batch_size,
                                      steps=3 if device.type == "cuda" else 1)
    else:
        plan = default_plan(device.type, images.shape[2], len(masks))
    trainer = FusedTrainer(build(plan, masks, weights, device), images, labels, batch_size=batch_size,
                           chunk_size=plan["chunk_size"])
    trainer.train_epoch(1, np.arange(1, batch_size * 3 + 1))  # warm-up: graph capture
    sync(device)
    return trainer, plan_label(plan), timings


def run_ours(images, labels, device, batch_size=100, autotune=None) -> tuple[float, str, dict]:
    trainer, impl, timings = our_trainer(images, labels, device, batch_size, autotune)
    start = time.perf_counter()
    trainer.train_epoch(1, np.arange(1, images.shape[0] + 1))
    sync(device)
    return time.perf_counter() - start, impl, timings


def run_interleaved(images, labels, device, batch_size=100, autotune=None) -> tuple[float, float, str, dict]:
    """Both paths in 16 alternating slices -- naive model m's epoch, then 1/16 of our epoch's
    steps -- so a machine whose speed drifts (shared cores) slows both alike. Returns
    (naive seconds, our seconds, our plan, autotune timings)."""
    trainer, impl, timings = our_trainer(images, labels, device, batch_size, autotune)
    models = naive_models(images, device, batch_size)
    targets = labels.to(device=device, dtype=torch.long) - 1
    steps = np.arange(1, images.shape[0] + 1).reshape(-1, batch_size)
    naive = ours = 0.0
    for m, model in enumerate(models):
        start = time.perf_counter()
        naive_epoch(model, images, targets, batch_size)
        sync(device)
        naive += time.perf_counter() - start
        part = steps[m * len(steps) // len(models):(m + 1) * len(steps) // len(models)].reshape(-1)
        start = time.perf_counter()
        if part.size:
            trainer.train_epoch(1, part)
        sync(device)
        ours += time.perf_counter() - start
    return naive, ours, impl, timings


def measured_fp32_matmul_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device)
    b = torch.randn(8192, 8192, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - start) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    parser.add_argument("--images", type=int, default=None, help="images per epoch (default 2000 on CPU, 10000 on CUDA)")
    parser.add_argument("--skip-naive", action="store_true", help="time only our path (for the projection)")
    parser.add_argument("--autotune", action="store_true", help="on the CPU, measure the candidate plans too")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--interleave", action="store_true",
                        help="alternate the two paths in 16 slices (robust to a machine whose speed drifts; "
                             "on the CPU the naive loop then runs with our allocator settings too)")
    parser.add_argument("--same-allocator", action="store_true",
                        help="on CPU, keep freed memory for the naive loop too (a fairer kernel-only ratio)")
    args = parser.parse_args()
    if args.images is not None and args.images < 300:  # our path warms up on 3 batches of 100
        parser.error(f"--images must be >= 300, got {args.images}")
    device = torch.device(args.device)
    set_precision("fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = args.images or (10000 if device.type == "cuda" else 2000)
    if args.same_allocator and device.type == "cpu":
        from matconvnet_port.fused import keep_freed_memory
        print(f"allocator: freed memory kept for both paths ({keep_freed_memory()})")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; "
          f"{n} images x 16 models per epoch, fp32")
    peak = next((v for k, v in FP32_PEAK.items() if k in name), None) if device.type == "cuda" else None
    ceiling = measured_fp32_matmul_tflops(device) if device.type == "cuda" else None
    if ceiling:
        print(f"fp32 peak: datasheet {peak} TFLOP/s; measured 8192^3 fp32 matmul {ceiling:.1f} TFLOP/s")
    data = {}
    for size in args.sizes:
        imdb = get_mnist_imdb(input_size=size, train_subset=n, val_subset=1)
        images = imdb["images"]["data"][:, :, :, :n]
        data[size] = (torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))).to(device),
                      torch.from_numpy(imdb["images"]["labels"].reshape(-1)[:n]))
    if n % 100:
        parser.error("--images must be a multiple of the batch size (100)")
    naive, interleaved = {}, {}
    if args.interleave and not args.skip_naive:
        for size in args.sizes:
            naive[size], *interleaved[size] = run_interleaved(*data[size], device, autotune=args.autotune or None)
    else:
        # every naive run first: our path changes the process's allocator settings on the CPU
        naive = {size: None if args.skip_naive else run_naive(*data[size], device) for size in args.sizes}
    results = []
    for size in args.sizes:
        if size in interleaved:
            ours, impl, timings = interleaved[size]
        else:
            ours, impl, timings = run_ours(*data[size], device, autotune=args.autotune or None)
        work = 16 * n
        row = {"size": size, "images": n, "ours_seconds": ours, "ours_rate": work / ours, "conv_impl": impl,
               "autotune_seconds_per_step": timings}
        line = f"N={size}: ours {work / ours:9.0f} images*models/s ({impl})"
        if naive[size] is not None:
            row.update(naive_seconds=naive[size], naive_rate=work / naive[size], ratio=naive[size] / ours)
            line += f" | naive {work / naive[size]:9.0f} images*models/s | ratio ours/naive {naive[size] / ours:5.2f}x"
        if device.type == "cuda":
            tflops = flops_per_image(size)["train"] * work / ours / 1e12
            row.update(tflops=tflops, fraction_of_peak=tflops / peak if peak else None,
                       fraction_of_measured_matmul=tflops / ceiling)
            composed = "+compose" in impl  # the composed conv3/conv4 do less arithmetic than the count
            if composed:
                line += " | nominal LeNet FLOPs:"
                row["flops_nominal"] = True
            line += f" | {tflops:.1f} TFLOP/s = {tflops / ceiling:.0%} of measured fp32 matmul"
            if peak:
                line += f", {tflops / peak:.0%} of datasheet fp32 peak"
            if composed:
                executed = executed_flops_per_image(size, ALL_MASKS, True) * n / ours / 1e12
                row.update(tflops_executed=executed)
                line += f" | executed FLOPs: {executed:.1f} TFLOP/s"
                if peak:
                    line += f" = {executed / peak:.0%} of datasheet peak"
        print(line, flush=True)
        results.append(row)
    # projection of the full grid from the measured throughput (FLOP-weighted interpolation)
    measured = {r["size"]: r["ours_seconds"] / (16 * r["images"]) for r in results}
    sizes = sorted(measured)
    per_flop = {s: measured[s] / flops_per_image(s)["train"] for s in sizes}
    total = 0.0
    for s in PAPER_SIZES:
        nearest = min(sizes, key=lambda m: abs(m - s))
        lo = max([m for m in sizes if m <= s], default=nearest)
        hi = min([m for m in sizes if m >= s], default=nearest)
        rate = per_flop[lo] if lo == hi else per_flop[lo] + (per_flop[hi] - per_flop[lo]) * (s - lo) / (hi - lo)
        total += rate * flops_per_image(s)["train"] * 16 * 20 * 60000
    print(f"projected full grid (16 masks x N=28..64 x 20 epochs x 60000 images, one seed, training "
          f"only): {total / 60:.1f} minutes on this device (from N = {sizes})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "results": results, "projected_grid_minutes": total / 60,
                       "measured_fp32_matmul_tflops": ceiling, "datasheet_fp32_tflops": peak}, f, indent=2)


if __name__ == "__main__":
    main()
