"""python -m matconvnet_port.inspect: the layer table and the error path."""

import os
import subprocess
import sys

import pytest

from matconvnet_port.inspect import layer_table, main
from matconvnet_port.netio import load_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, "reference_data")


def table_rows(output: str) -> list[list[str]]:
    """The data rows of the printed table, cells stripped (header and rule skipped)."""
    lines = [line for line in output.splitlines() if line.endswith("|")]
    return [[cell.strip() for cell in line.split("|")[:-1]] for line in lines[2:]]


def column(output: str, title: str) -> list[str]:
    header = next(line for line in output.splitlines() if line.endswith("|"))
    index = [cell.strip() for cell in header.split("|")].index(title)
    return [row[index] for row in table_rows(output)]


def test_lenet_table_at_28x28(capsys):
    assert main([os.path.join(REF, "lenet.mat")]) == 0
    out = capsys.readouterr().out
    sizes = column(out, "output size")
    assert [s.split("x")[0] for s in sizes] == ["24", "12", "8", "4", "1", "1", "1", "1"]
    assert sizes[:5] == ["24x24x20", "12x12x20", "8x8x50", "4x4x50", "1x1x500"]
    assert column(out, "type") == ["conv", "mpool", "conv", "mpool", "conv", "relu", "conv", "softmxl"]
    assert column(out, "support")[:4] == ["5", "2", "5", "2"]
    assert column(out, "num filts")[:3] == ["20", "n/a", "50"]
    assert column(out, "filt dim")[2] == "20"
    assert column(out, "stride")[1] == "2"
    assert "431080 parameters" in out


def test_input_size_option_and_dagnn(capsys):
    assert main([os.path.join(REF, "dagnn_lenet.mat"), "--input-size", "36", "36", "1"]) == 0
    out = capsys.readouterr().out
    assert "DagNN" in out
    assert [s.split("x")[0] for s in column(out, "output size")] == ["32", "16", "12", "6", "3", "3", "3", "1"]
    assert column(out, "output var")[6] == "prediction"


def test_layer_table_api_without_input_size():
    net = load_net(os.path.join(REF, "train", "net-epoch-2-legacy-beta16.mat"))  # meta.normalization.imageSize
    rows = layer_table(net)
    assert [r["size"] for r in rows][-1] == "1x1x10"
    rows = layer_table(net, (32, 32))
    assert rows[0]["size"] == "28x28x20"


def test_error_is_one_line_and_exit_status_2(tmp_path):
    bad = tmp_path / "bad.mat"
    bad.write_text("not a mat file")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "matconvnet_port.inspect", str(bad)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.mat" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["missing.mat", "README.md"])
def test_error_path_in_process(capsys, name):
    assert main([os.path.join(REF, name)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_an_infinite_input_size_shows_as_unknown_or_is_a_one_line_error(tmp_path, capsys):
    import numpy as np

    from matconvnet_port import save_net
    from matconvnet_port.models import cnn_mnist_init
    net = cnn_mnist_init()
    net.meta["inputSize"] = np.array([np.inf, np.inf, 1.0])
    save_net(tmp_path / "net.mat", net)
    assert main([str(tmp_path / "net.mat")]) == 0  # was an OverflowError traceback
    assert column(capsys.readouterr().out, "output size")[0] == "?x?x20"
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "net.mat"), "--input-size", "inf", "28"])
    assert e.value.code == 2 and "--input-size takes positive finite numbers" in capsys.readouterr().err
