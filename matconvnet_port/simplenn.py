"""SimpleNN networks: MatConvNet's ``net.layers`` chain, ``vl_simplenn`` and ``vl_simplenn_tidy``.

A :class:`SimpleNN` is what MATLAB has in ``net``: ``net.layers`` is a list
of plain dicts with MatConvNet's field names (``type``, ``name``,
``weights`` = [filters, biases] as numpy float32 (or float64) arrays in MatConvNet layout
FH x FW x FC x K and 1 x K, ``pad``, ``stride``, ``dilate``, ``method``,
``pool``, ``leak``, ``class``, ...), ``net.meta`` a dict. Edit it as in
MATLAB (``net.layers[2]['pad'] = 1``, ``net.layers = net.layers[:-1]``);
``copy.deepcopy(net)`` works.

:func:`vl_simplenn` evaluates the chain as MatConvNet does (forward, and
backward when ``dzdy`` is given) and returns MATLAB's ``res`` array (0-based:
``res[0].x`` is the input). ``net.to_torch()`` gives a plain ``nn.Module``
(NCHW) built from :mod:`matconvnet_port.layers` for PyTorch users; both run
the same functions of :mod:`matconvnet_port.functional`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from . import functional as fn
from . import layers as L
from .errors import labelled
from .matio import cell_items
from .precision import exact_fp32
from .vl_nn import hwcn_to_nchw, nchw_to_hwcn

__all__ = ["SimpleNN", "SimpleNNModule", "Res", "vl_simplenn", "vl_simplenn_tidy", "LAYER_TYPES",
           "LOSS_LAYER_TYPES"]

LAYER_TYPES = ("conv", "convt", "pool", "relu", "sigmoid", "softmax", "softmaxloss", "loss",
               "normalize", "lrn", "bnorm", "dropout")
LOSS_LAYER_TYPES = ("softmaxloss", "loss")

# vl_simplenn_tidy's defaults (MatConvNet master), per layer type
_DEFAULTS: dict[str, dict[str, Any]] = {
    "conv": {"pad": 0, "stride": 1, "dilate": 1, "opts": []},
    "convt": {"crop": 0, "upsample": 1, "numGroups": 1, "opts": []},
    "pool": {"method": "max", "pad": 0, "stride": 1, "opts": []},
    "relu": {"leak": 0},
    "dropout": {"rate": 0.5},
    "normalize": {"param": [5, 1, 0.0001 / 5, 0.75]},
    "lrn": {"param": [5, 1, 0.0001 / 5, 0.75]},
    "bnorm": {"epsilon": 1e-5},  # vl_simplenn passes it on: not vl_nnbnorm's own default of 1e-4
}


class SimpleNN:
    """A MatConvNet SimpleNN network: ``layers`` (list of dicts) and ``meta`` (dict)."""

    def __init__(self, layers: list[dict] | None = None, meta: dict | None = None):
        self.layers = list(layers or [])
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        kinds = " ".join(str(layer.get("type", "?")) for layer in self.layers)
        return f"SimpleNN({len(self.layers)} layers: {kinds})"

    def copy(self) -> "SimpleNN":
        return copy.deepcopy(self)

    def to_torch(self, device=None, dtype: torch.dtype | None = None) -> "SimpleNNModule":
        """An ``nn.Module`` (NCHW) with copies of the weights; see :class:`SimpleNNModule`."""
        tidy = vl_simplenn_tidy(self)
        modules = [_labelled_module(i, layer) for i, layer in enumerate(tidy.layers)]
        module = SimpleNNModule(modules, [layer["type"] for layer in tidy.layers],
                                [layer["name"] for layer in tidy.layers],
                                [layer.get("class") for layer in tidy.layers])
        if dtype is not None or device is not None:
            module = module.to(device=device, dtype=dtype)
        return module

    def load_torch_weights(self, module: "SimpleNNModule") -> None:
        """Write a module's parameters back into ``layers[i]['weights']`` (MatConvNet layout, numpy)."""
        if len(module.layers) != len(self.layers):
            raise ValueError(f"module has {len(module.layers)} layers, the net {len(self.layers)}")
        for layer, m in zip(self.layers, module.layers):
            weights = _layer_weights_from_module(m, layer)
            if weights is not None:
                layer["weights"] = weights


