"""vl_nnloss against MatConvNet (reference_data/loss.mat): every loss type, value and derivative."""

import numpy as np
import pytest

from matconvnet_port import vl_nnloss
from refdata import DEVICES, cases, check, text, to_device

CASES = cases("loss.mat")

# MatConvNet option names -> ours (snake_case)
OPTION_NAMES = {"loss": "loss", "instanceWeights": "instance_weights", "classWeights": "class_weights",
                "topK": "top_k", "normalise": "normalise", "threshold": "threshold"}


def options(case, device):
    cell = case.opts
    opts = {}
    for i in range(0, cell.shape[1], 2):
        key, value = OPTION_NAMES[text(cell[0, i])], cell[0, i + 1]
        if key == "loss":
            value = text(value)
        elif key == "top_k":
            value = int(value.item())
        elif key == "normalise":
            value = bool(value.item())
        else:
            value = to_device(np.asarray(value), device)
        opts[key] = value
    return opts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_vl_nnloss_matches_matconvnet(name, case, device):
    opts = options(case, device)
    x, c = to_device(case.x, device), to_device(case.c, device)
    check(name, "y", vl_nnloss(x, c, **opts), case.y)
    check(name, "dzdx", vl_nnloss(x, c, case.dzdy, **opts), case.dzdx)
