"""DagNN networks: MatConvNet's ``dagnn.DagNN`` (graph of blocks), its ``eval`` and ``saveobj``.

A :class:`DagNN` holds what the MATLAB object holds:

* ``vars``: name -> :class:`Var` (``value``, ``der``, ``precious``), in
  MatConvNet's order (variables are added as layers are added: inputs, then
  outputs);
* ``params``: name -> :class:`Param` (``value`` a numpy float32/float64 array in
  MatConvNet layout -- filters FH x FW x FC x K, biases 1 x K or K x 1,
  batch-norm moments C x 2 -- ``der``, ``learningRate``, ``weightDecay``);
* ``layers``: a list of plain dicts ``{'name', 'type', 'inputs', 'outputs',
  'params', 'block'}``; ``type`` is the MATLAB class name (``'dagnn.Conv'``)
  and ``block`` a dict of that block's properties with MatConvNet's names
  (Conv: ``size``, ``hasBias``, ``pad`` [t b l r], ``stride``, ``dilate``,
  ``opts``; Pooling: ``method``, ``poolSize``, ``pad``, ``stride``; ...);
* ``meta``: a dict.

Supported block types are :data:`BLOCK_TYPES`. Missing block properties take
the defaults of the MATLAB classes (e.g. ``dagnn.BatchNorm`` epsilon 1e-5,
not ``vl_nnbnorm``'s 1e-4).

:meth:`DagNN.eval` runs the graph as ``dagnn.DagNN/eval`` does: layers in
the order of MatConvNet's ``rebuild`` (each layer's height = 1 + the largest
height among the layers that read its outputs, layers sorted by decreasing
height, ties by position), forward, then backward from the given output
derivatives. Derivatives come from autograd through
:mod:`matconvnet_port.functional`, in IEEE float32. Unlike MATLAB's default
``conserveMemory = true``, every variable keeps its value and derivative.
As in MatConvNet a layer whose input has no value is skipped, which lets
``eval({'input': x})`` compute the prediction without labels.

:meth:`DagNN.to_torch` gives an ``nn.Module`` (NCHW) for PyTorch users;
:meth:`DagNN.saveobj` / :meth:`DagNN.loadobj` convert from / to the struct
of MatConvNet's ``saveobj`` (struct arrays are lists of dicts here; see
:mod:`matconvnet_port.netio` for the file layout), and
:meth:`DagNN.from_simplenn` is ``dagnn.DagNN.fromSimpleNN`` and
:meth:`DagNN.init_params` ``initParams``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from . import functional as fn
from .errors import MatFormatError, labelled
from .matio import _matlab_shape, cell_items
from .precision import exact_fp32
from .vl_nn import hwcn_to_nchw, nchw_to_hwcn

__all__ = ["DagNN", "DagNNModule", "Var", "Param", "BLOCK_TYPES", "BLOCK_DEFAULTS"]

# Properties (as saved by each class's save()) and their MATLAB defaults.
BLOCK_DEFAULTS: dict[str, dict[str, Any]] = {
    "dagnn.Conv": {"size": [0, 0, 0, 0], "hasBias": True, "pad": [0, 0, 0, 0], "stride": [1, 1],
                   "dilate": [1, 1], "opts": []},
    "dagnn.ConvTranspose": {"size": [0, 0, 0, 0], "hasBias": True, "upsample": [1, 1],
                            "crop": [0, 0, 0, 0], "numGroups": 1, "opts": []},
    "dagnn.Pooling": {"method": "max", "poolSize": [1, 1], "pad": [0, 0, 0, 0], "stride": [1, 1],
                      "dilate": [1, 1], "opts": []},
    "dagnn.ReLU": {"leak": 0, "useShortCircuit": True, "opts": []},
    "dagnn.Sigmoid": {},
    "dagnn.SoftMax": {},
    "dagnn.LRN": {"param": [5, 1, 0.0001 / 5, 0.75]},
    "dagnn.BatchNorm": {"numChannels": [], "epsilon": 1e-5, "opts": []},
    "dagnn.DropOut": {"rate": 0.5, "frozen": False},
    "dagnn.Concat": {"dim": 3, "numInputs": 2},
    "dagnn.Sum": {},
    "dagnn.Crop": {"crop": [0, 0]},
    "dagnn.Scale": {"size": [], "hasBias": True},
    "dagnn.ROIPooling": {"method": "max", "subdivisions": [6, 6], "transform": 1, "flatten": False},
    "dagnn.Loss": {"loss": "softmaxlog", "ignoreAverage": False, "normalise": True, "opts": []},
}
BLOCK_TYPES = tuple(BLOCK_DEFAULTS)

# MATLAB H x W x C x N dimension (1-based) -> NCHW dimension
_NCHW_DIM = {1: 2, 2: 3, 3: 1, 4: 0}


@dataclasses.dataclass
class Var:
    """A DagNN variable: ``value`` and ``der`` (numpy, MatConvNet layout) after :meth:`DagNN.eval`."""

    name: str
    value: Any = None
    der: Any = None
    precious: bool = False


@dataclasses.dataclass
class Param:
    """A DagNN parameter; ``extra`` keeps any further saved fields (e.g. ``trainMethod``)."""

    name: str
    value: Any = None
    der: Any = None
    learningRate: Any = 1.0
    weightDecay: Any = 1.0
    extra: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Reading MATLAB-ish values (numpy arrays from MAT-files, or Python values)
# ---------------------------------------------------------------------------

def _name_value_pairs(value, what: str) -> dict:
    """{name: value}, or MATLAB's {'name', value, ...} written as a list or tuple, as a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)) and len(value) % 2 == 0 and all(isinstance(k, str) for k in value[::2]):
        return dict(zip(value[::2], value[1::2]))
    raise ValueError(f"{what} must be a dict {{name: value}} or a list [name, value, ...], "
                     f"got {type(value).__name__}")


def _numbers(value, where: str) -> list[float]:
    """A numeric option (scalar, vector, numpy array, list, bool) as a flat list of floats."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise MatFormatError(f"{where}: expected numbers, got {value!r}") from None
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise MatFormatError(f"{where}: expected a numeric value, got {type(value).__name__}")
    if np.iscomplexobj(arr):  # float() would drop the imaginary part with a mere warning
        raise MatFormatError(f"{where}: expected real numbers, got complex ones")
    return [float(v) for v in arr.reshape(-1, order="F")]


def _scalar(value, where: str) -> float:
    values = _numbers(value, where)
    if len(values) != 1:
        raise MatFormatError(f"{where}: expected a scalar, got {len(values)} values")
    return values[0]


def _flag(value, where: str) -> bool:
    """A true/false option as MATLAB's logical() reads it: nonzero is true, NaN an error."""
    number = _scalar(value, where)
    if number != number:
        raise MatFormatError(f"{where}: NaN is not a true/false value (MATLAB's logical(NaN) is an error)")
    return bool(number)


def _text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    arr = np.asarray(value) if not isinstance(value, (list, tuple)) else None
    if arr is not None and arr.dtype.kind == "U" and arr.size == 1:
        return str(arr.reshape(-1)[0])
    raise MatFormatError(f"{where}: expected a string, got {type(value).__name__}")


def _names(value, where: str) -> list[str]:
    """A cell of strings (or one string) as a list of str."""
    if isinstance(value, str):
        return [value]
    return [_text(v, f"{where}{{{k + 1}}}") for k, v in enumerate(cell_items(value))]


def _struct_items(value, where: str) -> list[dict]:
    """A struct array (matio StructArray, list of dicts, or a dict for 1x1) as a list of dicts."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, np.ndarray) and value.dtype != object and value.size == 0:
        return []
    try:
        items = list(value) if not isinstance(value, np.ndarray) else list(value.reshape(-1, order="F"))
    except TypeError:
        raise MatFormatError(f"{where}: expected a struct array, got {type(value).__name__}") from None
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise MatFormatError(f"{where}({k + 1}): expected a struct, got {type(item).__name__}")
    return items


def _float_param(value, where: str) -> np.ndarray:
    """A parameter value as numpy in MatConvNet layout, single or double as stored (MatConvNet runs both)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return np.zeros((0, 0), np.float32)
    arr = np.asarray(value)
    if arr.dtype not in (np.float32, np.float64):
        raise MatFormatError(f"{where}: parameter values must be single or double, got {arr.dtype}")
    return np.array(arr, copy=True)


def _row(values) -> np.ndarray:
    """A 1 x K double row, as MATLAB stores numeric block properties."""
    return np.asarray(values, dtype=np.float64).reshape(1, -1)


def _logical(value: bool) -> np.ndarray:
    """A 1 x 1 logical, as MATLAB stores boolean block properties."""
    return np.full((1, 1), bool(value))


