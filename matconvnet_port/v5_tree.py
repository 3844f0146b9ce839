"""A structural check of a MAT v5 variable before scipy parses it.

scipy's MAT v5 reader trusts the file: a data element of an unknown type
can crash the interpreter inside its Cython code (a segmentation fault, not
an exception), and a cell or struct that declares a billion elements is
allocated before its contents are read. :func:`check_variable` walks one
top-level element's tree of tags, reading only tags and the small header
subelements and skipping array data, and raises :class:`TreeError` naming
the field at the first tag that breaks the format:

- every element's type is one of the format's data types, and fits in the
  bytes its parent has left;
- a matrix has its array flags (miUINT32, 8 bytes) with a known class,
  dimensions (miINT32, >= 2, none negative) and a name (miINT8);
- numeric, logical and fixed-width char data hold exactly prod(dims)
  values; a complex array has its imaginary part;
- a cell holds prod(dims) matrices; a struct or object holds prod(dims) x
  (number of fields) of them, and says so before any is read;
- a sparse matrix is 2-D and has its row indices, column starts (columns +
  1 of them, from 0, never decreasing, the last no more than the row indices
  and values stored: scipy checks their order only when there are entries,
  and densifying a matrix whose starts run backwards reads outside it) and
  values;
- a struct array without fields has at most 2^20 elements (it holds
  nothing, but scipy and the reader's list of empty structs would take
  gigabytes for a few bytes of file).

The walk also notes, by path, what scipy loses on the way: a logical sparse
matrix (scipy gives its values as numbers) and a bare 0-byte matrix tag
(MATLAB's ``[]`` in a cell or struct, which scipy gives as 1x0); and it
reads the variable's name itself, so that a caller need not trust a header
parsed from the first bytes of the element. :func:`read_header` reads only
that header (name, class, object class name), streaming as the walk does.

Compressed elements (miCOMPRESSED) are walked as they inflate, in chunks,
so the check never holds a whole variable in memory. Function handles
(class 16) and opaque objects (class 17) are walked too, as scipy parses
them: a handle's workspace and an object's data are nested matrices.

Reference: "MATLAB MAT-File Format", The MathWorks, version 7, chapter 1
(data element tags, the small data element format, array subelements).
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

MI_MATRIX, MI_COMPRESSED = 14, 15
# data type -> bytes per value (UTF-8 and UTF-16 are variable-width: sizes not checked)
_MI_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 16: 1, 17: 2, 18: 4}
_MI_NAMES = {1: "miINT8", 2: "miUINT8", 3: "miINT16", 4: "miUINT16", 5: "miINT32", 6: "miUINT32",
             7: "miSINGLE", 9: "miDOUBLE", 12: "miINT64", 13: "miUINT64", 16: "miUTF8", 17: "miUTF16",
             18: "miUTF32"}
_VARIABLE_WIDTH = (16, 17)
_MI_INT32, _MI_UINT32, _MI_INT8 = 5, 6, 1
# array classes (mxCLASS): 1 cell, 2 struct, 3 object, 4 char, 5 sparse, 6-15 numeric, 16 function, 17 opaque
_CELL, _STRUCT, _OBJECT, _CHAR, _SPARSE = 1, 2, 3, 4, 5
_FUNCTION, _OPAQUE = 16, 17
# what the check reads whole: MATLAB allows far fewer dimensions, and namelengthmax is 63
_MAX_DIMS, _MAX_FIELD_NAMES = 1 << 16, 1 << 24
_SMALL_MATRIX = 4096  # a matrix up to this size is read at once and parsed flat when it can be
_INTEGER_TYPES = (1, 2, 3, 4, 5, 6, 12, 13)
_NUMPY_INTEGERS = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 12: "i8", 13: "u8"}
_MAX_EMPTY_STRUCT = 1 << 20
_LOGICAL_FLAG, _COMPLEX_FLAG = 0x200, 0x800
# what the walk notes about a path (see Checked.notes)
LOGICAL_SPARSE, EMPTY_TAG = "logical sparse", "empty tag"
_CHUNK = 1 << 20


class TreeError(Exception):
    """A format error at variable path ``where``."""

    def __init__(self, where: str, msg: str):
        super().__init__(f"{where}: {msg}")
        self.where = where
        self.msg = msg


class _MemStream:
    """Bytes of one small element, already read."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def skip(self, n: int) -> int:
        n = max(0, min(n, len(self.data) - self.pos))
        self.pos += n
        return n


