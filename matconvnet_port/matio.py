"""Reading and writing MATLAB MAT-files, independent of the container format.

Every MAT-file level is read into one neutral Python representation, and
that representation is written back as a MATLAB v7 or v7.3 file. Nothing
here knows about networks; the MatConvNet loaders are built on top of it.

Formats
-------
* v4 and v5/v6/v7 (one container, "Level 5") are read with
  ``scipy.io.loadmat``; v7 is written with ``scipy.io.savemat``
  (zlib-compressed).
* v7.3 files are HDF5 files behind a 512-byte MATLAB header. They are read
  and written with ``h5py`` in MATLAB's own layout: ``MATLAB_class``
  attributes, column-major data (so HDF5 shows every array with its
  dimensions reversed), cell arrays as datasets of object references into
  ``/#refs#``, 1x1 structs as groups whose ``MATLAB_fields`` attribute gives
  the field order, struct arrays as groups whose fields are reference
  datasets, empty arrays as a ``uint64`` dataset holding the dimensions with
  ``MATLAB_empty = 1``, char data as UTF-16 code units. Files written by
  MATLAB and by hdf5storage (``matlab_compatible=True``) are read; files
  written here use the same layout.

Representation
--------------
Index order is always MATLAB's: ``a[i, j]`` is MATLAB's ``a(i+1, j+1)``.
Shapes are MATLAB shapes: at least 2-D (a scalar is ``(1, 1)``), trailing
singleton dimensions beyond the second dropped.

=====================  =====================================================
MATLAB                 Python
=====================  =====================================================
numeric, logical       ``numpy.ndarray`` with the MATLAB class kept:
                       double -> float64, single -> float32, intN/uintN ->
                       intN/uintN, logical -> bool, complex double/single ->
                       complex128/complex64. Sparse matrices are read as
                       dense arrays (double, logical or complex); writing
                       always produces full matrices.
char, 1 x n or empty   ``str`` (any empty char array reads as ``''``, which
                       is written back as MATLAB's 0x0 ``''``).
char, other shapes     ``numpy.ndarray`` of dtype ``'<U1'`` (one character
                       per element) with the MATLAB shape.
cell                   ``numpy.ndarray`` of dtype ``object`` with the MATLAB
                       shape, elements converted recursively; ``{}`` is an
                       object array of shape ``(0, 0)``.
1x1 struct             ``dict``, keys in MATLAB field order.
other struct arrays    :class:`StructArray` (shape, ordered field names,
                       elements as dicts), including empty ones such as
                       0x0 structs with fields.
objects, functions     :class:`~matconvnet_port.errors.MatFormatError`
                       naming the class (MATLAB classdef/MCOS objects,
                       old-style class objects, function handles).
=====================  =====================================================

MATLAB chars are UTF-16 code units; a ``str`` holds code points (a surrogate
pair read from a row of chars becomes one character and is written back as
the same pair). Characters outside the Basic Multilingual Plane can only be
written to v7.3 (scipy's v7 writer records the wrong length for them).

What cannot be made lossless
----------------------------
* v5 files: scipy reads a struct array *without fields* that is empty
  (MATLAB's ``struct([])``) exactly like an empty cell, so it is returned as
  ``{}`` (object array of shape (0, 0)). v7.3 files keep it as an empty
  :class:`StructArray`.
* Struct arrays without fields are only writable as 1x1 (both formats) or,
  in v7.3, when empty.
* A 1 x 0 (or n x 0) char reads as ``''`` and is written back as 0 x 0.
* Complex integer arrays are not supported (numpy has no complex ints).

``read_mat`` returns the variables in file order (for v7.3: creation order
where the file records it, as files written here do; otherwise HDF5's name
order, which is what MATLAB's own v7.3 files give). v4 files are read, never
written.

When writing, natural Python values are accepted as well: ``list``/``tuple``
-> 1 x K cell, ``int``/``float`` -> 1x1 double, ``bool`` -> 1x1 logical,
``complex`` -> 1x1 complex double, 1-D arrays -> 1 x K rows, 0-d arrays and
numpy scalars -> 1x1 of their dtype, ``None`` -> ``[]`` (0x0 double), a
:class:`StructArray` of shape 1x1 -> 1x1 struct (it reads back as a dict),
numpy record arrays -> struct arrays, objects with ``__array__`` (e.g. CPU
torch tensors) -> arrays.

Every error is a one-line :class:`MatFormatError` that names the file and,
where one applies, the variable path in MATLAB syntax, e.g.
``net.mat: net.layers{3}.weights{1}: ...``. A v5/v6/v7 variable's tree of
tags is checked (:mod:`matconvnet_port.v5_tree`) before scipy parses it,
because scipy trusts the file: an unknown data type can crash it and a cell
declaring 10^10 elements is allocated before its contents are read. The
check reads only tags, about 120,000 arrays a second, and a compressed
variable is inflated once more for it. On a 2-core Xeon: a 175 MB
compressed net, 1.1 s on top of scipy's 1.3-1.6 s; a cell of 60,001
scalars, 0.5 s on top of 0.15-0.2 s. A v7.3 dataset may leave at most 256 MiB of its
declared size unstored (fill value) before h5py allocates it.
"""

from __future__ import annotations

import itertools
import io
import math
import os
import re
import struct
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Mapping

import h5py
import numpy as np
import scipy.io
import scipy.sparse
from scipy.io.matlab import MatlabFunction, MatlabObject, MatlabOpaque

from . import v5_tree
from .errors import MatFormatError

__all__ = [
    "StructArray",
    "cell",
    "mat_format",
    "read_mat",
    "read_mat_variable",
    "write_mat",
]

# MATLAB numeric classes and the numpy dtypes that hold them.
_CLASS_DTYPES = {
    "double": np.dtype(np.float64),
    "single": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
    "uint16": np.dtype(np.uint16),
    "int32": np.dtype(np.int32),
    "uint32": np.dtype(np.uint32),
    "int64": np.dtype(np.int64),
    "uint64": np.dtype(np.uint64),
    "logical": np.dtype(np.bool_),
}
_DTYPE_CLASSES = {dt: cls for cls, dt in _CLASS_DTYPES.items()}
_DTYPE_CLASSES[np.dtype(np.complex128)] = "double"
_DTYPE_CLASSES[np.dtype(np.complex64)] = "single"

# MATLAB identifiers (variable and field names): namelengthmax is 63.
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}\Z")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MI_MATRIX, _MI_COMPRESSED = v5_tree.MI_MATRIX, v5_tree.MI_COMPRESSED
# a v7.3 dataset may leave this much of its declared data unstored (read as the fill value)
_UNSTORED_LIMIT = 1 << 28
# scipy's loadmat adds these keys; MATLAB variables never start with "_".
_SCIPY_KEYS = ("__header__", "__version__", "__globals__", "__function_workspace__")


class _Bad(Exception):
    """Internal: a problem at variable path ``where``; the API adds the file name."""

    def __init__(self, where: str, msg: str):
        super().__init__(msg)
        self.where = where
        self.msg = msg


# ---------------------------------------------------------------------------
# StructArray and value helpers


