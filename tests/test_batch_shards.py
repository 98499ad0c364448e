"""`sdsurgeon batch --shard I/N` and `sdsurgeon batch-report`: a config's jobs split over a CI matrix, and the
shards' reports joined into one.

The split (``shard_jobs``) and the join (``read_report``, ``merge_reports``) are library functions, tested here
on their own; the command line is tested for its validation errors, ``--check --shard``, an empty shard and the
join of report folders written by ``write_reports``. One end-to-end test runs two shards of a tiny config and
joins their reports.
"""

from __future__ import annotations

import json
import math
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon._version import __version__
from sdsurgeon.batch.config import Job, JobOptions, parse_shard, shard_jobs, shard_of
from sdsurgeon.errors import ConfigError
from sdsurgeon.report import JobRecord, Report, merge_reports, read_report, read_reports, write_reports


def job(name: str) -> Job:
    return Job(name=name, checkpoint=None, arch="sdsurgeon.models:cifar_resnet", arch_kwargs={},
               options=JobOptions(), output_path=f"/nowhere/{name}.onnx", sd_path=None,
               stamp_path=f"/nowhere/{name}.sdsurgeon.json")


def names(jobs) -> list[str]:
    return [j.name for j in jobs]


# --- shard_jobs: the split ---------------------------------------------------------------------------------

job_names = st.lists(st.text(min_size=1, max_size=20), unique=True, max_size=40)


@settings(deadline=None, max_examples=150)
@given(job_names, st.integers(min_value=1, max_value=12))
def test_every_job_is_in_exactly_one_shard_in_config_order(all_names, count):
    jobs = [job(n) for n in all_names]
    shards = [shard_jobs(jobs, i, count) for i in range(1, count + 1)]
    assert sorted(n for s in shards for n in names(s)) == sorted(all_names)  # union == all, and disjoint:
    assert sum(len(s) for s in shards) == len(jobs)  # no job counted twice
    for s in shards:  # each shard keeps the config's order
        assert names(s) == [n for n in all_names if n in set(names(s))]
    assert [names(shard_jobs(jobs, i, count)) for i in range(1, count + 1)] == [names(s) for s in shards]


@settings(deadline=None, max_examples=150)
@given(job_names, st.text(min_size=1, max_size=20), st.integers(min_value=1, max_value=12), st.randoms())
def test_a_job_keeps_its_shard_when_entries_are_added_or_reordered(all_names, new, count, rnd):
    """Why the shard is a hash of the name: a CI matrix's per-shard cache still holds its jobs next time."""
    before = {n: i for i in range(1, count + 1) for n in names(shard_jobs([job(n) for n in all_names], i, count))}
    changed = [n for n in all_names if n != new] + [new]
    rnd.shuffle(changed)
    after = {n: i for i in range(1, count + 1) for n in names(shard_jobs([job(n) for n in changed], i, count))}
    assert {n: after[n] for n in before if n != new} == {n: i for n, i in before.items() if n != new}
    assert all(after[n] == shard_of(n, count) for n in changed)


@pytest.mark.parametrize("count", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("pattern", ["model_{}", "resnet20_seed{}", "ckpt-{:04d}"])
def test_shards_are_balanced_as_a_fair_draw_would_be(count, pattern):
    """A hash balances only on average: each shard holds n/N jobs within 4 standard deviations of a fair draw."""
    n = 600
    jobs = [job(pattern.format(i)) for i in range(n)]
    sizes = [len(shard_jobs(jobs, i, count)) for i in range(1, count + 1)]
    mean, sd = n / count, math.sqrt(n * (1 / count) * (1 - 1 / count))
    assert all(abs(size - mean) <= 4 * sd for size in sizes), sizes


def test_the_shard_of_a_name_is_pinned():
    """The same name lands in the same shard across sdsurgeon releases (CI caches by shard); changing the hash
    moves every job, which this test exists to notice."""
    assert [shard_of(n, 4) for n in ("r1", "r2", "r3", "a", "b", "c")] == [2, 2, 1, 3, 3, 3]
    assert [shard_of(n, 2) for n in ("resnet20_seed0", "resnet20_seed1", "resnet20_seed2", "vit_tiny")] == [2, 1, 2, 1]
    assert all(shard_of(n, 1) == 1 for n in ("r1", "x", "é"))


def test_more_shards_than_jobs_leaves_shards_empty_and_no_job_out():
    jobs = [job(n) for n in ("r1", "r2", "r3")]
    shards = {i: names(shard_jobs(jobs, i, 4)) for i in range(1, 5)}
    assert shards == {1: ["r3"], 2: ["r1", "r2"], 3: [], 4: []}
    assert shard_jobs([], 1, 3) == []


@pytest.mark.parametrize("index, count", [(0, 4), (5, 4), (1, 0), (-1, 2), (True, 1)])
def test_shard_jobs_refuses_a_shard_that_does_not_exist(index, count):
    with pytest.raises(ConfigError, match="shards count from 1"):
        shard_jobs([job("a")], index, count)


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/4", (2, 4)), ("4/4", (4, 4)), ("10/12", (10, 12))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text, words", [
    ("0/4", "I must be from 1 to 4"), ("5/4", "I must be from 1 to 4"), ("1/0", "N, the number of shards, must be 1"),
    ("a/b", "is not I/N"), ("2", "is not I/N"), ("2/4/1", "is not I/N"), ("-1/4", "is not I/N"), ("", "is not I/N"),
    (" 2/4", "is not I/N"), ("٢/٤", "is not I/N"), ("1/" + "9" * 5000, "is not I/N"),
])
def test_parse_shard_refuses_what_is_not_a_shard(text, words):
    with pytest.raises(ConfigError) as raised:
        parse_shard(text)
    assert raised.value.option == "--shard" and words in str(raised.value), str(raised.value)
    assert str(raised.value).startswith("--shard ")


