"""``search.lanes``: several step generators side by side (the scheduler, and trainers on CUDA streams)."""

import numpy as np
import pytest
import torch

from matconvnet_port import fused
from matconvnet_port.fused import FusedLeNet, FusedTrainer, build, run_to_end
from matconvnet_port.models import ALL_MASKS
from matconvnet_port.search.lanes import run_in_lanes
from matconvnet_port.search.runner import initial_weights

CPU = torch.device("cpu")


class Jobs:
    """Fake jobs: each yields ``steps`` times; the log records starts, steps and ends in order."""

    def __init__(self):
        self.log = []

    def start(self, job):
        name, _, steps, _ = job
        self.log.append(("start", name))
        for i in range(steps):
            self.log.append(("step", name))
            yield None
        self.log.append(("end", name))


def job(name, cost, steps=3, group=None):
    return (name, cost, steps, group or name)


def test_one_lane_runs_the_jobs_in_the_given_order():
    jobs = Jobs()
    run_in_lanes([job("b", 5), job("a", 1), job("c", 9)], jobs.start, lanes=1, device=CPU, cost=lambda j: j[1])
    assert [name for event, name in jobs.log if event == "start"] == ["b", "a", "c"]
    assert [name for _, name in jobs.log] == [n for n in "bac" for _ in range(5)]  # one after the other


def test_two_lanes_pair_the_costliest_with_the_cheapest_and_interleave():
    jobs, heard = Jobs(), []
    run_in_lanes([job(n, c) for n, c in (("28", 1), ("36", 3), ("64", 15), ("48", 6))], jobs.start, lanes=2,
                 device=CPU, cost=lambda j: j[1],
                 upcoming=lambda running, pending: heard.append(([j[0] for j in running], [j[0] for j in pending])))
    assert heard[:2] == [(["64"], ["28", "36", "48"]), (["64", "28"], ["36", "48"])]  # after each start
    assert len(heard) == 4
    starts = [name for event, name in jobs.log if event == "start"]
    assert starts[:2] == ["64", "28"]  # lane 0 the costliest, lane 1 the cheapest
    assert sorted(starts) == ["28", "36", "48", "64"]
    assert [name for event, name in jobs.log if event == "end"].count("64") == 1
    first_steps = [name for event, name in jobs.log if event == "step"][:4]
    assert first_steps == ["64", "28", "64", "28"]  # steps alternate between the lanes


def test_jobs_of_one_group_never_overlap():
    jobs = Jobs()
    run_in_lanes([job("a1", 5, group="a"), job("a2", 4, group="a"), job("b", 1)], jobs.start, lanes=3,
                 device=CPU, cost=lambda j: j[1], group=lambda j: j[3])
    running, seen = set(), []
    for event, name in jobs.log:
        if event == "start":
            assert not (name.startswith("a") and any(r.startswith("a") for r in running)), jobs.log
            running.add(name)
            seen.append(name)
        elif event == "end":
            running.discard(name)
    assert sorted(seen) == ["a1", "a2", "b"]


def test_an_error_in_one_job_closes_the_others():
    closed = []

    def start(name):
        try:
            for i in range(5):
                if name == "bad" and i == 2:
                    raise KeyboardInterrupt
                yield None
        finally:
            closed.append(name)

    with pytest.raises(KeyboardInterrupt):
        run_in_lanes(["good", "bad"], start, lanes=2, device=CPU, cost=len)
    assert sorted(closed) == ["bad", "good"]
    with pytest.raises(ValueError, match="lanes"):
        run_in_lanes([], start, lanes=0, device=CPU, cost=len)


def _trainers(device, sizes=(28, 32), masks=ALL_MASKS[:4]):
    """One fused trainer per N on random digits (same seed: the same data every call)."""
    g = torch.Generator().manual_seed(0)
    weights = list(initial_weights(1))
    out = []
    for n in sizes:
        images = (torch.rand(300, 1, n, n, generator=g) * 255 - 33).to(device)
        labels = torch.randint(1, 11, (300,), generator=g).to(device)
        model = FusedLeNet(masks, weights).to(device)
        out.append(FusedTrainer(model, images, labels, seed=3))
    return out