def _opts(items: list, where: str, known: dict[str, str]) -> dict[str, Any]:
    """Parse an ``opts`` cell ({'name', value, ..., 'cuDNN'}) into {our_key: value}.

    cuDNN switches only choose MatConvNet's GPU code path and are ignored;
    ``known`` maps lower-case MatConvNet option names to our keys.
    """
    out: dict[str, Any] = {}
    k = 0
    while k < len(items):
        name = items[k]
        if not isinstance(name, str):
            raise MatFormatError(f"{where}{{{k + 1}}}: expected an option name, got {type(name).__name__}")
        low = name.lower()
        if low in ("cudnn", "nocudnn"):
            k += 1
            continue
        if k + 1 >= len(items):
            raise MatFormatError(f"{where}: option {name!r} has no value")
        if low == "cudnnworkspacelimit":
            pass
        elif low in known:
            out[known[low]] = items[k + 1]
        else:
            raise MatFormatError(f"{where}: unsupported option {name!r}")
        k += 2
    return out


# ---------------------------------------------------------------------------
# Blocks: thin Modules over matconvnet_port.functional (NCHW)
# ---------------------------------------------------------------------------

class _Block(nn.Module):
    """A DagNN block: ``forward(inputs, params) -> outputs`` (lists of NCHW tensors)."""

    def forward(self, inputs: list, params: list) -> list:  # pragma: no cover - abstract
        raise NotImplementedError


def _bias(p):
    return None if p is None or p.numel() == 0 else p.reshape(-1)


class _Conv(_Block):
    def __init__(self, pad, stride, dilate, has_bias: bool):
        super().__init__()
        self.pad, self.stride, self.dilate, self.has_bias = pad, stride, dilate, has_bias

    def forward(self, inputs, params):
        b = _bias(params[1]) if self.has_bias and len(params) > 1 else None
        return [fn.conv(inputs[0], params[0], b, pad=self.pad, stride=self.stride, dilate=self.dilate)]


class _ConvTranspose(_Block):
    def __init__(self, upsample, crop, num_groups: int, has_bias: bool):
        super().__init__()
        self.upsample, self.crop, self.num_groups, self.has_bias = upsample, crop, num_groups, has_bias

    def forward(self, inputs, params):
        b = _bias(params[1]) if self.has_bias and len(params) > 1 else None
        return [fn.convt(inputs[0], params[0], b, upsample=self.upsample, crop=self.crop,
                         num_groups=self.num_groups)]


class _Pooling(_Block):
    def __init__(self, pool_size, pad, stride, method: str):
        super().__init__()
        self.pool_size, self.pad, self.stride, self.method = pool_size, pad, stride, method

    def forward(self, inputs, params):
        return [fn.pool(inputs[0], self.pool_size, pad=self.pad, stride=self.stride, method=self.method)]


class _ReLU(_Block):
    def __init__(self, leak: float):
        super().__init__()
        self.leak = leak

    def forward(self, inputs, params):
        return [fn.relu(inputs[0], self.leak)]


class _Sigmoid(_Block):
    def forward(self, inputs, params):
        return [fn.sigmoid(inputs[0])]


class _SoftMax(_Block):
    def forward(self, inputs, params):
        return [fn.softmax(inputs[0])]


class _LRN(_Block):
    def __init__(self, param):
        super().__init__()
        self.param = param

    def forward(self, inputs, params):
        return [fn.lrn(inputs[0], self.param)]


class _BatchNorm(_Block):
    """``dagnn.BatchNorm``: params [multipliers, biases, moments C x 2].

    'normal' mode normalises with the batch moments; 'test' mode with the
    stored ones. MatConvNet's backward (``vl_nnbnorm`` called without
    moments, as ``dagnn.BatchNorm`` does) always differentiates the
    batch-statistics map, also in test mode: we reproduce that with a
    zero-valued correction term that carries the training-mode gradient.
    ``batch_moments`` keeps the last batch moments; their derivative is
    ``moments * N`` (``dagnn.BatchNorm.backward``).
    """

    def __init__(self, epsilon: float):
        super().__init__()
        self.epsilon = epsilon
        self.batch_moments: torch.Tensor | None = None

    def forward(self, inputs, params):
        x, (g, b, moments) = inputs[0], params[:3]
        if g is None or b is None:
            raise ValueError("the multipliers and biases (params 1 and 2) are empty")
        g, b = g.reshape(-1), b.reshape(-1)
        # no moments in test mode: the batch's (MatConvNet would pass the empty 'moments' to vl_nnbnorm,
        # which refuses it; computing what vl_nnbnorm computes without them is this port's choice)
        if self.training or moments is None:
            y, self.batch_moments = fn.bnorm(x, g, b, None, self.epsilon)
            return [y]
        # any 2C-element array, read column-major as vl_nnbnorm does: the C means first
        y = fn.bnorm(x, g, b, moments, self.epsilon)[0]
        if torch.is_grad_enabled():
            y_batch, self.batch_moments = fn.bnorm(x, g, b, None, self.epsilon)
            y = y.detach() + (y_batch - y_batch.detach())  # value of y, gradient of y_batch
        return [y]


class _DropOut(_Block):
    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate
        self.mask: torch.Tensor | None = None

    def forward(self, inputs, params):
        if not self.training:
            return [inputs[0]]
        y, self.mask = fn.dropout(inputs[0], self.rate)
        return [y]


class _Concat(_Block):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, inputs, params):
        return [torch.cat(list(inputs), dim=_NCHW_DIM[self.dim])]


class _Sum(_Block):
    def forward(self, inputs, params):
        y = inputs[0]
        for t in inputs[1:]:
            y = y + t
        return [y]


class _Crop(_Block):
    """``dagnn.Crop`` (FCN's): input 1 cropped to the height and width of input 2.

    With ``crop`` = [cv cu] and the size differences dv, du: ``vl_nncrop`` by
    [dv - max(0, dv - cv), max(0, dv - cv), du - max(0, du - cu), max(0, du - cu)]
    (top bottom left right), i.e. from offset ``crop`` where it fits. Only
    input 2's size is used: it gets no derivative. (MatConvNet's backward
    reads a property ``inputSize`` the class does not have; the derivative
    here is ``vl_nncrop``'s.)
    """

    def __init__(self, crop: tuple[int, int]):
        super().__init__()
        self.crop = crop

    def forward(self, inputs, params):
        x, like = inputs[0], inputs[1]
        dv, du = x.shape[2] - like.shape[2], x.shape[3] - like.shape[3]
        if dv < 0 or du < 0:  # MATLAB: an index out of bounds in vl_nncrop
            raise ValueError(f"dagnn.Crop: input 1 ({x.shape[2]} x {x.shape[3]}) is smaller than input 2 "
                             f"({like.shape[2]} x {like.shape[3]}), which it is cropped to")
        v, u = max(0, dv - self.crop[0]), max(0, du - self.crop[1])
        return [fn.crop(x, (dv - v, v, du - u, u))]


class _Scale(_Block):
    """``dagnn.Scale``: ``y = x .* w (+ b)`` broadcast as ``bsxfun``; ``x``, ``w``, ``b`` are the
    layer's inputs followed by its parameters (a parameter in MatConvNet's shape, e.g. 1 x 1 x C).

    A deliberate difference: ``Scale.backward`` sums the bias derivative over the dimensions where the
    *multipliers* are 1, so where the biases have another shape (``initParams`` gives [1 1 C]
    multipliers a 1 x 1 bias) MATLAB's bias derivative has the multipliers' shape, which its own
    update cannot apply; here it is the biases' (summed over their own broadcast dimensions). With
    biases shaped as the multipliers (e.g. both 1 x 1 x C, as imported nets have) the two agree.
    """

    def __init__(self, has_bias: bool):
        super().__init__()
        self.has_bias = has_bias

    def forward(self, inputs, params):
        args = list(inputs) + [None if p is None else hwcn_to_nchw(p, "a dagnn.Scale parameter") for p in params]
        if any(a is None for a in args[:2 + self.has_bias]):
            raise ValueError("dagnn.Scale: the multipliers or biases are empty")
        return [fn.scale(args[0], args[1], args[2] if self.has_bias else None)]


