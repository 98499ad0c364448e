"""A model's residual sites: capture it, annotate shapes, detect each part, number sites in depth order."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from torch import nn

from ..analysis.detect import RefusedAdd, ResidualSite, detect
from ..capture.annotate import annotate
from ..capture.fx import Capture
from ..capture.fx import capture as capture_model
from ..capture.inputs import normalize_inputs
from ..progress import SILENT, Progress


def locate(
    model: nn.Module, leaves: Iterable[str] = (), example_inputs=None, method: str = "auto",
    refused: list[RefusedAdd] | None = None, progress: Progress = SILENT,
) -> tuple[Capture, list[ResidualSite]]:
    """Capture ``model`` (see capture.capture) and find its residual sites, numbered in depth order.

    With example inputs, nodes are annotated with shapes and FLOPs first, so detection can reject
    broadcasting adds (a dropped gate must return a value of the block's output shape). Blocks that
    cannot be gated are appended to ``refused`` when it is given. ``progress`` hears of each stage.
    """
    with progress.stage("capture"):
        cap = capture_model(model, leaves=leaves, method=method, example_inputs=example_inputs)
    inputs = normalize_inputs(example_inputs)
    if inputs is not None:
        with progress.stage("count FLOPs"):
            annotate(model, cap, *inputs)
    sites: list[ResidualSite] = []
    with progress.stage("detect residual blocks", total=len(cap.parts) if len(cap.parts) > 1 else None) as advance:
        for part in cap.parts:
            found, cannot = detect(part.gm, part=part.path)
            sites += [_renumber(site, len(sites) + k) for k, site in enumerate(found, 1)]
            if refused is not None:
                refused += cannot
            advance()
    return cap, sites


def _renumber(site: ResidualSite, index: int) -> ResidualSite:
    return replace(site, index=index)
