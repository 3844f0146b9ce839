"""``cnn_train_dag``: MatConvNet's SGD trainer for DagNN networks.

Read beside ``examples/cnn_train_dag.m``; it is :mod:`matconvnet_port.train`
(``cnn_train``) with the DagNN's differences:

1. ``get_batch(imdb, batch)`` returns the network's inputs by name, a dict
   ``{'input': images, 'label': labels}`` or MATLAB's ``{'input', im, 'label', l}``
   written as a list;
2. the backward pass starts from ``der_outputs`` (``{'objective': 1}``);
3. the statistics are the ``average`` of each ``dagnn.Loss`` layer (not
   flagged ``ignoreAverage``), named by its output variable (``objective``,
   ``top1err`` ... as the net names them): the loss summed over the epoch
   divided by the prediction's locations, H x W x images (per image for the
   usual 1 x 1 prediction; ``cnn_train`` divides by images only);
4. parameters are updated by their ``trainMethod``: 'gradient' with
   ``cnn_train``'s SGD (:func:`matconvnet_port.train.sgd_update`, the
   parameter's ``learningRate``/``weightDecay`` multipliers), 'average' (the
   batch-norm moments) as ``w = (1 - a) w + a * M / fanout`` with ``a`` its
   ``learningRate``, ``fanout`` the layers that use the parameter and ``M``
   the batch's moments, combined over sub-batches as ``cnn_train`` does
   (master: their plain mean; beta25: weighted by images);
5. checkpoints hold ``net`` as the ``saveobj`` struct and
   ``state.solverState`` as one cell per parameter, as MATLAB's.

The normalisation follows this port's ``cnn_train``: ``normalise=False`` is
beta25 (losses summed over the images, the update divided by the batch
size, as in the stored ``cnn_train_dag.m``); ``normalise=True`` (master:
losses divided by their images) divides the update by ``num_sub_batches``
(master's ``numWorkers``). The trainer sets every Loss layer's ``normalise``
to the run's so that the two agree (a deliberate difference: MATLAB keeps
each block's own). So ``DagNN.from_simplenn(net)`` ends with the weights
``cnn_train`` gives ``net``, bit for bit, batch norm included (tested); no
MATLAB run of ``cnn_train_dag`` is among the references.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import functional as fn
from .dagnn import DagNN, DagNNModule, _BatchNorm, _Loss, _name_value_pairs
from .precision import exact_fp32
from .train import (_after_epoch, _check_train_options, _checkpoint_path, _epoch_orders, _learning_rates,
                    _moments_term, _momentum, _resume, _sub_batches, _train_val, resolve_device,
                    sgd_update)

__all__ = ["cnn_train_dag"]


def _multiplier(value, where: str) -> float:
    a = np.asarray(value)
    if a.size != 1 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{where} must be one number, got {a.size} values")
    return float(a.reshape(-1)[0])


class _DagSolver:
    """The trained parameters of a DagNN module with their momentum buffers, in ``net.params`` order."""

    def __init__(self, net: DagNN, module: DagNNModule, solver_state=None):
        self.module = module
        self.gradient = []  # (name, tensor, momentum, lr mult, decay mult)
        self.average = []   # (name, tensor, lr, BatchNorm layers using it as moments, layers using it)
        for k, (name, param) in enumerate(net.params.items()):
            t = module.param(name)
            if t is None:
                continue
            where = f"params({k + 1}) '{name}'"
            method = param.extra.get("trainMethod", "gradient")
            method = method if isinstance(method, str) else "".join(np.asarray(method, dtype=str).reshape(-1))
            lr, decay = _multiplier(param.learningRate, f"{where}.learningRate"), \
                _multiplier(param.weightDecay, f"{where}.weightDecay")
            if method == "average":
                users = [i for i, names in enumerate(module.layer_params) if name in names
                         and isinstance(module.blocks[i], _BatchNorm) and names.index(name) == 2]
                if not users:
                    raise ValueError(f"{where}: trainMethod 'average' is for batch-norm moments, and no "
                                     f"dagnn.BatchNorm layer uses it as its moments")
                fanout = sum(name in names for names in module.layer_params)
                self.average.append((name, t, lr, users, fanout))
            elif method == "gradient":
                saved = None if solver_state is None or k >= len(solver_state) else solver_state[k]
                buf = _momentum(saved, t, lambda a, name=name: module.param_to_torch(name, a).clone(),
                                f"state.solverState{{{k + 1}}} (parameter '{name}')")
                self.gradient.append((name, t, buf, lr, decay))
            else:
                raise ValueError(f"params({k + 1}) '{name}': unknown trainMethod {method!r} "
                                 f"(MatConvNet has 'gradient' and 'average')")

    def step(self, *, learning_rate, weight_decay, momentum, nesterov, grad_scale, moments: dict) -> None:
        entries = [e for e in self.gradient if e[1].grad is not None]
        sgd_update([e[1] for e in entries], [e[1].grad for e in entries], [e[2] for e in entries],
                   [e[3] for e in entries], [e[4] for e in entries], learning_rate=learning_rate,
                   weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, grad_scale=grad_scale)
        with torch.no_grad():
            for name, t, lr, users, fanout in self.average:
                found = [moments[i] for i in users if i in moments]
                if found:  # cnn_train_dag divides the summed derivative by the parameter's fanout
                    value = sum(found) / fanout
                    t.mul_(1 - lr).add_(lr * fn.bnorm_moments_as(value, tuple(t.shape)))
        for e in self.gradient:
            e[1].grad = None

    def solver_state(self, net: DagNN) -> list:
        """``state.solverState``: one cell per parameter (MatConvNet layout; 0 where nothing is kept)."""
        buffers = {name: buf for name, _, buf, _, _ in self.gradient}
        return [self.module.param_to_matconvnet(name, buffers[name]) if name in buffers
                else np.zeros((1, 1)) for name in net.params]


def _averaged_losses(net: DagNN, module: DagNNModule) -> list[tuple[str, str]]:
    """(output, prediction input) of each dagnn.Loss layer whose ``average`` is kept (not ``ignoreAverage``)."""
    out = []
    for i, block in enumerate(module.blocks):
        ignore = np.asarray(net.layers[i]["block"].get("ignoreAverage", False))
        if isinstance(block, _Loss) and not (ignore.size and bool(ignore.reshape(-1)[0])):
            out.append((module.layer_outputs[i][0], module.layer_inputs[i][0]))
    return out


def _process_epoch(net: DagNN, module: DagNNModule, solver, imdb, get_batch, subset, *, mode, epoch, batch_size,
                   learning_rate, opts, batch_callback, progress) -> dict:
    """Train (or evaluate) over ``subset``: ``processEpoch`` of ``cnn_train_dag.m``.

    Each statistic is its Loss layer's ``average``: the loss summed over the epoch divided by the
    prediction's locations (H x W x images) -- per image for a 1 x 1 prediction.
    """
    training = mode == "train"
    module.train(training)
    param = next(iter(module.params.values()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    losses = _averaged_losses(net, module)
    totals = {v: 0.0 for v, _ in losses}
    counts = {v: 0 for v, _ in losses}
    num, start = 0, time.perf_counter()
    bar = tqdm(range(0, len(subset), batch_size), desc=f"{mode} epoch {epoch:02d}", unit="batch",
               disable=not progress, leave=False)
    for b, t in enumerate(bar):
        batch = subset[t:t + batch_size]
        row, row_count = {v: 0.0 for v in totals}, {v: 0 for v in totals}
        moments = {}
        for part in _sub_batches(batch, opts["num_sub_batches"]):
            inputs = _name_value_pairs(get_batch(imdb, part), "get_batch's return")
            tensors, _, _ = net._input_tensors(module, inputs, False)
            tensors = {k: v.to(device) if k in module.label_vars else v.to(device, dtype) for k, v in tensors.items()}
            with torch.set_grad_enabled(training):
                values, executed = module.run(tensors)
                if training:
                    net._backward(values, opts["der_outputs"])  # sums into .grad across the sub-batches
            for v, x in losses:
                if v in values:  # the loss layers divide by their images (master): back to a sum
                    n, _, h, w = values[x].shape
                    row[v] += float(values[v].detach().sum()) * (n if opts["normalise"] else 1)
                    row_count[v] += h * w * n
            if training:  # as cnn_train combines them (one sub-batch: its moments as they are)
                for i in executed:
                    if isinstance(module.blocks[i], _BatchNorm):
                        m = module.blocks[i].batch_moments
                        moments[i] = moments.get(i, 0) + _moments_term(m, len(part), opts) \
                            if opts["num_sub_batches"] > 1 else m
        if training:
            divisor = opts["num_sub_batches"] if opts["normalise"] else len(batch)
            solver.step(learning_rate=learning_rate, weight_decay=opts["weight_decay"], momentum=opts["momentum"],
                        nesterov=opts["nesterov_update"], grad_scale=1.0 / divisor,
                        moments={i: m / divisor if opts["num_sub_batches"] > 1 else m for i, m in moments.items()})
        for v in totals:
            totals[v] += row[v]
            counts[v] += row_count[v]
        num += len(batch)
        if batch_callback is not None:
            batch_callback(epoch, mode, b, {v: row[v] / row_count[v] if row_count[v] else float("nan")
                                            for v in totals})
        if progress:
            bar.set_postfix({v: f"{totals[v] / max(counts[v], 1):.3f}" for v in totals})
    bar.close()
    stats = {v: float(np.float32(totals[v] / counts[v])) if counts[v] else float("nan") for v in totals}
    stats.update(num=num, time=time.perf_counter() - start)
    return stats


def cnn_train_dag(net: DagNN, imdb: dict, get_batch: Callable, *, exp_dir: str, num_epochs: int = 300,
                  batch_size: int = 256, num_sub_batches: int = 1, epoch_size: int | None = None,
                  learning_rate=0.001, weight_decay: float = 0.0005, momentum: float = 0.9,
                  nesterov_update: bool = False, train=None, val=None, random_seed: int = 0,
                  order: Callable | None = None, resume: bool = True, device="auto", der_outputs=None,
                  normalise: bool = True, progress: bool = True, batch_callback: Callable | None = None,
                  post_epoch_fn: Callable | None = None, dtype: torch.dtype = torch.float32):
    """Train a DagNN with SGD as MatConvNet's ``cnn_train_dag`` -> ``(net, info)``.

    Options as :func:`matconvnet_port.train.cnn_train` (same names, defaults
    and checks, ``train``/``val`` as in MATLAB), except: ``get_batch``
    returns the inputs by name (see the module docstring); ``der_outputs``
    (default ``{'objective': 1}``, or MATLAB's ``['objective', 1]``) seeds
    the backward pass; ``info['train'][e]`` has one entry per ``dagnn.Loss``
    output variable besides ``num`` and ``time``. Checkpoints
    ``exp_dir/net-epoch-K.mat`` hold the ``saveobj`` struct, written
    atomically and resumed exactly. The net passed in is not modified
    (MATLAB's DagNN is a handle, trained in place; here use the returned one).
    """
    from .netio import save_checkpoint  # the .mat layer, imported lazily

    der_outputs = _name_value_pairs({"objective": 1} if der_outputs is None else der_outputs, "der_outputs")
    _check_train_options(num_sub_batches, post_epoch_fn)
    opts = dict(weight_decay=weight_decay, momentum=momentum, nesterov_update=nesterov_update,
                normalise=normalise, num_sub_batches=int(num_sub_batches), der_outputs=der_outputs,
                batch_size=batch_size, num_epochs=num_epochs, exp_dir=exp_dir, imdb=imdb, get_batch=get_batch)
    device = resolve_device(device)
    os.makedirs(exp_dir, exist_ok=True)
    train, val = _train_val(imdb, train, val)
    evaluate_mode = train.size == 0
    if not evaluate_mode:  # as MATLAB, derOutputs matter only when something trains
        if not der_outputs:
            raise ValueError("der_outputs must name at least one output when training (cnn_train_dag's DEROUTPUTS)")
        for name in der_outputs:
            if name not in net.vars:
                raise ValueError(f"der_outputs: {name!r} is not a variable of the network")
    rates = _learning_rates(learning_rate, "learning_rate")

    start, saved_net, solver_state, info = _resume(exp_dir, resume, DagNN, "cnn_train_dag", progress)
    net = saved_net if start else copy.deepcopy(net)
    module = net.to_torch(device=device, dtype=dtype)
    for block in module.blocks:
        if isinstance(block, _Loss):
            block.options["normalise"] = normalise
    try:  # as in MATLAB, how parameters train matters only when something trains
        solver = None if evaluate_mode else _DagSolver(net, module, solver_state)
    except ValueError as e:
        raise ValueError(f"{_checkpoint_path(exp_dir, start)}: {e}" if solver_state is not None else str(e)) from None

    with exact_fp32():
        for epoch in range(start + 1, num_epochs + 1):
            lr = float(rates[min(epoch, rates.size) - 1])
            train_order, val_order = _epoch_orders(epoch, train, val, order, random_seed, epoch_size)
            common = dict(epoch=epoch, batch_size=batch_size, learning_rate=lr, opts=opts,
                          batch_callback=batch_callback, progress=progress)
            train_stats = _process_epoch(net, module, solver, imdb, get_batch, train_order, mode="train", **common)
            with torch.no_grad():
                val_stats = _process_epoch(net, module, None, imdb, get_batch, val_order, mode="val", **common)
            info["train"].append(train_stats)
            info["val"].append(val_stats)
            net.load_torch_weights(module)
            state = {"solverState": solver.solver_state(net) if solver else [],
                     "stats": {"train": train_stats, "val": val_stats}}
            if not evaluate_mode:
                # every statistic is a dagnn.Loss block's average, computed from its single output
                save_checkpoint(_checkpoint_path(exp_dir, epoch), net, state, info,
                                single_stats=[k for k in train_stats if k not in ("num", "time")])
            if progress:
                print(f"epoch {epoch:02d}: train " + " ".join(f"{k} {v:.4f}" for k, v in train_stats.items()
                                                              if k not in ("num", "time"))
                      + " | val " + " ".join(f"{k} {v:.4f}" for k, v in val_stats.items() if k not in ("num", "time")))
            if post_epoch_fn is not None:
                rates, stop = _after_epoch(post_epoch_fn, net, state, rates, opts, epoch=epoch, learning_rate=lr,
                                           train=train_order, val=val_order)
                if stop:
                    break
    net.load_torch_weights(module)
    return net, info