def vl_simplenn_tidy(net) -> SimpleNN:
    """Fill in MatConvNet's defaults and upgrade old formats -- ``vl_simplenn_tidy``.

    Returns a new :class:`SimpleNN` (the argument is not modified): pre-beta17
    ``filters``/``biases`` become ``weights``; top-level ``classes`` and
    ``normalization`` move under ``meta``; missing fields get defaults (pad 0,
    stride 1, dilate 1, opts {}, leak 0, rate 0.5, LRN param, pool method
    'max', precious false, bnorm moments zeros C x 2 and epsilon 1e-5) and unnamed layers the
    name ``layer<i>`` (1-based position). Accepts a SimpleNN or a dict with
    ``layers`` (and ``meta``/``classes``/``normalization``).
    """
    if isinstance(net, SimpleNN):
        layers, meta, extra = net.layers, net.meta, {}
    elif isinstance(net, dict):
        layers, meta, extra = cell_items(net.get("layers")), dict(net.get("meta") or {}), net
    else:
        raise ValueError(f"net must be a SimpleNN or a dict with 'layers', got {type(net).__name__}")
    meta = copy.deepcopy(meta)
    for old in ("classes", "normalization"):
        if old in extra and old not in meta:
            meta[old] = copy.deepcopy(extra[old])
    tidy = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or "type" not in layer:
            raise ValueError(f"net.layers{{{i + 1}}} must be a struct with a 'type' field")
        layer = copy.deepcopy(layer)
        kind = layer["type"]
        if kind in ("conv", "convt", "bnorm") and "weights" not in layer:
            layer["weights"] = [layer.pop("filters", None), layer.pop("biases", None)]
        layer["weights"] = cell_items(layer.get("weights"))
        if kind == "bnorm" and len(layer["weights"]) < 3:
            channels = np.asarray(layer["weights"][0]).size
            layer["weights"].append(np.zeros((channels, 2), np.float32))
        for key, value in _DEFAULTS.get(kind, {}).items():
            layer.setdefault(key, copy.deepcopy(value))
        layer.setdefault("name", f"layer{i + 1}")
        layer.setdefault("precious", False)
        tidy.append(layer)
    return SimpleNN(tidy, meta)


# ---------------------------------------------------------------------------
# layer dict <-> Module
# ---------------------------------------------------------------------------

def _layer_label(i: int, layer: dict) -> str:
    return f"net.layers{{{i + 1}}} ({layer.get('type')} '{layer.get('name', '')}')"


def _weight(i: int, layer: dict, j: int, ndim: int | None = None) -> torch.Tensor | None:
    """``weights{j+1}`` as a tensor (None if empty), trailing singleton dims restored."""
    weights = layer.get("weights", [])
    if j >= len(weights) or weights[j] is None:
        return None
    w = weights[j]
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().numpy()
    w = np.asarray(w)
    if w.size == 0:
        return None
    if w.dtype not in (np.float32, np.float64):
        raise ValueError(f"{_layer_label(i, layer)}: weights{{{j + 1}}} must be single or double, got {w.dtype}")
    if ndim is not None:
        if w.ndim > ndim:
            raise ValueError(f"{_layer_label(i, layer)}: weights{{{j + 1}}} must have at most {ndim} "
                             f"dimensions, got shape {w.shape}")
        w = w.reshape(w.shape + (1,) * (ndim - w.ndim))
    return torch.from_numpy(np.ascontiguousarray(w))


def _opts_dilate(layer: dict):
    """``dilate`` may also sit in ``opts`` as ``{'dilate', d}`` (MatConvNet passes opts through)."""
    dilate = layer.get("dilate", 1)
    opts = cell_items(layer.get("opts"))
    for k in range(0, len(opts) - 1, 2):
        if isinstance(opts[k], str) and opts[k].lower() == "dilate":
            dilate = opts[k + 1]
    return dilate