# --- the command line: --shard validation, --check --shard, an empty shard ------------------------------------

CONFIG = """
    defaults: {input_shape: [1, 3, 8, 8], format: safetensors}
    models:
      - {name: r1, arch: "sdsurgeon.models:cifar_resnet", arch_kwargs: {depth: 8, width: 4}}
      - {name: r2, arch: "sdsurgeon.models:cifar_resnet", arch_kwargs: {depth: 8, width: 4}}
      - {name: r3, arch: "sdsurgeon.models:cifar_resnet", arch_kwargs: {depth: 8, width: 4}}
    """
# shard_of: r1 and r2 in shard 2 of 2 (and of 4), r3 in shard 1; shards 3 and 4 of 4 hold nothing.


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(CONFIG).lstrip("\n"))
    return path


@pytest.mark.parametrize("value, words", [("0/4", "I must be from 1 to 4"), ("5/4", "I must be from 1 to 4"),
                                          ("a/b", "is not I/N"), ("1/0", "must be 1 or more")])
@pytest.mark.parametrize("check", [True, False])
def test_bad_shard_is_one_error_line(config, value, words, check):
    line = assert_user_error(invoke("batch", "cfg.yaml", "--shard", value, *(["--check"] if check else [])))
    assert line.startswith(f"error: --shard {value if value != 'a/b' else repr(value)}") and words in line, line
    assert not (config.parent / "sdsurgeon-report").exists() and not (config.parent / "out").exists()


def test_check_with_shard_lists_only_that_shards_jobs(config):
    listed = {}
    for i in (1, 2):
        result = invoke("batch", "cfg.yaml", "--check", "--shard", f"{i}/2")
        assert_ok(result)
        listed[i] = result.stdout.strip()
    assert listed == {1: "cfg.yaml: valid, shard 1/2: 1 of 3 jobs: r3", 2: "cfg.yaml: valid, shard 2/2: 2 of 3 jobs: r1, r2"}
    result = invoke("batch", "cfg.yaml", "--check", "--shard", "2/2", "--json")
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["shard"] == [2, 2] and [j["name"] for j in data["jobs"]] == ["r1", "r2"]
    assert json.loads(invoke("batch", "cfg.yaml", "--check", "--json").stdout)["shard"] is None
    empty = invoke("batch", "cfg.yaml", "--check", "--shard", "4/4")
    assert_ok(empty)
    assert empty.stdout.startswith("cfg.yaml: valid, shard 4/4: 0 of 3 jobs (the other shards hold them all"), empty.stdout
    assert not (config.parent / "sdsurgeon-report").exists() and not (config.parent / "out").exists()


def test_check_with_shard_checks_only_that_shards_inputs(tmp_path, monkeypatch):
    """A missing checkpoint is the error of the shard that would read it, not of every shard."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        defaults: {input_shape: [1, 3, 8, 8]}
        models:
          - {name: r1, checkpoint: missing.pt, arch: "sdsurgeon.models:cifar_resnet"}
          - {name: r3, arch: "sdsurgeon.models:cifar_resnet"}
        """).lstrip("\n"))
    assert_ok(invoke("batch", "cfg.yaml", "--check", "--shard", "1/2"))  # r3's shard
    line = assert_user_error(invoke("batch", "cfg.yaml", "--check", "--shard", "2/2"))
    assert "job r1" in line and "missing.pt: no such file" in line, line


