"""``python -m matconvnet_port.search``: the grid runner, its files, resuming, sharding, statistics.

A tiny grid (4 masks x N in {28, 32} x 1 seed x 2 epochs, 200 training /
100 validation images) runs through the real entry point
(:func:`matconvnet_port.search.cli.main`, what ``__main__`` calls). The N x N
data are cached across runs (the same arrays every run would build) and the
time estimate is skipped; nothing else is replaced.
"""

import contextlib
import functools
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from matconvnet_port.fused import FusedTrainer
from matconvnet_port.models import ALL_MASKS, mask_bits, mask_name, parse_mask
from matconvnet_port.search import cli, grid, runner
from matconvnet_port.search.grid import (PAPER_SIZES, Settings, UsageError, build_groups, parse_masks, parse_shard,
                                         shard_groups)
from matconvnet_port.search.results import COLUMNS, RUN_COLUMNS, read_results
from matconvnet_port.search.summary import mean_ci, paired_test, summarise, verdict_lines

MASKS = ["0101", "0010", "1111", "0000"]
TINY = ["--masks", *MASKS, "--sizes", "28", "32", "--seeds", "1", "--epochs", "2",
        "--train-subset", "200", "--val-subset", "100", "--conv", "grouped"]
GROUP_EPOCHS = 2 * 2  # groups (N = 28, 32; seed 0) x epochs

_cached_images = functools.lru_cache(maxsize=None)(runner.load_images.__wrapped__)


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(runner, "load_images", _cached_images)
    monkeypatch.setattr(runner, "estimate_seconds", lambda ctx, work: (0.0, "skipped in tests"))


