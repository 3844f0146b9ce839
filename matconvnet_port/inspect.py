"""Print a network's layers as a table, like MatConvNet's ``vl_simplenn_display``.

Usage::

    python -m matconvnet_port.inspect NET.mat [--input-size H W C] [--variable NAME]

One row per layer (SimpleNN: in order; DagNN: in evaluation order, with the
layer's output variable): index, name, type, support (filter or pooling
window FH x FW), filter depth, number of filters, stride, pad [t b l r],
output size H x W x C for the given input size, and parameter memory
(4 bytes per parameter, as MatConvNet counts). The input size defaults to
``meta.inputSize`` (else ``meta.normalization.imageSize``); ``?`` marks
sizes that cannot be known. Output sizes follow MatConvNet's formulas
(``floor((H + pt + pb - ((FH-1)*d + 1)) / s) + 1`` for convolution and
pooling; loss layers output 1 x 1 x 1). Values shown as in MatConvNet:
``2`` when both dimensions agree, ``2x3`` otherwise.

A file that cannot be read prints one line ``error: ...`` on stderr and the
command exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from . import functional as fn
from .dagnn import DagNN, _BatchNorm, _Concat, _Conv, _ConvTranspose, _Crop, _ROIPooling, _Loss, _Pooling, _build_block
from .errors import MatFormatError
from .simplenn import SimpleNN

__all__ = ["layer_table", "format_table", "main"]

_NAN = float("nan")
Size = tuple  # (H, W, C), NaN where unknown

COLUMNS = [("layer", "layer"), ("name", "name"), ("type", "type"), ("output", "output var"),
           ("support", "support"), ("filtd", "filt dim"), ("nfilt", "num filts"), ("stride", "stride"),
           ("pad", "pad"), ("size", "output size"), ("mem", "param mem")]


def _dims(values) -> str:
    """MatConvNet's ``pdims``: one number if all agree, else ``AxB``."""
    values = [float(v) for v in values]
    if not values:
        return "n/a"
    show = ["?" if math.isnan(v) else f"{v:.4g}" for v in values]
    return show[0] if len(set(show)) == 1 else "x".join(show)


def _mem(num_bytes: float) -> str:
    """MatConvNet's ``pmem``."""
    for unit, scale in (("B", 1), ("KB", 1024), ("MB", 1024 ** 2), ("GB", 1024 ** 3)):
        if num_bytes < scale * 1024 or unit == "GB":
            return f"{num_bytes / scale:.0f}{unit}"
    return ""  # pragma: no cover


def _size_text(size: Size) -> str:
    return "x".join("?" if math.isnan(v) else f"{int(v)}" for v in size)


def _shape4(a) -> tuple:
    shape = tuple(np.shape(a))
    return (shape + (1, 1, 1, 1))[:4] if np.size(a) else (0, 0, 0, 0)


def _conv_out(h: float, window: int, before: int, after: int, stride: int, dilate: int = 1) -> float:
    return _NAN if math.isnan(h) else float(fn.conv_output_size(int(h), window, before, after, stride, dilate))


def _default_input_size(meta: dict) -> Size:
    for value in (meta.get("inputSize"),
                  (meta.get("normalization") or {}).get("imageSize") if isinstance(meta.get("normalization"), dict)
                  else None):
        if value is not None and np.size(value) >= 2:
            v = [float(x) for x in np.asarray(value, dtype=np.float64).reshape(-1)[:3]]
            return tuple(v + [1.0] * (3 - len(v)))
    return (_NAN, _NAN, _NAN)


# ---------------------------------------------------------------------------
# SimpleNN
# ---------------------------------------------------------------------------

