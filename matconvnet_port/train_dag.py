"""``cnn_train_dag``: MatConvNet's SGD trainer for DagNN networks.

Read beside ``examples/cnn_train_dag.m``; it is :mod:`matconvnet_port.train`
(``cnn_train``) with the DagNN's differences:

1. ``get_batch(imdb, batch)`` returns the network's inputs by name, a dict
   ``{'input': images, 'label': labels}`` or MATLAB's ``{'input', im, 'label', l}``
   written as a list;
2. the backward pass starts from ``der_outputs`` (``{'objective': 1}``);
3. the statistics are the outputs of the ``dagnn.Loss`` layers, named by
   their output variables (``objective``, ``top1err`` ... as the net names
   them), each the mean per image over the epoch;
4. parameters are updated by their ``trainMethod``: 'gradient' with
   ``cnn_train``'s SGD (:func:`matconvnet_port.train.sgd_update`, the
   parameter's ``learningRate``/``weightDecay`` multipliers), 'average' (the
   batch-norm moments) as ``w = (1 - a) w + a * batch_moments / fanout``
   with ``a`` its ``learningRate``, ``fanout`` the layers that use it;
5. checkpoints hold ``net`` as the ``saveobj`` struct and
   ``state.solverState`` as one cell per parameter.

Normalisation and sub-batches follow ``cnn_train`` exactly (``normalise``:
master's losses divided by the images and updates divided by
``num_sub_batches``; ``False``: beta25's summed losses and updates divided by
the batch size), so ``DagNN.from_simplenn(net)`` trains as ``cnn_train``
trains ``net`` (tested).
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
                    _sub_batches, _train_val, find_last_checkpoint, resolve_device, sgd_update)

__all__ = ["cnn_train_dag"]


class _DagSolver:
    """The trained parameters of a DagNN module with their momentum buffers, in ``net.params`` order."""

    def __init__(self, net: DagNN, module: DagNNModule, solver_state=None):
        self.module = module
        self.gradient = []  # (name, tensor, momentum, lr mult, decay mult)
        self.average = []   # (name, tensor, lr, [(block index, moments slot)])
        for k, (name, param) in enumerate(net.params.items()):
            t = module.param(name)
            if t is None:
                continue
            method = param.extra.get("trainMethod", "gradient")
            method = method if isinstance(method, str) else str(np.asarray(method).reshape(-1)[0])
            lr, decay = float(np.asarray(param.learningRate).reshape(-1)[0]), \
                float(np.asarray(param.weightDecay).reshape(-1)[0])
            if method == "average":
                users = [i for i, names in enumerate(module.layer_params) if name in names
                         and isinstance(module.blocks[i], _BatchNorm) and names.index(name) == 2]
                if not users:
                    raise ValueError(f"params({k + 1}) '{name}': trainMethod 'average' is for batch-norm "
                                     f"moments, and no dagnn.BatchNorm layer uses it as its moments")
                self.average.append((name, t, lr, users))
            elif method == "gradient":
                buf = torch.zeros_like(t)
                saved = None if solver_state is None or k >= len(solver_state) else np.asarray(solver_state[k])
                if saved is not None and saved.size == t.numel() and saved.size > 1:
                    buf = module.param_to_torch(name, saved).clone()
                elif saved is not None and saved.size > 1:
                    raise ValueError(f"state.solverState{{{k + 1}}}: {saved.size} values for parameter "
                                     f"'{name}' of {t.numel()}")
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
            for name, t, lr, users in self.average:
                found = [moments[i] for i in users if i in moments]
                if found:  # cnn_train_dag divides the summed derivative by the parameter's fanout
                    value = sum(found) / len(users)
                    t.mul_(1 - lr).add_(lr * fn.bnorm_moments_as(value, tuple(t.shape)))
        for e in self.gradient:
            e[1].grad = None

    def solver_state(self, net: DagNN) -> list:
        """``state.solverState``: one cell per parameter (MatConvNet layout; 0 where nothing is kept)."""
        buffers = {name: buf for name, _, buf, _, _ in self.gradient}
        return [self.module.param_to_matconvnet(name, buffers[name]) if name in buffers
                else np.zeros((1, 1)) for name in net.params]


def _loss_outputs(module: DagNNModule) -> list[str]:
    return [module.layer_outputs[i][0] for i, b in enumerate(module.blocks) if isinstance(b, _Loss)]


def _process_epoch(net: DagNN, module: DagNNModule, solver, imdb, get_batch, subset, *, mode, epoch, batch_size,
                   learning_rate, opts, batch_callback, progress) -> dict:
    """Train (or evaluate) over ``subset``: ``processEpoch`` of ``cnn_train_dag.m``."""
    training = mode == "train"
    module.train(training)
    names = _loss_outputs(module)
    totals = {v: 0.0 for v in names}
    norms = [i for i, b in enumerate(module.blocks) if isinstance(b, _BatchNorm)]
    num, start = 0, time.perf_counter()
    bar = tqdm(range(0, len(subset), batch_size), desc=f"{mode} epoch {epoch:02d}", unit="batch",
               disable=not progress, leave=False)
    for b, t in enumerate(bar):
        batch = subset[t:t + batch_size]
        row = {v: 0.0 for v in names}
        moments = {}
        for part in _sub_batches(batch, opts["num_sub_batches"]):
            inputs = _name_value_pairs(get_batch(imdb, part), "get_batch's return")
            tensors, _, _ = net._input_tensors(module, inputs, False)
            with torch.set_grad_enabled(training):
                values, _ = module.run(tensors)
                if training:
                    missing = [v for v in opts["der_outputs"] if v not in values]
                    if missing:
                        raise ValueError(f"der_outputs: {missing[0]!r} was not computed (a missing input?)")
                    sum((values[v] * w).sum() for v, w in opts["der_outputs"].items()).backward()
            for v in names:
                if v in values:  # the loss layers divide by their images (master): back to a sum
                    row[v] += float(values[v].detach().sum()) * (len(part) if opts["normalise"] else 1)
            if training:
                for i in norms:  # master sums the sub-batches' moments, beta25 weights them by images
                    m = module.blocks[i].batch_moments * (1 if opts["normalise"] else len(part))
                    moments[i] = moments.get(i, 0) + m
        divisor = opts["num_sub_batches"] if opts["normalise"] else len(batch)
        if training:
            solver.step(learning_rate=learning_rate, weight_decay=opts["weight_decay"], momentum=opts["momentum"],
                        nesterov=opts["nesterov_update"], grad_scale=1.0 / divisor,
                        moments={i: m / divisor for i, m in moments.items()})
        for v in names:
            totals[v] += row[v]
        num += len(batch)
        if batch_callback is not None:
            batch_callback(epoch, mode, b, {v: row[v] / len(batch) for v in names})
        if progress:
            bar.set_postfix({v: f"{totals[v] / num:.3f}" for v in names})
    bar.close()
    stats = {v: float(np.float32(totals[v] / num)) if num else 0.0 for v in names}
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
    from .netio import load_checkpoint, save_checkpoint  # the .mat layer, imported lazily

    der_outputs = _name_value_pairs({"objective": 1} if der_outputs is None else der_outputs, "der_outputs")
    for name in der_outputs:
        if name not in net.vars:
            raise ValueError(f"der_outputs: {name!r} is not a variable of the network")
    der_outputs = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in der_outputs.items()}
    _check_train_options(num_sub_batches, post_epoch_fn)
    opts = dict(weight_decay=weight_decay, momentum=momentum, nesterov_update=nesterov_update,
                normalise=normalise, num_sub_batches=int(num_sub_batches), der_outputs=der_outputs)
    device = resolve_device(device)
    os.makedirs(exp_dir, exist_ok=True)
    train, val = _train_val(imdb, train, val)
    evaluate_mode = train.size == 0
    rates = _learning_rates(learning_rate, "learning_rate")

    net = copy.deepcopy(net)
    info, solver_state = {"train": [], "val": []}, None
    start = find_last_checkpoint(exp_dir) if resume else 0
    if start >= 1:
        net, state, saved = load_checkpoint(_checkpoint_path(exp_dir, start))
        if not isinstance(net, DagNN):
            raise ValueError(f"{_checkpoint_path(exp_dir, start)}: holds a SimpleNN, not a DagNN (use cnn_train)")
        solver_state = state.get("solverState") if isinstance(state, dict) else None
        info = {"train": list(saved.get("train", []))[:start], "val": list(saved.get("val", []))[:start]}
        if progress:
            print(f"cnn_train_dag: resuming by loading epoch {start}")
    module = net.to_torch(device=device, dtype=dtype)
    for block in module.blocks:
        if isinstance(block, _Loss):
            block.options["normalise"] = normalise
    try:
        solver = _DagSolver(net, module, solver_state)
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
            state = {"solverState": solver.solver_state(net), "stats": {"train": train_stats, "val": val_stats}}
            if not evaluate_mode:
                save_checkpoint(_checkpoint_path(exp_dir, epoch), net, state, info)
            if progress:
                print(f"epoch {epoch:02d}: train " + " ".join(f"{k} {v:.4f}" for k, v in train_stats.items()
                                                              if k not in ("num", "time"))
                      + " | val " + " ".join(f"{k} {v:.4f}" for k, v in val_stats.items() if k not in ("num", "time")))
            if post_epoch_fn is not None:
                params = dict(epoch=epoch, learning_rate=lr, learning_rates=rates.copy(), train=train_order,
                              val=val_order, batch_size=batch_size, num_sub_batches=num_sub_batches,
                              num_epochs=num_epochs, weight_decay=weight_decay, momentum=momentum,
                              exp_dir=exp_dir, imdb=imdb, get_batch=get_batch)
                rates, stop = _after_epoch(post_epoch_fn, net, params, state, rates)
                if stop:
                    break
    net.load_torch_weights(module)
    return net, info