def run_cli(*argv):
    """(exit code, stdout, stderr) of the command in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run_cli_once(*argv):
    """run_cli for a module-scoped fixture (the function-scoped _fast is not active there): stdout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "load_images", _cached_images)
        mp.setattr(runner, "estimate_seconds", lambda ctx, work: (0.0, "skipped in tests"))
        code, stdout, stderr = run_cli(*argv)
    assert code == 0, stderr
    return stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny grid run once, uninterrupted: (folder, stdout)."""
    out = tmp_path_factory.mktemp("search") / "ref"
    return out, run_cli_once(*TINY, "--out", out, "--save-nets")


def numbers(rows):
    """Rows keyed by cell and epoch, without the columns that describe the run (time, device)."""
    return {(r["mask_bits"], r["input_size"], r["seed"], r["epoch"]):
            {k: v for k, v in r.items() if k not in RUN_COLUMNS} for r in rows}


def reference_numbers(reference):
    return numbers(read_results(reference[0] / "results.csv"))


def same_numbers(a, b):
    def eq(x, y):
        return x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
    return a.keys() == b.keys() and all(eq(a[k][c], b[k][c]) for k in a for c in a[k])


def agree_after_shrinking(a, b, healthy="1111", rel=1e-5):
    """``a`` and ``b`` the same cells, the stopped (diverged) models' rows identical, the ``healthy``
    model's to ``rel``: once the diverged models leave, it trains on in a smaller fused network, whose
    convolutions may round differently -- oneDNN's kernels depend on the number of groups and on the
    layout of a model's slice (on an AVX-512 CPU its class scores move by ~1e-9, its objective by ~1e-7
    relative after a few steps; on AVX2 CPUs the numbers were identical)."""
    def close(x, y):
        if isinstance(x, float) and isinstance(y, float):
            return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rel, abs_tol=1e-12)
        return x == y
    if a.keys() != b.keys():
        return False
    exact = {k: v for k, v in a.items() if k[0] != healthy}
    return (same_numbers(exact, {k: b[k] for k in exact})
            and all(close(a[k][c], b[k][c]) for k in a if k[0] == healthy for c in a[k]))


class CountingTrainEpoch:
    """Wraps FusedTrainer.train_epoch_steps (what the runner trains an epoch with): counts calls
    (and models), optionally interrupts one."""

    def __init__(self, monkeypatch, interrupt_at=None):
        self.calls, self.models, self.interrupt_at = 0, [], interrupt_at
        original = FusedTrainer.train_epoch_steps

        def wrapped(trainer, *args, **kwargs):
            self.calls += 1
            if self.calls == self.interrupt_at:
                raise KeyboardInterrupt
            self.models.append(trainer.model.num_models)
            return original(trainer, *args, **kwargs)
        monkeypatch.setattr(FusedTrainer, "train_epoch_steps", wrapped)


# -- the whole pipeline ---------------------------------------------------------------------

def test_tiny_grid_writes_every_output(reference):
    out, stdout = reference
    rows = read_results(out / "results.csv")
    with open(out / "results.csv") as f:
        assert f.readline().strip().split(",") == COLUMNS
    assert len(rows) == len(MASKS) * 2 * 1 * 2  # cells x epochs
    assert len({(r["mask_bits"], r["input_size"], r["seed"], r["epoch"]) for r in rows}) == len(rows)
    assert {r["mask_bits"] for r in rows} == set(MASKS)
    assert {r["input_size"] for r in rows} == {28, 32} and {r["epoch"] for r in rows} == {1, 2}
    for r in rows:
        bits = parse_mask(r["mask_bits"])
        assert r["mask"] == mask_name(bits) and mask_bits(parse_mask(r["mask"])) == r["mask_bits"]
        for i in range(4):  # dead-ReLU fraction exactly where that conv has a ReLU
            value = r[f"dead_relu_conv{i + 1}"]
            assert math.isnan(value) != bool(bits[i]), (r["mask"], i)
            assert math.isnan(value) or 0 <= value <= 1
        assert 0 <= r["val_image_err"] <= 1 and r["train_objective"] > 0
        positions = (r["input_size"] // 4 - 6) ** 2  # MatConvNet counts errors at every output position
        assert 0 <= r["val_top1err"] <= positions and r["val_top5err"] <= r["val_top1err"]
        assert r["fused_models"] == len(MASKS) and r["device"] == "cpu"
        assert r["conv_impl"].startswith("nhwc grouped")  # --conv grouped in the CPU's storage order
        assert r["seconds"] > 0

    for name in ("heatmap.png", "curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import matplotlib.pyplot as plt
        assert plt.imread(out / name).ndim == 3

    md = (out / "summary.md").read_text()
    assert "## Final validation image-level error" in md and "## Final validation MatConvNet top1err" in md
    for bits in MASKS:  # a table row per mask (C CR C CR and the stock mask in bold)
        name = mask_name(parse_mask(bits))
        assert f"| {name} | {bits} |" in md or f"| **{name}** | {bits} |" in md
    assert "(n=1)" in md  # one seed: no confidence interval
    assert "## Verdict" in md and "[image-level error]" in md and "[MatConvNet top1err]" in md
    assert "Paired design" in md and "imresize" in md

    summary = json.loads((out / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"summary.json is not strict JSON: {c}"))
    assert set(summary["measures"]) == {"val_image_err", "val_top1err"}
    assert summary["cells_finished"] == 8 and len(summary["verdict"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["epochs"] == 2 and config["grid"]["masks"] == ["0000", "0010", "0101", "1111"]
    assert "verdict" in stdout and "[image-level error]" in stdout and "[MatConvNet top1err]" in stdout


def test_saved_nets_reproduce_the_recorded_validation_errors(reference):
    # the fused model stores images and filters transposed; the saved MatConvNet net must not be
    import torch

    from matconvnet_port.netio import load_net
    from matconvnet_port.train import error_multiclass

    out = reference[0]
    assert len(list((out / "nets").glob("*.mat"))) == len(MASKS) * 2
    rows = {(r["mask_bits"], r["input_size"]): r for r in read_results(out / "results.csv") if r["epoch"] == 2}
    for bits, n in (("0101", 32), ("1111", 28)):
        net = load_net(out / "nets" / f"net-N{n}-seed0-{bits}.mat")
        assert [layer["type"] for layer in net.layers].count("relu") == bits.count("1")
        assert net.meta["inputSize"].ravel().tolist() == [n, n, 1]
        images, labels = runner.load_images(n, "imresize", "mnist", None, 200, 100)
        x, y = torch.from_numpy(images[200:]), torch.from_numpy(labels[200:])
        with torch.no_grad():
            scores = net.to_torch()(x)
        top1 = float(error_multiclass(scores, y)[0]) / 100
        image_err = float((scores.sum(dim=(2, 3)).argmax(1) + 1 != y).double().mean())
        # same maths, differently blocked float32 sums: at most a near-tie may flip
        assert abs(top1 - rows[(bits, n)]["val_top1err"]) <= 0.01 + 1e-12
        assert abs(image_err - rows[(bits, n)]["val_image_err"]) <= 0.01 + 1e-12


def test_rerun_of_a_finished_grid_trains_nothing(reference, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    counter = CountingTrainEpoch(monkeypatch)
    code, _, _ = run_cli(*TINY, "--out", out)
    assert code == 0 and counter.calls == 0
    assert same_numbers(numbers(read_results(out / "results.csv")), reference_numbers(reference))


@pytest.mark.parametrize("interrupt_at", [2, 3])  # in the 2nd epoch of group 1; in the 1st of group 2
def test_interrupt_then_rerun_recomputes_nothing_finished(reference, tmp_path, monkeypatch, interrupt_at):
    out = tmp_path / "run"
    counter = CountingTrainEpoch(monkeypatch, interrupt_at=interrupt_at)
    code, _, stderr = run_cli(*TINY, "--out", out)
    assert code == 130 and "resume with:" in stderr
    finished = interrupt_at - 1  # group-epochs completed before the interrupt
    partial = read_results(out / "results.csv")
    assert len(partial) == finished * len(MASKS)
    assert not list(out.rglob("*.tmp"))

    counter = CountingTrainEpoch(monkeypatch)
    code, _, _ = run_cli(*TINY, "--out", out)
    assert code == 0
    assert counter.calls == GROUP_EPOCHS - finished  # no finished group-epoch trained twice
    rows = read_results(out / "results.csv")
    assert len(rows) == len(read_results(reference[0] / "results.csv"))
    # resuming restores the weights and momenta exactly: the same numbers bit for bit
    assert same_numbers(numbers(rows), numbers(read_results(reference[0] / "results.csv")))


def test_lanes_train_the_same_numbers(reference, tmp_path):
    out = tmp_path / "lanes"
    code, stdout, stderr = run_cli(*TINY, "--lanes", "2", "--out", out)
    assert code == 0, stderr
    rows = read_results(out / "results.csv")
    assert same_numbers(numbers(rows), reference_numbers(reference))
    assert all(r["conv_impl"].endswith(", 2 lanes") for r in rows)  # seconds of a shared device


@pytest.mark.parametrize("interrupt_at", [2, 3, 4])
def test_lanes_interrupted_then_rerun_recompute_nothing_finished(reference, tmp_path, monkeypatch, interrupt_at):
    out = tmp_path / "run"
    CountingTrainEpoch(monkeypatch, interrupt_at=interrupt_at)
    code, _, stderr = run_cli(*TINY, "--lanes", "2", "--out", out)
    assert code == 130 and "resume with:" in stderr
    partial = read_results(out / "results.csv")
    finished = len(partial) // len(MASKS)  # group-epochs both lanes completed before the interrupt
    assert len(partial) == finished * len(MASKS) and not list(out.rglob("*.tmp"))

    counter = CountingTrainEpoch(monkeypatch)
    code, _, _ = run_cli(*TINY, "--lanes", "2", "--out", out)
    assert code == 0 and counter.calls == GROUP_EPOCHS - finished
    assert same_numbers(numbers(read_results(out / "results.csv")), reference_numbers(reference))


# A learning rate 50x the paper's drives three of the four masks to NaN class scores by epoch 3 at N = 40
DIVERGING = ["--masks", *MASKS, "--sizes", "40", "--seeds", "1", "--epochs", "8", "--train-subset", "200",
             "--val-subset", "100", "--learning-rate", "0.02", "--conv", "grouped"]


@pytest.fixture(scope="module")
def diverging(tmp_path_factory):
    """DIVERGING trained through every epoch (--train-diverged): the rows to match."""
    out = tmp_path_factory.mktemp("diverging") / "full"
    run_cli_once(*DIVERGING, "--train-diverged", "--out", out)
    rows = read_results(out / "results.csv")
    # the premise: three models diverge, one does not. A diverged model's scores are NaN, or 0 behind a
    # ReLU after conv4 (MATLAB's max(NaN, 0)): then its objective is log(10) at each of the 16 locations
    assert {r["mask"] for r in rows if r["epoch"] == 8 and (math.isnan(r["train_objective"]) or
                                                            r["train_objective"] == pytest.approx(16 * math.log(10)))} == \
        {"C CR C CR", "C C CR C", "C C C C"}
    return rows


@pytest.mark.parametrize("lanes", ["1", "2"])  # 2: the trainer rebuilt inside a lane's step generator
def test_diverged_models_stop_training_and_report_what_training_them_reports(diverging, tmp_path, monkeypatch,
                                                                              lanes):
    monkeypatch.setattr(runner, "SETTLE_STEPS", 2)  # the tiny grid has 2 steps an epoch
    counter = CountingTrainEpoch(monkeypatch)
    code, stdout, stderr = run_cli(*DIVERGING, "--out", tmp_path / "run", "--save-nets", "--lanes", lanes)
    assert code == 0, stderr
    assert "3 diverged model(s) finish early" in stdout
    # NaN class scores from epoch 3 on: epochs 4 and 5 alike, then only the healthy model trains
    assert counter.models == [4, 4, 4, 4, 4, 1, 1, 1]
    rows = read_results(tmp_path / "run" / "results.csv")
    assert agree_after_shrinking(numbers(rows), numbers(diverging))
    assert all(r["seconds"] == 0 for r in rows if r["epoch"] > 5 and r["mask"] != "CR CR CR CR")
    assert all(r["conv_impl"].endswith(", 2 lanes") == (lanes == "2") for r in rows)
    assert len(list((tmp_path / "run" / "nets").glob("*.mat"))) == len(MASKS)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "3 cell(s) stopped training once their conv4 was NaN for good" in summary


@pytest.mark.parametrize("interrupt_at", [5, 7])  # before and after the diverged models finish
def test_a_run_with_finished_diverged_models_resumes(diverging, tmp_path, monkeypatch, interrupt_at):
    monkeypatch.setattr(runner, "SETTLE_STEPS", 2)
    out = tmp_path / "run"
    CountingTrainEpoch(monkeypatch, interrupt_at=interrupt_at)
    assert run_cli(*DIVERGING, "--out", out)[0] == 130
    counter = CountingTrainEpoch(monkeypatch)
    assert run_cli(*DIVERGING, "--out", out)[0] == 0
    # nothing finished trains again; resumed after epoch 4, the diverged models' NaN since epoch 4 counts
    # from there (their past is not re-read), so they finish after epoch 6
    assert counter.models == ([4, 4, 1, 1] if interrupt_at == 5 else [1, 1])
    assert agree_after_shrinking(numbers(read_results(out / "results.csv")), numbers(diverging))


def test_a_diverged_model_finishes_only_after_two_alike_epochs_of_nan_scores():
    nan = float("nan")

    def row(epoch, err):
        return {"mask": "C C C C", "epoch": epoch, **dict.fromkeys(runner._STATISTICS, nan), "val_image_err": err}
    mask = (0, 0, 0, 0)
    rows = [row(3, 0.9), row(4, 0.9), row(5, 0.8)]
    assert runner._settled(rows, {mask: 2}, 4, 600) == [mask]  # NaN scores through epochs 3 and 4, alike
    assert runner._settled(rows, {mask: 3}, 4, 600) == []      # epoch 3 began with finite scores
    assert runner._settled(rows, {mask: 2}, 5, 600) == []      # epochs 4 and 5 differ
    assert runner._settled(rows, {}, 4, 600) == []
    assert runner._settled(rows, {mask: 2}, 4, 20) == []       # 20 NaN steps before epoch 4: too few


def test_background_writer_keeps_order_and_reports_failures():
    import threading
    import time

    writer, done = runner.BackgroundWriter(), []

    def slow(i):
        time.sleep(0.01 * (3 - i))  # later submissions finish faster if run out of order
        done.append((i, threading.current_thread().name))

    for i in range(3):
        writer.submit(slow, i)
    writer.flush()
    assert [i for i, _ in done] == [0, 1, 2] and all(name.startswith("search-writer") for _, name in done)

    def fail():
        raise OSError("disk full")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.close()  # waits, then raises the write's error


@pytest.mark.parametrize("lanes", ["1", "2"])
def test_images_are_loaded_ahead_on_the_loader_thread_once_per_size(reference, tmp_path, monkeypatch, lanes):
    import threading

    loads = []

    def recording(input_size, *args):
        loads.append((input_size, threading.current_thread().name))
        return _cached_images(input_size, *args)

    monkeypatch.setattr(runner, "load_images", recording)
    code, _, stderr = run_cli(*TINY, "--lanes", lanes, "--out", tmp_path / "run")
    assert code == 0, stderr
    assert sorted(n for n, _ in loads) == [28, 32]
    assert all(name.startswith("search-loader") for _, name in loads)
    assert same_numbers(numbers(read_results(tmp_path / "run" / "results.csv")), reference_numbers(reference))


@pytest.mark.parametrize("bits", ["0101", "1111"])
def test_cell_alone_equals_cell_in_fused_group(reference, tmp_path, bits):
    # Alone, conv2..4 are ordinary convolutions; fused, grouped ones (4 groups). The maths is the same
    # but the kernels block the sums differently: float32 rounding of ~1e-7 (measured 7e-8 after 4 SGD
    # steps), hence rtol 1e-5 on objectives; an error count may flip only on a near-tie (<= 1 image).
    code, _, _ = run_cli(*TINY[:1], bits, *TINY[1 + len(MASKS):], "--out", tmp_path / "alone")
    assert code == 0
    alone = numbers(read_results(tmp_path / "alone" / "results.csv"))
    fused = {k: v for k, v in numbers(read_results(reference[0] / "results.csv")).items() if k[0] == bits}
    assert alone.keys() == fused.keys() and len(alone) == 4
    for key in alone:
        for column in ("train_objective", "val_objective"):
            assert alone[key][column] == pytest.approx(fused[key][column], rel=1e-5), (key, column)
        for column in ("train_top1err", "train_top5err", "val_top1err", "val_top5err", "val_image_err"):
            assert abs(alone[key][column] - fused[key][column]) <= 1 / 100 + 1e-12, (key, column)


def test_shards_merged_equal_the_unsharded_run(reference, tmp_path):
    shards = []
    for i in (1, 2):
        folder = tmp_path / f"shard{i}"
        code, _, stderr = run_cli(*TINY, "--shard", f"{i}/2", "--out", folder)
        assert code == 0, stderr
        shards.append(read_results(folder / "results.csv"))
    assert all(shards) and not {r["input_size"] for r in shards[0]} & {r["input_size"] for r in shards[1]}
    code, stdout, stderr = run_cli("merge", tmp_path / "shard1", tmp_path / "shard2", "--out", tmp_path / "merged")
    assert code == 0, stderr
    merged = read_results(tmp_path / "merged" / "results.csv")
    assert same_numbers(numbers(merged), numbers(read_results(reference[0] / "results.csv")))
    for name in ("summary.md", "summary.json", "heatmap.png", "curves.png"):
        assert (tmp_path / "merged" / name).is_file()
    assert "[image-level error]" in stdout
    # a cell in several folders (shards re-split after the grid grew) is counted once, from the first
    code, _, stderr = run_cli("merge", tmp_path / "shard1", reference[0], "--out", tmp_path / "m2")
    assert code == 0 and "note: merge: 4 cells are in more than one folder" in stderr, stderr
    assert same_numbers(numbers(read_results(tmp_path / "m2" / "results.csv")), numbers(merged))
    # ... from the folder with the most epochs of it: an unfinished copy listed first does not win
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "shard1", partial, ignore=shutil.ignore_patterns("groups"))
    lines = (partial / "results.csv").read_text().splitlines()
    epoch = lines[0].split(",").index("epoch")
    (partial / "results.csv").write_text("\n".join([lines[0]] + [x for x in lines[1:] if x.split(",")[epoch] == "1"]))
    code, _, stderr = run_cli("merge", partial, reference[0], "--out", tmp_path / "m4")
    assert code == 0 and same_numbers(numbers(read_results(tmp_path / "m4" / "results.csv")), numbers(merged))
    assert "at the last epoch all copies reached, their image-level errors differ by up to 0.00%" in stderr
    code, _, stderr = run_cli("merge", tmp_path / "shard1", tmp_path / "shard1", "--out", tmp_path / "m3")
    assert code == 2 and "twice" in stderr


def test_a_folder_whose_results_have_no_checkpoints_is_refused_not_emptied(reference, tmp_path, monkeypatch):
    """results.csv is regenerated from groups/: a merged folder, or a run folder copied without groups/
    (as runs/paper-n32-cpu is committed), would lose its rows to a run there."""
    merged = tmp_path / "merged"
    assert run_cli("merge", reference[0], "--out", merged)[0] == 0
    copied = tmp_path / "copied"
    shutil.copytree(reference[0], copied, ignore=shutil.ignore_patterns("groups"))
    counter = CountingTrainEpoch(monkeypatch)
    for folder, words in ((merged, "merged from other folders"), (copied, "copied without its groups/")):
        before = (folder / "results.csv").read_text()
        argv = list(TINY)
        argv[argv.index("--seeds") + 1] = "2"  # extend it
        code, _, stderr = run_cli(*argv, "--out", folder)
        assert code == 2 and "with no checkpoint in groups/" in stderr and words in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        assert (folder / "results.csv").read_text() == before
    assert counter.calls == 0


def test_added_masks_extend_the_grid_and_train_only_new_cells(reference, tmp_path, monkeypatch):
    out = tmp_path / "grown"
    shutil.copytree(reference[0], out)
    counter = CountingTrainEpoch(monkeypatch)
    code, _, _ = run_cli(*TINY[:1], *MASKS, "0110", *TINY[1 + len(MASKS):], "--out", out)
    assert code == 0
    assert counter.calls == GROUP_EPOCHS and set(counter.models) == {1}  # only C CR CR C, alone
    rows = read_results(out / "results.csv")
    assert len(rows) == 5 * 2 * 2
    old = numbers(read_results(reference[0] / "results.csv"))
    assert same_numbers({k: v for k, v in numbers(rows).items() if k in old}, old)
    assert json.loads((out / "config.json").read_text())["grid"]["masks"] == ["0000", "0010", "0110", "0101", "1111"]


def test_other_training_settings_in_the_same_folder_are_refused(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    for option, value, name in (("--epochs", "3", "epochs"), ("--train-subset", "300", "train_subset"),
                                ("--learning-rate", "0.01", "learning_rate"), ("--resize", "pad", "resize")):
        argv = list(TINY)
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
        code, _, stderr = run_cli(*argv, "--out", out)
        assert code == 2 and name in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert same_numbers(numbers(read_results(out / "results.csv")), reference_numbers(reference))


@pytest.mark.parametrize("argv, message", [
    (["--masks", "C CR X CR"], "unknown mask"),
    (["--masks", "C", "CR", "C"], "incomplete mask"),
    (["--masks", "01012"], "unknown mask"),
    (["--sizes", "30"], "divisible by 4"),
    (["--sizes", "24"], ">= 28"),
    (["--sizes", "abc"], "not an integer"),
    (["--data-dir", "/no/such/folder"], "no such folder"),
    (["--shard", "3/2"], "--shard"),
    (["--shard", "0/2"], "--shard"),
    (["--shard", "half"], "--shard"),
    (["--epochs", "0"], "--epochs"),
    (["--train-subset", "60001"], "--train-subset"),
    (["--device", "tpu"], "--device"),
    (["--device", "gpu"], "unknown device 'gpu': use auto, cpu, cuda or cuda:K"),
    (["--conv", "fast"], "--conv"),
    (["--conv", "gemm,gemm"], "--conv"),
    (["--lanes", "0"], "--lanes"),
    (["--memory-format", "nwhc"], "invalid choice"),
    (["--preset", "huge"], "invalid choice"),
    (["merge", "/no/such/folder", "--out", "/tmp/x"], "no such folder"),
    (["summary", "/no/such/folder"], "no config.json"),
    (["--threshold", "2"], "--threshold"),
    (["summary", "/no/such/folder", "--threshold", "2"], "--threshold"),  # checked before the folder
    (["merge", "/no/such/folder", "--out", "/tmp/x", "--threshold", "0"], "--threshold"),
    (["--sizes", "28", "--seeds", "1", "--shard", "2/2"], "this shard would be empty"),
    (["--learning-rate", "nan"], "--learning-rate: must be a finite number"),
    (["--learning-rate", "inf"], "--learning-rate: must be a finite number"),
    (["--precision", "tf32", "--device", "cpu"], "--precision tf32: TF32 exists on CUDA only"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path):
    code, stdout, stderr = run_cli(*argv, "--out", tmp_path / "x") if argv[0] not in ("merge", "summary") \
        else run_cli(*argv)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert "Traceback" not in stderr + stdout


@pytest.mark.parametrize("lanes, error", [
    ("1", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("2", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("1", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2.00 GiB"))])
def test_out_of_device_memory_is_a_one_line_error_that_keeps_finished_epochs(tmp_path, monkeypatch, lanes, error):
    calls = []
    original = runner.train_cells_steps

    def running_out(ctx, group, *args, **kwargs):  # the second group runs out of memory
        calls.append(group.input_size)
        if len(calls) == 2:
            raise error
        return (yield from original(ctx, group, *args, **kwargs))

    monkeypatch.setattr(runner, "train_cells_steps", running_out)
    code, _, stderr = run_cli(*TINY, "--lanes", lanes, "--out", tmp_path / "run")
    last = stderr.strip().splitlines()[-1]  # (the progress bar writes to stderr before it)
    assert code == 1 and "Traceback" not in stderr and last.startswith("python -m matconvnet_port.search: error:")
    assert f"out of cpu memory ({error})" in last and "resume" in last
    assert ("fewer --lanes" in last) == (lanes == "2")
    assert all(r["input_size"] == calls[0] for r in read_results(tmp_path / "run" / "results.csv"))


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, monkeypatch):
    def broken(ctx, group, *args, **kwargs):
        raise RuntimeError("a bug")
        yield

    monkeypatch.setattr(runner, "train_cells_steps", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(*TINY, "--out", tmp_path / "run")


@pytest.mark.parametrize("make", ["file", "under_file", "bad_json", "not_ours", "no_settings"])
def test_an_output_folder_that_cannot_be_used_is_a_one_line_error(tmp_path, make):
    out = tmp_path / "out"
    if make == "file":
        out.write_text("")
    elif make == "under_file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "out"
    else:
        out.mkdir()
        (out / "config.json").write_text({"bad_json": '{"training": ', "not_ours": "{}",
                                          "no_settings": '{"training": {}, "grid": {}}'}[make])
    code, stdout, stderr = run_cli(*TINY, "--out", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr + stdout, stderr
    assert ("--out" if make in ("file", "under_file") else "config.json") in stderr


def test_a_folder_refuses_other_images_than_it_was_trained_on(tmp_path):
    """Fashion-MNIST has no built-in checksum: the folder keeps a fingerprint of its images."""
    out = tmp_path / "run"
    code, _, stderr = run_cli(*TINY, "--out", out)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert len(config["data_sha256"]) == 16
    config["data_sha256"] = "0" * 16  # as if trained on other files
    (out / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli(*TINY, "--out", out)
    assert code == 2 and "--data-dir" in stderr and "other mnist images" in stderr, stderr
    del config["data_sha256"]  # a folder from before the fingerprint: accepted, and it gains one
    (out / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli(*TINY, "--out", out)
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["data_sha256"] != "0" * 16


def test_merge_compares_fingerprints_past_a_folder_that_has_none(reference, tmp_path):
    config = json.loads((reference[0] / "config.json").read_text())
    header = (reference[0] / "results.csv").read_text().splitlines()[0] + "\n"
    folders = []
    for name, fingerprint in (("old", None), ("a", "1" * 16), ("b", "2" * 16)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "data_sha256": fingerprint}))
        (folder / "results.csv").write_text(header)
        folders.append(folder)
    code, _, stderr = run_cli("merge", *folders, "--out", tmp_path / "merged")
    assert code == 2 and "b was trained on other images" in stderr, stderr


def test_autotuned_plans_are_remembered_in_the_output_folder(tmp_path, monkeypatch):
    from matconvnet_port.fused import default_plan

    measured = []

    def fake_autotune(masks, weights, x, y, batch_size):
        measured.append(x.shape[2])
        plan = dict(default_plan("cpu", x.shape[2], len(masks)), conv=("gemm", "streams", "gemm", "gemm"))
        return plan, {"some plan": 0.02}

    monkeypatch.setattr(runner, "autotune_plan", fake_autotune)
    monkeypatch.setattr(runner, "_autotune_key", lambda ctx, n, masks: f"test device; N={n}")
    settings = Settings(epochs=1, train_subset=200, val_subset=100, resize="imresize", dataset="mnist",
                        learning_rate=0.001, batch_size=100, precision="fp32")
    x, y = torch.zeros(100, 1, 28, 28), torch.ones(100)

    def plan_of_a_new_run():
        ctx = runner.RunContext(out_dir=tmp_path, settings=settings, device=torch.device("cuda"), log=lambda m: None)
        return runner.choose_plan(ctx, 28, ALL_MASKS, x, y)

    first = plan_of_a_new_run()
    assert measured == [28] and first["conv"] == ("gemm", "streams", "gemm", "gemm")
    assert plan_of_a_new_run() == first and measured == [28]  # remembered, not measured again
    (tmp_path / runner.AUTOTUNE_FILE).write_text("{not json")
    assert plan_of_a_new_run() == first and measured == [28, 28]  # an unreadable file is measured over
    assert json.loads((tmp_path / runner.AUTOTUNE_FILE).read_text())["test device; N=28"]["ms_per_step"]


def test_module_entry_point_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "matconvnet_port.search", "--sizes", "30"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "python -m matconvnet_port.search: error: --sizes: N must be >= 28 and divisible by 4, got 30"]


# -- the grid --------------------------------------------------------------------------------

def test_mask_arguments():
    assert parse_masks(["all"]) == ALL_MASKS
    assert parse_masks(["C CR C CR"]) == ((0, 1, 0, 1),)
    assert parse_masks(["C", "CR", "C", "CR", "0010", "0101"]) == ((0, 0, 1, 0), (0, 1, 0, 1))
    with pytest.raises(UsageError):
        parse_masks(["C", "CR"])


def test_shards_partition_the_groups_deterministically():
    groups = build_groups(ALL_MASKS, PAPER_SIZES, range(3))
    for count in range(1, 8):
        parts = [shard_groups(groups, i, count) for i in range(1, count + 1)]
        keys = sorted((g.input_size, g.seed) for p in parts for g in p)
        assert keys == sorted((g.input_size, g.seed) for g in groups)  # each group in exactly one shard
        assert parts == [shard_groups(groups, i, count) for i in range(1, count + 1)]
    assert parse_shard("2/8") == (2, 8)


def test_groups_fuse_masks_conv1_bit_major():
    group = build_groups(ALL_MASKS, [28], [0])[0]
    assert [mask_bits(m) for m in group.masks][:4] == ["1111", "1110", "1101", "1100"]
    assert group.masks[-1] == (0, 0, 0, 0)


def test_time_estimate_scales_the_measured_step_from_its_own_size():
    """A step timed at N = 32 already costs N = 32: the estimate of N = 32 work is that step times the
    steps left; N = 64 work, with no step timed there, costs cost_per_image(64) / cost_per_image(32) as
    much; with steps timed at both ends, sizes between are interpolated in cost_per_image."""
    settings = Settings(epochs=20, train_subset=60000, val_subset=10000, resize="imresize", dataset="mnist",
                        learning_rate=0.001, batch_size=100, precision="fp32")
    steps = 20 * (60000 + runner.CPU_EVAL_COST * 10000) / 100
    n32, n48, n64 = (build_groups(ALL_MASKS, [n], [0])[0] for n in (32, 48, 64))
    masks = list(n32.masks)
    assert runner.scale_step_time({32: 0.5}, 100, 16, settings, [(n32, 0, masks)]) == pytest.approx(0.5 * steps)
    assert runner.scale_step_time({32: 0.5}, 100, 16, settings, [(n32, 15, masks[:4])]) == \
        pytest.approx(0.5 * steps * 5 / 20 * 4 / 16)
    ratio = grid.cost_per_image(64) / grid.cost_per_image(32)
    assert runner.scale_step_time({32: 0.5}, 100, 16, settings, [(n32, 0, masks), (n64, 0, masks)]) == \
        pytest.approx(0.5 * steps * (1 + ratio))
    # a latency-bound device: N = 64 only twice N = 32; N = 48 lies between them by cost
    f = (grid.cost_per_image(48) - grid.cost_per_image(32)) / (grid.cost_per_image(64) - grid.cost_per_image(32))
    work = [(n32, 0, masks), (n48, 0, masks), (n64, 0, masks)]
    assert runner.scale_step_time({32: 0.5, 64: 1.0}, 100, 16, settings, work) == \
        pytest.approx(steps * (0.5 + (0.5 + 0.5 * f) + 1.0))


# -- statistics ------------------------------------------------------------------------------

def test_mean_ci_uses_the_t_distribution():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302652729749464 (tables: 4.303), s = 1
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
    mean, half, n = mean_ci([0.25])
    assert mean == 0.25 and math.isnan(half) and n == 1


def test_paired_test_on_known_differences():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    b = a + np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # a lower in every pair, d = -1..-6
    t = paired_test(a, b)
    # t = mean(d) / (s_d / sqrt(6)) = -3.5 / (1.8708287 / 2.4494897) = -4.5825757, 5 degrees of freedom
    assert t["n"] == 6 and t["mean_diff"] == -3.5 and t["a_better"] == 6 and t["b_better"] == 0
    assert t["t_p"] == pytest.approx(0.0059330, rel=1e-4)
    assert t["wilcoxon_p"] == pytest.approx(2 / 2 ** 6)  # exact: all 6 signs negative, two-sided
    few = paired_test([1.0, 2.0], [1.5, 2.0])
    assert few["wilcoxon_p"] is None and few["n"] == 2
    same = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["mean_diff"] == 0 and math.isnan(same["t_p"])


@pytest.mark.parametrize("n", [2, 3, 6])
def test_equal_differences_get_the_sign_test_not_p_zero(n):
    """Errors move in steps of 1/val_subset, so every pair can differ by the same amount; the t statistic
    is then infinite (or, with float rounding, huge), and 2 such pairs must not read as significant."""
    a = np.array([0.010, 0.020, 0.030, 0.040, 0.050, 0.060][:n])
    t = paired_test(a, a + 0.004)  # a + 0.004 - a is not exactly 0.004 in floats: rounding differs per pair
    assert t["t_p"] == pytest.approx(2 * 0.5 ** n)
    assert (t["t_p"] < 0.05) == (n >= 6)


def synthetic_config(epochs):
    settings = Settings(epochs=epochs, train_subset=60000, val_subset=10000, resize="imresize", dataset="mnist",
                        learning_rate=0.001, batch_size=100, precision="fp32")
    return {"training": settings.to_dict(), "threshold": 0.1}


def _synthetic_rows(paper_best_gap):
    """Final-epoch rows for 4 masks x 3 sizes x 3 seeds; C CR C CR's error is the others' minus the gap."""
    rows = []
    rng = np.random.default_rng(0)
    for n in (28, 32, 36):
        for s in range(3):
            base = 0.05 + 0.01 * rng.random()
            for k, bits in enumerate(MASKS):
                err = base + 0.002 * k + 0.0005 * rng.random() - (paper_best_gap if bits == "0101" else 0.0)
                rows.append({"mask": mask_name(parse_mask(bits)), "mask_bits": bits, "input_size": n, "seed": s,
                             "epoch": 1, "val_image_err": err, "val_top1err": err * (n // 4 - 6) ** 2,
                             "seconds": 1.0, "device": "cpu", "conv_impl": "grouped", "fused_models": 4,
                             **{f"dead_relu_conv{i}": 0.0 if parse_mask(bits)[i - 1] else math.nan
                                for i in range(1, 5)}})
    return rows


def test_verdict_on_four_masks_does_not_test_the_claim_about_sixteen():
    """C CR C CR lowest of 4 masks, significantly: the paper's claim (lowest of the 16) is untested."""
    config = synthetic_config(epochs=1)
    summary = summarise(_synthetic_rows(0.01), config)
    lines = verdict_lines(summary)
    assert lines[0].startswith("[image-level error] NOT TESTED (only 4 of the 16 masks)"), lines[0]
    assert "(significant at 0.05)" in lines[0]
    assert lines[1].startswith("[MatConvNet top1err] NOT TESTED")
    test = summary["measures"]["val_image_err"]["best_vs_runner_up"]
    assert test["best"] == "0101" and test["n"] == 9 and test["a_better"] == 9 and test["wilcoxon_p"] < 0.01
    one = summarise([r for r in _synthetic_rows(0.01) if r["mask_bits"] == "0101"], config)
    assert verdict_lines(one)[0].startswith("[image-level error] NOT TESTED (only 1 of the 16 masks)")
    assert "lowest error of 1 mask," in verdict_lines(one)[0]


