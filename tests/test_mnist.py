"""Tests of ``matconvnet_port.mnist`` (vendored MNIST, IDX reader, MatConvNet imdb)."""

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from matconvnet_port import mnist as M
from matconvnet_port.imresize import imresize
from matconvnet_port.mnist import MnistDataError, get_mnist_imdb, load_mnist, read_idx, resize_digits

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture(scope="module")
def mn():
    return load_mnist()


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """The vendored MNIST decompressed into a user folder (no .gz)."""
    d = tmp_path_factory.mktemp("mnist_plain")
    for stem in STEMS:
        (d / stem).write_bytes(gzip.decompress((M.VENDORED_DIR / (stem + ".gz")).read_bytes()))
    return d


def _idx_bytes(arr, type_code=0x08):
    arr = np.asarray(arr)
    head = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


# ------------------------------------------------------------------ raw data

def test_counts_shapes_and_histograms(mn):
    assert mn["train_images"].shape == (60000, 28, 28) and mn["train_images"].dtype == np.uint8
    assert mn["test_images"].shape == (10000, 28, 28)
    assert mn["train_labels"].shape == (60000,) and mn["test_labels"].shape == (10000,)
    assert np.bincount(mn["train_labels"], minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(mn["test_labels"], minlength=10).tolist() == TEST_COUNTS


def test_row_major_orientation(mn):
    # MNIST digits are centred by centre of mass in a 20x20 box: rows 0-3 and
    # 24-27 of the mean image are nearly empty; a transposed read still passes
    # that, so also check the well-known first label and the stroke of a "1".
    assert mn["train_labels"][0] == 5
    one = mn["train_images"][mn["train_labels"] == 1].astype(np.float64).mean(axis=0)
    # the mean "1" is a vertical-ish stroke: more variance across columns than rows
    assert one.sum(axis=0).std() > 2 * one.sum(axis=1).std()


def test_read_idx_roundtrip_plain_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(a)))
    (tmp_path / "misnamed.gz").write_bytes(_idx_bytes(a))  # compression is sniffed, not guessed
    for name in ("a", "a.gz", "misnamed.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    f = np.array([[1.5, -2.0]], dtype=np.float32)
    (tmp_path / "f").write_bytes(_idx_bytes(f, 0x0D))
    got = read_idx(tmp_path / "f")
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, f)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"\x08\x03" + b[2:], "bad IDX magic"),
    (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic"),
    (lambda b: b[:-5], "truncated IDX data"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b + b"\x00\x00", "size mismatch"),
])
def test_read_idx_errors_name_file(tmp_path, mutate, match):
    a = np.zeros((3, 4, 5), np.uint8)
    p = tmp_path / "bad-idx"
    p.write_bytes(mutate(_idx_bytes(a)))
    with pytest.raises(MnistDataError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_truncated_gzip(tmp_path):
    p = tmp_path / "t.gz"
    p.write_bytes(gzip.compress(_idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-30])
    with pytest.raises(MnistDataError, match="truncated gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nodir")):
        load_mnist(tmp_path / "nodir")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)  # exists but is empty


def test_vendored_checksum_failure(tmp_path, monkeypatch):
    # A valid gzip of altered content: only the checksum can catch it.
    for stem in STEMS:
        shutil.copy(M.VENDORED_DIR / (stem + ".gz"), tmp_path / (stem + ".gz"))
    shutil.copy(M.MANIFEST, tmp_path / "SHA256SUMS")
    raw = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setattr(M, "VENDORED_DIR", tmp_path)
    monkeypatch.setattr(M, "MANIFEST", tmp_path / "SHA256SUMS")
    with pytest.raises(MnistDataError, match="SHA-256 mismatch") as e:
        load_mnist()
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value) and "\n" not in str(e.value)


def test_user_dir_plain_files_checked_by_content(plain_dir, mn, tmp_path):
    got = load_mnist(plain_dir)
    for k in mn:
        np.testing.assert_array_equal(got[k], mn[k])
    # a corrupted uncompressed copy fails its content checksum
    bad = tmp_path / "bad"
    shutil.copytree(plain_dir, bad)
    p = bad / "train-images-idx3-ubyte"
    raw = bytearray(p.read_bytes())
    raw[5000] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(MnistDataError, match="SHA-256 mismatch") as e:
        load_mnist(bad)
    assert str(p) in str(e.value)


def test_fashion_mnist_header_validation(plain_dir, tmp_path):
    # No checksums for Fashion-MNIST: files with valid headers/counts load.
    got = load_mnist(plain_dir, dataset="fashion-mnist")
    assert got["train_images"].shape == (60000, 28, 28)
    bad = tmp_path / "fm"
    bad.mkdir()
    for stem in STEMS:
        (bad / stem).symlink_to(plain_dir / stem)
    (bad / "t10k-labels-idx1-ubyte").unlink()
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(9999, np.uint8))))
    with pytest.raises(MnistDataError, match=r"expected \(10000,\)") as e:
        load_mnist(bad, dataset="fashion-mnist")
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    with pytest.raises(ValueError, match="dataset"):
        load_mnist(dataset="cifar")


