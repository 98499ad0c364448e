"""`sdsurgeon plan --plot` and sdsurgeon.plot: the picture holds the plan's numbers, errors are one line, no stray file."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon.errors import MissingDependencyError, SurgeonError
from sdsurgeon.models import cifar_resnet

from sdsurgeon.plot import plot_schedule, schedule_figure

# Drawing needs the `plot` extra (`make test` installs it: the `test` extra has it); the tests of its absence do not.
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

RESNET20 = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 20}']
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Block(nn.Module):
    """x + fc2(relu(fc1(x))) with its own hidden width, so each branch costs a different share of the FLOPs."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Uneven(nn.Module):
    def __init__(self, width: int, hidden: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.Sequential(*(Block(width, h) for h in hidden))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


WIDTH, HIDDEN, CLASSES = 8, (4, 32, 16, 8), 3


def uneven_shares() -> list[float]:
    """Each branch's share of the forward FLOPs, by hand: a Linear(a, b) costs 2ab per sample (bias and ReLU free)."""
    branch = [2 * (2 * WIDTH * h) for h in HIDDEN]
    total = 2 * WIDTH * WIDTH + sum(branch) + 2 * WIDTH * CLASSES
    return [b / total for b in branch]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, read independently of matplotlib."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def coloured_pixels(path: Path) -> tuple[int, int]:
    """(blue-ish, orange-ish) pixel counts: the p_l line is blue, the FLOPs bars are orange."""
    from matplotlib.image import imread

    rgb = torch.from_numpy(imread(path)[..., :3].copy()) * 255
    r, b = rgb[..., 0], rgb[..., 2]
    return int(((b - r) > 80).sum()), int(((r - b) > 80).sum())


# --- the library function: the figure's data is the plan's -------------------------------------------


@needs_matplotlib
def test_figure_shows_p_per_site_and_flops_shares(tmp_path):
    torch.manual_seed(0)
    plan = sdsurgeon.plan(Uneven(WIDTH, HIDDEN, CLASSES), 0.5, example_inputs=torch.randn(2, WIDTH))
    L = len(HIDDEN)
    assert plan.num_sites == L
    fig = plot_schedule(plan, tmp_path / "s.png", title="uneven")
    p_ax, flops_ax = fig.axes
    line = p_ax.lines[0]
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == pytest.approx([1 - (l / L) * 0.5 for l in range(1, L + 1)])
    heights = [bar.get_height() for bar in flops_ax.patches]
    assert [bar.get_x() + bar.get_width() / 2 for bar in flops_ax.patches] == pytest.approx([1, 2, 3, 4])
    assert heights == pytest.approx(uneven_shares(), rel=1e-6)
    assert heights == pytest.approx([s.flops_share for s in plan.sites])
    title = fig._suptitle.get_text()
    assert title.startswith("uneven\n") and "linear rule" in title and "p_L = 0.5" in title
    assert f"expected depth {plan.expected_depth:.2f} of 4 blocks" in title
    assert png_size(tmp_path / "s.png") == tuple(round(v) for v in fig.get_size_inches() * fig.dpi)


@needs_matplotlib
def test_figure_marks_ungated_sites_and_says_when_flops_are_missing():
    torch.manual_seed(0)
    plan = sdsurgeon.plan(Uneven(WIDTH, HIDDEN, CLASSES), 0.6, rule="uniform", exclude=[r"blocks\.1"])
    fig = schedule_figure(plan)
    assert len(fig.axes) == 1  # no FLOPs axis without example inputs
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.6, 1.0, 0.6, 0.6])
    assert list(ax.lines[1].get_xdata()) == [2] and list(ax.lines[1].get_ydata()) == [1.0]  # the ungated site
    assert "FLOP shares not counted" in ax.get_title(loc="left")
    assert "uniform rule" in fig._suptitle.get_text()


