"""vl_nndropout against MatConvNet (reference_data/dropout.mat): MatConvNet's mask replayed.

The mask is random in MatConvNet, so the data store it: given that mask our
forward and backward must match; a fresh mask must have MatConvNet's values
(0 or 1/(1-rate)) and keep-rate.
"""

import numpy as np
import pytest

from matconvnet_port import vl_nndropout
from matconvnet_port.simplenn import SimpleNN, vl_simplenn
from refdata import DEVICES, check, load, to_device


@pytest.mark.parametrize("device", DEVICES)
def test_vl_nndropout_with_matconvnet_mask(device):
    d = load("dropout.mat")
    x, mask = to_device(d["x"], device), to_device(d["mask"], device)
    y, _ = vl_nndropout(x, mask=mask)
    check("dropout", "y train", y, d["y_train"])
    check("dropout", "dzdx train", vl_nndropout(x, to_device(d["dzdy"], device), mask=mask), d["dzdx_train"])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_layer_in_test_mode_is_the_identity_as_vl_simplenn(device):
    """res = vl_simplenn(net, x, dzdy, [], 'mode', 'test') on a one-layer dropout net."""
    d = load("dropout.mat")
    net = SimpleNN([{"type": "dropout", "rate": float(d["rate"].item())}])
    res = vl_simplenn(net, to_device(d["x"], device), to_device(d["dzdy"], device), mode="test")
    check("dropout", "y test", res[1].x, d["y_test"])
    check("dropout", "dzdx test", res[0].dzdx, d["dzdx_test"])


def test_vl_nndropout_fresh_mask_has_matconvnet_values():
    d = load("dropout.mat")
    rate = float(d["rate"].item())
    x = np.ones((50, 40, 3, 2), np.float32)
    y, mask = vl_nndropout(x, rate=rate)
    values = np.unique(mask)
    np.testing.assert_allclose(values, [0, 1 / (1 - rate)], rtol=1e-6)
    assert abs((mask > 0).mean() - (1 - rate)) < 0.03
    np.testing.assert_array_equal(y, x * mask)