class _Stream:
    """Sequential bytes with read and skip, over a buffer with a read offset (so that reading a tag
    costs its 8 bytes, not a copy of the buffer). Subclasses supply ``_more`` (the next bytes, b""
    at the end) and ``_drop`` (pass over n bytes beyond the buffer, returning how many there were)."""

    def __init__(self):
        self.buf, self.off, self.pos = bytearray(), 0, 0

    def read(self, n: int) -> bytes:
        off = self.off
        if off + n <= len(self.buf):  # the common case: a tag or a header already inflated/read
            self.off = off + n
            self.pos += n
            return bytes(self.buf[off:off + n])
        while len(self.buf) - self.off < n:
            piece = self._more(n - (len(self.buf) - self.off))
            if not piece:
                break
            self.buf += piece
        data = bytes(self.buf[self.off:self.off + n])
        self.off += len(data)
        self.pos += len(data)
        if self.off > _CHUNK // 4 and 2 * self.off > len(self.buf):
            del self.buf[:self.off]
            self.off = 0
        return data

    def skip(self, n: int) -> int:
        held = len(self.buf) - self.off
        if n <= held:
            self.off += n
            self.pos += n
            return n
        self.buf, self.off = bytearray(), 0
        done = held + self._drop(n - held)
        self.pos += done
        return done


class _FileStream(_Stream):
    """Bytes of an uncompressed element, read from the file; skipped data is never read."""

    def __init__(self, fh, start: int, length: int):
        super().__init__()
        self.fh, self.next, self.stop = fh, start, start + length

    def _more(self, want: int) -> bytes:
        self.fh.seek(self.next)
        piece = self.fh.read(min(max(want, 1 << 16), self.stop - self.next))
        self.next += len(piece)
        return piece

    def _drop(self, n: int) -> int:
        n = min(n, self.stop - self.next)
        self.next += n
        return n


class _InflateStream(_Stream):
    """Bytes of a compressed element, inflated as they are asked for."""

    def __init__(self, fh, start: int, length: int):
        super().__init__()
        self.fh, self.left = fh, length
        fh.seek(start)
        self.z = zlib.decompressobj()

    def _more(self, want: int) -> bytes:
        limit = max(want, 1 << 16)
        while True:
            if self.z.unconsumed_tail:
                piece = self.z.decompress(self.z.unconsumed_tail, limit)
            elif self.left > 0 and not self.z.eof:
                raw = self.fh.read(min(_CHUNK, self.left))
                self.left = self.left - len(raw) if raw else 0
                piece = self.z.decompress(raw, limit)
            else:
                return b""
            if piece:
                return piece

    def _drop(self, n: int) -> int:
        done = 0
        while done < n:
            piece = self._more(min(n - done, _CHUNK))
            if not piece:
                break
            if len(piece) > n - done:  # inflate may give more than asked: keep the rest
                self.buf += piece[n - done:]
                piece = piece[:n - done]
            done += len(piece)
        return done


class Checked:
    """What a walk found: the variable's ``name`` as stored (latin-1, as scipy decodes it; None if
    empty) and ``notes``, {path: LOGICAL_SPARSE or EMPTY_TAG} for the paths (rooted at the name)
    where scipy's value needs correcting."""

    def __init__(self, name, notes: dict):
        self.name, self.notes = name, notes


def _element_stream(fh, element):
    """(stream, length) over top-level element (offset, data type, size): a compressed one inflates as
    it is read, and its length is known only from the inner tag."""
    pos, mdtype, nbytes = element
    if mdtype == MI_COMPRESSED:
        return _InflateStream(fh, pos + 8, nbytes), math.inf
    return _FileStream(fh, pos, 8 + nbytes), 8 + nbytes


def read_header(fh, endian: str, element, label: str) -> tuple:
    """(name, array class, class name or None) of top-level element ``element``, from its first
    subelements only (a compressed one inflates as far as they go). TreeError if they break the
    format, zlib.error if the stream does not inflate."""
    stream, length = _element_stream(fh, element)
    walker = _Walker(stream, endian)
    mdtype, nbytes, small = walker._tag(label)
    if mdtype != MI_MATRIX or small is not None:
        raise TreeError(label, f"an element of data type {mdtype} where a matrix (14) was expected")
    end = min(length, stream.pos + nbytes)
    flags = walker._sub(end, label, "array flags", (_MI_UINT32,))[0]
    mclass = struct.unpack(endian + "I", flags[:4])[0] & 0xFF if len(flags) >= 4 else 0
    if mclass == _OPAQUE:  # object name, type system, class name
        var, _ = walker._name(end, label, "object name"), walker._name(end, label, "type system name")
        return var, mclass, walker._name(end, label, "class name")
    walker._sub(end, label, "dimensions", (_MI_INT32,), read=False)
    return walker._name(end, label, "array name"), mclass, None


