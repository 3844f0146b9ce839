"""vl_nnpool against MatConvNet (reference_data/pool.mat): y and dzdx for every case.

Includes the cases that pin MatConvNet's quirks: padding never wins a max
(`allneg_padded_max`), average pooling divides by the in-image window
(`ones_padded_avg` is all ones), and tied maxima send the derivative to the
first one in column-major order (`ties_int_max`).
"""

import pytest

from matconvnet_port import vl_nnpool
from refdata import DEVICES, cases, check, text, to_device

CASES = cases("pool.mat")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_vl_nnpool_matches_matconvnet(name, case, device):
    opts = dict(pad=case.pad, stride=case.stride, method=text(case.method))
    x = to_device(case.x, device)
    check(name, "y", vl_nnpool(x, case.pool, **opts), case.y)
    check(name, "dzdx", vl_nnpool(x, case.pool, to_device(case.dzdy, device), **opts), case.dzdx)
