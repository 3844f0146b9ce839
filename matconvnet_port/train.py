"""``cnn_train``: MatConvNet's SGD trainer for SimpleNN networks, step for step.

Read this file beside MatConvNet's ``examples/cnn_train.m`` (master, 2018):
the same options, the same loop, the same update and the same statistics,
with PyTorch computing the forward and backward passes (through
:mod:`matconvnet_port.functional`, in IEEE float32).

The story, top to bottom:

1. prepare the net (``vl_simplenn_tidy``, per-layer ``learningRate`` /
   ``weightDecay`` multipliers, the prediction layer made precious);
2. resume from the last complete ``exp_dir/net-epoch-K.mat`` if any;
3. for each epoch: shuffle (seeded with ``random_seed + epoch``), run the
   training batches -- forward, backward, error counts, SGD update --
   then the validation batches in test mode;
4. save ``net-epoch-K.mat`` (``net``, ``state`` with the momentum buffers,
   ``stats``) atomically.

The update (``accumulateGradients`` in ``cnn_train.m``), for every layer from
last to first and every parameter j from last to first::

    g = dzdw / (numSubBatches if normalise else batchSize) + weightDecay * layer.weightDecay(j) * w
    m = momentum * m - g
    delta = momentum * m - g  if nesterov_update else  m
    w = w + learningRate(epoch) * layer.learningRate(j) * delta

(skipped when both the learning rate and the decay of that parameter are 0;
``dzdw`` summed over the sub-batches, of which there is one by default).
Batch-norm moments are not trained: ``w = (1 - a) * w + a * batch_moments``
with ``a = layer.learningRate(3)`` (with sub-batches, their moments combined as
``cnn_train`` says). The statistics are MatConvNet's:
``objective`` the mean per-image loss, ``top1err``/``top5err`` the errors
counted at every spatial location of the prediction divided by the number
of images (so they exceed 1 for spatial maps), measured during the training
forward passes and, for ``val``, after the epoch in test mode.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import time
from numbers import Real
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import layers as L
from .files import atomic_write_text
from .matio import cell_items
from .precision import exact_fp32
from .simplenn import SimpleNN, SimpleNNModule, param_to_matconvnet, vl_simplenn_tidy
from .vl_nn import hwcn_to_nchw

__all__ = ["cnn_train", "sgd_update", "error_multiclass", "resolve_device", "default_order",
           "find_last_checkpoint", "options_from_matlab"]


# ---------------------------------------------------------------------------
# Pieces of cnn_train.m, each usable on its own
# ---------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}: use auto, cpu, cuda or cuda:K") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: this port runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return device


def default_order(epoch: int, indices: np.ndarray, random_seed: int = 0) -> np.ndarray:
    """The shuffle of ``cnn_train``: a permutation seeded with ``random_seed + epoch``.

    MATLAB's ``rng(epoch + randomSeed); randperm(n)`` cannot be reproduced
    outside MATLAB, so this uses PyTorch's generator with the same seed; pass
    ``order=`` to :func:`cnn_train` to replay a recorded MATLAB order.
    """
    generator = torch.Generator().manual_seed(int(random_seed) + int(epoch))
    return np.asarray(indices)[torch.randperm(len(indices), generator=generator).numpy()]


def error_multiclass(prediction: torch.Tensor, labels: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Top-1 and top-5 error counts -- ``error_multiclass`` of ``cnn_train.m``.

    ``prediction`` N x C x H x W scores; ``labels`` N (one per image) or
    N x 1 x H x W / N x 2 x H x W (labels, weights), 1-based, 0 = skip.
    Errors are counted at every location (weighted by the mass), not divided.
    Returns a tensor [top1, top5] on the prediction's device (2 x N counts per
    image with ``per_image``).
    """
    n, c, h, w = prediction.shape
    if labels.numel() == n:
        labels = labels.reshape(n, 1, 1, 1)
    mass = (labels[:, :1] > 0).to(prediction.dtype)
    if labels.shape[1] == 2:
        mass = mass * labels[:, 1:2].to(prediction.dtype)
        labels = labels[:, :1]
    m = min(5, c)
    # MATLAB's sort is stable, so ties rank the lower class first
    ranked = torch.sort(prediction, dim=1, descending=True, stable=True).indices[:, :m] + 1
    wrong = ranked != labels.to(ranked.dtype)
    top1 = (mass * wrong[:, :1].to(prediction.dtype)).sum(dim=(1, 2, 3))
    top5 = (mass * wrong.all(dim=1, keepdim=True).to(prediction.dtype)).sum(dim=(1, 2, 3))
    counts = torch.stack([top1, top5])
    return counts if per_image else counts.sum(dim=1)


