"""Training the grid, one group (N, seed) at a time or ``--lanes`` at a time side by side, resumably.

For each group: load the N x N data once (:func:`load_images`, shared by the
seeds of that N), build one :class:`~matconvnet_port.fused.FusedLeNet` with
all pending masks from ``cnn_mnist_init(seed=seed)``'s weights, and for each
epoch train (:meth:`FusedTrainer.train_epoch`, data order
``default_order(epoch, train, seed)``) and evaluate. After every epoch the
group's checkpoint ``groups/N<N>-seed<s>.pt`` (trainer state of each
unfinished cell + every row of the group) is replaced atomically, then
``results.csv`` is regenerated from the rows of all groups -- both on a
background thread (:class:`BackgroundWriter`, in order), while the device
trains on; an interrupted run waits for them, so it keeps every finished epoch.

Each cell's result depends only on (mask, N, seed) and the settings: its
initial weights and data order come from its own seed, and the fused models
never interact (see :mod:`matconvnet_port.fused`). Masks added to a finished
group later are trained as a new fused model from the same start. That is the
function; the float32 rounding depends on the grouping (a fused network sums
in another order than a smaller one: ~1e-9 apart after a few steps, and SGD
can amplify that at a near-tie), so a cell regrouped by a resume, an added
mask or the diverged-model stop can differ from an ungrouped run by rounding,
as any two float32 implementations do.
Resuming: a cell whose checkpoint says ``epochs_done = e`` restarts at epoch
e + 1 from the stored weights and momenta (cells at different epochs are
trained as separate fused models, since a fused model steps all its models
on the same batch). With lanes (:mod:`~matconvnet_port.search.lanes`) every
plan is chosen first, alone on the device, and two runs of one group never
overlap (they share its checkpoint).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..fused import (FusedLeNet, FusedTrainer, autotune_plan, build, candidate_plans, compose_method, default_plan,
                     parse_conv, plan_label, run_to_end)
from ..mnist import get_mnist_imdb
from ..models import CONV_SHAPES, cnn_mnist_init, mask_bits, mask_name
from .grid import Group, Settings, cost_per_image, fused_order
from .lanes import run_in_lanes
from .results import atomic_torch_save, atomic_write_text, write_results

__all__ = ["RunContext", "GridProgress", "load_images", "initial_weights", "pending_work", "work_images",
           "estimate_seconds", "scale_step_time", "train_cells", "train_cells_steps", "run_groups", "BackgroundWriter", "ImagePrefetcher", "read_all_rows", "regenerate_results", "checkpoint_path"]

CPU_EVAL_COST = 0.5  # an evaluated image costs about half a trained one (measured on CPU)


@dataclass
class RunContext:
    """Everything a group needs besides its (N, seed, masks)."""

    out_dir: Path
    settings: Settings
    device: torch.device
    conv: str = "auto"            # 'auto', or a layer implementation / four of them (fused.parse_conv)
    memory_format: str = "auto"   # 'auto', 'nchw' or 'nhwc'
    data_dir: str | None = None
    save_nets: bool = False
    lanes: int = 1                # groups trained side by side (search.lanes)
    finish_diverged: bool = True  # stop training models whose conv4 is all NaN (runner._settled)
    log: Callable[[str], None] = print
    rows_by_group: dict = field(default_factory=dict)  # group key -> rows (mirror of the checkpoints)
    plan_by_size: dict = field(default_factory=dict)
    writer: "BackgroundWriter | None" = None  # where epoch results are written (None: right away)
    loader: "ImagePrefetcher | None" = None   # where N x N images come from (None: loaded on demand)

    @property
    def device_label(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return "cpu"


# -- data and initial weights ---------------------------------------------------------

@functools.lru_cache(maxsize=2)  # the N of two lanes at a time: full MNIST at N = 64 is 1.1 GB
def load_images(input_size: int, resize: str, dataset: str, data_dir: str | None, train_subset: int,
                val_subset: int) -> tuple[np.ndarray, np.ndarray]:
    """(images n x 1 x N x N float32, labels n, 1-based): the training subset then the validation subset."""
    imdb = get_mnist_imdb(input_size=input_size, resize=resize, data_dir=data_dir, dataset=dataset,
                          train_subset=train_subset, val_subset=val_subset)
    images = imdb["images"]["data"].transpose(3, 2, 0, 1)  # a C-contiguous view, no copy
    labels = imdb["images"]["labels"].reshape(-1)
    return images, labels


@functools.lru_cache(maxsize=None)
def initial_weights(seed: int) -> tuple:
    """``cnn_mnist_init(seed=seed)``'s four [filters, biases]: the start of every mask and N of this seed."""
    net = cnn_mnist_init(seed=seed)
    return tuple((layer["weights"][0], layer["weights"][1]) for layer in net.layers if layer["type"] == "conv")