class StructArray:
    """A MATLAB struct array that is not 1x1 (1x1 structs are plain dicts).

    ``shape`` is the MATLAB shape, ``fieldnames`` the ordered field names and
    every element is a ``dict`` with exactly those keys, in that order.
    Indexing follows numpy for tuples (``sa[0, 3]``) and MATLAB's linear,
    column-major order for a single integer (``sa[k]`` is MATLAB's
    ``s(k+1)``); ``len()`` is the number of elements and iteration yields
    the elements in column-major order.
    """

    __slots__ = ("_elems", "_fields")

    def __init__(self, elements=(), shape=None, fieldnames=None):
        if isinstance(elements, np.ndarray):
            if shape is None:
                shape = elements.shape
            items = [elements[idx] for idx in _column_major(elements.shape)]
        else:
            items = list(elements)
        if shape is None:
            shape = (1, len(items))
        shape = tuple(int(n) for n in shape)
        if len(shape) < 2:
            shape = shape + (1,) * (2 - len(shape))
        if math.prod(shape) != len(items):
            raise ValueError(f"StructArray: {len(items)} elements do not fill shape {shape}")
        if fieldnames is None:
            fieldnames = list(items[0].keys()) if items else []
        fieldnames = [str(f) for f in fieldnames]
        if len(set(fieldnames)) != len(fieldnames):
            raise ValueError(f"StructArray: duplicate field names in {fieldnames}")
        elems = np.empty(shape, dtype=object)
        for idx, item in zip(_column_major(shape), items):
            if not isinstance(item, Mapping):
                raise TypeError(f"StructArray elements must be dicts, got {type(item).__name__}")
            if list(item.keys()) != fieldnames:
                if set(item.keys()) != set(fieldnames):
                    raise ValueError(
                        f"StructArray: element has fields {list(item.keys())}, "
                        f"expected {fieldnames}"
                    )
                item = {f: item[f] for f in fieldnames}
            elems[idx] = item if isinstance(item, dict) else dict(item)
        self._elems = elems
        self._fields = fieldnames

    @classmethod
    def empty(cls, fieldnames=(), shape=(0, 0)) -> "StructArray":
        """An empty struct array with fields, e.g. MATLAB's ``struct('a', {})``."""
        if math.prod(shape) != 0:
            raise ValueError(f"StructArray.empty: shape {tuple(shape)} is not empty")
        return cls((), shape=shape, fieldnames=fieldnames)

    @property
    def shape(self) -> tuple:
        return self._elems.shape

    @property
    def fieldnames(self) -> list:
        return list(self._fields)

    @property
    def size(self) -> int:
        return self._elems.size

    @property
    def ndim(self) -> int:
        return self._elems.ndim

    def __len__(self) -> int:
        return self._elems.size

    def __iter__(self):
        for idx in _column_major(self.shape):
            yield self._elems[idx]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            n = self._elems.size
            k = int(key) + n if key < 0 else int(key)
            if not 0 <= k < n:
                raise IndexError(f"index {key} out of range for StructArray with {n} elements")
            return self._elems[np.unravel_index(k, self.shape, order="F")]
        if isinstance(key, str):
            raise TypeError("StructArray: use sa.field(name) for the values of a field")
        out = self._elems[key]
        if isinstance(out, np.ndarray):
            return StructArray(out.reshape(_matlab_shape(out.shape)), fieldnames=self._fields)
        return out

    def field(self, name: str) -> list:
        """The values of one field, in column-major element order."""
        if name not in self._fields:
            raise KeyError(name)
        return [elem[name] for elem in self]

    def to_list(self) -> list:
        """The elements (dicts) in column-major order."""
        return list(self)

    def __repr__(self) -> str:
        return f"StructArray(shape={self.shape}, fieldnames={self._fields})"


def cell_items(value) -> list:
    """A MATLAB cell (object array, list or tuple) as a list in MATLAB's linear (column-major) order.

    ``None`` and an empty numeric array (``[]`` written where MATLAB code meant
    an empty cell) give ``[]``; any other single value is a one-element list.
    """
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.reshape(-1, order="F"))
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    return [value]


def cell(values=(), shape=None) -> np.ndarray:
    """Build a MATLAB cell array (numpy object array) from a sequence.

    Without ``shape`` the result is 1 x K (0 x 0 for no values, like ``{}``);
    with ``shape`` the values fill it in column-major order. The values are
    stored as given (they are converted when written).
    """
    items = list(values)
    if shape is None:
        shape = (1, len(items)) if items else (0, 0)
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) != len(items):
        raise ValueError(f"cell: {len(items)} values do not fill shape {shape}")
    out = np.empty(shape, dtype=object)
    for idx, value in zip(_column_major(shape), items):
        out[idx] = value
    return out


def _column_major(shape):
    """Index tuples of ``shape`` in MATLAB (column-major) order."""
    for rev in itertools.product(*(range(n) for n in reversed(shape))):
        yield rev[::-1]


def _matlab_shape(shape) -> tuple:
    """MATLAB's view of a shape: at least 2-D, no trailing singletons past 2-D."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        shape = shape + (1,) * (2 - len(shape))
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _row_shape(shape) -> tuple:
    """Shape of a value given from Python: 0-d -> 1x1, 1-D -> 1xK rows."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return _matlab_shape(shape)


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _is_row_or_empty(shape) -> bool:
    return math.prod(shape) == 0 or (len(shape) == 2 and shape[0] == 1)


def _u1_to_str(a: np.ndarray) -> str:
    # Go through the raw UCS-4 buffer: numpy drops NUL characters when items
    # are converted to str one by one.
    buf = np.ascontiguousarray(a.ravel(order="F"), dtype="<U1").tobytes()
    return buf.decode("utf-32-le", "surrogatepass")


def _cell_path(where: str, k: int) -> str:
    return f"{where}{{{k + 1}}}"


def _elem_path(where: str, k: int) -> str:
    return f"{where}({k + 1})"


def _object_error(where: str, classname: str) -> _Bad:
    msg = (
        f"MATLAB object of class {classname} cannot be read outside MATLAB "
        "(its data lives in MATLAB's object subsystem)"
    )
    if classname == "dagnn.DagNN":
        msg += (
            "; in MATLAB save the network as a plain struct instead: "
            "s = net.saveobj(); save('file.mat', '-struct', 's')"
        )
    else:
        msg += "; in MATLAB convert it to a struct (e.g. with saveobj or struct()) and save that"
    return _Bad(where, msg)


def _function_error(where: str) -> _Bad:
    return _Bad(
        where,
        "MATLAB function handle cannot be read outside MATLAB; "
        "store its name (func2str) instead",
    )


# ---------------------------------------------------------------------------
# Format sniffing


def _v4_header_ok(head: bytes) -> bool:
    # Level 4 files have no file header; each matrix starts with five int32s
    # (type MOPT, rows, cols, imagf, name length) and a NUL-terminated name.
    if len(head) < 20:
        return False
    for endian in "<>":
        mopt, mrows, ncols, imagf, namlen = struct.unpack(endian + "5i", head[:20])
        if not 0 <= mopt < 2000:
            continue
        m, rest = divmod(mopt, 1000)
        o, rest = divmod(rest, 100)
        p, t = divmod(rest, 10)
        if (m == 0) != (endian == "<") or o != 0 or p > 5 or t > 2:
            continue
        if mrows < 0 or ncols < 0 or imagf not in (0, 1) or not 2 <= namlen <= 64:
            continue
        name = head[20 : 20 + namlen]
        if len(name) == namlen and name.endswith(b"\x00") and re.fullmatch(
            rb"[A-Za-z][A-Za-z0-9_]*", name[:-1]
        ):
            return True
    return False