def _simplenn_rows(net: SimpleNN, size: Size) -> list[dict]:
    from .simplenn import vl_simplenn_tidy

    rows = []
    for i, layer in enumerate(vl_simplenn_tidy(net).layers):
        kind = layer["type"]
        weights = [np.asarray(w) for w in layer.get("weights", []) if w is not None]
        row = {"layer": str(i + 1), "name": str(layer.get("name", "")), "output": "",
               "type": _simplenn_type(layer), "support": "1", "filtd": "n/a", "nfilt": "n/a",
               "stride": "1", "pad": "0", "params": sum(w.size for w in weights)}
        h, w, c = size
        if kind in ("conv", "convt"):
            has_filters = bool(weights) and weights[0].size > 0
            fh, fw, fc, k = _shape4(weights[0]) if has_filters else (1, 1, c, c)
            row.update(support=_dims([fh, fw]), filtd=_dims([fc]), nfilt=_dims([k]))
            if kind == "conv":
                pad, stride = fn._pad4(layer["pad"]), fn._pos2(layer["stride"], "stride")
                dilate = fn._pos2(layer.get("dilate", 1), "dilate")
                row.update(stride=_dims(stride), pad=_dims(pad))
                size = (_conv_out(h, fh, *pad[:2], stride[0], dilate[0]),
                        _conv_out(w, fw, *pad[2:], stride[1], dilate[1]), float(k) if has_filters else c)
            else:
                upsample, crop = fn._pos2(layer["upsample"], "upsample"), fn._pad4(layer["crop"], "crop")
                groups = int(np.asarray(layer["numGroups"]).reshape(-1)[0])
                row.update(stride=_dims(upsample), pad=_dims(crop))
                size = _convt_size(size, (fh, fw), upsample, crop, k * groups)
        elif kind == "pool":
            window, pad = fn._pos2(layer["pool"], "pool"), fn._pad4(layer["pad"])
            stride = fn._pos2(layer["stride"], "stride")
            row.update(support=_dims(window), stride=_dims(stride), pad=_dims(pad))
            size = (_conv_out(h, window[0], *pad[:2], stride[0]), _conv_out(w, window[1], *pad[2:], stride[1]), c)
        elif kind in ("softmaxloss", "loss"):
            size = (1.0, 1.0, 1.0)
        row["size"] = _size_text(size)
        rows.append(row)
    return rows


def _simplenn_type(layer: dict) -> str:
    kind = layer["type"]
    if kind == "pool":
        return "apool" if str(layer.get("method", "max")).lower() == "avg" else "mpool"
    return {"normalize": "norm", "softmax": "softmx", "softmaxloss": "softmxl"}.get(kind, kind)


def _convt_size(size: Size, filt, upsample, crop, channels) -> Size:
    h, w, _ = size
    ho = _NAN if math.isnan(h) else upsample[0] * (h - 1) + filt[0] - crop[0] - crop[1]
    wo = _NAN if math.isnan(w) else upsample[1] * (w - 1) + filt[1] - crop[2] - crop[3]
    return (ho, wo, float(channels))


# ---------------------------------------------------------------------------
# DagNN
# ---------------------------------------------------------------------------

def _dagnn_rows(dag: DagNN, size: Size) -> list[dict]:
    produced = {v for layer in dag.layers for v in layer["outputs"]}
    labels = {v for layer in dag.layers if layer["type"] == "dagnn.Loss" for v in layer["inputs"][1:]}
    feature_inputs = [v for v in dag.vars if v not in produced and v not in labels]
    sizes: dict[str, Size] = {}
    if feature_inputs:
        sizes[feature_inputs[0]] = size
    rows = []
    for index in dag.execution_order():
        layer = dag.layers[index]
        block = _build_block(layer, f"net.layers({index + 1})")
        values = [np.asarray(dag.params[p].value) for p in layer["params"]]
        unknown = (_NAN, _NAN, _NAN)
        ins = [sizes.get(v, unknown) for v in layer["inputs"]]
        row = {"layer": str(index + 1), "name": layer["name"], "output": ",".join(layer["outputs"]),
               "type": _dagnn_type(layer, block), "support": "1", "filtd": "n/a", "nfilt": "n/a",
               "stride": "1", "pad": "0", "params": sum(v.size for v in values)}
        out = ins[0] if ins else unknown
        h, w, c = out
        if isinstance(block, (_Conv, _ConvTranspose)):
            fh, fw, fc, k = _shape4(values[0]) if values and values[0].size else (1, 1, c, c)
            row.update(support=_dims([fh, fw]), filtd=_dims([fc]), nfilt=_dims([k]))
            if isinstance(block, _Conv):
                row.update(stride=_dims(block.stride), pad=_dims(block.pad))
                out = (_conv_out(h, fh, *block.pad[:2], block.stride[0], block.dilate[0]),
                       _conv_out(w, fw, *block.pad[2:], block.stride[1], block.dilate[1]),
                       float(k) if values and values[0].size else c)
            else:
                row.update(stride=_dims(block.upsample), pad=_dims(block.crop))
                out = _convt_size(out, (fh, fw), block.upsample, block.crop, k * block.num_groups)
        elif isinstance(block, _Pooling):
            row.update(support=_dims(block.pool_size), stride=_dims(block.stride), pad=_dims(block.pad))
            out = (_conv_out(h, block.pool_size[0], *block.pad[:2], block.stride[0]),
                   _conv_out(w, block.pool_size[1], *block.pad[2:], block.stride[1]), c)
        elif isinstance(block, _Loss):
            out = (1.0, 1.0, 1.0)
        elif isinstance(block, _ROIPooling):
            sh, sw = block.subdivisions
            out = (1.0, 1.0, sh * sw * c) if block.flatten else (float(sh), float(sw), c)
            row.update(support=_dims([sh, sw]))
        elif isinstance(block, _Crop) and len(ins) > 1:
            out = (ins[1][0], ins[1][1], c)
        elif isinstance(block, _Concat) and block.dim in (1, 2, 3):
            axis = block.dim - 1
            out = tuple(sum(s[axis] for s in ins) if a == axis else ins[0][a] for a in range(3))
        for v in layer["outputs"]:
            sizes[v] = out
        row["size"] = _size_text(out)
        rows.append(row)
    return rows


