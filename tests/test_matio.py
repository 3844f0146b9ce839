"""Tests for matconvnet_port.matio (MAT-file reading/writing, v4/v5/v7/v7.3)."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from matconvnet_port import matio
from matconvnet_port.errors import MatFormatError
from matconvnet_port.matio import StructArray, cell

REF = Path(__file__).resolve().parent.parent / "reference_data"
ALL_REF_FILES = sorted(REF.rglob("*.mat"))
V73_NET = REF / "train" / "net-epoch-2-v73.mat"
V7_NET = REF / "train" / "net-epoch-2.mat"
# Round trips cover every reference file up to 2 MB plus one full checkpoint
# (net, state.solverState, stats) to keep the suite fast.
ROUND_TRIP_FILES = sorted({p for p in ALL_REF_FILES if p.stat().st_size <= 2_000_000} | {V7_NET})
FORMATS = ["v7", "v7.3"]


# ---------------------------------------------------------------------------
# helpers


def differences(a, b, path="", out=None):
    """Every place where two representations differ (type, shape, dtype, bits, order)."""
    out = [] if out is None else out
    if type(a) is not type(b):
        out.append(f"{path}: {type(a).__name__} vs {type(b).__name__}")
    elif isinstance(a, dict):
        if list(a) != list(b):
            out.append(f"{path}: fields {list(a)} vs {list(b)}")
        for k in a:
            if k in b:
                differences(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, StructArray):
        if a.shape != b.shape or a.fieldnames != b.fieldnames:
            out.append(f"{path}: struct array {a.shape} {a.fieldnames} vs {b.shape} {b.fieldnames}")
        else:
            for k, (x, y) in enumerate(zip(a, b)):
                differences(x, y, f"{path}({k + 1})", out)
    elif isinstance(a, str):
        if a != b:
            out.append(f"{path}: {a!r} vs {b!r}")
    elif isinstance(a, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
        elif a.dtype == object:
            for k, (x, y) in enumerate(zip(a.ravel(order="F"), b.ravel(order="F"))):
                differences(x, y, f"{path}{{{k + 1}}}", out)
        elif np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes():
            out.append(f"{path}: values differ")
    else:
        out.append(f"{path}: unexpected type {type(a).__name__}")
    return out


def assert_same(a, b):
    diffs = differences(a, b)
    assert not diffs, "\n".join(diffs[:20])


def assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def synthetic_value():
    """One value of every kind the representation has, in canonical form."""
    rng = np.random.default_rng(0)
    return {
        "d": np.arange(6, dtype=np.float64).reshape(2, 3),
        "s4": rng.standard_normal((2, 1, 3, 2)).astype(np.float32),  # interior singleton
        "s3": rng.standard_normal((3, 2, 4)).astype(np.float32),
        "special": np.array([[np.nan, -0.0, np.inf, -np.inf, 1e-310]]),
        "i8": np.array([[-128, 127]], dtype=np.int8),
        "u8": np.array([[0, 255]], dtype=np.uint8),
        "i16": np.array([[-32768], [32767]], dtype=np.int16),
        "u16": np.array([[65535]], dtype=np.uint16),
        "i32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
        "u32": np.array([[2**32 - 1]], dtype=np.uint32),
        "i64": np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
        "u64": np.array([[2**64 - 1]], dtype=np.uint64),
        "logical": np.array([[True, False], [False, True]]),
        "logical1": np.array([[True]]),
        "z128": np.array([[1 + 2j, -3.5j]]),
        "z64": np.array([[1 - 1j], [2 + 0.5j]], dtype=np.complex64),
        "empty": np.zeros((0, 0)),
        "empty_1x0_single": np.zeros((1, 0), dtype=np.float32),
        "empty_0x3_int16": np.zeros((0, 3), dtype=np.int16),
        "empty_logical": np.zeros((0, 0), dtype=bool),
        "text": "layer1",
        "no_text": "",
        "unicode": "h\u00e9llo \u20ac \u00fc\u03a9",
        "char_matrix": np.array([["a", "b", "c"], ["d", "e", "f"]], dtype="<U1"),
        "char_column": np.array([["x"], ["y"]], dtype="<U1"),
        "cell": cell(
            [
                {"k": np.array([[1.0]]), "name": "inner"},  # 1x1 struct inside a cell
                cell([cell(["deep", np.zeros((0, 0))]), np.array([[1, 2]], dtype=np.uint8)]),
                "",
                np.zeros((0, 0), dtype=object),
            ],
            shape=(2, 2),
        ),
        "empty_cell": np.empty((0, 0), dtype=object),
        "empty_cell_1x0": np.empty((1, 0), dtype=object),
        "struct": {
            "zeta": np.array([[1.0]]),
            "alpha": {"nested": np.array([[2.0]], dtype=np.float32), "none": {}},
            "mid": StructArray([{"p": "a", "q": np.array([[1.0]])}, {"p": "bb", "q": np.zeros((0, 0))}]),
        },
        "struct_array": StructArray(
            [
                {"name": "x", "value": np.ones((2, 2), np.float32), "learningRate": np.array([[1.0]])},
                {"name": "y", "value": cell(["c"]), "learningRate": np.zeros((1, 0))},
                {"name": "z", "value": {"inner": np.array([[3]], dtype=np.int32)}, "learningRate": np.array([[2.0]])},
            ]
        ),
        "struct_array_2x2": StructArray(
            [{"v": np.array([[float(k)]])} for k in range(4)], shape=(2, 2)
        ),
        "empty_struct_with_fields": StructArray.empty(["name", "value"]),
        "empty_struct_1x0": StructArray.empty(["only"], shape=(1, 0)),
        "struct_no_fields": {},
    }


# ---------------------------------------------------------------------------
# reading the reference files


def test_reference_files_are_present():
    assert V73_NET.exists() and V7_NET.exists()
    assert len(ALL_REF_FILES) >= 20


@pytest.mark.parametrize("path", ALL_REF_FILES, ids=lambda p: str(p.relative_to(REF)))
def test_reads_every_reference_file(path):
    data = matio.read_mat(path)
    assert data, path
    if path == V73_NET:
        assert matio.mat_format(path) == "v7.3"
        assert list(data) == ["net"]
    else:
        assert matio.mat_format(path) == "v5"
        # Same variables, same order as MATLAB's directory of the file.
        assert list(data) == [name for name, _, _ in scipy.io.whosmat(str(path))]
    for name, value in data.items():
        assert isinstance(value, (dict, StructArray, str, np.ndarray)), name


def test_reference_values_have_matlab_shapes_and_classes():
    conv = matio.read_mat(REF / "conv.mat")
    cases = conv["cases"]
    assert cases.dtype == object and cases.shape == (1, 16)
    case = cases[0, 3]
    assert isinstance(case, dict)
    assert case["name"] == "asympad_stride21"
    assert case["x"].shape == (8, 9, 2, 3) and case["x"].dtype == np.float32
    assert case["pad"].shape == (1, 4) and case["pad"].dtype == np.float64
    # Trailing singleton dims are dropped as in MATLAB: case 14 has N = 1.
    assert cases[0, 13]["x"].shape == (8, 7, 3)
    # Same numbers as scipy's own reading, in MATLAB index order.
    raw = scipy.io.loadmat(REF / "conv.mat", struct_as_record=False, squeeze_me=False)
    np.testing.assert_array_equal(case["x"], raw["cases"][0, 3][0, 0].x)
    lenet = matio.read_mat(REF / "lenet.mat")
    assert lenet["masks"].dtype == np.bool_ and lenet["masks"].shape == (16, 4)
    layers = lenet["net"]["layers"]
    assert layers.shape == (1, 8) and layers[0, 0]["weights"].shape == (1, 2)
    assert layers[0, 0]["weights"][0, 0].shape == (5, 5, 1, 20)
    assert layers[0, 1]["opts"].shape == (0, 0) and layers[0, 1]["opts"].dtype == object


def test_dagnn_struct_arrays():
    net = matio.read_mat_variable(REF / "dagnn_lenet.mat", "net")
    assert set(net) >= {"vars", "params", "layers", "meta"}
    assert isinstance(net["vars"], StructArray) and net["vars"].shape == (1, 10)
    assert net["vars"].fieldnames[0] == "name" and net["vars"][9]["name"] == "objective"
    params = net["params"]
    assert isinstance(params, StructArray) and params.shape == (1, 8)
    assert params.fieldnames[:2] == ["name", "value"]
    assert [p["name"] for p in params] == [
        "layer1f", "layer1b", "layer3f", "layer3b", "layer5f", "layer5b", "layer7f", "layer7b"
    ]
    assert params[0]["value"].shape == (5, 5, 1, 20) and params[0, 0] is params[0]
    layers = net["layers"]
    assert isinstance(layers, StructArray) and len(layers) == 8
    assert layers[0]["type"] == "dagnn.Conv" and isinstance(layers[0]["block"], dict)


def test_v73_net_equals_v7_net():
    v7 = matio.read_mat_variable(V7_NET, "net")
    v73 = matio.read_mat_variable(V73_NET, "net")
    diffs = differences(v7, v73, "net")
    # Two artefacts of how the v7.3 file was produced (hdf5storage fed with a
    # default scipy.io.loadmat result): MATLAB logicals arrive as uint8 (see
    # the README's conventions), and the 1x1 structs meta.trainOpts and
    # meta.classes were saved wrapped in 1x1 cells. Everything else, weights
    # included, must be identical bit for bit.
    expected = {
        f"net.layers{{{k}}}.precious: bool vs uint8" for k in (1, 2, 3, 4, 5, 6, 8)
    } | {"net.meta.trainOpts: dict vs ndarray", "net.meta.classes: dict vs ndarray"}
    got = {d.replace("(1, 1)", "") for d in diffs}
    assert got == expected, sorted(got ^ expected)
    for k in (0, 1, 2, 3, 4, 5, 7):
        a, b = v7["layers"][0, k]["precious"], v73["layers"][0, k]["precious"]
        assert a.dtype == np.bool_ and b.dtype == np.uint8 and a.astype(np.uint8).tobytes() == b.tobytes()
    for key in ("trainOpts", "classes"):
        wrapped = v73["meta"][key]
        assert wrapped.dtype == object and wrapped.shape == (1, 1)
        assert_same(v7["meta"][key], wrapped[0, 0])
    for k in (0, 2, 4, 6):
        for j in range(2):
            w7, w73 = v7["layers"][0, k]["weights"][0, j], v73["layers"][0, k]["weights"][0, j]
            assert w7.dtype == w73.dtype == np.float32 and w7.shape == w73.shape
            assert w7.tobytes(order="F") == w73.tobytes(order="F")


def test_v73_reference_layout_is_read_in_matlab_order():
    net = matio.read_mat_variable(V73_NET, "net")
    conv3 = net["layers"][0, 4]
    assert conv3["weights"][0, 0].shape == (4, 4, 50, 500)  # h5py shows (500, 50, 4, 4)
    assert conv3["weights"][0, 1].shape == (1, 500)
    assert net["layers"][0, 1]["learningRate"].shape == (1, 0)  # MATLAB_empty [1 0]
    assert net["meta"]["inputSize"].shape == (1, 3)
    assert net["layers"][0, 7]["type"] == "softmaxloss"


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ROUND_TRIP_FILES, ids=lambda p: str(p.relative_to(REF)))
def test_reference_round_trip(path, fmt, tmp_path):
    first = matio.read_mat(path)
    out = tmp_path / "copy.mat"
    matio.write_mat(out, first, format=fmt)
    assert matio.mat_format(out) == ("v7.3" if fmt == "v7.3" else "v5")
    second = matio.read_mat(out)
    assert list(second) == list(first)
    assert_same(first, second)


@pytest.mark.parametrize("fmt", FORMATS)
def test_synthetic_round_trip(fmt, tmp_path):
    value = synthetic_value()
    out = tmp_path / "synthetic.mat"
    matio.write_mat(out, value, format=fmt)
    first = matio.read_mat(out)
    assert list(first) == list(value)
    assert_same(value, first)
    again = tmp_path / "again.mat"
    matio.write_mat(again, first, format=fmt)
    assert_same(first, matio.read_mat(again))


def test_cross_format_round_trip(tmp_path):
    value = synthetic_value()
    matio.write_mat(tmp_path / "a.mat", value, format="v7.3")
    matio.write_mat(tmp_path / "b.mat", matio.read_mat(tmp_path / "a.mat"), format="v7")
    assert_same(value, matio.read_mat(tmp_path / "b.mat"))


def test_differences_helper_detects_changes():
    value = synthetic_value()
    changed = synthetic_value()
    changed["s3"] = changed["s3"].copy()
    changed["s3"][0, 0, 0] = np.nextafter(changed["s3"][0, 0, 0], np.float32(np.inf))
    changed["struct"] = dict(reversed(list(changed["struct"].items())))
    changed["u8"] = changed["u8"].astype(np.int16)
    diffs = differences(value, changed)
    assert any(d.startswith(".s3") for d in diffs)
    assert any(d.startswith(".struct: fields") for d in diffs)
    assert any(d.startswith(".u8") for d in diffs)


def test_unicode_outside_bmp(tmp_path):
    text = "smile \U0001F600!"
    matio.write_mat(tmp_path / "u.mat", {"t": text}, format="v7.3")
    assert matio.read_mat_variable(tmp_path / "u.mat", "t") == text
    with h5py.File(tmp_path / "u.mat", "r") as f:
        assert f["t"].shape == (len(text) + 1, 1)  # MATLAB sees a UTF-16 surrogate pair
    with pytest.raises(MatFormatError) as exc:
        matio.write_mat(tmp_path / "u7.mat", {"t": text}, format="v7")
    assert_one_line_error(exc, "u7.mat", "v7.3")
    assert not (tmp_path / "u7.mat").exists()


def test_natural_python_values(tmp_path):
    values = {
        "lst": [1, "two", [3.5]],
        "tup": (True, None),
        "i": 3,
        "f": 2.5,
        "b": False,
        "z": 1 + 2j,
        "none": None,
        "row": np.arange(4, dtype=np.float32),
        "scalar32": np.float32(1.5),
        "zero_d": np.array(7, dtype=np.int16),
        "trailing": np.zeros((2, 3, 1, 1)),
        "nested": {"layers": [{"type": "conv"}, {"type": "relu"}]},
        "empty_list": [],
        "records": np.array([(1.0, "a"), (2.0, "b")], dtype=[("x", "f8"), ("y", "U1")]),
        "sparse": scipy.sparse.csr_matrix(np.array([[0.0, 1.0], [2.0, 0.0]])),
    }
    for fmt in FORMATS:
        out = tmp_path / f"natural-{fmt}.mat"
        matio.write_mat(out, values, format=fmt)
        got = matio.read_mat(out)
        lst = got["lst"]
        assert lst.dtype == object and lst.shape == (1, 3)
        assert lst[0, 0].dtype == np.float64 and lst[0, 0].shape == (1, 1) and lst[0, 1] == "two"
        assert lst[0, 2].dtype == object and lst[0, 2].shape == (1, 1)
        assert got["tup"][0, 0].dtype == np.bool_ and got["tup"][0, 1].shape == (0, 0)
        assert got["i"].dtype == np.float64 and got["i"].shape == (1, 1) and got["i"][0, 0] == 3
        assert got["b"].dtype == np.bool_ and got["z"].dtype == np.complex128
        assert got["none"].shape == (0, 0) and got["none"].dtype == np.float64
        assert got["row"].shape == (1, 4) and got["row"].dtype == np.float32
        assert got["scalar32"].shape == (1, 1) and got["scalar32"].dtype == np.float32
        assert got["zero_d"].shape == (1, 1) and got["zero_d"].dtype == np.int16
        assert got["trailing"].shape == (2, 3)
        assert got["nested"]["layers"][0, 1] == {"type": "relu"}
        assert got["empty_list"].shape == (0, 0) and got["empty_list"].dtype == object
        rec = got["records"]
        assert isinstance(rec, StructArray) and rec.shape == (1, 2) and rec.fieldnames == ["x", "y"]
        assert rec[1]["y"] == "b" and rec[1]["x"].dtype == np.float64
        np.testing.assert_array_equal(got["sparse"], [[0.0, 1.0], [2.0, 0.0]])


# ---------------------------------------------------------------------------
# structure of the files written


def test_v7_file_structure_seen_by_scipy(tmp_path):
    out = tmp_path / "v7.mat"
    matio.write_mat(out, synthetic_value(), format="v7")
    with open(out, "rb") as fh:
        head = fh.read(128)
    assert head.startswith(b"MATLAB 5.0 MAT-file") and head[124:128] == b"\x00\x01IM"
    classes = {n: (shape, cls) for n, shape, cls in scipy.io.whosmat(str(out), chars_as_strings=False)}
    assert classes["d"] == ((2, 3), "double")
    assert classes["s4"] == ((2, 1, 3, 2), "single")
    assert classes["logical"] == ((2, 2), "logical")
    assert classes["i64"] == ((1, 2), "int64")
    assert classes["text"] == ((1, 6), "char")
    assert classes["no_text"] == ((0, 0), "char")
    assert classes["char_matrix"] == ((2, 3), "char")
    assert classes["cell"] == ((2, 2), "cell")
    assert classes["struct"] == ((1, 1), "struct")
    assert classes["struct_array"] == ((1, 3), "struct")
    assert classes["empty_struct_with_fields"] == ((0, 0), "struct")
    assert classes["empty_cell"] == ((0, 0), "cell")
    raw = scipy.io.loadmat(out, struct_as_record=False, squeeze_me=False)
    assert raw["s4"].dtype == np.float32 and raw["s4"].shape == (2, 1, 3, 2)
    c = raw["cell"]
    assert c.dtype == object and c.shape == (2, 2)
    inner = c[0, 0]
    assert inner.shape == (1, 1) and isinstance(inner[0, 0], scipy.io.matlab.mat_struct)
    assert inner[0, 0]._fieldnames == ["k", "name"]
    st = raw["struct"][0, 0]
    assert isinstance(st, scipy.io.matlab.mat_struct) and st._fieldnames == ["zeta", "alpha", "mid"]
    assert st.alpha[0, 0].nested.dtype == np.float32
    sa = raw["struct_array"]
    assert sa.shape == (1, 3) and all(isinstance(e, scipy.io.matlab.mat_struct) for e in sa.ravel())
    assert sa[0, 1].name[0] == "y"
    assert raw["text"][0] == "layer1"
    assert list(raw["char_matrix"]) == ["abc", "def"]
    assert raw["z64"].dtype == np.complex64
    assert raw["logical"].dtype == np.uint8  # MATLAB logical, as scipy shows it by default


def _fields(obj):
    return [item.tobytes().decode("ascii") for item in obj.attrs["MATLAB_fields"]]


def _cls(obj):
    return obj.attrs["MATLAB_class"].decode("ascii")


def test_v73_file_structure_seen_by_h5py(tmp_path):
    out = tmp_path / "v73.mat"
    value = synthetic_value()
    matio.write_mat(out, value, format="v7.3")
    with open(out, "rb") as fh:
        head = fh.read(512)
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
    with h5py.File(out, "r") as f:
        assert f.userblock_size == 512
        assert [k for k in f if not k.startswith("#")] == list(value)
        # numeric: column-major, dims reversed, MATLAB class attribute
        d = f["d"]
        assert _cls(d) == "double" and d.shape == (3, 2)
        np.testing.assert_array_equal(d[()].T, value["d"])
        assert f["s4"].shape == (2, 3, 1, 2) and f["s4"].dtype == np.float32
        assert _cls(f["logical"]) == "logical" and f["logical"].dtype == np.uint8
        assert _cls(f["u64"]) == "uint64"
        assert f["z128"].dtype.names == ("real", "imag")
        # chars: UTF-16 code units, 1 x n in MATLAB = (n, 1) in HDF5
        t = f["text"]
        assert _cls(t) == "char" and t.dtype == np.uint16 and t.shape == (6, 1)
        assert bytes(t[()].ravel().astype(np.uint8)) == b"layer1"
        # empty arrays: the dataset holds the MATLAB dims, MATLAB_empty = 1
        for name, cls, dims in [
            ("empty", "double", [0, 0]),
            ("empty_1x0_single", "single", [1, 0]),
            ("no_text", "char", [0, 0]),
            ("empty_cell", "cell", [0, 0]),
            ("empty_struct_with_fields", "struct", [0, 0]),
        ]:
            ds = f[name]
            assert _cls(ds) == cls and ds.attrs["MATLAB_empty"] == 1, name
            assert ds.dtype == np.uint64 and list(ds[()]) == dims, name
        assert _fields(f["empty_struct_with_fields"]) == ["name", "value"]
        # cells: object references into /#refs#
        c = f["cell"]
        assert _cls(c) == "cell" and c.dtype == h5py.ref_dtype and c.shape == (2, 2)
        first = f[c[0, 0]]
        assert first.name.startswith("/#refs#/")
        assert isinstance(first, h5py.Group) and _cls(first) == "struct"
        assert _fields(first) == ["k", "name"]
        # HDF5 index [j, i] is MATLAB's cell{i+1, j+1}
        assert _cls(f[c[0, 1]]) == "cell" and _cls(f[c[1, 0]]) == "char"
        # 1x1 struct: group with MATLAB_fields in field order
        s = f["struct"]
        assert isinstance(s, h5py.Group) and _cls(s) == "struct"
        assert _fields(s) == ["zeta", "alpha", "mid"]
        assert _cls(s["zeta"]) == "double" and _cls(s["alpha"]) == "struct"
        # struct array: group of reference datasets without MATLAB_class
        sa = f["struct_array"]
        assert _cls(sa) == "struct" and _fields(sa) == ["name", "value", "learningRate"]
        for field in ("name", "value", "learningRate"):
            ds = sa[field]
            assert ds.dtype == h5py.ref_dtype and ds.shape == (3, 1) and "MATLAB_class" not in ds.attrs
        assert _cls(f[sa["name"][1, 0]]) == "char"
        assert f["struct_array_2x2"]["v"].shape == (2, 2)


def test_v73_reads_matlab_sparse_layout(tmp_path):
    out = tmp_path / "sparse.mat"
    matio.write_mat(out, {"keep": 1.0}, format="v7.3")
    dense = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    csc = scipy.sparse.csc_matrix(dense)
    with h5py.File(out, "r+") as f:
        g = f.create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_(b"double")
        g.attrs["MATLAB_sparse"] = np.uint64(2)
        g["data"], g["ir"], g["jc"] = csc.data, csc.indices.astype(np.uint64), csc.indptr.astype(np.uint64)
    got = matio.read_mat_variable(out, "sp")
    assert got.dtype == np.float64 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, dense)


def test_v5_sparse_and_complex_read(tmp_path):
    out = tmp_path / "sc.mat"
    dense = np.array([[0.0, 2.0], [1.0, 0.0]])
    scipy.io.savemat(out, {
        "sp": scipy.sparse.csc_matrix(dense),
        "s": {"c": np.array([[1 + 1j, 2]], dtype=np.complex64), "b": np.array([[True]]), "d": np.array([[4.0]])},
    })
    got = matio.read_mat(out)
    np.testing.assert_array_equal(got["sp"], dense)
    s = got["s"]
    assert s["c"].dtype == np.complex64 and s["c"][0, 0] == 1 + 1j
    assert s["b"].dtype == np.bool_ and s["d"].dtype == np.float64


def test_v4_files(tmp_path):
    out = tmp_path / "v4.mat"
    scipy.io.savemat(out, {"a": np.arange(6.0).reshape(2, 3)}, format="4")
    assert matio.mat_format(out) == "v4"
    np.testing.assert_array_equal(matio.read_mat(out)["a"], np.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------------------------
# StructArray and cell helpers


def test_struct_array_api():
    sa = StructArray([{"a": k, "b": -k} for k in range(6)], shape=(2, 3))
    assert sa.shape == (2, 3) and sa.fieldnames == ["a", "b"] and len(sa) == 6
    assert [e["a"] for e in sa] == list(range(6))  # column-major
    assert sa[1]["a"] == 1 and sa[1, 0]["a"] == 1 and sa[0, 1]["a"] == 2 and sa[-1]["a"] == 5
    assert sa.field("b") == [0, -1, -2, -3, -4, -5]
    assert sa[:, 1].shape == (2, 1)
    reordered = StructArray([{"b": 1, "a": 2}, {"a": 3, "b": 4}], fieldnames=["a", "b"])
    assert list(reordered[0]) == ["a", "b"]
    with pytest.raises(ValueError):
        StructArray([{"a": 1}, {"b": 2}])
    with pytest.raises(ValueError):
        StructArray([{"a": 1}], shape=(2, 2))
    with pytest.raises(IndexError):
        sa[6]
    empty = StructArray.empty(["x"])
    assert empty.shape == (0, 0) and empty.fieldnames == ["x"] and list(empty) == []
    c = cell([1, 2, 3, 4], shape=(2, 2))
    assert c.dtype == object and c[1, 0] == 2 and cell([]).shape == (0, 0) and cell(["a"]).shape == (1, 1)


# ---------------------------------------------------------------------------
# bad input


def _write_text(path, text):
    path.write_text(text)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(tmp_path / "nope.mat")
    assert_one_line_error(exc, "nope.mat", "no such file")
    with pytest.raises(MatFormatError):
        matio.mat_format(tmp_path / "nope.mat")


def test_not_a_mat_file(tmp_path):
    text = _write_text(tmp_path / "notes.mat", "just some text, not MATLAB data\n" * 10)
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(text)
    assert_one_line_error(exc, "notes.mat", "not a MAT-file")
    png = tmp_path / "image.mat"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200))
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(png)
    assert_one_line_error(exc, "image.mat", "PNG")
    empty = tmp_path / "empty.mat"
    empty.write_bytes(b"")
    with pytest.raises(MatFormatError) as exc:
        matio.mat_format(empty)
    assert_one_line_error(exc, "empty.mat")
    h5 = tmp_path / "plain.mat"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(h5)
    assert_one_line_error(exc, "plain.mat", "HDF5")


@pytest.mark.parametrize("source", [V7_NET, REF / "softmax.mat", V73_NET], ids=lambda p: p.name)
def test_truncated_files(source, tmp_path):
    data = source.read_bytes()
    for cut in (len(data) // 2, 300, 100):
        cut_file = tmp_path / f"cut-{cut}-{source.name}"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(MatFormatError) as exc:
            matio.read_mat(cut_file)
        assert_one_line_error(exc, cut_file.name)
    # The v7 halves are recognised as truncated, not just "corrupt".
    if source != V73_NET:
        half = tmp_path / f"cut-{len(data) // 2}-{source.name}"
        with pytest.raises(MatFormatError, match="truncated"):
            matio.read_mat_variable(half, "net")


def test_corrupt_compressed_data_names_the_variable(tmp_path):
    out = tmp_path / "two.mat"
    matio.write_mat(out, {"good": np.zeros((100, 100)), "bad": np.arange(10000.0)}, format="v7")
    data = bytearray(out.read_bytes())
    data[-200:-100] = bytes(100)  # damage the compressed stream of the last variable
    out.write_bytes(bytes(data))
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(out)
    assert_one_line_error(exc, "two.mat", "bad")
    assert matio.read_mat_variable(out, "good").shape == (100, 100)


# A tiny v5 writer for what scipy cannot write: MATLAB (MCOS) objects and
# function handles, laid out as MATLAB does.
def _el(mdtype, payload):
    return struct.pack("<II", mdtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _flags(mclass):
    return _el(6, struct.pack("<II", mclass, 0))


def _matrix_header(mclass, name, dims=(1, 1)):
    return _flags(mclass) + _el(5, struct.pack(f"<{len(dims)}i", *dims)) + _el(1, name.encode())


def _double(name, value):
    return _el(14, _matrix_header(6, name) + _el(9, struct.pack("<d", value)))


def _mcos(name, classname):
    metadata = _el(14, _matrix_header(13, "", (6, 1)) + _el(6, struct.pack("<6I", 0xDD000000, 2, 1, 1, 1, 1)))
    return _el(14, _flags(17) + _el(1, name.encode()) + _el(1, b"MCOS") + _el(1, classname.encode()) + metadata)


def _cell_of(name, child):
    return _el(14, _matrix_header(1, name) + child)


def _function_handle(name):
    inner = _el(14, _matrix_header(2, "") + _el(5, struct.pack("<i", 8)) + _el(1, b"matlabr\0") + _double("", 1.0))
    return _el(14, _matrix_header(16, name) + inner)


def _v5_file(path, *elements):
    header = b"MATLAB 5.0 MAT-file, Platform: test".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"
    path.write_bytes(header + b"".join(elements))
    return path


def test_mcos_object_v5(tmp_path):
    path = _v5_file(tmp_path / "dagobj.mat", _double("ok", 2.0), _mcos("net", "dagnn.DagNN"))
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(path)
    assert_one_line_error(exc, "dagobj.mat", "net", "dagnn.DagNN", "outside MATLAB", "saveobj")
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat_variable(path, "net")
    assert_one_line_error(exc, "dagobj.mat", "dagnn.DagNN")
    assert matio.read_mat_variable(path, "ok")[0, 0] == 2.0
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat_variable(path, "missing")
    assert_one_line_error(exc, "dagobj.mat", "missing", "ok", "net")


def test_mcos_object_nested_in_cell_v5(tmp_path):
    path = _v5_file(tmp_path / "nested.mat", _cell_of("layers", _mcos("", "dagnn.Conv")))
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(path)
    assert_one_line_error(exc, "nested.mat", "layers{1}", "dagnn.Conv")


def test_function_handle_v5(tmp_path):
    path = _v5_file(tmp_path / "fh.mat", _function_handle("f"))
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(path)
    assert_one_line_error(exc, "fh.mat", "f:", "function handle")


def test_old_style_object_v5(tmp_path):
    path = tmp_path / "oldobj.mat"
    obj = scipy.io.matlab.MatlabObject(np.zeros((1, 1), dtype=[("expr", object)]), "inline")
    obj[0, 0]["expr"] = np.array(["x"])
    scipy.io.savemat(path, {"fun": obj})
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(path)
    assert_one_line_error(exc, "oldobj.mat", "fun", "inline")


def _net_v73(path):
    layers = [{"type": "conv", "weights": [np.ones((3, 3, 1, 2), np.float32), np.zeros((1, 2), np.float32)]}] * 3
    matio.write_mat(path, {"net": {"layers": layers}}, format="v7.3")
    return path


def test_mcos_object_v73(tmp_path):
    path = _net_v73(tmp_path / "obj73.mat")
    with h5py.File(path, "r+") as f:
        ds = f.create_dataset("dag", data=np.array([[0xDD000000], [2], [1], [1], [1], [1]], dtype=np.uint32))
        ds.attrs["MATLAB_class"] = np.bytes_(b"dagnn.DagNN")
        ds.attrs["MATLAB_object_decode"] = np.int32(3)
        f.create_group("#subsystem#")
        fh = f.create_group("handle")
        fh.attrs["MATLAB_class"] = np.bytes_(b"function_handle")
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat_variable(path, "dag")
    assert_one_line_error(exc, "obj73.mat", "dag", "dagnn.DagNN", "saveobj")
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat_variable(path, "handle")
    assert_one_line_error(exc, "obj73.mat", "handle", "function handle")
    assert isinstance(matio.read_mat_variable(path, "net"), dict)
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat_variable(path, "nothere")
    assert_one_line_error(exc, "obj73.mat", "nothere", "net", "dag")


def test_unreadable_element_names_its_path_v73(tmp_path):
    path = _net_v73(tmp_path / "broken.mat")
    with h5py.File(path, "r+") as f:
        layer3 = f[f["net/layers"][2, 0]]
        target = f[layer3["weights"][0, 0]]
        target.attrs["MATLAB_class"] = np.bytes_(b"char")  # float32 data posing as char
    with pytest.raises(MatFormatError) as exc:
        matio.read_mat(path)
    assert_one_line_error(exc, "broken.mat", "net.layers{3}.weights{1}")


def test_write_errors(tmp_path):
    out = tmp_path / "w.mat"
    bad_inputs = [
        ({"_x": 1}, "_x"),
        ({"1a": 1}, "1a"),
        ({"ok": {"bad-field": 1}}, "bad-field"),
        ({"ok": {"a": {1, 2}}}, "ok.a"),
        ({"ok": [1, b"bytes"]}, "ok{2}"),
        ({"ok": np.zeros(3, dtype=np.float16)}, "float16"),
        ({"ok": np.array(["ab", "cd"])}, "<U1"),
        ({"ok": StructArray([{}, {}], fieldnames=[])}, "without fields"),
    ]
    for fmt in FORMATS:
        for variables, needle in bad_inputs:
            with pytest.raises(MatFormatError) as exc:
                matio.write_mat(out, variables, format=fmt)
            assert_one_line_error(exc, "w.mat", needle)
    with pytest.raises(MatFormatError):
        matio.write_mat(out, {"a": 1}, format="v6")
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path):
    out = tmp_path / "model.mat"
    for fmt in FORMATS:
        matio.write_mat(out, {"a": 1.0}, format=fmt)
        before = out.read_bytes()
        with pytest.raises(MatFormatError):
            matio.write_mat(out, {"a": 2.0, "b": object()}, format=fmt)
        assert out.read_bytes() == before
        matio.write_mat(out, {"a": 3.0}, format=fmt)
        assert matio.read_mat_variable(out, "a")[0, 0] == 3.0
        assert sorted(os.listdir(tmp_path)) == ["model.mat"]
    with pytest.raises(MatFormatError) as exc:
        matio.write_mat(tmp_path / "no_such_dir" / "x.mat", {"a": 1.0})
    assert_one_line_error(exc, "x.mat")


def test_variable_order_is_kept(tmp_path):
    names = ["zeta", "alpha", "mid", "beta"]
    for fmt in FORMATS:
        out = tmp_path / f"order-{fmt}.mat"
        matio.write_mat(out, {n: float(k) for k, n in enumerate(names)}, format=fmt)
        assert list(matio.read_mat(out)) == names


SCIPY_DATA = Path(scipy.io.__file__).parent / "matlab" / "tests" / "data"


@pytest.mark.skipif(not SCIPY_DATA.is_dir(), reason="scipy's MATLAB test files are not installed")
def test_matlab_written_files_from_scipy_tests():
    # Real MATLAB files (v4 .. v7.3): each is read or refused with a clean error.
    read = refused = 0
    for path in sorted(SCIPY_DATA.glob("*.mat")):
        try:
            matio.read_mat(path)
            read += 1
        except MatFormatError as exc:
            assert "\n" not in str(exc) and path.name in str(exc)
            refused += 1
    assert read > 50 and refused > 0
    hdf5 = SCIPY_DATA / "testhdf5_7.4_GLNX86.mat"
    if hdf5.exists():  # written by MATLAB 7.4 itself
        got = matio.read_mat(hdf5)["testdouble"]
        assert got.shape == (1, 9)
        np.testing.assert_allclose(got, np.arange(9)[None, :] * np.pi / 4)
    parabola = SCIPY_DATA / "parabola.mat"
    if parabola.exists():
        with pytest.raises(MatFormatError, match="function handle"):
            matio.read_mat(parabola)


@pytest.mark.parametrize("bad_row", [3, 100_000_000])
def test_a_sparse_matrix_with_row_indices_outside_it_is_an_error_not_a_crash(tmp_path, bad_row):
    """scipy and h5py hand over a corrupt file's indices unchecked; densifying them wrote outside the
    array (a segfault for a large index, a value silently lost for a small one)."""
    path = tmp_path / "sparse.mat"
    scipy.io.savemat(path, {"x": scipy.sparse.csc_matrix(np.array([[7.0], [8.0], [9.0]]))}, do_compression=False)
    raw = bytearray(path.read_bytes())
    at = raw.find(struct.pack("<II", 5, 12) + struct.pack("<3i", 0, 1, 2))  # the row indices: miINT32, 12 bytes
    assert at > 0
    raw[at + 12:at + 16] = struct.pack("<i", bad_row)
    path.write_bytes(bytes(raw))
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(path)
    assert_one_line_error(e, "sparse.mat", "corrupt sparse matrix")
    h5 = tmp_path / "sparse73.mat"
    with h5py.File(h5, "w", userblock_size=512) as f:
        g = f.create_group("x")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(3)
        g["jc"], g["ir"], g["data"] = np.array([0, 3], np.uint64), np.array([0, bad_row, 2], np.uint64), [7.0, 8, 9]
    with open(h5, "r+b") as f:  # MATLAB's 128-byte header in the user block
        f.write(b"MATLAB 7.3 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM")
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(h5)
    assert_one_line_error(e, "sparse73.mat", "corrupt sparse matrix")


@pytest.mark.parametrize("chunks", [(100, 100), None], ids=["chunked", "contiguous"])
def test_v73_dataset_declaring_more_than_it_stores(tmp_path, chunks):
    """h5py would allocate the declared 80 GB and fill it with the fill value; the read must refuse
    the dataset, naming it, without allocating."""
    path = tmp_path / "declared.mat"
    matio.write_mat(path, {"net": {"layers": [np.ones((2, 2), np.float32)]}, "x": np.arange(3.0)}, format="v7.3")
    with h5py.File(path, "a") as f:
        ds = f.create_dataset("#refs#/declared", shape=(100_000, 100_000), dtype="f4", chunks=chunks)
        ds.attrs["MATLAB_class"] = np.bytes_("single")
        layers = f["net"]["layers"]
        refs = layers[()]
        refs.ravel()[0] = ds.ref  # the cell's element now points to the dataset never written
        layers[...] = refs
    with pytest.raises(MatFormatError, match=r"net\.layers\{1\}: corrupt v7\.3 data: the dataset declares "
                                             r"size \(100000, 100000\)"):
        matio.read_mat(path)
    np.testing.assert_array_equal(matio.read_mat_variable(path, "x"), [[0.0, 1.0, 2.0]])


def test_v73_partly_written_chunked_dataset_reads(tmp_path):
    """MATLAB's matfile can write part of a variable: chunks never written read as the fill value."""
    path = tmp_path / "partial.mat"
    matio.write_mat(path, {"x": np.arange(3.0)}, format="v7.3")
    with h5py.File(path, "a") as f:
        ds = f.create_dataset("y", shape=(100, 100), maxshape=(None, None), chunks=(20, 20), fillvalue=0.0)
        ds.attrs["MATLAB_class"] = np.bytes_("double")
        ds[80:100, 80:100] = 1.0
    y = matio.read_mat_variable(path, "y")
    assert y.shape == (100, 100) and y.sum() == 400.0


