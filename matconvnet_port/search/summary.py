"""From ``results.csv`` rows to the study's answer: tables, tests, plots and a verdict.

Two error measures, reported side by side because they differ for N > 28
(the unchanged LeNet then outputs a ((N/4)-6)^2 map of class scores):

* ``val_image_err``: the *image-level* error: class scores summed over the
  positions, then argmax; a fraction of images, comparable across N;
* ``val_top1err``: MatConvNet's ``top1err`` as ``cnn_train`` reports it:
  top-1 errors counted at every position, divided by the number of images
  (so it can exceed 1 for N > 28).

Statistics: mean over seeds with a 95% confidence interval from the t
distribution (:func:`mean_ci`); masks are ranked by their mean over the
(N, seed) pairs every mask has; the best mask is compared with the runner-up
by a paired t-test and, with at least 6 pairs, a Wilcoxon signed-rank test
over those pairs (:func:`paired_test`). Pairing is valid because, for a
given seed, all masks start from the same weights and see the same batches.

The 16 masks are a full 2^4 factorial design (a ReLU after each conv or not),
so besides ranking them the summary estimates each ReLU's *main effect*
(:func:`relu_effects`): the error with a ReLU after conv k minus the error of
the same mask without it, averaged over the 8 such pairs of masks per
(N, seed) pair, then tested over those pairs like the ranking.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from ..models import ALL_MASKS, PAPER_BEST_MASK, STOCK_MASK, mask_bits, mask_name, parse_mask
from .grid import build_groups, parse_shard, shard_groups, table_order
from .results import atomic_write, atomic_write_text

__all__ = ["mean_ci", "paired_test", "relu_effects", "format_p", "summarise", "write_summary", "verdict_lines",
           "MEASURES"]

MEASURES = {
    "val_image_err": ("image-level error", "class scores summed over the output positions, then argmax; "
                      "fraction of validation images"),
    "val_top1err": ("MatConvNet top1err", "top-1 errors counted at every output position divided by the number "
                    "of images, as cnn_train reports it (exceeds 100% when N > 28 and most positions are wrong)"),
}
PAPER_BEST = mask_bits(PAPER_BEST_MASK)
STOCK = mask_bits(STOCK_MASK)
MIN_WILCOXON_PAIRS = 6  # with 5 pairs the smallest two-sided exact p is 2/2^5 = 0.0625
ALPHA = 0.05
# the fewest (N, seed) pairs with which an exact test of the signs alone can reach ALPHA (2 * 0.5**6 = 0.031):
# REPRODUCED needs them, so a verdict never rests on the t-test's normality with 2 to 5 pairs
MIN_PAIRS = 6


# -- statistics ----------------------------------------------------------------------

def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the ``confidence`` interval, n) with the t distribution.

    half-width = t_{(1+confidence)/2, n-1} * s / sqrt(n), s the sample standard
    deviation (ddof 1); nan when n < 2.
    """
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = x.size
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


def _t_test_p(d) -> float:
    """Two-sided one-sample t-test of differences ``d`` against 0 (the paired t-test of the samples behind them).

    nan with fewer than 2 differences or all of them 0. When all are the same
    non-zero value (common: errors move in steps of 1/val_subset) the t
    statistic is infinite and its p of 0 would call 2 equal pairs
    significant; the exact two-sided sign test stands in, 2 * 0.5**n (0.5 for
    2 pairs, 0.031 for 6). "The same" allows float rounding (1e-9 relative).
    """
    d = np.asarray(d, np.float64)
    if d.size < 2:
        return math.nan
    scale = float(np.abs(d).max())
    if scale == 0:
        return math.nan
    if np.ptp(d) <= 1e-9 * scale:
        return min(1.0, 2 * 0.5 ** d.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.ttest_1samp(d, 0.0).pvalue)


