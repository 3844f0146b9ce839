"""Project the full paper grid's time from a measured slice (a search results.csv).

    python benchmarks/project_grid.py runs/<dir>/results.csv [--epochs 20 --seeds 3 --masks 16]

``seconds`` in results.csv is a cell-epoch's share of its fused group's epoch
(training and validation). The projection sums, over the paper's sizes
N = 28..64, the measured mean seconds per cell-epoch at that N times masks x
epochs x seeds; sizes not measured are interpolated linearly in N.
"""

import argparse
import csv
from collections import defaultdict

import numpy as np

PAPER_SIZES = list(range(28, 65, 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--masks", type=int, default=16)
    args = parser.parse_args()
    per_size = defaultdict(list)
    with open(args.results, newline="") as f:
        for row in csv.DictReader(f):
            per_size[int(row["input_size"])].append(float(row["seconds"]))
    sizes = sorted(per_size)
    mean = {n: float(np.mean(per_size[n])) for n in sizes}
    print("measured seconds per cell-epoch (train + val, fused):")
    for n in sizes:
        print(f"  N={n}: {mean[n]:.3f} s  ({len(per_size[n])} cell-epochs)")
    seconds = sum(float(np.interp(n, sizes, [mean[s] for s in sizes])) for n in PAPER_SIZES)
    one_seed = seconds * args.masks * args.epochs
    print(f"projected: one seed of the paper grid ({args.masks} masks x N=28..64 x {args.epochs} epochs) "
          f"{one_seed / 60:.1f} min; {args.seeds} seeds {one_seed * args.seeds / 60:.1f} min")


if __name__ == "__main__":
    main()