def test_an_empty_shard_runs_nothing_and_reports_zero_jobs(config):
    result = invoke("batch", "cfg.yaml", "--shard", "3/4", "--report-dir", "reports-3")
    assert_ok(result)
    assert result.stdout.strip() == ("shard 3/4: no jobs (the config's 3 all fall in other shards); 0 ok, 0 failed, "
                                     "0 skipped; reports in reports-3: report.json, junit.xml, summary.md")
    folder = config.parent / "reports-3"
    assert json.loads((folder / "report.json").read_text()) == {"sdsurgeon": __version__, "shard": [3, 4], "jobs": []}
    root = ET.parse(folder / "junit.xml").getroot()
    assert root.get("tests") == "0" and not list(root.iter("testcase"))
    summary = (folder / "summary.md").read_text()
    assert summary.startswith("## sdsurgeon batch (shard 3/4)") and "No jobs" in summary
    assert not (config.parent / "out").exists()
    as_json = invoke("batch", "cfg.yaml", "--shard", "4/4", "--report-dir", "reports-4", "--json")
    assert_ok(as_json)
    assert json.loads(as_json.stdout) == {"sdsurgeon": __version__, "shard": [4, 4], "jobs": []}


def test_help_teaches_a_ci_matrix():
    batch = invoke("batch", "--help")
    assert_ok(batch)
    assert "--shard" in batch.stdout and "batch-report reports-* -o reports" in " ".join(batch.stdout.split())
    report = invoke("batch-report", "--help")
    assert_ok(report)
    text = " ".join(report.stdout.replace("│", " ").split())
    for words in ("Example, a CI matrix", "--shard I/4 --report-dir reports-I", "batch-report reports-* -o reports",
                  "--output", "--json"):
        assert words in text, words


# --- reading reports back and merging them (library) --------------------------------------------------------


def record(name: str, status: str = "ok", **fields) -> JobRecord:
    defaults = {"sites": 3, "folded": 3, "multiplies": 0, "max_abs_error": 1e-8, "max_rel_error": 1e-7,
                "tolerance_used": 0.01, "timings": {"load": 0.1, "total": 0.5}, "outputs": [f"/out/{name}.onnx"]}
    if status != "ok":
        defaults = {"error": f"{name} went wrong", "timings": {"total": 0.2}}
    return JobRecord(name, status, **{**defaults, **fields})


def test_write_then_read_gives_the_same_report(tmp_path):
    records = [record("a"), record("b", "failed", traceback="Traceback ...\nValueError: x\n"),
               record("c", "skipped", error="up to date; --force redoes it"), record("d", max_abs_error=float("nan"))]
    write_reports(records, tmp_path / "r", shard=(2, 3))
    got = read_report(tmp_path / "r")
    assert (got.version, got.shard, got.merged, got.source) == (__version__, (2, 3), None, str(tmp_path / "r"))
    assert [r.to_dict() for r in got.records[:3]] == [r.to_dict() for r in records[:3]]
    assert math.isnan(got.records[3].max_abs_error)
    assert got.failed == ["b"]


def reports(*shards: tuple[int, int, list[str]], version: str = __version__) -> list[Report]:
    return [Report([record(n) for n in jobs], version, (i, n) if n else None, source=f"reports-{i}")
            for i, n, jobs in shards]


def test_merge_joins_every_shard_in_shard_order():
    merged = merge_reports(reports((3, 3, ["e"]), (1, 3, ["a", "b"]), (2, 3, [])))
    assert [r.name for r in merged.records] == ["a", "b", "e"]
    assert (merged.shard, merged.merged, merged.version) == (None, 3, __version__)
    whole = merge_reports(reports((2, 0, ["x"]), (1, 0, ["y"])))  # whole runs: in the order given
    assert [r.name for r in whole.records] == ["x", "y"] and whole.merged == 2


@pytest.mark.parametrize("given, words", [
    ([], "no report to merge"),
    (reports((1, 2, ["a"]), (2, 2, ["b", "a"])), "job 'a' is in both reports-1 and reports-2"),
    (reports((1, 2, ["a"]), (1, 3, ["b"])), "reports-1 is shard 1/2 and reports-1 is shard 1/3: shards of different N"),
    (reports((1, 2, ["a"]), (2, 0, ["b"])), "reports-1 is shard 1/2 of a run and reports-2 a whole run"),
    (reports((1, 3, ["a"]), (3, 3, ["b"])), "shard 2 of 3 missing (given: reports-1, reports-3)"),
    (reports((1, 4, ["a"])), "shards 2, 3, 4 of 4 missing"),
    (reports((2, 2, ["a"])) + reports((2, 2, [])), "reports-2 and reports-2 are both shard 2/2"),
])
def test_merge_refuses_reports_that_do_not_belong_together(given, words):
    with pytest.raises(ConfigError) as raised:
        merge_reports(given)
    assert words in str(raised.value), str(raised.value)


