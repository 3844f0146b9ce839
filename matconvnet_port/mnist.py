"""MNIST from the vendored IDX files, and MatConvNet's MNIST imdb.

The four MNIST IDX files ship gzip-compressed in ``matconvnet_port/data/mnist``
and are checked against ``SHA256SUMS`` there on every load; nothing is
downloaded. :func:`get_mnist_imdb` builds the ``imdb`` struct of
``getMnistImdb`` in MatConvNet's ``examples/mnist/cnn_mnist.m``, extended with
the study's step that brings every 28 x 28 digit to N x N.

``SHA256SUMS`` lists the SHA-256 of each vendored ``.gz`` file and of its
decompressed IDX content; the latter lets a user-supplied MNIST folder be
checked whether its files are compressed or not (gzip output differs between
compressors, the IDX bytes do not).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from .imresize import _is_torch, imresize

__all__ = [
    "read_idx",
    "load_mnist",
    "default_data_dir",
    "get_mnist_imdb",
    "resize_digits",
    "MnistDataError",
    "VENDORED_DIR",
    "FASHION_MNIST_DIR",
    "RESIZE_METHODS",
]

VENDORED_DIR = Path(__file__).resolve().parent / "data" / "mnist"
MANIFEST = VENDORED_DIR / "SHA256SUMS"
# Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_EXPECTED_SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}
# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DATASETS = ("mnist", "fashion-mnist")
RESIZE_METHODS = ("imresize", "bilinear", "nearest", "pad")
_N_TRAIN = 60000
_N_TEST = 10000


class MnistDataError(ValueError):
    """An MNIST data file is corrupt, truncated, of the wrong shape or fails its checksum.

    The one-line message names the file.
    """


def _read_raw(path):
    """File bytes, gunzipped when the file starts with the gzip magic (names can lie)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise MnistDataError(f"{path}: truncated gzip data") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise MnistDataError(f"{path}: corrupt gzip data ({e})") from None
    return data


