"""Batch result records -> report.json, JUnit XML and a Markdown summary (what CI systems read), and back."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._version import __version__
from .errors import ConfigError, WriteError
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


def to_json(records: list[JobRecord], *, shard: tuple[int, int] | None = None, merged: int | None = None,
            version: str = __version__) -> str:
    """report.json: the sdsurgeon version that ran the jobs, the shard (``[I, N]`` of ``batch --shard I/N``;
    null for a whole run or a merged report), how many reports a ``batch-report`` joined (merged reports
    only), and the jobs."""
    head: dict = {"sdsurgeon": version, "shard": list(shard) if shard else None}
    if merged is not None:
        head["merged"] = merged
    return json.dumps({**head, "jobs": [r.to_dict() for r in records]}, indent=2)


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


def to_markdown(records: list[JobRecord], *, shard: tuple[int, int] | None = None, merged: int | None = None) -> str:
    """A table fit for a CI job summary (e.g. $GITHUB_STEP_SUMMARY)."""
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    icon = {"ok": "✅", "failed": "❌", "skipped": "⏭️"}
    which = (f" (shard {shard[0]}/{shard[1]})" if shard else "") + (f" (merged from {merged} reports)" if merged else "")
    lines = [
        f"## sdsurgeon batch{which}",
        "",
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (up to date or not run)",
        "",
    ]
    if not records:
        lines += ["No jobs: " + ("none of the config's jobs falls in this shard." if shard else "nothing ran."), ""]
    lines += [
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


def write_reports(records: list[JobRecord], folder: str | os.PathLike, *, shard: tuple[int, int] | None = None,
                  merged: int | None = None, version: str = __version__) -> dict[str, Path]:
    """report.json, junit.xml and summary.md in ``folder`` (created if missing), each written atomically.

    ``shard``: the ``(I, N)`` of a ``batch --shard I/N`` run; ``merged``: how many reports ``merge_reports``
    joined; ``version``: the sdsurgeon that ran the jobs (a merged report keeps its shards').
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the report folder {folder}: {exc.strerror}; choose another --report-dir") from None
    written = {}
    texts = (to_json(records, shard=shard, merged=merged, version=version), to_junit(records),
             to_markdown(records, shard=shard, merged=merged))
    for name, text in zip(REPORT_FILES, texts):
        atomic_write(folder / name, lambda f, text=text: f.write(text.encode()))
        written[name] = folder / name
    return written


# --- reading reports back, and joining the shards of one run -------------------------------------------------

MAX_REPORT_BYTES = 64 << 20  # a report.json is read whole: bounded before it is read (about 100,000 jobs)


@dataclass
class Report:
    """What one report.json holds: its jobs and the run they came from."""

    records: list[JobRecord]
    version: str = __version__  # the sdsurgeon that ran the jobs
    shard: tuple[int, int] | None = None  # (I, N) of a `batch --shard I/N` run; None: a whole run or a merge
    merged: int | None = None  # a merged report: how many reports it joins
    source: str = ""  # the folder it was read from, for messages

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.records if r.status == "failed"]


def _optional(test):
    return lambda v: v is None or test(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str)


# Each JobRecord field -> what its JSON value must be (None allowed where the field defaults to None).
_RECORD_CHECKS = {
    "name": lambda v: isinstance(v, str) and bool(v), "status": lambda v: v in STATUSES,
    "error": _optional(_is_str), "sites": _optional(_is_int), "folded": _optional(_is_int),
    "multiplies": _optional(_is_int), "dropped": _optional(_is_int), "nodes": _optional(_is_int),
    "max_abs_error": _optional(_is_number), "max_rel_error": _optional(_is_number),
    "tolerance_used": _optional(_is_number),
    "timings": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(t) for k, t in v.items()),
    "outputs": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
    "traceback": _optional(_is_str),
}
assert set(_RECORD_CHECKS) == {f.name for f in fields(JobRecord)}, "a JobRecord field without its check"
_REPORT_KEYS = ("sdsurgeon", "shard", "merged", "jobs")


def _record(data, where: str, damaged) -> JobRecord:
    if not isinstance(data, dict):
        damaged(f"{where} is not an object")
    unknown = sorted(set(data) - set(_RECORD_CHECKS))
    if unknown:
        damaged(f"{where} has unknown key {unknown[0]!r} (written by another sdsurgeon version?)")
    for key in ("name", "status"):
        if key not in data:
            damaged(f"{where} has no {key!r}")
    for key, value in data.items():
        if not _RECORD_CHECKS[key](value):
            shown = repr(value)[:40] if key == "status" else f"a JSON {type(value).__name__}"
            damaged(f"{where}.{key} is not what a job record holds (got {shown})")
    return JobRecord(**data)