def _sniff(path: str) -> str:
    with open(path, "rb") as fh:
        head = fh.read(128)
        if not head:
            raise _Bad("", "empty file, not a MAT-file")
        if head.startswith(_HDF5_SIGNATURE):
            raise _Bad("", "plain HDF5 file without MATLAB's 512-byte header, not a MAT-file")
        if len(head) == 128 and head[126:128] in (b"IM", b"MI"):
            version = int.from_bytes(head[124:126], "little" if head[126:128] == b"IM" else "big")
            if version == 0x0100:
                return "v5"
            if version == 0x0200:
                fh.seek(512)
                if fh.read(8) != _HDF5_SIGNATURE:
                    raise _Bad(
                        "", "v7.3 MAT-file header but no HDF5 data at byte 512 (truncated or corrupt)"
                    )
                return "v7.3"
            raise _Bad("", f"unknown MAT-file version 0x{version:04x} in the header")
    if _v4_header_ok(head):
        return "v4"
    if head.startswith(b"MATLAB") and len(head) < 128:
        raise _Bad("", f"truncated MAT-file: only {len(head)} bytes, the header alone has 128")
    what = "a PNG image" if head.startswith(b"\x89PNG") else "no MATLAB header found"
    raise _Bad("", f"not a MAT-file ({what})")