def error_binary(prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``error_binary`` of ``cnn_train.m``: count of ``prediction * labels < 0``."""
    return ((prediction * labels.to(prediction.dtype)) < 0).sum().to(prediction.dtype).reshape(1)


ERROR_FUNCTIONS = {"multiclass": (error_multiclass, ("top1err", "top5err")),
                   "binary": (error_binary, ("binerr",)),
                   "none": (None, ())}


@torch.no_grad()
def sgd_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momenta: Sequence[torch.Tensor],
               lr_mults: Sequence[float], decay_mults: Sequence[float], *, learning_rate: float,
               weight_decay: float, momentum: float, nesterov: bool = False, grad_scale: float = 1.0) -> None:
    """MatConvNet's SGD with momentum, in place: see the module docstring.

    ``params``, ``grads``, ``momenta`` are matching lists (visited last to
    first as ``cnn_train`` does); the multipliers are per parameter. Works on
    stacked parameters of several models alike (the update is elementwise).
    """
    # parameters with the same multipliers are updated together by torch's multi-tensor kernels
    # (one launch per operation for all of them, the same elementwise arithmetic)
    groups: dict = {}
    for j in reversed(range(len(params))):
        this_lr = learning_rate * float(lr_mults[j])
        this_decay = weight_decay * float(decay_mults[j])
        if this_lr > 0 or this_decay > 0:  # cnn_train's test (a negative rate with no decay is a frozen parameter)
            groups.setdefault((this_lr, this_decay), []).append(j)
    for (this_lr, this_decay), js in groups.items():
        w = [params[j] for j in js]
        m = [momenta[j] for j in js]
        g = [grads[j] for j in js]
        if grad_scale != 1.0:
            g = torch._foreach_mul(g, grad_scale)
        if this_decay:
            g = torch._foreach_add(g, w, alpha=this_decay)
        torch._foreach_mul_(m, momentum)
        torch._foreach_sub_(m, g)
        if nesterov:
            torch._foreach_add_(w, torch._foreach_sub(torch._foreach_mul(m, momentum), g), alpha=this_lr)
        else:
            torch._foreach_add_(w, m, alpha=this_lr)


def checkpoints(exp_dir: str) -> dict[int, str]:
    """{K: path} of the ``net-epoch-K.mat`` files in ``exp_dir`` (its name taken literally, not as a pattern)."""
    out = {}
    for path in glob.glob(os.path.join(glob.escape(exp_dir), "net-epoch-*.mat")):
        if m := re.fullmatch(r"net-epoch-(\d+)\.mat", os.path.basename(path)):
            out[int(m.group(1))] = path
    return out


def find_last_checkpoint(exp_dir: str) -> int:
    """The largest K with ``exp_dir/net-epoch-K.mat`` present (0 if none)."""
    return max(checkpoints(exp_dir), default=0)


def _checkpoint_path(exp_dir: str, epoch: int) -> str:
    return os.path.join(exp_dir, f"net-epoch-{epoch}.mat")


def _resume(exp_dir: str, resume: bool, kind: type, trainer: str, progress: bool) -> tuple[int, object, object, dict]:
    """``findLastCheckpoint`` + ``loadState``: ``(start, net, solverState, info)`` of the last checkpoint,
    even one past ``num_epochs`` (then nothing trains and it is returned), or ``(0, None, None, empty)``."""
    from .netio import load_checkpoint  # the .mat layer, imported lazily

    start = find_last_checkpoint(exp_dir) if resume else 0
    if start < 1:
        return 0, None, None, {"train": [], "val": []}
    path = _checkpoint_path(exp_dir, start)
    net, state, saved = load_checkpoint(path)
    if not isinstance(net, kind):
        other = "cnn_train_dag" if trainer == "cnn_train" else "cnn_train"
        raise ValueError(f"{path}: holds a {type(net).__name__}, not a {kind.__name__} (use {other})")
    if progress:
        print(f"{trainer}: resuming by loading epoch {start}")
    solver_state = state.get("solverState") if isinstance(state, dict) else None
    return start, net, solver_state, {mode: list(saved.get(mode, []))[:start] for mode in ("train", "val")}


def _multipliers(layer: dict, count: int, name: str) -> list[float]:
    values = np.asarray(layer.get(name, np.ones((1, count))), dtype=np.float64).reshape(-1)
    if values.size < count:
        raise ValueError(f"layer '{layer.get('name')}': {name} has {values.size} entries for {count} parameters")
    return [float(v) for v in values[:count]]


def prepare_net(net) -> SimpleNN:
    """``cnn_train``'s initialisation: tidy, precious predictions, default multipliers."""
    net = vl_simplenn_tidy(net)
    if len(net.layers) >= 2:
        net.layers[-2]["precious"] = True
    for layer in net.layers:
        count = len(layer.get("weights") or [])
        layer.setdefault("learningRate", np.ones((1, count)))
        layer.setdefault("weightDecay", np.ones((1, count)))
    return net


# ---------------------------------------------------------------------------
# The trainer state: the module, its parameters in MatConvNet order, momenta
# ---------------------------------------------------------------------------

class _Solver:
    """Parameters of a SimpleNN module in MatConvNet order with their momentum buffers."""

    def __init__(self, net: SimpleNN, module: SimpleNNModule, solver_state=None):
        self.entries = []  # (layer index, j, parameter, momentum, lr mult, decay mult)
        self.touched = set()  # (i, j) whose momentum an update has written (cnn_train leaves the others 0)
        # MatConvNet's shape of each weight, empty ones included (e.g. a conv without biases)
        self.shapes = [[np.shape(w) for w in cell_items(layer.get("weights"))] for layer in net.layers]
        for i, (layer, m) in enumerate(zip(net.layers, module.layers)):
            if isinstance(m, L.BatchNorm):
                params = [m.weight, m.bias, m.moments]
            elif isinstance(m, (L.Conv, L.ConvTranspose)):
                params = [m.weight, m.bias]
            else:
                continue
            lrs = _multipliers(layer, len(params), "learningRate")
            # cnn_train never reads weightDecay(3) of a bnorm (its moments have their own update), and
            # cnn_mnist_init's bnorm layers give two entries
            decays = _multipliers(layer, 2, "weightDecay") + [0.0] if isinstance(m, L.BatchNorm) else \
                _multipliers(layer, len(params), "weightDecay")
            for j, p in enumerate(params):
                if p is None:
                    continue
                saved = solver_state[i][j] if solver_state is not None and i < len(solver_state) \
                    and j < len(solver_state[i]) else None
                buf = _momentum(saved, p, lambda a, p=p: _from_matconvnet(a, p),
                                f"state.solverState{{{i + 1}}}{{{j + 1}}} (layer '{layer.get('name')}')")
                if saved is not None and np.size(saved) == p.numel() and np.size(saved) > 1:
                    self.touched.add((i, j))
                self.entries.append((i, j, p, buf, lrs[j], decays[j]))

    def step(self, module: SimpleNNModule, *, learning_rate, weight_decay, momentum, nesterov, grad_scale,
             batch_moments: dict | None = None):
        """One update from the accumulated ``.grad``; ``batch_moments`` {layer index: C x 2} overrides
        the moments the bnorm layers kept from their last forward pass (the sub-batches' average)."""
        plain = [e for e in self.entries if not (isinstance(module.layers[e[0]], L.BatchNorm) and e[1] == 2)]
        # the entries sgd_update changes: cnn_train's `thisLR > 0 || thisDecay > 0`
        self.touched.update((e[0], e[1]) for e in plain if learning_rate * e[4] > 0 or weight_decay * e[5] > 0)
        sgd_update([e[2] for e in plain], [e[2].grad for e in plain], [e[3] for e in plain],
                   [e[4] for e in plain], [e[5] for e in plain], learning_rate=learning_rate,
                   weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, grad_scale=grad_scale)
        with torch.no_grad():
            for i, j, p, _, lr_mult, _ in self.entries:
                m = module.layers[i]
                moments = (batch_moments or {}).get(i, getattr(m, "batch_moments", None))
                if isinstance(m, L.BatchNorm) and j == 2 and moments is not None:
                    p.mul_(1 - lr_mult).add_(lr_mult * moments)
        for e in self.entries:
            e[2].grad = None

    def solver_state(self) -> list[list[np.ndarray]]:
        """Momentum buffers as ``state.solverState{l}{j}``: one per weight of the layer (MATLAB's update
        reads ``solverState{l}{j}`` for every j), shaped as the weight once an update has written it,
        else cnn_train's initial double 0 (empty weights, batch-norm moments, frozen parameters)."""
        state = [[np.zeros((1, 1)) for _ in shapes] for shapes in self.shapes]
        for i, j, p, buf, _, _ in self.entries:
            while len(state[i]) <= j:  # a parameter the layer's weights do not list (defensive)
                state[i].append(np.zeros((1, 1)))
            if (i, j) in self.touched:
                like = np.empty(self.shapes[i][j]) if j < len(self.shapes[i]) else None
                state[i][j] = param_to_matconvnet(buf, like=like)
        return state


def _momentum(saved, like: torch.Tensor, convert: Callable, where: str) -> torch.Tensor:
    """A parameter's momentum buffer from its checkpoint entry (None: nothing saved): the saved array
    brought to the parameter's layout by ``convert``, the scalar the trainers start from, or zeros."""
    buf = torch.zeros_like(like)
    saved = None if saved is None else np.asarray(saved)
    if saved is None or not saved.size:
        return buf
    if saved.size == like.numel() and np.issubdtype(saved.dtype, np.number):
        return convert(saved)
    if saved.size == 1 and np.issubdtype(saved.dtype, np.number):
        return buf.fill_(float(saved.reshape(-1)[0]))  # cnn_train starts each buffer as the scalar 0
    raise ValueError(f"{where}: {saved.size} values for a parameter of {like.numel()}")


def _from_matconvnet(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A saved momentum buffer (MatConvNet layout) as a tensor shaped like its parameter."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if like.dim() == 4:
        t = hwcn_to_nchw(t, "solverState")
    return t.reshape(like.shape).to(device=like.device, dtype=like.dtype).contiguous()


# ---------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------

def _to_device_batch(images, labels, device, dtype):
    """get_batch's H x W x C x N images and labels -> N x C x H x W and N (or N x C x H x W) tensors."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = hwcn_to_nchw(x, "images").to(device=device, dtype=dtype, non_blocking=True).contiguous()
    c = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels, dtype=np.float64))
    n = x.shape[0]
    c = c.reshape(n) if c.numel() == n else hwcn_to_nchw(c, "labels")
    return x, c.to(device)


def _images_and_labels(batch):
    """What ``get_batch`` returned, checked: ``(images, labels)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"get_batch must return (images H x W x C x n, labels), got "
                         f"{type(batch).__name__}{f' of {len(batch)} values' if isinstance(batch, (tuple, list)) else ''}")
    return batch


def _errors(error_fn, prediction: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """A batch's error sums from ``error_fn(prediction, labels)`` (built in or the caller's), as a vector."""
    errors = torch.as_tensor(error_fn(prediction, labels), dtype=torch.float64, device=prediction.device)
    if errors.numel() != count:
        raise ValueError(f"error_function returned {errors.numel()} values for {count} error labels")
    return errors.reshape(-1)


def _indices(value, default: np.ndarray, name: str, count: int) -> np.ndarray:
    """cnn_train's ``train``/``val``: None or empty = the default set (MATLAB's isempty), NaN = none,
    else 1-based image indices."""
    if value is None or np.size(value) == 0:
        return default
    a = np.asarray(value)
    if a.size == 1 and np.issubdtype(a.dtype, np.floating) and np.isnan(a).all():
        return np.zeros(0, dtype=np.int64)  # MATLAB's opts.val = NaN: no validation
    if a.size and (not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all() or (a != np.round(a)).any()):
        raise ValueError(f"{name} must be 1-based image indices (integers), got {_shown(value)}")
    a = a.astype(np.int64).reshape(-1)
    if a.size and (a.min() < 1 or (count and a.max() > count)):
        raise ValueError(f"{name} indices must lie in 1..{count} (1-based, as in MATLAB), got {a.min()}..{a.max()}")
    return a


def _sub_batches(batch: np.ndarray, count: int) -> list[np.ndarray]:
    """cnn_train's sub-batch s of a batch: every ``count``-th image from the s-th (interleaved, not
    consecutive); empty ones are skipped, as cnn_train does when the last batch is short."""
    return [part for part in (batch[s::count] for s in range(count)) if part.size]


def _moments_term(moments: torch.Tensor, images: int, opts: dict) -> torch.Tensor:
    """One sub-batch's bnorm moments as the update sums them: master as they are (its update divides by
    numSubBatches), beta25 times the images (vl_simplenn's scaling; its update divides by batchSize)."""
    return moments if opts["normalise"] else moments * images


def _check_train_options(num_sub_batches, post_epoch_fn) -> None:
    if isinstance(num_sub_batches, bool) or not isinstance(num_sub_batches, Real) or not 1 <= num_sub_batches < np.inf \
            or num_sub_batches != int(num_sub_batches):  # a whole double, as from a .mat, is fine
        raise ValueError(f"num_sub_batches must be a positive integer, got {num_sub_batches!r}")
    if post_epoch_fn is not None and not callable(post_epoch_fn):
        raise ValueError(f"post_epoch_fn must be a function (net, params, state), got {type(post_epoch_fn).__name__}")


def _train_val(imdb: dict, train, val) -> tuple[np.ndarray, np.ndarray]:
    """The run's 1-based train / val indices, MATLAB's defaults: set 1 / set 2."""
    sets = np.asarray(imdb["images"]["set"]).reshape(-1)
    return (_indices(train, np.flatnonzero(sets == 1) + 1, "train", sets.size),
            _indices(val, np.flatnonzero(sets == 2) + 1, "val", sets.size))


def _epoch_orders(epoch: int, train, val, order, random_seed: int, epoch_size) -> tuple[np.ndarray, np.ndarray]:
    """This epoch's shuffled train (first ``epoch_size``) and val indices."""
    train_order = order(epoch, "train", train) if order else default_order(epoch, train, random_seed)
    train_order = np.asarray(train_order, dtype=np.int64).reshape(-1)
    if epoch_size is not None:
        train_order = train_order[:epoch_size]
    val_order = order(epoch, "val", val) if order else default_order(epoch, val, random_seed)
    return train_order, np.asarray(val_order, dtype=np.int64).reshape(-1)


# the run's options a postEpochFn sees in ``params`` (MATLAB's params: opts plus the epoch's values)
_POST_EPOCH_OPTIONS = ("batch_size", "num_sub_batches", "num_epochs", "weight_decay", "momentum", "exp_dir",
                       "imdb", "get_batch")


def _after_epoch(post_epoch_fn, net, state: dict, rates: np.ndarray, opts: dict,
                 **epoch_values) -> tuple[np.ndarray, bool]:
    """MATLAB's postEpochFn call -> (the learning rates from now on, whether to stop)."""
    params = {**epoch_values, "learning_rates": rates.copy(), **{k: opts[k] for k in _POST_EPOCH_OPTIONS}}
    new_rate = post_epoch_fn(copy.deepcopy(net), params, state)  # MATLAB passes values
    if new_rate is None:  # MATLAB: a function without an output, never checked
        return rates, False
    if np.size(new_rate):  # [] keeps the rate
        rates = _learning_rates(new_rate, "post_epoch_fn's learning rate")
    return rates, not rates.any()  # `if opts.learningRate == 0, break`


def _learning_rates(value, name: str) -> np.ndarray:
    """A learning rate or a schedule indexed by epoch, as a vector of finite numbers."""
    try:
        rates = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        rates = np.zeros(0)
    if not rates.size or not np.isfinite(rates).all():
        raise ValueError(f"{name} must be a finite number or a vector of them (one per epoch), got {_shown(value)}")
    return rates


def _shown(value) -> str:
    """A caller's value on one line for an error message (numpy's repr wraps long arrays)."""
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - whatever it is, its type still names it
        return type(value).__name__
    if a.dtype != object and a.ndim:
        return np.array2string(a.reshape(-1), threshold=8, edgeitems=3, max_line_width=10 ** 6, separator=", ")
    return " ".join(repr(value).split())[:80]


def _process_epoch(module: SimpleNNModule, solver: _Solver | None, imdb, get_batch, subset: np.ndarray,
                   *, mode: str, epoch: int, batch_size: int, learning_rate: float, opts: dict,
                   batch_callback=None, progress: bool = True) -> tuple[dict, np.ndarray | None]:
    """Train (or evaluate) over ``subset`` in batches: ``processEpoch`` of ``cnn_train.m``.

    A batch of ``num_sub_batches`` > 1 is run as that many interleaved sub-batches whose derivatives
    accumulate (vl_simplenn's ``accumulate``) before the one update of the batch.
    """
    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    error_fn, error_labels = opts["error_function"]
    training = mode == "train"
    module.train(training)
    norms = [(i, m) for i, m in enumerate(module.layers) if isinstance(m, L.BatchNorm)]
    totals = torch.zeros(1 + len(error_labels), dtype=torch.float64, device=device)
    num = 0
    start = time.perf_counter()
    last_labels = None
    batches = range(0, len(subset), batch_size)
    bar = tqdm(batches, desc=f"{mode} epoch {epoch:02d}", unit="batch", disable=not progress, leave=False)
    for b, t in enumerate(bar):
        batch = subset[t:t + batch_size]
        row = torch.zeros_like(totals)
        parts = _sub_batches(batch, opts["num_sub_batches"])
        moment_sums = {}  # bnorm layer -> the sub-batches' moments, summed as the update wants them
        for part in parts:
            images, labels = _images_and_labels(get_batch(imdb, part))
            x, c = _to_device_batch(images, labels, device, dtype)
            with torch.set_grad_enabled(training):
                prediction = module(x)
                objective = module.layer_forward(len(module.layers) - 1, prediction, c)
                if training:
                    objective.backward()  # accumulates into .grad across the sub-batches
            with torch.no_grad():
                # the loss layer divides by its images (master), so scale back to a sum
                part_sum = objective.detach() * (len(part) if opts["normalise"] else 1)
                errors = _errors(error_fn, prediction.detach(), c, len(error_labels)) if error_fn \
                    else prediction.new_zeros(0)
                row += torch.cat([part_sum.reshape(1).to(torch.float64), errors.to(torch.float64)])
                if training and opts["num_sub_batches"] > 1:
                    for i, m in norms:
                        moment_sums[i] = moment_sums.get(i, 0) + _moments_term(m.batch_moments, len(part), opts)
            last_labels = labels
        totals += row
        # master's accumulateGradients divides by numWorkers = numSubBatches (the loss layer already
        # divided by each sub-batch's images), counting empty sub-batches too; beta25 by batchSize
        divisor = opts["num_sub_batches"] if opts["normalise"] else len(batch)
        if training:
            solver.step(module, learning_rate=learning_rate, weight_decay=opts["weight_decay"],
                        momentum=opts["momentum"], nesterov=opts["nesterov_update"],
                        grad_scale=1.0 / divisor, batch_moments={i: v / divisor for i, v in moment_sums.items()})
        num += len(batch)
        if batch_callback is not None:
            values = (row / len(batch)).cpu().numpy()
            batch_callback(epoch, mode, b, dict(zip(("objective",) + error_labels, map(float, values))))
        if progress and (b % 10 == 0 or t + batch_size >= len(subset)):
            seconds = time.perf_counter() - start
            shown = (totals / max(num, 1)).cpu().numpy()
            bar.set_postfix({"Hz": f"{num / max(seconds, 1e-9):.0f}",
                             **{k: f"{v:.3f}" for k, v in zip(("objective",) + error_labels, shown)}})
    bar.close()
    # no images, no statistics: NaN (MATLAB leaves the fields out), never a perfect-looking 0
    values = (totals / num).cpu().numpy() if num else np.full(len(totals), np.nan)
    # in cnn_train's precision (so a resumed run reports the same numbers): [double objective; errors] is
    # single with the multiclass error's single counts, double with the binary one's or none
    stats = {name: float(np.float32(v)) if name in opts["single_stats"] else float(v)
             for name, v in zip(("objective",) + error_labels, values)}
    stats["num"] = num
    stats["time"] = time.perf_counter() - start
    return stats, last_labels


# ---------------------------------------------------------------------------
# cnn_train
# ---------------------------------------------------------------------------

def cnn_train(net, imdb: dict, get_batch: Callable, *, exp_dir: str, num_epochs: int = 300,
              batch_size: int = 256, epoch_size: int | None = None, learning_rate=0.001,
              weight_decay: float = 0.0005, momentum: float = 0.9, nesterov_update: bool = False,
              train=None, val=None, random_seed: int = 0, order: Callable | None = None,
              resume: bool = True, device="auto", error_function="multiclass", error_labels=None,
              normalise: bool = True, progress: bool = True, batch_callback: Callable | None = None,
              num_sub_batches: int = 1, post_epoch_fn: Callable | None = None,
              dtype: torch.dtype = torch.float32):
    """Train a SimpleNN with SGD exactly as MatConvNet's ``cnn_train`` -> ``(net, info)``.

    ``imdb`` is MATLAB's imdb as a dict (``imdb['images']['data']``
    H x W x C x n, ``['labels']``, ``['set']``); ``get_batch(imdb, batch)``
    returns ``(images H x W x C x b, labels)`` for 1-based indices ``batch``.
    ``train``/``val`` given as None or empty are, as in MATLAB, the indices
    with set 1 / set 2 (``cnn_mnist.m`` passes ``val`` = the set-3 indices);
    ``NaN`` means none -- with no training images the run only evaluates and
    writes no checkpoint (``cnn_train``'s evaluateMode).
    Indices are checked: 1-based, within the imdb.
    ``error_function`` is 'multiclass', 'binary', 'none' or a function
    ``(prediction N x C x H x W, labels) -> error sums`` (one per name in
    ``error_labels``, which also renames the built-in ones' statistics).
    ``learning_rate`` may be a vector indexed by epoch (the last entry holds
    afterwards). ``order(epoch, mode, indices)`` returns the 1-based indices
    in the order to use (default: :func:`default_order`); ``epoch_size``
    keeps the first ``epoch_size`` of the shuffled training indices.
    ``normalise=True`` is master (the loss layer divides by the batch size);
    ``False`` is v1.0-beta25 (the loss is summed and the update divides).
    ``batch_callback(epoch, mode, b, stats)`` sees every batch's statistics.
    ``num_sub_batches`` S splits each batch into S interleaved sub-batches
    (images s, s + S, s + 2S, ...) whose derivatives accumulate before the
    batch's one update, to fit memory. With ``normalise=True`` each sub-batch's
    loss divides by its own images and master's update divides by S, so the
    step follows the mean of the sub-batch mean gradients (and the bnorm
    moments the mean of the sub-batch moments), S counted even where a short
    last batch leaves sub-batches empty; with ``normalise=False`` (beta25) the
    step is exactly the whole batch's mean and the moments are weighted by
    images.
    ``post_epoch_fn(net, params, state)`` runs after each epoch's checkpoint
    (``net`` a copy of the trained SimpleNN, ``params`` the epoch's options
    as a dict, ``state`` with ``stats`` and ``solverState``) -- MATLAB's
    ``postEpochFn``. Returning ``None`` is MATLAB's function without an
    output: nothing changes. Otherwise an empty value keeps the learning
    rate, a number or vector replaces it from the next epoch on, and training
    stops when the rate is then 0 everywhere. The change is not saved: a
    resumed run starts again from ``learning_rate``, as in MATLAB.

    Checkpoints ``exp_dir/net-epoch-K.mat`` hold ``net``, ``state``
    (``solverState`` momentum buffers, ``stats``) and ``stats``, written
    atomically; with ``resume`` the last one is loaded and training continues
    as if never interrupted. ``info['train'][e-1]`` / ``info['val'][e-1]`` are
    dicts with ``objective``, ``top1err``, ``top5err``, ``num``, ``time``.
    """
    from .netio import save_checkpoint  # the .mat layer, imported lazily

    error_labels = None if error_labels is None or not len(error_labels) else [str(k) for k in error_labels]
    if callable(error_function):
        error = (error_function, tuple(error_labels or ()))
    elif error_function in ERROR_FUNCTIONS:
        error = ERROR_FUNCTIONS[error_function]
        error = (error[0], tuple(error_labels) if error_labels else error[1])
    else:
        raise ValueError(f"error_function must be one of {list(ERROR_FUNCTIONS)} or a function, got {error_function!r}")
    if error_labels and not callable(error_function) and len(error[1]) != len(ERROR_FUNCTIONS[error_function][1]):
        raise ValueError(f"error_labels: error_function {error_function!r} gives "
                         f"{len(ERROR_FUNCTIONS[error_function][1])} values, got {len(error[1])} labels")
    if len(error[1]) != len(set(error[1])) or {"objective", "num", "time"} & set(error[1]):
        raise ValueError(f"error_labels must be distinct names other than objective, num, time; got {error[1]}")
    _check_train_options(num_sub_batches, post_epoch_fn)
    single = ("objective",) + error[1] if error_function == "multiclass" else ()
    opts = dict(weight_decay=weight_decay, momentum=momentum, nesterov_update=nesterov_update,
                error_function=error, normalise=normalise, num_sub_batches=int(num_sub_batches),
                single_stats=single, batch_size=batch_size, num_epochs=num_epochs, exp_dir=exp_dir, imdb=imdb,
                get_batch=get_batch)
    device = resolve_device(device)
    os.makedirs(exp_dir, exist_ok=True)
    train, val = _train_val(imdb, train, val)
    # cnn_train's evaluateMode: nothing to train, so nothing is saved (a checkpoint written now
    # would be taken for a trained epoch by the next run in exp_dir)
    evaluate_mode = train.size == 0
    rates = _learning_rates(learning_rate, "learning_rate")

    # 1. the net, as cnn_train prepares it
    net = prepare_net(net)

    # 2. resume from the last complete checkpoint
    start, saved_net, solver_state, info = _resume(exp_dir, resume, SimpleNN, "cnn_train", progress)
    if start:
        net = prepare_net(saved_net)

    module = net.to_torch(device=device, dtype=dtype)
    for m in module.layers:
        if isinstance(m, L.SoftMaxLoss):
            m.normalise = normalise
        elif isinstance(m, L.Loss):
            m.options["normalise"] = normalise
    try:
        solver = _Solver(net, module, solver_state)
    except ValueError as e:  # a checkpoint whose momenta do not fit its net: name the file
        raise ValueError(f"{_checkpoint_path(exp_dir, start)}: {e}" if solver_state is not None else str(e)) from None

    # 3. epochs
    with exact_fp32():
        for epoch in range(start + 1, num_epochs + 1):
            lr = float(rates[min(epoch, rates.size) - 1])
            train_order, val_order = _epoch_orders(epoch, train, val, order, random_seed, epoch_size)

            train_stats, _ = _process_epoch(module, solver, imdb, get_batch, train_order, mode="train",
                                            epoch=epoch, batch_size=batch_size, learning_rate=lr, opts=opts,
                                            batch_callback=batch_callback, progress=progress)
            with torch.no_grad():
                val_stats, last_labels = _process_epoch(module, None, imdb, get_batch, val_order, mode="val",
                                                        epoch=epoch, batch_size=batch_size, learning_rate=lr,
                                                        opts=opts, batch_callback=batch_callback,
                                                        progress=progress)
            info["train"].append(train_stats)
            info["val"].append(val_stats)

            # 4. checkpoint, as cnn_train's saveState writes it
            net.load_torch_weights(module)
            if last_labels is not None:  # cnn_train leaves the last batch's labels in the loss layer
                net.layers[-1]["class"] = np.asarray(last_labels, dtype=np.float64)
            state = {"solverState": solver.solver_state(),
                     "stats": {"train": train_stats, "val": val_stats}}
            if not evaluate_mode:
                save_checkpoint(_checkpoint_path(exp_dir, epoch), net, state, info, single_stats=single)
            if progress:
                print(f"epoch {epoch:02d}: train objective {train_stats['objective']:.4f} "
                      + " ".join(f"{k} {train_stats[k]:.4f}" for k in error[1])
                      + f" | val objective {val_stats['objective']:.4f} "
                      + " ".join(f"{k} {val_stats[k]:.4f}" for k in error[1])
                      + f" | {train_stats['num'] / max(train_stats['time'], 1e-9):.0f} images/s")
            if post_epoch_fn is not None:
                rates, stop = _after_epoch(post_epoch_fn, net, state, rates, opts, epoch=epoch, learning_rate=lr,
                                           train=train_order, val=val_order)
                if stop:
                    break
    net.load_torch_weights(module)
    return net, info


# ---------------------------------------------------------------------------
# python -m matconvnet_port.train: the MNIST baseline, as examples/mnist/cnn_mnist.m
# ---------------------------------------------------------------------------

# cnn_train.m's option names -> cnn_train's keywords
_MATLAB_OPTIONS = {"expDir": "exp_dir", "continue": "resume", "batchSize": "batch_size",
                   "numSubBatches": "num_sub_batches", "train": "train", "val": "val", "numEpochs": "num_epochs",
                   "learningRate": "learning_rate", "weightDecay": "weight_decay", "momentum": "momentum",
                   "nesterovUpdate": "nesterov_update", "randomSeed": "random_seed", "epochSize": "epoch_size",
                   "errorFunction": "error_function", "errorLabels": "error_labels", "postEpochFn": "post_epoch_fn",
                   "derOutputs": "der_outputs"}  # the last for cnn_train_dag
_MATLAB_COUNTS = {"batchSize", "numSubBatches", "numEpochs", "randomSeed", "epochSize"}
# options that only steer MATLAB's machinery (plots, profiling, multi-GPU plumbing, memory): no effect here
_MATLAB_NO_EFFECT = {"prefetch", "conserveMemory", "sync", "cudnn", "plotDiagnostics", "plotStatistics", "profile",
                     "memoryMapFile", "parameterServer", "saveSolverState"}


def options_from_matlab(opts) -> dict:
    """``cnn_train``'s keywords from MATLAB's option struct or name/value list (e.g. ``net.meta['trainOpts']``).

    ``cnn_train(net, imdb, get_batch, **options_from_matlab(net.meta['trainOpts']), exp_dir=...)``
    ports ``cnn_train(net, imdb, getBatch, net.meta.trainOpts, 'expDir', ...)``. 1 x 1 arrays become
    numbers, ``epochSize`` inf becomes None, ``gpus`` [] becomes ``device='cpu'`` (one GPU k:
    ``'cuda:k-1'``); ``derOutputs`` is for :func:`matconvnet_port.train_dag.cnn_train_dag`.
    Options that only steer MATLAB's machinery (plots, prefetching, memory, profiling) are dropped.
    ValueError (one line, naming the option) for an unknown name, or for one this port does not
    implement with a value that would matter: several GPUs, a ``solver``, a finite ``backPropDepth``,
    ``saveSolverState`` false. As MATLAB's ``vl_argparse``, a list may mix name/value pairs and
    structs (dicts), later values winning; to override one afterwards, merge:
    ``{**options_from_matlab(trainOpts), 'num_epochs': 1}``. Cells read from a .mat (object
    arrays, e.g. ``errorLabels``, ``derOutputs``) become lists.
    """
    merged: dict = {}
    items = list(opts) if isinstance(opts, (list, tuple)) else [opts]
    while items:
        item = items.pop(0)
        if isinstance(item, dict):
            merged.update(item)
        elif isinstance(item, str) and items:
            merged[item] = items.pop(0)
        else:
            raise ValueError(f"MATLAB options must be name/value pairs or structs, got {_shown(item)}")
    out = {}
    for name, value in merged.items():
        if isinstance(value, np.ndarray) and value.dtype == object:  # a cell: its items, in MATLAB's order
            value = [v.reshape(-1)[0].item() if isinstance(v, np.ndarray) and v.dtype != object and v.size == 1
                     else v for v in value.reshape(-1, order="F")]
        if isinstance(value, np.ndarray) and value.dtype != object and value.size == 1:
            value = value.reshape(-1)[0].item()
        if isinstance(value, np.ndarray) and value.size == 0:
            value = None  # MATLAB's [], the option's default
        if name in _MATLAB_OPTIONS:
            if name == "epochSize" and value is not None and not np.isfinite(value):
                value = None
            if name in _MATLAB_COUNTS and isinstance(value, float) and value.is_integer():
                value = int(value)  # MATLAB's doubles, where Python wants an int (range, slicing)
            if value is not None:
                out[_MATLAB_OPTIONS[name]] = value
        elif name == "gpus":
            count = 0 if value is None else np.size(value)
            if count > 1:
                raise ValueError(f"gpus: {count} GPUs; this port trains on one device (give one GPU or [])")
            # MATLAB's gpuDevice(k) is 1-based
            out["device"] = f"cuda:{int(np.asarray(value).reshape(-1)[0]) - 1}" if count else "cpu"
        elif name == "solver":
            if value is not None:
                raise ValueError("solver: only cnn_train's default SGD (solver []) is implemented")
        elif name == "backPropDepth":
            if value is not None and np.isfinite(value):
                raise ValueError(f"backPropDepth: only +inf (the whole network) is implemented, got {value}")
        elif name == "saveSolverState":
            if value is not None and not value:
                raise ValueError("saveSolverState: checkpoints always hold the momenta (true) here")
        elif name not in _MATLAB_NO_EFFECT:
            raise ValueError(f"{name!r} is not a cnn_train / cnn_train_dag option this port takes "
                             f"(known: {', '.join(sorted(_MATLAB_OPTIONS))}, ...)")
    return out


def mnist_get_batch(imdb: dict, batch: np.ndarray):
    """``getSimpleNNBatch`` of ``cnn_mnist.m``: images and labels of 1-based indices."""
    return imdb["images"]["data"][:, :, :, batch - 1], imdb["images"]["labels"][:, batch - 1]


def _check_options(args) -> None:
    """The command line's numbers, each a one-line error naming its option."""
    if args.input_size < 28 or args.input_size % 4:
        raise ValueError(f"--input-size must be >= 28 and divisible by 4 (the LeNet needs it), got {args.input_size}")
    for name, value, low, high in (("--epochs", args.epochs, 1, None), ("--batch-size", args.batch_size, 1, None),
                                   ("--train-subset", args.train_subset, 1, 60000),
                                   ("--val-subset", args.val_subset, 1, 10000), ("--seed", args.seed, 0, 2 ** 63 - 1)):
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(f"{name} must be {'>= ' + str(low) if high is None else f'in {low}..{high}'}, got {value}")
    for name, value, low, high in (("--learning-rate", args.learning_rate, 0, None),
                                   ("--weight-decay", args.weight_decay, 0, None), ("--momentum", args.momentum, 0, 1)):
        if not np.isfinite(value) or value < low or (high is not None and value >= high) or \
                (name == "--learning-rate" and value == 0):
            bound = "> 0" if name == "--learning-rate" else (">= 0" if high is None else f"in [{low}, {high})")
            raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def _open_exp_dir(exp_dir: str, options: dict, fresh: bool, defaults: dict) -> None:
    """Record the run's options in exp_dir/options.json; refuse a folder trained with other options
    (its checkpoints would be resumed as if they were this run's); with ``fresh``, remove its checkpoints."""
    import json
    import sys

    os.makedirs(exp_dir, exist_ok=True)
    path = os.path.join(exp_dir, "options.json")
    if fresh:
        for name in checkpoints(exp_dir).values():
            os.remove(name)
    elif os.path.isfile(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not readable ({e}); use --no-resume to start over") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{path}: not an options record; use --no-resume to start over")
        # an option this file predates is compared as the value the run had then: its default
        diff = [f"--{k.replace('_', '-')} {stored.get(k, defaults.get(k))!r} vs {v!r}" for k, v in options.items()
                if stored.get(k, defaults.get(k)) != v]
        if diff and find_last_checkpoint(exp_dir):
            raise ValueError(f"{exp_dir} holds a run with other options ({'; '.join(diff)}): use the same options, "
                             f"another --exp-dir, or --no-resume to start over")
    elif find_last_checkpoint(exp_dir):
        print(f"note: {exp_dir} has checkpoints but no options.json (an older run): resuming them unchecked",
              file=sys.stderr)
    atomic_write_text(path, json.dumps(options, indent=2) + "\n")


def main(argv=None) -> int:
    import argparse
    import sys

    from .models import cnn_mnist_init, mask_name, parse_mask
    from .mnist import default_data_dir, get_mnist_imdb

    parser = argparse.ArgumentParser(
        prog="python -m matconvnet_port.train",
        description="Train MatConvNet's MNIST LeNet (cnn_mnist_init) with cnn_train's defaults, "
                    "as examples/mnist/cnn_mnist.m does. Checkpoints are MatConvNet .mat files.")
    parser.add_argument("--mask", default="C C CR C", help="ReLU placement, e.g. 'C CR C CR' or 0101 "
                        "(conv1 first); default: stock MatConvNet 'C C CR C'")
    parser.add_argument("--input-size", type=int, default=28, help="resize the digits to N x N (default 28)")
    parser.add_argument("--resize", default="imresize", choices=["imresize", "bilinear", "nearest", "pad"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.001)
    parser.add_argument("--weight-decay", type=float, default=0.0005)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-normalization", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and shuffling")
    parser.add_argument("--train-subset", type=int, help="use the first n training images")
    parser.add_argument("--val-subset", type=int, help="use the first n test images for validation")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--data-dir", help="folder with the IDX files (default: the vendored MNIST)")
    parser.add_argument("--exp-dir", default=None,
                        help="checkpoint folder (default runs/<dataset>-<mask bits>-N<size>[-seed<s>]); it records "
                             "the run's options, and a rerun with other ones is refused")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    args = parser.parse_args(argv)
    try:
        mask = parse_mask(args.mask)
        _check_options(args)
        device = resolve_device(args.device)
        exp_dir = args.exp_dir or os.path.join(
            "runs", f"{args.dataset}-{''.join(map(str, mask))}-N{args.input_size}"
            + (f"-seed{args.seed}" if args.seed else ""))
        imdb = get_mnist_imdb(input_size=args.input_size, resize=args.resize, data_dir=args.data_dir,
                              dataset=args.dataset, train_subset=args.train_subset, val_subset=args.val_subset)
        # what the run trains on, as values that mean one thing (after the data loaded: a failed start
        # neither records options nor, with --no-resume, removes the folder's checkpoints)
        options = {k: v for k, v in vars(args).items() if k not in ("epochs", "exp_dir", "device", "no_resume")}
        options.update(mask="".join(map(str, mask)), train_subset=args.train_subset or 60000,
                       val_subset=args.val_subset or 10000,
                       data_dir=os.path.realpath(args.data_dir or default_data_dir(args.dataset)),
                       resize=args.resize if args.input_size != 28 else None)  # 28: the digits as they are
        defaults = {k: parser.get_default(k) for k in options}
        try:
            _open_exp_dir(exp_dir, options, fresh=args.no_resume, defaults=defaults)
        except OSError as e:
            raise OSError(f"--exp-dir {exp_dir}: cannot write there ({e.strerror or e})") from None
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started", file=sys.stderr)
        return 130
    print(f"cnn_train: {mask_name(mask)} at {args.input_size}x{args.input_size} on {device}, "
          f"{args.epochs} epochs, checkpoints in {exp_dir}")
    net = cnn_mnist_init(mask, batch_normalization=args.batch_normalization, seed=args.seed)
    try:
        val = np.flatnonzero(np.asarray(imdb["images"]["set"]).reshape(-1) == 3) + 1  # as cnn_mnist.m passes it
        _, info = cnn_train(net, imdb, mnist_get_batch, exp_dir=exp_dir, num_epochs=args.epochs, val=val,
                            batch_size=args.batch_size, learning_rate=args.learning_rate,
                            weight_decay=args.weight_decay, momentum=args.momentum,
                            random_seed=args.seed, resume=not args.no_resume, device=device)
    except KeyboardInterrupt:
        again = "rerun the command without --no-resume" if args.no_resume else "rerun the same command"
        print(f"\ninterrupted: {again} to resume from the last checkpoint in {exp_dir}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # e.g. a damaged checkpoint in exp_dir, named by the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info["val"]:
        last = info["val"][-1]
        print(f"final: val objective {last['objective']:.4f}, top1err {last['top1err']:.4f}, "
              f"top5err {last['top5err']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
