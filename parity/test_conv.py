"""vl_nnconv against MatConvNet (reference_data/conv.mat): y, dzdx, dzdf, dzdb for every case;
the study's GEMM convolution (functional.conv_gemm, also with library_forward) on every case it covers."""

import numpy as np
import pytest
import torch

from matconvnet_port import functional as fn, vl_nnconv
from matconvnet_port.vl_nn import hwcn_to_nchw, nchw_to_hwcn
from refdata import DEVICES, cases, check, to_device

CASES = cases("conv.mat")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_vl_nnconv_matches_matconvnet(name, case, device):
    opts = dict(pad=case.pad, stride=case.stride, dilate=case.dilate)
    x, f, b = (to_device(a, device) for a in (case.x, case.f, case.b))
    check(name, "y", vl_nnconv(x, f, b, **opts), case.y)
    dzdx, dzdf, dzdb = vl_nnconv(x, f, b, to_device(case.dzdy, device), **opts)
    check(name, "dzdx", dzdx, case.dzdx)
    check(name, "dzdf", dzdf, case.dzdf)
    check(name, "dzdb", dzdb, case.dzdb)


# the fused study trainer's im2col + GEMM convolution (no padding, stride or dilation; groups allowed)
GEMM_CASES = [(n, c) for n, c in CASES
              if c.f.size and not np.any(c.pad) and np.all(np.ravel(c.stride) == 1) and np.all(np.ravel(c.dilate) == 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", GEMM_CASES, ids=[n for n, _ in GEMM_CASES])
@pytest.mark.parametrize("library_forward", [False, True], ids=["gemm", "gemm_wgrad"])
def test_conv_gemm_matches_matconvnet(name, case, device, library_forward):
    x = hwcn_to_nchw(torch.from_numpy(np.ascontiguousarray(case.x))).to(device).requires_grad_(True)
    f = torch.from_numpy(np.ascontiguousarray(case.f))
    f = f.reshape(f.shape + (1,) * (4 - f.dim())).permute(3, 2, 0, 1).contiguous().to(device).requires_grad_(True)
    b = torch.from_numpy(np.ascontiguousarray(case.b)).reshape(-1).to(device).requires_grad_(True)
    y = fn.conv_gemm(x, f, b if b.numel() else None, library_forward=library_forward)
    tag = "gemm_wgrad" if library_forward else "gemm"
    check(name, f"y ({tag})", nchw_to_hwcn(y), case.y)
    dzdy = hwcn_to_nchw(torch.from_numpy(np.ascontiguousarray(case.dzdy))).to(device)
    inputs = (x, f, b) if b.numel() else (x, f)
    grads = torch.autograd.grad(y, inputs, dzdy)
    check(name, f"dzdx ({tag})", nchw_to_hwcn(grads[0]), case.dzdx)
    check(name, f"dzdf ({tag})", grads[1].permute(2, 3, 1, 0), case.dzdf)
    if b.numel():
        check(name, f"dzdb ({tag})", grads[2].reshape(case.dzdb.shape), case.dzdb)