def _labelled_module(i: int, layer: dict) -> nn.Module:
    """:func:`_module_from_layer`, its errors one line that names the layer (and the field it missed)."""
    try:
        return _module_from_layer(i, layer)
    except KeyError as e:
        raise ValueError(f"{_layer_label(i, layer)}: a {layer['type']} layer needs the field {e.args[0]!r}") from None
    except (ValueError, TypeError, IndexError) as e:
        if str(e).startswith(_layer_label(i, layer)):
            raise
        raise ValueError(f"{_layer_label(i, layer)}: {e}".replace("\n", " ")) from None


def _module_from_layer(i: int, layer: dict) -> nn.Module:
    kind = layer["type"]
    if kind == "conv":
        f = _weight(i, layer, 0, 4)
        b = _weight(i, layer, 1)
        f = None if f is None else f.permute(3, 2, 0, 1).contiguous()
        if b is not None:
            k = f.shape[0] if f is not None else b.numel()
            if b.numel() != k:
                raise ValueError(f"{_layer_label(i, layer)}: weights{{2}} has {b.numel()} biases for {k} filters")
            b = b.reshape(-1)
        return L.Conv(f, b, pad=layer["pad"], stride=layer["stride"], dilate=_opts_dilate(layer))
    if kind == "convt":
        f = _weight(i, layer, 0, 4)
        if f is None:
            raise ValueError(f"{_layer_label(i, layer)}: convt needs filters in weights{{1}}")
        b = _weight(i, layer, 1)
        return L.ConvTranspose(f.permute(3, 2, 0, 1).contiguous(), None if b is None else b.reshape(-1),
                               upsample=layer["upsample"], crop=layer["crop"],
                               num_groups=int(np.asarray(layer["numGroups"]).reshape(-1)[0]))
    if kind == "pool":
        return L.Pool(layer["pool"], pad=layer["pad"], stride=layer["stride"], method=str(layer["method"]))
    if kind == "relu":
        leak = float(np.asarray(layer["leak"]).reshape(-1)[0])
        return L.ReLU(leak if leak > 0 else 0.0)  # vl_simplenn passes the leak only when it is > 0
    if kind == "sigmoid":
        return L.Sigmoid()
    if kind == "softmax":
        return L.SoftMax()
    if kind == "softmaxloss":
        return L.SoftMaxLoss()
    if kind == "loss":
        # vl_simplenn calls vl_nnloss(x, l.class) with no options, whatever the layer holds
        ignored = (["loss"] if "loss" in layer else []) + (["opts"] if cell_items(layer.get("opts")) else [])
        if ignored:
            warnings.warn(f"{_layer_label(i, layer)}: vl_simplenn ignores a loss layer's "
                          f"{' and '.join(repr(k) for k in ignored)} (it calls vl_nnloss(x, l.class)): "
                          f"the loss is softmaxlog, as in MatConvNet; use a DagNN Loss block for other losses",
                          stacklevel=2)
        return L.Loss()
    if kind in ("normalize", "lrn"):
        return L.LRN(np.asarray(layer["param"], dtype=np.float64).reshape(-1))
    if kind == "bnorm":
        g, b, m = (_weight(i, layer, j) for j in range(3))
        if g is None or b is None:
            raise ValueError(f"{_layer_label(i, layer)}: bnorm needs multipliers and biases in weights")
        eps = float(np.asarray(layer["epsilon"]).reshape(-1)[0])  # tidy's default when the file has none
        return L.BatchNorm(g.reshape(-1), b.reshape(-1), None if m is None else fn.bnorm_moments(m, g.numel()), eps)
    if kind == "dropout":
        return L.DropOut(float(np.asarray(layer["rate"]).reshape(-1)[0]))
    raise ValueError(f"{_layer_label(i, layer)}: unsupported layer type {kind!r} "
                     f"(supported: {', '.join(LAYER_TYPES)})")