@pytest.mark.parametrize("gaps, word", [([-0.01] * 6, "REPRODUCED"),
                                         ([-0.02, 0.018, -0.02, 0.018, -0.02, 0.018], "INCONCLUSIVE")])
def test_verdict_on_all_sixteen_masks_needs_a_significant_gap(gaps, word):
    """Lowest of the 16 and significantly below the runner-up: reproduced; lowest in the mean by a
    gap that the (N, seed) pairs cannot tell from chance (lower in 3 of 6): inconclusive."""
    rows = _factorial_rows((0.0, 0.0, 0.0, 0.0))  # every mask at its pair's base error, then:
    pairs = sorted({(r["input_size"], r["seed"]) for r in rows})
    order = [mask_bits(m) for m in ALL_MASKS]
    for r in rows:
        if r["mask_bits"] == "0101":
            r["val_image_err"] += gaps[pairs.index((r["input_size"], r["seed"]))]
        else:  # the others apart, C C C C (the runner-up) at the base
            r["val_image_err"] += 0.001 * order.index(r["mask_bits"])
    summary = summarise(rows, synthetic_config(epochs=1))
    line = verdict_lines(summary)[0]
    assert line.startswith(f"[image-level error] {word}: C CR C CR has the lowest error of 16 masks"), line
    assert "vs runner-up C C C C" in line