def _check_path(path) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        raise MatFormatError(f"expected a file path, got {type(path).__name__}") from None
    if not os.path.exists(p):
        raise MatFormatError(f"{p}: no such file")
    if not os.path.isfile(p):
        raise MatFormatError(f"{p}: not a regular file")
    return p


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _short(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


def _api_error(path: str, bad: _Bad) -> MatFormatError:
    where = f"{bad.where}: " if bad.where else ""
    return MatFormatError(_one_line(f"{path}: {where}{bad.msg}"))


def mat_format(path) -> str:
    """The MAT-file level from the header: ``'v4'``, ``'v5'`` (v5/v6/v7) or ``'v7.3'``."""
    p = _check_path(path)
    try:
        return _sniff(p)
    except _Bad as bad:
        raise _api_error(p, bad) from None
    except OSError as exc:
        raise MatFormatError(_one_line(f"{p}: cannot read ({_short(exc)})")) from None


# ---------------------------------------------------------------------------
# Reading: API


def read_mat(path) -> dict:
    """All variables of a MAT-file (any level), in file order."""
    return _read(path, None)


def read_mat_variable(path, name: str):
    """One variable of a MAT-file; MatFormatError if the file has no such variable."""
    return _read(path, str(name))[str(name)]


def _read(path, name):
    p = _check_path(path)
    try:
        fmt = _sniff(p)
        if fmt == "v7.3":
            return _read_h5(p, name)
        return _read_v5(p, name, fmt)
    except _Bad as bad:
        raise _api_error(p, bad) from None
    except MatFormatError:
        raise
    except Exception as exc:
        raise MatFormatError(
            _one_line(f"{p}: unreadable, truncated or corrupt MAT-file ({_short(exc)})")
        ) from None


def _missing_variable(name: str, available) -> _Bad:
    listing = ", ".join(available) if available else "none"
    return _Bad("", f"no variable '{name}' in the file (variables: {listing})")


# ---------------------------------------------------------------------------
# Reading v4/v5/v6/v7 (scipy)


def _v5_scan(path: str):
    """Byte order and (offset, data type, size) of every top-level element.

    scipy stops quietly or fails deep inside zlib on a cut file; the
    top-level element tags tell how long every variable must be.
    """
    size = os.path.getsize(path)
    elements = []
    with open(path, "rb") as fh:
        head = fh.read(128)
        endian = "<" if head[126:128] == b"IM" else ">"
        pos = 128
        while pos < size:
            fh.seek(pos)
            tag = fh.read(8)
            if len(tag) < 8:
                raise _Bad("", f"truncated MAT-file: {size - pos} stray bytes at the end (byte {pos})")
            mdtype, nbytes = struct.unpack(endian + "II", tag)
            count = len(elements) + 1
            if mdtype not in (_MI_MATRIX, _MI_COMPRESSED):
                raise _Bad(
                    "",
                    f"corrupt MAT-file: element {count} at byte {pos} has data type {mdtype}, "
                    "expected a matrix",
                )
            if pos + 8 + nbytes > size:
                raise _Bad(
                    "",
                    f"truncated MAT-file: variable {count} (at byte {pos}) needs {nbytes} bytes, "
                    f"only {size - pos - 8} are left",
                )
            elements.append((pos, mdtype, nbytes))
            pos += 8 + nbytes
    return endian, elements


def _v5_element_header(fh, endian: str, element, full: bool = False):
    """(name, MATLAB class number, object class name) of a top-level element, from its first
    subelements (v5_tree.read_header). With ``full`` a compressed element is first inflated
    completely, which verifies its checksum."""
    pos, mdtype, nbytes = element
    if full and mdtype == _MI_COMPRESSED:
        fh.seek(pos + 8)
        zlib.decompress(fh.read(nbytes))
    return v5_tree.read_header(fh, endian, element, f"variable at byte {pos}")


def _decode_name(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("latin-1")  # as scipy decodes names: the same bytes, the same str


def _v5_listing(path: str):
    endian, elements = _v5_scan(path)
    with open(path, "rb") as fh:
        return [_v5_element_header(fh, endian, e) for e in elements]


def _loadmat(path: str, names, mat_dtype: bool):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = scipy.io.loadmat(
            path,
            variable_names=names,
            mat_dtype=mat_dtype,
            chars_as_strings=False,
            struct_as_record=True,
            squeeze_me=False,
            verify_compressed_data_integrity=True,
        )
    for w in caught:
        text = str(w.message)
        if text.startswith("Unreadable variable"):
            raise _Bad("", _one_line(text))
    complex_cast = any(
        w.category.__name__ == "ComplexWarning" or str(w.message).startswith("Casting complex")
        for w in caught
    )
    return raw, complex_cast


def _v5_variables(raw: dict) -> dict:
    out = {}
    for key, value in raw.items():
        if key in _SCIPY_KEYS:
            continue
        if key == "None" and isinstance(value, MatlabOpaque):
            # scipy loses the name of a top-level object; it is the opaque's s0.
            key = _opaque_field(value, "s0") or key
        out[key] = value
    return out


def _v5_check_tree(path: str, names) -> tuple[dict, set]:
    """Walk the variables to be read (all if ``names`` is None) before scipy does: see v5_tree.
    Returns the walks' notes ({path: what scipy's value lost}) of the variables walked (of two
    variables of one name, the last: what MATLAB's load keeps) and the names walked more than once."""
    endian, elements = _v5_scan(path)
    notes_by_name, repeated = {}, set()
    with open(path, "rb") as fh:
        for k, element in enumerate(elements):
            try:
                header = _v5_element_header(fh, endian, element)[0]
            except Exception:
                header = None
            # Skip only a variable known to be another: one whose header cannot be read from its first
            # bytes is walked (scipy, streaming, may read it and crash on it).
            if names is not None and header is not None and header not in names:
                continue
            label = header or f"variable {k + 1} (at byte {element[0]})"
            try:
                checked = v5_tree.check_variable(fh, endian, element, label)
            except v5_tree.TreeError as exc:
                raise _Bad(exc.where, f"corrupt MAT-file: {exc.msg}") from None
            except zlib.error as exc:
                raise _Bad(label, f"corrupt compressed data ({_short(exc)})") from None
            key = checked.name or label
            if key in notes_by_name:
                repeated.add(key)
            notes_by_name[key] = checked.notes
    return {p: note for notes in notes_by_name.values() for p, note in notes.items()}, repeated


def _read_v5(path: str, name, fmt: str) -> dict:
    notes, repeated = _v5_check_tree(path, None if name is None else [name]) if fmt == "v5" else ({}, set())
    names = None if name is None else [name]
    source = path
    if name in repeated:
        # scipy stops at the first variable of a name asked for; MATLAB's load (and scipy reading all)
        # keeps the last: read that one alone
        with open(path, "rb") as fh:
            source = io.BytesIO([s for n, s in scipy.io.matlab.varmats_from_mat(fh) if n == name][-1].getvalue())
    try:
        # mat_dtype=True gives MATLAB's classes (logical, doubles stored as
        # small ints), but scipy then casts complex data to real; a second
        # read without it supplies the complex values.
        raw, complex_cast = _loadmat(source, names, mat_dtype=True)
        if complex_cast and not isinstance(source, str):
            source.seek(0)
        alt = _loadmat(source, names, mat_dtype=False)[0] if complex_cast else None
    except _Bad:
        raise
    except Exception as exc:
        culprit = _v5_culprit(path, names) if fmt == "v5" else ""
        raise _Bad(culprit, f"unreadable or corrupt data ({_short(exc)})") from None
    found = _v5_variables(raw)
    alt_found = _v5_variables(alt) if alt is not None else {}
    if name is not None and name not in found:
        if fmt == "v4":
            raise _missing_variable(name, [n for n, _, _ in scipy.io.whosmat(path)])
        found = _v5_find_object(path, name)
    out = {}
    for key, value in found.items():
        out[key] = _from_scipy(value, key, alt_found.get(key), notes)
    return out


def _v5_culprit(path: str, names) -> str:
    """The first variable that cannot be read ('' if that cannot be told)."""
    try:
        endian, elements = _v5_scan(path)
    except _Bad:
        return ""
    with open(path, "rb") as fh:
        for k, element in enumerate(elements):
            label = f"variable {k + 1} (at byte {element[0]})"
            try:
                label = _v5_element_header(fh, endian, element)[0] or label
                if names is not None and label not in names:
                    continue
                _v5_element_header(fh, endian, element, full=True)
                _loadmat(path, [label], mat_dtype=True)
            except Exception:
                return label
    return ""


def _v5_find_object(path: str, name: str) -> dict:
    # scipy lists a top-level MATLAB object under the name 'None' (its real
    # name is inside the object): look there before saying it is absent.
    listing = _v5_listing(path)
    for var, mclass, classname in listing:
        if var == name and mclass == 17:
            raise _object_error(name, classname or "unknown")
    raise _missing_variable(name, [var for var, _, _ in listing])


def _opaque_field(obj, field: str) -> str:
    try:
        value = obj[field].ravel()[0] if obj.shape else obj[field]
        if isinstance(value, np.ndarray):
            value = value.tobytes() if value.dtype.kind == "S" else str(value.ravel()[0])
        if isinstance(value, bytes):
            value = _decode_name(value)
        return str(value)
    except Exception:
        return ""


def _from_scipy(obj, where: str, alt=None, notes=None):
    """scipy.io.loadmat output (mat_dtype=True, struct_as_record=True) -> representation.
    ``notes``: v5_tree's {path: what scipy lost there}."""
    note = notes.get(where) if notes else None
    if isinstance(obj, MatlabOpaque):
        raise _object_error(where, _opaque_field(obj, "s2") or "unknown")
    if isinstance(obj, MatlabFunction):
        raise _function_error(where)
    if isinstance(obj, MatlabObject):
        raise _object_error(where, obj.classname or "unknown")
    if scipy.sparse.issparse(obj):
        # MATLAB sparse matrices are 2-D double/logical/complex: keep them dense.
        if alt is not None and scipy.sparse.issparse(alt) and alt.dtype.kind == "c":
            obj = alt
        final = 1 if note == v5_tree.LOGICAL_SPARSE else 16 if obj.dtype.kind == "c" else 8
        dense = _dense(_checked_sparse(obj, where), where, final)
        if note == v5_tree.LOGICAL_SPARSE:
            dense = dense != 0
        elif dense.dtype.kind not in "bc":
            dense = dense.astype(np.float64)  # old files store sparse data compactly
        elif dense.dtype.kind == "c":
            dense = dense.astype(np.complex128)
        return _from_scipy_numeric(dense, where, None)
    if not isinstance(obj, np.ndarray):
        raise _Bad(where, f"unexpected value of type {type(obj).__name__} from scipy")
    if note == v5_tree.EMPTY_TAG:
        return np.zeros((0, 0))  # MATLAB's [] (scipy gives 1x0)
    if obj.dtype.names is not None:
        return _from_scipy_struct(obj, where, alt, notes)
    if obj.dtype == object:
        if obj.size and all(e is None for e in obj.flat):
            # scipy's record mode returns a struct array without fields as an
            # object array of None.
            if obj.shape == (1, 1):
                return {}
            return StructArray([{} for _ in range(obj.size)], shape=obj.shape, fieldnames=[])
        out = np.empty(_matlab_shape(obj.shape), dtype=object)
        obj = obj.reshape(out.shape)
        alt = alt.reshape(out.shape) if alt is not None else None
        for k, idx in enumerate(_column_major(out.shape)):
            out[idx] = _from_scipy(obj[idx], _cell_path(where, k), None if alt is None else alt[idx], notes)
        return out
    if obj.dtype.kind == "U":
        shape = _matlab_shape(obj.shape)
        if _is_row_or_empty(shape):
            return _u1_to_str(obj)
        return np.asarray(obj, dtype="<U1").reshape(shape)
    return _from_scipy_numeric(obj, where, alt)


def _from_scipy_numeric(arr: np.ndarray, where: str, alt) -> np.ndarray:
    arr = _native(np.asarray(arr))
    if alt is not None and getattr(alt, "dtype", None) is not None and alt.dtype.kind == "c":
        if arr.dtype == np.float32:
            arr = np.asarray(alt, dtype=np.complex64)
        elif arr.dtype == np.float64:
            arr = np.asarray(alt, dtype=np.complex128)
        else:
            raise _Bad(where, f"complex {arr.dtype} arrays are not supported")
    arr = _native(arr)
    if arr.dtype not in _DTYPE_CLASSES:
        raise _Bad(where, f"unsupported numeric type {arr.dtype}")
    return arr.reshape(_matlab_shape(arr.shape))


def _from_scipy_struct(obj: np.ndarray, where: str, alt, notes):
    fields = list(obj.dtype.names)
    shape = _matlab_shape(obj.shape)
    obj = obj.reshape(shape)
    alt = alt.reshape(shape) if alt is not None else None
    single = shape == (1, 1)
    elems = []
    for k, idx in enumerate(_column_major(shape)):
        base = where if single else _elem_path(where, k)
        record = obj[idx]
        alt_record = None if alt is None else alt[idx]
        elems.append(
            {
                f: _from_scipy(record[f], f"{base}.{f}", None if alt_record is None else alt_record[f], notes)
                for f in fields
            }
        )
    if single:
        return elems[0]
    return StructArray(elems, shape=shape, fieldnames=fields)


# ---------------------------------------------------------------------------
# Reading v7.3 (HDF5)


def _read_h5(path: str, name) -> dict:
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise _Bad("", f"cannot open the HDF5 part of this v7.3 MAT-file, truncated or corrupt ({_short(exc)})") from None
    with f:
        # '#refs#' holds cell contents and '#subsystem#' MATLAB's object data.
        available = [k for k in f.keys() if not k.startswith("#")]
        if name is not None:
            if name not in available:
                raise _missing_variable(name, available)
            available = [name]
        return {k: _H5Reader(f).read(f[k], k) for k in available}


def _attr_str(obj, key: str):
    value = obj.attrs.get(key)
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else b""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value)


def _field_names(obj) -> list:
    raw = obj.attrs.get("MATLAB_fields")
    if raw is None:
        return []
    names = []
    for item in np.asarray(raw, dtype=object).ravel():
        if isinstance(item, np.ndarray):
            item = item.tobytes()
        if isinstance(item, bytes):
            item = item.decode("ascii")
        names.append(str(item))
    return names


def _check_stored(ds, where: str) -> None:
    """A dataset may not declare much more data than it stores: h5py allocates the declared size
    (a few corrupt bytes can declare terabytes) and fills what is missing with the fill value.
    A partly written chunked dataset (MATLAB's ``matfile`` writes part of a variable) is valid,
    so only missing storage above _UNSTORED_LIMIT is refused; chunks are counted, not bytes,
    because a compressed chunk may inflate far beyond its stored size."""
    plist = ds.id.get_create_plist()
    if plist.get_external_count():
        # External storage reads raw bytes from another file named in this one, relative to the
        # working directory: MATLAB never writes it, and following it would read arbitrary files.
        raise _Bad(where, "dataset stored in an external file; MATLAB data is stored inside the MAT-file")
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise _Bad(where, "virtual HDF5 datasets are not MATLAB data")
    declared = math.prod(ds.shape) * ds.dtype.itemsize
    if declared == 0:
        return
    if ds.chunks is not None:
        needed = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        missing = (needed - ds.id.get_num_chunks()) * math.prod(ds.chunks) * ds.dtype.itemsize
    elif layout == h5py.h5d.CONTIGUOUS:
        missing = declared - ds.id.get_storage_size()
    else:
        return
    if missing > _UNSTORED_LIMIT:
        raise _Bad(where, f"corrupt v7.3 data: the dataset declares size {_h5_matlab_shape(ds.shape)} "
                          f"({declared} bytes) but {missing} bytes of it are not stored")


def _h5_matlab_shape(h5shape) -> tuple:
    # HDF5 lists the dimensions of MATLAB's column-major data in reverse.
    return _matlab_shape(tuple(reversed(h5shape)))


class _H5Reader:
    def __init__(self, f: h5py.File):
        self.f = f

    def read(self, obj, where: str):
        try:
            return self._read(obj, where)
        except _Bad:
            raise
        except Exception as exc:
            raise _Bad(where, f"unreadable element ({_short(exc)})") from None

    def _deref(self, ref, where: str):
        if not ref:
            raise _Bad(where, "null object reference")
        return self.f[ref]

    def _read(self, obj, where: str):
        cls = _attr_str(obj, "MATLAB_class")
        if cls == "function_handle":
            raise _function_error(where)
        if "MATLAB_object_decode" in obj.attrs or (
            cls is not None and cls not in _CLASS_DTYPES and cls not in ("char", "cell", "struct", "canonical empty")
        ):
            raise _object_error(where, cls or "unknown")
        if isinstance(obj, h5py.Group):
            if "MATLAB_sparse" in obj.attrs:
                return self._sparse(obj, cls, where)
            if cls in (None, "struct"):
                return self._struct_group(obj, where)
            raise _Bad(where, f"HDF5 group with MATLAB_class {cls!r}")
        if not isinstance(obj, h5py.Dataset):
            raise _Bad(where, f"unexpected HDF5 object {type(obj).__name__}")
        if obj.shape is None:
            raise _Bad(where, "HDF5 dataset without a dataspace")
        _check_stored(obj, where)
        if "MATLAB_empty" in obj.attrs and np.asarray(obj.attrs["MATLAB_empty"]).ravel().any():
            return self._empty(obj, cls, where)
        if obj.dtype == h5py.ref_dtype or cls == "cell":
            return self._cell(obj, where)
        if cls == "char":
            return self._char(obj, where)
        if cls == "struct":
            raise _Bad(where, "struct stored as a non-empty dataset")
        return self._numeric(obj, cls, where)

    def _empty(self, obj, cls, where):
        dims = np.asarray(obj[()]).astype(np.int64).ravel()
        shape = _matlab_shape(tuple(int(n) for n in dims))
        if math.prod(shape) != 0:
            raise _Bad(where, f"MATLAB_empty array with non-empty dimensions {shape}")
        if cls == "char":
            return ""
        if cls == "cell":
            return np.empty(shape, dtype=object)
        if cls == "struct":
            return StructArray.empty(_field_names(obj), shape)
        if cls in (None, "canonical empty"):
            return np.zeros(shape, dtype=np.float64)
        return np.zeros(shape, dtype=_CLASS_DTYPES[cls])

    def _cell(self, obj, where):
        refs = np.asarray(obj[()])
        if refs.dtype != object:
            raise _Bad(where, f"cell array stored as {refs.dtype} instead of object references")
        refs = refs.T.reshape(_h5_matlab_shape(refs.shape))
        out = np.empty(refs.shape, dtype=object)
        for k, idx in enumerate(_column_major(refs.shape)):
            path = _cell_path(where, k)
            out[idx] = self.read(self._deref(refs[idx], path), path)
        return out

    def _char(self, obj, where):
        codes = np.asarray(obj[()])
        if codes.dtype.kind not in "ui":
            raise _Bad(where, f"char data stored as {codes.dtype}")
        shape = _h5_matlab_shape(codes.shape)
        codes = codes.T.reshape(shape)
        if _is_row_or_empty(shape):
            if codes.dtype.itemsize == 2:
                return codes.astype("<u2").tobytes().decode("utf-16-le", "surrogatepass")
            return "".join(chr(c) for c in codes.ravel().tolist())
        return np.ascontiguousarray(codes, dtype="<u4").view("<U1").reshape(shape)

    def _numeric(self, obj, cls, where):
        data = np.asarray(obj[()])
        if data.dtype.names is not None:
            if set(data.dtype.names) != {"real", "imag"}:
                raise _Bad(where, f"unsupported compound HDF5 type {data.dtype}")
            target = np.complex64 if cls == "single" else np.complex128
            if cls not in (None, "single", "double"):
                raise _Bad(where, f"complex {cls} arrays are not supported")
            data = (data["real"] + 1j * data["imag"]).astype(target)
        elif data.dtype.kind not in "biuf":
            raise _Bad(where, f"unsupported HDF5 data type {data.dtype} for MATLAB class {cls}")
        elif cls is not None:
            # MATLAB stores logical as uint8; other classes already match.
            data = data.astype(_CLASS_DTYPES[cls], copy=False)
        data = _native(data)
        if data.dtype not in _DTYPE_CLASSES:
            raise _Bad(where, f"unsupported numeric type {data.dtype}")
        return data.T.reshape(_h5_matlab_shape(data.shape))

    def _part(self, group, key, where):
        """The values of dataset ``key`` of a group (a sparse matrix's part, a struct array's
        column), checked like any dataset before h5py allocates it."""
        ds = group.get(key)
        if not isinstance(ds, h5py.Dataset) or ds.shape is None:
            raise _Bad(where, f"missing or not a dataset: {key!r}")
        _check_stored(ds, where)
        return np.asarray(ds[()])

    def _sparse(self, obj, cls, where):
        # MATLAB's sparse layout: MATLAB_sparse = number of rows, CSC arrays
        # 'jc' (column starts), 'ir' (row indices) and 'data' (absent if nnz=0).
        nrows = int(np.asarray(obj.attrs["MATLAB_sparse"]).ravel()[0])
        jc = self._part(obj, "jc", f"{where}.jc").astype(np.int64).ravel()
        if jc.size == 0:
            raise _Bad(where, "corrupt sparse matrix (no column starts 'jc')")
        ncols = jc.size - 1
        dtype = np.dtype(np.bool_) if cls == "logical" else np.dtype(np.float64)
        if "data" in obj:
            ir = self._part(obj, "ir", f"{where}.ir").astype(np.int64).ravel()
            data = self._part(obj, "data", f"{where}.data").ravel()
            if data.dtype.names is not None:
                data = data["real"] + 1j * data["imag"]
                dtype = np.dtype(np.complex128)
            try:
                mat = scipy.sparse.csc_matrix((data.astype(dtype), ir, jc), shape=(nrows, ncols))
            except ValueError as exc:
                raise _Bad(where, f"corrupt sparse matrix ({_short(exc)})") from None
            return np.asarray(_dense(_checked_sparse(mat, where), where), dtype=dtype)
        _dense_size(nrows, ncols, dtype.itemsize, where)
        return np.zeros((nrows, ncols), dtype=dtype)

    def _struct_group(self, group, where):
        fields = _field_names(group) or [k for k in group.keys() if not k.startswith("#")]
        if not fields:
            return {}
        for f in fields:
            if f not in group:
                raise _Bad(f"{where}.{f}", "field listed in MATLAB_fields is missing")
        first = group[fields[0]]
        # Struct arrays keep one reference dataset per field, without a
        # MATLAB_class; a 1x1 struct stores its fields directly.
        is_array = (
            isinstance(first, h5py.Dataset)
            and first.dtype == h5py.ref_dtype
            and "MATLAB_class" not in first.attrs
        )
        if not is_array:
            return {f: self.read(group[f], f"{where}.{f}") for f in fields}
        shape = _h5_matlab_shape(first.shape)
        columns = {}
        for f in fields:
            ds = group[f]
            if not isinstance(ds, h5py.Dataset) or ds.dtype != h5py.ref_dtype or _h5_matlab_shape(ds.shape) != shape:
                raise _Bad(f"{where}.{f}", "struct array field is not a reference array of the struct's shape")
            columns[f] = self._part(group, f, f"{where}.{f}").T.reshape(shape)
        elems = []
        for k, idx in enumerate(_column_major(shape)):
            elem = {}
            for f in fields:
                path = f"{_elem_path(where, k)}.{f}"
                elem[f] = self.read(self._deref(columns[f][idx], path), path)
            elems.append(elem)
        if shape == (1, 1):
            return elems[0]
        return StructArray(elems, shape=shape, fieldnames=fields)


# ---------------------------------------------------------------------------
# Writing: normalisation of the values given


def _check_name(name, where: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _Bad(
            where,
            f"{what} {name!r} is not a valid MATLAB name (a letter, then letters, digits "
            "or '_', at most 63 characters)",
        )
    return name


_SUPPORTED_KINDS = "biufc"


def _normalize(value, where: str):
    """A value given by the caller -> the canonical representation (validated)."""
    if value is None:
        return np.zeros((0, 0))
    if isinstance(value, StructArray):
        return _normalize_struct_array(value, where)
    if isinstance(value, Mapping):
        return _normalize_struct(value, where)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, np.generic):
        return _normalize_array(np.asarray(value), where)
    if isinstance(value, bool):
        return np.full((1, 1), value, dtype=np.bool_)
    if isinstance(value, (int, float)):
        try:
            return np.full((1, 1), float(value), dtype=np.float64)
        except OverflowError:
            raise _Bad(where, f"integer {value} does not fit a double") from None
    if isinstance(value, complex):
        return np.full((1, 1), value, dtype=np.complex128)
    if isinstance(value, (list, tuple)):
        out = np.empty((1, len(value)) if value else (0, 0), dtype=object)
        for k, item in enumerate(value):
            out[0, k] = _normalize(item, _cell_path(where, k))
        return out
    if isinstance(value, (bytes, bytearray)):
        raise _Bad(where, "bytes cannot be stored; pass a str (char) or a uint8 array")
    if scipy.sparse.issparse(value):
        return _normalize_array(np.asarray(value.toarray()), where)
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        try:
            arr = np.asarray(value)
        except Exception as exc:
            raise _Bad(where, f"cannot convert {type(value).__name__} to an array ({_short(exc)})") from None
        return _normalize_array(arr, where)
    raise _Bad(where, f"a Python {type(value).__name__} cannot be stored in a MAT-file")


def _checked_sparse(m, where: str):
    """A sparse matrix whose indices lie inside its shape (a corrupt file's would make scipy's densifying
    write outside the array: a crash, or values silently lost). scipy's full check skips the order of the
    column starts when there are no entries: checked here first."""
    try:
        m = scipy.sparse.csc_matrix(m) if not scipy.sparse.isspmatrix_csc(m) else m
        starts = np.asarray(m.indptr)
        if starts.size and (starts[0] != 0 or np.any(np.diff(starts) < 0) or starts[-1] > m.indices.size):
            raise ValueError("column starts must run from 0, never decrease, and end at most at the entries")
        m.check_format(full_check=True)
    except ValueError as exc:
        raise _Bad(where, f"corrupt sparse matrix ({_short(exc)})") from None
    return m


_MAX_DENSE_SPARSE = 1 << 30  # bytes: sparse matrices are read as dense arrays


def _dense_size(rows: int, cols: int, itemsize: int, where: str) -> None:
    if rows * cols * itemsize > _MAX_DENSE_SPARSE:
        raise _Bad(where, f"a {rows}x{cols} sparse matrix would take {rows * cols * itemsize / 2**30:.1f} GiB "
                          f"dense; sparse matrices are read as dense arrays, up to {_MAX_DENSE_SPARSE >> 30} GiB")


def _dense(m, where: str, itemsize: int = 0) -> np.ndarray:
    """``m`` dense, if it and the array it becomes (``itemsize`` bytes per element) fit the limit."""
    _dense_size(*m.shape, max(m.dtype.itemsize, itemsize), where)
    return np.asarray(m.toarray())


def _normalize_array(a: np.ndarray, where: str):
    if a.dtype.names is not None:
        shape = _row_shape(a.shape)
        a = a.reshape(shape)
        fields = list(a.dtype.names)
        elems = [{f: a[idx][f] for f in fields} for idx in _column_major(shape)]
        return _normalize_struct_array(StructArray(elems, shape=shape, fieldnames=fields), where)
    if a.dtype == object:
        shape = _row_shape(a.shape)
        a = a.reshape(shape)
        out = np.empty(shape, dtype=object)
        for k, idx in enumerate(_column_major(shape)):
            out[idx] = _normalize(a[idx], _cell_path(where, k))
        return out
    if a.dtype.kind == "U":
        if a.ndim == 0:
            return str(a.item())
        if a.dtype.itemsize != 4:
            raise _Bad(
                where,
                f"numpy str array of dtype {a.dtype}: a MATLAB char array needs dtype '<U1' "
                "(one character per element); use a list of str for a cell array of strings",
            )
        shape = _row_shape(a.shape)
        a = a.reshape(shape)
        if _is_row_or_empty(shape):
            return _u1_to_str(a)
        return np.asarray(a, dtype="<U1")
    if a.dtype.kind not in _SUPPORTED_KINDS or _native(a).dtype not in _DTYPE_CLASSES:
        raise _Bad(where, f"numpy dtype {a.dtype} has no MATLAB class")
    return _native(a).reshape(_row_shape(a.shape))


def _normalize_struct(d: Mapping, where: str) -> dict:
    out = {}
    for key, value in d.items():
        _check_name(key, where, "field name")
        out[key] = _normalize(value, f"{where}.{key}")
    return out


def _normalize_struct_array(sa: StructArray, where: str):
    fields = sa.fieldnames
    for f in fields:
        _check_name(f, where, "field name")
    if sa.shape == (1, 1):
        return _normalize_struct(sa[0], where)
    if not fields and sa.size:
        raise _Bad(where, f"a {sa.shape} struct array without fields cannot be stored in a MAT-file")
    elems = []
    for k, elem in enumerate(sa):
        base = _elem_path(where, k)
        elems.append({f: _normalize(elem[f], f"{base}.{f}") for f in fields})
    return StructArray(elems, shape=_matlab_shape(sa.shape), fieldnames=fields)


# ---------------------------------------------------------------------------
# Writing: API


def write_mat(path, variables: Mapping, format: str = "v7") -> None:
    """Write ``variables`` (name -> value) as a MAT-file, atomically.

    ``format`` is ``'v7'`` (Level 5, zlib-compressed, via scipy) or
    ``'v7.3'`` (HDF5 in MATLAB's layout). The file is written to a temporary
    file in the same folder, synced and renamed over ``path``.
    """
    try:
        p = os.fspath(path)
    except TypeError:
        raise MatFormatError(f"expected a file path, got {type(path).__name__}") from None
    try:
        if format not in ("v7", "v7.3"):
            raise _Bad("", f"unknown format {format!r}; use 'v7' or 'v7.3'")
        if not isinstance(variables, Mapping):
            raise _Bad("", f"variables must be a dict of name -> value, got {type(variables).__name__}")
        canon = {}
        for name, value in variables.items():
            _check_name(name, "", "variable name")
            canon[name] = _normalize(value, name)
        if format == "v7":
            scipy_vars = {name: _to_scipy(value, name) for name, value in canon.items()}
            _atomic_write(p, lambda tmp: _write_v7(tmp, scipy_vars))
        else:
            _atomic_write(p, lambda tmp: _write_v73(tmp, canon))
    except _Bad as bad:
        raise _api_error(p, bad) from None
    except MatFormatError:
        raise
    except OSError as exc:
        raise MatFormatError(_one_line(f"{p}: cannot write the MAT-file ({_short(exc)})")) from None


def _atomic_write(path: str, emit) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        emit(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):
        # Make the rename itself durable (POSIX only).
        try:
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)