def param_to_matconvnet(t: torch.Tensor | None, like=None, as_numpy: bool = True):
    """A parameter (or its derivative) back in MatConvNet layout.

    4-D tensors go from K x FC x FH x FW to FH x FW x FC x K; the result takes
    the shape of ``like`` (the weight it belongs to, e.g. 1 x K biases) when
    that has as many elements. numpy results are copies, never views of the
    parameter, so later training does not change them. ``None`` is MATLAB's
    empty ``[]`` (0 x 0) for numpy, ``None`` for torch.
    """
    if t is None:
        return np.zeros((0, 0), np.float32) if as_numpy else None
    t = t.detach()
    if t.dim() == 4:
        t = t.permute(2, 3, 1, 0)
    if like is not None and np.asarray(like).size == t.numel():
        t = t.reshape(np.asarray(like).shape)
    return t.cpu().numpy().copy() if as_numpy else t


def _layer_weights_from_module(m: nn.Module, layer: dict) -> list | None:
    old = cell_items(layer.get("weights"))
    pad = old + [None] * 3

    def back(t, like):  # a double network stays double, whatever precision it was trained in
        w = param_to_matconvnet(t, like)
        return w.astype(np.float64) if getattr(like, "dtype", None) == np.float64 else w
    if isinstance(m, (L.Conv, L.ConvTranspose)):
        return [back(m.weight, pad[0]), back(m.bias, pad[1])]
    if isinstance(m, L.BatchNorm):
        return [back(m.weight, pad[0]), back(m.bias, pad[1]), back(_moments_like(m.moments, pad[2]), pad[2])]
    return None


def _moments_like(moments: torch.Tensor, like) -> torch.Tensor:
    """C x 2 moments in the shape of the stored ones (``like``), filled column-major as MATLAB stores them."""
    if like is None or np.size(like) != moments.numel() or np.shape(like) == tuple(moments.shape):
        return moments
    return fn.bnorm_moments_as(moments.detach(), np.shape(like))


# ---------------------------------------------------------------------------
# The Module and vl_simplenn
# ---------------------------------------------------------------------------

class SimpleNNModule(nn.Module):
    """A SimpleNN as an ``nn.Module`` (NCHW): ``forward(x, c=None)``.

    With labels ``c`` the whole chain runs and the loss is returned; without
    them the chain stops before the first loss layer and returns its input
    (the class scores), whatever ``class`` the net stored. ``train()`` is MatConvNet's 'normal' mode, ``eval()``
    its 'test' mode.
    """

    def __init__(self, modules: list[nn.Module], types: list[str], names: list[str],
                 classes: list | None = None):
        super().__init__()
        self.layers = nn.ModuleList(modules)
        self.types = list(types)
        self.names = list(names)
        self.classes = list(classes) if classes is not None else [None] * len(types)

    def layer_forward(self, i: int, x: torch.Tensor, c=None) -> torch.Tensor:
        if self.types[i] in LOSS_LAYER_TYPES:
            c = self.classes[i] if c is None else c
            if c is None:
                raise ValueError(f"layer {i + 1} ({self.types[i]} '{self.names[i]}') needs labels: "
                                 f"pass c or set net.layers[{i}]['class']")
            if not isinstance(c, torch.Tensor):
                c = torch.as_tensor(np.asarray(c))
            c = c.to(x.device)
            if c.numel() != x.shape[0]:
                c = hwcn_to_nchw(c, "class")
            return self._named(i, self.layers[i], x, c)
        return self._named(i, self.layers[i], x)

    def _named(self, i: int, layer, *args):
        """Run layer i; a bad input or option is reported with the layer's position, type and name."""
        try:
            return layer(*args)
        except (ValueError, RuntimeError) as e:
            raise labelled(e, f"layer {i + 1} ({self.types[i]} '{self.names[i]}')") from None

    def forward(self, x: torch.Tensor, c=None) -> torch.Tensor:
        for i in range(len(self.layers)):
            if self.types[i] in LOSS_LAYER_TYPES and c is None:
                break
            x = self.layer_forward(i, x, c)
        return x


@dataclasses.dataclass
class Res:
    """One entry of ``vl_simplenn``'s result: the input ``x`` of layer i, ``dzdx``, ``dzdw``, ``aux``."""

    x: Any = None
    dzdx: Any = None
    dzdw: list | None = None
    aux: Any = None


