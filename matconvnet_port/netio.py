"""Loading and saving MatConvNet networks and ``cnn_train`` checkpoints (.mat, v5/v7 and v7.3).

Reading and writing the containers is :mod:`matconvnet_port.matio`'s job;
this module knows what MatConvNet puts in them.

What :func:`load_net` recognises
--------------------------------
* **SimpleNN, current format** (v1.0-beta17 and later): a variable ``net``
  with ``net.layers`` (1 x K cell of 1x1 structs with a ``type`` field) and
  ``net.meta``. ``cnn_train`` checkpoints ``net-epoch-K.mat`` hold it next to
  ``state`` and ``stats`` (see :func:`load_checkpoint`).
* **SimpleNN, pre-beta17 format**: top-level variables ``layers``,
  ``normalization``, ``classes`` (or a ``net`` struct with those fields).
  Conv layers with ``filters``/``biases`` get ``weights = [filters,
  biases]``, ``filtersLearningRate``/``biasesLearningRate`` become
  ``learningRate = [lr_f lr_b]`` and ``filtersWeightDecay``/
  ``biasesWeightDecay`` ``weightDecay``; ``normalization`` and ``classes``
  move under ``meta`` (as ``vl_simplenn_tidy`` upgrades them).
* **DagNN**: the struct of ``dagnn.DagNN/saveobj`` -- ``vars``, ``params``,
  ``layers`` struct arrays (``layers`` with ``type`` = ``'dagnn.Conv'`` etc.
  and a ``block`` struct), ``meta`` -- in a variable ``net`` or saved with
  ``save(file, '-struct', 's')`` as top-level variables. A DagNN *object*
  (saved without ``saveobj``) is MATLAB-only data: :class:`MatFormatError`.

Representation in Python
------------------------
A SimpleNN's ``layers`` are plain dicts with MatConvNet's field names, in
file order: ``type``/``name``/``method`` as ``str``; ``weights`` a list of
numpy float32 (or float64, for a double network) arrays in MatConvNet layout
(filters FH x FW x FC x K, biases 1 x K as stored); ``precious`` a
``bool``; other numbers numpy arrays with their MATLAB shape and class
(``stride`` 1x1 double, ``pool`` 1x2, ``class`` 1xN); 1 x K cells (and
``{}``) as lists; structs as dicts (1x1) or :class:`matio.StructArray`.
``meta`` is a dict converted the same way. The layer fields are validated:
a missing or unknown ``type``, weights that are not single/double, filters of
more than 4 dimensions, a bias count different from the number of filters,
inconsistent batch-norm sizes raise :class:`MatFormatError` with one line
naming the file and the field, e.g. ``net.mat: net.layers{3}.weights{2}: 10
biases for 20 filters``.

What :func:`save_net` writes
----------------------------
One variable ``net``:

* SimpleNN: a 1x1 struct with ``layers`` (1 x K cell of 1x1 structs, each
  with the layer's fields; ``weights`` a 1 x J cell of single arrays, ``{}``
  for weightless layers; ``precious`` logical; strings char rows) and
  ``meta`` (struct). This is what ``load`` + ``vl_simplenn`` expect.
* DagNN: the ``saveobj`` struct: ``vars`` 1 x V struct array (``name``,
  ``precious`` logical), ``params`` 1 x P struct array (``name``, ``value``
  single, ``learningRate``, ``weightDecay``, plus any extra fields the loaded
  file had), ``layers`` 1 x L struct array (``name``, ``type``, ``inputs``,
  ``outputs``, ``params`` as 1 x n cells of strings, ``block`` struct),
  ``meta``; ``dagnn.DagNN.loadobj(load(file).net)`` rebuilds the object.

Python values are written as MATLAB would hold them: ``int``/``float`` ->
1x1 double, ``bool`` -> logical, a list of numbers -> 1 x K double row, any
other list -> 1 x K cell, ``None`` -> ``[]``. Loading a saved file gives
back identical values (bit for bit, both formats).

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) follow
``cnn_train``: variables ``net``, ``state`` (``state.solverState`` a 1 x L
cell with, per layer, a 1 x J cell of the solver's per-parameter state --
the momentum buffers, shaped like the weights -- and a 1 x 0 cell for
layers without weights; ``state.stats`` the stats of that epoch) and
``stats`` (``stats.train``/``stats.val`` 1 x E struct arrays with
``objective``, ``top1err``, ``top5err`` single and ``num``, ``time``
double). Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch

from . import matio
from .dagnn import DagNN, _flag
from .errors import MatFormatError
from .matio import cell_items
from .simplenn import LAYER_TYPES, SimpleNN

__all__ = ["load_net", "save_net", "load_checkpoint", "save_checkpoint", "net_from_struct",
           "net_to_struct"]

_DAGNN_FIELDS = ("vars", "params", "layers")
# stats fields cnn_train computes in single precision with its default error function (the others are double)
SINGLE_STATS = ("objective", "top1err", "top5err")


# ---------------------------------------------------------------------------
# matio representation -> ours
# ---------------------------------------------------------------------------

def _plain(value):
    """matio's values with 1 x K (K >= 1) and 0 x 0 cells as lists, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, matio.StructArray):
        return matio.StructArray([_plain(e) for e in value], shape=value.shape, fieldnames=value.fieldnames)
    if isinstance(value, np.ndarray) and value.dtype == object:
        if value.shape == (0, 0) or (value.ndim == 2 and value.shape[0] == 1 and value.shape[1] >= 1):
            return [_plain(v) for v in value.reshape(-1)]
        out = np.empty(value.shape, dtype=object)
        for idx in np.ndindex(value.shape):
            out[idx] = _plain(value[idx])
        return out
    return value