# ---------------------------------------------------------------------------
# Writing v7 (scipy)


def _bmp_only(s: str, where: str) -> None:
    if any(ord(c) > 0xFFFF or 0xD800 <= ord(c) <= 0xDFFF for c in s):
        raise _Bad(
            where,
            "characters outside Unicode's Basic Multilingual Plane cannot be written to a "
            "v7 MAT-file; use format='v7.3'",
        )


def _to_scipy(value, where: str):
    """Canonical representation -> objects that scipy.io.savemat writes as MATLAB would."""
    if isinstance(value, dict):
        if not value:
            return {}  # scipy writes an empty mapping as a 1x1 struct without fields
        rec = np.empty((1, 1), dtype=[(f, object) for f in value])
        for f, v in value.items():
            rec[f][0, 0] = _to_scipy(v, f"{where}.{f}")
        return rec
    if isinstance(value, StructArray):
        if not value.fieldnames:
            raise _Bad(where, f"a {value.shape} struct array without fields cannot be written to v7 by scipy")
        rec = np.empty(value.shape, dtype=[(f, object) for f in value.fieldnames])
        for k, (idx, elem) in enumerate(zip(_column_major(value.shape), value)):
            for f in value.fieldnames:
                rec[f][idx] = _to_scipy(elem[f], f"{_elem_path(where, k)}.{f}")
        return rec
    if isinstance(value, str):
        _bmp_only(value, where)
        if not value:
            return np.zeros((0, 0), dtype="<U1")
        return np.array([value])  # shape (1,) of <Un: scipy writes a 1 x n char
    if value.dtype == object:
        out = np.empty(value.shape, dtype=object)
        for k, idx in enumerate(_column_major(value.shape)):
            out[idx] = _to_scipy(value[idx], _cell_path(where, k))
        return out
    if value.dtype.kind == "U":
        _bmp_only(_u1_to_str(value), where)
        if value.size == 0:
            return np.zeros((0, 0), dtype="<U1")
        # scipy appends the string length as the last dimension: fold the last
        # MATLAB dimension into the item size so the written shape is exact.
        last = value.shape[-1]
        folded = np.ascontiguousarray(value, dtype="<U1").view(f"<U{last}")
        return folded.reshape(value.shape[:-1])
    return value