def paired_test(a, b) -> dict:
    """Compare paired samples a and b (e.g. two masks' errors over the same (N, seed) pairs).

    Returns ``n``, ``mean_diff`` (mean of a - b), ``a_better`` (pairs with
    a < b), ``b_better``, ``t_p`` (two-sided paired t-test,
    :func:`_t_test_p` of the differences, as ``scipy.stats.ttest_rel``; nan
    with fewer than 2 pairs or no difference at all) and ``wilcoxon_p`` (two-sided Wilcoxon signed-rank,
    ``scipy.stats.wilcoxon``, zero differences dropped; None with fewer than
    6 non-zero differences, where it cannot reach p < 0.05).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan,
           "a_better": int((d < 0).sum()), "b_better": int((d > 0).sum()), "t_p": _t_test_p(d), "wilcoxon_p": None}
    if int((d != 0).sum()) >= MIN_WILCOXON_PAIRS:
        out["wilcoxon_p"] = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
    return out


def relu_effects(final: dict, masks, common, measure: str = "val_image_err") -> list[dict]:
    """Main effect of a ReLU after each conv: error with it minus without, all else equal.

    ``final`` maps (mask bits, N, seed) to a final-epoch row; ``common`` lists
    the (N, seed) pairs every mask finished. For conv k the matched pairs are
    the masks ``m`` with bit k off whose partner (bit k on) is in ``masks``:
    8 of them in the full grid. Per (N, seed) pair the effect is the mean of
    ``err(partner) - err(m)`` over the matched pairs; across pairs: mean, 95%
    CI (:func:`mean_ci`), a two-sided one-sample t-test against 0
    (:func:`_t_test_p`; nan with fewer than 2 pairs), the mean per
    N, and how many single mask comparisons the ReLU made lower / higher.
    Returns one dict per conv (``conv`` 1..4; ``mask_pairs`` 0 when none match).
    """
    present = set(masks)
    out = []
    for k in range(4):
        partner = {m: m[:k] + "1" + m[k + 1:] for m in masks if m[k] == "0"}
        matched = [(m, w) for m, w in partner.items() if w in present]
        per_pair, per_size, lower, higher = [], {}, 0, 0
        for n, s in common if matched else []:
            d = np.array([final[(w, n, s)][measure] - final[(wo, n, s)][measure] for wo, w in matched])
            effect = float(d.mean())
            per_pair.append(effect)
            per_size.setdefault(str(n), []).append(effect)
            lower, higher = lower + int((d < 0).sum()), higher + int((d > 0).sum())
        mean, half, n_pairs = mean_ci(per_pair)
        out.append({"conv": k + 1, "mask_pairs": len(matched), "mean_diff": mean, "ci95": half, "n": n_pairs,
                    "t_p": _t_test_p(per_pair), "per_size": {n: float(np.mean(v)) for n, v in per_size.items()},
                    "lower_with_relu": lower, "higher_with_relu": higher})
    return out


# -- the summary dict ----------------------------------------------------------------------

def summarise(rows: list[dict], config: dict, threshold: float | None = None) -> dict:
    """Everything ``summary.json``/``summary.md``/the plots/the verdict show, from ``results.csv`` rows."""
    epochs = int(config["training"]["epochs"])
    threshold = float(config.get("threshold", 0.02) if threshold is None else threshold)
    final = {}   # (bits, N, seed) -> final-epoch row
    curves = {}  # (bits, N, seed) -> {epoch: row}
    for r in rows:
        key = (r["mask_bits"], int(r["input_size"]), int(r["seed"]))
        curves.setdefault(key, {})[int(r["epoch"])] = r
        if int(r["epoch"]) == epochs:
            final[key] = r
    masks = [mask_bits(m) for m in table_order(parse_mask(k[0]) for k in curves)]
    sizes = sorted({k[1] for k in curves})
    seeds = sorted({k[2] for k in curves})
    # the (N, seed) pairs every mask finished: the paired comparisons use exactly these
    common = [(n, s) for n in sizes for s in seeds if all((m, n, s) in final for m in masks)]

    summary = {
        "config": config, "threshold": threshold, "epochs": epochs,
        "masks": masks, "sizes": sizes, "seeds": seeds, "common_pairs": [list(p) for p in common],
        "cells_finished": len(final), "cells_started": len(curves),
        "groups_started": sorted({(k[1], k[2]) for k in curves}),
        "rows": len(rows), "training_seconds": float(sum(r["seconds"] for r in rows)),
        "devices": sorted({r["device"] for r in rows}),
        "conv_impls": {str(n): sorted({r["conv_impl"] for r in rows if r["input_size"] == n}) for n in sizes},
        "fused_models": sorted({int(r["fused_models"]) for r in rows}),
        # cells whose model stopped training once its scores were NaN for good (their later rows: seconds 0)
        "stopped_cells": sum(any(r["seconds"] == 0 for r in curve.values()) for curve in curves.values()),
        "measures": {},
    }
    for measure in MEASURES:
        summary["measures"][measure] = _measure_summary(measure, final, masks, sizes, seeds, common)
        summary["measures"][measure]["relu_effects"] = relu_effects(final, masks, common, measure)
    summary["convergence"] = _convergence(curves, masks, threshold)
    summary["dead_relu"] = _dead_relu(final, masks)
    summary["curves"] = {m: {str(n): _mean_curve(curves, m, n, seeds, epochs) for n in sizes} for m in masks}
    summary["verdict"] = verdict_lines(summary)
    summary["caveat"] = _short_training_note(summary)[0][2:] if _short_training_note(summary) else None
    return summary


def _measure_summary(measure, final, masks, sizes, seeds, common) -> dict:
    table = {m: {str(n): dict(zip(("mean", "ci95", "n"),
                                  mean_ci([final[(m, n, s)][measure] for s in seeds if (m, n, s) in final])))
                 for n in sizes} for m in masks}
    best_per_size = {}
    for n in sizes:
        means = {m: _comparable(table[m][str(n)]["mean"]) for m in masks if table[m][str(n)]["n"]}
        if means:
            low = min(means.values())
            best_per_size[str(n)] = [m for m in masks if means.get(m) == low]
    if common:
        pairs = common
    else:  # some mask unfinished everywhere: compare the others where all of them finished, paired still
        finished = {k[0] for k in final}
        pairs = sorted(p for p in {(k[1], k[2]) for k in final} if all((m,) + p in final for m in finished))
    overall = []
    for m in masks:
        values = [final[(m, n, s)][measure] for n, s in pairs if (m, n, s) in final]
        overall.append({"mask_bits": m, "mask": mask_name(parse_mask(m)),
                        "mean": _comparable(float(np.mean(values))) if values else math.nan, "n": len(values)})
    overall.sort(key=lambda e: (math.isnan(e["mean"]), e["mean"], ALL_MASKS.index(parse_mask(e["mask_bits"]))))
    for e in overall:  # competition ranking: ties share a rank; no rank without a finished cell
        e["rank"] = None if math.isnan(e["mean"]) else 1 + sum(o["mean"] < e["mean"] for o in overall)
    out = {"table": table, "best_per_size": best_per_size, "overall": overall, "pairs": len(common),
           "pairs_compared": len(pairs)}
    if len(overall) >= 2 and common:
        top = [e["mask_bits"] for e in overall]
        if any(e["mask_bits"] == PAPER_BEST and e["rank"] == 1 for e in overall):
            # C CR C CR tied at the top (errors are quantised) is the best: the test is about it
            top.remove(PAPER_BEST)
            top.insert(0, PAPER_BEST)
        best = top[0]
        rank = {e["mask_bits"]: e["rank"] for e in overall}
        # the runner-up rank may be shared: the gap must hold against each, so report the weakest
        runners = [m for m in top[1:] if rank[m] == rank[top[1]]]
        tests = [dict(best=best, runner_up=m, **paired_test([final[(best, n, s)][measure] for n, s in common],
                                                            [final[(m, n, s)][measure] for n, s in common]))
                 for m in runners]
        out["best_vs_runner_up"] = max(tests, key=lambda t: math.inf if math.isnan(t["t_p"]) else t["t_p"])
        out["best_vs_runner_up"]["runners_up"] = len(runners)
        if PAPER_BEST in masks and best != PAPER_BEST:
            out["paper_best_vs_best"] = dict(best=best, **paired_test(
                [final[(PAPER_BEST, n, s)][measure] for n, s in common],
                [final[(best, n, s)][measure] for n, s in common]))
    return out


def _comparable(mean: float) -> float:
    """A mean error rounded to 12 decimals: errors are multiples of 1/val_subset, and the means of equal
    sums must tie (0.022 and 0.018 average to 0.019999999999999997, 0.02 and 0.02 to 0.02)."""
    return round(mean, 12)


def _first_epoch_below(curve: dict, threshold: float):
    for epoch in sorted(curve):
        if curve[epoch]["val_image_err"] <= threshold:
            return epoch
    return None


def _convergence(curves, masks, threshold) -> dict:
    """Per mask: epochs until the validation image-level error first reaches the threshold."""
    out = {}
    for m in masks:
        reached = [e for (bits, _, _), c in curves.items() if bits == m
                   for e in [_first_epoch_below(c, threshold)] if e is not None]
        cells = sum(1 for k in curves if k[0] == m)
        out[m] = {"reached": len(reached), "cells": cells,
                  "mean_epochs": float(np.mean(reached)) if reached else None,
                  "max_epochs": int(max(reached)) if reached else None}
    return out


def _diverged(row) -> bool:
    """A cell whose validation loss is NaN: its net holds NaN, so every ReLU in it outputs 0 (MATLAB's
    max(NaN, 0)) and reads as dead although no ReLU died in training."""
    value = row.get("val_objective")
    return value is not None and math.isnan(value)


def _dead_relu(final, masks) -> dict:
    out = {}
    for m in masks:
        rows = [r for k, r in final.items() if k[0] == m]
        live = [r for r in rows if not _diverged(r)]
        out[m] = {"diverged_cells": len(rows) - len(live)}
        for i in range(1, 5):
            values = [r[f"dead_relu_conv{i}"] for r in live if not math.isnan(r[f"dead_relu_conv{i}"])]
            out[m][f"conv{i}"] = float(np.mean(values)) if values else None
    return out


def _mean_curve(curves, m, n, seeds, epochs) -> list:
    """Mean over seeds of the validation image-level error per epoch (None where no seed has it)."""
    out = []
    for e in range(1, epochs + 1):
        values = [curves[(m, n, s)][e]["val_image_err"] for s in seeds
                  if (m, n, s) in curves and e in curves[(m, n, s)]]
        out.append(float(np.mean(values)) if values else None)
    return out


# -- the verdict -----------------------------------------------------------------------------

def format_p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _significant(test: dict | None) -> bool:
    """A paired test on at least two (N, seed) pairs with p below :data:`ALPHA`."""
    return test is not None and test["n"] >= 2 and not math.isnan(test["t_p"]) and test["t_p"] < ALPHA


def _gap(test: dict, scale: float = 100) -> str:
    """'-0.12 pp over 6 (N, seed) pairs, better in 5, paired t p=0.03 (significant at 0.05)'."""
    if test["n"] < 2:
        return f"{test['mean_diff'] * scale:+.2f} pp on {test['n']} (N, seed) pair: too few pairs for a test"
    sig = "significant" if _significant(test) else "not significant"
    wil = f", Wilcoxon p={format_p(test['wilcoxon_p'])}" if test["wilcoxon_p"] is not None else ""
    return (f"{test['mean_diff'] * scale:+.2f} pp over {test['n']} (N, seed) pairs, lower in "
            f"{test['a_better']}/{test['n']}, paired t p={format_p(test['t_p'])}{wil} ({sig} at {ALPHA})")


def _shared(test: dict) -> str:
    """', the closest of 3 tied' when several masks share the runner-up rank (the test shown is the weakest)."""
    return f", the closest of {test['runners_up']} tied" if test.get("runners_up", 1) > 1 else ""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def verdict_lines(summary: dict) -> list[str]:
    """One line per error measure: is C CR C CR the best of the 16 masks, and is the gap significant?

    REPRODUCED: lowest of all 16, significantly below the runner-up (each runner-up, when several
    share that rank; paired over at least :data:`MIN_PAIRS` (N, seed)). INCONCLUSIVE: lowest of all
    16 (or tied), the gap not significant or tested on fewer pairs. NOT TESTED: lowest of a subset
    of the masks. NOT reproduced: another mask has the lowest error. Means are compared as
    :func:`_comparable` rounds them, so equal error counts tie.
    """
    lines = []
    for measure, (label, _) in MEASURES.items():
        s = summary["measures"][measure]
        overall = [e for e in s["overall"] if not math.isnan(e["mean"])]
        head = f"[{label}]"
        if not overall:
            lines.append(f"{head} no finished cell yet" if not summary["cells_finished"] else
                         f"{head} no (N, seed) pair where all the masks with a finished cell finished yet: "
                         f"nothing to compare")
            continue
        by_bits = {e["mask_bits"]: e for e in overall}
        best = overall[0]
        pairs = s["pairs"]  # seeds still training are not in the means
        where = f"mean over the {pairs} (N, seed) pairs every mask finished" if pairs else \
            f"mean over the {_count(s.get('pairs_compared', 0), '(N, seed) pair')} the finished masks share"
        if PAPER_BEST not in by_bits:
            why = "has no finished cell yet" if PAPER_BEST in summary["masks"] else "is not in the grid"
            lines.append(f"{head} C CR C CR {why}; best is {best['mask']} ({best['mean']:.2%}, {where})")
            continue
        ours = by_bits[PAPER_BEST]
        vs = s.get("best_vs_runner_up")
        if ours["rank"] == 1:
            # the claim is "lowest of the 16": lowest of a subset does not test it, and a lowest mean
            # whose gap to the runner-up could be chance is not a reproduction either
            tie = " (tied)" if sum(e["rank"] == 1 for e in overall) > 1 else ""
            if len(overall) < len(ALL_MASKS):
                word = f"NOT TESTED (only {len(overall)} of the {len(ALL_MASKS)} masks)"
            elif _significant(vs) and not tie and vs["n"] < MIN_PAIRS:
                word = f"INCONCLUSIVE (fewer than {MIN_PAIRS} (N, seed) pairs)"
            else:
                word = "REPRODUCED" if _significant(vs) and not tie else "INCONCLUSIVE"
            text = (f"{head} {word}{tie}: C CR C CR has the lowest error of {_count(len(overall), 'mask')}, "
                    f"{ours['mean']:.2%} ({where})")
            if vs:
                runner = by_bits[vs["runner_up"]]  # _measure_summary puts C CR C CR first when it ties
                text += f"; vs runner-up {runner['mask']} ({runner['mean']:.2%}{_shared(vs)}): {_gap(vs)}"
        else:
            text = (f"{head} NOT reproduced: best is {best['mask']} ({best['mean']:.2%}, {where}); "
                    f"C CR C CR ranks {ours['rank']}/{len(overall)} ({ours['mean']:.2%})")
            if "paper_best_vs_best" in s:
                text += f", C CR C CR minus best: {_gap(s['paper_best_vs_best'])}"
            if vs and vs["runner_up"] != PAPER_BEST:
                runner = by_bits[vs["runner_up"]]
                text += f"; best vs runner-up {runner['mask']} ({runner['mean']:.2%}{_shared(vs)}): {_gap(vs)}"
        lines.append(text)
    return lines


# -- summary.md, summary.json and the plots ------------------------------------------------

def _pct(mean, half, n) -> str:
    if n == 0:
        return ""
    if n == 1:
        return f"{mean * 100:.2f} (n=1)"
    return f"{mean * 100:.2f} ± {half * 100:.2f}"


def _name(bits: str) -> str:
    return mask_name(parse_mask(bits))


PAPER_STEPS = 20 * 60000 // 100  # SGD steps per cell in the paper's grid


def _short_training_note(summary: dict) -> list[str]:
    tr = summary["config"]["training"]
    steps = summary["epochs"] * math.ceil(tr["train_subset"] / tr["batch_size"])
    if steps >= PAPER_STEPS:
        return []
    return [f"- **Short training**: {steps} SGD steps per cell against the paper's {PAPER_STEPS} (20 epochs of "
            "60000 images). A ranking this early measures how fast each mask starts to learn and need not "
            "match the converged one; `--preset paper` (a GPU job) tests the claim itself."]


def _asked_groups(config: dict, present) -> list[tuple[int, int]]:
    """The (N, seed) groups a folder was asked to train: its config's grid, sliced by its shard, plus
    any ``present`` in its results (a shard of a 10-size grid holds 2 groups, not sizes x seeds)."""
    groups = {tuple(g) for g in present}
    grid = config.get("grid")
    if grid:
        asked = build_groups([parse_mask(m) for m in grid["masks"]], grid["sizes"], grid["seeds"])
        if config.get("shard"):
            asked = shard_groups(asked, *parse_shard(config["shard"]))
        groups |= {(g.input_size, g.seed) for g in asked}
    return sorted(groups)


def _markdown(summary: dict, out_dir: Path) -> str:
    cfg, tr = summary["config"], summary["config"]["training"]
    sizes, seeds, masks = summary["sizes"], summary["seeds"], summary["masks"]
    groups = _asked_groups(cfg, summary["groups_started"])
    asked_masks = set(masks) | set((cfg.get("grid") or {}).get("masks", []))
    expected = len(asked_masks) * len(groups)
    group_sizes, group_seeds = sorted({n for n, _ in groups}), sorted({s for _, s in groups})
    if len(groups) == len(group_sizes) * len(group_seeds):
        grid_text = (f"{len(asked_masks)} masks x N = {', '.join(map(str, group_sizes))} "
                     f"x seeds {', '.join(map(str, group_seeds))}")
    else:  # a shard: name its groups
        grid_text = (f"{len(asked_masks)} masks x the (N, seed) groups "
                     f"{', '.join(f'N{n}-seed{s}' for n, s in groups)}"
                     + (f" (shard {cfg['shard']})" if cfg.get("shard") else ""))
    train_text = "all 60000" if tr["train_subset"] == 60000 else f"the first {tr['train_subset']}"
    val_text = "all 10000" if tr["val_subset"] == 10000 else f"the first {tr['val_subset']}"
    resize_text = {"imresize": "`imresize(img, [N N])`, MATLAB bicubic (antialiased when shrinking): our "
                               "assumption, the paper does not say how images were brought to N x N",
                   "bilinear": "bilinear `imresize`", "nearest": "nearest-neighbour `imresize`",
                   "pad": "zero padding, digit centred"}[tr["resize"]]
    conv = "; ".join(f"N={n}: {', '.join(v)}" for n, v in summary["conv_impls"].items())
    L = [f"# ReLU placement study: {out_dir.name}", "",
         "Does `C CR C CR` (ReLU after conv2 and conv4) give the lowest error of the 16 ReLU placements of "
         "MatConvNet's MNIST LeNet, as the paper claims? Mask names read conv1 to conv4 (`CR` = conv + ReLU); "
         "bits likewise (`0101` = `C CR C CR`); the stock MatConvNet net is `C C CR C` (`0010`).", "",
         "## Setup", "",
         f"- Grid: {grid_text} "
         f"= {expected} cells, {summary['epochs']} epochs each; finished {summary['cells_finished']}/{expected} "
         f"cells ({summary['rows']} rows in `results.csv`)"
         + (f", preset `{cfg['preset']}`" if cfg.get("preset") else "") + ".",
         f"- Data: {tr['dataset']}, {train_text} training images, {val_text} validation (t10k) images; "
         f"digits brought to N x N by {resize_text}; the mean image of all 60000 training images "
         "(at N x N) subtracted, as `cnn_mnist` does.",
         f"- Training: `cnn_train`'s SGD, learning rate {tr['learning_rate']}, batch {tr['batch_size']}, "
         f"momentum {tr['momentum']}, weight decay {tr['weight_decay']}, {tr['precision']} arithmetic.",
         "- Paired design: for a seed s, every mask and every N starts from the same weights "
         "(`cnn_mnist_init(seed=s)`) and sees the same batches (`default_order(epoch, train, s)`), so masks "
         "are compared from identical starts on identical data; the (N, seed) pairs are the units of the "
         "paired tests below."
         + (" Pairs at different N of one seed share those weights and batches, so they are not independent "
            "replicates: the p-values below are optimistic (the per-N tables show where an effect holds)."
            if len(sizes) > 1 else ""),
         f"- Device: {', '.join(summary['devices'])}; the masks of a (N, seed) were trained together as one "
         f"fused network ({'/'.join(map(str, summary['fused_models']))} models; conv implementation {conv})"
         + (f"; {summary['stopped_cells']} cell(s) stopped training once their conv4 was NaN for good "
            "(class scores NaN, or 0 behind a ReLU), "
            "their remaining epochs reported as the last (what training on reports), and the others of "
            "their group trained on as a smaller fused network. " if summary.get("stopped_cells") else ". ")
         + f"Training + validation time, summed over the (N, seed) groups: {summary['training_seconds']:.0f} s"
         + (" (groups ran side by side in lanes, so the wall clock was shorter)."
            if any("lanes" in c for v in summary["conv_impls"].values() for c in v) else "."),
         *_short_training_note(summary),
         f"- Error measures: **image-level error** = {MEASURES['val_image_err'][1]}; **top1err** = "
         f"{MEASURES['val_top1err'][1]}. Both are final-epoch validation errors, in %.", ""]
    for measure, (label, _) in MEASURES.items():
        s = summary["measures"][measure]
        L += [f"## Final validation {label} (%, mean ± 95% CI over seeds, t distribution)", "",
              "| mask | bits | " + " | ".join(f"N={n}" for n in sizes) + " | mean | rank |",
              "|---|---|" + "---:|" * len(sizes) + "---:|---:|"]
        overall = {e["mask_bits"]: e for e in s["overall"]}
        for m in masks:
            cells = []
            for n in sizes:
                c = s["table"][m][str(n)]
                text = _pct(c["mean"], c["ci95"], c["n"])
                cells.append(f"**{text}**" if m in s["best_per_size"].get(str(n), []) else text)
            e = overall[m]
            name = f"**{_name(m)}**" if m in (PAPER_BEST, STOCK) else _name(m)
            mean = "" if math.isnan(e["mean"]) else f"{e['mean'] * 100:.2f}"
            L.append(f"| {name} | {m} | " + " | ".join(cells) + f" | {mean} | {e['rank'] or ''} |")
        L += ["", f"Bold: the lowest mean at that N. `mean`/`rank`: over the {s['pairs']} (N, seed) pairs "
              "every mask finished.", ""]
    L += ["## Best mask", "", "| N | " + " | ".join(label for label, _ in MEASURES.values()) + " |",
          "|---|" + "---|" * len(MEASURES)]
    for n in sizes:
        L.append(f"| {n} | " + " | ".join(
            " = ".join(f"`{_name(b)}`" for b in summary["measures"][k]["best_per_size"].get(str(n), []))
            for k in MEASURES) + " |")
    firsts = [summary["measures"][k]["overall"][0] for k in MEASURES]
    L.append("| **overall** | " + " | ".join(f"`{e['mask']}`" if e["rank"] else "-" for e in firsts) + " |")
    for label_bits, label in ((PAPER_BEST, "C CR C CR"), (STOCK, "C C CR C")):
        if label_bits in masks:
            L.append(f"| rank of `{label}` | " + " | ".join(
                f"{next(e['rank'] for e in summary['measures'][k]['overall'] if e['mask_bits'] == label_bits) or '-'}"
                f"/{len(masks)}" for k in MEASURES) + " |")
    L += ["", "## Best vs runner-up (paired over (N, seed))", "",
          "| measure | best | runner-up | pairs | mean diff (pp) | best lower in | paired t p | Wilcoxon p |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    for k, (label, _) in MEASURES.items():
        t = summary["measures"][k].get("best_vs_runner_up")
        if t:
            L.append(f"| {label} | `{_name(t['best'])}` | `{_name(t['runner_up'])}` | {t['n']} | "
                     f"{t['mean_diff'] * 100:+.3f} | {t['a_better']}/{t['n']} | {format_p(t['t_p'])} | "
                     f"{format_p(t['wilcoxon_p']) if t['wilcoxon_p'] is not None else 'n/a (< 6 non-zero differences)'} |")
    L += ["", "Two-sided tests on the per-(N, seed) differences (`scipy.stats.ttest_rel`, `scipy.stats.wilcoxon`). "
          "The best and runner-up are chosen by the same data, so these p-values are optimistic; differences "
          "of one or two validation images are within noise."]
    L += _effects_markdown(summary)
    L += ["", f"## Convergence: epochs until the validation image-level error is <= {summary['threshold']:.1%}", "",
          "| mask | bits | cells reaching it | mean epochs (those cells) | slowest |", "|---|---|---:|---:|---:|"]
    for m in masks:
        c = summary["convergence"][m]
        mean_epochs = "" if c["mean_epochs"] is None else f"{c['mean_epochs']:.1f}"
        slowest = "" if c["max_epochs"] is None else str(c["max_epochs"])
        L.append(f"| {_name(m)} | {m} | {c['reached']}/{c['cells']} | {mean_epochs} | {slowest} |")
    L += ["", "## Dead ReLUs (final epoch; % of channels whose ReLU output is 0 on every validation image, "
          "mean over N and seeds; blank = no ReLU there; cells whose validation loss is NaN are left out, "
          "their count in `diverged`)", "",
          "| mask | bits | conv1 | conv2 | conv3 | conv4 | diverged |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in masks:
        d = summary["dead_relu"][m]
        diverged = d.get("diverged_cells", 0)
        cells = (("n/a" if diverged and parse_mask(m)[i - 1] else "") if d[f"conv{i}"] is None
                 else f"{d[f'conv{i}'] * 100:.1f}" for i in range(1, 5))
        L.append(f"| {_name(m)} | {m} | " + " | ".join(cells) + f" | {diverged or ''} |")
    L += ["", "Plots: `heatmap.png` (final error per mask and N, both measures), `curves.png` (validation "
          "image-level error per epoch, mean over seeds).", "", "## Verdict", ""]
    L += [f"- {line}" for line in summary["verdict"]]
    if summary["caveat"]:
        L += ["", summary["caveat"]]
    return "\n".join(L) + "\n"


def _effects_markdown(summary: dict) -> list[str]:
    sizes = summary["sizes"]
    L = ["", "## What each ReLU does (the 16 masks as a 2^4 factorial design)", "",
         "Error with a ReLU after conv k minus the error of the same mask without it (pp), averaged over the "
         "matched pairs of masks that differ only there (8 in the full grid) for each (N, seed) pair; `mean` "
         "± 95% CI and the one-sample t-test are over the (N, seed) pairs, `lower / higher` counts the single "
         "mask comparisons. Negative: the ReLU lowers the error."]
    shown = 0
    for measure, (label, _) in MEASURES.items():
        effects = [e for e in summary["measures"][measure]["relu_effects"] if e["mask_pairs"] and e["n"]]
        if not effects:
            continue
        shown += 1
        L += ["", f"**{label}**", "",
              "| ReLU after | mask pairs | " + " | ".join(f"N={n}" for n in sizes)
              + " | mean ± 95% CI | lower / higher | t-test p |",
              "|---|---:|" + "---:|" * len(sizes) + "---:|---:|---:|"]
        for e in effects:
            cells = [f"{e['per_size'][str(n)] * 100:+.2f}" if str(n) in e["per_size"] else "" for n in sizes]
            ci = "" if math.isnan(e["ci95"]) else f" ± {e['ci95'] * 100:.2f}"
            L.append(f"| conv{e['conv']} | {e['mask_pairs']} | " + " | ".join(cells)
                     + f" | {e['mean_diff'] * 100:+.2f}{ci} | {e['lower_with_relu']} / {e['higher_with_relu']} | "
                     f"{format_p(e['t_p'])} |")
    if not shown:
        L += ["", "n/a: no two finished masks differ in exactly one ReLU (run more masks, e.g. --masks all)."]
    return L


def _plot_heatmap(summary: dict, file) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks, sizes = summary["masks"], summary["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.4 * len(sizes), 1.5 + 0.36 * len(masks)), squeeze=False)
    for ax, (measure, (label, _)) in zip(axes[0], MEASURES.items()):
        s = summary["measures"][measure]
        grid = np.array([[s["table"][m][str(n)]["mean"] * 100 for n in sizes] for m in masks], dtype=float)
        # colour on each column's own scale: the question is which mask is best at each N,
        # and top1err grows with N (more output positions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low, high = np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)
            shade = (grid - low) / np.where(high > low, high - low, 1.0)
        ax.imshow(np.ma.masked_invalid(shade), cmap="viridis_r", aspect="auto", vmin=0, vmax=1)
        for i, m in enumerate(masks):
            for j, n in enumerate(sizes):
                if np.isfinite(grid[i, j]):
                    best = m in s["best_per_size"].get(str(n), [])
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            fontweight="bold" if best else "normal",
                            color="white" if shade[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(sizes)), [str(n) for n in sizes])
        ax.set_yticks(range(len(masks)), [f"{_name(m)}  {m}" for m in masks], fontsize=8)
        for tick, m in zip(ax.get_yticklabels(), masks):
            if m == PAPER_BEST:
                tick.set_color("tab:red")
            elif m == STOCK:
                tick.set_color("tab:blue")
        ax.set_xlabel("input size N")
        ax.set_title(f"final validation {label} (%)", fontsize=9)
    fig.suptitle(f"mean over {len(summary['seeds'])} seed(s); bold = best at that N; "
                 "colour: each column's own scale, light = low", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def _plot_curves(summary: dict, file) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    sizes, masks, epochs = summary["sizes"], summary["masks"], summary["epochs"]
    cols = min(len(sizes), 5)
    rows = math.ceil(len(sizes) / cols)
    legend_inches = 1.9  # a column right of the panels: over them it hid the title of a one-N grid
    width = 3.2 * cols + legend_inches
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.8 * rows), squeeze=False, sharey=True)
    x = np.arange(1, epochs + 1)
    for ax, n in zip(axes.flat, sizes):
        for m in masks:
            y = np.array([np.nan if v is None else v * 100 for v in summary["curves"][m][str(n)]])
            if m == PAPER_BEST:
                ax.plot(x, y, "-o", color="tab:red", lw=2.2, ms=3, label="C CR C CR", zorder=3)
            elif m == STOCK:
                ax.plot(x, y, "-o", color="tab:blue", lw=2.2, ms=3, label="C C CR C (stock)", zorder=3)
            else:
                ax.plot(x, y, "-", marker=".", color="0.6", lw=0.8, ms=3, label="other masks", zorder=1)
        ax.set_title(f"N = {n}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(sizes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("val image-level error (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="center right", fontsize=8)
    fig.suptitle(f"validation image-level error per epoch, mean over {len(summary['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_inches / width, 0.95))
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def write_summary(out_dir, summary: dict) -> None:
    """``summary.json``, ``summary.md``, ``heatmap.png``, ``curves.png`` in ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "summary.json", json.dumps(_plain_json(summary), indent=1) + "\n")
    atomic_write_text(out_dir / "summary.md", _markdown(summary, out_dir))
    for name, plot in (("heatmap.png", _plot_heatmap), ("curves.png", _plot_curves)):
        atomic_write(out_dir / name, lambda f, plot=plot: plot(summary, f))


def _plain_json(value):
    """nan -> null (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