def test_merge_refuses_reports_of_different_versions():
    given = reports((1, 2, ["a"])) + reports((2, 2, ["b"]), version="0.0.9")
    with pytest.raises(ConfigError, match="reports-1 was written by sdsurgeon .* and reports-2 by 0.0.9"):
        merge_reports(given)


def _good(folder: Path) -> Path:
    write_reports([record("a")], folder, shard=(1, 2))
    return folder


DAMAGED = [
    ("not-json", lambda d: "{not json", "not JSON"),
    ("a-list", lambda d: [], "expected a JSON object"),
    ("no-version", lambda d: {k: v for k, v in d.items() if k != "sdsurgeon"}, "no sdsurgeon version in it"),
    ("unknown-key", lambda d: {**d, "extra": 1}, "unknown key 'extra'"),
    ("bad-shard", lambda d: {**d, "shard": [3, 2]}, "'shard' is not [I, N]"),
    ("jobs-missing", lambda d: {k: v for k, v in d.items() if k != "jobs"}, "'jobs' is missing or not a list"),
    ("bad-status", lambda d: {**d, "jobs": [{**d["jobs"][0], "status": "great"}]}, "jobs[0].status"),
    ("no-name", lambda d: {**d, "jobs": [{"status": "ok"}]}, "jobs[0] has no 'name'"),
    ("bad-sites", lambda d: {**d, "jobs": [{**d["jobs"][0], "sites": "3"}]}, "jobs[0].sites"),
    ("unknown-job-key", lambda d: {**d, "jobs": [{**d["jobs"][0], "colour": 1}]}, "unknown key 'colour'"),
    ("twice", lambda d: {**d, "jobs": d["jobs"] * 2}, "job 'a' is in it twice"),
]


@pytest.mark.parametrize("damage, words", [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED])
def test_a_damaged_report_is_one_line_naming_it(tmp_path, damage, words):
    folder = _good(tmp_path / "reports-1")
    changed = damage(json.loads((folder / "report.json").read_text()))
    (folder / "report.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ConfigError) as raised:
        read_report(folder)
    assert str(raised.value).startswith(f"{folder / 'report.json'}: ") and words in str(raised.value), str(raised.value)


def test_missing_folder_or_report_json_and_a_folder_twice(tmp_path):
    with pytest.raises(ConfigError, match="no such report folder"):
        read_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"report\.json: no such file"):
        read_report(tmp_path / "empty")
    _good(tmp_path / "r")
    with pytest.raises(ConfigError, match="given twice"):
        read_reports([tmp_path / "r", tmp_path / "x" / ".." / "r"])


# --- batch-report on the command line -----------------------------------------------------------------------


def shard_folders(root: Path, *shards: list[JobRecord], count: int | None = None) -> list[Path]:
    folders = []
    for i, records in enumerate(shards, 1):
        folders.append(root / f"reports-{i}")
        write_reports(records, folders[-1], shard=(i, count or len(shards)))
    return folders


def test_batch_report_writes_the_three_files_and_prints_the_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shard_folders(tmp_path, [record("b"), record("c", "skipped", error="up to date")], [], [record("a")])
    result = invoke("batch-report", "reports-1", "reports-2", "reports-3", "-o", "reports")
    assert_ok(result)
    assert result.stdout.strip() == ("merged 3 shards: 2 ok, 0 failed, 1 skipped; reports in reports: report.json, "
                                     "junit.xml, summary.md")
    data = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert (data["sdsurgeon"], data["shard"], data["merged"]) == (__version__, None, 3)
    assert [j["name"] for j in data["jobs"]] == ["b", "c", "a"]
    assert data["jobs"][0] == record("b").to_dict()
    root = ET.parse(tmp_path / "reports" / "junit.xml").getroot()
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("3", "0", "1")
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert summary.startswith("## sdsurgeon batch (merged from 3 reports)") and "2 ok, 0 failed, 1 skipped" in summary
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name not in ("report.json", "junit.xml", "summary.md")]