def _dtype_name(a: np.ndarray) -> str:
    names = {"float64": "double", "float32": "single", "bool": "logical"}
    return names.get(a.dtype.name, a.dtype.name)


def _weight(value, where: str) -> np.ndarray:
    """One weight array, single or double as stored (MatConvNet runs both; anything else is an error)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if value is None or (isinstance(value, list) and not value):
        return np.zeros((0, 0), np.float32)
    if not isinstance(value, np.ndarray):
        raise MatFormatError(f"{where}: expected a single or double array, got {type(value).__name__}")
    if value.dtype not in (np.float32, np.float64):
        raise MatFormatError(f"{where}: expected a single or double array, got {value.ndim}-D "
                             f"{_dtype_name(value)}")
    return np.array(value, copy=True)


def _vector_size(a: np.ndarray) -> int | None:
    return int(a.size) if sum(d != 1 for d in a.shape) <= 1 else None


def _is_numeric(arr: np.ndarray) -> bool:
    return arr.dtype != object and (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)


def _scalar_of(value, where: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not _is_numeric(arr):
        raise MatFormatError(f"{where}: expected a numeric scalar, got {value!r}")
    return float(arr.reshape(-1)[0])


# The numeric fields vl_simplenn reads per layer type, with the numbers each may hold (a missing one
# gets vl_simplenn_tidy's default; only a pool's window has none)
_NUMERIC_FIELDS = {
    "conv": {"pad": (1, 4), "stride": (1, 2), "dilate": (1, 2)},
    "convt": {"upsample": (1, 2), "crop": (1, 4), "numGroups": (1,)},
    "pool": {"pool": (1, 2), "pad": (1, 4), "stride": (1, 2)},
    "relu": {"leak": (1,)},
    "dropout": {"rate": (1,)},
    "normalize": {"param": (4,)},
    "lrn": {"param": (4,)},
    "bnorm": {"epsilon": (1,)},
}
_REQUIRED_FIELDS = {"pool": ("pool",)}
# integer options and their least value (the MEX files reject the others)
_INTEGER_FIELDS = {"pad": 0, "crop": 0, "stride": 1, "dilate": 1, "pool": 1, "upsample": 1, "numGroups": 1}


def _check_fields(kind: str, layer: dict, where: str) -> None:
    """Each numeric option a real number array of an accepted size, so a bad file fails here, naming the
    field, and not later inside a layer."""
    for key in _REQUIRED_FIELDS.get(kind, ()):
        if key not in layer:
            raise MatFormatError(f"{where}: a {kind} layer needs the field '{key}'")
    for key, sizes in _NUMERIC_FIELDS.get(kind, {}).items():
        if key not in layer:
            continue
        arr = np.asarray(layer[key])
        if not _is_numeric(arr) or np.iscomplexobj(arr) or arr.size not in sizes:
            got = repr(layer[key]) if isinstance(layer[key], str) else f"{arr.size} {_dtype_name(arr)} values"
            want = " or ".join(map(str, sizes))
            raise MatFormatError(f"{where}.{key}: expected {want} real number{'s' if sizes != (1,) else ''}, got {got}")
        if key in _INTEGER_FIELDS:
            values = arr.astype(np.float64).reshape(-1)
            least = _INTEGER_FIELDS[key]
            if not np.isfinite(values).all() or (values != np.round(values)).any() or (values < least).any() \
                    or (values > 2 ** 31 - 1).any():
                kind_of = "non-negative" if least == 0 else "positive"
                raise MatFormatError(f"{where}.{key}: expected {kind_of} integers, got {values.tolist()}")
    if kind == "pool" and "method" in layer and str(layer["method"]).lower() not in ("max", "avg"):  # any case
        raise MatFormatError(f"{where}.method: expected 'max' or 'avg', got {layer['method']!r}")


def _check_weights(kind: str, weights: list, layer: dict, where: str) -> None:
    """Filters at most 4-D, one bias per filter, batch-norm vectors of one length."""
    w = [f"{where}.weights{{{j + 1}}}" for j in range(max(len(weights), 3))]
    if kind in ("conv", "convt") and weights:
        f = weights[0]
        if f.ndim > 4:
            raise MatFormatError(f"{w[0]}: filters must be FH x FW x FC x K (at most 4-D), got shape {f.shape}")
        if len(weights) > 1 and weights[1].size:
            n = _vector_size(weights[1])
            if n is None:
                raise MatFormatError(f"{w[1]}: biases must be a vector, got shape {weights[1].shape}")
            shape4 = f.shape + (1,) * (4 - f.ndim)
            if kind == "conv":
                k = shape4[3] if f.size else None  # empty filters: identity, one bias per channel
            else:
                groups = _scalar_of(layer.get("numGroups", 1), f"{where}.numGroups")
                k = int(shape4[2] * groups)
            if k is not None and n != k:
                raise MatFormatError(f"{w[1]}: {n} biases for {k} filters")
    elif kind == "bnorm":
        if len(weights) < 2:
            raise MatFormatError(f"{where}.weights: bnorm needs {{multipliers, biases[, moments]}}, "
                                 f"got {len(weights)} arrays")
        ng, nb = _vector_size(weights[0]), _vector_size(weights[1])
        if ng is None or ng != nb:
            raise MatFormatError(f"{w[1]}: bnorm multipliers {weights[0].shape} and biases "
                                 f"{weights[1].shape} must be vectors of the same length")
        if len(weights) > 2 and weights[2].size and weights[2].size != 2 * ng:
            raise MatFormatError(f"{w[2]}: bnorm moments must be {ng} x 2, got shape {weights[2].shape}")


def _upgrade_legacy_layer(layer: dict, where: str) -> dict:
    """pre-beta17 filters/biases and per-array learning rates -> weights, learningRate, weightDecay."""
    if "weights" in layer or not ({"filters", "biases"} & set(layer)):
        return layer
    out = {}
    for key, value in layer.items():
        if key == "filters" or (key == "biases" and "filters" not in layer):
            out["weights"] = [layer.get("filters"), layer.get("biases")]
        elif key in ("filtersLearningRate", "biasesLearningRate"):
            out.setdefault("learningRate", np.array([[_legacy(layer, "filtersLearningRate", where),
                                                      _legacy(layer, "biasesLearningRate", where)]]))
        elif key in ("filtersWeightDecay", "biasesWeightDecay"):
            out.setdefault("weightDecay", np.array([[_legacy(layer, "filtersWeightDecay", where),
                                                     _legacy(layer, "biasesWeightDecay", where)]]))
        elif key != "biases":
            out[key] = value
    if layer.get("type") == "bnorm" and "learningRate" in out:
        # tidy adds the moments as weights{3}; cnn_train's default rate for them is its ones(1, 3)
        out["learningRate"] = np.append(out["learningRate"], 1.0)[None, :]
    return out


def _legacy(layer: dict, key: str, where: str) -> float:
    return _scalar_of(layer[key], f"{where}.{key}") if key in layer else 1.0


def _simplenn_layer(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise MatFormatError(f"{where}: expected a 1x1 struct, got "
                             f"{'a struct array' if isinstance(value, matio.StructArray) else type(value).__name__}")
    if "type" not in value:
        raise MatFormatError(f"{where}: no field 'type'")
    kind = value["type"]
    if not isinstance(kind, str):
        raise MatFormatError(f"{where}.type: expected a string, got {type(kind).__name__}")
    if kind not in LAYER_TYPES:
        raise MatFormatError(f"{where}.type: unsupported layer type {kind!r} (supported: {', '.join(LAYER_TYPES)})")
    layer = _upgrade_legacy_layer(dict(value), where) if kind in ("conv", "convt", "bnorm") else dict(value)
    for key in ("name", "method"):
        if key in layer and not isinstance(layer[key], str):
            raise MatFormatError(f"{where}.{key}: expected a string, got {type(layer[key]).__name__}")
    if "precious" in layer:
        layer["precious"] = _flag(layer["precious"], f"{where}.precious") \
            if np.asarray(layer["precious"]).size else False
    _check_fields(kind, layer, where)
    if "weights" in layer:
        items = cell_items(layer["weights"])
        layer["weights"] = [_weight(v, f"{where}.weights{{{j + 1}}}") for j, v in enumerate(items)]
        _check_weights(kind, layer["weights"], layer, where)
    return layer


def _simplenn_from_struct(net: dict, where: str) -> SimpleNN:
    layers_value = net["layers"]
    if isinstance(layers_value, (dict, matio.StructArray)):
        missing = [repr(k) for k in ("vars", "params") if k not in net]
        hint = f" (a DagNN saveobj struct's layers are one, but it has no field {' and no '.join(missing)})" \
            if missing else ""
        raise MatFormatError(f"{where}.layers: expected a cell array of layer structs, got a struct{hint}")
    layers = [_simplenn_layer(v, f"{where}.layers{{{i + 1}}}") for i, v in enumerate(cell_items(layers_value))]
    meta = net.get("meta", {})
    meta = dict(meta) if isinstance(meta, dict) else {}
    for old in ("classes", "normalization"):
        if old in net and old not in meta:
            meta[old] = net[old]
    return SimpleNN(layers, meta)


def _is_dagnn(value) -> bool:
    return isinstance(value, dict) and all(k in value for k in _DAGNN_FIELDS) and \
        not isinstance(value["layers"], (list, np.ndarray))


def net_from_struct(value, where: str = "net") -> SimpleNN | DagNN:
    """A network from a MAT-file value (matio's representation): SimpleNN or DagNN.

    ``where`` is the MATLAB name used in error messages (``net``).
    """
    value = _plain(value)
    if not isinstance(value, dict) or "layers" not in value:
        raise MatFormatError(f"{where}: not a MatConvNet network (expected a struct with a 'layers' field)")
    if _is_dagnn(value):
        return DagNN.loadobj(value, where)
    return _simplenn_from_struct(value, where)


def _with_file(path: str, fn, *args):
    """Run a conversion; its MatFormatError gets the file name in front."""
    try:
        return fn(*args)
    except MatFormatError as e:
        raise MatFormatError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise MatFormatError(f"{path}: malformed network ({type(e).__name__}: {e})".replace("\n", " ")) from None


def _find_net(path: str, data: dict, variable: str | None):
    """(value, name) of the network in a file's variables."""
    if variable is not None:
        if variable not in data:
            raise MatFormatError(f"{path}: no variable {variable!r} (variables: {', '.join(data) or 'none'})")
        return data[variable], variable
    if "net" in data:
        return data["net"], "net"
    if "layers" in data:
        # pre-beta17 SimpleNN or a DagNN saved with save(file, '-struct', 's')
        return dict(data), ""
    candidates = [k for k, v in data.items() if isinstance(v, dict) and "layers" in v]
    if candidates:
        return data[candidates[0]], candidates[0]
    raise MatFormatError(f"{path}: no MatConvNet network in this MAT-file (expected a variable 'net' or "
                         f"'layers'; variables: {', '.join(data) or 'none'})")


def load_net(path, variable: str | None = None) -> SimpleNN | DagNN:
    """Load a MatConvNet network (SimpleNN or DagNN) from a MAT-file (v5/v7 or v7.3).

    ``variable`` picks the variable (default: ``net``, else the old
    top-level format, else the first struct with ``layers``). Every problem
    -- missing file, not a MAT-file, truncated file, no network, a MATLAB
    object, unsupported layer, bad weights -- is a one-line
    :class:`MatFormatError` naming the file and the field.
    """
    data = matio.read_mat(path)  # MatFormatError naming the file for any container problem
    p = os.fspath(path)
    value, name = _find_net(p, data, variable)
    if name == "":
        return _with_file(p, _net_from_top_level, value)
    return _with_file(p, net_from_struct, value, name)


def _net_from_top_level(data: dict):
    value = _plain(data)
    if _is_dagnn(value):
        return DagNN.loadobj(value, "")
    layers = [_simplenn_layer(v, f"layers{{{i + 1}}}") for i, v in enumerate(cell_items(value["layers"]))]
    meta = dict(value["meta"]) if isinstance(value.get("meta"), dict) else {}
    for old in ("classes", "normalization"):
        if old in value and old not in meta:
            meta[old] = value[old]
    return SimpleNN(layers, meta)


# ---------------------------------------------------------------------------
# ours -> what matio writes
# ---------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)) and not isinstance(v, str)


def _to_mat(value, where: str):
    """A Python value as matio should write it (lists of numbers become numeric rows)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {str(k): _to_mat(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, matio.StructArray):
        return matio.StructArray([_to_mat(e, where) for e in value], shape=value.shape,
                                 fieldnames=value.fieldnames)
    if isinstance(value, (list, tuple)):
        if value and all(_is_number(v) for v in value):
            return np.asarray([float(v) for v in value], dtype=np.float64).reshape(1, -1)
        return [_to_mat(v, f"{where}{{{k + 1}}}") for k, v in enumerate(value)]
    if isinstance(value, np.ndarray) and value.dtype == object:
        out = np.empty(value.shape, dtype=object)
        for idx in np.ndindex(value.shape):
            out[idx] = _to_mat(value[idx], where)
        return out
    return value


def _as_double(value):
    """Numeric options as MATLAB keeps them: double. MatConvNet's MEX functions refuse any other class
    ("STRIDE is not a plain matrix") and vl_taccummex a single learning rate; numpy values a user sets
    (np.array([2, 2]), np.int64(2), float32) would otherwise be written as int64 / single."""
    if isinstance(value, dict):
        return {k: _as_double(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_double(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype == object:
        out = np.empty(value.shape, dtype=object)
        for idx in np.ndindex(value.shape):
            out[idx] = _as_double(value[idx])
        return out
    if isinstance(value, (np.ndarray, np.integer, np.floating)) and value.dtype.kind in "iuf":
        return np.asarray(value, dtype=np.float64) if isinstance(value, np.ndarray) else float(value)
    return value  # logical, char, Python numbers (written as double), structs


# layer fields that are not options: data, names, the labels cnn_train leaves in the loss layer
_NOT_OPTIONS = ("weights", "precious", "name", "type", "class")


def _simplenn_layer_to_mat(layer: dict, where: str) -> dict:
    if not isinstance(layer, dict) or "type" not in layer:
        raise MatFormatError(f"{where}: a layer must be a dict with a 'type' field")
    checked = _simplenn_layer(layer, where)  # what load_net would refuse is not written
    out = {}
    for key, value in layer.items():
        if key in ("weights", "precious"):
            out[key] = checked[key]  # as load_net's checks converted them (weights copied, precious a bool)
        else:
            out[key] = _to_mat(value if key in _NOT_OPTIONS else _as_double(value), f"{where}.{key}")
    return out


def _struct_array(items: list[dict], fields: list[str]) -> matio.StructArray:
    if not items:
        return matio.StructArray.empty(fields, shape=(1, 0))
    return matio.StructArray(items, shape=(1, len(items)))


def net_to_struct(net: SimpleNN | DagNN) -> dict:
    """The struct :func:`save_net` writes as ``net`` (matio's representation)."""
    if isinstance(net, DagNN):
        net.validate("net")  # what load_net would refuse is not written
        s = net.saveobj()
        out = {}
        for key, value in s.items():
            if key in _DAGNN_FIELDS:
                fields = {"vars": ["name", "precious"],
                          "params": ["name", "value", "learningRate", "weightDecay"],
                          "layers": ["name", "type", "inputs", "outputs", "params", "block"]}[key]
                if key == "layers":
                    value = [dict(item, block=_as_double(item["block"])) for item in value]
                elif key == "params":
                    value = [dict(item, learningRate=_as_double(item["learningRate"]),
                                  weightDecay=_as_double(item["weightDecay"])) for item in value]
                out[key] = _struct_array([_to_mat(item, f"net.{key}") for item in value], fields)
            else:
                out[key] = _to_mat(value, f"net.{key}")
        return out
    if isinstance(net, SimpleNN):
        layers = [_simplenn_layer_to_mat(layer, f"net.layers{{{i + 1}}}") for i, layer in enumerate(net.layers)]
        return {"layers": layers, "meta": _to_mat(net.meta, "net.meta")}
    raise TypeError(f"net must be a SimpleNN or a DagNN, got {type(net).__name__}")


def save_net(path, net: SimpleNN | DagNN, format: str = "v7") -> None:
    """Save a network as the variable ``net`` of a MAT-file (``format`` 'v7' or 'v7.3'), atomically."""
    p = os.fspath(path)
    struct = _with_file(p, net_to_struct, net)
    matio.write_mat(p, {"net": struct}, format=format)


# ---------------------------------------------------------------------------
# cnn_train checkpoints
# ---------------------------------------------------------------------------

def _stats_entry(value) -> dict:
    """One epoch's stats (a struct) with 1x1 numbers as Python floats."""
    out = {}
    for key, v in value.items():
        arr = np.asarray(v) if isinstance(v, np.ndarray) else None
        if arr is not None and arr.dtype != object and arr.size <= 1:
            v = float(arr.reshape(-1)[0]) if arr.size else math.nan  # [] (no images, or a field another epoch has)
        out[key] = v
    return out


def _stats_from_mat(stats) -> dict:
    """``stats``: each field (train, val, ...) a list of per-epoch dicts."""
    stats = _plain(stats)
    if not isinstance(stats, dict):
        return {}
    out = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out[key] = [_stats_entry(value)]
        elif isinstance(value, matio.StructArray):
            out[key] = [_stats_entry(e) for e in value]
        else:
            out[key] = value
    return out


def _state_from_mat(state, flat: bool = False) -> dict:
    state = _plain(state)
    if not isinstance(state, dict):
        return {}
    out = dict(state)
    if "solverState" in state and flat:  # cnn_train_dag: one cell per parameter
        out["solverState"] = list(cell_items(state["solverState"]))
    elif "solverState" in state:
        out["solverState"] = [list(cell_items(per_layer)) for per_layer in cell_items(state["solverState"])]
    if isinstance(state.get("stats"), dict):
        out["stats"] = {k: (_stats_entry(v) if isinstance(v, dict) else v) for k, v in state["stats"].items()}
    return out


def load_checkpoint(path) -> tuple[SimpleNN | DagNN, dict, dict]:
    """A ``cnn_train`` checkpoint ``net-epoch-K.mat`` -> ``(net, state, stats)``.

    ``state['solverState']`` is a list (per layer) of lists (per parameter)
    of numpy arrays (empty lists for layers without weights) -- for a DagNN
    (``cnn_train_dag``) one array per parameter; ``state['stats']`` and ``stats`` are plain dicts, ``stats['train']`` and
    ``stats['val']`` lists of per-epoch dicts with float values.
    """
    data = matio.read_mat(path)
    p = os.fspath(path)
    if "net" not in data:
        raise MatFormatError(f"{p}: not a cnn_train checkpoint (no variable 'net'; variables: "
                             f"{', '.join(data) or 'none'})")
    net = _with_file(p, net_from_struct, data["net"], "net")
    state = _state_from_mat(data.get("state", {}), flat=isinstance(net, DagNN))
    stats = _stats_from_mat(data.get("stats", {}))
    return net, state, stats


def _stats_value(key: str, value, single):
    if _is_number(value):
        return np.full((1, 1), value, dtype=np.float32 if key in single else np.float64)
    return _to_mat(value, key)


def _stats_struct(entry: dict, single) -> dict:
    if entry.get("num") == 0:  # processEpoch over no images sets only num and time (the port's NaNs are not data)
        entry = {k: v for k, v in entry.items() if k in ("num", "time")}
    return {k: _stats_value(k, v, single) for k, v in entry.items()}


def _stats_to_mat(stats: dict, single) -> dict:
    out = {}
    for key, value in (stats or {}).items():
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and all(isinstance(e, dict) for e in value):
            structs = [_stats_struct(e, single) for e in value]
            # one set of fields for the struct array, [] where an epoch lacks one (as MATLAB fills them)
            fields = list(dict.fromkeys(k for e in structs for k in e))
            structs = [{f: e.get(f, np.zeros((0, 0))) for f in fields} for e in structs]
            out[key] = _struct_array(structs, fields)
        else:
            out[key] = _to_mat(value, f"stats.{key}")
    return out


def _state_to_mat(state: dict, single, flat: bool = False) -> dict:
    """``state`` as cnn_train saves it; ``flat``: cnn_train_dag's one solverState cell per parameter."""
    out = {}
    for key, value in (state or {}).items():
        if key == "solverState" and flat:
            arrays = [v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else _to_mat(v, "solverState")
                      for v in value or []]
            out[key] = matio.cell(arrays, shape=(1, len(arrays)))
        elif key == "solverState":
            cells = []
            for per_layer in value or []:
                items = [] if per_layer is None else cell_items(per_layer)
                arrays = [v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else _to_mat(v, "solverState")
                          for v in items]
                # cnn_train leaves weightless layers with an empty 1 x 0 cell
                cells.append(matio.cell(arrays, shape=(1, len(arrays))))
            out[key] = matio.cell(cells, shape=(1, len(cells)))
        elif key == "stats" and isinstance(value, dict):
            out[key] = {k: (_stats_struct(v, single) if isinstance(v, dict) else _to_mat(v, k))
                        for k, v in value.items()}
        else:
            out[key] = _to_mat(value, f"state.{key}")
    return out


def save_checkpoint(path, net: SimpleNN | DagNN, state: dict, stats: dict, format: str = "v7",
                    single_stats=SINGLE_STATS) -> None:
    """Write a ``cnn_train`` checkpoint (``net``, ``state``, ``stats``) atomically.

    ``state['solverState']``: per layer a list of per-parameter arrays (numpy
    or torch), empty for layers without weights; ``state['stats']``: the
    epoch's stats (dict of dicts); ``stats``: ``{'train': [epoch dicts],
    'val': [...]}``. The statistics named in ``single_stats`` are written as
    single, other numbers as double: by default ``objective``/``top1err``/``top5err``,
    as ``cnn_train`` with its multiclass error (MATLAB's [double objective; single
    errors] is single; with the binary or no error function it stays double).
    """
    p = os.fspath(path)
    single = set(single_stats or ())
    variables = {"net": _with_file(p, net_to_struct, net),
                 "state": _state_to_mat(copy.copy(state), single, flat=isinstance(net, DagNN)),
                 "stats": _stats_to_mat(stats, single)}
    matio.write_mat(p, variables, format=format)
