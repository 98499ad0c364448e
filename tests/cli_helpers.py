"""Shared helpers for the CLI tests: invoke the typer app in-process and check the exit-code contract."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sdsurgeon.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, repr(result.exception))


def assert_user_error(result) -> str:
    """Exit 1, exactly one 'error: ' line on stderr, nothing on stdout, no traceback; returns that line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == "", result.stdout
    return lines[0]


def one_json(result) -> dict:
    """The one JSON object a successful ``--json`` command printed on stdout (and nothing else there)."""
    assert_ok(result)
    lines = result.stdout.strip("\n").splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])