def _sixteen(errors: dict, sizes=(28, 32), seeds=(0,), rest=0.05):
    """Final rows of all 16 masks; ``errors[bits]`` lists a mask's error per (N, seed), the others ``rest``."""
    rows = _factorial_rows((0.0,) * 4, sizes, seeds)
    pairs = sorted({(r["input_size"], r["seed"]) for r in rows})
    for r in rows:
        r["val_image_err"] = errors.get(r["mask_bits"], [rest] * len(pairs))[pairs.index((r["input_size"], r["seed"]))]
    return rows


def test_equal_error_counts_tie_whatever_the_float_rounding_of_their_means():
    """0.022 and 0.018 average to 0.019999999999999997 in floats: still a tie with 0.02 and 0.02."""
    summary = summarise(_sixteen({"0101": [0.02, 0.02], "1111": [0.022, 0.018]}), synthetic_config(epochs=1))
    line = verdict_lines(summary)[0]
    assert line.startswith("[image-level error] INCONCLUSIVE (tied): C CR C CR has the lowest error"), line
    assert summary["measures"]["val_image_err"]["best_per_size"] == {"28": ["0101"], "32": ["1111"]}


def test_masks_finished_at_different_pairs_are_not_ranked_against_each_other():
    rows = [r for r in _sixteen({"0101": [0.04, 0.04], "1111": [0.03, 0.03]})
            if (r["mask_bits"] == "1111") == (r["input_size"] == 32)]  # CR CR CR CR at N = 32 only, the rest at 28
    line = verdict_lines(summarise(rows, synthetic_config(epochs=1)))[0]
    assert line == ("[image-level error] no (N, seed) pair where all the masks with a finished cell finished yet: "
                    "nothing to compare"), line


