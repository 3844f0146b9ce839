"""The MAT v5 tree check (matconvnet_port.v5_tree) on hand-built files.

Each file is assembled tag by tag, so that one field at a time can break the format: the check
must name the field, in one line, before scipy parses it (scipy can crash the interpreter on some
of these, and allocates what a cell declares before reading it).
"""

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from matconvnet_port import matio
from matconvnet_port.errors import MatFormatError

MI_INT8, MI_UINT8, MI_UINT16, MI_INT32, MI_UINT32, MI_SINGLE, MI_DOUBLE = 1, 2, 4, 5, 6, 7, 9
MI_MATRIX, MI_COMPRESSED = 14, 15
CELL, STRUCT, CHAR, SPARSE, DOUBLE, SINGLE = 1, 2, 4, 5, 6, 7


def element(mdtype: int, payload: bytes) -> bytes:
    return struct.pack("<II", mdtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def matrix(mclass: int, dims, name: bytes, *parts: bytes, complex_: bool = False) -> bytes:
    flags = element(MI_UINT32, struct.pack("<II", mclass | (0x800 if complex_ else 0), 0))
    body = flags + element(MI_INT32, struct.pack(f"<{len(dims)}i", *dims)) + element(MI_INT8, name)
    return element(MI_MATRIX, body + b"".join(parts))


def double(values, dims=None, name=b"") -> bytes:
    values = np.asarray(values, np.float64)
    dims = dims or (1, values.size)
    return matrix(DOUBLE, dims, name, element(MI_DOUBLE, values.astype("<f8").tobytes(order="F")))


def text(s: str, name=b"") -> bytes:
    return matrix(CHAR, (1, len(s)), name, element(MI_UINT16, s.encode("utf-16-le")))


def struct_1x1(name: bytes, fields: dict) -> bytes:
    width = 32
    names = b"".join(k.encode().ljust(width, b"\0") for k in fields)
    return matrix(STRUCT, (1, 1), name, element(MI_INT32, struct.pack("<i", width)),
                  element(MI_INT8, names), *fields.values())


def cell_row(items, name=b"") -> bytes:
    return matrix(CELL, (1, len(items)), name, *items)


def mat_file(path, *variables: bytes, compress: bool = False) -> str:
    head = b"MATLAB 5.0 MAT-file, written by test_v5_tree".ljust(116, b" ") + b"\0" * 8
    out = head + struct.pack("<H", 0x0100) + b"IM"
    for var in variables:
        out += struct.pack("<II", MI_COMPRESSED, len(z := zlib.compress(var))) + z if compress else var
    path.write_bytes(out)
    return str(path)


def layer_net(type_element: bytes | None = None, weights: bytes | None = None) -> bytes:
    """A SimpleNN-like ``net`` whose first layer's type and weights can be replaced."""
    layer = struct_1x1(b"", {"type": type_element or text("conv"),
                             "weights": weights or cell_row([double([1.0, 2.0]), double([0.5])])})
    return struct_1x1(b"net", {"layers": cell_row([layer])})


def assert_error(path, *needles):
    with pytest.raises(MatFormatError) as info:
        matio.read_mat(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("compress", [False, True], ids=["uncompressed", "compressed"])
def test_a_well_formed_file_reads(tmp_path, compress):
    path = mat_file(tmp_path / "ok.mat", layer_net(), double([3.0], name=b"x"), compress=compress)
    data = matio.read_mat(path)
    layer = matio.cell_items(data["net"]["layers"])[0]
    assert layer["type"] == "conv" and float(data["x"].squeeze()) == 3.0
    assert [w.tolist() for w in matio.cell_items(layer["weights"])] == [[[1.0, 2.0]], [[0.5]]]


def _bad_type_char(mdtype: int) -> bytes:
    payload = "conv".encode("utf-16-le")
    return matrix(CHAR, (1, 4), b"", struct.pack("<II", mdtype, len(payload)) + payload)


def _read_in_a_child(path, call: str = "read_mat(sys.argv[1])") -> str:
    """matio.``call`` in a child process, so that a regression to scipy's crash fails the test instead
    of killing the run; its one line of error."""
    code = ("import sys\nfrom matconvnet_port import matio\n"
            f"try:\n    matio.{call}\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-500:]}"
    return run.stdout


@pytest.mark.parametrize("compress", [False, True], ids=["uncompressed", "compressed"])
def test_an_unknown_data_type_is_named_not_a_crash(tmp_path, compress):
    """A fuzzed lenet.mat with this one byte changed segfaulted inside scipy.io.loadmat."""
    out = _read_in_a_child(mat_file(tmp_path / "bad.mat", layer_net(type_element=_bad_type_char(0x9E10)),
                                    compress=compress))
    assert out.startswith("MatFormatError") and "net.layers{1}.type" in out
    assert "data type 40464 (not a MAT-file data type)" in out


def _flags(mclass: int) -> bytes:
    return element(MI_UINT32, struct.pack("<II", mclass, 0))


@pytest.mark.parametrize("kind", ["function handle", "object"])
def test_the_insides_of_handles_and_objects_are_walked(tmp_path, kind):
    """scipy parses a function handle's workspace and an MCOS object's data (nested matrices) and
    crashed on the same bad element there (found by review); the read must stop at the check, which
    names the variable (matio then refuses handles and objects anyway)."""
    inner = _bad_type_char(99)
    if kind == "function handle":  # flags, dims, name, then the workspace
        workspace = matrix(STRUCT, (1, 1), b"", element(MI_INT32, struct.pack("<i", 8)),
                           element(MI_INT8, b"a".ljust(8, b"\0")), inner)
        body = _flags(16) + element(MI_INT32, struct.pack("<2i", 1, 1)) + element(MI_INT8, b"f") + workspace
    else:  # flags, object name, type system, class name, then the data
        body = _flags(17) + element(MI_INT8, b"f") + element(MI_INT8, b"MCOS") + element(MI_INT8, b"myClass") + inner
    out = _read_in_a_child(mat_file(tmp_path / "handle.mat", element(MI_MATRIX, body)))
    assert out.startswith("MatFormatError") and "data type 99" in out


def test_a_struct_without_fields_declaring_billions_of_elements_is_quick(tmp_path):
    """No field: nothing to read, however many elements; the check must not loop over them (review),
    and refuses so many (see test_a_huge_struct_array_without_fields_is_refused_quickly)."""
    empty = matrix(STRUCT, (2_000_000_000, 2_000_000_000), b"s", element(MI_INT32, struct.pack("<i", 32)),
                   element(MI_INT8, b""))
    path = mat_file(tmp_path / "nofields.mat", empty)
    with pytest.raises(matio._Bad, match="4000000000000000000 elements without fields"):
        matio._v5_check_tree(path, None)  # a loop over 4e18 elements would never return


def test_the_check_reads_no_more_than_a_bounded_header(tmp_path):
    """Field names are read whole. In a compressed variable, whose size is known only once inflated,
    a corrupt length of a gigabyte must be refused, not allocated."""
    head = (_flags(STRUCT) + element(MI_INT32, struct.pack("<2i", 1, 1)) + element(MI_INT8, b"s")
            + element(MI_INT32, struct.pack("<i", 32)) + struct.pack("<II", MI_INT8, 1 << 30))
    var = struct.pack("<II", MI_MATRIX, 1 << 31) + head + b"\0" * 64  # the matrix claims 2 GB
    path = mat_file(tmp_path / "names.mat", var, compress=True)
    with pytest.raises(MatFormatError, match="field names claims 1073741824 bytes, more than the 16777216"):
        matio.read_mat(path)


@pytest.mark.parametrize("compress", [False, True], ids=["uncompressed", "compressed"])
def test_a_huge_declared_cell_is_refused_before_it_is_allocated(tmp_path, compress):
    """100000 x 100000 cells in a file of a few hundred bytes: scipy would allocate 80 GB for it."""
    huge = matrix(CELL, (100000, 100000), b"", double([1.0]))
    path = mat_file(tmp_path / "huge.mat", layer_net(weights=huge), compress=compress)
    assert_error(path, "net.layers{1}.weights", "declares 10000000000 cells")


@pytest.mark.parametrize("dims, needle", [
    ((3, 3), "holds 2 values of data type 9, the dimensions 3x3 need 9"),
    ((1, -2), "negative dimension in [1, -2]"),
])
def test_numeric_data_must_match_its_dimensions(tmp_path, dims, needle):
    bad = matrix(DOUBLE, dims, b"", element(MI_DOUBLE, np.array([1.0, 2.0]).tobytes()))
    path = mat_file(tmp_path / "dims.mat", layer_net(weights=cell_row([bad, double([0.5])])))
    assert_error(path, "net.layers{1}.weights{1}", needle)


def test_a_complex_array_needs_its_imaginary_part(tmp_path):
    bad = matrix(DOUBLE, (1, 2), b"", element(MI_DOUBLE, np.array([1.0, 2.0]).tobytes()), complex_=True)
    path = mat_file(tmp_path / "cplx.mat", layer_net(weights=cell_row([bad])))
    assert_error(path, "net.layers{1}.weights{1}", "imaginary part")


def test_a_child_that_overruns_its_parent(tmp_path):
    inner = double([1.0, 2.0])
    lying = inner[:4] + struct.pack("<I", 4096) + inner[8:]  # the child claims 4096 bytes
    path = mat_file(tmp_path / "overrun.mat", layer_net(weights=cell_row([lying])))
    assert_error(path, "net.layers{1}.weights{1}", "the matrix claims 4096 bytes, more than its parent has left")


def test_a_field_of_the_wrong_element_type(tmp_path):
    path = mat_file(tmp_path / "notmatrix.mat", layer_net(type_element=element(MI_DOUBLE, b"\0" * 8)))
    assert_error(path, "net.layers{1}.type", "an element of data type 9 where a matrix (14) was expected")


def test_an_unknown_array_class(tmp_path):
    bad = bytearray(double([1.0]))
    bad[16] = 42  # the class byte of the array flags
    path = mat_file(tmp_path / "class.mat", layer_net(weights=cell_row([bytes(bad)])))
    assert_error(path, "net.layers{1}.weights{1}", "unknown array class 42")


def test_a_sparse_matrix_with_the_wrong_number_of_column_starts(tmp_path):
    ints = lambda *v: element(MI_INT32, struct.pack(f"<{len(v)}i", *v))
    sparse = matrix(SPARSE, (2, 3), b"", ints(0, 1), ints(0, 1, 2), element(MI_DOUBLE, np.ones(2).tobytes()))
    path = mat_file(tmp_path / "sparse.mat", layer_net(weights=cell_row([sparse])))
    assert_error(path, "net.layers{1}.weights{1}", "3 column starts, expected 4")


def test_a_struct_field_of_a_struct_array_is_named_with_its_index(tmp_path):
    width = 8
    names = b"a".ljust(width, b"\0")
    arr = matrix(STRUCT, (1, 2), b"s", element(MI_INT32, struct.pack("<i", width)), element(MI_INT8, names),
                 double([1.0]), _bad_type_char(99))
    assert_error(mat_file(tmp_path / "sarr.mat", arr), "s(2).a", "data type 99")


def test_only_the_variable_asked_for_is_walked(tmp_path):
    """read_mat_variable must not refuse a file for another variable's damage (scipy skips it too)."""
    path = mat_file(tmp_path / "two.mat", layer_net(type_element=_bad_type_char(99)), double([7.0], name=b"x"))
    assert float(matio.read_mat_variable(path, "x").squeeze()) == 7.0
    assert_error(path, "net.layers{1}.type")


def test_a_cut_compressed_stream(tmp_path):
    path = tmp_path / "cut.mat"
    mat_file(path, layer_net(), compress=True)
    raw = bytearray(path.read_bytes())
    z = zlib.compress(layer_net())[: len(zlib.compress(layer_net())) // 2]
    raw[128:] = struct.pack("<II", MI_COMPRESSED, len(z)) + z
    path.write_bytes(bytes(raw))
    assert_error(path, "net")


def test_walking_is_linear_in_the_tags_not_the_data(tmp_path, monkeypatch):
    """A 64 MB array is skipped, not read: the check of an uncompressed file reads a few tags."""
    n = 8 * 2**20
    path = mat_file(tmp_path / "big.mat", matrix(DOUBLE, (1, n), b"big", element(MI_DOUBLE, b"\0" * (8 * n))))
    sizes = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, size=-1):
            sizes.append(size)
            return self.fh.read(size)

        def __getattr__(self, attr):
            return getattr(self.fh, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    matio._v5_check_tree(path, None)
    monkeypatch.undo()
    assert sizes and min(sizes) >= 0 and sum(sizes) < 2**20
    assert float(matio.read_mat(path)["big"].sum()) == 0.0


def test_the_flat_parse_of_small_arrays_accepts_nothing_the_full_walk_refuses():
    """_plain_array is a fast path for the common small array: on thousands of corrupted copies of such
    arrays it may refuse more than the full walk, never less, and it accepts the well-formed ones."""
    from matconvnet_port import v5_tree

    def walk_accepts(body: bytes) -> bool:
        try:
            v5_tree._Walker(v5_tree._MemStream(body), "<")._array(len(body), "x")
            return True
        except v5_tree.TreeError:
            return False

    rng = np.random.default_rng(0)
    valid = [double([1.0, 2.0, 3.0], dims=(1, 3)), double([[1.0, 2.0], [3.0, 4.0]], dims=(2, 2)), text("conv"),
             text(""), matrix(SINGLE, (2, 1, 2), b"w", element(MI_SINGLE, np.ones(4, "<f4").tobytes())),
             matrix(DOUBLE, (1, 1), b"c", element(MI_DOUBLE, b"\0" * 8), element(MI_DOUBLE, b"\0" * 8), complex_=True),
             matrix(DOUBLE, (1, 2), b"", struct.pack("<HH", MI_UINT8, 2) + b"\x01\x02\0\0")]  # small data element
    fast_accepted = 0
    for base in valid:
        body = base[8:]
        assert v5_tree._plain_array(body, "<") and walk_accepts(body)
        for _ in range(1500):
            bad = bytearray(body)
            for pos in rng.integers(0, len(bad), rng.integers(1, 4)):
                bad[pos] = rng.integers(0, 256)
            if v5_tree._plain_array(bytes(bad), "<"):
                fast_accepted += 1
                assert walk_accepts(bytes(bad)), bytes(bad).hex()
    assert fast_accepted > 1000  # the mutations reach the accepting path, not only early refusals


# --- found by review (helper-35): crashes and wrong types on the v5 read path ----------------------------

def _ints(*v) -> bytes:
    return element(MI_INT32, struct.pack(f"<{len(v)}i", *v))


def _sparse(dims, ir, jc, values: bytes, value_type=MI_DOUBLE, logical=False) -> bytes:
    return matrix(SPARSE | (0x200 if logical else 0), dims, b"", _ints(*ir), _ints(*jc), element(value_type, values))


@pytest.mark.parametrize("jc", [(0, 100_000_000, 0), (0, 1, 0), (1, 1, 1), (0, 0, 5)],
                         ids=["huge-then-back", "one-then-back", "not-from-0", "past-the-entries"])
def test_sparse_column_starts_that_do_not_describe_its_entries(tmp_path, jc):
    """With no entries scipy's own check skips the order of the column starts; densifying such a matrix
    read far outside its arrays (a segfault for the first, a silent 1 at (1,1) for the second)."""
    path = mat_file(tmp_path / "jc.mat", layer_net(weights=cell_row([_sparse((3, 2), (), jc, b"")])))
    out = _read_in_a_child(path)
    assert out.startswith("MatFormatError") and "net.layers{1}.weights{1}" in out, out
    assert "column starts" in out, out


def test_a_variable_with_a_latin1_name_is_checked_when_asked_for_by_name(tmp_path):
    """scipy decodes names as latin-1; a UTF-8 decode here gave another name, and read_mat_variable
    skipped the check of the very variable it then let scipy crash on."""
    bad = layer_net(type_element=_bad_type_char(0x9E10)).replace(b"\x03\x00\x00\x00net", b"\x03\x00\x00\x00n\xe9t")
    path = mat_file(tmp_path / "latin1.mat", bad, double([7.0], name=b"\xe9"))
    out = _read_in_a_child(path, "read_mat_variable(sys.argv[1], 'n\\xe9t')")
    assert out.startswith("MatFormatError") and "n\xe9t.layers{1}.type" in out, out
    assert float(matio.read_mat_variable(path, "\xe9").squeeze()) == 7.0


def _slow_start_zlib(payload: bytes, empty_blocks: int) -> bytes:
    """A valid zlib stream of ``payload`` that opens with empty stored blocks (inflating to nothing)."""
    raw = zlib.compressobj(wbits=-15)
    body = raw.compress(payload) + raw.flush()
    return b"\x78\x01" + b"\x00\x00\x00\xff\xff" * empty_blocks + body + struct.pack(">I", zlib.adler32(payload))


def test_a_variable_whose_header_does_not_inflate_early_is_still_checked(tmp_path):
    """The name is read from the first 64 KiB of a compressed variable; when they inflate to nothing the
    variable was skipped by read_mat_variable's check, and scipy crashed on it."""
    var = layer_net(type_element=_bad_type_char(0x9E10))
    z = _slow_start_zlib(var, 14000)
    assert zlib.decompress(z) == var and len(z) > 65536
    path = tmp_path / "slow.mat"
    mat_file(path)
    path.write_bytes(path.read_bytes() + struct.pack("<II", MI_COMPRESSED, len(z)) + z)
    out = _read_in_a_child(path, "read_mat_variable(sys.argv[1], 'net')")
    assert out.startswith("MatFormatError") and "net.layers{1}.type" in out, out
    # the header is read as the walk reads: streaming, however late the inflated bytes begin
    assert [name for name, _, _ in matio._v5_listing(str(path))] == ["net"]


@pytest.mark.parametrize("value_type", [MI_UINT8, MI_DOUBLE])
def test_a_logical_sparse_matrix_reads_as_logical(tmp_path, value_type):
    values = np.array([1, 1]).astype("u1" if value_type == MI_UINT8 else "<f8").tobytes()
    sp = _sparse((2, 2), (0, 1), (0, 1, 2), values, value_type, logical=True)
    plain = _sparse((2, 2), (1,), (0, 0, 1), np.array([3]).astype("u1" if value_type == MI_UINT8 else "<f8").tobytes(),
                    value_type)
    path = mat_file(tmp_path / "lsp.mat", struct_1x1(b"s", {"mask": sp, "count": plain}))
    got = matio.read_mat(path)["s"]
    assert got["mask"].dtype == np.bool_ and got["mask"].tolist() == [[True, False], [False, True]]
    assert got["count"].dtype == np.float64 and got["count"].tolist() == [[0.0, 0.0], [0.0, 3.0]]


@pytest.mark.parametrize("compress", [False, True], ids=["uncompressed", "compressed"])
def test_an_empty_matrix_tag_reads_as_a_0x0_double(tmp_path, compress):
    """MATLAB writes [] inside a cell or struct as a bare 0-byte matrix tag: that is 0x0 double."""
    empty = element(MI_MATRIX, b"")
    path = mat_file(tmp_path / "empty.mat", cell_row([empty, double([1.0])], name=b"c"),
                    struct_1x1(b"s", {"f": empty}), compress=compress)
    data = matio.read_mat(path)
    for value in (data["c"][0, 0], data["s"]["f"]):
        assert value.shape == (0, 0) and value.dtype == np.float64


def test_a_huge_struct_array_without_fields_is_refused_quickly(tmp_path):
    """It holds nothing, but scipy and a list of empty dicts would take gigabytes for 10^8 elements."""
    import time
    empty = matrix(STRUCT, (1, 100_000_000), b"s", element(MI_INT32, struct.pack("<i", 32)), element(MI_INT8, b""))
    path = mat_file(tmp_path / "nofields.mat", empty)
    t0 = time.perf_counter()
    assert_error(path, "s:", "100000000 elements without fields")
    assert time.perf_counter() - t0 < 5


def test_a_small_struct_array_without_fields_reads(tmp_path):
    empty = matrix(STRUCT, (1, 3), b"s", element(MI_INT32, struct.pack("<i", 32)), element(MI_INT8, b""))
    got = matio.read_mat(mat_file(tmp_path / "three.mat", empty))["s"]
    assert len(got) == 3 and got.fieldnames == []


def test_a_sparse_matrix_too_big_to_hold_dense_is_refused(tmp_path):
    """Sparse matrices are read as dense arrays: a tiny file declaring 10^9 rows must not take GBs."""
    sp = _sparse((1_000_000_000, 2), (5,), (0, 1, 1), np.ones(1).tobytes())
    path = mat_file(tmp_path / "tall.mat", cell_row([sp], name=b"c"))
    assert_error(path, "c{1}", "1000000000x2", "dense")


def test_many_field_names_are_refused_before_they_are_decoded(tmp_path):
    """8 million one-letter field names in a 1x1 struct that holds none of their values: the count is
    checked before the names are split (which took seconds and 170 MB)."""
    names = b"a\0" * 8_000_000
    bad = matrix(STRUCT, (1, 1), b"s", element(MI_INT32, struct.pack("<i", 2)), element(MI_INT8, names))
    path = mat_file(tmp_path / "names.mat", bad)
    assert_error(path, "s:", "8000000 fields")


# --- found by review (helper-37) of the notes above --------------------------------------------------------

def test_a_function_handle_whose_workspace_is_an_empty_tag_is_still_refused(tmp_path):
    """The workspace's 0-byte tag was noted at the handle's own path, and read the handle as []."""
    body = _flags(16) + element(MI_INT32, struct.pack("<2i", 1, 1)) + element(MI_INT8, b"f") + element(MI_MATRIX, b"")
    assert_error(mat_file(tmp_path / "fh.mat", cell_row([element(MI_MATRIX, body)], name=b"c")),
                 "c{1}", "function handle")


def test_notes_reach_fields_with_utf8_names(tmp_path):
    """scipy decodes field names as UTF-8 (variable names as latin-1): the notes' paths must match."""
    names = "fé".encode().ljust(8, b"\0")
    sp = _sparse((1, 2), (0,), (0, 1, 1), b"\x01", MI_UINT8, logical=True)
    s = matrix(STRUCT, (1, 1), b"x", element(MI_INT32, struct.pack("<i", 8)), element(MI_INT8, names), sp)
    got = matio.read_mat(mat_file(tmp_path / "utf8.mat", s))["x"]["fé"]
    assert got.dtype == np.bool_ and got.tolist() == [[True, False]]


def test_of_two_variables_of_one_name_the_notes_of_the_last_apply(tmp_path):
    """scipy returns the last; the first's 'logical sparse' note turned the second's 2.5 into True."""
    first = cell_row([_sparse((1, 2), (0,), (0, 1, 1), b"\x01", MI_UINT8, logical=True)], name=b"x")
    second = cell_row([_sparse((1, 2), (0,), (0, 1, 1), np.array([2.5]).tobytes())], name=b"x")
    path = mat_file(tmp_path / "dup.mat", first, second)
    for got in (matio.read_mat(path)["x"][0, 0], matio.read_mat_variable(path, "x")[0, 0]):
        assert got.dtype == np.float64 and got.tolist() == [[2.5, 0.0]]


def test_the_dense_limit_counts_the_bytes_of_what_is_allocated(tmp_path):
    """A complex 9000x9000 sparse matrix is 1.2 GiB dense (16 bytes an element, not 8)."""
    sp = matrix(SPARSE, (9000, 9000), b"", _ints(0), _ints(0, *[1] * 9000), element(MI_DOUBLE, np.ones(1).tobytes()),
                element(MI_DOUBLE, np.ones(1).tobytes()), complex_=True)
    assert_error(mat_file(tmp_path / "cplx.mat", cell_row([sp], name=b"c")), "c{1}", "9000x9000", "1.2 GiB")
