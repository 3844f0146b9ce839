"""``python -m matconvnet_port.search``: build the grid, train it group by group, summarise.

Commands::

    python -m matconvnet_port.search [--preset paper|quick|smoke] [options]   # run (or resume) a grid
    python -m matconvnet_port.search merge DIR1 DIR2 ... --out DIR            # merge shards, summarise
    python -m matconvnet_port.search summary DIR [--threshold T]              # re-summarise a folder

Exit codes: 0 done, 1 out of device memory, 2 bad arguments or incompatible
folder (one line on stderr, no traceback), 130 interrupted. After 1 or 130
the folder is consistent and the command printed on stderr (the same one
with ``--out`` of that folder) resumes it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fused import parse_conv
from ..mnist import RESIZE_METHODS, MnistDataError, load_mnist
from ..models import mask_bits
from ..precision import PRECISIONS, set_precision
from ..train import resolve_device
from . import runner
from .grid import (PRESETS, Settings, UsageError, build_groups, describe_masks, parse_masks, parse_shard,
                   parse_sizes, shard_groups)
from .results import grid_union, load_config, merge_dirs, read_results, remove_stale_temporaries, save_config
from .summary import format_p, summarise, write_summary

__all__ = ["main"]

PROG = "python -m matconvnet_port.search"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would print the usage too)
        raise UsageError(message)


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train the 16 ReLU placements of MatConvNet's MNIST LeNet over input "
                "sizes and seeds, resumably, and summarise whether C CR C CR is the best. Options left out "
                "take the preset's value. Other commands: 'merge DIR... --out DIR', 'summary DIR'.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="grid and settings: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
                   + " (default: paper with CUDA, else quick)")
    p.add_argument("--masks", nargs="+", metavar="MASK",
                   help="'all', names like 'C CR C CR' or bits like 0101 (conv1 first); several allowed")
    p.add_argument("--sizes", nargs="+", metavar="N", help="input sizes N (>= 28, divisible by 4)")
    p.add_argument("--seeds", type=int, metavar="K", help="seeds 0..K-1")
    p.add_argument("--epochs", type=int, help="epochs per cell (default: the preset's; the paper's 20)")
    p.add_argument("--train-subset", type=int, metavar="n", help="first n of the 60000 training images")
    p.add_argument("--val-subset", type=int, metavar="n", help="first n of the 10000 t10k images")
    p.add_argument("--resize", choices=RESIZE_METHODS, default="imresize",
                   help="how digits are brought to N x N (default imresize = MATLAB bicubic, our assumption)")
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    p.add_argument("--data-dir", help="folder with the IDX files (default: the vendored MNIST)")
    p.add_argument("--out", help="output folder (default runs/<preset>-<timestamp>); rerun to resume")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="CUDA matmul/conv precision (default fp32; tf32 only on CUDA)")
    p.add_argument("--batch-size", type=int, default=100, help="SGD batch size (default 100, cnn_train's)")
    p.add_argument("--learning-rate", type=float, default=0.001, help="SGD learning rate (default 0.001, cnn_train's)")
    p.add_argument("--threshold", type=float,
                   help="validation image-level error counted as converged (default: the preset's)")
    p.add_argument("--shard", metavar="I/K", help="run only the I-th of K slices of the (N, seed) groups")
    p.add_argument("--conv", default="auto",
                   help="fused conv implementation: auto (measured on CUDA unless --memory-format is given, "
                        "then the default; on CPU the measured default), "
                        "grouped, loop, streams, gemm, gemm_wgrad, or four of them for conv1..conv4, e.g. "
                        "gemm,streams,gemm,gemm")
    p.add_argument("--memory-format", choices=("auto", "nchw", "nhwc"), default="auto",
                   help="fused activation storage (auto: nhwc on CPU; on CUDA measured with --conv auto, "
                        "else the default)")
    p.add_argument("--lanes", type=int, default=1, metavar="K",
                   help="train K (N, seed) groups side by side, each on its own CUDA stream, to fill a GPU that "
                        "small N leave idle; the same numbers (default 1: an H100 gained 1.10x at best, "
                        "benchmarks/bench_lanes.py)")
    p.add_argument("--train-diverged", action="store_true",
                   help="keep training models whose conv4 has become all NaN (by default such a model stops once "
                        "two epochs reported the same statistics, and its later epochs repeat them: the same rows)")
    p.add_argument("--save-nets", "--keep-weights", dest="save_nets", action="store_true",
                   help="write each finished cell's net as a MatConvNet .mat file in OUT/nets/")
    return p


OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def _out_of_memory(e: BaseException) -> bool:
    """Out of device memory: CUDA raises OutOfMemoryError, PyTorch's CPU allocator a RuntimeError."""
    return isinstance(e, OUT_OF_MEMORY) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _check_range(name: str, value, low, high=None) -> None:
    if value is not None and (value < low or (high is not None and value > high)):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise UsageError(f"{name}: must be {bound}, got {value}")