def test_plot_schedule_without_matplotlib_raises_and_writes_nothing(tmp_path, monkeypatch):
    plan = sdsurgeon.plan(Uneven(WIDTH, HIDDEN, CLASSES), 0.5)
    hide_matplotlib(monkeypatch)
    with pytest.raises(MissingDependencyError, match=r"pip install matplotlib$") as raised:
        plot_schedule(plan, tmp_path / "s.png")
    assert isinstance(raised.value, SurgeonError) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def hide_matplotlib(monkeypatch) -> None:
    """Make every `import matplotlib...` fail, as if it were not installed."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_matplotlib
def test_plan_plot_writes_a_png_with_line_and_bars(work):
    result = invoke("plan", *RESNET20, "--input-shape", "1,3,32,32", "--plot", "schedule.png")
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "wrote schedule.png"
    assert any(line.startswith("expected training FLOPs: 0.") for line in lines[:-1])  # the table and summary first
    assert sorted(p.name for p in work.iterdir()) == ["schedule.png"]  # no temp file left behind
    width, height = png_size(work / "schedule.png")
    assert 500 <= width <= 2000 and 300 <= height <= 1000
    from matplotlib.image import imread

    assert imread(work / "schedule.png").shape[:2] == (height, width)
    blue, orange = coloured_pixels(work / "schedule.png")
    assert blue > 500 and orange > 5000  # a drawn line and nine drawn bars, not a blank canvas


@needs_matplotlib
def test_plan_plot_without_input_shape_draws_p_only(work):
    result = invoke("plan", *RESNET20, "--plot", "schedule.png")
    assert_ok(result)
    assert result.stdout.strip().splitlines()[-1] == "wrote schedule.png"
    blue, orange = coloured_pixels(work / "schedule.png")
    assert blue > 500 and orange < 50  # the line, and no FLOPs bars


@needs_matplotlib
def test_plan_plot_json_names_the_file(work):
    result = invoke("plan", *RESNET20, "--json", "--plot", "s.svg")
    assert_ok(result)
    assert len(result.stdout.strip().splitlines()) == 1
    record = json.loads(result.stdout)
    assert record["plot"] == "s.svg" and record["num_sites"] == 9
    assert (work / "s.svg").read_text().lstrip().startswith("<?xml")
    result = invoke("plan", *RESNET20, "--json")
    assert "plot" not in json.loads(result.stdout)


def test_plan_plot_without_matplotlib_is_one_line_and_no_file(work, monkeypatch):
    hide_matplotlib(monkeypatch)
    line = assert_user_error(invoke("plan", *RESNET20, "--plot", "schedule.png"))
    assert "pip install matplotlib" in line
    assert list(work.iterdir()) == []
    assert_ok(invoke("plan", *RESNET20))  # plan without --plot needs no matplotlib


@needs_matplotlib
@pytest.mark.parametrize(
    "target, message",
    [
        ("missing/schedule.png", "does not exist"),
        (".", "it is a folder"),
        ("schedule.txt", "not an image format"),
        ("schedule", "no image suffix"),
    ],
)
def test_plan_plot_bad_target_is_one_line_and_no_file(work, target, message):
    line = assert_user_error(invoke("plan", *RESNET20, "--input-shape", "1,3,32,32", "--plot", target))
    assert message in line
    assert list(work.iterdir()) == []


@needs_matplotlib
def test_plan_plot_never_overwrites_the_input(work):
    checkpoint = work / "model.png"  # a state_dict with an unlucky name
    torch.save(cifar_resnet(20).state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    line = assert_user_error(invoke("plan", checkpoint, *RESNET20, "--plot", checkpoint))
    assert "never overwrites its input" in line
    assert checkpoint.read_bytes() == before


# --- help teaches, with an example each ------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["plan"], ["inject"], ["export"], ["batch"]])
def test_help_has_an_example(command):
    result = invoke(*command, "--help")
    assert_ok(result)
    assert "Example:" in result.stdout
    assert "sdsurgeon " in result.stdout.split("Example:")[1]


def test_plan_help_teaches_plot():
    out = " ".join(invoke("plan", "--help").stdout.replace("│", " ").split())  # the table's borders and wraps
    assert "--plot" in out and "pip install matplotlib." in out and "schedule.png" in out
