"""Project the full paper grid's time from a measured slice (a search results.csv).

    python benchmarks/project_grid.py runs/<dir>/results.csv [--epochs 20 --seeds 3 --masks 16] [--epoch K]

``seconds`` in results.csv is a cell-epoch's share of its fused group's epoch
(training and validation; 0 for the epochs of a diverged model that finished
early). The projection sums, over the paper's sizes N = 28..64, the measured
mean seconds per cell-epoch at that N times masks x epochs x seeds; sizes not
measured are interpolated linearly in N. By default it counts the slice's
epochs as measured and its last epoch for each epoch after them: the first
epoch also pays one-time costs (CUDA graph capture, cuDNN's algorithm search
for the training and evaluation shapes) that a 20-epoch run pays once, and
diverged models stop training after a few epochs, so the last epoch is the
closest to the steady state.

A slice that ends before the diverged-model stop takes effect still trains
its diverged cells in every epoch. ``--diverged-stop`` estimates the grid
with the stop, by the search's rule: a cell whose train objective is first
NaN in epoch e stops training after epoch e + 2 (two equal epochs after the
NaN, :func:`matconvnet_port.search.runner._settled`), assuming the fused
models left cost the same per model (compute-bound sizes; an estimate until
a longer slice measures it).
"""

import argparse
import csv
from collections import defaultdict

import numpy as np

PAPER_SIZES = list(range(28, 65, 4))


def project(per_size: dict, masks: int, epochs: int, alive: dict | None = None) -> float:
    """Seconds for ``epochs`` epochs of the grid; ``alive`` (fraction of cell-epochs trained per N)
    scales each N's cost (default: all)."""
    sizes = sorted(per_size)
    mean = [float(np.mean(per_size[n])) for n in sizes]
    share = [1.0 if alive is None else alive[n] for n in sizes]
    return sum(float(np.interp(n, sizes, mean)) * float(np.interp(n, sizes, share))
               for n in PAPER_SIZES) * masks * epochs


def _diverged(value: str) -> bool:
    return value == "" or not np.isfinite(float(value))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--epoch", type=int, default=None, help="project from this epoch's rows (default: the last)")
    parser.add_argument("--diverged-stop", action="store_true",
                        help="estimate: cells first NaN in epoch e cost nothing after epoch e + 2 (see above)")
    args = parser.parse_args()
    by_epoch = defaultdict(lambda: defaultdict(list))
    first_nan = {}  # (N, mask, seed) -> the first epoch with a NaN train objective (None: none)
    with open(args.results, newline="") as f:
        for row in csv.DictReader(f):
            n, e = int(row["input_size"]), int(row["epoch"])
            by_epoch[e][n].append(float(row["seconds"]))
            key = (n, row["mask"], row.get("seed"))
            if _diverged(row["train_objective"]) and (first_nan.get(key) is None or e < first_nan[key]):
                first_nan[key] = e
            else:
                first_nan.setdefault(key, None)
    if not by_epoch:
        raise SystemExit(f"{args.results}: no rows")
    epoch = args.epoch or max(by_epoch)
    if epoch not in by_epoch:
        raise SystemExit(f"{args.results}: no rows of epoch {epoch} (has {sorted(by_epoch)})")
    per_size = by_epoch[epoch]
    print(f"measured seconds per cell-epoch (train + val, fused), epoch {epoch}:")
    for n in sorted(per_size):
        others = "".join(f", epoch {e}: {np.mean(by_epoch[e][n]):.3f} s" for e in sorted(by_epoch)
                         if e != epoch and n in by_epoch[e])
        print(f"  N={n}: {np.mean(per_size[n]):.3f} s  ({len(per_size[n])} cell-epochs{others})")
    grid = f"one seed of the paper grid ({args.masks} masks x N=28..64 x {args.epochs} epochs)"
    for e in sorted(by_epoch):
        one_seed = project(by_epoch[e], args.masks, args.epochs)
        print(f"  if every epoch took epoch {e}'s time: {grid} {one_seed / 60:.1f} min")
    measured = [e for e in sorted(by_epoch) if e < epoch]
    if measured == list(range(1, epoch)) and epoch <= args.epochs:  # epochs 1..K-1 once, then K's state
        one_seed = sum(project(by_epoch[e], args.masks, 1) for e in measured) + \
            project(per_size, args.masks, args.epochs - len(measured))
        how = f"{args.epochs - len(measured)} x epoch {epoch}"
        if measured:
            how = ("epoch 1 once + " if len(measured) == 1 else f"epochs 1-{measured[-1]} as measured + ") + how
    else:
        one_seed = project(per_size, args.masks, args.epochs)
        how = f"{args.epochs} x epoch {epoch}"
    print(f"projected ({how}): {grid} {one_seed / 60:.1f} min; {args.seeds} seeds {one_seed * args.seeds / 60:.1f} min")
    if args.diverged_stop:
        estimate = 0.0
        for e in range(1, args.epochs + 1):
            # the fraction of each N's cells still training in epoch e
            alive = {n: float(np.mean([f is None or e <= f + 2 for (m, _, _), f in first_nan.items() if m == n]))
                     for n in per_size}
            estimate += project(by_epoch[e] if e in measured else per_size, args.masks, 1, alive)
        stopped = defaultdict(lambda: defaultdict(int))
        for (n, _, _), f in first_nan.items():
            if f is not None:
                stopped[n][f] += 1
        text = ", ".join(f"N={n}: " + " + ".join(f"{c} after epoch {f + 2}" for f, c in sorted(stopped[n].items()))
                         for n in sorted(stopped))
        print(f"estimate with diverged models stopping ({text or 'none'}; the rest at the same cost per model): "
              f"{grid} {estimate / 60:.1f} min; {args.seeds} seeds {estimate * args.seeds / 60:.1f} min")


if __name__ == "__main__":
    main()