class _ROIPooling(_Block):
    """``dagnn.ROIPooling`` (Fast R-CNN's): ``vl_nnroipool`` of input 1 over the ROIs of input 2
    (5 x K, MATLAB's column-major order); with ``flatten`` the K x C x SH x SW result becomes
    K x (SH SW C) x 1 x 1 in MATLAB's ``reshape`` order. Input 2 gets no derivative."""

    def __init__(self, method: str, subdivisions: tuple[int, int], transform, flatten: bool):
        super().__init__()
        self.method, self.subdivisions, self.transform, self.flatten = method, subdivisions, transform, flatten

    def forward(self, inputs, params):
        rois = nchw_to_hwcn(inputs[1].detach())
        rois = rois.permute(*reversed(range(rois.dim()))).reshape(-1)  # column-major: ROI k is rois(:, k)
        y = fn.roipool(inputs[0], rois, self.subdivisions, self.transform, self.method)
        if self.flatten:  # reshape(y, 1, 1, [], K): SH fastest, then SW, then C
            y = y.transpose(2, 3).reshape(y.shape[0], -1, 1, 1)
        return [y]


class _Loss(_Block):
    def __init__(self, loss: str, options: dict):
        super().__init__()
        self.loss, self.options = loss, options

    def forward(self, inputs, params):
        x, c = inputs[0], inputs[1]
        options = dict(self.options)
        if isinstance(options.get("instance_weights"), np.ndarray):
            w = torch.from_numpy(np.ascontiguousarray(options["instance_weights"]))
            options["instance_weights"] = hwcn_to_nchw(w, "instanceWeights").to(x.device, x.dtype)
        return [fn.loss(x, c, loss=self.loss, **options)]


_LOSS_OPTIONS = {"loss": "loss", "instanceweights": "instance_weights", "classweights": "class_weights",
                 "topk": "top_k", "threshold": "threshold", "normalise": "normalise"}


def _block_props(layer: dict, where: str) -> dict:
    kind = layer["type"]
    block = layer.get("block")
    if block is None or (isinstance(block, np.ndarray) and block.size == 0):
        block = {}
    if not isinstance(block, dict):
        raise MatFormatError(f"{where}.block: expected a struct, got {type(block).__name__}")
    props = copy.copy(BLOCK_DEFAULTS[kind])
    props.update(block)
    return props


def _conv_block(p: dict, b: str) -> _Block:
    o = _opts(cell_items(p["opts"]), f"{b}.opts", {"pad": "pad", "stride": "stride", "dilate": "dilate"})
    return _Conv(fn._pad4(_numbers(o.get("pad", p["pad"]), f"{b}.pad")),
                 fn._pos2(_numbers(o.get("stride", p["stride"]), f"{b}.stride"), "stride"),
                 fn._pos2(_numbers(o.get("dilate", p["dilate"]), f"{b}.dilate"), "dilate"),
                 _flag(p["hasBias"], f"{b}.hasBias"))


def _convt_block(p: dict, b: str) -> _Block:
    _opts(cell_items(p["opts"]), f"{b}.opts", {})
    return _ConvTranspose(fn._pos2(_numbers(p["upsample"], f"{b}.upsample"), "upsample"),
                          fn._pad4(_numbers(p["crop"], f"{b}.crop"), "crop"),
                          int(_scalar(p["numGroups"], f"{b}.numGroups")), _flag(p["hasBias"], f"{b}.hasBias"))


def _pooling_block(p: dict, b: str) -> _Block:
    o = _opts(cell_items(p["opts"]), f"{b}.opts", {"pad": "pad", "stride": "stride", "method": "method"})
    if any(d != 1 for d in _numbers(p["dilate"], f"{b}.dilate")):
        raise MatFormatError(f"{b}.dilate: vl_nnpool has no dilation, got {p['dilate']!r}")
    method = _text(o.get("method", p["method"]), f"{b}.method").lower()
    if method not in ("max", "avg"):
        raise MatFormatError(f"{b}.method: must be 'max' or 'avg', got {method!r}")
    return _Pooling(fn._pos2(_numbers(p["poolSize"], f"{b}.poolSize"), "poolSize"),
                    fn._pad4(_numbers(o.get("pad", p["pad"]), f"{b}.pad")),
                    fn._pos2(_numbers(o.get("stride", p["stride"]), f"{b}.stride"), "stride"), method)


def _relu_block(p: dict, b: str) -> _Block:
    o = _opts(cell_items(p["opts"]), f"{b}.opts", {"leak": "leak"})
    return _ReLU(_scalar(o.get("leak", p["leak"]), f"{b}.leak"))


def _lrn_block(p: dict, b: str) -> _Block:
    param = _numbers(p["param"], f"{b}.param")
    if len(param) != 4:
        raise MatFormatError(f"{b}.param: expected [N kappa alpha beta], got {param}")
    return _LRN(param)


def _batchnorm_block(p: dict, b: str) -> _Block:
    _opts(cell_items(p["opts"]), f"{b}.opts", {})
    return _BatchNorm(_scalar(p["epsilon"], f"{b}.epsilon"))


def _concat_block(p: dict, b: str) -> _Block:
    dim = int(_scalar(p["dim"], f"{b}.dim"))
    if dim not in _NCHW_DIM:
        raise MatFormatError(f"{b}.dim: must be 1..4 (H, W, C, N), got {dim}")
    return _Concat(dim)


def _crop_block(p: dict, b: str) -> _Block:
    v, u = fn._ints(_numbers(p["crop"], f"{b}.crop"), 2, "crop")
    if v < 0 or u < 0:
        raise MatFormatError(f"{b}.crop: must be non-negative [v u], got [{v} {u}]")
    return _Crop((v, u))


def _roipooling_block(p: dict, b: str) -> _Block:
    method = _text(p["method"], f"{b}.method").lower()
    if method not in ("max", "avg"):
        raise MatFormatError(f"{b}.method: must be 'max' or 'avg', got {method!r}")
    transform = _numbers(p["transform"], f"{b}.transform")
    if len(transform) not in (1, 2, 6):
        raise MatFormatError(f"{b}.transform: must be 1 x 1, 2 x 1 or 2 x 3, got {len(transform)} numbers")
    return _ROIPooling(method, fn._pos2(_numbers(p["subdivisions"], f"{b}.subdivisions"), "subdivisions"),
                       transform, _flag(p["flatten"], f"{b}.flatten"))


def _loss_block(p: dict, b: str) -> _Block:
    # dagnn.Loss calls vl_nnloss(x, c, [], 'loss', loss, opts{:}): options in opts win
    o = _opts(cell_items(p["opts"]), f"{b}.opts", _LOSS_OPTIONS)
    loss = _text(o.pop("loss", p["loss"]), f"{b}.loss")
    for key in ("top_k", "threshold"):
        if key in o:
            o[key] = _scalar(o[key], f"{b}.opts {key}")
    if "normalise" in o:
        o["normalise"] = _flag(o["normalise"], f"{b}.opts normalise")
    for key in ("instance_weights", "class_weights"):
        if key in o:
            o[key] = np.asarray(o[key], dtype=np.float64)
    if loss.lower() not in fn.LOSS_TYPES:
        raise MatFormatError(f"{b}.loss: unknown loss {loss!r} (supported: {', '.join(fn.LOSS_TYPES)})")
    return _Loss(loss.lower(), o)


_BUILDERS = {
    "dagnn.Conv": _conv_block,
    "dagnn.ConvTranspose": _convt_block,
    "dagnn.Pooling": _pooling_block,
    "dagnn.ReLU": _relu_block,
    "dagnn.Sigmoid": lambda p, b: _Sigmoid(),
    "dagnn.SoftMax": lambda p, b: _SoftMax(),
    "dagnn.LRN": _lrn_block,
    "dagnn.BatchNorm": _batchnorm_block,
    "dagnn.DropOut": lambda p, b: _DropOut(_scalar(p["rate"], f"{b}.rate")),
    "dagnn.Concat": _concat_block,
    "dagnn.Sum": lambda p, b: _Sum(),
    "dagnn.Crop": _crop_block,
    "dagnn.Scale": lambda p, b: _Scale(_flag(p["hasBias"], f"{b}.hasBias")),
    "dagnn.ROIPooling": _roipooling_block,
    "dagnn.Loss": _loss_block,
}

# input variables a block type needs: (count, what they are)
_INPUT_COUNTS = {"dagnn.Loss": (2, "two inputs (prediction, label)"),
                 "dagnn.Crop": (2, "two inputs (the input, one of the size to crop to)"),
                 "dagnn.ROIPooling": (2, "two inputs (the features, the 5 x K regions)")}