def check_variable(fh, endian: str, element, label: str) -> Checked:
    """Walk top-level element ``element`` = (offset, data type, size) of an open MAT v5 file.

    ``label`` names the variable in errors raised before its name is read. Raises TreeError, or
    zlib.error for a compressed stream that does not inflate.
    """
    stream, length = _element_stream(fh, element)
    walker = _Walker(stream, endian)
    walker.matrix(length, label, top=True)
    return Checked(walker.name, walker.notes)


class _Walker:
    def __init__(self, stream, endian: str):
        self.s = stream
        self.endian = endian
        self.name = None
        self.notes = {}

    def _exact(self, n: int, where: str) -> bytes:
        data = self.s.read(n)
        if len(data) < n:
            raise TreeError(where, f"the file ends inside this element (wanted {n} more bytes)")
        return data

    def _tag(self, where: str):
        """(data type, size, data) of the tag at the stream's position; data is None unless the
        element is in the small format, where its (<= 4) bytes sit in the tag's second word."""
        raw = self._exact(8, where)
        first, second = struct.unpack(self.endian + "II", raw)
        if first >> 16:  # the small data element format: type and size share the first word
            mdtype, nbytes = first & 0xFFFF, first >> 16
            if nbytes > 4:
                raise TreeError(where, f"a small data element claims {nbytes} bytes (at most 4 fit)")
            return mdtype, nbytes, raw[4:4 + nbytes]
        return first, second, None

    def _sub_tag(self, end: float, where: str, what: str, types):
        """The tag of one subelement of one of ``types``: (data type, size, small data or None)."""
        if self.s.pos + 8 > end:
            raise TreeError(where, f"the {what} is missing: the matrix ends before it")
        mdtype, nbytes, small = self._tag(where)
        if mdtype not in types:
            shown = " or ".join(_MI_NAMES[t] for t in types) if len(types) <= 2 else "a numeric data type"
            got = _MI_NAMES.get(mdtype, "not a MAT-file data type")
            raise TreeError(where, f"the {what} has data type {mdtype} ({got}), expected {shown}")
        if small is None and self.s.pos + nbytes > end:
            raise TreeError(where, f"the {what} claims {nbytes} bytes, more than the element has left "
                                   f"({_left(end, self.s.pos)})")
        return mdtype, nbytes, small

    def _name(self, end: float, where: str, what: str) -> str:
        """A name subelement (miINT8), decoded as scipy decodes variable names: latin-1."""
        return self._sub(end, where, what, (_MI_INT8,), cap=1 << 16)[0].rstrip(b"\0").decode("latin-1")

    def _pad(self, end: float, nbytes: int) -> None:
        self.s.skip(min(-nbytes % 8, max(0, end - self.s.pos)))  # padding to 8 bytes, if the writer left it

    def _sub(self, end: float, where: str, what: str, types, read: bool = True, cap: int = 1 << 30):
        """One subelement of one of ``types``: (its bytes if ``read``, else b"", data type, size).
        One that is read may hold at most ``cap`` bytes, so that a few corrupt bytes cannot make
        the check itself allocate gigabytes."""
        mdtype, nbytes, small = self._sub_tag(end, where, what, types)
        if small is not None:
            return small, mdtype, nbytes
        if read:
            if nbytes > cap:
                raise TreeError(where, f"the {what} claims {nbytes} bytes, more than the {cap} this check reads")
            data = self._exact(nbytes, where)
        else:
            if self.s.skip(nbytes) < nbytes:
                raise TreeError(where, f"the file ends inside the {what}")
            data = b""
        self._pad(end, nbytes)
        return data, mdtype, nbytes

    def matrix(self, limit: float, where: str, top: bool = False) -> int:
        """Walk one miMATRIX element that must fit in ``limit`` bytes; return the bytes it took.
        ``top``: a variable, whose name is read (and roots the paths of what it holds)."""
        start = self.s.pos
        mdtype, nbytes, small = self._tag(where)
        if mdtype != MI_MATRIX or small is not None:
            raise TreeError(where, f"an element of data type {mdtype} where a matrix (14) was expected")
        if 8 + nbytes > limit:
            raise TreeError(where, f"the matrix claims {nbytes} bytes, more than its parent has left "
                                   f"({_left(limit, 8)})")
        end = self.s.pos + nbytes
        if 0 < nbytes <= _SMALL_MATRIX and not top:
            # most elements of a big cell or struct are small numeric or char arrays: one read and
            # _plain_array's flat parse take a fraction of the walk's time; anything it does not
            # accept is walked in full (from memory), which gives the error
            body = self.s.read(nbytes)
            if not _plain_array(body, self.endian):
                inner = _Walker(_MemStream(body), self.endian)
                inner.notes = self.notes
                inner._array(nbytes, where)
        elif nbytes:
            self._array(end, where, top)
            if self.s.pos > end:
                raise TreeError(where, f"its contents overrun the {nbytes} bytes the matrix claims")
            self.s.skip(end - self.s.pos)
        else:  # MATLAB writes [] in a cell or struct as a bare 0-byte matrix tag
            self.notes[where] = EMPTY_TAG
        return self.s.pos - start

    def _array(self, end: int, where: str, top: bool = False) -> None:
        flags, _, n = self._sub(end, where, "array flags", (_MI_UINT32,))
        if n != 8:
            raise TreeError(where, f"the array flags take {n} bytes, expected 8")
        word = struct.unpack(self.endian + "I", flags[:4])[0]
        mclass, is_complex = word & 0xFF, bool(word & _COMPLEX_FLAG)
        if mclass == _OPAQUE:  # name, type system, class name, then the object's data as a matrix
            for what in ("object name", "type system name", "class name"):
                self._sub(end, where, what, (_MI_INT8,), read=False)
            self.matrix(end - self.s.pos, f"{where}<object data>")  # own path: its notes are not the object's
            return
        if not 1 <= mclass <= 16:
            raise TreeError(where, f"unknown array class {mclass} in the array flags")
        raw, _, n = self._sub(end, where, "dimensions", (_MI_INT32,), cap=_MAX_DIMS * 4)
        if n < 8 or n % 4:
            raise TreeError(where, f"the dimensions take {n} bytes, expected 4 per dimension and >= 2 dimensions")
        dims = struct.unpack(f"{self.endian}{n // 4}i", raw)
        if min(dims) < 0:
            raise TreeError(where, f"negative dimension in {list(dims)}")
        count = math.prod(dims)
        if top:
            name = self._name(end, where, "array name")
            if name:
                self.name = where = name
        else:
            self._sub(end, where, "array name", (_MI_INT8,), read=False)
        if mclass == _FUNCTION:  # the handle's workspace, as a matrix
            self.matrix(end - self.s.pos, f"{where}<workspace>")
        elif mclass == _CELL:
            self._children(end, where, count, [None])
        elif mclass in (_STRUCT, _OBJECT):
            if mclass == _OBJECT:
                self._sub(end, where, "class name", (_MI_INT8,), read=False)
            raw, _, n = self._sub(end, where, "field name length", (_MI_INT32,))
            if n != 4:
                raise TreeError(where, f"the field name length takes {n} bytes, expected 4")
            width = struct.unpack(self.endian + "i", raw)[0]
            raw, _, n = self._sub(end, where, "field names", (_MI_INT8,), cap=_MAX_FIELD_NAMES)
            if n and (width <= 0 or n % width):
                raise TreeError(where, f"{n} bytes of field names do not split into names of length {width}")
            nfields = n // width if n else 0
            if not nfields and count > _MAX_EMPTY_STRUCT:
                raise TreeError(where, f"a struct array of {count} elements without fields: more than "
                                       f"{_MAX_EMPTY_STRUCT} are refused (it holds nothing, and would take "
                                       "gigabytes to represent)")
            self._room(end, where, count, nfields)  # before the names are split: there may be millions
            # as scipy decodes field names (UTF-8; variable names are latin-1), so that paths match its keys
            fields = [raw[k:k + width].split(b"\0", 1)[0].decode("utf-8", "replace") for k in range(0, n, width)]
            self._children(end, where, count, fields)
        elif mclass == _SPARSE:
            self._sparse(end, where, dims, is_complex)
            if word & _LOGICAL_FLAG:
                self.notes[where] = LOGICAL_SPARSE
        else:
            parts = ("real part", "imaginary part") if is_complex else ("data",)
            for part in parts:
                _, mdtype, n = self._sub(end, where, part, tuple(_MI_SIZES), read=False)
                width = _MI_SIZES[mdtype]
                if mclass == _CHAR and mdtype in _VARIABLE_WIDTH:
                    continue
                if n != count * width:
                    raise TreeError(where, f"the {part} holds {n // width} values of data type {mdtype}, "
                                           f"the dimensions {'x'.join(map(str, dims))} need {count}")

    def _room(self, end: int, where: str, count: int, nfields) -> None:
        """Refuse ``count`` elements x ``nfields`` (None: a cell) that cannot fit in what is left."""
        if count * (1 if nfields is None else nfields) * 8 > end - self.s.pos:  # each element takes at least its 8-byte tag
            what = f"{count} cells" if nfields is None else f"{count} elements x {nfields} fields"
            raise TreeError(where, f"declares {what}, more than {_left(end, self.s.pos)} can hold")

    def _children(self, end: int, where: str, count: int, fields: list) -> None:
        self._room(end, where, count, None if fields == [None] else len(fields))
        if not fields:  # a struct array without fields holds nothing, however many elements
            return
        for k in range(count):
            for field in fields:
                if field is None:
                    path = f"{where}{{{k + 1}}}"
                else:
                    path = f"{where}.{field}" if count == 1 else f"{where}({k + 1}).{field}"
                self.matrix(end - self.s.pos, path)

    def _sparse(self, end: int, where: str, dims, is_complex: bool) -> None:
        if len(dims) != 2:
            raise TreeError(where, f"a sparse matrix of size {'x'.join(map(str, dims))}: sparse matrices are 2-D")
        _, mdtype, n = self._sub(end, where, "row indices", _INTEGER_TYPES, read=False)
        stored = n // _MI_SIZES[mdtype]
        entries = self._column_starts(end, where, dims)
        for part in ("real part", "imaginary part") if is_complex else ("values",):
            _, mdtype, n = self._sub(end, where, part, tuple(t for t in _MI_SIZES if t not in (16, 17, 18)),
                                     read=False)
            stored = min(stored, n // _MI_SIZES[mdtype])
        if entries > stored:
            raise TreeError(where, f"the column starts end at {entries}, past the {stored} entries stored")

    def _column_starts(self, end: int, where: str, dims) -> int:
        """Check the column starts (read in chunks: a matrix may have millions of columns); return the
        last, the number of entries."""
        mdtype, nbytes, small = self._sub_tag(end, where, "column starts", _INTEGER_TYPES)
        width = _MI_SIZES[mdtype]
        if nbytes != (dims[1] + 1) * width:
            raise TreeError(where, f"a sparse matrix of size {'x'.join(map(str, dims))} has "
                                   f"{nbytes // width} column starts, expected {dims[1] + 1}")
        dtype = np.dtype(_NUMPY_INTEGERS[mdtype]).newbyteorder(self.endian)
        last, left, step = None, nbytes, _CHUNK - _CHUNK % width
        while left:
            data = small if small is not None else self._exact(min(left, step), where)
            left -= len(data)
            starts = np.frombuffer(data, dtype).astype(np.int64)  # a uint64 past 2^63 turns negative: refused
            if last is None and starts[0] != 0:
                raise TreeError(where, f"the column starts begin at {starts[0]}, not 0")
            if starts.min() < 0 or (last is not None and starts[0] < last) or np.any(starts[1:] < starts[:-1]):
                raise TreeError(where, "the column starts decrease (or are negative): corrupt sparse matrix")
            last = int(starts[-1])
        if small is None:
            self._pad(end, nbytes)
        return last


def _plain_array(body: bytes, endian: str) -> bool:
    """True if ``body`` (a matrix's contents) is a numeric or char array that _Walker._array accepts:
    the same checks, flat, for the common case. False for anything else (other classes, any doubt),
    which the caller then walks in full."""
    size = len(body)
    if size < 40:
        return False
    t, n, word = struct.unpack_from(endian + "III", body, 0)
    mclass = word & 0xFF
    if t != _MI_UINT32 or n != 8 or not (mclass == _CHAR or 6 <= mclass <= 15):
        return False
    t, n = struct.unpack_from(endian + "II", body, 16)
    if t != _MI_INT32 or n < 8 or n % 4 or n > 4 * _MAX_DIMS or 24 + n > size:
        return False
    dims = struct.unpack_from(f"{endian}{n // 4}i", body, 24)
    if min(dims) < 0:
        return False
    count = math.prod(dims)
    pos = 24 + n + (-n % 8)
    parts = 2 if word & 0x800 else 1
    for k in range(1 + parts):  # the name, then the data (real, imaginary)
        if pos + 8 > size:
            return False
        t, n = struct.unpack_from(endian + "II", body, pos)
        if t >> 16:
            t, n, step = t & 0xFFFF, t >> 16, 8
            if n > 4:
                return False
        else:
            step = 8 + n + (-n % 8)
            if pos + 8 + n > size:
                return False
        if k == 0:
            if t != _MI_INT8:
                return False
        elif t not in _MI_SIZES or (n != count * _MI_SIZES[t]
                                    and not (mclass == _CHAR and t in _VARIABLE_WIDTH)):
            return False
        pos = min(pos + step, size)
    return True


def _left(end: float, pos: int) -> str:
    left = end - pos
    return "the rest of the file" if left == math.inf else f"{int(left)} bytes"