def vl_simplenn(net: SimpleNN, x, dzdy=None, res=None, *, mode: str = "normal", conserve_memory: bool = False,
                sync: bool = False, cudnn: bool = True) -> list[Res]:
    """Evaluate a SimpleNN -- MatConvNet ``vl_simplenn``.

    ``res = vl_simplenn(net, x)`` runs the forward pass; ``res =
    vl_simplenn(net, x, dzdy)`` also the backward pass. ``x`` is H x W x C x N
    (numpy or torch; the results are of the same kind, in MatConvNet layout).
    Loss layers take their labels from ``net.layers[i]['class']``.
    ``mode='test'`` makes dropout the identity and batch norm use its moments.

    Returns L+1 :class:`Res` entries (0-based, MATLAB's ``res(i+1)``):
    ``res[i].x`` is the input of layer i (``res[-1].x`` the output),
    ``res[i].dzdx`` its derivative, ``res[i].dzdw`` the derivatives of layer
    i's weights in MatConvNet layout ([dF, dB] for conv; [dG, dB, moments*N]
    for bnorm, as vl_simplenn scales the moments), ``res[i+1].aux`` the
    dropout mask. ``res`` (MATLAB's reuse of a result array) is not needed.
    ``conserve_memory``, ``sync`` and ``cudnn`` are accepted so that ported
    calls need no edit, without effect: every ``res`` entry is kept (with
    ``conserveMemory`` MATLAB empties the intermediate ones) and PyTorch
    picks the kernels.
    """
    if mode not in ("normal", "test"):
        raise ValueError(f"mode must be 'normal' or 'test', got {mode!r}")
    as_numpy = not isinstance(x, torch.Tensor)
    xt = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
    if xt.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be single or double, got {xt.dtype}")
    tidy = vl_simplenn_tidy(net)
    module = tidy.to_torch(device=xt.device, dtype=xt.dtype)
    module.train(mode == "normal")
    doder = dzdy is not None

    def out(t):
        if t is None:
            return None
        t = t.detach()
        if t.dim() == 4:
            t = nchw_to_hwcn(t)
        return t.cpu().numpy() if as_numpy else t

    with exact_fp32(), torch.set_grad_enabled(doder):
        cur = hwcn_to_nchw(xt).detach().requires_grad_(doder)
        outputs = [cur]
        for i in range(len(module.layers)):
            cur = module.layer_forward(i, cur)
            if doder and cur.requires_grad and not cur.is_leaf:
                cur.retain_grad()
            outputs.append(cur)
        if doder:
            seed = torch.as_tensor(np.asarray(dzdy) if not isinstance(dzdy, torch.Tensor) else dzdy,
                                   dtype=cur.dtype, device=cur.device)
            if cur.dim() == 4 and seed.numel() == cur.numel() and seed.dim() >= 1:
                seed = hwcn_to_nchw(seed.reshape(seed.shape), "dzdy").reshape(cur.shape)
            cur.backward(seed.reshape(cur.shape))

    results = [Res(x=out(t)) for t in outputs]
    if doder:
        for i, t in enumerate(outputs):
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            results[i].dzdx = out(g)
        for i, m in enumerate(module.layers):
            if isinstance(m, (L.Conv, L.ConvTranspose, L.BatchNorm)):
                grads = [None if p is None else (p.grad if p.grad is not None else torch.zeros_like(p))
                         for p in (m.weight, m.bias)]
                if isinstance(m, L.BatchNorm):
                    moments = m.batch_moments if mode == "normal" else m.moments.detach()
                    grads.append(moments * outputs[i].shape[0])
                like = cell_items(tidy.layers[i].get("weights")) + [None] * 3
                if isinstance(m, L.BatchNorm):
                    grads[2] = _moments_like(grads[2], like[2])
                results[i].dzdw = [param_to_matconvnet(g, like[j], as_numpy) for j, g in enumerate(grads)]
    for i, m in enumerate(module.layers):
        if isinstance(m, L.DropOut) and m.mask is not None and mode == "normal":
            results[i + 1].aux = out(m.mask)
    return results