def test_a_shared_runner_up_rank_is_tested_against_each_and_too_few_pairs_cannot_reproduce():
    # C CR C CR lowest in each of 6 pairs; C C C C and C C CR C share the runner-up rank, C C C C far closer
    # in some pairs: its (weaker) test is the one reported
    gaps = {"0101": [0.01] * 6, "0000": [0.02, 0.011, 0.02, 0.011, 0.02, 0.011], "0010": [0.0155] * 6}
    summary = summarise(_sixteen(gaps, seeds=(0, 1, 2), rest=0.05), synthetic_config(epochs=1))
    test = summary["measures"]["val_image_err"]["best_vs_runner_up"]
    assert (test["runner_up"], test["runners_up"]) == ("0000", 2)
    line = verdict_lines(summary)[0]
    assert "vs runner-up C C C C (1.55%, the closest of 2 tied)" in line, line
    # a clear, consistent gap over 3 pairs: significant by the t-test, but 3 pairs cannot establish it
    three = summarise(_sixteen({"0101": [0.010, 0.011, 0.010]}, seeds=(0, 1, 2), sizes=(28,), rest=0.02),
                      synthetic_config(epochs=1))
    assert verdict_lines(three)[0].startswith("[image-level error] INCONCLUSIVE (fewer than 6 (N, seed) pairs)")
    six = summarise(_sixteen({"0101": [0.010, 0.011, 0.010] * 2}, seeds=(0, 1, 2), rest=0.02),
                    synthetic_config(epochs=1))
    assert verdict_lines(six)[0].startswith("[image-level error] REPRODUCED: C CR C CR has the lowest error")