def _write_v7(tmp: str, variables: dict) -> None:
    with open(tmp, "wb") as fh:
        try:
            scipy.io.savemat(
                fh,
                variables,
                appendmat=False,
                format="5",
                long_field_names=True,
                do_compression=True,
                oned_as="row",
            )
        except (ValueError, TypeError, OverflowError) as exc:
            # e.g. scipy's MatWriteError (a ValueError) for matrices over 2 GiB.
            raise _Bad("", f"scipy cannot write this as v7 ({_short(exc)}); try format='v7.3'") from None
        fh.flush()


# ---------------------------------------------------------------------------
# Writing v7.3 (HDF5 in MATLAB's layout)


def _matlab_header() -> bytes:
    text = (
        "MATLAB 7.3 MAT-file, Platform: matconvnet_port (Python {}.{}), Created on: {} "
        "HDF5 schema 1.00 .".format(sys.version_info[0], sys.version_info[1], time.strftime("%a %b %d %H:%M:%S %Y"))
    ).encode("ascii")
    # 116 bytes of text, 8 bytes subsystem offset, version 0x0200, endian 'IM'.
    return text[:116].ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


def _write_v73(tmp: str, variables: dict) -> None:
    # track_order keeps the variables in the order given (MATLAB ignores it).
    with h5py.File(tmp, "w", userblock_size=512, track_order=True) as f:
        writer = _H5Writer(f)
        for name, value in variables.items():
            writer.write(f, name, value, name)
    with open(tmp, "r+b") as fh:
        fh.write(_matlab_header())