def test_batch_report_exits_1_when_a_merged_job_failed_and_json_prints_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shard_folders(tmp_path, [record("a")], [record("b", "failed"), record("c")])
    result = invoke("batch-report", "reports-2", "reports-1", "-o", "out", "--json")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.strip() == f"error: 1 of 3 jobs failed (b); see {Path('out') / 'summary.md'}"
    assert json.loads(result.stdout) == json.loads((tmp_path / "out" / "report.json").read_text())
    assert [j["name"] for j in json.loads(result.stdout)["jobs"]] == ["a", "b", "c"]  # shard order, not argument order
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert (junit.get("tests"), junit.get("failures")) == ("3", "1")


@pytest.mark.parametrize("case", ["duplicate-job", "different-n", "different-version", "damaged", "missing",
                                  "output-is-an-input", "output-is-a-file", "missing-shard"])
def test_batch_report_refusals_are_one_error_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args = ["reports-1", "reports-2"]
    output = "merged"
    if case == "duplicate-job":
        shard_folders(tmp_path, [record("a")], [record("b"), record("a")])
        words = "job 'a' is in both reports-1 and reports-2"
    elif case == "different-n":
        shard_folders(tmp_path, [record("a")], [record("b")], count=3)
        write_reports([record("b")], tmp_path / "reports-2", shard=(2, 2))
        words = "reports-1 is shard 1/3 and reports-2 is shard 2/2: shards of different N"
    elif case == "different-version":
        shard_folders(tmp_path, [record("a")], [record("b")])
        write_reports([record("b")], tmp_path / "reports-2", shard=(2, 2), version="0.0.9")
        words = f"reports-1 was written by sdsurgeon {__version__} and reports-2 by 0.0.9"
    elif case == "damaged":
        shard_folders(tmp_path, [record("a")], [record("b")])
        (tmp_path / "reports-2" / "report.json").write_text('{"jobs": ')
        words = f"{Path('reports-2') / 'report.json'}: damaged"
    elif case == "missing":
        shard_folders(tmp_path, [record("a")])
        words = "reports-2: no such report folder"
    elif case == "output-is-an-input":
        shard_folders(tmp_path, [record("a")], [record("b")])
        output = "reports-2"
        words = "is the input"
    elif case == "output-is-a-file":
        shard_folders(tmp_path, [record("a")], [record("b")])
        (tmp_path / "merged").write_text("x")
        words = "-o merged is a file"
    else:
        shard_folders(tmp_path, [record("a")], [record("b")], [record("c")])
        words = "shard 3 of 3 missing"
    before = sorted(str(p.relative_to(tmp_path)) + (p.read_text() if p.is_file() else "") for p in tmp_path.rglob("*"))
    line = assert_user_error(invoke("batch-report", *args, "-o", output))
    assert words in line, line
    after = sorted(str(p.relative_to(tmp_path)) + (p.read_text() if p.is_file() else "") for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, nothing overwritten


# --- end to end: two shards run, then joined ---------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.onnx
@pytest.mark.slow
def test_two_shards_run_and_their_reports_merge_into_the_whole(config):
    shard_reports = {}
    for i in (1, 2):
        result = invoke("batch", "cfg.yaml", "--shard", f"{i}/2", "--report-dir", f"reports-{i}", "--json")
        assert result.exit_code == 0, (result.stdout, result.stderr)
        shard_reports[i] = json.loads((config.parent / f"reports-{i}" / "report.json").read_text())
        assert json.loads(result.stdout) == shard_reports[i] and shard_reports[i]["shard"] == [i, 2]
    assert [j["name"] for j in shard_reports[1]["jobs"]] == ["r3"]
    assert [j["name"] for j in shard_reports[2]["jobs"]] == ["r1", "r2"]
    assert all(j["status"] == "ok" for i in (1, 2) for j in shard_reports[i]["jobs"])
    assert sorted(p.name for p in (config.parent / "out").glob("*.safetensors")) == ["r1.safetensors", "r2.safetensors",
                                                                                   "r3.safetensors"]
    result = invoke("batch-report", "reports-2", "reports-1", "-o", "reports")
    assert_ok(result)
    assert result.stdout.startswith("merged 2 shards: 3 ok, 0 failed, 0 skipped; reports in reports"), result.stdout
    merged = json.loads((config.parent / "reports" / "report.json").read_text())
    assert merged["jobs"] == shard_reports[1]["jobs"] + shard_reports[2]["jobs"]  # the union, in shard order
    assert (merged["shard"], merged["merged"], merged["sdsurgeon"]) == (None, 2, __version__)
    root = ET.parse(config.parent / "reports" / "junit.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("3", "0")
    assert sorted(c.get("name") for c in root.iter("testcase")) == ["r1", "r2", "r3"]
    assert "3 ok, 0 failed, 0 skipped" in (config.parent / "reports" / "summary.md").read_text()
