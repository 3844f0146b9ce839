"""vl_nnsoftmax against MatConvNet (reference_data/softmax.mat): softmax over channels at every location."""

import pytest

from matconvnet_port import vl_nnsoftmax
from refdata import DEVICES, check, load, to_device


@pytest.mark.parametrize("device", DEVICES)
def test_vl_nnsoftmax_matches_matconvnet(device):
    d = load("softmax.mat")
    x = to_device(d["x"], device)
    check("softmax", "y", vl_nnsoftmax(x), d["y"])
    check("softmax", "dzdx", vl_nnsoftmax(x, to_device(d["dzdy"], device)), d["dzdx"])