def _build_block(layer: dict, where: str) -> _Block:
    """The Module computing one DagNN layer (its block's properties parsed and checked)."""
    kind = layer["type"]
    if kind not in _BUILDERS:
        raise MatFormatError(f"{where}.type: unsupported block type {kind!r} "
                             f"(supported: {', '.join(BLOCK_TYPES)})")
    if kind in _INPUT_COUNTS and len(layer["inputs"]) < _INPUT_COUNTS[kind][0]:
        raise MatFormatError(f"{where}.inputs: a {kind} layer needs {_INPUT_COUNTS[kind][1]}")
    try:
        block = _BUILDERS[kind](_block_props(layer, where), f"{where}.block")
    except MatFormatError:
        raise
    except ValueError as e:  # option checks in functional (_pad4, _pos2)
        raise MatFormatError(f"{where}.block: {e}") from None
    if isinstance(block, _Scale) and len(layer["inputs"]) + len(layer["params"]) < 2 + block.has_bias:
        raise MatFormatError(f"{where}: a dagnn.Scale layer takes x, the multipliers"
                             f"{' and the biases' if block.has_bias else ''} as its inputs and then parameters, "
                             f"got {len(layer['inputs'])} inputs and {len(layer['params'])} parameters")
    return block


# ---------------------------------------------------------------------------
# Initial parameter values (each block's initParams)
# ---------------------------------------------------------------------------

def _randn(dims: list[int], scale: float, generator: torch.Generator) -> np.ndarray:
    """``randn(dims, 'single') * scale`` with torch's generator, drawn in MATLAB's column-major order."""
    x = torch.randn(int(np.prod(dims)), generator=generator, dtype=torch.float32, device=generator.device)
    x = x.cpu().numpy() * np.float32(scale)  # single * double is single in MATLAB
    return np.ascontiguousarray(x.reshape(_matlab_shape(dims), order="F"))


def _positive_ints(value, where: str, what: str, count: tuple[int, int]) -> list[int]:
    """1..4 (or exactly 1) positive integers, as initParams needs them to size its arrays."""
    try:
        dims = _numbers(value, where)
    except MatFormatError as e:  # the in-memory net's fault, not a file's: plain ValueError
        raise ValueError(str(e)) from None
    if not count[0] <= len(dims) <= count[1] or not all(d >= 1 and d.is_integer() for d in dims):
        shown = "[" + " ".join(f"{d:g}" for d in dims) + "]"
        raise ValueError(f"{where} must be {what} (positive integers), got {shown}"
                         + (" (not set)" if not dims or not any(dims) else ""))
    return [int(d) for d in dims]


def _init_values(layer: dict, where: str, generator: torch.Generator) -> list[np.ndarray]:
    """The values the layer's block's ``initParams`` gives (none for blocks without parameters)."""
    kind = layer["type"]
    p = _block_props(layer, where)
    b = f"{where}: block"
    if kind in ("dagnn.Conv", "dagnn.ConvTranspose"):
        conv = kind == "dagnn.Conv"
        size = _positive_ints(p["size"], f"{b}.size", "[FH FW FC K]" if conv else "[FH FW K C]", (1, 4))
        size += [1] * (4 - len(size))  # set.size pads with 1s
        try:
            has_bias = _flag(p["hasBias"], f"{b}.hasBias")
        except MatFormatError as e:
            raise ValueError(str(e)) from None
        # variance 2 / fan-in (He et al. 2015): prod(size(1:3)) for Conv, prod(size([1 2 4])) for ConvTranspose
        fan_in = size[0] * size[1] * (size[2] if conv else size[3])
        values = [_randn(size, np.sqrt(2.0 / fan_in), generator)]
        if has_bias:
            groups = 1 if conv else _positive_ints(p["numGroups"], f"{b}.numGroups", "one number", (1, 1))[0]
            values.append(np.zeros((size[3] if conv else size[2] * groups, 1), np.float32))
        return values
    if kind == "dagnn.Scale":
        size = _positive_ints(p["size"], f"{b}.size", "the multipliers' size", (1, 4))
        size += [1] * (4 - len(size))  # set.size pads with 1s
        try:
            has_bias = _flag(p["hasBias"], f"{b}.hasBias")
        except MatFormatError as e:
            raise ValueError(str(e)) from None
        values = [_randn(size, np.sqrt(2.0 / (size[0] * size[1] * size[2])), generator)]
        # as initParams: size(4) x 1 zeros (so one bias for the usual [1 1 C] size; broadcast by bsxfun)
        return values + ([np.zeros((size[3], 1), np.float32)] if has_bias else [])
    if kind == "dagnn.BatchNorm":
        c = _positive_ints(p["numChannels"], f"{b}.numChannels", "one number, the channel count", (1, 1))[0]
        return [np.ones((c, 1), np.float32), np.zeros((c, 1), np.float32), np.zeros((c, 2), np.float32)]
    return []  # dagnn.Layer's initParams: no parameters


# number of params each block type takes: (minimum, maximum)
_PARAM_COUNTS = {"dagnn.Conv": (1, 2), "dagnn.ConvTranspose": (1, 2), "dagnn.BatchNorm": (3, 3),
                 "dagnn.Scale": (0, 2)}


# ---------------------------------------------------------------------------
# The Module
# ---------------------------------------------------------------------------

def _param_role(dag: "DagNN", name: str) -> str:
    """'filters' if the parameter is the first parameter of a Conv/ConvTranspose, else 'other'."""
    for layer in dag.layers:
        if layer["type"] in ("dagnn.Conv", "dagnn.ConvTranspose") and layer["params"][:1] == [name]:
            return "filters"
    return "other"


def _to_torch_layout(value: np.ndarray, role: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(value))
    if role == "filters":
        t = hwcn_to_nchw(t, "filters").contiguous()  # FH x FW x FC x K -> K x FC x FH x FW
    return t


def _to_matconvnet_layout(t: torch.Tensor, role: str, shape: tuple) -> np.ndarray:
    t = t.detach()
    if role == "filters":
        t = nchw_to_hwcn(t)
    return np.ascontiguousarray(t.cpu().numpy()).reshape(shape)


class DagNNModule(nn.Module):
    """A DagNN as an ``nn.Module`` (NCHW): ``forward(**inputs)``.

    Inputs are keyword tensors named like the network's input variables,
    feature maps N x C x H x W and labels as :func:`functional.loss` takes
    them (N elements or N x 1 x H x W). Returns the value of ``output``
    (given to :meth:`DagNN.to_torch`), by default the first output of the
    last layer that could run: without labels the loss layers are skipped
    and the prediction is returned. ``params`` holds the parameters (filters
    as K x FC x FH x FW, everything else in MatConvNet's shape);
    ``param_keys`` maps MatConvNet names to its keys. ``train()`` is
    MatConvNet's 'normal' mode, ``eval()`` its 'test' mode.
    """

    def __init__(self, dag: "DagNN", output: str | None = None):
        super().__init__()
        self.order = dag.execution_order()
        self.layer_names = [layer["name"] for layer in dag.layers]
        self.layer_inputs = [list(layer["inputs"]) for layer in dag.layers]
        self.layer_outputs = [list(layer["outputs"]) for layer in dag.layers]
        self.layer_params = [list(layer["params"]) for layer in dag.layers]
        self.blocks = nn.ModuleList([_build_block(layer, f"net.layers({i + 1})")
                                     for i, layer in enumerate(dag.layers)])
        self.params = nn.ParameterDict()
        self.param_keys: dict[str, str] = {}
        self.param_roles: dict[str, str] = {}
        self.param_shapes: dict[str, tuple] = {}
        self.empty_params: set[str] = set()
        for k, (name, param) in enumerate(dag.params.items()):
            value = _float_param(param.value, f"net.params({k + 1}).value")
            role = _param_role(dag, name)
            self.param_roles[name], self.param_shapes[name] = role, value.shape
            if value.size == 0:
                self.empty_params.add(name)  # e.g. an empty filter bank (identity conv)
                continue
            key = name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"param{k}"
            self.param_keys[name] = key
            self.params[key] = nn.Parameter(_to_torch_layout(value, role))
        self.produced = {v for outs in self.layer_outputs for v in outs}
        self.label_vars = {v for layer in dag.layers if layer["type"] == "dagnn.Loss"
                           for v in layer["inputs"][1:]} - self.produced
        self.network_inputs = [v for v in dag.vars if v not in self.produced]
        if output is not None and output not in dag.vars:
            raise ValueError(f"output {output!r} is not a variable of the network")
        self.output = output

    def param(self, name: str) -> torch.Tensor | None:
        """The tensor of MatConvNet parameter ``name`` (None for an empty value)."""
        return None if name in self.empty_params else self.params[self.param_keys[name]]

    def param_to_matconvnet(self, name: str, t: torch.Tensor | None = None) -> np.ndarray:
        """Parameter ``name`` (or a tensor shaped like it, e.g. its gradient) in MatConvNet layout."""
        if name in self.empty_params:
            return np.zeros(self.param_shapes[name], np.float32)
        t = self.param(name) if t is None else t
        return _to_matconvnet_layout(t, self.param_roles[name], self.param_shapes[name])

    def param_to_torch(self, name: str, value: np.ndarray) -> torch.Tensor:
        """An array in parameter ``name``'s MatConvNet shape (e.g. a saved momentum) in the module's layout."""
        t = _to_torch_layout(np.asarray(value).reshape(self.param_shapes[name]), self.param_roles[name])
        return t.to(self.param(name))

    def run(self, inputs: dict) -> tuple[dict, list[int]]:
        """All variable values (NCHW) and the indices of the layers that ran, in order."""
        values = {k: v for k, v in inputs.items() if v is not None}
        from_intermediate = any(v in self.produced for v in values)
        executed = []
        for index in self.order:
            names = self.layer_inputs[index]
            missing = [v for v in names if v not in values]
            if missing:
                # MatConvNet skips a layer with an empty input; a missing network
                # input (other than labels) is a caller's mistake, unless the
                # caller evaluates a sub-network from an intermediate variable
                hard = [v for v in missing if v not in self.produced and v not in self.label_vars]
                if hard and not from_intermediate:
                    raise ValueError(f"layer '{self.layer_names[index]}' needs input variable "
                                     f"{hard[0]!r}, which was not given (network inputs: "
                                     f"{', '.join(self.network_inputs)})")
                continue
            params = [self.param(p) for p in self.layer_params[index]]
            try:
                outputs = self.blocks[index]([values[v] for v in names], params)
            except (ValueError, RuntimeError) as e:  # name the layer, as MatConvNet's errors do not
                raise labelled(e, f"layer '{self.layer_names[index]}'") from None
            for name, value in zip(self.layer_outputs[index], outputs):
                values[name] = value
            executed.append(index)
        return values, executed

    def forward(self, **inputs):
        unknown = [k for k in inputs if k not in self.network_inputs and k not in self.produced]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a variable of the network "
                             f"(inputs: {', '.join(self.network_inputs)})")
        values, executed = self.run(inputs)
        if self.output is not None:
            if self.output not in values:
                raise ValueError(f"output {self.output!r} was not computed: an input it depends on is missing")
            return values[self.output]
        if not executed:
            raise ValueError("no layer could run with the given inputs")
        return values[self.layer_outputs[executed[-1]][0]]


