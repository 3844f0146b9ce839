"""The ReLU-placement study: train the 16 masks of MatConvNet's MNIST LeNet over N x seeds, summarise.

Read in this order: :mod:`.grid` (presets, cells, groups, shards) ->
:mod:`.runner` (each (N, seed) group trained as one fused network, resumable
checkpoints) -> :mod:`.results` (``config.json``, ``results.csv``, merge) ->
:mod:`.summary` (statistics, tables, plots, verdict) -> :mod:`.cli` (the
``python -m matconvnet_port.search`` command).
"""

from .cli import main

__all__ = ["main"]