def test_summary_of_an_unfinished_grid_uses_finished_cells_only():
    rows = _synthetic_rows(0.01)
    for r in rows:
        r["epoch"] = 1
    rows += [dict(r, epoch=2) for r in rows if r["mask_bits"] != "0101"]  # C CR C CR still at epoch 1
    summary = summarise(rows, synthetic_config(epochs=2))
    assert summary["cells_finished"] == 27 and summary["cells_started"] == 36
    line = verdict_lines(summary)[0]
    assert "C CR C CR has no finished cell yet" in line
    overall = {e["mask_bits"]: e for e in summary["measures"]["val_image_err"]["overall"]}
    assert overall["0101"]["rank"] is None and overall["0010"]["rank"] == 1


def test_verdict_when_c_cr_c_cr_ties_for_best_tests_c_cr_c_cr_itself():
    """Errors are quantised, so ties happen; C CR C CR tied first but sorted after C C CR C must be the one
    compared with the runner-up, its own wins counted."""
    rows = _synthetic_rows(0.0)
    best = {(r["input_size"], r["seed"]): r for r in rows if r["mask_bits"] == "0010"}
    for r in rows:
        if r["mask_bits"] == "0101":  # C CR C CR = C C CR C (the best of the others) in every pair
            r["val_image_err"] = best[(r["input_size"], r["seed"])]["val_image_err"]
    summary = summarise(rows, synthetic_config(epochs=1))
    overall = summary["measures"]["val_image_err"]["overall"]
    assert [e["mask_bits"] for e in overall[:2]] == ["0010", "0101"] and overall[1]["rank"] == 1
    test = summary["measures"]["val_image_err"]["best_vs_runner_up"]
    assert (test["best"], test["runner_up"]) == ("0101", "0010") and test["mean_diff"] == 0
    line = verdict_lines(summary)[0]
    assert line.startswith("[image-level error] NOT TESTED (only 4 of the 16 masks) (tied)")
    assert "vs runner-up C C CR C" in line