def read_report(folder: str | os.PathLike) -> Report:
    """The report.json a ``batch --report-dir`` (or ``merge_reports``) wrote in ``folder``, checked against what
    this sdsurgeon writes; a missing, unreadable or damaged one is a ConfigError naming it."""
    folder = Path(folder)
    path = folder / "report.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such report folder; give the folders `sdsurgeon batch --report-dir` wrote")
    try:
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes, more than a report.json of sdsurgeon batch holds "
                              f"({MAX_REPORT_BYTES:,} at most); is it one?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; give the folders `sdsurgeon batch --report-dir` wrote "
                          "(each holds report.json, junit.xml and summary.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None

    def damaged(why: str):
        raise ConfigError(f"{path}: damaged or not a report of sdsurgeon batch: {why}; run the batch again")

    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        damaged(f"not JSON ({getattr(exc, 'msg', exc)})")
    if not isinstance(data, dict):
        damaged("expected a JSON object with keys " + ", ".join(_REPORT_KEYS))
    unknown = sorted(set(data) - set(_REPORT_KEYS))
    if unknown:
        damaged(f"unknown key {unknown[0]!r}")
    if "sdsurgeon" not in data:
        raise ConfigError(f"{path}: no sdsurgeon version in it, so an sdsurgeon from before batch-report wrote it; "
                          f"run the batch again with this one ({__version__})")
    version, shard, merged, jobs = data["sdsurgeon"], data.get("shard"), data.get("merged"), data.get("jobs")
    if not isinstance(version, str) or not version:
        damaged(f"'sdsurgeon' is not a version (got {version!r})")
    if shard is not None and not (isinstance(shard, list) and len(shard) == 2 and all(map(_is_int, shard))
                                  and 1 <= shard[0] <= shard[1]):
        damaged(f"'shard' is not [I, N] with 1 <= I <= N (got {shard!r})")
    if merged is not None and not (_is_int(merged) and merged >= 1):
        damaged(f"'merged' is not a count of reports (got {merged!r})")
    if not isinstance(jobs, list):
        damaged("'jobs' is missing or not a list")
    records, seen = [], set()
    for i, job in enumerate(jobs):
        record = _record(job, f"jobs[{i}]", damaged)
        if record.name in seen:
            damaged(f"job {record.name!r} is in it twice")
        seen.add(record.name)
        records.append(record)
    return Report(records, version, tuple(shard) if shard else None, merged, str(folder))


def read_reports(folders: list[str | os.PathLike]) -> list[Report]:
    """``read_report`` of each folder; the same folder given twice (under any spelling) is an error."""
    seen: dict[str, str] = {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            also = "" if seen[real] == str(folder) else f" (also as {seen[real]})"
            raise ConfigError(f"{folder} is given twice{also}; give each report folder once")
        seen[real] = str(folder)
    return [read_report(folder) for folder in folders]


def merge_reports(reports: list[Report]) -> Report:
    """One report of the jobs of all ``reports``: the shards of one ``batch --shard I/N`` run (all N of them, in
    shard order), or whole runs (in the order given).

    Refused, with one line naming the reports: none given, reports of different sdsurgeon versions, shards mixed
    with whole runs or of different N, a shard given twice or missing, a job name in two reports.
    """
    if not reports:
        raise ConfigError("no report to merge; give the report folders of the shards")
    first = reports[0]
    for other in reports[1:]:
        if other.version != first.version:
            raise ConfigError(f"{first.source} was written by sdsurgeon {first.version} and {other.source} by "
                              f"{other.version}: run every shard with the same sdsurgeon, then merge")
    sharded = [r for r in reports if r.shard]
    if sharded and len(sharded) != len(reports):
        whole = next(r for r in reports if not r.shard)
        raise ConfigError(f"{sharded[0].source} is shard {_label(sharded[0].shard)} of a run and {whole.source} a "
                          "whole run (no --shard): merge the shards of one run")
    if sharded:
        count = first.shard[1]
        by_index: dict[int, Report] = {}
        for r in reports:
            if r.shard[1] != count:
                raise ConfigError(f"{first.source} is shard {_label(first.shard)} and {r.source} is shard "
                                  f"{_label(r.shard)}: shards of different N split the jobs differently; run every "
                                  "shard with the same N")
            if r.shard[0] in by_index:
                raise ConfigError(f"{by_index[r.shard[0]].source} and {r.source} are both shard {_label(r.shard)}: "
                                  "give each shard's report once")
            by_index[r.shard[0]] = r
        missing = [i for i in range(1, count + 1) if i not in by_index]
        if missing:
            raise ConfigError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {count} "
                              f"missing (given: {', '.join(r.source for r in reports)}): their jobs would be left "
                              "out of the report; give every shard's report folder")
        reports = [by_index[i] for i in range(1, count + 1)]
    owner: dict[str, Report] = {}
    records: list[JobRecord] = []
    for r in reports:
        for record in r.records:
            if record.name in owner:
                raise ConfigError(f"job {record.name!r} is in both {owner[record.name].source} and {r.source}: "
                                  "merge the shards of one run (each job runs in one shard), each once")
            owner[record.name] = r
            records.append(record)
    return Report(records, first.version, None, len(reports))


def _label(shard: tuple[int, int]) -> str:
    return f"{shard[0]}/{shard[1]}"
