"""The study's grid: ReLU masks x input sizes N x seeds, its presets, work units and shards.

A *cell* is one (mask, N, seed): one LeNet trained for ``epochs`` epochs. A
*group* is one (N, seed): its cells share the input size, the initial weights
(``cnn_mnist_init(seed=seed)``) and the data order (``default_order(epoch,
train, seed)``), so they are trained together as one :class:`FusedLeNet`.
Groups are the unit of work, of checkpointing and of sharding.

The training settings (:class:`Settings`) are fixed for an output folder;
the grid (masks, sizes, seeds) may grow between runs.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, fields

from ..models import ALL_MASKS, mask_bits, mask_name, parse_mask

__all__ = ["UsageError", "Preset", "PRESETS", "Settings", "Group", "parse_masks", "parse_sizes",
           "parse_shard", "fused_order", "table_order", "build_groups", "shard_groups", "cost_per_image",
           "describe_masks", "PAPER_SIZES"]

PAPER_SIZES = tuple(range(28, 65, 4))
N_TRAIN, N_VAL = 60000, 10000


class UsageError(Exception):
    """A bad argument or an incompatible output folder: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Preset:
    """Default grid and settings; every value can be overridden on the command line."""

    masks: tuple
    sizes: tuple
    seeds: int
    epochs: int
    train_subset: int
    val_subset: int
    threshold: float  # validation image-level error that counts as "converged"
    description: str


PRESETS = {
    # The paper's grid: 16 masks x N = 28..64 x 20 epochs of full MNIST, 3 seeds. A GPU job.
    "paper": Preset(ALL_MASKS, PAPER_SIZES, 3, 20, N_TRAIN, N_VAL, 0.015,
                    "16 masks x N=28..64 step 4 x 3 seeds, 20 epochs of full MNIST (60000/10000): the paper's grid"),
    # What a 2-core CPU does in well under 15 minutes: every mask, the two cheapest sizes (the
    # cost per image grows ~15x from N=28 to N=64 on a CPU), 2 seeds for the paired tests,
    # 4 short epochs (80 SGD steps per cell; the paper's grid has 12000).
    "quick": Preset(ALL_MASKS, (28, 32), 2, 4, 2000, 500, 0.10,
                    "16 masks x N=28,32 x 2 seeds, 4 epochs of 2000 training images, 500 validation images"),
    # A plumbing check, under 2 minutes on a CPU: the numbers mean nothing.
    "smoke": Preset(ALL_MASKS, (28, 32), 1, 1, 1000, 500, 0.50,
                    "16 masks x N=28,32 x 1 seed, 1 epoch of 1000 training images, 500 validation images"),
}