# -- group checkpoints ----------------------------------------------------------------

def checkpoint_path(out_dir, group: Group) -> Path:
    return Path(out_dir) / "groups" / f"{group.key}.pt"


def load_checkpoint(path: Path, group: Group) -> dict:
    """``{'input_size', 'seed', 'cells': {bits: {'epochs_done', 'state'}}, 'rows': [...]}``."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    return {"input_size": group.input_size, "seed": group.seed, "cells": {}, "rows": []}


def read_all_rows(out_dir) -> dict:
    """group key -> rows, from every checkpoint in ``out_dir/groups``."""
    rows = {}
    for path in sorted((Path(out_dir) / "groups").glob("N*-seed*.pt")):
        rows[path.stem] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["rows"]
    return rows


def regenerate_results(out_dir, rows_by_group: dict | None = None) -> list[dict]:
    """Rewrite ``results.csv`` from the group checkpoints (or their in-memory mirror)."""
    if rows_by_group is None:
        rows_by_group = read_all_rows(out_dir)
    rows = [row for group_rows in rows_by_group.values() for row in group_rows]
    write_results(Path(out_dir) / "results.csv", rows)
    return rows


def _slice_state(state: dict, m: int) -> dict:
    """Model m's share of a fused trainer state (cloned: a saved view would save the whole tensor)."""
    out = {}
    for key in ("params", "momenta"):
        tensors = []
        for j, t in enumerate(state[key]):
            k = CONV_SHAPES[j // 2][3]
            tensors.append(t[m * k:(m + 1) * k].clone())
        out[key] = tensors
    return out


def _stack_states(states: list[dict]) -> dict:
    return {key: [torch.cat([s[key][j] for s in states]) for j in range(8)] for key in ("params", "momenta")}


def pending_work(ctx: RunContext, groups: list[Group]) -> list[tuple[Group, int, list]]:
    """(group, epochs done, masks) for every set of cells still to train, in grid order."""
    work = []
    for group in groups:
        path = checkpoint_path(ctx.out_dir, group)
        cells = load_checkpoint(path, group)["cells"] if path.is_file() else {}
        by_epoch: dict[int, list] = {}
        for mask in group.masks:
            done = int(cells.get(mask_bits(mask), {}).get("epochs_done", 0))
            if done < ctx.settings.epochs:
                by_epoch.setdefault(done, []).append(mask)
        work += [(group, done, fused_order(masks)) for done, masks in sorted(by_epoch.items(), reverse=True)]
    return work


def work_images(ctx: RunContext, work) -> int:
    """Image passes (training + validation, x models) of the pending work: the progress bar's total."""
    s = ctx.settings
    return sum((s.epochs - done) * (s.train_subset + s.val_subset) * len(masks) for _, done, masks in work)


class GridProgress:
    """The progress bar over the whole grid, counting image passes x models.

    tqdm's own ETA assumes every image costs the same, but an image at N = 64
    costs ~15 times one at N = 28 and the grid runs N in increasing order; so
    the bar also shows an ETA from the work weighted by :func:`cost_per_image`.
    """

    def __init__(self, bar, ctx: RunContext, work):
        self.bar = bar
        s = ctx.settings
        self.cost_left = sum((s.epochs - done) * (s.train_subset + s.val_subset) * len(masks)
                             * cost_per_image(group.input_size) for group, done, masks in work)
        self.cost_done = 0.0
        self.start = time.perf_counter()

    def skip(self, image_passes: int, input_size: int) -> None:
        """Work that will not be done (diverged models that finished early): off the bar's total,
        not counted as done, so that neither ETA takes it for speed."""
        self.bar.total = max(self.bar.n, self.bar.total - image_passes)
        self.bar.refresh()
        self.cost_left -= image_passes * cost_per_image(input_size)

    def advance(self, image_passes: int, input_size: int) -> None:
        self.bar.update(image_passes)
        cost = image_passes * cost_per_image(input_size)
        self.cost_done += cost
        self.cost_left -= cost
        elapsed = time.perf_counter() - self.start
        if self.cost_done > 0:
            self.bar.set_postfix_str(f"cost-weighted ETA {_clock(elapsed * self.cost_left / self.cost_done)}",
                                     refresh=False)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- choosing the conv implementation and estimating the time --------------------------

def choose_plan(ctx: RunContext, input_size: int, masks, x: torch.Tensor, y: torch.Tensor) -> dict:
    """How the fused models of this N run (memory format, conv per layer, models per pass).

    With ``--conv``/``--memory-format`` left on auto: on CUDA measured once per
    N by :func:`~matconvnet_port.fused.autotune_plan`; on a CPU the measured
    default :func:`~matconvnet_port.fused.default_plan` (autotuning there costs
    more than it saves -- a few steps of each candidate at N = 64 take a
    minute -- and its timings are at the mercy of other processes). A user's
    choice replaces the corresponding part of the default.
    """
    key = (input_size, len(masks))
    if key not in ctx.plan_by_size:
        if ctx.device.type == "cuda" and ctx.conv == "auto" and ctx.memory_format == "auto":
            measured = _autotune_key(ctx, input_size, masks)
            plan = _remembered_plan(ctx.out_dir, measured)
            if plan is not None:
                ctx.log(f"autotune N={input_size} ({len(masks)} models): {plan_label(plan)}, as measured before "
                        f"({AUTOTUNE_FILE})")
            else:
                plan, timings = autotune_plan(masks, list(initial_weights(0)), x, y,
                                              batch_size=ctx.settings.batch_size)
                ctx.log(f"autotune N={input_size} ({len(masks)} models): "
                        + ", ".join(f"{k} {v * 1e3:.1f} ms/step" for k, v in timings.items())
                        + f" -> {plan_label(plan)}")
                _remember_plan(ctx.out_dir, measured, plan, timings)
        else:
            plan = default_plan(ctx.device.type, input_size, len(masks))
            if ctx.conv != "auto":  # the user's layers, one by one
                plan["conv"], plan["compose"] = parse_conv(ctx.conv), False
            if ctx.memory_format != "auto":
                plan["memory_format"] = ctx.memory_format
        ctx.plan_by_size[key] = plan
    return ctx.plan_by_size[key]


# The plans autotune chose in this output folder, so that a resumed or extended run does not measure
# them again: keyed by everything the choice depends on (device, library versions, N, the masks,
# batch size, precision and the candidates); an unreadable file is measured over.
AUTOTUNE_FILE = "autotune.json"


def _autotune_key(ctx: RunContext, input_size: int, masks) -> str:
    candidates = ",".join(plan_label(p) for p in candidate_plans(ctx.device.type, len(masks), input_size))
    return (f"{ctx.device_label}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}; "
            f"N={input_size}; batch {ctx.settings.batch_size}; {ctx.settings.precision}; "
            f"masks {' '.join(mask_bits(m) for m in masks)}; "
            f"candidates {hashlib.sha1(candidates.encode()).hexdigest()[:12]}")


def _read_autotune_file(out_dir) -> dict:
    try:
        data = json.loads((Path(out_dir) / AUTOTUNE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remembered_plan(out_dir, key: str) -> dict | None:
    entry = _read_autotune_file(out_dir).get(key)
    try:
        plan = dict(entry["plan"])
        plan["conv"] = parse_conv(plan["conv"])
        plan["compose"] = compose_method(plan.get("compose")) or False
        return plan if plan.get("memory_format") in ("nchw", "nhwc") else None
    except (TypeError, KeyError, ValueError):
        return None


def _remember_plan(out_dir, key: str, plan: dict, timings: dict) -> None:
    data = _read_autotune_file(out_dir)
    data[key] = {"plan": dict(plan, conv=list(plan["conv"])), "ms_per_step": {k: v * 1e3 for k, v in timings.items()}}
    atomic_write_text(Path(out_dir) / AUTOTUNE_FILE, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _random_digits(ctx: RunContext, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 batches of random N x N images on the MNIST scale and 1-based labels, on the device: enough
    for autotune's steps, which need no real data (its consensus check compares plans)."""
    b = ctx.settings.batch_size
    x = torch.randn(8 * b, 1, input_size, input_size, device=ctx.device) * 50
    y = torch.randint(1, 11, (8 * b,), device=ctx.device).double()
    return x, y


def estimate_seconds(ctx: RunContext, work) -> tuple[float, str]:
    """Rough time of the pending work: a timed training step of the largest fused model, on random
    data, at the smallest and at the largest pending N, carried to the other sizes by
    :func:`scale_step_time`."""
    if not work:
        return 0.0, "nothing to do"
    masks = max((m for _, _, m in work), key=len)
    sizes = sorted({g.input_size for g, _, _ in work})
    steps = {n: _time_step(ctx, n, masks) for n in sorted({sizes[0], sizes[-1]})}
    timed = ", ".join(f"{s:.2f} s at N={n}" for n, s in steps.items())
    return scale_step_time(steps, ctx.settings.batch_size, len(masks), ctx.settings, work), \
        f"one step of {len(masks)} models took {timed}"


def _time_step(ctx: RunContext, input_size: int, masks) -> float:
    b = ctx.settings.batch_size
    x, y = _random_digits(ctx, input_size)
    plan = choose_plan(ctx, input_size, masks, x, y)
    trainer = FusedTrainer(build(plan, masks, list(initial_weights(0)), ctx.device), x, y, batch_size=b,
                           chunk_size=plan["chunk_size"])
    trainer.train_epoch(1, np.arange(1, b + 1))  # warm-up (and CUDA graph capture)
    start = time.perf_counter()
    trainer.train_epoch(2, np.arange(1, 2 * b + 1))
    return (time.perf_counter() - start) / 2


def scale_step_time(steps: dict, batch_size: int, num_models: int, settings, work) -> float:
    """Seconds for ``work`` given ``steps``: {N: seconds of one training step of ``num_models``
    fused models on ``batch_size`` images at N}.

    A step at another N is interpolated linearly in :func:`cost_per_image` between the nearest timed
    sizes below and above it, or scaled in proportion to it from the nearest one. Two timed sizes
    matter on a GPU, where a small N is latency-bound (a step at N = 28 costs far more than its 1/15
    of the arithmetic at N = 64), which the CPU-fitted cost model alone would not see.
    """
    timed = sorted(steps)

    def step_at(n: int) -> float:
        below = [t for t in timed if t <= n]
        above = [t for t in timed if t >= n]
        if below and above:
            lo, hi = below[-1], above[0]
            if lo == hi:
                return steps[lo]
            f = (cost_per_image(n) - cost_per_image(lo)) / (cost_per_image(hi) - cost_per_image(lo))
            return steps[lo] + f * (steps[hi] - steps[lo])
        nearest = below[-1] if below else above[0]
        return steps[nearest] * cost_per_image(n) / cost_per_image(nearest)

    images = settings.train_subset + CPU_EVAL_COST * settings.val_subset
    return sum((settings.epochs - done) * images / batch_size * len(m) / num_models * step_at(group.input_size)
               for group, done, m in work)


# -- training ----------------------------------------------------------------------------

def _row(mask, group: Group, epoch: int, m: int, train, val, seconds: float, num_models: int,
         device: str, conv: str) -> dict:
    row = {"mask": mask_name(mask), "mask_bits": mask_bits(mask), "input_size": group.input_size,
           "seed": group.seed, "epoch": epoch,
           "train_objective": float(train.objective[m]), "train_top1err": float(train.top1err[m]),
           "train_top5err": float(train.top5err[m]),
           "val_objective": float(val.objective[m]), "val_top1err": float(val.top1err[m]),
           "val_top5err": float(val.top5err[m]), "val_image_err": float(val.image_err[m])}
    for i in range(1, 5):
        row[f"dead_relu_conv{i}"] = float(val.dead_relu[i][m])  # nan (an empty field) without that ReLU
    row.update(seconds=seconds, fused_models=num_models, device=device, conv_impl=conv)
    return row


def train_cells(ctx: RunContext, group: Group, done: int, masks: list,
                progress: GridProgress | None = None) -> None:
    """Train ``masks`` of ``group`` from epoch ``done`` + 1 to the last, as one fused model."""
    run_to_end(train_cells_steps(ctx, group, done, masks, progress))


def train_cells_steps(ctx: RunContext, group: Group, done: int, masks: list, progress: GridProgress | None = None):
    """:func:`train_cells` as a step generator (:class:`~matconvnet_port.fused.Backlog`), for lanes."""
    s = ctx.settings
    path = checkpoint_path(ctx.out_dir, group)
    if ctx.writer is not None:  # an earlier run of this group may still be writing its checkpoint
        ctx.writer.flush()
    checkpoint = load_checkpoint(path, group)
    images, labels = ctx.loader.get(group.input_size) if ctx.loader is not None else _images(ctx, group.input_size)
    x = torch.from_numpy(images).to(ctx.device)
    y = torch.from_numpy(labels).to(ctx.device)
    train_indices = np.arange(1, s.train_subset + 1)
    val_indices = np.arange(s.train_subset + 1, s.train_subset + s.val_subset + 1)
    steps_per_epoch = -(-s.train_subset // s.batch_size)

    trainer, plan, conv = _fused_trainer(ctx, group, masks, x, y)
    del x, y  # the trainer keeps its own copies (images transposed): free the device memory
    if done > 0:
        trainer.load_state_dict(_stack_states([checkpoint["cells"][mask_bits(m)]["state"] for m in masks]))
    # mask -> the epoch at whose end its conv4 became NaN for good (FusedTrainer.diverged_models)
    diverged_since = {masks[m]: done for m in trainer.diverged_models()} if ctx.finish_diverged else {}

    # the graphs go with the job, before the lane's next job captures on the same stream
    # (fused._capture_stream), not whenever the trainer is collected
    try:
        for epoch in range(done + 1, s.epochs + 1):
            num_models = len(masks)
            advance = (lambda b, k=num_models: progress.advance(b * k, group.input_size)) if progress else None
            start = time.perf_counter()
            train = yield from trainer.train_epoch_steps(epoch, train_indices, progress=advance)
            val = yield from trainer.evaluate_steps(val_indices, progress=advance)
            seconds = (time.perf_counter() - start) / num_models
            rows = [_row(mask, group, epoch, m, train, val, seconds, num_models, ctx.device_label, conv)
                    for m, mask in enumerate(masks)]

            state = trainer.state_dict()
            finished = epoch == s.epochs
            for m, mask in enumerate(masks):
                checkpoint["cells"][mask_bits(mask)] = {
                    "epochs_done": epoch,
                    # a finished cell needs no state: the grid never grows in epochs (config.json)
                    "state": None if finished else _slice_state(state, m)}
            trained = {row["mask_bits"] for row in rows}
            checkpoint["rows"] = [r for r in checkpoint["rows"]
                                  if not (r["epoch"] == epoch and r["mask_bits"] in trained)] + rows
            settled = []
            if ctx.finish_diverged and not finished:
                settled = _settled(checkpoint["rows"], diverged_since, epoch, steps_per_epoch)
                for m in trainer.diverged_models():
                    diverged_since.setdefault(masks[m], epoch)
                if settled:
                    _finish_diverged(ctx, group, checkpoint, settled, epoch, trainer, masks, progress)
            ctx.rows_by_group[group.key] = checkpoint["rows"]
            # a snapshot: the next epoch replaces entries of these containers while it may be written
            snapshot = dict(checkpoint, cells=dict(checkpoint["cells"]))
            _write(ctx, _save_epoch, path, snapshot, ctx.out_dir, dict(ctx.rows_by_group))
            ctx.log(_epoch_line(group, epoch, s.epochs, rows, seconds * num_models))

            if settled:  # train on without them (the others' states move to a smaller fused network)
                for mask in settled:
                    del diverged_since[mask]
                live = [mask for mask in masks if mask not in settled]
                if not live:
                    masks = live
                    break
                keep = _stack_states([_slice_state(state, masks.index(mask)) for mask in live])
                images, labels = trainer.images.transpose(2, 3), trainer.class_index + 1
                trainer.release_graphs()
                # the group's plan for fewer models, not a new autotune inside a running lane
                plan = dict(plan, chunk_size=min(plan["chunk_size"], len(live)))
                trainer, plan, conv = _fused_trainer(ctx, group, live, images, labels, plan)
                trainer.load_state_dict(keep)
                del images, labels
                masks = live

        if ctx.save_nets:
            _save_nets(ctx, group, trainer.model, masks)
    finally:
        trainer.release_graphs()


def _fused_trainer(ctx: RunContext, group: Group, masks: list, x: torch.Tensor, y: torch.Tensor,
                   plan: dict | None = None):
    """A fused trainer of ``masks`` at the group's N on images ``x`` and 1-based labels ``y``, in
    ``plan`` or the one :func:`choose_plan` picks, from the seed's initial weights; with the plan
    and its label."""
    s = ctx.settings
    plan = plan or choose_plan(ctx, group.input_size, masks, x, y)
    # with lanes the seconds are those of a shared device: say so where they are written
    conv = plan_label(plan) + (f", {ctx.lanes} lanes" if ctx.lanes > 1 else "")
    model = build(plan, masks, list(initial_weights(group.seed)), ctx.device)
    trainer = FusedTrainer(model, x, y, batch_size=s.batch_size, learning_rate=s.learning_rate,
                           weight_decay=s.weight_decay, momentum=s.momentum, seed=group.seed,
                           chunk_size=plan["chunk_size"])
    return trainer, plan, conv


# the columns that must repeat before a diverged model stops training (all but the bookkeeping)
_STATISTICS = ("train_objective", "train_top1err", "train_top5err", "val_objective", "val_top1err",
               "val_top5err", "val_image_err") + tuple(f"dead_relu_conv{i}" for i in range(1, 5))


# SGD steps with NaN class scores before the last compared epoch: a conv1 channel that is dead on every
# training image keeps a zero gradient, so it stays finite; its leftover momentum (x 0.9 a step) is below
# float32 rounding after ~200 steps, and until then it could still change sign. Weight decay goes on
# shrinking its filter and bias together (x 0.99904 in 200 steps, 0.94 in 12,000), which keeps every
# sign and so every statistic: the rows are those of training on, while a stopped cell's saved net
# (--save-nets) holds the weights of the epoch it stopped at.
SETTLE_STEPS = 200


def _settled(rows: list[dict], diverged_since: dict, epoch: int, steps_per_epoch: int) -> list:
    """The masks that need no more training after ``epoch``: conv4 all NaN (class scores NaN, or 0 behind
    a ReLU) through the whole of this epoch and the one before (since the end of epoch - 2 or earlier),
    at least :data:`SETTLE_STEPS` steps of such scores before this epoch, and these two epochs' statistics equal
    (NaN equal to NaN) -- every later epoch repeats them."""
    by_key = {(r["mask"], r["epoch"]): r for r in rows}
    out = []
    for mask, since in diverged_since.items():
        last, before = by_key.get((mask_name(mask), epoch)), by_key.get((mask_name(mask), epoch - 1))
        long_enough = since <= epoch - 2 and (epoch - 1 - since) * steps_per_epoch >= SETTLE_STEPS
        if long_enough and last is not None and before is not None and all(
                last[c] == before[c] or (last[c] != last[c] and before[c] != before[c]) for c in _STATISTICS):
            out.append(mask)
    return out


def _finish_diverged(ctx: RunContext, group: Group, checkpoint: dict, settled: list, epoch: int,
                     trainer: FusedTrainer, masks: list, progress) -> None:
    """Finish the cells of ``settled`` (:func:`_settled`) after ``epoch``: their rows of the later
    epochs are this epoch's statistics (``seconds`` 0: not trained), their cells done."""
    s = ctx.settings
    last = {r["mask"]: r for r in checkpoint["rows"] if r["epoch"] == epoch}
    checkpoint["rows"] = checkpoint["rows"] + [dict(last[mask_name(mask)], epoch=later, seconds=0.0)
                                               for mask in settled for later in range(epoch + 1, s.epochs + 1)]
    for mask in settled:
        checkpoint["cells"][mask_bits(mask)] = {"epochs_done": s.epochs, "state": None}
    if ctx.save_nets:
        _save_nets(ctx, group, trainer.model, [mask if mask in settled else None for mask in masks])
    if progress is not None:
        progress.skip((s.epochs - epoch) * (s.train_subset + s.val_subset) * len(settled), group.input_size)
    ctx.log(f"N={group.input_size} seed={group.seed}: {len(settled)} diverged model(s) finish early "
            f"({', '.join(mask_name(m) for m in settled)}: conv4 all NaN, epochs {epoch - 1} and {epoch} "
            f"alike); epochs {epoch + 1}-{s.epochs} repeat epoch {epoch}'s statistics")


def _save_epoch(path: Path, checkpoint: dict, out_dir, rows_by_group: dict) -> None:
    atomic_torch_save(path, checkpoint)
    regenerate_results(out_dir, rows_by_group)


class BackgroundWriter:
    """Writes the epochs' checkpoints and results.csv in order on one background thread, so that the
    device keeps training meanwhile (a checkpoint of 16 cells is ~55 MB). An error in a write is
    raised at the next submission or at :meth:`close`, which waits for every pending write -- an
    interrupted run keeps every epoch it finished."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-writer")
        self._pending: list = []

    def submit(self, fn, *args) -> None:
        self._raise_failures(wait=False)
        self._pending.append(self._pool.submit(fn, *args))

    def flush(self) -> None:
        """Wait for every pending write (raising the first error)."""
        self._raise_failures(wait=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def _raise_failures(self, wait: bool) -> None:
        still = []
        for future in self._pending:
            if wait or future.done():
                future.result()  # raises the write's exception
            else:
                still.append(future)
        self._pending = still


class ImagePrefetcher:
    """The N x N images of the groups to come, loaded on a background thread while the device
    trains the current ones (resizing 70000 digits to 64 x 64 takes the host a few seconds, which
    otherwise idle the device at every new N). :meth:`want` says which sizes to have ready --
    anything else is dropped -- and :meth:`get` waits for one."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-loader")
        self._futures: dict = {}

    def want(self, sizes) -> None:
        sizes = list(dict.fromkeys(sizes))
        for n in list(self._futures):
            if n not in sizes:
                self._futures.pop(n).cancel()
        for n in sizes:
            if n not in self._futures:
                self._futures[n] = self._pool.submit(self._load, n)

    def get(self, input_size: int):
        if input_size not in self._futures:
            self._futures[input_size] = self._pool.submit(self._load, input_size)
        return self._futures[input_size].result()

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=True)

    def _load(self, input_size: int):
        return _images(self.ctx, input_size)


def _images(ctx: RunContext, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_images` with the run's settings."""
    s = ctx.settings
    return load_images(input_size, s.resize, s.dataset, ctx.data_dir, s.train_subset, s.val_subset)


def _write(ctx: RunContext, fn, *args) -> None:
    if ctx.writer is None:
        fn(*args)
    else:
        ctx.writer.submit(fn, *args)


def _epoch_line(group: Group, epoch: int, epochs: int, rows: list[dict], seconds: float) -> str:
    best = min(rows, key=lambda r: r["val_image_err"])
    shown = {r["mask"]: r["val_image_err"] for r in rows}
    marks = "".join(f", {name} {shown[name]:.2%}" for name in ("C CR C CR", "C C CR C")
                    if name in shown and name != best["mask"])
    return (f"N={group.input_size} seed={group.seed} epoch {epoch}/{epochs}: val image error "
            f"best {best['val_image_err']:.2%} ({best['mask']}){marks}  [{len(rows)} models, {seconds:.1f} s]")


def _save_nets(ctx: RunContext, group: Group, model: FusedLeNet, masks: list) -> None:
    from ..netio import save_net  # the .mat writer, only needed here

    folder = Path(ctx.out_dir) / "nets"
    folder.mkdir(parents=True, exist_ok=True)
    for m, mask in enumerate(masks):
        if mask is None:  # a model of the fused network not to be saved
            continue
        net = cnn_mnist_init(mask, weights=model.model_weights(m))
        net.meta["inputSize"] = np.array([[group.input_size, group.input_size, 1.0]])
        save_net(folder / f"net-{group.key}-{mask_bits(mask)}.mat", net)


def run_groups(ctx: RunContext, work, progress: GridProgress | None = None) -> None:
    """Train every pending (group, epochs done, masks) of ``work``: in order, or ``ctx.lanes`` at a
    time side by side (:func:`~matconvnet_port.search.lanes.run_in_lanes`)."""
    ctx.rows_by_group.update(read_all_rows(ctx.out_dir))
    ctx.writer, ctx.loader = BackgroundWriter(), ImagePrefetcher(ctx)
    try:
        if ctx.lanes <= 1:
            for i, (group, done, masks) in enumerate(work):
                ctx.loader.want([group.input_size] + [g.input_size for g, _, _ in work[i + 1:i + 2]])
                train_cells(ctx, group, done, masks, progress=progress)
            return
        _choose_plans_first(ctx, work)
        s = ctx.settings

        def cost(job):
            return cost_per_image(job[0].input_size) * len(job[2]) * (s.epochs - job[1])

        def upcoming(running, pending):  # lanes take the costliest and the cheapest pending job next
            ctx.loader.want([job[0].input_size for job in running + pending[:1] + pending[-1:]])

        run_in_lanes(work, lambda job: train_cells_steps(ctx, *job, progress=progress), lanes=ctx.lanes,
                     device=ctx.device, group=lambda job: job[0].key, cost=cost, upcoming=upcoming)
    finally:
        loader, writer = ctx.loader, ctx.writer
        ctx.writer = ctx.loader = None
        try:
            loader.close()
        finally:
            writer.close()


def _choose_plans_first(ctx: RunContext, work) -> None:
    """Every plan the work needs, chosen before the lanes start: autotuning times steps alone on the
    device (on random images, as :func:`estimate_seconds`)."""
    for group, _, masks in work:
        if (group.input_size, len(masks)) not in ctx.plan_by_size:
            choose_plan(ctx, group.input_size, masks, *_random_digits(ctx, group.input_size))
