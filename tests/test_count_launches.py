"""benchmarks/count_launches.py's counter: what it counts as a launch and as memory traffic."""

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "count_launches", Path(__file__).resolve().parents[1] / "benchmarks" / "count_launches.py")
count_launches = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(count_launches)


def _count(f):
    counter = count_launches.LaunchCounter()
    with counter:
        f()
    return counter


def test_an_elementwise_op_is_one_launch_reading_its_inputs_and_writing_its_result():
    a, b = torch.ones(4, 5), torch.ones(4, 5)
    counter = _count(lambda: a + b)
    assert dict(counter.counts) == {"add": 1}
    assert counter.traffic["add"] == 3 * 4 * 5 * 4
    assert counter.glue_bytes() == 3 * 4 * 5 * 4


def test_a_broadcast_operand_is_read_once():
    a, row = torch.ones(4, 5), torch.ones(1, 5)
    counter = _count(lambda: a * row.expand(4, 5))
    assert counter.traffic["mul"] == (20 + 5 + 20) * 4


def test_views_allocations_and_copies_onto_itself_are_not_launches():
    a = torch.ones(4, 5)

    def views():
        a.t().unsqueeze(0)
        a.reshape(20)  # of a contiguous tensor: a view (of a transposed one it would copy)
        torch.empty_like(a)
        a.copy_(a)

    counter = _count(views)
    assert sum(counter.counts.values()) == 0 and counter.glue_bytes() == 0


def test_matrix_products_are_compute_not_glue():
    a = torch.ones(8, 8)
    counter = _count(lambda: (a @ a).relu())
    assert set(counter.counts) == {"mm", "relu"}
    assert counter.glue_bytes() == counter.traffic["relu"] == 2 * 64 * 4
