"""Several MNIST LeNets with different ReLU masks, trained as one network.

The study trains the same LeNet under 16 ReLU placements on the same data
order. Stacked along the channel axis they form *one* MatConvNet network
with filter groups: conv1 sees the shared input and produces M*20 channels
(M models), conv2..conv4 are grouped convolutions with M groups (exactly
``vl_nnconv``'s groups, :func:`matconvnet_port.functional.conv`), and the
ReLU after conv i is a ReLU with a per-channel leak: 0 for the models that
have it, 1 (identity) for the others. The models never mix: the loss is the
sum of the M per-model ``softmaxloss`` values, so each model receives exactly
its own gradient, and :func:`matconvnet_port.train.sgd_update` (cnn_train's
update) is elementwise. The same function as training each model alone with
:func:`matconvnet_port.train.cnn_train`; the numbers agree up to float32
rounding, which runs in another order (tests pin each model's weights after
training within 1e-3 of cnn_train's, 1e-4 for the per-model loop).

For speed: images and filters are stored transposed (N x C x W x H, which is
MATLAB's own memory order), so max pooling's row-major tie rule *is*
MatConvNet's column-major one and no layer transposes anything; each model's
ReLUs are applied by :func:`~matconvnet_port.functional.channel_relu` on
contiguous channel runs; data live on the device, a training step never synchronises with
the host (statistics accumulate on the device and are read once per epoch),
and on CUDA a whole step (forward, backward, update) is captured once as a
CUDA graph and replayed (the epoch loops also exist as generators that yield
between batches, :meth:`FusedTrainer.train_epoch_steps`, so that the search can
run several trainers side by side on CUDA streams: :mod:`matconvnet_port.search.lanes`).
Where the 2x2 pooling windows tile the map, each
max pooling runs before its ReLU (they commute exactly: values, ties and NaN
under MatConvNet's rules, and the derivatives of any finite dzdy; a non-finite
dzdy, which only a model whose scores are already NaN sees, may leave its NaN
in another place), so the ReLU touches a quarter of the numbers.

How the layers run is a *plan* (same maths, different speed per device):
``memory_format`` 'nchw' or 'nhwc' (channels-last activations and filters),
``conv`` per layer -- 'grouped' (one grouped convolution of the library:
cuDNN / oneDNN), 'loop' (M dense convolutions of the library, each model's
slice in NCHW order, where its kernels are most complete), 'streams' (the
same on CUDA, spread over :data:`STREAMS` CUDA streams so that small
per-model kernels run side by side; 'loop' elsewhere), 'gemm_wgrad' (the
library's grouped convolution, its filter derivative by im2col + GEMM), 'gemm'
(:func:`matconvnet_port.functional.conv_gemm`: im2col + batched matrix
products; conv1's product serves every model at once) -- models per pass,
and ``compose`` (conv3 and the 1x1 conv4 as one linear layer where no ReLU
separates them, by im2col + GEMM, :func:`matconvnet_port.functional.linear_pair_gemm`,
or by the library's convolution, :func:`~matconvnet_port.functional.linear_pair_conv`).
:func:`default_plan` is the measured CPU choice; :func:`autotune_plan` times
candidates (the search does on CUDA).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import functional as fn
from .models import CONV_SHAPES
from .train import default_order, error_multiclass, sgd_update

__all__ = ["FusedLeNet", "FusedTrainer", "EpochStats", "LAYER_IMPLS", "MEMORY_FORMATS", "COMPOSE_METHODS",
           "compose_method", "parse_conv",
           "plan_label", "build", "default_plan", "candidate_plans", "time_plan", "autotune_plan",
           "keep_freed_memory", "Backlog", "run_to_end"]

LAYER_IMPLS = ("grouped", "loop", "streams", "gemm", "gemm_wgrad")
# CUDA streams that the 'streams' layers spread their models over
STREAMS = 4
MEMORY_FORMATS = ("nchw", "nhwc")
# how a plan composes conv3 and conv4 (True, in plans saved before 'library' existed, means 'gemm')
COMPOSE_METHODS = ("gemm", "library")
NUM_CLASSES = 10


class FusedLeNet(nn.Module):
    """M LeNets (``cnn_mnist_init`` without batch norm) differing only in their ReLU masks.

    ``masks``: M masks of 4 bits (ReLU after conv1..4). ``weights``: either
    one list of four ``[filters, biases]`` pairs in MatConvNet layout (shared
    start for all M models, as the study uses) or M such lists. ``conv``: a
    layer implementation for all layers or four (:data:`LAYER_IMPLS`,
    :func:`parse_conv`); ``memory_format``: 'nchw' or 'nhwc' (channels-last);
    ``compose``: False, or how (:data:`COMPOSE_METHODS`; True is 'gemm'), in
    training, conv3 and conv4 of the models without a ReLU between them run as
    one composed linear layer (same function and derivatives; evaluation
    always runs the layers one by one).
    ``forward(x)`` maps B x 1 x N x N images, stored transposed (see
    :meth:`prepare_images`), to B x (M*10) x w x h scores (model m owns
    channels ``m*10 .. m*10+9``; the spatial map is transposed too, which no
    statistic of the study depends on).
    """

    def __init__(self, masks: Sequence[Sequence[int]], weights, *, conv="grouped", memory_format: str = "nchw",
                 compose: bool | str = False):
        super().__init__()
        self.compose = compose_method(compose)
        self._subsets: dict = {}
        self._streams: dict = {}
        layer_impls = parse_conv(conv)
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        self.masks = [tuple(int(b) for b in m) for m in masks]
        self.num_models = len(self.masks)
        self.conv = layer_impls
        self.memory_format = memory_format
        layout = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
        per_model = weights if isinstance(weights[0][0], (list, tuple)) else [weights] * self.num_models
        if len(per_model) != self.num_models:
            raise ValueError(f"got weights for {len(per_model)} models and {self.num_models} masks")
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, shape in enumerate(CONV_SHAPES):
            fs, bs = [], []
            for model_weights in per_model:
                f = np.asarray(model_weights[i][0], np.float32)
                f = f.reshape(f.shape + (1,) * (4 - f.ndim))
                if f.shape != shape:
                    raise ValueError(f"conv{i + 1} filters must be {shape}, got {f.shape}")
                # FH x FW x FC x K -> K x FC x FW x FH: the filter of the transposed image
                fs.append(torch.from_numpy(np.ascontiguousarray(f.transpose(3, 2, 1, 0))))
                b = np.asarray(model_weights[i][1], np.float32).reshape(-1)
                bs.append(torch.from_numpy(b if b.size else np.zeros(shape[3], np.float32)))
            self.weights.append(nn.Parameter(torch.cat(fs).contiguous(memory_format=layout)))
            self.biases.append(nn.Parameter(torch.cat(bs)))
        # which output channels of conv i are followed by a ReLU (model m's bit i)
        self.rectified = [[bool(m[i]) for m in self.masks for _ in range(shape[3])]
                          for i, shape in enumerate(CONV_SHAPES)]

    @staticmethod
    def prepare_images(images: torch.Tensor) -> torch.Tensor:
        """B x 1 x H x W images -> the model's storage order (B x 1 x W x H, contiguous)."""
        return images.transpose(2, 3).contiguous()

    def parameters_in_matconvnet_order(self) -> list[nn.Parameter]:
        """[f1, b1, f2, b2, f3, b3, f4, b4], the order of cnn_train's parameters."""
        return [p for pair in zip(self.weights, self.biases) for p in pair]

    def _filters(self, i: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (first, last) == (0, self.num_models):  # the parameters themselves: a slice would cost
            return self.weights[i], self.biases[i]   # a zero fill and a copy in backward
        k = CONV_SHAPES[i][3]
        return self.weights[i][first * k:last * k], self.biases[i][first * k:last * k]

    def _conv(self, i: int, x: torch.Tensor, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """conv i+1 of the models whose filters are f, b, by this layer's implementation."""
        k = CONV_SHAPES[i][3]
        count = f.shape[0] // k
        if self.conv[i] in ("gemm", "gemm_wgrad"):
            return fn.conv_gemm(x, f, b, library_forward=self.conv[i] == "gemm_wgrad")
        if self.conv[i] == "grouped" or i == 0 or count == 1:
            return fn.conv(x, f, b)
        # Each model's slice as a dense NCHW tensor (for float32 cuDNN converts channels-last to
        # NCHW internally anyway, its kernels for that order): all models reordered in one copy each
        # way, then unbind/split/stack, whose derivatives are one stack, cat or unbind (slicing per
        # model would zero and fill a full-size derivative per model); the biases of all models are
        # added on the way back to batch-major order.
        xs = _ModelMajor.apply(x, count).unbind(0)
        fs = f.contiguous().split(k)
        if self.conv[i] == "streams" and x.is_cuda:
            ys = self._on_streams(xs, fs)
        else:
            ys = [fn.conv(xs[m], fs[m]) for m in range(count)]
        return _BatchMajorPlusBias.apply(torch.stack(ys), b)

    def _on_streams(self, xs, fs) -> list[torch.Tensor]:
        """The models' convolutions on :data:`STREAMS` side streams forked from and joined back
        to the current one (a CUDA graph captures them as parallel branches). Autograd runs
        each backward on its forward's stream and synchronises the streams itself."""
        current = torch.cuda.current_stream()
        streams = self._streams.setdefault(current.device, [torch.cuda.Stream(current.device)
                                                            for _ in range(STREAMS)])
        for stream in streams:
            stream.wait_stream(current)
        ys = []
        for m, (x, f) in enumerate(zip(xs, fs)):
            stream = streams[m % len(streams)]
            with torch.cuda.stream(stream):
                ys.append(fn.conv(x, f))
            # memory made on one stream and used on another: the caching allocator must not
            # hand it out again before the other stream is done (under capture it defers that)
            x.record_stream(stream)
            f.record_stream(stream)
            ys[-1].record_stream(current)
        for stream in streams:
            current.wait_stream(stream)
        return ys

    def forward(self, x: torch.Tensor, relu_hook=None, models: tuple[int, int] | None = None) -> torch.Tensor:
        """Scores of models ``first..last-1`` (default all): B x ((last-first)*10) x w x h.

        ``relu_hook(i, y)`` sees the output of the (partial) ReLU after conv i+1.
        """
        first, last = models or (0, self.num_models)
        for i in range(4):
            if i == 2 and self.compose and self.training:
                return self._composed_tail(x, first, last)
            fh, fw, _, k = CONV_SHAPES[i]
            rectified = self.rectified[i][first * k:last * k]
            # When the 2x2 windows tile the map, max pooling and ReLU commute exactly -- values,
            # and MatConvNet's derivatives of a finite dzdy with its tie rule (a window with a
            # positive maximum picks the same first maximum either way; one without gets
            # derivative 0 either way) -- so the ReLU touches a quarter of the numbers. Transposed storage:
            # row-major ties here are MatConvNet's column-major ones.
            pool_first = i < 2 and (x.shape[2] - fh + 1) % 2 == 0 and (x.shape[3] - fw + 1) % 2 == 0
            if pool_first and self.conv[i] == "gemm":  # pooled inside the product's cache-sized blocks
                x = fn.conv_gemm(x, *self._filters(i, first, last), max_pool=True)
            else:
                x = self._conv(i, x, *self._filters(i, first, last))
                if pool_first:
                    x = fn.pool(x, 2, stride=2, method="max", tie_order="row")
            x = fn.channel_relu(x, rectified)
            if relu_hook is not None:
                # a channel is positive somewhere before pooling iff after it (tiled windows)
                relu_hook(i, x)
            if i < 2 and not pool_first:
                x = fn.pool(x, 2, stride=2, method="max", tie_order="row")
        return x

    def _subset(self, first: int, last: int, device) -> tuple:
        """Models of first..last-1 regrouped, those with the ReLU after conv3 first, then those
        without: (their count in each part, and channel permutations to the regrouped order of
        conv3's input, conv3's and conv4's filters, and of the scores -- each with its inverse)."""
        key = (first, last, str(device))
        if key not in self._subsets:
            plain = [m for m in range(first, last) if self.masks[m][2]]
            linear = [m for m in range(first, last) if not self.masks[m][2]]

            def regrouped(k):
                order = torch.tensor([(m - first) * k + j for m in plain + linear for j in range(k)], device=device)
                return order, torch.argsort(order)

            c3, k3, k4 = CONV_SHAPES[2][2], CONV_SHAPES[2][3], CONV_SHAPES[3][3]
            to4, from4 = regrouped(k4)
            self._subsets[key] = (len(plain), len(linear), regrouped(c3), regrouped(k3), (to4, from4),
                                  (from4, to4))  # the scores go back to model order
        return self._subsets[key]

    def _composed_tail(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """conv3 [ReLU] conv4 [ReLU] of models first..last-1 in training: where no ReLU follows
        conv3, conv3 and the 1x1 conv4 are one linear map, computed as one composed layer
        (:func:`~matconvnet_port.functional.linear_pair_gemm` or
        :func:`~matconvnet_port.functional.linear_pair_conv`, as ``compose`` says: same function
        and derivatives, without the cost of the 500-channel middle); the other models run as usual. The two
        parts are regrouped by one channel permutation per tensor (one gather each way)."""
        plain, linear, p3, pf3, pf4, back = self._subset(first, last, x.device)
        c3, n3, n4 = CONV_SHAPES[2][2], CONV_SHAPES[2][3], CONV_SHAPES[3][3]

        def parts_of(t, dim, perm, width):  # split, not sliced: one cat joins the parts' derivatives
            return _Permute.apply(t, dim, *perm).split([plain * width, linear * width], dim=dim)

        xs = parts_of(x, 1, p3, c3)
        f3, b3 = (parts_of(t, 0, pf3, n3) for t in self._filters(2, first, last))
        f4, b4 = (parts_of(t, 0, pf4, n4) for t in self._filters(3, first, last))
        parts = []
        if plain:
            y = self._conv(2, xs[0], f3[0], b3[0])
            y = fn.relu(y)  # every model of this part has the ReLU after conv3
            parts.append(self._conv(3, y, f4[0], b4[0]))
        if linear:
            pair = fn.linear_pair_conv if self.compose == "library" else fn.linear_pair_gemm
            parts.append(pair(xs[1], f3[1], b3[1], f4[1], b4[1]))
        scores = _Permute.apply(torch.cat(parts, 1) if len(parts) > 1 else parts[0], 1, *back)
        return fn.channel_relu(scores, self.rectified[3][first * n4:last * n4])

    def model_weights(self, m: int) -> list[list[np.ndarray]]:
        """Model m's four [filters, biases] pairs in MatConvNet layout (FH x FW x FC x K, 1 x K)."""
        out = []
        for i, shape in enumerate(CONV_SHAPES):
            k = shape[3]
            f = self.weights[i][m * k:(m + 1) * k].detach().cpu().permute(3, 2, 1, 0).numpy().copy()
            b = self.biases[i][m * k:(m + 1) * k].detach().cpu().numpy().reshape(1, k).copy()
            out.append([f, b])
        return out


class _ModelMajor(torch.autograd.Function):
    """B x (M*c) x H x W <-> M x B x c x H x W, contiguous either way: one copy, whose derivative is
    the copy back -- every model's slice as a dense NCHW tensor, for per-model convolutions."""

    @staticmethod
    def forward(ctx, t, count):
        ctx.count = count
        return _swap_model_axis(t, count)

    @staticmethod
    def backward(ctx, grad):
        return _swap_model_axis(grad, ctx.count), None


class _BatchMajorPlusBias(torch.autograd.Function):
    """M x B x k x H x W per-model outputs -> B x (M*k) x H x W (contiguous) plus the M*k biases, in
    one pass; backward: the derivative back in model-major order, and the biases' in one sum."""

    @staticmethod
    def forward(ctx, t, b):
        count, n, k, h, w = t.shape
        out = t.new_empty(n, count, k, h, w)
        torch.add(t.transpose(0, 1), b.reshape(1, count, k, 1, 1), out=out)
        ctx.count = count
        return out.flatten(1, 2)

    @staticmethod
    def backward(ctx, grad):
        return _swap_model_axis(grad, ctx.count), grad.sum((0, 2, 3))


def _swap_model_axis(t: torch.Tensor, count: int) -> torch.Tensor:
    if t.dim() == 4:
        return t.unflatten(1, (count, t.shape[1] // count)).transpose(0, 1).contiguous()
    return t.transpose(0, 1).flatten(1, 2).contiguous()


class _Permute(torch.autograd.Function):
    """``t.index_select(dim, order)`` for a permutation ``order`` of that axis: its derivative is the
    inverse permutation's gather (index_select's own backward scatters onto zeros)."""

    @staticmethod
    def forward(ctx, t, dim, order, inverse):
        ctx.dim, ctx.inverse = dim, inverse
        return t.index_select(dim, order)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(ctx.dim, ctx.inverse), None, None, None


def per_model(scores: torch.Tensor, num_models: int) -> torch.Tensor:
    """B x (M*10) x h x w -> (M*B) x 10 x h x w, model-major (model m's images are rows m*B..)."""
    b, _, h, w = scores.shape
    return scores.reshape(b, num_models, NUM_CLASSES, h, w).transpose(0, 1).reshape(num_models * b, NUM_CLASSES, h, w)


def labels_per_model(index: torch.Tensor, num_models: int) -> torch.Tensor:
    """B class indices -> (M*B) x 1 x 1 x 1, matching :func:`per_model`'s rows."""
    b = index.numel()
    return index.reshape(1, b).expand(num_models, b).reshape(num_models * b, 1, 1, 1)


def model_totals(losses: torch.Tensor, scores_pm: torch.Tensor, index_pm: torch.Tensor,
                 num_models: int) -> torch.Tensor:
    """Per-model sums over the batch: 3 x M rows [loss, top-1 errors, top-5 errors] (cnn_train's counts)."""
    errors = error_multiclass(scores_pm, index_pm + 1, per_image=True)  # 2 x M*B
    return torch.cat([losses.reshape(1, num_models, -1), errors.reshape(2, num_models, -1)]).sum(2)


@dataclass
class EpochStats:
    """Per-model statistics of one pass (numpy arrays of length M)."""

    objective: np.ndarray
    top1err: np.ndarray
    top5err: np.ndarray
    num: int
    seconds: float
    image_err: np.ndarray | None = None
    dead_relu: dict = field(default_factory=dict)  # conv index (1..4) -> array (nan for models without it)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    PyTorch's CPU allocator hands large tensors back to glibc, which unmaps
    them; the next step maps and zero-fills them again, and on small
    machines those page faults cost as much as the arithmetic of LeNet's
    elementwise layers. Keeping the heap (``M_MMAP_MAX = 0``,
    ``M_TRIM_THRESHOLD`` huge) removes them; the process keeps its peak
    memory (up to 2 GiB of free heap top). Linux/glibc only; returns whether it applied.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        # mallopt takes a C int: the largest one (a bigger Python int wrapped to 0 = trim everything)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# CUDA batches a trainer keeps queued ahead of the device when run side by side with others: at
# N = 28 on an H100 about 0.1 s of work, which covers the host's pauses in another lane (reading an
# epoch's statistics back, an evaluation's launches); 32 graph replays stay far from CUDA's queue limit
BACKLOG = 32


class Backlog:
    """What a trainer's step generators yield: the CUDA event to wait for before resuming them.

    After queueing a batch, :meth:`queued` returns the completion event of the
    batch :data:`BACKLOG` batches back (None while fewer are queued): a
    scheduler that resumes a generator only once that event has completed keeps
    each trainer's queue short, so that several trainers on separate streams
    advance at their own pace and none starves while another waits for the host.
    Before reading results back to the host, :meth:`drained` returns the event
    of everything queued: resumed after it, the read does not block. On a CPU
    both return None (nothing to wait for). Run alone (:func:`run_to_end`) the
    events are ignored: the host then runs ahead as far as CUDA lets it.
    """

    def __init__(self, device: torch.device, depth: int = BACKLOG):
        self.cuda = device.type == "cuda"
        self.depth = depth
        self.events: list = []

    def _record(self):
        event = torch.cuda.Event()
        event.record()  # on the current stream: the generator's own
        return event

    def queued(self):
        if not self.cuda:
            return None
        self.events.append(self._record())
        return self.events.pop(0) if len(self.events) > self.depth else None

    def drained(self):
        if not self.cuda:
            return None
        self.events.clear()
        return self._record()


# Capture on the lane's own stream (see _capture_stream). A switch for checking the fix on a GPU (the
# CUDA lanes test does not reproduce the race at its size); not a user setting.
CAPTURE_ON_LANE_STREAM = True


def _capture_stream(current):
    """The stream to capture a training step on: ``current`` when the step runs on a lane's
    stream (:mod:`matconvnet_port.search.lanes`), else None (PyTorch's shared capture stream;
    capturing on the default stream is not allowed).

    PyTorch keys cuBLAS's workspace by (handle, stream): graphs captured on one shared stream embed
    one workspace address, so two lanes replaying their graphs side by side would race on it (the
    H100 gave NaN losses with --lanes 3 where one lane trained normally), and destroying one
    graph frees the workspace another still uses (pytorch/pytorch#193402). The lanes' streams are
    distinct, and a lane's own graphs and eager work are ordered on its stream.
    """
    if CAPTURE_ON_LANE_STREAM and current != torch.cuda.default_stream(current.device):
        return current
    return None


def run_to_end(steps):
    """Run a step generator (:meth:`FusedTrainer.train_epoch_steps`, ...) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class FusedTrainer:
    """Trains a :class:`FusedLeNet` with cnn_train's SGD on device-resident data.

    ``images``: n x 1 x N x N float tensor (mean-subtracted, as the imdb), on
    the training device; ``labels``: n 1-based labels (validated here once).
    The trainer keeps its own copy of the images in the model's storage order.
    """

    def __init__(self, model: FusedLeNet, images: torch.Tensor, labels: torch.Tensor, *,
                 batch_size: int = 100, learning_rate=0.001, weight_decay: float = 0.0005,
                 momentum: float = 0.9, seed: int = 0, use_cuda_graph: bool | None = None,
                 eval_batch_size: int | None = None, chunk_size: int | None = None):
        self.model = model
        self.device = images.device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.images = FusedLeNet.prepare_images(images)
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
        if bool(((labels < 1) | (labels > NUM_CLASSES) | (labels != labels.round())).any()):
            raise ValueError(f"labels must be integers in 1..{NUM_CLASSES}")
        # 0-based class indices: what the loss gathers with, in the graph and outside it
        self.class_index = labels.to(device=self.device, dtype=torch.long) - 1
        self.batch_size = batch_size
        self.rates = np.asarray(learning_rate, dtype=np.float64).reshape(-1)
        self.weight_decay, self.momentum, self.seed = weight_decay, momentum, seed
        self.params = model.parameters_in_matconvnet_order()
        self.momenta = [torch.zeros_like(p) for p in self.params]
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.eval_batch_size = eval_batch_size or (1000 if self.device.type == "cuda" else 500)
        # models per forward/backward pass: all on a GPU; on a small CPU fewer models at a
        # time keep the working set in cache at large N (autotune measures which is faster)
        size = min(chunk_size or model.num_models, model.num_models)
        self.chunks = [(c, min(c + size, model.num_models)) for c in range(0, model.num_models, size)]
        self._graphs: dict = {}

    # -- one SGD step (forward, backward, update), no host synchronisation ----
    def _step(self, x: torch.Tensor, index: torch.Tensor, lr: float, totals: torch.Tensor) -> None:
        b = x.shape[0]
        for first, last in self.chunks:
            m = last - first
            scores_pm = per_model(self.model(x, models=(first, last)), m)
            index_pm = labels_per_model(index, m)
            losses = fn.softmaxloss_per_image(scores_pm, index_pm)       # m*B per-image sums
            # the sum over models of each model's softmaxloss (normalise: / B)
            (losses.sum() / b).backward()
            with torch.no_grad():
                totals[:3, first:last] += model_totals(losses.detach(), scores_pm.detach(), index_pm, m)
        sgd_update(self.params, [p.grad for p in self.params], self.momenta, [1.0] * len(self.params),
                   [1.0] * len(self.params), learning_rate=lr, weight_decay=self.weight_decay,
                   momentum=self.momentum)
        for p in self.params:
            p.grad = None

    def _graphed_step(self, lr: float, b: int):
        key = (lr, b)
        if key not in self._graphs:
            static_x = torch.zeros((b,) + tuple(self.images.shape[1:]), device=self.device, dtype=self.images.dtype)
            static_index = torch.zeros(b, device=self.device, dtype=torch.long)
            static_totals = torch.zeros(3, self.model.num_models, device=self.device, dtype=torch.float64)
            # warm up on a side stream (cuDNN picks algorithms, autograd allocates), then capture
            saved = [p.detach().clone() for p in self.params] + [m.clone() for m in self.momenta]
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._step(static_x, static_index, lr, static_totals)
                current = torch.cuda.current_stream()
                current.wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=_capture_stream(current)):
                    self._step(static_x, static_index, lr, static_totals)
            finally:
                with torch.no_grad():  # undo the warm-up steps (a capture runs nothing)
                    for t, s in zip(self.params + self.momenta, saved):
                        t.copy_(s)
                for p in self.params:
                    p.grad = None
            static_totals.zero_()
            self._graphs[key] = (graph, static_x, static_index, static_totals)
        return self._graphs[key]

    def diverged_models(self) -> list[int]:
        """The models whose conv4 filters and biases are all NaN (one host sync).

        Such a model's class scores are NaN for every image from then on -- NaN times anything,
        0 and infinity included, is NaN; 0 after a ReLU, MATLAB's max(NaN, 0) -- and its conv4
        parameters stay NaN under cnn_train's
        update (w + m is NaN whatever the momentum m). Its errors and objective are then the
        same every epoch; the search (runner.train_cells_steps) also waits until two such
        epochs reported equal statistics, dead-ReLU fractions included, before it stops
        training the model.
        """
        f, b = self.params[6].detach(), self.params[7].detach()
        m = self.model.num_models
        gone = torch.isnan(f.reshape(m, -1)).all(1) & torch.isnan(b.reshape(m, -1)).all(1)
        return [int(i) for i in torch.nonzero(gone).reshape(-1).cpu()]

    def release_graphs(self) -> None:
        """Free the captured steps now (a later step captures again). A graph's cuBLAS workspace
        is keyed by its capture stream and freed with it: releasing before the next trainer of the
        same lane captures keeps that trainer from inheriting a workspace about to be freed."""
        if self._graphs:
            torch.cuda.synchronize(self.device)  # none may still be replaying
        for graph, *_ in self._graphs.values():
            graph.reset()
        self._graphs.clear()

    def train_epoch(self, epoch: int, train_indices: np.ndarray, order=None, progress=None) -> EpochStats:
        """One epoch of cnn_train over ``train_indices`` (1-based), shuffled as cnn_train does."""
        return run_to_end(self.train_epoch_steps(epoch, train_indices, order, progress))

    @torch.no_grad()
    def evaluate(self, indices: np.ndarray, progress=None) -> EpochStats:
        """Test-mode pass over ``indices`` (1-based): MatConvNet's val statistics, the
        image-level error (scores summed over locations, then argmax) and dead ReLUs
        (a channel whose ReLU output is 0 at every location of every image)."""
        return run_to_end(self.evaluate_steps(indices, progress))

    # -- the same, a batch at a time, for running several trainers side by side ----
    # Generators: each yields after queueing a batch's work (see :class:`Backlog` for what it
    # yields) and returns the EpochStats. `run_to_end` runs one alone; the search's lanes
    # (matconvnet_port.search.lanes) interleave several, each on its own CUDA stream.

    def train_epoch_steps(self, epoch: int, train_indices: np.ndarray, order=None, progress=None):
        """:meth:`train_epoch` as a generator (see :class:`Backlog`)."""
        lr = float(self.rates[min(epoch, self.rates.size) - 1])
        order = default_order(epoch, train_indices, self.seed) if order is None else np.asarray(order)
        order_dev = torch.as_tensor(order - 1, dtype=torch.long, device=self.device)
        m = self.model.num_models
        totals = torch.zeros(3, m, device=self.device, dtype=torch.float64)
        backlog = Backlog(self.device)
        start = time.perf_counter()
        self.model.train()
        for t in range(0, len(order), self.batch_size):
            idx = order_dev[t:t + self.batch_size]
            b = idx.numel()
            graphed = None
            if self.use_cuda_graph and b == self.batch_size:
                try:
                    graphed = self._graphed_step(lr, b)
                except RuntimeError as e:  # fall back to eager steps: slower, same numbers
                    print(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); running eagerly")
                    self.use_cuda_graph = False
            if graphed is not None:
                graph, sx, si, st = graphed
                torch.index_select(self.images, 0, idx, out=sx)
                torch.index_select(self.class_index, 0, idx, out=si)
                graph.replay()
            else:
                x = self.images.index_select(0, idx)
                index = self.class_index.index_select(0, idx)
                self._step(x, index, lr, totals)
            if progress is not None:
                progress(b)
            yield backlog.queued()
        for graph, _, _, st in self._graphs.values():
            totals += st
            st.zero_()
        yield backlog.drained()
        totals = totals.cpu().numpy()
        n = len(order)
        return EpochStats(objective=totals[0] / n, top1err=totals[1] / n, top5err=totals[2] / n, num=n,
                          seconds=time.perf_counter() - start)

    def evaluate_steps(self, indices: np.ndarray, progress=None):
        """:meth:`evaluate` as a generator (see :class:`Backlog`)."""
        m = self.model.num_models
        start = time.perf_counter()
        self.model.eval()
        idx_all = torch.as_tensor(np.asarray(indices) - 1, dtype=torch.long, device=self.device)
        totals = torch.zeros(4, m, device=self.device, dtype=torch.float64)
        alive = [None] * 4
        backlog = Backlog(self.device)

        def track_alive(i, y):
            positive = (y > 0).any(dim=3).any(dim=2).any(dim=0)
            alive[i] = positive if alive[i] is None else alive[i] | positive

        for t in range(0, idx_all.numel(), self.eval_batch_size):
            with torch.no_grad():  # (a generator's frames do not keep the caller's grad mode)
                idx = idx_all[t:t + self.eval_batch_size]
                b = idx.numel()
                x = self.images.index_select(0, idx)
                index = self.class_index.index_select(0, idx)
                scores_pm = per_model(self.model(x, track_alive), m)
                index_pm = labels_per_model(index, m)
                totals[:3] += model_totals(fn.softmaxloss_per_image(scores_pm, index_pm), scores_pm, index_pm, m)
                image_pred = fn.first_max_index(scores_pm.sum(dim=(2, 3)), 1)  # MATLAB's max: NaN skipped
                totals[3] += (image_pred != index_pm.reshape(-1)).reshape(m, b).sum(1)
            if progress is not None:
                progress(b)
            yield backlog.queued()
        yield backlog.drained()
        totals = totals.cpu().numpy()
        n = idx_all.numel()
        dead = {}
        for i, shape in enumerate(CONV_SHAPES):
            frac = (~alive[i]).reshape(m, shape[3]).double().mean(1).cpu().numpy()
            has = np.array([mask[i] for mask in self.model.masks], dtype=bool)
            dead[i + 1] = np.where(has, frac, np.nan)
        return EpochStats(objective=totals[0] / n, top1err=totals[1] / n, top5err=totals[2] / n, num=n,
                          seconds=time.perf_counter() - start, image_err=totals[3] / n, dead_relu=dead)

    # -- resumable state -------------------------------------------------------
    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu().clone() for p in self.params],
                "momenta": [m.detach().cpu().clone() for m in self.momenta]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, state["params"]):
                p.copy_(s)
            for m, s in zip(self.momenta, state["momenta"]):
                m.copy_(s)


def parse_conv(spec) -> tuple[str, str, str, str]:
    """A layer implementation for all four convolutions, or four of them: 'gemm' or
    'grouped,grouped,gemm,gemm' (or a sequence) -> a 4-tuple; one-line ValueError otherwise."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    if len(parts) == 1:
        parts *= 4
    if len(parts) != 4 or any(p not in LAYER_IMPLS for p in parts):
        raise ValueError(f"conv must be one of {', '.join(LAYER_IMPLS)} or four of them separated by commas "
                         f"(conv1..conv4), got {spec!r}")
    return tuple(parts)


def compose_method(compose) -> str | None:
    """A plan's ``compose`` as None (no composition) or one of :data:`COMPOSE_METHODS`."""
    if compose is None or compose is False:
        return None
    if compose is True:
        return "gemm"
    if compose not in COMPOSE_METHODS:
        raise ValueError(f"compose must be False, True or one of {COMPOSE_METHODS}, got {compose!r}")
    return compose


def plan_label(plan: dict) -> str:
    """'nhwc gemm,grouped,gemm,gemm x8 +compose=library': memory format, conv per layer, models per
    pass, and how conv3 and conv4 are composed where no ReLU separates them ('+compose' alone: gemm)."""
    conv = parse_conv(plan["conv"])
    conv_text = conv[0] if len(set(conv)) == 1 else ",".join(conv)
    chunk = plan.get("chunk_size")
    compose = compose_method(plan.get("compose"))
    return (f"{plan.get('memory_format', 'nchw')} {conv_text}" + (f" x{chunk}" if chunk else "")
            + {None: "", "gemm": " +compose", "library": " +compose=library"}[compose])


def build(plan: dict, masks, weights, device) -> FusedLeNet:
    """The :class:`FusedLeNet` a plan describes, on ``device``."""
    return FusedLeNet(masks, weights, conv=plan["conv"], memory_format=plan.get("memory_format", "nchw"),
                      compose=plan.get("compose", False)).to(device)


# from this input size on, composing conv3 and conv4 (models without a ReLU between) pays on the CPU
COMPOSE_FROM = 36


def default_plan(device_type: str, input_size: int, num_models: int) -> dict:
    """The plan to use without measuring (CPU), or the fallback (CUDA: :func:`autotune_plan` measures).

    CPU: channels-last storage; im2col + GEMM for conv1 (one product for all
    models: they share the input), conv3 (a fully connected layer at small N,
    where the convolution library is slowest) and conv4; the library's grouped
    convolution for conv2; 8 models per pass (their working set stays in
    cache at large N); from N = 36 on, conv3 and conv4 of the models without
    a ReLU between them as one composed linear layer, by the library's
    convolution (:func:`~matconvnet_port.functional.linear_pair_conv`). Measured on a 2-core
    CPU against the alternatives (README). CUDA: cuDNN's grouped convolutions,
    every model in one pass.
    """
    if device_type == "cuda":
        return {"memory_format": "nchw", "conv": ("grouped",) * 4, "chunk_size": num_models, "compose": False}
    return {"memory_format": "nhwc", "conv": ("gemm", "grouped", "gemm", "gemm"),
            "chunk_size": min(8, num_models), "compose": "library" if input_size >= COMPOSE_FROM else False}


def candidate_plans(device_type: str, num_models: int, input_size: int = 28) -> list[dict]:
    """What :func:`autotune_plan` times by default on this kind of device."""
    g, m = "grouped", "gemm"
    if device_type == "cuda":
        # The first is autotune's reference: cuDNN's own grouped convolutions. Then im2col +
        # batched GEMM where cuDNN's grouped kernels are weakest (conv1, conv4, conv3 of small
        # maps), cuDNN per model for conv2/conv3 (in turn, or on side streams: conv3's kernels
        # leave the GPU part idle), and composition (by GEMM, or by cuDNN: its narrow composed
        # bank needs no im2col columns). Which wins depends on N and the GPU; combinations that
        # lost at every N on an H100 are left out (README, Speed).
        s, w, lib = "streams", "gemm_wgrad", "library"
        return [{"memory_format": fmt, "conv": conv, "chunk_size": num_models, "compose": compose}
                for fmt, conv, compose in (("nchw", (g,) * 4, False),
                                           ("nhwc", (m, g, m, m), False), ("nhwc", (m, g, m, m), "gemm"),
                                           ("nhwc", (m, s, m, m), False), ("nhwc", (m, s, m, m), "gemm"),
                                           ("nhwc", (m, w, m, m), False),
                                           ("nhwc", (m, g, m, m), lib), ("nhwc", (m, s, m, m), lib),
                                           ("nhwc", (m, s, s, m), lib), ("nhwc", (m, s, g, m), lib))]
    default = default_plan(device_type, input_size, num_models)
    # every way to compose (none, GEMM, library) beside the default's
    others = [dict(default, compose=c) for c in (False, "gemm", "library") if c != default["compose"]]
    others += [dict(default, chunk_size=num_models), dict(default, chunk_size=min(2, num_models)),
               dict(default, conv=(g, g, m, m))]
    unique = {plan_label(p): p for p in [default] + others}
    return list(unique.values())


# autotune rejects a candidate whose gradients after one step differ from the candidates'
# consensus (their elementwise median) by more than this, relative to the largest magnitude.
# Correct plans differ by float32 rounding: ~1e-6 between GEMM-based plans, but up to 1.7e-3 on an
# H100 between plans whose convolutions cuDNN's benchmark mode serves with different algorithms
# (FFT-based ones among them; seen at N = 40..64); a wrong kernel or a broken capture is off by O(1).
AUTOTUNE_TOLERANCE = 1e-2


def _first_step_outliers(momenta: dict) -> dict:
    """{label: relative distance} of the candidates whose first-step momenta stray from the
    elementwise median of all candidates' by more than :data:`AUTOTUNE_TOLERANCE`."""
    labels = list(momenta)
    if len(labels) < 2:
        return {}
    distance = dict.fromkeys(labels, 0.0)
    for j in range(len(momenta[labels[0]])):
        stack = torch.stack([momenta[label][j] for label in labels])
        # with two candidates the median is their mean: each then lies half their difference away
        consensus = stack.nanmedian(dim=0).values if len(labels) > 2 else stack.mean(dim=0)
        scale = float(consensus.abs().max().clamp_min(1e-30))
        for label, m in zip(labels, stack):
            d = float((m - consensus).abs().max()) / scale
            distance[label] = max(distance[label], d if d == d else float("inf"))  # NaN strays too
    return {label: d for label, d in distance.items() if not d <= AUTOTUNE_TOLERANCE}


def time_plan(plan: dict, masks, weights, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 100,
              steps: int = 3, use_cuda_graph: bool | None = None) -> tuple[float, "FusedTrainer", list]:
    """Seconds per training step of ``plan`` over ``steps`` steps on ``images``, after a warm-up
    step (which also captures the CUDA graph); returns (seconds, the trainer, its momenta after
    the warm-up step -- the negated first-step gradients -- as copies)."""
    trainer = FusedTrainer(build(plan, masks, weights, images.device), images, labels, batch_size=batch_size,
                           chunk_size=plan.get("chunk_size"), use_cuda_graph=use_cuda_graph)
    indices = np.arange(1, batch_size * steps + 1)
    trainer.train_epoch(1, indices[:batch_size])
    first = [m.detach().clone() for m in trainer.momenta]
    cuda = images.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_epoch(1, indices)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, trainer, first


def autotune_plan(masks, weights, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 100,
                  steps: int = 3, candidates: Sequence[dict] | None = None) -> tuple[dict, dict]:
    """Time a few training steps of each way to run the fused models on this device; return the fastest.

    A candidate is a plan: {'memory_format', 'conv' (per layer), 'chunk_size'
    (models per pass)}; by default :func:`candidate_plans`. Runs on throwaway
    copies (the caller's models are untouched). Every candidate must compute
    what the others compute: after the first step its momenta (the negated
    gradients) must lie within :data:`AUTOTUNE_TOLERANCE` of the candidates'
    elementwise median. One that does not, or that fails to run (out of
    device memory, say), is reported on stderr and not chosen (if every
    candidate strays -- two that disagree -- the first, the device library's
    own grouped convolution, is kept). Returns (best plan, {plan label:
    seconds per step}) over the candidates that ran.
    """
    if candidates is None:
        candidates = candidate_plans(images.device.type, len(masks), images.shape[2])
    timings, plans, momenta = {}, {}, {}
    n = min(images.shape[0], batch_size * (steps + 1))
    steps = max(1, n // batch_size - 1)  # time only full steps that the images allow
    failures = []
    for plan in candidates:
        label = plan_label(plan)
        try:
            timings[label], trainer, momenta[label] = time_plan(plan, masks, weights, images[:n], labels[:n],
                                                                batch_size=batch_size, steps=steps)
            plans[label], trainer = plan, None
        except Exception as e:  # noqa: BLE001 - out of device memory, a kernel the library lacks, a candidate's
            # own bug on a device the tests never saw: the other candidates still run, and the run goes on
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"warning: autotune skipped plan {failures[-1]}", file=sys.stderr)
            del e
            trainer = None
            if images.device.type == "cuda":
                gc.collect()  # the traceback's frames held the failed trainer's tensors
                torch.cuda.empty_cache()
    if not timings:
        raise RuntimeError("autotune: every candidate plan failed: " + "; ".join(failures))
    outliers = _first_step_outliers(momenta)
    for label, d in outliers.items():
        print(f"warning: autotune will not use plan {label}: its first-step gradients differ from the "
              f"candidates' consensus by {d:.1e} (relative)", file=sys.stderr)
    return plans[_fastest_usable(timings, outliers)], timings


def _fastest_usable(timings: dict, outliers) -> str:
    """The fastest candidate that is not an outlier; the first one if all are."""
    usable = [label for label in timings if label not in outliers] or [next(iter(timings))]
    return min(usable, key=timings.get)
