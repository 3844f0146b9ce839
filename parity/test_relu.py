"""vl_nnrelu against MatConvNet (reference_data/relu.mat), plain and leaky; x has exact zeros."""

import pytest

from matconvnet_port import vl_nnrelu
from refdata import DEVICES, check, load, to_device


@pytest.mark.parametrize("device", DEVICES)
def test_vl_nnrelu_matches_matconvnet(device):
    d = load("relu.mat")
    x, dzdy, leak = to_device(d["x"], device), to_device(d["dzdy"], device), float(d["leak"].item())
    check("relu", "y", vl_nnrelu(x), d["y_leak0"])
    check("relu", "dzdx", vl_nnrelu(x, dzdy), d["dzdx_leak0"])
    check("relu_leak", "y", vl_nnrelu(x, leak=leak), d["y_leak"])
    check("relu_leak", "dzdx", vl_nnrelu(x, dzdy, leak=leak), d["dzdx_leak"])
