"""DagNN against MatConvNet (reference_data/dagnn_lenet.mat).

The file holds ``saveobj`` of ``dagnn.DagNN.fromSimpleNN(net, 'canonicalNames',
true)`` of the LeNet of ``train/net-epoch-2.mat`` and one evaluation
``dag.eval({'input', x, 'label', c}, {'objective', 1})``. Pins: loading the
saveobj struct, MatConvNet's evaluation order, the objective, the scores,
the input derivative, and the same input through the SimpleNN.
"""

import os

import pytest

from matconvnet_port.dagnn import DagNN
from matconvnet_port.netio import load_net
from matconvnet_port.simplenn import vl_simplenn
from refdata import DEVICES, REFERENCE_DIR, check, load, text, to_device

REF = load("dagnn_lenet.mat")
EVAL = REF["eval"][0, 0]


@pytest.fixture(scope="module")
def dag():
    net = load_net(os.path.join(REFERENCE_DIR, "dagnn_lenet.mat"))
    assert isinstance(net, DagNN)
    return net


def test_dagnn_variables_are_matconvnets(dag):
    assert list(dag.vars) == [text(v) for v in EVAL.var_names[0]]


@pytest.mark.parametrize("device", DEVICES)
def test_dagnn_eval_matches_matconvnet(dag, device):
    dag.eval({"input": to_device(EVAL.input, device), "label": EVAL.label}, {"objective": 1})
    case = f"dagnn_lenet {device}"
    check(case, "objective", dag.vars["objective"].value, EVAL.objective)
    check(case, "prediction", dag.vars["prediction"].value, EVAL.prediction)
    check(case, "dzdinput", dag.vars["input"].der, EVAL.dzdinput)


def test_simplenn_of_the_same_checkpoint_matches_matconvnet():
    net = load_net(os.path.join(REFERENCE_DIR, text(REF["source_file"])))
    net.layers[-1]["class"] = EVAL.label
    res = vl_simplenn(net, EVAL.input)
    check("dagnn_lenet", "simplenn_objective", res[-1].x, EVAL.simplenn_objective)


def test_from_simplenn_evaluates_like_the_saved_dagnn(dag):
    net = load_net(os.path.join(REFERENCE_DIR, text(REF["source_file"])))
    ours = DagNN.from_simplenn(net)
    ours.eval({"input": EVAL.input, "label": EVAL.label}, {"objective": 1})
    check("fromSimpleNN", "objective", ours.vars["objective"].value, EVAL.objective)
    check("fromSimpleNN", "dzdinput", ours.vars["input"].der, EVAL.dzdinput)
    check("fromSimpleNN", "prediction", ours.vars["prediction"].value, EVAL.prediction)