def test_a_shard_summary_counts_the_groups_it_was_given():
    """A shard of the paper grid holds some (N, seed) groups, not every N x every seed it touches."""
    config = dict(synthetic_config(epochs=1), shard="1/2",
                  grid={"masks": MASKS, "sizes": [28, 32, 36], "seeds": [0, 1, 2]})
    groups = {(g.input_size, g.seed) for g in shard_groups(build_groups(
        [parse_mask(m) for m in MASKS], [28, 32, 36], [0, 1, 2]), 1, 2)}
    assert len({n for n, _ in groups}) * len({s for _, s in groups}) > len(groups)  # not a sub-grid
    rows = [r for r in _synthetic_rows(0.01) if (r["input_size"], r["seed"]) in groups]
    text = summary_markdown(summarise(rows, config))
    names = ", ".join(f"N{n}-seed{s}" for n, s in sorted(groups))
    assert f"the (N, seed) groups {names} (shard 1/2) = {4 * len(groups)} cells" in text
    assert f"finished {4 * len(groups)}/{4 * len(groups)} cells" in text


def test_verdict_says_not_reproduced_when_another_mask_wins():
    summary = summarise(_synthetic_rows(-0.01), synthetic_config(epochs=1))
    line = verdict_lines(summary)[0]
    assert line.startswith("[image-level error] NOT reproduced: best is C C CR C")
    assert "C CR C CR ranks 4/4" in line


