"""Pictures: the schedule (p_l per residual site, each site's share of the FLOPs) and the prune curve."""

from __future__ import annotations

import os
from pathlib import Path

from .analysis.plan import Plan
from .surgery.prune import PruneCurve
from .errors import ConfigError, MissingDependencyError, WriteError
from .io.files import staged

# Not `pip install 'sdsurgeon[plot]'`: that names a distribution on PyPI, and sdsurgeon is installed from a clone.
INSTALL_HINT = "pip install matplotlib"
NO_FLOPS_NOTE = "FLOP shares not counted: give example inputs (--input-shape) to plan"
P_COLOUR, FLOPS_COLOUR, UNGATED_COLOUR = "tab:blue", "tab:orange", "tab:gray"


def _matplotlib():
    """matplotlib's Figure and Agg canvas (no pyplot, no display, no global backend switch), or a clear error."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError:
        raise MissingDependencyError(f"drawing the schedule needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg, MaxNLocator, PercentFormatter


def image_format(path: str | os.PathLike) -> str:
    """The image format ``path``'s suffix names (png, svg, pdf, ...); raises if matplotlib is missing or cannot write it.

    Call it before expensive work to fail early; ``plot_schedule`` calls it too.
    """
    Figure, Canvas, *_ = _matplotlib()
    if Path(path).is_dir():
        raise WriteError(f"cannot draw the schedule to {path}: it is a folder; give a file name, e.g. {Path(path) / 'schedule.png'}")
    fmt = Path(path).suffix.lower().lstrip(".")
    supported = Canvas(Figure()).get_supported_filetypes()
    if fmt not in supported:
        named = f"'.{fmt}' is not an image format matplotlib writes" if fmt else "the name has no image suffix"
        raise ConfigError(f"cannot draw the schedule to {path}: {named}; end the file name in .png, .svg or .pdf")
    return fmt


def schedule_title(plan: Plan, name: str | None = None) -> str:
    """``name`` (e.g. the model) over one line of the schedule: rule, p_L, expected depth (and FLOPs ratio)."""
    line = f"{plan.rule} rule, p_L = {plan.p_L:g}: expected depth {plan.expected_depth:.2f} of {plan.num_sites} blocks"
    if plan.expected_train_flops_ratio is not None:
        line += f", training FLOPs {plan.expected_train_flops_ratio:.3f} of the original"
    return f"{name}\n{line}" if name else line


def schedule_figure(plan: Plan, title: str | None = None):
    """A matplotlib Figure of ``plan``: p_l per site (line, left axis) and each branch's FLOPs share (bars, right axis).

    ``fig.axes[0]`` holds the p_l line (``lines[0]``, every site in depth order; sites left without a gate
    are p = 1 and also marked grey); ``fig.axes[1]``, present only when the plan counted FLOPs, holds one
    bar per site whose height is its share of the model's forward FLOPs (a fraction, shown as percent).
    Without FLOP counts the figure says so instead. ``title`` (e.g. the model name) heads the figure.
    """
    Figure, Canvas, MaxNLocator, PercentFormatter = _matplotlib()
    sites = plan.sites
    index, p = [s.index for s in sites], [s.p for s in sites]
    fig = Figure(figsize=(min(14.0, max(7.0, 3.0 + 0.14 * len(sites))), 4.5), dpi=100, layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.plot(index, p, color=P_COLOUR, marker="o", markersize=3 if len(sites) > 30 else 5, label="survival probability p_l")
    ungated = [s for s in sites if not s.gated]
    if ungated:
        ax.plot([s.index for s in ungated], [s.p for s in ungated], linestyle="none", marker="o", color=UNGATED_COLOUR,
                label="no gate (p = 1)")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("residual site, in depth order")
    ax.set_ylabel("survival probability p_l", color=P_COLOUR)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    if sites and all(s.flops_share is not None for s in sites):
        bars = ax.twinx()
        bars.bar(index, [s.flops_share for s in sites], width=0.8, color=FLOPS_COLOUR, alpha=0.45,
                 label="branch's share of the model's FLOPs")
        bars.set_ylabel("share of the model's forward FLOPs", color=FLOPS_COLOUR)
        bars.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        bars.set_ylim(0, 1.15 * max(s.flops_share for s in sites) or 1.0)
        ax.set_zorder(bars.get_zorder() + 1)  # the p_l line over the bars
        ax.patch.set_visible(False)
        more_handles, more_labels = bars.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    else:
        note = "no residual sites found" if not sites else NO_FLOPS_NOTE
        ax.set_title(note, loc="left", fontsize="small", color=UNGATED_COLOUR)
    if sites:  # below the axes, so it never hides a point or a bar
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    fig.suptitle(schedule_title(plan, title), fontsize="medium")
    return fig


def plot_schedule(plan: Plan, path: str | os.PathLike, title: str | None = None):
    """Draw ``plan`` (see ``schedule_figure``) to ``path`` atomically, in the format its suffix names; returns the Figure.

    Raises MissingDependencyError without matplotlib (``pip install matplotlib``), ConfigError for a
    suffix matplotlib cannot write, WriteError for a missing folder or a folder given as the file.
    """
    fmt = image_format(path)
    fig = schedule_figure(plan, title)
    with staged(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return fig


def curve_figure(curve: PruneCurve, title: str | None = None):
    """A matplotlib Figure of a prune curve: against blocks removed, the cosine similarity and (for class
    logits) top-1 agreement with the unpruned model on the left axis, the relative error on the right.

    ``fig.axes[0].lines``: cosine, then top-1 agreement when measured; ``fig.axes[1].lines[0]``: relative error.
    """
    Figure, Canvas, MaxNLocator, _ = _matplotlib()
    k = [pt.removed for pt in curve.points]
    fig = Figure(figsize=(8.0, 4.5), dpi=100, layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.plot(k, [pt.fidelity.cosine for pt in curve.points], color=P_COLOUR, marker="o", markersize=3,
            label="cosine similarity")
    if all(pt.fidelity.top1 is not None for pt in curve.points):
        ax.plot(k, [pt.fidelity.top1 for pt in curve.points], color="tab:green", marker="s", markersize=3,
                label="top-1 agreement")
    ax.set_ylim(min(0.0, *(pt.fidelity.cosine for pt in curve.points)), 1.05)
    ax.set_xlabel(f"blocks removed ({curve.by} order)")
    ax.set_ylabel("agreement with the unpruned model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    err = ax.twinx()
    err.plot(k, [pt.fidelity.rel_error for pt in curve.points], color=FLOPS_COLOUR, linestyle="--",
             label="relative error")
    err.set_ylabel("relative error of the output", color=FLOPS_COLOUR)
    err.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = err.get_legend_handles_labels()
    fig.legend(handles + more_handles, labels + more_labels, loc="outside lower center", ncols=3, fontsize="small",
               frameon=False)
    line = f"prune curve, measured on {curve.calibration}"
    fig.suptitle(f"{title}\n{line}" if title else line, fontsize="medium")
    return fig


def plot_prune_curve(curve: PruneCurve, path: str | os.PathLike, title: str | None = None):
    """Draw ``curve`` (see ``curve_figure``) to ``path`` atomically; errors as ``plot_schedule``'s."""
    fmt = image_format(path)
    fig = curve_figure(curve, title)
    with staged(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return fig