def _dagnn_type(layer: dict, block) -> str:
    if isinstance(block, _Pooling):
        return "apool" if block.method == "avg" else "mpool"
    if isinstance(block, _Loss):
        return f"loss({block.loss})"
    if isinstance(block, _BatchNorm):
        return "bnorm"
    return {"dagnn.SoftMax": "softmx", "dagnn.LRN": "norm", "dagnn.ConvTranspose": "convt"}.get(
        layer["type"], layer["type"].split(".")[-1].lower())


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------

def layer_table(net: SimpleNN | DagNN, input_size=None) -> list[dict]:
    """One dict per layer (keys of :data:`COLUMNS` plus ``params``, the parameter count).

    ``input_size`` (H, W[, C]) defaults to ``net.meta['inputSize']``.
    """
    if input_size is None:
        size = _default_input_size(net.meta if isinstance(net.meta, dict) else {})
    else:
        v = [float(x) for x in input_size]
        size = tuple(v + [1.0] * (3 - len(v)))[:3]
    size = tuple(v if math.isfinite(v) else _NAN for v in size)  # an unknown (or infinite) size shows as '?'
    if isinstance(net, DagNN):
        return _dagnn_rows(net, size)
    if isinstance(net, SimpleNN):
        return _simplenn_rows(net, size)
    raise TypeError(f"net must be a SimpleNN or a DagNN, got {type(net).__name__}")


def format_table(rows: list[dict], dagnn: bool = False) -> str:
    """The rows as an ASCII table (right-aligned, ``|`` separated) and the parameter total."""
    columns = [c for c in COLUMNS if dagnn or c[0] != "output"]
    cells = [[title for _, title in columns]]
    for row in rows:
        cells.append([str(row.get(key, "")) if key != "mem" else _mem(4 * row["params"]) for key, _ in columns])
    widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]
    lines = ["|".join(cell.rjust(width) for cell, width in zip(r, widths)) + "|" for r in cells]
    lines.insert(1, "|".join("-" * width for width in widths) + "|")
    total = sum(row["params"] for row in rows)
    lines.append(f"parameter memory: {_mem(4 * total)} ({total} parameters)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matconvnet_port.inspect",
                                     description="Show the layers of a MatConvNet network (.mat).")
    parser.add_argument("path", help="MAT-file with a SimpleNN or DagNN network")
    parser.add_argument("--input-size", nargs="+", type=float, metavar="N",
                        help="input H W [C] (default: net.meta.inputSize)")
    parser.add_argument("--variable", help="variable holding the network (default: net)")
    args = parser.parse_args(argv)
    if args.input_size is not None and not 2 <= len(args.input_size) <= 3:
        parser.error("--input-size takes H W [C]")
    if args.input_size is not None and not all(math.isfinite(v) and v >= 1 for v in args.input_size):
        parser.error(f"--input-size takes positive finite numbers, got {' '.join(map(str, args.input_size))}")
    from .netio import load_net

    try:
        net = load_net(args.path, args.variable)
        rows = layer_table(net, args.input_size)
    except (MatFormatError, ValueError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    kind = "DagNN" if isinstance(net, DagNN) else "SimpleNN"
    print(f"{args.path}: {kind}, {len(rows)} layers")
    print(format_table(rows, dagnn=isinstance(net, DagNN)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
