"""vl_nnsoftmaxloss against MatConvNet (reference_data/softmaxloss.mat).

Pins: the loss is summed over spatial locations and divided by N; labels per
image, per location (0 = ignore) and with instance weights in channel 2.
"""

import pytest

from matconvnet_port import vl_nnsoftmaxloss
from refdata import DEVICES, cases, check, to_device

CASES = cases("softmaxloss.mat")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_vl_nnsoftmaxloss_matches_matconvnet(name, case, device):
    x, c = to_device(case.x, device), to_device(case.c, device)
    check(name, "y", vl_nnsoftmaxloss(x, c), case.y)
    check(name, "dzdx", vl_nnsoftmaxloss(x, c, case.dzdy), case.dzdx)
    check(name, "dzdx(dzdy2)", vl_nnsoftmaxloss(x, c, case.dzdy2), case.dzdx2)


def test_beta25_loss_is_not_divided_by_batch_size():
    name, case = CASES[0]
    n = case.x.shape[3]
    check(name, "y beta25", vl_nnsoftmaxloss(case.x, case.c, normalise=False), case.y * n)