def _v73_with(tmp_path, name, build):
    """A v7.3 file holding x = [0 1 2] and whatever ``build(h5file)`` adds."""
    path = tmp_path / name
    matio.write_mat(path, {"x": np.arange(3.0)}, format="v7.3")
    with h5py.File(path, "a") as f:
        build(f)
    return path


def test_v73_external_storage_is_refused(tmp_path):
    """HDF5 external storage reads raw bytes from a file named inside the MAT-file (relative to the
    working directory): a crafted file could read any file of the machine into an array."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4.0).tobytes())

    def build(f):
        ds = f.create_dataset("y", shape=(4,), dtype="<f8", external=[(str(secret), 0, 32)])
        ds.attrs["MATLAB_class"] = np.bytes_("double")

    path = _v73_with(tmp_path, "external.mat", build)
    with h5py.File(path, "r") as f:  # the file really does read the other file
        np.testing.assert_array_equal(f["y"][()], np.arange(4.0))
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(path)
    assert_one_line_error(e, "external.mat", "y: dataset stored in an external file")
    np.testing.assert_array_equal(matio.read_mat_variable(path, "x"), [[0.0, 1.0, 2.0]])


def test_v73_sparse_part_declaring_more_than_it_stores(tmp_path):
    def build(f):
        g = f.create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(2)
        g["jc"] = np.array([0, 1], np.uint64)
        g["ir"] = np.array([0], np.uint64)
        g.create_dataset("data", shape=(100_000, 100_000), dtype="f8", chunks=(100, 100))

    path = _v73_with(tmp_path, "sparse_declared.mat", build)
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(path)
    assert_one_line_error(e, "sparse_declared.mat", "sp.data: corrupt v7.3 data: the dataset declares size")


@pytest.mark.parametrize("part", ["jc", "ir"])
def test_v73_sparse_missing_part(tmp_path, part):
    def build(f):
        g = f.create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(2)
        parts = {"jc": np.array([0, 1], np.uint64), "ir": np.array([0], np.uint64), "data": [5.0]}
        for k, v in parts.items():
            if k == part:
                g.create_group(k)  # a group where a dataset belongs
            else:
                g[k] = v

    path = _v73_with(tmp_path, "sparse_part.mat", build)
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(path)
    assert_one_line_error(e, "sparse_part.mat", f"sp.{part}: missing or not a dataset")


def test_v73_struct_array_column_declaring_more_than_it_stores(tmp_path):
    def build(f):
        g = f.create_group("s")
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        matio._fields_attr(g, ["a"])
        g.create_dataset("a", shape=(100_000, 100_000), dtype=h5py.ref_dtype, chunks=(100, 100))

    path = _v73_with(tmp_path, "struct_declared.mat", build)
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(path)
    assert_one_line_error(e, "struct_declared.mat", "s.a: corrupt v7.3 data: the dataset declares size")


@pytest.mark.parametrize("jc", [(0, 100_000_000, 0), (0, 1, 0)], ids=["huge-then-back", "one-then-back"])
def test_v73_sparse_column_starts_running_backwards(tmp_path, jc):
    """With no entries scipy's check skips the order of the column starts: densifying [0 1e8 0] crashed,
    [0 1 0] read a value that is not in the file (found by review on the v5 path; v7.3 shares it)."""
    def build(f):
        g = f.create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(3)
        g["jc"], g["ir"], g["data"] = np.array(jc, np.uint64), np.zeros(0, np.uint64), np.zeros(0)
    path = _v73_with(tmp_path, "jc73.mat", build)
    code = ("import sys\nfrom matconvnet_port import matio\n"
            "try:\n    matio.read_mat(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-500:]}"
    assert run.stdout.startswith("MatFormatError") and "sp: corrupt sparse matrix" in run.stdout, run.stdout


def test_v73_sparse_too_big_to_hold_dense_is_refused(tmp_path):
    def build(f):
        g = f.create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(1_000_000_000)
        g["jc"] = np.zeros(3, np.uint64)
    with pytest.raises(MatFormatError) as e:
        matio.read_mat(_v73_with(tmp_path, "tall73.mat", build))
    assert_one_line_error(e, "tall73.mat", "sp: a 1000000000x2 sparse matrix would take 14.9 GiB dense")
