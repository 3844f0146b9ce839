"""The files of an output folder: ``config.json``, ``results.csv``, atomic writes, merging.

``results.csv`` has one row per (mask, N, seed, epoch), columns :data:`COLUMNS`;
floats are written with ``repr`` (shortest round-trip form), so reading the
file back gives the computed numbers exactly. It is always *regenerated* from
the group checkpoints (:mod:`.runner`), never appended to, so an interrupted
run can neither duplicate nor lose a row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import torch

from ..files import atomic_write, atomic_write_text  # noqa: F401  (used by runner and summary too)
from ..models import ALL_MASKS, mask_bits, parse_mask
from .grid import Settings, UsageError, table_order

__all__ = ["COLUMNS", "atomic_write", "atomic_write_text", "atomic_torch_save", "write_results", "read_results",
           "load_config", "save_config", "merge_dirs", "cell_key"]

COLUMNS = [
    "mask", "mask_bits", "input_size", "seed", "epoch",
    "train_objective", "train_top1err", "train_top5err",
    "val_objective", "val_top1err", "val_top5err", "val_image_err",
    "dead_relu_conv1", "dead_relu_conv2", "dead_relu_conv3", "dead_relu_conv4",
    "seconds", "fused_models", "device", "conv_impl",
]
_INT_COLUMNS = {"input_size", "seed", "epoch", "fused_models"}
_STR_COLUMNS = {"mask", "mask_bits", "device", "conv_impl"}
# columns that describe how a number was computed, not the number (ignored when comparing runs)
RUN_COLUMNS = ("seconds", "fused_models", "device", "conv_impl")


def atomic_torch_save(path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder) -> None:
    """Temporary files of a process killed hard (SIGKILL) between write and rename."""
    for p in Path(folder).rglob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


# -- results.csv --------------------------------------------------------------------

def cell_key(row: dict) -> tuple:
    return (int(row["input_size"]), int(row["seed"]), ALL_MASKS.index(parse_mask(row["mask_bits"])))


def _row_sort_key(row: dict) -> tuple:
    return cell_key(row) + (int(row["epoch"]),)


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_results(path, rows: list[dict]) -> None:
    """Write ``rows`` sorted by (N, seed, mask in lenet.mat order, epoch), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=_row_sort_key):
        writer.writerow({c: _format(row.get(c)) for c in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_results(path) -> list[dict]:
    """Rows of a ``results.csv`` with typed values (empty dead-ReLU fields -> nan)."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{path}: not a search results.csv (missing columns {', '.join(missing)})")
        for raw in reader:
            row = {}
            for c in COLUMNS:
                v = raw[c]
                if c in _STR_COLUMNS:
                    row[c] = v
                elif c in _INT_COLUMNS:
                    row[c] = int(v)
                else:
                    row[c] = float(v) if v != "" else float("nan")
            rows.append(row)
    return rows


# -- config.json ---------------------------------------------------------------------

def load_config(folder) -> dict | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path}: not a readable config.json ({e})") from None
    missing = [k for k in ("training", "grid") if not isinstance(config, dict) or k not in config]
    if missing:
        raise UsageError(f"{path}: not a config.json of this search (no {', '.join(missing)})")
    return config


def save_config(folder, config: dict) -> None:
    atomic_write_text(Path(folder) / "config.json", json.dumps(config, indent=2) + "\n")


def grid_union(a: dict, b: dict) -> dict:
    """The union of two ``config['grid']`` entries."""
    masks = table_order([parse_mask(m) for m in a["masks"] + b["masks"]])
    return {"masks": [mask_bits(m) for m in masks],
            "sizes": sorted(set(a["sizes"]) | set(b["sizes"])),
            "seeds": sorted(set(a["seeds"]) | set(b["seeds"]))}


# -- merge --------------------------------------------------------------------------

def merge_dirs(dirs, out) -> tuple[dict, list[dict]]:
    """Merge the ``results.csv`` of several output folders (e.g. shards) into ``out``.

    The training settings must agree. A cell (mask, N, seed) found in several
    folders (shards re-split after the grid grew train some groups twice) is
    taken from the one with the most epochs, the first listed among equals,
    with a note saying how far the copies' final errors differ. Writes
    ``out/config.json`` (grid = union) and ``out/results.csv``; returns
    (config, rows).
    """
    out = Path(out)
    if (out / "groups").is_dir():
        raise UsageError(f"merge: {out} holds a run's checkpoints; merge into a new folder")
    resolved = [Path(d).resolve() for d in dirs]
    if len(set(resolved)) < len(resolved):
        raise UsageError("merge: a folder is given twice")
    config, copies = None, {}  # cell -> [(folder, its rows of the cell)]
    for d in dirs:
        d = Path(d)
        cfg = load_config(d)
        if cfg is None or not (d / "results.csv").is_file():
            raise UsageError(f"merge: {d} has no config.json and results.csv")
        if config is None:
            config = dict(cfg)
        else:
            diff = Settings.from_dict(config["training"]).differences(Settings.from_dict(cfg["training"]))
            if diff:
                raise UsageError(f"merge: {d} was trained with other settings ({'; '.join(diff)})")
            if None not in (config.get("data_sha256"), cfg.get("data_sha256")) and \
                    config["data_sha256"] != cfg["data_sha256"]:
                raise UsageError(f"merge: {d} was trained on other images (data fingerprint {cfg['data_sha256']}, "
                                 f"not {config['data_sha256']})")
            config["grid"] = grid_union(config["grid"], cfg["grid"])
            # folders from before the fingerprint have none: compare the rest with the first one that has
            config["data_sha256"] = config.get("data_sha256") or cfg.get("data_sha256")
        for row in read_results(d / "results.csv"):
            held = copies.setdefault(cell_key(row), [])
            if not held or held[-1][0] != d:
                held.append((d, []))
            held[-1][1].append(row)
    if config is None:
        raise UsageError("merge: no folders given")
    rows, twice, spread = [], 0, 0.0
    for held in copies.values():
        rows += max(held, key=lambda c: len(c[1]))[1]  # max keeps the first of equals
        if len(held) > 1:
            twice += 1
            shared = min(max(r["epoch"] for r in c[1]) for c in held)  # compare like with like
            at = [r["val_image_err"] for c in held for r in c[1] if r["epoch"] == shared]
            spread = max(spread, max(at) - min(at)) if at else spread
    if twice:
        print(f"note: merge: {twice} cells are in more than one folder (e.g. shards re-split after the grid "
              f"grew); each is taken from the folder with the most epochs, the first listed among equals "
              f"(at the last epoch all copies reached, their image-level errors differ by up to {spread:.2%})",
              file=sys.stderr)
    config["merged_from"] = [str(d) for d in dirs]
    config.pop("shard", None)
    save_config(out, config)
    write_results(out / "results.csv", rows)
    return config, rows
