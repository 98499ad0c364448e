"""examples/replication/replicate.py --quick: both arms trained, alternating, and reported as mean ± std."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the `test` extra installs scikit-learn and matplotlib
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "replication" / "replicate.py"
ARMS = ("constant depth", "stochastic depth")
ROW = re.compile(r"^\| (constant depth|stochastic depth) \| (\d+) \| ([\d.]+) ± ([\d.]+) \| ([\d.]+) ± ([\d.]+) \|$", re.M)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replication")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| constant depth |" in done.stdout and "| stochastic depth |" in done.stdout  # the table is printed too
    return out


def test_table_has_both_arms_with_mean_and_std(quick_run):
    text = (quick_run / "results.md").read_text()
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(text)}
    assert sorted(rows) == sorted(ARMS), text
    runs = json.loads((quick_run / "results.json").read_text())["runs"]
    for arm, (n, err, err_sd, sec, sec_sd) in rows.items():
        mine = [r for r in runs if r["arm"] == arm]
        assert int(n) == len(mine) == 2
        # recomputed here from the raw per-run records: final error, median epoch time
        finals = [100 * r["test_error"][-1] for r in mine]
        times = [statistics.median(r["epoch_seconds"]) for r in mine]
        assert float(err) == pytest.approx(statistics.mean(finals), abs=0.006)
        assert float(err_sd) == pytest.approx(statistics.stdev(finals), abs=0.006)
        assert float(sec) == pytest.approx(statistics.mean(times), abs=0.0006)
        assert float(sec_sd) == pytest.approx(statistics.stdev(times), abs=0.0006)
        assert 0 <= float(err) <= 100 and float(sec) > 0
    ratio = re.search(r"stochastic / constant \(paired by seed\): ([\d.]+) ± ([\d.]+)", text)
    assert ratio and float(ratio.group(1)) > 0


def test_runs_alternate_and_record_every_epoch(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    assert record["depth"] == 20 and record["epochs"] == 3 and record["seeds"] == 2
    assert [(r["arm"], r["seed"]) for r in record["runs"]] == [
        ("constant depth", 0), ("stochastic depth", 0), ("constant depth", 1), ("stochastic depth", 1)]
    for r in record["runs"]:
        assert len(r["epoch_seconds"]) == len(r["test_error"]) == 3
        assert all(0 <= e <= 1 for e in r["test_error"]) and all(t > 0 for t in r["epoch_seconds"])
        # 360 test images: every error is a whole number of misclassified images
        assert all(abs(e * 360 - round(e * 360)) < 1e-3 for e in r["test_error"])


def test_plot_is_a_png(quick_run):
    from matplotlib.image import imread

    path = quick_run / "replication.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert 600 <= width <= 2000 and 300 <= height <= 1000


def test_every_run_is_pruned_and_pruning_nothing_keeps_its_error(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    steps = record["prune_steps"]
    assert steps == list(range(7))  # ResNet-20: 9 blocks, a ninth at a time, up to two thirds
    for r in record["runs"]:
        assert len(r["pruned_error"]) == len(steps)
        # removing no block is folding alone: the same predictions as the trained model in eval
        assert r["pruned_error"][0] == pytest.approx(r["test_error"][-1], abs=1e-9)
    for arm in ARMS:  # the summary is recomputed from the runs' records
        errors = [[100 * r["pruned_error"][i] for r in record["runs"] if r["arm"] == arm] for i in range(len(steps))]
        assert [m for m, _ in record["pruned"][arm]] == pytest.approx([statistics.mean(e) for e in errors])
    latency = record["latency"]
    assert latency["latency_ratio"][0] == 1.0 and latency["flops_ratio"][0] == 1.0
    # each block removed takes FLOPs away (latency is measured, not asserted: timing on a shared machine)
    assert all(a > b for a, b in zip(latency["flops_ratio"], latency["flops_ratio"][1:]))
    assert len(latency["latency_ratio"]) == len(steps) and all(r > 0 for r in latency["latency_ratio"])
    assert "| blocks removed |" in (quick_run / "results.md").read_text()
    assert (quick_run / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