def _factorial_rows(effects, sizes=(28, 32), seeds=(0, 1, 2), noise=0.0):
    """Final-epoch rows for all 16 masks whose error is a base per (N, seed) plus effects[k] per ReLU k."""
    rng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        for s in seeds:
            base = 0.02 + 0.01 * rng.random()
            for mask in ALL_MASKS:
                bits = mask_bits(mask)
                err = base + sum(e for e, on in zip(effects, mask) if on) + noise * rng.standard_normal()
                rows.append({"mask": mask_name(mask), "mask_bits": bits, "input_size": n, "seed": s, "epoch": 1,
                             "val_image_err": err, "val_top1err": err * (n // 4 - 6) ** 2, "seconds": 1.0,
                             "device": "cpu", "conv_impl": "gemm", "fused_models": 16,
                             **{f"dead_relu_conv{i}": 0.0 if mask[i - 1] else math.nan for i in range(1, 5)}})
    return rows


def test_relu_effects_recover_an_additive_design():
    effects = [-0.001, 0.0005, -0.003, 0.0]
    summary = summarise(_factorial_rows(effects), synthetic_config(epochs=1))
    found = summary["measures"]["val_image_err"]["relu_effects"]
    assert [e["conv"] for e in found] == [1, 2, 3, 4] and all(e["mask_pairs"] == 8 and e["n"] == 6 for e in found)
    for e, want in zip(found, effects):
        assert e["mean_diff"] == pytest.approx(want, abs=1e-12)
        assert all(v == pytest.approx(want, abs=1e-12) for v in e["per_size"].values())
    # 8 matched mask pairs x 6 (N, seed) pairs, every one lower (conv1, conv3) or higher (conv2)
    assert (found[0]["lower_with_relu"], found[0]["higher_with_relu"]) == (48, 0)
    assert (found[1]["lower_with_relu"], found[1]["higher_with_relu"]) == (0, 48)
    assert found[2]["t_p"] == 2 * 0.5 ** 6 and math.isnan(found[3]["t_p"])  # constant effect: sign test; none
    assert "## What each ReLU does" in summary_markdown(summary)


def test_relu_effects_with_noise_and_a_partial_grid():
    noisy = summarise(_factorial_rows([0.0, 0.0, -0.003, 0.0], noise=0.0005), synthetic_config(epochs=1))
    conv3 = noisy["measures"]["val_image_err"]["relu_effects"][2]
    assert conv3["mean_diff"] == pytest.approx(-0.003, abs=0.0005) and conv3["t_p"] < 1e-3
    assert conv3["ci95"] > 0 and conv3["mean_diff"] + conv3["ci95"] < 0
    # only the masks with no ReLU after conv1: conv1's effect has no matched pair, the others 4 each
    rows = [r for r in _factorial_rows([0.001, 0.0, 0.0, 0.0]) if r["mask_bits"][0] == "0"]
    partial = summarise(rows, synthetic_config(epochs=1))["measures"]["val_image_err"]["relu_effects"]
    assert [e["mask_pairs"] for e in partial] == [0, 4, 4, 4] and partial[0]["n"] == 0
    assert "n/a:" not in summary_markdown(summarise(rows, synthetic_config(epochs=1)))
    # masks that differ in two ReLUs or more: no effect can be read, and the section says so
    apart = [r for r in _factorial_rows([0.001, 0.0, 0.0, 0.0]) if r["mask_bits"] in ("0000", "0101", "0011", "1111")]
    text = summary_markdown(summarise(apart, synthetic_config(epochs=1)))
    assert "n/a: no two finished masks differ in exactly one ReLU" in text


def summary_markdown(summary):
    from pathlib import Path

    from matconvnet_port.search.summary import _markdown
    return _markdown(summary, Path("synthetic"))


def test_remembered_plans_are_read_back_and_bad_entries_measured_over(tmp_path):
    """autotune.json round trip; a plan saved when compose was a bool still loads; an entry this version
    cannot build (unknown composition, layout or layer) is measured again rather than failing the run."""
    plan = {"memory_format": "nhwc", "conv": ("gemm", "streams", "gemm", "gemm"), "chunk_size": 16,
            "compose": "library"}
    runner._remember_plan(tmp_path, "k", plan, {"a": 0.001})
    assert runner._remembered_plan(tmp_path, "k") == plan
    entries = {"old": dict(plan, compose=True), "fft": dict(plan, compose="fft"),
               "layout": dict(plan, memory_format="nwhc"), "layer": dict(plan, conv="fast")}
    for key, entry in entries.items():
        runner._remember_plan(tmp_path, key, entry, {})
    assert runner._remembered_plan(tmp_path, "old") == dict(plan, compose="gemm")
    assert [runner._remembered_plan(tmp_path, key) for key in ("fft", "layout", "layer", "absent")] == [None] * 4


def test_dead_relu_table_leaves_out_diverged_cells():
    """A NaN net's ReLUs all output 0 (MATLAB's max(NaN, 0)): counted, they would read as 100 % dead."""
    rows = _factorial_rows([0.0, 0.0, -0.003, 0.0])
    for r in rows:
        r["val_objective"] = 1.0
        r.update({f"dead_relu_conv{i}": 0.25 if parse_mask(r["mask_bits"])[i - 1] else math.nan for i in range(1, 5)})
        if r["mask_bits"] == "1001":  # every cell of this mask diverged
            r.update(val_objective=math.nan, dead_relu_conv1=1.0, dead_relu_conv4=1.0)
        if r["mask_bits"] == "1111" and r["seed"] == 0:  # two of its six cells
            r.update(val_objective=math.nan, **{f"dead_relu_conv{i}": 1.0 for i in range(1, 5)})
    summary = summarise(rows, synthetic_config(epochs=1))
    dead = summary["dead_relu"]
    assert dead["1001"] == {"diverged_cells": 6, "conv1": None, "conv2": None, "conv3": None, "conv4": None}
    assert dead["1111"] == {"diverged_cells": 2, **{f"conv{i}": 0.25 for i in range(1, 5)}}
    assert dead["0101"] == {"diverged_cells": 0, "conv1": None, "conv2": 0.25, "conv3": None, "conv4": 0.25}
    text = summary_markdown(summary)
    assert "| CR C C CR | 1001 | n/a |  |  | n/a | 6 |" in text
    assert "| CR CR CR CR | 1111 | 25.0 | 25.0 | 25.0 | 25.0 | 2 |" in text
    assert "| C CR C CR | 0101 |  | 25.0 |  | 25.0 |  |" in text