@pytest.mark.skipif(not M.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_installed():
    fm = load_mnist(dataset="fashion-mnist")
    assert np.bincount(fm["train_labels"], minlength=10).tolist() == [6000] * 10


# ------------------------------------------------------------------ imdb

def test_imdb_structure_and_subsets(mn):
    imdb = get_mnist_imdb(28, train_subset=7, val_subset=3)
    im = imdb["images"]
    assert im["data"].shape == (28, 28, 1, 10) and im["data"].dtype == np.float32
    assert im["data_mean"].shape == (28, 28) and im["data_mean"].dtype == np.float32
    assert im["labels"].shape == (1, 10) and im["labels"].dtype == np.float64
    np.testing.assert_array_equal(im["labels"][0], np.r_[mn["train_labels"][:7], mn["test_labels"][:3]] + 1)
    np.testing.assert_array_equal(im["set"], [[1] * 7 + [3] * 3])
    assert imdb["meta"]["sets"] == ["train", "val", "test"]
    assert imdb["meta"]["classes"] == [str(d) for d in range(10)]
    # first images, in imdb layout (row i, column j), single(x) - mean
    raw = np.concatenate([mn["train_images"][:7], mn["test_images"][:3]]).transpose(1, 2, 0)[:, :, None, :]
    np.testing.assert_array_equal(im["data"], raw.astype(np.float32) - im["data_mean"][:, :, None, None])
    # the mean is of all 60000 training images, whatever the subset
    want_mean = mn["train_images"].mean(axis=0, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(im["data_mean"], want_mean)
    # zero-copy NCHW view for PyTorch
    assert im["data"].transpose(3, 2, 0, 1).flags["C_CONTIGUOUS"]
    empty = get_mnist_imdb(28, train_subset=0, val_subset=2)["images"]
    assert empty["data"].shape == (28, 28, 1, 2) and empty["set"].tolist() == [[3, 3]]


def test_mean_subtraction_full_train_set():
    im = get_mnist_imdb(28, val_subset=0)["images"]
    assert im["data"].shape[3] == 60000
    m = im["data"].mean(axis=3, dtype=np.float64)
    assert np.abs(m).max() < 1e-4


@pytest.mark.parametrize("resize", ["imresize", "bilinear", "nearest"])
def test_resized_imdb(resize, mn):
    n = 32
    im = get_mnist_imdb(n, resize=resize, train_subset=5, val_subset=4)["images"]
    assert im["data"].shape == (n, n, 1, 9) and im["data_mean"].shape == (n, n)
    method = "bicubic" if resize == "imresize" else resize
    first = imresize(mn["train_images"][:5].transpose(1, 2, 0).astype(np.float32), (n, n), method)
    np.testing.assert_array_equal(im["data"][:, :, 0, :5], first - im["data_mean"][:, :, None])
    # the mean of resized images = resize of the mean image (linearity), to float32 rounding
    mean28 = mn["train_images"].mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(im["data_mean"], imresize(mean28, (n, n), method), rtol=0, atol=1e-4)


def test_pad(mn):
    n = 33  # odd margin: 2 rows/columns before, 3 after
    im = get_mnist_imdb(n, resize="pad", train_subset=3, val_subset=2)["images"]
    assert im["data"].shape == (n, n, 1, 5)
    assert np.all(im["data_mean"][:2] == 0) and np.all(im["data_mean"][-3:] == 0)
    assert np.all(im["data_mean"][:, :2] == 0) and np.all(im["data_mean"][:, -3:] == 0)
    np.testing.assert_array_equal(im["data_mean"][2:30, 2:30],
                                  mn["train_images"].mean(axis=0, dtype=np.float64).astype(np.float32))
    raw = mn["test_images"][1].astype(np.float32)
    np.testing.assert_array_equal(im["data"][2:30, 2:30, 0, 4], raw - im["data_mean"][2:30, 2:30])
    assert np.all(im["data"][:2, :, 0, :] == 0) and np.all(im["data"][:, -3:, 0, :] == 0)


def test_resize_digits_torch_matches_numpy(mn):
    x = mn["train_images"][:16]
    for resize in ("imresize", "pad"):
        want = resize_digits(x, 40, resize)
        got = resize_digits(torch.from_numpy(x), 40, resize)
        assert got.dtype == torch.float32 and tuple(got.shape) == (16, 40, 40)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(resize_digits(x, 28), x.astype(np.float32))


@pytest.mark.parametrize("kw,match", [
    (dict(input_size=0), "input_size"),
    (dict(input_size=31.5), "input_size"),
    (dict(input_size=20, resize="pad"), "input_size"),
    (dict(resize="lanczos"), "resize"),
    (dict(train_subset=60001), "train_subset"),
    (dict(val_subset=-1), "val_subset"),
    (dict(dtype=np.int32), "dtype"),
    (dict(dataset="emnist"), "dataset"),
])
def test_imdb_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        get_mnist_imdb(**kw)
    assert "\n" not in str(e.value)