def _check_threshold(threshold) -> None:
    """A fraction, as the error columns are: ``--threshold 2`` meaning 2 % would count every cell converged."""
    if threshold is not None and not 0 < threshold <= 1:
        raise UsageError(f"--threshold: an error fraction in (0, 1] (0.02 = 2 %), got {threshold}")


def _settings_and_grid(args, preset):
    """The training settings and the grid: the preset's values overridden by explicit options."""
    for name, low, high in (("--epochs", 1, None), ("--seeds", 1, None), ("--train-subset", 1, 60000),
                            ("--val-subset", 1, 10000), ("--batch-size", 1, None), ("--lanes", 1, None)):
        _check_range(name, getattr(args, name[2:].replace("-", "_")), low, high)
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UsageError(f"--learning-rate: must be a finite number > 0, got {args.learning_rate}")
    _check_threshold(args.threshold)
    if args.conv != "auto":
        try:
            parse_conv(args.conv)
        except ValueError as e:
            raise UsageError(f"--conv: {e}") from None
    masks = parse_masks(args.masks) if args.masks else tuple(preset.masks)
    sizes = parse_sizes(args.sizes) if args.sizes else tuple(preset.sizes)
    seeds = tuple(range(args.seeds if args.seeds is not None else preset.seeds))
    settings = Settings(epochs=args.epochs or preset.epochs,
                        train_subset=args.train_subset or preset.train_subset,
                        val_subset=args.val_subset or preset.val_subset,
                        resize=args.resize, dataset=args.dataset, learning_rate=args.learning_rate,
                        batch_size=args.batch_size, precision=args.precision)
    return settings, masks, sizes, seeds


