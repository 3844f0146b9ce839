"""vl_nnbnorm against MatConvNet (reference_data/bnorm.mat): training and test mode, forward and backward.

Pins: moments are [mean, sqrt(var + eps)] with the biased variance; test mode
uses the given moments as they are; test-mode backward is MatConvNet's
(training formulas with the given moments substituted).
"""

import pytest

from matconvnet_port import vl_nnbnorm
from refdata import DEVICES, cases, check, to_device

CASES = [(f"bnorm{k + 1}_{'x'.join(map(str, case.x.shape))}", case) for k, (_, case) in enumerate(cases("bnorm.mat"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_vl_nnbnorm_training_mode(name, case, device):
    eps = float(case.epsilon.item())
    x, g, b, dzdy = (to_device(a, device) for a in (case.x, case.g, case.b, case.dzdy))
    kw = dict(epsilon=eps) if case.epsilon_given.item() else {}
    y, moments = vl_nnbnorm(x, g, b, **kw)
    check(name, "y", y, case.y_train)
    check(name, "moments", moments, case.moments_train)
    dzdx, dzdg, dzdb, moments = vl_nnbnorm(x, g, b, dzdy, **kw)
    check(name, "dzdx", dzdx, case.dzdx_train)
    check(name, "dzdg", dzdg, case.dzdg_train)
    check(name, "dzdb", dzdb, case.dzdb_train)
    check(name, "moments bwd", moments, case.moments_train_bwd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_vl_nnbnorm_test_mode_with_given_moments(name, case, device):
    eps = float(case.epsilon.item())
    x, g, b, dzdy, m = (to_device(a, device) for a in (case.x, case.g, case.b, case.dzdy, case.moments_given))
    y, _ = vl_nnbnorm(x, g, b, moments=m, epsilon=eps)
    check(name, "y test", y, case.y_test)
    dzdx, dzdg, dzdb, _ = vl_nnbnorm(x, g, b, dzdy, moments=m, epsilon=eps)
    check(name, "dzdx test", dzdx, case.dzdx_test)
    check(name, "dzdg test", dzdg, case.dzdg_test)
    check(name, "dzdb test", dzdb, case.dzdb_test)
