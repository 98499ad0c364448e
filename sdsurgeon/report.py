"""Batch result records -> report.json, JUnit XML and a Markdown summary (what CI systems read)."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import WriteError
from .io.files import atomic_write

STATUSES = ("ok", "failed", "skipped")

# C0 controls but tab and newline, DEL and C1 (0x9b is a one-byte CSI): a name or message from a file holding
# them would steer the terminal it is printed on (colours, the window title, the cursor) or break an XML report.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character but tab and newline shown escaped (``\\x1b``), never emitted."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass
class JobRecord:
    """The outcome of one batch job."""

    name: str
    status: str  # ok | failed | skipped
    error: str | None = None  # one line: what went wrong (failed) or why it was not run (skipped)
    sites: int | None = None  # gated residual sites
    folded: int | None = None  # gates folded into weights
    multiplies: int | None = None  # gates kept as an explicit multiply
    dropped: int | None = None  # blocks pruned (drop, drop_sites); None when the job prunes nothing
    nodes: int | None = None  # ONNX nodes
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    tolerance_used: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and "total"
    outputs: list[str] = field(default_factory=list)
    traceback: str | None = None  # only for an unexpected exception (a bug): what to report

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["traceback"] is None:
            del d["traceback"]
        return d


def to_json(records: list[JobRecord]) -> str:
    return json.dumps({"jobs": [r.to_dict() for r in records]}, indent=2)


def to_junit(records: list[JobRecord], suite: str = "sdsurgeon") -> str:
    """One testcase per job; a failed job carries a <failure>, a skipped one a <skipped>."""
    failures = sum(r.status == "failed" for r in records)
    skipped = sum(r.status == "skipped" for r in records)
    total = sum(r.timings.get("total", 0.0) for r in records)
    root = ET.Element("testsuites", name=suite, tests=str(len(records)), failures=str(failures), errors="0",
                      skipped=str(skipped), time=f"{total:.3f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(records)), failures=str(failures), errors="0",
                       skipped=str(skipped), time=f"{total:.3f}")
    for r in records:
        case = ET.SubElement(ts, "testcase", classname=suite, name=r.name, time=f"{r.timings.get('total', 0.0):.3f}")
        if r.status == "failed":  # XML 1.0 cannot hold most control characters: shown escaped
            failure = ET.SubElement(case, "failure", message=printable(r.error or "failed"), type="failure")
            failure.text = printable(r.traceback or r.error or "")
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=printable(r.error or "skipped"))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2g}"
    return printable(str(value).replace("|", "\\|").replace("\n", " "))


def to_markdown(records: list[JobRecord]) -> str:
    """A table fit for a CI job summary (e.g. $GITHUB_STEP_SUMMARY)."""
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    icon = {"ok": "✅", "failed": "❌", "skipped": "⏭️"}
    lines = [
        "## sdsurgeon batch",
        "",
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (up to date or not run)",
        "",
        "| job | status | sites | folded | multiplies | ONNX nodes | max abs error | seconds | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        lines.append("| " + " | ".join([
            _cell(r.name), f"{icon[r.status]} {r.status}", _cell(r.sites), _cell(r.folded), _cell(r.multiplies),
            _cell(r.nodes), _cell(r.max_abs_error), f"{r.timings.get('total', 0.0):.1f}", _cell(r.error),
        ]) + " |")
    return "\n".join(lines) + "\n"


REPORT_FILES = ("report.json", "junit.xml", "summary.md")


def write_reports(records: list[JobRecord], folder: str | os.PathLike) -> dict[str, Path]:
    """report.json, junit.xml and summary.md in ``folder`` (created if missing), each written atomically."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the report folder {folder}: {exc.strerror}; choose another --report-dir") from None
    written = {}
    for name, text in zip(REPORT_FILES, (to_json(records), to_junit(records), to_markdown(records))):
        atomic_write(folder / name, lambda f, text=text: f.write(text.encode()))
        written[name] = folder / name
    return written