def _check_data(data_dir, dataset) -> str:
    """Check the dataset loads; return a fingerprint of its images and labels (Fashion-MNIST has no
    built-in checksum, so a folder records what it was trained on)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"--data-dir: {data_dir}: no such folder")
    try:
        data = load_mnist(data_dir, dataset)
    except (FileNotFoundError, MnistDataError) as e:
        raise UsageError(f"data: {e}") from None
    digest = hashlib.sha256()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        digest.update(np.ascontiguousarray(data[key]).tobytes())
    return digest.hexdigest()[:16]


def _check_results_are_backed(out: Path, config: dict) -> None:
    """Refuse a folder whose results.csv holds (N, seed) groups without a checkpoint in groups/ (a merged
    or copied folder): results.csv is regenerated from the checkpoints, so training there would drop them."""
    path = out / "results.csv"
    if not path.is_file():
        return
    keys = {(row["input_size"], row["seed"]) for row in read_results(path)}
    orphans = sorted(k for k in keys if not (out / "groups" / f"N{k[0]}-seed{k[1]}.pt").is_file())
    if orphans:
        what = "merged from other folders" if config.get("merged_from") else "copied without its groups/"
        raise UsageError(f"--out {out}: its results.csv holds {len(orphans)} (N, seed) groups with no checkpoint "
                         f"in groups/ (e.g. N={orphans[0][0]} seed={orphans[0][1]}; {what}), which a run there "
                         f"would drop: train into another --out, then merge the folders")


def _open_folder(out: Path, settings: Settings, grid: dict, preset_name: str, threshold: float, shard,
                 data: str) -> dict:
    """Create or reopen ``out``: the settings and data must match its config.json; the grid may grow."""
    config = load_config(out)
    if config is not None:
        _check_results_are_backed(out, config)
        stored = Settings.from_dict(config["training"])
        diff = stored.differences(settings)
        if diff:
            raise UsageError(f"{out} was trained with other settings ({'; '.join(diff)}; stored preset "
                             f"{config.get('preset')!r}): rerun with the original options or use another --out")
        if config.get("data_sha256", data) != data:  # folders from before the fingerprint: unknown
            raise UsageError(f"--data-dir: {out} was trained on other {settings.dataset} images (fingerprint "
                             f"{config['data_sha256']}, these {data}): use the same files or another --out")
        if config.get("preset") not in (None, preset_name):
            print(f"note: {out} was started with --preset {config['preset']}; its cells are kept, and "
                  f"--preset {preset_name} adds its own")
        grid = grid_union(config["grid"], grid)
    config = {"training": settings.to_dict(), "data_sha256": data, "grid": grid, "preset": preset_name,
              "threshold": threshold,
              "shard": f"{shard[0]}/{shard[1]}" if shard != (1, 1) else None,
              "paired_design": "for each seed, every mask and N starts from cnn_mnist_init(seed=seed)'s weights "
                               "and sees the batches of default_order(epoch, train, seed)"}
    save_config(out, config)
    return config


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run(argv) -> int:
    args = _run_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--device: {e}") from None
    if args.preset:
        preset_name, why = args.preset, "--preset"
    elif device.type == "cuda":
        preset_name, why = "paper", "default with a CUDA device"
    else:
        preset_name, why = "quick", "default without a CUDA device; --preset paper for the full grid"
    preset = PRESETS[preset_name]
    settings, masks, sizes, seeds = _settings_and_grid(args, preset)
    if settings.precision == "tf32" and device.type != "cuda":
        raise UsageError(f"--precision tf32: TF32 exists on CUDA only; on {device.type} the arithmetic is fp32")
    shard = parse_shard(args.shard)
    data = _check_data(args.data_dir, args.dataset)
    threshold = args.threshold if args.threshold is not None else preset.threshold
    out = Path(args.out or f"runs/{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    grid = {"masks": [mask_bits(m) for m in masks], "sizes": list(sizes), "seeds": list(seeds)}
    groups = build_groups(masks, sizes, seeds)
    mine = shard_groups(groups, *shard)
    if not mine:
        raise UsageError(f"--shard {shard[0]}/{shard[1]}: the grid has {len(groups)} (N, seed) groups, "
                         f"so this shard would be empty")
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        config = _open_folder(out, settings, grid, preset_name, threshold, shard, data)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None

    set_precision(settings.precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ctx = runner.RunContext(out_dir=out, settings=settings, device=device, conv=args.conv,
                            memory_format=args.memory_format, lanes=args.lanes,
                            finish_diverged=not args.train_diverged,
                            data_dir=args.data_dir, save_nets=args.save_nets, log=tqdm.write)
    work = runner.pending_work(ctx, mine)
    pending_cells = sum(len(m) for _, _, m in work)

    overridden = [f"--{k.replace('_', '-')}" for k in ("masks", "sizes", "seeds", "epochs", "train_subset", "val_subset")
                  if getattr(args, k) is not None]
    print(f"preset: {preset_name} ({why}): {preset.description}"
          + (f"; {', '.join(overridden)} given: the grid is" if overridden else ""))
    seed_text = "seed 0" if len(seeds) == 1 else f"seeds 0..{len(seeds) - 1}"
    print(f"grid: {describe_masks(masks)} x N = {', '.join(map(str, sizes))} x {seed_text} = "
          f"{len(masks) * len(sizes) * len(seeds)} cells x {settings.epochs} epochs, "
          f"{settings.train_subset} training / {settings.val_subset} validation images, resize {settings.resize}")
    shard_text = f", shard {shard[0]}/{shard[1]}: {len(mine)}" if shard != (1, 1) else ""
    print(f"groups (N, seed): {len(groups)}{shard_text}; pending: {pending_cells} cells in {len(work)} fused runs; "
          f"output: {out}")
    resume = f"{PROG} {shlex.join(argv)}" + ("" if args.out else f" --out {shlex.quote(str(out))}")
    try:
        if work:
            estimate, how = runner.estimate_seconds(ctx, work)
            print(f"device: {ctx.device_label}, {settings.precision}; estimate: ~{_duration(estimate)} "
                  f"(rough: {how}, scaled by the LeNet's cost per N)")
            total = runner.work_images(ctx, work)
            tty = sys.stderr.isatty()
            with tqdm(total=total, unit="img", unit_scale=True, desc="grid", dynamic_ncols=True,
                      mininterval=0.5 if tty else 30, smoothing=0.05) as bar:
                runner.run_groups(ctx, work, runner.GridProgress(bar, ctx, work))
    except KeyboardInterrupt:
        runner.regenerate_results(out)
        print(f"\ninterrupted: {out} is consistent (finished epochs are kept in groups/ and results.csv).\n"
              f"resume with: {resume}", file=sys.stderr)
        return 130
    except (*OUT_OF_MEMORY, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        runner.regenerate_results(out)
        fewer = " with fewer --lanes" if args.lanes > 1 else ""
        print(f"{PROG}: error: out of {device.type} memory ({(str(e).splitlines() or [type(e).__name__])[0]}); "
              f"finished epochs are kept in "
              f"{out}; resume{fewer} with: {resume}", file=sys.stderr)
        return 1
    rows = runner.regenerate_results(out)
    if args.save_nets and not work:
        print("note: --save-nets writes nets when cells finish; these cells had finished already")
    return _summarise(out, config, rows, threshold)


def _summarise(out: Path, config: dict, rows: list[dict], threshold) -> int:
    if not rows:
        print(f"{out}: no results yet")
        return 0
    summary = summarise(rows, config, threshold)
    write_summary(out, summary)
    print(f"wrote {out}/results.csv ({len(rows)} rows), summary.md, summary.json, heatmap.png, curves.png")
    print("verdict (paired over (N, seed); 'pp' = percentage points):")
    for line in summary["verdict"]:
        print(f"  {line}")
    effects = [e for e in summary["measures"]["val_image_err"]["relu_effects"] if e["n"]]
    if effects:
        print("a ReLU after each conv, image-level error with minus without (mean over (N, seed) pairs, t-test p):")
        print("  " + ", ".join(f"conv{e['conv']} {e['mean_diff'] * 100:+.2f} pp (p={format_p(e['t_p'])})"
                               for e in effects))
    if summary["caveat"]:
        print(f"  {summary['caveat'].replace('**', '').replace('`', '')}")
    return 0


def merge(argv) -> int:
    p = _Parser(prog=f"{PROG} merge", description="Merge the results.csv of several output folders "
                "(e.g. shards; their training settings must agree) and summarise them.")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float)
    args = p.parse_args(argv)
    _check_threshold(args.threshold)
    for d in args.dirs:
        if not Path(d).is_dir():
            raise UsageError(f"merge: {d}: no such folder")
    try:
        config, rows = merge_dirs(args.dirs, args.out)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    return _summarise(Path(args.out), config, rows, args.threshold)


def summary(argv) -> int:
    p = _Parser(prog=f"{PROG} summary", description="Rewrite the summary of an output folder from its results.csv.")
    p.add_argument("dir")
    p.add_argument("--threshold", type=float)
    args = p.parse_args(argv)
    _check_threshold(args.threshold)
    out = Path(args.dir)
    config = load_config(out)
    if config is None or not (out / "results.csv").is_file():
        raise UsageError(f"summary: {out} has no config.json and results.csv")
    return _summarise(out, config, read_results(out / "results.csv"), args.threshold)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"merge": merge, "summary": summary}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (a run's own handler keeps what it trained)
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