# ---------------------------------------------------------------------------
# DagNN
# ---------------------------------------------------------------------------

class DagNN:
    """A MatConvNet DagNN: ``vars``, ``params``, ``layers`` (list of dicts), ``meta``.

    Build one with :meth:`add_layer`, :meth:`loadobj` (from the saveobj
    struct), :meth:`from_simplenn`, or :func:`matconvnet_port.netio.load_net`.
    ``extra`` keeps any other top-level saveobj fields (e.g. ``conserveMemory``).
    """

    def __init__(self):
        self.vars: dict[str, Var] = {}
        self.params: dict[str, Param] = {}
        self.layers: list[dict] = []
        self.meta: dict = {}
        self.extra: dict = {}

    def __repr__(self) -> str:
        return f"DagNN({len(self.layers)} layers, {len(self.vars)} vars, {len(self.params)} params)"

    # -- construction --------------------------------------------------------

    def add_layer(self, name: str, type: str, inputs, outputs, params=(), block: dict | None = None) -> None:
        """Append a layer -- MatConvNet ``addLayer(name, block, inputs, outputs, params)``.

        ``type`` is the block class (``'dagnn.Conv'``), ``block`` its properties.
        New variable and parameter names are added (parameters with value
        ``[]``, learning rate and weight decay 1).
        """
        if any(layer["name"] == name for layer in self.layers):
            raise ValueError(f"there is already a layer with name {name!r}")
        if type not in BLOCK_DEFAULTS:
            raise ValueError(f"layer {name!r}: unsupported block type {type!r} (supported: {', '.join(BLOCK_TYPES)})")
        unknown = [k for k in (block or {}) if k not in BLOCK_DEFAULTS[type]]
        if unknown:  # MATLAB's block.(name) = value fails for a property the class lacks
            raise ValueError(f"layer {name!r}: {type} has no property {unknown[0]!r} "
                             f"(it has: {', '.join(BLOCK_DEFAULTS[type]) or 'none'})")
        inputs, outputs, params = ([inputs] if isinstance(inputs, str) else list(inputs),
                                   [outputs] if isinstance(outputs, str) else list(outputs),
                                   [params] if isinstance(params, str) else list(params))
        self.layers.append({"name": name, "type": type, "inputs": inputs, "outputs": outputs,
                            "params": params, "block": dict(block or {})})
        for v in inputs + outputs:
            self.vars.setdefault(v, Var(v))
        for p in params:
            self.params.setdefault(p, Param(p, np.zeros((0, 0), np.float32)))
        if type == "dagnn.BatchNorm" and len(params) >= 3:  # what dagnn.BatchNorm.attach sets
            moments = self.params[params[2]]
            moments.learningRate = 0.1
            moments.extra.setdefault("trainMethod", "average")

    def rename_var(self, old: str, new: str) -> None:
        """Rename a variable everywhere -- MatConvNet ``renameVar``."""
        self._rename("vars", ("inputs", "outputs"), old, new, "variable")

    def rename_layer(self, old: str, new: str) -> None:
        """Rename a layer -- MatConvNet ``renameLayer``."""
        if old != new:
            self._layer_index(old)
            if any(layer["name"] == new for layer in self.layers):
                raise ValueError(f"{new!r} is the name of an existing layer")
            self.layers[self._layer_index(old)]["name"] = new

    def rename_param(self, old: str, new: str) -> None:
        """Rename a parameter everywhere -- MatConvNet ``renameParam``."""
        self._rename("params", ("params",), old, new, "parameter")

    def _rename(self, table: str, slots: tuple, old: str, new: str, what: str) -> None:
        entries = getattr(self, table)
        if old == new:
            return
        if new in entries:
            raise ValueError(f"{new!r} is the name of an existing {what}")
        if old not in entries:
            raise ValueError(f"{old!r} is not an existing {what}")
        for layer in self.layers:
            for slot in slots:
                layer[slot] = [new if v == old else v for v in layer[slot]]
        entries = {(new if k == old else k): v for k, v in entries.items()}
        entries[new].name = new
        setattr(self, table, entries)

    def remove_layer(self, names) -> None:
        """Remove layers by name -- MatConvNet ``removeLayer``; as its ``rebuild`` does, variables
        and parameters that no remaining layer uses go too (those still used keep their values)."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self._layer_index(name)
        self.layers = [layer for layer in self.layers if layer["name"] not in names]
        used_vars = {v for layer in self.layers for v in layer["inputs"] + layer["outputs"]}
        used_params = {p for layer in self.layers for p in layer["params"]}
        self.vars = {k: v for k, v in self.vars.items() if k in used_vars}
        self.params = {k: p for k, p in self.params.items() if k in used_params}

    def _layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer["name"] == name:
                return i
        raise ValueError(f"there is no layer {name!r} (layers: {', '.join(l['name'] for l in self.layers)})")

    def _new_var_name(self, prefix: str) -> str:
        name, t = prefix, 0
        while name in self.vars:
            t += 1
            name = f"{prefix}{t}"
        return name

    # -- initialisation ------------------------------------------------------

    def init_params(self, seed: int = 0, generator: torch.Generator | None = None) -> None:
        """Give every parameter its initial value -- MatConvNet ``initParams``.

        Layer by layer, in list order, the block's ``initParams`` gives a list
        of values that go to the layer's parameters in order (a parameter
        shared by two layers ends with the later layer's value). Values are
        float32 numpy arrays in MatConvNet layout, shaped as MATLAB's arrays
        (trailing singleton dimensions after the second dropped, as after a
        ``.mat`` round trip):

        * ``dagnn.Conv``, ``size`` [FH FW FC K] (padded with 1s as its
          ``set.size`` does): filters FH x FW x FC x K, ``randn * sqrt(2 / (FH*FW*FC))``;
          if ``hasBias``, biases K x 1 zeros.
        * ``dagnn.ConvTranspose``, ``size`` [FH FW K C] (K filters, input depth
          C): filters FH x FW x K x C, ``randn * sqrt(2 / (FH*FW*C))``; if
          ``hasBias``, biases (K*numGroups) x 1 zeros.
        * ``dagnn.BatchNorm``, ``numChannels`` C: multipliers C x 1 ones,
          biases C x 1 zeros, moments C x 2 zeros (sigma 0: 'test' mode
          divides by zero until training has set them, as in MatConvNet).
        * ``dagnn.Scale``, ``size`` (1 to 4 numbers, padded with 1s): multipliers
          of that size, ``randn * sqrt(2 / prod(size(1:3)))``; if ``hasBias``,
          biases size(4) x 1 zeros (one for the usual [1 1 C], broadcast by ``bsxfun``).
        * any other block: no values (it has no parameters).

        The values go to the parameters as MATLAB's ``deal`` hands them out:
        one value per parameter, or a single value copied to every parameter
        (a Conv with ``hasBias`` false but two parameters gets its filters in
        both, as in MatConvNet). Only ``value`` changes; learning rates,
        weight decays and ``der`` are kept.

        Random numbers: standard normal float32 from ``generator`` if given,
        else from a CPU ``torch.Generator`` seeded with ``seed``, filled in
        MATLAB's column-major element order. The same seed gives the same
        values; the distribution and scale are MatConvNet's, the numbers are
        not (MATLAB's randn stream cannot be reproduced).

        Deliberate differences from MatConvNet: a missing or zero ``size``, or
        one of more than 4 entries, is an error (MATLAB makes empty filters, and NaN biases when the fan-in
        is 0); a ConvTranspose gets K*numGroups biases (MatConvNet makes K,
        which ``vl_nnconvt`` refuses for numGroups > 1); on an error no
        parameter has changed (MATLAB stops half-way).

        ValueError, one line naming the layer: a bad ``size``, ``hasBias``,
        ``numGroups`` or ``numChannels``; a layer whose parameter count does
        not take its block's values (``deal``'s error in MATLAB).
        """
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        assignments = []  # all values first, so that an error leaves the net as it was
        for layer in self.layers:
            where = f"layer {layer['name']!r}"
            values = _init_values(layer, where, generator)
            names = layer["params"]
            if len(values) == 1:  # deal(x): x to every output
                values = values * len(names)
            elif len(values) != len(names):
                raise ValueError(f"{where}: its {layer['type']} block initialises {len(values)} parameters, "
                                 f"the layer has {len(names)} ({', '.join(map(repr, names)) or 'none'})")
            assignments.extend(zip(names, values))
        for name, value in assignments:
            self.params[name].value = value.copy()  # deal's copies: no two parameters share memory

    # -- graph ---------------------------------------------------------------

    def execution_order(self) -> list[int]:
        """Layer indices in MatConvNet's evaluation order (``rebuild``'s ``getOrder``).

        A layer's height is 1 + the largest height of the layers reading its
        outputs (0 without readers); layers run by decreasing height, ties in
        list order. ValueError naming a layer on a cycle, or a variable
        written by two layers.
        """
        writer: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            for v in layer["outputs"]:
                if v in writer:
                    raise ValueError(f"variable {v!r} is the output of two layers, "
                                     f"'{self.layers[writer[v]]['name']}' and '{layer['name']}'")
                writer[v] = i
        readers: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            for v in layer["inputs"]:
                readers.setdefault(v, []).append(i)
        children = [[c for v in layer["outputs"] for c in readers.get(v, [])] for layer in self.layers]
        height = [0] * len(self.layers)  # 0 unvisited, -1 open, >0 done
        for start in range(len(self.layers)):
            if height[start]:
                continue
            height[start] = -1
            stack = [(start, iter(children[start]))]
            while stack:
                node, it = stack[-1]
                child = next(it, None)
                if child is None:
                    stack.pop()
                    height[node] = 1 + max([height[c] for c in children[node]], default=0)
                elif height[child] == -1:
                    raise ValueError(f"the network graph contains a cycle through layer "
                                     f"'{self.layers[child]['name']}'")
                elif height[child] == 0:
                    height[child] = -1
                    stack.append((child, iter(children[child])))
        return sorted(range(len(self.layers)), key=lambda i: -height[i])

    # -- evaluation ----------------------------------------------------------

    def to_torch(self, device=None, dtype: torch.dtype | None = None, output: str | None = None) -> DagNNModule:
        """An ``nn.Module`` (NCHW) with copies of the parameters; see :class:`DagNNModule`."""
        module = DagNNModule(self, output=output)
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        return module

    def load_torch_weights(self, module: DagNNModule) -> None:
        """Write a module's parameters back into ``params[name].value`` (MatConvNet layout, numpy),
        e.g. after training ``to_torch()`` with a torch optimiser; empty parameters stay empty."""
        for name, param in self.params.items():
            if name in module.param_keys:
                param.value = module.param_to_matconvnet(name)
            elif name not in module.empty_params:
                raise ValueError(f"the module has no parameter {name!r}: it was not made from this net")

    def eval(self, inputs: dict, derivatives: dict | None = None, mode: str = "normal") -> None:
        """Evaluate the network -- MatConvNet ``dag.eval(inputs, derOutputs)``.

        ``inputs`` maps input variable names to values in MatConvNet layout
        (numpy or torch): feature maps H x W x C x N, labels with N elements
        or H x W x 1 x N. ``derivatives`` maps output variables to their
        derivative (``{'objective': 1}``; an array shaped like the output
        for non-scalar outputs); when given, the backward pass runs too.
        Either may also be MATLAB's flat ``['input', x, 'label', c]``.
        ``mode`` 'normal' or 'test' (dropout off, batch norm with stored
        moments; where they are empty, the batch's -- MatConvNet would refuse
        the empty moments, this port computes what vl_nnbnorm does without them).

        Afterwards ``vars[name].value`` / ``.der`` and ``params[name].der``
        are numpy arrays in MatConvNet layout (scalars as 1 x 1), or None
        for variables that were not computed / not on the derivative path.
        Computed in IEEE float32 (float64 if the inputs are double).
        """
        if mode not in ("normal", "test"):
            raise ValueError(f"mode must be 'normal' or 'test', got {mode!r}")
        inputs = _name_value_pairs(inputs, "inputs")
        derivatives = None if derivatives is None else _name_value_pairs(derivatives, "derivatives")
        for name in list(inputs) + list(derivatives or {}):
            if name not in self.vars:
                raise ValueError(f"{name!r} is not a variable of the network (variables: {', '.join(self.vars)})")
        doder = bool(derivatives)
        module = self.to_torch()
        tensors, device, dtype = self._input_tensors(module, inputs, doder)
        module = module.to(device=device, dtype=dtype)
        module.train(mode == "normal")
        for var in self.vars.values():
            var.value, var.der = None, None
        for param in self.params.values():
            param.der = None

        with exact_fp32(), torch.set_grad_enabled(doder):
            values, executed = module.run(tensors)
            if doder:
                for t in values.values():
                    if t.requires_grad and not t.is_leaf:
                        t.retain_grad()
                self._backward(values, derivatives)

        for name, t in values.items():
            self.vars[name].value = np.array(inputs[name]) if name in inputs and not isinstance(
                inputs[name], torch.Tensor) else _var_to_matconvnet(t)
            if doder and t.grad is not None:
                self.vars[name].der = _var_to_matconvnet(t.grad)
        if doder:
            self._param_ders(module, executed, values)

    def _input_tensors(self, module: DagNNModule, inputs: dict, doder: bool):
        """Inputs -> NCHW tensors (labels as N elements or N x D x H x W); the device and dtype to use."""
        raw = {name: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(v))))
               for name, v in inputs.items() if v is not None}
        features = [t for name, t in raw.items() if name not in module.label_vars and t.is_floating_point()]
        for name, t in raw.items():
            if name not in module.label_vars and t.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"input {name!r} must be single or double, got {t.dtype}")
        dtype = features[0].dtype if features else torch.float32
        device = features[0].device if features else torch.device("cpu")
        batch = None
        if features:
            shape = tuple(features[0].shape) + (1,) * (4 - features[0].dim())
            batch = shape[3]
        tensors = {}
        for name, t in raw.items():
            t = t.to(device)
            if name in module.label_vars:
                # vl_nnloss: N elements are one label per image, else H x W x D x N
                tensors[name] = t.reshape(-1) if batch is not None and t.numel() == batch else hwcn_to_nchw(t, name)
            else:
                t = hwcn_to_nchw(t.to(dtype), name).detach()
                tensors[name] = t.requires_grad_(doder)
        return tensors, device, dtype

    def _backward(self, values: dict, derivatives: dict) -> None:
        total = None
        for name, seed in derivatives.items():
            if name not in values:
                raise ValueError(f"cannot backpropagate from {name!r}: it was not computed (a missing input?)")
            y = values[name]
            s = torch.as_tensor(np.asarray(seed) if not isinstance(seed, torch.Tensor) else seed,
                                dtype=y.dtype, device=y.device)
            if y.dim() == 4 and s.numel() == y.numel() and s.numel() > 1:
                s = hwcn_to_nchw(s, f"derivative of {name}").reshape(y.shape)
            elif s.numel() != 1 and s.numel() != y.numel():
                raise ValueError(f"the derivative of {name!r} must be a scalar or have {y.numel()} elements, "
                                 f"got {s.numel()}")
            term = (y * s.reshape(y.shape) if s.numel() == y.numel() else y * s.reshape(())).sum()
            total = term if total is None else total + term
        if total is not None and total.requires_grad:
            total.backward()

    def _param_ders(self, module: DagNNModule, executed: list[int], values: dict) -> None:
        for index in executed:
            block = module.blocks[index]
            for j, name in enumerate(module.layer_params[index]):
                if isinstance(block, _BatchNorm) and j == 2:
                    # dagnn.BatchNorm: the "derivative" of the moments is the batch moments times N
                    n = values[module.layer_inputs[index][0]].shape[0]
                    der = block.batch_moments * n  # C x 2, then in the parameter's shape, filled column-major
                    shape = module.param_shapes[name]
                    der = (fn.bnorm_moments_as(der, shape) if der.numel() == np.prod(shape) else der).cpu().numpy()
                else:
                    t = module.param(name)
                    if t is None:
                        continue
                    grad = t.grad if t.grad is not None else torch.zeros_like(t)
                    der = module.param_to_matconvnet(name, grad)
                self.params[name].der = der

    # -- MatConvNet conversions ----------------------------------------------

    def saveobj(self) -> dict:
        """The struct of MatConvNet's ``saveobj``: ``vars``, ``params``, ``layers``, ``meta``.

        Struct arrays are lists of dicts (written as 1 x K struct arrays by
        :func:`matconvnet_port.netio.save_net`); cells are lists; numbers
        numpy arrays or Python scalars; parameter values numpy float32 or float64.
        """
        # a struct array has one set of fields: a param without another's extra field gets it empty, as
        # MATLAB would -- except trainMethod, whose value addParam gives every parameter ('gradient';
        # an empty one would stop cnn_train_dag from updating it)
        extra_fields = list(dict.fromkeys(k for p in self.params.values() for k in p.extra))
        missing = {k: ("gradient" if k == "trainMethod" else np.zeros((0, 0))) for k in extra_fields}
        out = {
            "vars": [{"name": v.name, "precious": bool(v.precious)} for v in self.vars.values()],
            "params": [{"name": p.name, "value": _float_param(p.value, f"params {p.name}"),
                        "learningRate": p.learningRate, "weightDecay": p.weightDecay,
                        **missing, **copy.deepcopy(p.extra)}
                       for p in self.params.values()],
            "layers": [{"name": layer["name"], "type": layer["type"], "inputs": list(layer["inputs"]),
                        "outputs": list(layer["outputs"]), "params": list(layer["params"]),
                        "block": copy.deepcopy(layer["block"])} for layer in self.layers],
            "meta": copy.deepcopy(self.meta),
        }
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def loadobj(cls, s: dict, where: str = "net") -> "DagNN":
        """A DagNN from the ``saveobj`` struct -- MatConvNet ``dagnn.DagNN.loadobj``.

        Accepts matio's representation (struct arrays as StructArray, cells as
        object arrays) or the plain one of :meth:`saveobj`. Raises
        :class:`MatFormatError` naming the field (``net.layers(3).block.pad``)
        for anything malformed or unsupported.
        """
        if not isinstance(s, dict):
            raise MatFormatError(f"{where}: expected a struct, got {type(s).__name__}")
        for key in ("layers", "vars", "params"):
            if key not in s:
                raise MatFormatError(f"{where}: no field '{key}' (not a DagNN saveobj struct)")
        dag = cls()
        for i, layer in enumerate(_struct_items(s["layers"], f"{where}.layers")):
            w = f"{where}.layers({i + 1})"
            for key in ("name", "type", "inputs", "outputs", "block"):  # loadobj reads every one
                if key not in layer:
                    raise MatFormatError(f"{w}: no field '{key}'")
            name = _text(layer["name"], f"{w}.name")
            kind = _text(layer["type"], f"{w}.type")
            if kind not in BLOCK_DEFAULTS:
                raise MatFormatError(f"{w}.type: unsupported block type {kind!r} "
                                     f"(supported: {', '.join(BLOCK_TYPES)})")
            block = layer.get("block")
            if block is None or (isinstance(block, np.ndarray) and block.size == 0):
                block = {}
            if not isinstance(block, dict):
                raise MatFormatError(f"{w}.block: expected a struct, got {type(block).__name__}")
            unknown = {k: v for k, v in block.items() if k not in BLOCK_DEFAULTS[kind]}
            if unknown:  # another MatConvNet version's property, or a typo: not computed with, kept on save
                warnings.warn(f"{w}.block: {kind} property {', '.join(map(repr, unknown))} is not one this port "
                              f"knows ({', '.join(BLOCK_DEFAULTS[kind]) or 'none'}); it is ignored", stacklevel=2)
            try:
                dag.add_layer(name, kind, _names(layer["inputs"], f"{w}.inputs"),
                              _names(layer["outputs"], f"{w}.outputs"),
                              _names(layer.get("params"), f"{w}.params"),
                              {k: v for k, v in block.items() if k not in unknown})
            except ValueError as e:
                raise MatFormatError(f"{w}: {e}") from None
            dag.layers[-1]["block"].update(unknown)
        for i, item in enumerate(_struct_items(s["params"], f"{where}.params")):
            w = f"{where}.params({i + 1})"
            name = _text(item.get("name"), f"{w}.name")
            if name not in dag.params:
                continue  # loadobj only keeps parameters some layer uses
            param = dag.params[name]
            for key, value in item.items():
                if key == "name":
                    continue
                if key == "value":
                    param.value = _float_param(value, f"{w}.value")
                elif key in ("learningRate", "weightDecay"):
                    setattr(param, key, _plain_number(value))
                else:
                    param.extra[key] = value  # e.g. trainMethod: saved back as it was
        for i, item in enumerate(_struct_items(s["vars"], f"{where}.vars")):
            w = f"{where}.vars({i + 1})"
            name = _text(item.get("name"), f"{w}.name")
            if name in dag.vars and "precious" in item:
                dag.vars[name].precious = _flag(item["precious"], f"{w}.precious")
        dag.meta = s.get("meta", {})
        dag.extra = {k: v for k, v in s.items() if k not in ("layers", "vars", "params", "meta")}
        dag.validate(where)
        return dag

    def validate(self, where: str = "net") -> None:
        """Check the graph, the blocks and the parameter shapes; MatFormatError naming the field."""
        try:
            self.execution_order()
        except ValueError as e:
            raise MatFormatError(f"{where}.layers: {e}") from None
        param_index = {name: k for k, name in enumerate(self.params)}
        for i, layer in enumerate(self.layers):
            w = f"{where}.layers({i + 1})"
            _build_block(layer, w)
            lo, hi = _PARAM_COUNTS.get(layer["type"], (0, 0))
            n = len(layer["params"])
            if not lo <= n <= hi:
                raise MatFormatError(f"{w}.params: a {layer['type']} layer takes "
                                     f"{lo if lo == hi else f'{lo} to {hi}'} parameters, got {n}")
            if layer["type"] in ("dagnn.Conv", "dagnn.ConvTranspose") and n < 2 and \
                    _flag(_block_props(layer, w)["hasBias"], f"{w}.block.hasBias"):
                # MatConvNet's forward reads params{2} unless hasBias is false: an error there, not a net without biases
                raise MatFormatError(f"{w}.params: a {layer['type']} layer with hasBias true takes 2 parameters "
                                     f"(filters, biases), got 1")
            values = [self.params[p].value for p in layer["params"]]
            pw = [f"{where}.params({param_index[p] + 1}).value" for p in layer["params"]]
            if layer["type"] == "dagnn.Scale" and any(_param_role(self, p) == "filters" for p in layer["params"]):
                raise MatFormatError(f"{w}.params: a dagnn.Scale parameter that is also a filter bank of a "
                                     f"Conv/ConvTranspose layer is not supported (give Scale its own parameter)")
            _check_param_shapes(layer, values, pw, w)

    @classmethod
    def from_simplenn(cls, net, canonical_names: bool = True) -> "DagNN":
        """A DagNN from a SimpleNN -- MatConvNet ``dagnn.DagNN.fromSimpleNN``.

        Variables ``x0``, ``x1``, ... (``xi`` the output of layer i), the
        loss label ``label``; parameters ``<name>f``/``<name>b`` (conv),
        ``<name>m``/``<name>b``/``<name>x`` (bnorm). With
        ``canonical_names`` the input is ``input``, the loss output
        ``objective``, the scores fed to a loss (or softmax) ``prediction``
        and a softmax output ``prob``. Two deliberate differences from
        MatConvNet, so that the DagNN computes what the SimpleNN computes:
        a conv's ``dilate`` is carried over and a bnorm's epsilon is that of
        ``vl_simplenn`` (``layer.epsilon``, tidy's default 1e-5), where
        ``fromSimpleNN`` drops both. ``loss`` layers are supported too.
        """
        from .simplenn import vl_simplenn_tidy

        tidy = vl_simplenn_tidy(net)
        dag = cls()
        dag.meta = copy.deepcopy(tidy.meta)
        for l, layer in enumerate(tidy.layers, start=1):
            name = str(layer.get("name", f"layer{l}"))
            block_type, block, params = _block_from_simplenn(layer, name, f"net.layers{{{l}}}")
            inputs = [f"x{l - 1}"]
            if block_type == "dagnn.Loss":
                inputs.append(dag._new_var_name("label"))  # the loss reads its labels from a variable
            dag.add_layer(name, block_type, inputs, [f"x{l}"], [p[0] for p in params], block)
            _copy_simplenn_params(dag, layer, params)

        if canonical_names:
            dag._canonical_names()
        dag.validate("net")
        return dag

    def _canonical_names(self) -> None:
        """fromSimpleNN's 'canonicalNames': input, prob, prediction, objective."""
        for l, layer in enumerate(self.layers):
            if l == 0:
                self.rename_var(layer["inputs"][0], "input")
            if layer["type"] == "dagnn.SoftMax":
                self.rename_var(layer["outputs"][0], self._new_var_name("prob"))
                self.rename_var(layer["inputs"][0], self._new_var_name("prediction"))
            if layer["type"] == "dagnn.Loss":
                target = "objective" if "objective" not in self.vars else self._new_var_name("objective")
                self.rename_var(layer["outputs"][0], target)
                if not layer["inputs"][0].startswith("prob"):
                    self.rename_var(layer["inputs"][0], self._new_var_name("prediction"))


def _plain_number(value):
    """A 1 x 1 double as a Python float (saved back as 1 x 1 double); anything else unchanged."""
    if isinstance(value, np.ndarray) and value.dtype == np.float64 and value.size == 1:
        return float(value.reshape(-1)[0])
    return value


def _opts_list(layer: dict) -> list:
    return list(cell_items(layer.get("opts")))


def _block_from_simplenn(layer: dict, name: str, where: str) -> tuple[str, dict, list]:
    """(block type, block properties, [(param name, value, index into learningRate)]) of a SimpleNN layer."""
    kind = layer["type"]
    weights = list(layer.get("weights") or [])
    num = lambda key, default=None: _numbers(layer.get(key, default), f"{where}.{key}")  # noqa: E731
    if kind in ("conv", "convt"):
        filters = np.asarray(weights[0]) if weights and weights[0] is not None else np.zeros((0, 0), np.float32)
        has_bias = len(weights) > 1 and weights[1] is not None and np.asarray(weights[1]).size > 0
        params = [(f"{name}f", filters, 0)] + ([(f"{name}b", weights[1], 1)] if has_bias else [])
        size = _row((list(filters.shape) + [1, 1, 1, 1])[:4])
        if kind == "conv":
            return "dagnn.Conv", {"size": size, "hasBias": _logical(has_bias),
                                  "pad": _row(fn._pad4(num("pad"))),
                                  "stride": _row(fn._pos2(num("stride"), "stride")),
                                  "dilate": _row(fn._pos2(num("dilate", 1), "dilate")),
                                  "opts": _opts_list(layer)}, params
        return "dagnn.ConvTranspose", {"size": size, "hasBias": _logical(has_bias), "upsample": _row(num("upsample")),
                                       "crop": _row(num("crop")), "numGroups": _row(num("numGroups")),
                                       "opts": _opts_list(layer)}, params
    if kind == "pool":
        return "dagnn.Pooling", {"method": str(layer["method"]), "poolSize": _row(num("pool")),
                                 "pad": _row(fn._pad4(num("pad"))), "stride": _row(fn._pos2(num("stride"), "stride")),
                                 "dilate": _row([1, 1]), "opts": _opts_list(layer)}, []
    if kind in ("normalize", "lrn"):
        return "dagnn.LRN", {"param": _row(num("param"))}, []
    if kind == "dropout":
        return "dagnn.DropOut", {"rate": _row(num("rate")), "frozen": _logical(False)}, []
    if kind == "relu":  # vl_simplenn passes the leak only when > 0
        leak = [v if v > 0 else 0.0 for v in num("leak")]
        return "dagnn.ReLU", {"leak": _row(leak), "useShortCircuit": _logical(True), "opts": []}, []
    if kind == "sigmoid":
        return "dagnn.Sigmoid", {}, []
    if kind == "softmax":
        return "dagnn.SoftMax", {}, []
    if kind in ("softmaxloss", "loss"):  # vl_simplenn calls vl_nnloss(x, l.class): softmaxlog, no options
        return "dagnn.Loss", {"loss": "softmaxlog", "ignoreAverage": _logical(False), "normalise": _logical(True),
                              "opts": []}, []
    if kind == "bnorm":
        params = [(f"{name}{suffix}", weights[j] if j < len(weights) else None, j) for j, suffix in enumerate("mbx")]
        return "dagnn.BatchNorm", {"numChannels": _row([np.asarray(weights[0]).size]),
                                   "epsilon": _row([_scalar(layer["epsilon"], f"{where}.epsilon")]),
                                   "opts": []}, params
    raise ValueError(f"{where}: layer type {kind!r} cannot be converted to a DagNN")


def _copy_simplenn_params(dag: DagNN, layer: dict, params: list) -> None:
    """Values, learning rates and weight decays of a SimpleNN layer's parameters (fromSimpleNN)."""
    lr = _numbers(layer["learningRate"], "learningRate") if "learningRate" in layer else []
    wd = _numbers(layer["weightDecay"], "weightDecay") if "weightDecay" in layer else []
    for name, value, j in params:
        param = dag.params[name]
        if value is not None and np.asarray(value).size > 0:
            param.value = _float_param(value, name)
        if j < len(lr):
            param.learningRate = lr[j]
        if layer["type"] == "bnorm" and j == 2:
            if wd:
                param.weightDecay = 0.0  # fromSimpleNN never decays the moments
        elif j < len(wd):
            param.weightDecay = wd[j]


def _var_to_matconvnet(t: torch.Tensor) -> np.ndarray:
    """A variable's value or derivative in MatConvNet layout (0-d -> 1 x 1)."""
    t = t.detach()
    if t.dim() == 4:
        t = nchw_to_hwcn(t)
    a = np.ascontiguousarray(t.cpu().numpy())
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1)
    return a