@dataclass(frozen=True)
class Settings:
    """Training settings of an output folder (``config.json``); a rerun must use the same ones."""

    epochs: int
    train_subset: int
    val_subset: int
    resize: str
    dataset: str
    learning_rate: float
    batch_size: int
    precision: str
    weight_decay: float = 0.0005  # cnn_mnist's values, not options
    momentum: float = 0.9

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict):
            raise UsageError(f"config.json: 'training' must be an object, got {type(d).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise UsageError(f"config.json: the training settings lack {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: "Settings") -> list[str]:
        """'name: mine vs other' for each setting that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]


@dataclass(frozen=True)
class Group:
    """One (N, seed) and the masks to train in it, in fused order."""

    input_size: int
    seed: int
    masks: tuple

    @property
    def key(self) -> str:
        return f"N{self.input_size}-seed{self.seed}"


def fused_order(masks) -> list:
    """Masks sorted with conv1's bit most significant, ReLU first (1111, 1110, ..., 0000).

    Neighbouring models then mostly share their ReLU flags, so
    :func:`~matconvnet_port.functional.channel_relu` sees few runs of
    channels (2 at conv1, 4 at conv2, ...).
    """
    return sorted(set(tuple(m) for m in masks), reverse=True)


def table_order(masks) -> list:
    """Masks in the order of the reference ``lenet.mat`` (row m = binary of m-1, conv1 least significant)."""
    return sorted(set(tuple(m) for m in masks), key=ALL_MASKS.index)


def parse_masks(tokens) -> tuple:
    """``['all']``, ``['C CR C CR', '0010']`` or bare ``C CR C CR`` tokens -> masks (table order).

    Bare ``C``/``CR`` tokens (an unquoted name split by the shell) are taken four at a time.
    """
    masks, loose = [], []
    for token in tokens:
        text = str(token).strip()
        if text.upper() in ("C", "CR"):
            loose.append(text)
            if len(loose) == 4:
                masks.append(parse_mask(" ".join(loose)))
                loose = []
            continue
        if loose:
            raise UsageError(f"--masks: incomplete mask name {' '.join(loose)!r} (a mask has 4 convs)")
        if text.lower() == "all":
            masks.extend(ALL_MASKS)
            continue
        try:
            masks.append(parse_mask(text))
        except ValueError as e:
            raise UsageError(f"--masks: {e}") from None
    if loose:
        raise UsageError(f"--masks: incomplete mask name {' '.join(loose)!r} (a mask has 4 convs)")
    if not masks:
        raise UsageError("--masks: no mask given")
    return tuple(table_order(masks))


def parse_sizes(values) -> tuple:
    """Input sizes N: integers >= 28 divisible by 4 (the LeNet's two 2x2 poolings then tile exactly)."""
    sizes = []
    for v in values:
        try:
            n = int(str(v))
        except ValueError:
            raise UsageError(f"--sizes: {v!r} is not an integer") from None
        if n < 28 or n % 4:
            raise UsageError(f"--sizes: N must be >= 28 and divisible by 4, got {n}")
        sizes.append(n)
    if not sizes:
        raise UsageError("--sizes: no size given")
    return tuple(sorted(set(sizes)))


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/K' (1 <= I <= K) -> (I, K); None -> (1, 1)."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(f"--shard: expected I/K with 1 <= I <= K (e.g. 2/8), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def build_groups(masks, sizes, seeds) -> list[Group]:
    """All (N, seed) groups of the grid, N-major (consecutive groups reuse the loaded data)."""
    return [Group(n, s, tuple(fused_order(masks))) for n in sorted(sizes) for s in sorted(seeds)]


def cost_per_image(input_size: int) -> float:
    """Relative training cost of one image through one LeNet at N x N (1.0 at N = 28).

    Multiply-accumulates of conv1+conv2 plus those of conv3+conv4 weighted by
    0.28: conv3/conv4 are one large matrix product, several times more
    efficient per operation than the small convolutions. Fitted on a 2-core
    CPU (N = 28, 36, 48, 64 measured 1 : 2.4 : 4.8 : 15; the model gives
    1 : 2.5 : 6.6 : 15); only used for shard balancing and the printed estimate.
    """
    def macs(n):
        c1 = (n - 4) ** 2 * 5 * 5 * 20
        c2 = (n / 2 - 6) ** 2 * 5 * 5 * 20 * 50
        c34 = (n / 4 - 6) ** 2 * (4 * 4 * 50 * 500 + 500 * 10)
        return c1 + c2 + 0.28 * c34
    return macs(input_size) / macs(28)


def shard_groups(groups: list[Group], index: int, count: int) -> list[Group]:
    """The ``index``-th (1-based) of ``count`` deterministic slices of ``groups``.

    Longest-processing-time assignment by :func:`cost_per_image` (x the number
    of masks): each group, costliest first, goes to the least loaded shard
    (ties to the lowest shard). Depends only on the grid, so every shard of a
    job array computes the same split. Returned in the input (N-major) order.
    """
    load = [0.0] * count
    owner = {}
    ranked = sorted(range(len(groups)),
                    key=lambda i: (-cost_per_image(groups[i].input_size) * len(groups[i].masks), i))
    for i in ranked:
        k = min(range(count), key=lambda j: (load[j], j))
        owner[i] = k
        load[k] += cost_per_image(groups[i].input_size) * len(groups[i].masks)
    return [g for i, g in enumerate(groups) if owner[i] == index - 1]


def describe_masks(masks) -> str:
    if set(masks) == set(ALL_MASKS):
        return "all 16 masks"
    return ", ".join(f"{mask_name(m)} ({mask_bits(m)})" for m in masks)