def _class_attr(obj, cls: str) -> None:
    obj.attrs["MATLAB_class"] = np.bytes_(cls.encode("ascii"))


def _fields_attr(obj, fields) -> None:
    # MATLAB stores field names as a variable-length array of 1-char strings.
    vlen = h5py.vlen_dtype(np.dtype("S1"))
    data = np.empty(len(fields), dtype=object)
    for i, f in enumerate(fields):
        data[i] = np.frombuffer(f.encode("ascii"), dtype="S1")
    obj.attrs.create("MATLAB_fields", data, dtype=vlen)


class _H5Writer:
    _COMPRESS_BYTES = 2048

    def __init__(self, f: h5py.File):
        self.f = f
        self.refs = None
        self.count = 0

    def _refs_group(self):
        if self.refs is None:
            self.refs = self.f.create_group("#refs#")
            # MATLAB keeps a 'canonical empty' array as the first entry of #refs#.
            self._empty(self.refs, self._next_name(), "canonical empty", (0, 0))
        return self.refs

    def _next_name(self) -> str:
        # Unique names 'a', 'b', ..., 'z', '10', '11', ... (base 36 from 10).
        n = self.count + 10
        self.count += 1
        digits = ""
        while n:
            n, r = divmod(n, 36)
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        return digits

    def _ref(self, value, where: str):
        group = self._refs_group()
        name = self._next_name()
        self.write(group, name, value, where)
        return group[name].ref

    def _dataset(self, parent, name, data: np.ndarray):
        opts = {}
        if data.nbytes >= self._COMPRESS_BYTES:
            opts = {"compression": "gzip", "compression_opts": 3}
        return parent.create_dataset(name, data=data, **opts)

    def _empty(self, parent, name, cls: str, shape, fields=None):
        ds = parent.create_dataset(name, data=np.array(shape, dtype=np.uint64))
        _class_attr(ds, cls)
        ds.attrs["MATLAB_empty"] = np.uint8(1)
        if fields:
            _fields_attr(ds, fields)
        return ds

    def write(self, parent, name: str, value, where: str) -> None:
        if isinstance(value, dict):
            group = parent.create_group(name)
            _class_attr(group, "struct")
            if value:
                _fields_attr(group, list(value))
            for f, v in value.items():
                self.write(group, f, v, f"{where}.{f}")
        elif isinstance(value, StructArray):
            self._struct_array(parent, name, value, where)
        elif isinstance(value, str):
            self._char(parent, name, value, where)
        elif value.dtype == object:
            self._cell(parent, name, value, where)
        elif value.dtype.kind == "U":
            self._char_matrix(parent, name, value, where)
        else:
            self._numeric(parent, name, value)

    def _numeric(self, parent, name, value: np.ndarray) -> None:
        cls = _DTYPE_CLASSES[value.dtype]
        if value.size == 0:
            self._empty(parent, name, cls, value.shape)
            return
        data = np.ascontiguousarray(value.T)
        if data.dtype == np.bool_:
            data = data.astype(np.uint8)
        elif data.dtype.kind == "c":
            part = np.float32 if data.dtype == np.complex64 else np.float64
            pair = np.empty(data.shape, dtype=[("real", part), ("imag", part)])
            pair["real"], pair["imag"] = data.real, data.imag
            data = pair
        ds = self._dataset(parent, name, data)
        _class_attr(ds, cls)
        if cls == "logical":
            ds.attrs["MATLAB_int_decode"] = np.int32(1)

    def _char_codes(self, parent, name, codes: np.ndarray) -> None:
        ds = self._dataset(parent, name, np.ascontiguousarray(codes.T))
        _class_attr(ds, "char")
        ds.attrs["MATLAB_int_decode"] = np.int32(2)

    def _char(self, parent, name, value: str, where: str) -> None:
        if not value:
            self._empty(parent, name, "char", (0, 0))
            return
        units = np.frombuffer(value.encode("utf-16-le", "surrogatepass"), dtype="<u2")
        self._char_codes(parent, name, units.reshape(1, -1))

    def _char_matrix(self, parent, name, value: np.ndarray, where: str) -> None:
        codes = np.ascontiguousarray(value, dtype="<U1").view("<u4").reshape(value.shape)
        if codes.size and codes.max() > 0xFFFF:
            raise _Bad(where, "a char matrix element outside the Basic Multilingual Plane needs two MATLAB chars")
        self._char_codes(parent, name, codes.astype(np.uint16))

    def _cell(self, parent, name, value: np.ndarray, where: str) -> None:
        if value.size == 0:
            self._empty(parent, name, "cell", value.shape)
            return
        refs = np.empty(value.shape, dtype=h5py.ref_dtype)
        for k, idx in enumerate(_column_major(value.shape)):
            refs[idx] = self._ref(value[idx], _cell_path(where, k))
        ds = parent.create_dataset(name, data=np.ascontiguousarray(refs.T))
        _class_attr(ds, "cell")

    def _struct_array(self, parent, name, value: StructArray, where: str) -> None:
        fields = value.fieldnames
        if value.size == 0:
            self._empty(parent, name, "struct", value.shape, fields)
            return
        if not fields:
            raise _Bad(where, f"a {value.shape} struct array without fields cannot be stored in v7.3")
        group = parent.create_group(name)
        _class_attr(group, "struct")
        _fields_attr(group, fields)
        columns = {f: np.empty(value.shape, dtype=h5py.ref_dtype) for f in fields}
        for k, (idx, elem) in enumerate(zip(_column_major(value.shape), value)):
            for f in fields:
                columns[f][idx] = self._ref(elem[f], f"{_elem_path(where, k)}.{f}")
        for f in fields:
            # No MATLAB_class here: that is how readers tell a struct array
            # from a 1x1 struct whose field is a cell.
            group.create_dataset(f, data=np.ascontiguousarray(columns[f].T))
