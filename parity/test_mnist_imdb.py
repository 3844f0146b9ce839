"""Parity of ``get_mnist_imdb`` with the imdb of ``reference_data/train/train_log.mat``.

That imdb was built by MatConvNet's ``getMnistImdb`` (``cnn_mnist.m``) under
Octave: ``data = single(images_uint8) - data_mean``, ``data_mean`` the
single-precision mean of all 60000 training images, subset = training images
1..2000 and t10k images 1..500.

Tolerances: raw pixels, labels and set must match exactly. ``data_mean``:
float32 summation tolerance, stated as ``rtol = 1e-6`` (a float32 sum of
60000 terms in any order); at N = 28 it is in fact bit-exact, because every
partial sum of 0..255 integers stays below 2^24 and so is exact in float32,
leaving one correctly rounded division on both sides. Achieved: 0.
"""

from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from matconvnet_port.mnist import get_mnist_imdb, load_mnist, resize_digits

try:  # the parity table of parity/conftest.py
    from refdata import check
except ImportError:  # pragma: no cover
    def check(*args, **kwargs):
        pass

REF_DIR = Path(__file__).resolve().parent.parent / "reference_data"


@pytest.fixture(scope="module")
def ref():
    return sio.loadmat(REF_DIR / "train" / "train_log.mat", squeeze_me=False, struct_as_record=False)


@pytest.fixture(scope="module")
def imdb():
    return get_mnist_imdb(28, train_subset=2000, val_subset=500)


def test_subset_indices_are_first_images(ref):
    idx = ref["subset_mnist_index"][0].astype(np.int64)
    np.testing.assert_array_equal(idx, np.r_[1:2001, 60001:60501])


def test_raw_pixels_exact(ref):
    mn = load_mnist()
    allimg = np.concatenate([mn["train_images"], mn["test_images"]])
    idx = ref["subset_mnist_index"][0].astype(np.int64) - 1
    ours = allimg[idx].transpose(1, 2, 0)[:, :, None, :]  # imdb layout H x W x 1 x n
    assert ours.shape == ref["images_uint8"].shape == (28, 28, 1, 2500)
    np.testing.assert_array_equal(ours, ref["images_uint8"])


def test_data_mean(ref, imdb, record_property):
    ours, theirs = imdb["images"]["data_mean"], ref["data_mean"]
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (28, 28)
    err = float(np.max(np.abs(ours.astype(np.float64) - theirs)))
    record_property("max_abs_err", err)
    check("mnist imdb (2000+500)", "data_mean", ours, theirs, 1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    assert err == 0.0


def test_data_is_single_pixels_minus_mean(ref, imdb):
    want = ref["images_uint8"].astype(np.float32) - ref["data_mean"][:, :, None, None]
    data = imdb["images"]["data"]
    assert data.dtype == np.float32 and data.shape == (28, 28, 1, 2500)
    check("mnist imdb (2000+500)", "data", data, want, 1e-6)
    np.testing.assert_array_equal(data, want)


def test_labels_and_set_exact(ref, imdb):
    for key in ("labels", "set"):
        ours, theirs = imdb["images"][key], ref[key]
        assert ours.dtype == np.float64 and ours.shape == theirs.shape == (1, 2500)
        np.testing.assert_array_equal(ours, theirs)


def test_resized_digits_match_octave_imresize():
    # reference_data/imresize.mat holds imresize(img, [N N]) of training images 1..6
    d = sio.loadmat(REF_DIR / "imresize.mat", squeeze_me=False, struct_as_record=False)
    assert d["mnist_from_test"][0, 0] == 0
    idx = d["mnist_index"][0].astype(np.int64) - 1
    raw = load_mnist()["train_images"][idx]
    np.testing.assert_array_equal(raw.transpose(1, 2, 0), d["imgs"])
    for k in range(d["sizes"].shape[1]):
        n = int(d["sizes"][0, k])
        got = resize_digits(raw, n).transpose(1, 2, 0)
        check(f"mnist resize_digits 28->{n}", "imresize", got, d["up"][0, k], 5e-7)
        np.testing.assert_allclose(got, d["up"][0, k], rtol=0, atol=1e-4)