def _epochs(trainer, train=200, val=100):
    """Two epochs and an evaluation as one step generator; returns their statistics. The trainer
    then releases its CUDA graphs, as the search does when a job ends."""
    stats = []
    for epoch in (1, 2):
        stats.append((yield from trainer.train_epoch_steps(epoch, np.arange(1, train + 1))))
    stats.append((yield from trainer.evaluate_steps(np.arange(train + 1, train + val + 1))))
    trainer.release_graphs()
    return stats


def _numbers(stats):
    return np.concatenate([np.concatenate([s.objective, s.top1err, s.top5err]) for s in stats])


def test_trainers_side_by_side_compute_what_they_compute_alone():
    alone = [_numbers(run_to_end(_epochs(t))) for t in _trainers(CPU)]
    results = {}

    def start(item):
        i, trainer = item
        results[i] = _numbers((yield from _epochs(trainer)))

    run_in_lanes(list(enumerate(_trainers(CPU))), start, lanes=2, device=CPU, cost=lambda item: item[0])
    for i in range(2):
        np.testing.assert_array_equal(results[i], alone[i])


# The plans the search picks on an H100 (channels-last, im2col + cuBLAS products, per-model cuDNN on
# side streams, the composed tail): the cuBLAS products are what a shared capture stream broke.
CUDA_PLANS = {28: {"memory_format": "nhwc", "conv": ("gemm", "gemm_wgrad", "gemm", "gemm"), "chunk_size": 16},
              32: {"memory_format": "nhwc", "conv": ("gemm", "grouped", "gemm", "gemm"), "chunk_size": 16,
                   "compose": True},
              40: {"memory_format": "nhwc", "conv": ("gemm", "streams", "gemm", "gemm"), "chunk_size": 16,
                   "compose": True}}


def _cuda_trainers(device):
    """A trainer of the 16 masks per N of CUDA_PLANS, on random digits (the same every call)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, plan in CUDA_PLANS.items():
        images = (torch.rand(700, 1, n, n, generator=g) * 255 - 33).to(device)
        labels = torch.randint(1, 11, (700,), generator=g).to(device)
        out.append(FusedTrainer(build(plan, ALL_MASKS, list(initial_weights(1)), device), images, labels, seed=3))
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainers_on_cuda_streams_compute_what_they_compute_alone():
    device = torch.device("cuda")
    alone = [_numbers(run_to_end(_epochs(t, train=600))) for t in _cuda_trainers(device)]
    results, waited = {}, []

    def start(item):
        i, trainer = item
        steps = _epochs(trainer, train=600)
        try:
            event = next(steps)
            while True:
                waited.append(event is not None)
                event = steps.send((yield event))
        except StopIteration as stop:
            results[i] = _numbers(stop.value)

    # three jobs in two lanes: the third starts in a lane whose first job has just released its graphs
    run_in_lanes(list(enumerate(_cuda_trainers(device))), start, lanes=2, device=device, cost=lambda item: item[0])
    assert any(waited)  # the trainers hand the scheduler events to wait for
    for i in range(len(CUDA_PLANS)):  # cuDNN may pick other algorithms on a busy device: float32 rounding apart
        assert np.isfinite(results[i]).all(), f"N={list(CUDA_PLANS)[i]}: non-finite statistics side by side"
        np.testing.assert_allclose(results[i], alone[i], rtol=1e-5, atol=1e-6,
                                   err_msg=f"N={list(CUDA_PLANS)[i]} side by side vs alone")


class _FakeStream:
    def __init__(self, name):
        self.name, self.device = name, "cuda:0"

    def __eq__(self, other):
        return self.name == other.name

    __hash__ = None


def test_a_lane_captures_its_graphs_on_its_own_stream(monkeypatch):
    """Graphs captured on PyTorch's one shared capture stream share cuBLAS's workspace: lanes must
    capture on their own streams, and the default stream (which cannot capture) leaves the choice
    to PyTorch."""
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _FakeStream("default"))
    lane = _FakeStream("lane 1")
    assert fused._capture_stream(lane) is lane
    assert fused._capture_stream(_FakeStream("default")) is None
    monkeypatch.setattr(fused, "CAPTURE_ON_LANE_STREAM", False)
    assert fused._capture_stream(lane) is None
