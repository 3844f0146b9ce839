"""vl_nnconv against MatConvNet (reference_data/conv.mat): y, dzdx, dzdf, dzdb for every case."""

import pytest

from matconvnet_port import vl_nnconv
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
