"""Several trainings side by side on one device ("lanes").

A small N leaves most of a GPU idle: at N = 28 a step of the 16 fused LeNets
is ~3 ms of kernels too small to fill an H100 (10 % of its fp32 peak, against
~40 % at N = 64). With ``--lanes K`` the search trains K (N, seed) groups at
once, each on its own CUDA stream, so that the kernels of one fill the gaps
left by the other's. Every group computes exactly what it computes alone (its
own model, data, stream; kernels do not depend on what else runs), so the
results are the same numbers; only the ``seconds`` column, now time on a
shared device, changes meaning.

Everything runs in one Python thread. A job is a generator (the runner's
:func:`~matconvnet_port.search.runner.train_cells_steps`, which yields from
:meth:`~matconvnet_port.fused.FusedTrainer.train_epoch_steps`) that queues a
batch of work on the current stream and yields a CUDA event to wait for
before it is resumed (:class:`~matconvnet_port.fused.Backlog`). The loop below
resumes whichever job's event has completed, inside that job's stream: each
job keeps a few batches queued and no job's host work (reading statistics
back) leaves the device idle while another has work; checkpoints are written on
a background thread (:class:`~matconvnet_port.search.runner.BackgroundWriter`).
Loading a group's N x N images at its start still holds the thread for a second
or two.

Pairing: lane 0 takes the costliest pending job, the other lanes the
cheapest, so large and small N run together (two large ones compete for the
same saturated units). Two jobs of the same group never run at once: they
share its checkpoint file.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch

__all__ = ["run_in_lanes"]

POLL_SECONDS = 50e-6  # host sleep when every job waits for the device


def _stream_context(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def run_in_lanes(jobs: Iterable, start: Callable, *, lanes: int, device: torch.device, cost: Callable,
                 group: Callable = id, upcoming: Callable | None = None) -> None:
    """Run ``start(job)`` (a step generator) for every job, ``lanes`` at a time, interleaved.

    ``cost(job)``: its relative cost (which lane takes it); ``group(job)``: a
    key; jobs with the same key never run at once. ``upcoming(running,
    pending)``, if given, hears after every start which jobs run and which
    wait (cheapest first), e.g. to prepare their data. On a CPU there are no
    streams: the jobs' steps interleave in this thread (the same results as
    one after the other, no faster). Exceptions (KeyboardInterrupt too) stop
    every job where it is; what each finished before stays finished.
    """
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    cuda = device.type == "cuda"
    streams = [torch.cuda.Stream(device) if cuda else None for _ in range(lanes)]
    # cheapest first (ties keep the given order); one lane runs the jobs in the given order
    pending = sorted(jobs, key=cost) if lanes > 1 else list(jobs)
    running: list = [None] * lanes    # per lane: [generator, event to wait for, group key, job]
    try:
        while pending or any(running):
            resumed = False
            for lane in range(lanes):
                if running[lane] is None and pending:
                    busy = {r[2] for r in running if r is not None}
                    free = [i for i, job in enumerate(pending) if group(job) not in busy]
                    if free:
                        job = pending.pop(free[-1] if lane == 0 and lanes > 1 else free[0])
                        if cuda:  # after whatever the caller queued before (autotuning, say)
                            streams[lane].wait_stream(torch.cuda.current_stream(device))
                        running[lane] = [start(job), None, group(job), job]
                        if upcoming is not None:
                            upcoming([r[3] for r in running if r is not None], list(pending))
                state = running[lane]
                if state is None or (state[1] is not None and not state[1].query()):
                    continue
                with _stream_context(streams[lane]):
                    try:
                        state[1] = next(state[0])
                    except StopIteration:
                        running[lane] = None
                resumed = True
            if not resumed:
                time.sleep(POLL_SECONDS)
    finally:
        for state in running:
            if state is not None:
                state[0].close()
        if cuda:
            for stream in streams:
                torch.cuda.current_stream(device).wait_stream(stream)
