"""Parity suite: every case of every MatConvNet reference file, forward and backward.

Each comparison is recorded (case, quantity, max abs error, error relative to
max |reference|) and the table is printed at the end of the run, with the
number of comparisons and the worst relative error.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from refdata import REPORT  # noqa: E402


@pytest.fixture(autouse=True)
def _ieee_fp32_on_cuda():
    # parity is defined against IEEE float32; keep cuDNN/cuBLAS off TF32
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    tr = terminalreporter
    tr.section("parity against MatConvNet references")
    width = max(len(r[0]) for r in REPORT)
    tr.write_line(f"{'case':<{width}}  {'quantity':<12} {'max abs err':>12} {'rel err':>10} {'tol':>8}")
    for case, what, abs_err, rel_err, tol, _ in REPORT:
        tr.write_line(f"{case:<{width}}  {what:<12} {abs_err:12.3e} {rel_err:10.2e} {tol:8.0e}")
    cases = len({r[0] for r in REPORT})
    tr.write_line(f"{len(REPORT)} comparisons over {cases} cases")
    tr.write_line("per test module (comparisons, worst relative error, tolerance):")
    for module in sorted({r[5] for r in REPORT}):
        rows = [r for r in REPORT if r[5] == module]
        worst = max(rows, key=lambda r: r[3] / r[4])
        tr.write_line(f"  {module:<22} {len(rows):4d}  {worst[3]:9.2e}  {worst[4]:.0e}  ({worst[0]} {worst[1]})")
    for tol in sorted({r[4] for r in REPORT}):
        rows = [r for r in REPORT if r[4] == tol]
        worst = max(rows, key=lambda r: r[3])
        tr.write_line(f"  tolerance {tol:.0e}: {len(rows)} comparisons, worst relative error "
                      f"{worst[3]:.2e} ({worst[0]} {worst[1]})")