def _vector_size(value) -> int | None:
    """Number of elements of a vector (one non-singleton dimension at most), else None."""
    shape = np.shape(value)
    return int(np.prod(shape)) if sum(d != 1 for d in shape) <= 1 else None


def _check_param_shapes(layer: dict, values: list, where: list[str], layer_where: str) -> None:
    """Filters at most 4-D; bias count = number of filters; batch-norm sizes consistent."""
    kind = layer["type"]
    if kind in ("dagnn.Conv", "dagnn.ConvTranspose"):
        f = values[0]
        if f.ndim > 4:
            raise MatFormatError(f"{where[0]}: filters must be FH x FW x FC x K (at most 4-D), got shape {f.shape}")
        props = _block_props(layer, layer_where)
        if len(values) > 1 and _flag(props["hasBias"], f"{layer_where}.block.hasBias") and values[1].size:
            shape4 = tuple(f.shape) + (1,) * (4 - f.ndim)
            if kind == "dagnn.Conv":
                k = shape4[3] if f.size else None
            else:
                k = shape4[2] * int(_scalar(props["numGroups"], f"{layer_where}.block.numGroups"))
            n = _vector_size(values[1])
            if n is None:
                raise MatFormatError(f"{where[1]}: biases must be a vector, got shape {values[1].shape}")
            if k is not None and n != k:
                raise MatFormatError(f"{where[1]}: {n} biases for {k} filters")
    elif kind == "dagnn.Scale":
        for value, w in zip(values, where):
            if np.ndim(value) > 4:
                raise MatFormatError(f"{w}: a dagnn.Scale parameter has at most 4 dimensions (H x W x C x N), "
                                     f"got shape {np.shape(value)}")
    elif kind == "dagnn.BatchNorm":
        g, b, m = values
        ng, nb = _vector_size(g), _vector_size(b)
        if ng is None or nb is None or ng != nb:
            raise MatFormatError(f"{where[1]}: batch-norm multipliers ({np.shape(g)}) and biases "
                                 f"({np.shape(b)}) must be vectors of the same length")
        if m.size and m.size != 2 * ng:
            raise MatFormatError(f"{where[2]}: batch-norm moments must be {ng} x 2, got shape {m.shape}")
