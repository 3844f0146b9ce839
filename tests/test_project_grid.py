"""benchmarks/project_grid.py: the grid projection from a slice, and its diverged-stop estimate."""

import csv
import os
import re
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "project_grid.py")


def _slice(path, diverged_at_64):
    """2 epochs of 16 cells at N = 28 (1 s a cell-epoch) and N = 64 (2 s), some NaN at 64."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mask", "input_size", "epoch", "train_objective", "seconds"])
        w.writeheader()
        for epoch in (1, 2):
            for m in range(16):
                late = m == 0 and epoch == 2  # one cell at N = 28 goes NaN in epoch 2: stops after epoch 4
                w.writerow({"mask": m, "input_size": 28, "epoch": epoch, "train_objective": "nan" if late else 0.1,
                            "seconds": 1.0})
                w.writerow({"mask": m, "input_size": 64, "epoch": epoch, "seconds": 2.0,
                            "train_objective": "" if m < diverged_at_64 else 0.1})


def test_projection_and_diverged_stop_estimate(tmp_path):
    _slice(tmp_path / "results.csv", diverged_at_64=8)
    out = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "results.csv"), "--seeds", "1",
                          "--diverged-stop"], capture_output=True, text=True, check=True).stdout
    sizes = np.arange(28, 65, 4)
    t = 1 + (sizes - 28) / 36            # seconds per cell-epoch, interpolated between the two sizes
    full = (t * 16 * 20).sum() / 60
    estimate = 0.0
    for e in range(1, 21):  # half the cells at N = 64 NaN from epoch 1 stop after epoch 3
        alive = np.interp(sizes, [28, 64], [1 if e <= 4 else 15 / 16, 1 if e <= 3 else 0.5])
        estimate += (t * alive * 16).sum() / 60
    projected = float(re.search(r"projected \(.*?\): .*? ([\d.]+) min;", out).group(1))
    stopped = float(re.search(r"estimate with diverged models stopping .*? ([\d.]+) min;", out).group(1))
    assert projected == round(full, 1) and stopped == round(estimate, 1), out
    assert "N=28: 1 after epoch 4" in out and "N=64: 8 after epoch 3" in out and stopped < projected
