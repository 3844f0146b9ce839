"""Reading the MatConvNet reference files in ``reference_data/`` and comparing with them."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest
import scipy.io as sio
import torch

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_data")

# fp32 parity bar of the project: max |ours - MatConvNet| <= 1e-5 * max |MatConvNet|
FP32_TOL = 1e-5

# (case, quantity, max abs error, relative error, tolerance, test module), printed by conftest
REPORT: list[tuple[str, str, float, float, float, str]] = []

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    """A reference .mat file as scipy gives it (MATLAB index order, structs as mat_struct)."""
    return sio.loadmat(os.path.join(REFERENCE_DIR, name), squeeze_me=False, struct_as_record=False)


def cases(name: str) -> list:
    """The ``cases`` cell of a reference file as a list of (case name, struct)."""
    data = load(name)
    out = []
    for k in range(data["cases"].shape[1]):
        case = data["cases"][0, k][0, 0]
        label = str(case.name[0]) if hasattr(case, "name") else f"case{k + 1}"
        out.append((label, case))
    return out


def text(value) -> str:
    return str(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else ""


def to_device(a, device: str):
    """A numpy argument for a vl_nn* call, as a tensor on ``device`` for CUDA runs."""
    if device == "cpu" or a is None or not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub":
        return a
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def check(case: str, what: str, ours, ref, tol: float = FP32_TOL) -> None:
    """Assert max|ours - ref| <= tol * max|ref| (shapes equal up to MATLAB's dropped trailing 1s)."""
    if isinstance(ours, torch.Tensor):
        ours = ours.detach().cpu().numpy()
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    squeeze = lambda s: tuple(s[:max([i + 1 for i, d in enumerate(s) if d != 1] + [0])])
    assert squeeze(ours.shape) == squeeze(ref.shape), f"{case} {what}: shape {ours.shape} vs reference {ref.shape}"
    assert np.all(np.isfinite(ours)), f"{case} {what}: non-finite values"
    module = sys._getframe(1).f_globals.get("__name__", "?").rsplit(".", 1)[-1]
    if ref.size == 0:
        REPORT.append((case, what, 0.0, 0.0, tol, module))
        return
    abs_err = float(np.max(np.abs(ours.reshape(ref.shape) - ref)))
    scale = float(np.max(np.abs(ref)))
    rel_err = abs_err / scale if scale > 0 else abs_err
    REPORT.append((case, what, abs_err, rel_err, tol, module))
    assert rel_err <= tol, f"{case} {what}: relative error {rel_err:.3e} > {tol:.0e} (max abs {abs_err:.3e})"
