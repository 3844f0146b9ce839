"""matconvnet_port: MatConvNet, numerically faithful, in PyTorch."""

from .errors import MatFormatError

__version__ = "0.1.0"
from . import functional
from .vl_nn import (vl_nnbnorm, vl_nnconv, vl_nnconvt, vl_nncrop, vl_nndropout, vl_nnloss, vl_nnnormalize, vl_nnpool,
                    vl_nnrelu, vl_nnroipool, vl_nnsigmoid, vl_nnsoftmax, vl_nnsoftmaxloss)
from .simplenn import SimpleNN, vl_simplenn, vl_simplenn_tidy
from .models import cnn_mnist_init, mask_bits, mask_name, parse_mask
from .precision import exact_fp32, set_precision
from .imresize import imresize


def __getattr__(name):
    # cnn_train is loaded on first use so that `python -m matconvnet_port.train` runs cleanly
    if name == "cnn_train":
        from .train import cnn_train
        return cnn_train
    if name == "cnn_train_dag":
        from .train_dag import cnn_train_dag
        return cnn_train_dag
    if name in ("load_net", "save_net", "load_checkpoint", "save_checkpoint"):
        from . import netio
        return getattr(netio, name)
    if name == "DagNN":
        from .dagnn import DagNN
        return DagNN
    raise AttributeError(f"module 'matconvnet_port' has no attribute {name!r}")