def _parse_idx(raw, path):
    if len(raw) < 4:
        raise MnistDataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise MnistDataError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(raw[:4], 'big'):08x} "
            "(expected 0x0000TTDD: 2 zero bytes, a type code, a dimension count)"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistDataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise MnistDataError(f"{path}: truncated IDX data ({got} bytes, header {shape} needs {expected})")
    if got > expected:
        raise MnistDataError(f"{path}: IDX size mismatch ({got} data bytes, header {shape} needs {expected})")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path):
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    The IDX format (LeCun's MNIST distribution format): a 4-byte magic number
    ``0x00 0x00 T D`` (``T`` the type: 0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64; ``D`` the number of dimensions),
    ``D`` big-endian uint32 sizes, then the data in C (row-major) order. So an
    images file gives ``n x rows x cols`` with ``a[k, i, j]`` = row i,
    column j of image k. Compression is detected from the content.

    MatConvNet's ``cnn_mnist.m`` reads the same bytes with ``fread`` and
    ``permute(reshape(...), [2 1 3])``; this returns them in row-major order
    directly.

    Returns a writable native-endian array. Raises ``FileNotFoundError`` for a
    missing file and :class:`MnistDataError` (a ``ValueError``) naming the file
    for a bad magic number, a truncated header or data, trailing bytes, or
    corrupt gzip data.
    """
    return _parse_idx(_read_raw(path), path)


def _read_manifest():
    sums = {}
    try:
        text = MANIFEST.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{MANIFEST}: checksum manifest missing from the package") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, name = line.split(None, 1)
        sums[name.lstrip("*")] = digest.lower()
    return sums


def _find_file(data_dir, stem):
    for name in (stem, stem + ".gz"):
        p = data_dir / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"{data_dir / stem}: no such file (nor {stem}.gz) in {data_dir}")


def default_data_dir(dataset: str = "mnist") -> Path:
    """Where :func:`load_mnist` looks without ``data_dir``: the vendored MNIST, or Debian's Fashion-MNIST."""
    return VENDORED_DIR if dataset == "mnist" else FASHION_MNIST_DIR


def load_mnist(data_dir=None, dataset="mnist"):
    """Load MNIST (or Fashion-MNIST) as numpy arrays.

    Parameters
    ----------
    data_dir : str or Path, optional
        Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (each
        plain or with ``.gz``). ``None``: the vendored MNIST copy for
        ``dataset='mnist'``, ``/usr/share/datasets/fashion-mnist`` (Debian's
        ``dataset-fashion-mnist``) for ``dataset='fashion-mnist'``.
    dataset : ``'mnist'`` or ``'fashion-mnist'``

    Returns
    -------
    dict with ``train_images`` (60000 x 28 x 28 uint8, ``[k, i, j]`` = row i,
    column j of image k), ``train_labels`` (60000 uint8, 0..9),
    ``test_images`` (10000 x 28 x 28), ``test_labels`` (10000).

    Integrity: the vendored files are checked against the SHA-256s in
    ``data/mnist/SHA256SUMS``; MNIST from a user folder by the SHA-256 of its
    decompressed IDX content (same manifest). Fashion-MNIST: no checksum is
    built in (its published digests are MD5s of particular gzip files), so
    the headers, shapes and label range are validated instead, as for every
    dataset. A mismatch raises :class:`MnistDataError` naming the file; a
    missing folder or file raises ``FileNotFoundError`` naming the path.
    """
    if dataset not in _DATASETS:
        raise ValueError(f"load_mnist: dataset must be one of {', '.join(_DATASETS)}; got {dataset!r}")
    vendored = data_dir is None and dataset == "mnist"
    if data_dir is None:
        data_dir = default_data_dir(dataset)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        hint = " (on Debian: apt install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
        raise FileNotFoundError(f"{data_dir}: {dataset} data folder not found{hint}")
    sums = _read_manifest() if dataset == "mnist" else None

    out = {}
    for key, stem in _FILES.items():
        if vendored:
            path = data_dir / (stem + ".gz")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: vendored MNIST file missing")
            blob = path.read_bytes()
            _check_digest(blob, sums, path.name, path)
            raw = _read_raw(path)
        else:
            path = _find_file(data_dir, stem)
            raw = _read_raw(path)
            if sums is not None:
                _check_digest(raw, sums, stem, path)
        arr = _parse_idx(raw, path)
        want = _EXPECTED_SHAPES[key]
        if arr.shape != want or arr.dtype != np.uint8:
            raise MnistDataError(f"{path}: expected {want} uint8, got {arr.shape} {arr.dtype}")
        if key.endswith("labels") and arr.max() > 9:
            raise MnistDataError(f"{path}: labels must be 0..9, found {int(arr.max())}")
        out[key] = arr
    return out


def _check_digest(blob, sums, name, path):
    want = sums.get(name)
    if want is None:
        raise MnistDataError(f"{path}: no checksum for {name} in {MANIFEST}")
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise MnistDataError(f"{path}: SHA-256 mismatch (got {got[:16]}..., expected {want[:16]}...)")


def _pad_split(extra):
    # Centre the digit; an odd extra pixel goes to the bottom/right.
    return extra // 2, extra - extra // 2


def resize_digits(images, input_size, resize="imresize", dtype=np.float32):
    """Bring ``k x 28 x 28`` digits to ``k x N x N`` the study's way.

    ``images`` is a numpy array (any numeric dtype, e.g. the uint8 of
    :func:`load_mnist`) or a torch tensor (the computation then runs on its
    device), ``[k, i, j]`` = row i, column j. The pixels are first converted
    to ``dtype`` (float32 = MATLAB ``single``; the torch dtype matching it for
    tensors), then:

    * ``'imresize'``: ``imresize(img, [N N])``, MATLAB bicubic (see
      :func:`matconvnet_port.imresize.imresize`); N = 28 leaves the image unchanged;
    * ``'bilinear'``, ``'nearest'``: ``imresize(img, [N N], method)``;
    * ``'pad'``: zero padding to N x N with the digit centred (the extra pixel
      at the bottom/right when N - 28 is odd); needs N >= 28.

    Returns ``k x N x N`` of ``dtype``; values stay on the 0..255 scale.
    """
    n = _positive_size(input_size)
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize: must be one of {', '.join(RESIZE_METHODS)}; got {resize!r}")
    dtype = _float_dtype(dtype)
    is_torch = _is_torch(images)
    if is_torch:
        import torch

        x = images.to(torch.float32 if dtype == np.float32 else torch.float64)
    else:
        x = np.asarray(images).astype(dtype, copy=False)
    if x.ndim != 3:
        raise ValueError(f"images: expected k x H x W, got shape {tuple(x.shape)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    if resize == "pad":
        if n < h or n < w:
            raise ValueError(f"input_size: 'pad' needs input_size >= {max(h, w)}; got {n}")
        top, bottom = _pad_split(n - h)
        left, right = _pad_split(n - w)
        if is_torch:
            import torch.nn.functional as F

            return F.pad(x, (left, right, top, bottom))
        return np.pad(x, ((0, 0), (top, bottom), (left, right)))
    if (h, w) == (n, n):
        return x.clone() if is_torch else x.copy()
    method = "bicubic" if resize == "imresize" else resize
    return imresize(x, (n, n), method, axes=(1, 2))


def _positive_size(v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"input_size: must be a positive integer; got {v!r}")
    return int(v)


def _float_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype: must be float32 or float64; got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype: must be float32 or float64; got {dt}")
    return dt


def _subset_count(v, total, name):
    if v is None:
        return total
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= total:
        raise ValueError(f"{name}: must be None or an integer in 0..{total}; got {v!r}")
    return int(v)


def get_mnist_imdb(input_size=28, resize="imresize", data_dir=None, dataset="mnist",
                   train_subset=None, val_subset=None, dtype=np.float32, chunk_size=1024):
    """MatConvNet's MNIST ``imdb`` (``getMnistImdb`` of ``examples/mnist/cnn_mnist.m``) at N x N.

    Steps, as ``getMnistImdb`` does them plus the study's resize:

    1. pixels as ``dtype`` (float32 = MATLAB ``single``) on the 0..255 scale,
       image k stored at ``data[:, :, 0, k]`` with ``data[i, j, 0, k]`` = row i,
       column j (MatConvNet's ``permute(reshape(bytes, 28, 28, n), [2 1 3])``);
    2. each image brought to N x N by :func:`resize_digits` with ``resize``
       (``'imresize'`` = MATLAB bicubic, default; ``'bilinear'``,
       ``'nearest'``, ``'pad'``);
    3. ``data_mean`` = mean image of ALL 60000 training images at size N
       (accumulated in float64, rounded to ``dtype``; at N = 28 this equals
       MATLAB's single-precision ``mean(data(:,:,:,set==1), 4)`` bit for bit
       because the sums are integers below 2^24), subtracted from every image
       in ``dtype`` arithmetic: ``data = x - data_mean``.

    Subsets keep the FIRST ``train_subset`` training and the first
    ``val_subset`` t10k images (``None`` = all); ``data_mean`` is still the
    mean of all 60000 training images.

    Returns
    -------
    ``imdb`` dict:

    * ``imdb['images']['data']``: ``N x N x 1 x n`` ``dtype``, n = training
      images then t10k images. Its memory is laid out image-major
      (``data.transpose(3, 2, 0, 1)`` is a C-contiguous ``n x 1 x N x N``
      array, ready for ``torch.from_numpy`` without a copy);
    * ``imdb['images']['data_mean']``: ``N x N`` ``dtype``;
    * ``imdb['images']['labels']``: ``1 x n`` float64, digit + 1 (1..10);
    * ``imdb['images']['set']``: ``1 x n`` float64, 1 = train, 3 = val (t10k);
    * ``imdb['meta']['sets']`` = ``['train', 'val', 'test']``,
      ``imdb['meta']['classes']`` = ``['0', ..., '9']``.

    Memory: the result plus one chunk (``chunk_size`` images) of float64
    work space; nothing is cached on disk. The 60000 training images are always
    resized (for the mean) even when a subset is requested.
    """
    n_out = _positive_size(input_size)
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize: must be one of {', '.join(RESIZE_METHODS)}; got {resize!r}")
    if resize == "pad" and n_out < 28:
        raise ValueError(f"input_size: 'pad' needs input_size >= 28; got {n_out}")
    dtype = _float_dtype(dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size: must be a positive integer; got {chunk_size!r}")
    n_tr = _subset_count(train_subset, _N_TRAIN, "train_subset")
    n_va = _subset_count(val_subset, _N_TEST, "val_subset")

    mn = load_mnist(data_dir, dataset)
    train, test = mn["train_images"], mn["test_images"]

    # Image-major buffer; the returned H x W x C x n array is a view of it.
    buf = np.empty((n_tr + n_va, 1, n_out, n_out), dtype=dtype)
    acc = np.zeros((n_out, n_out), dtype=np.float64)
    for k0 in range(0, _N_TRAIN, chunk_size):
        k1 = min(k0 + chunk_size, _N_TRAIN)
        x = resize_digits(train[k0:k1], n_out, resize, dtype)
        acc += x.sum(axis=0, dtype=np.float64)
        if k0 < n_tr:
            m = min(k1, n_tr) - k0
            buf[k0:k0 + m, 0] = x[:m]
    data_mean = (acc / _N_TRAIN).astype(dtype)
    for k0 in range(0, n_va, chunk_size):
        k1 = min(k0 + chunk_size, n_va)
        buf[n_tr + k0:n_tr + k1, 0] = resize_digits(test[k0:k1], n_out, resize, dtype)
    for k0 in range(0, buf.shape[0], chunk_size):
        buf[k0:k0 + chunk_size, 0] -= data_mean

    labels = np.concatenate([mn["train_labels"][:n_tr], mn["test_labels"][:n_va]]).astype(np.float64) + 1.0
    sets = np.concatenate([np.ones(n_tr), np.full(n_va, 3.0)])
    return {
        "images": {
            "data": buf.transpose(2, 3, 1, 0),
            "data_mean": data_mean,
            "labels": labels[None, :],
            "set": sets[None, :],
        },
        "meta": {
            "sets": ["train", "val", "test"],
            "classes": [str(d) for d in range(10)],
        },
    }
