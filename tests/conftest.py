"""Fixtures shared by the test modules; every test runs with its own sdsurgeon trust store."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never write the real ~/.config/sdsurgeon: a store for the session, set before anything (module
# fixtures, spawned batch workers, subprocesses) can trust a factory.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="sdsurgeon-home-"))
os.environ["SDSURGEON_HOME"] = str(_SESSION_HOME)


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def trust_store(tmp_path_factory, monkeypatch) -> Path:
    """This test's trust store (``$SDSURGEON_HOME``, beside its tmp_path, not in it): what module fixtures
    trusted so far, and nothing a test trusts reaches another test."""
    home = tmp_path_factory.mktemp("sdsurgeon-home")
    if (_SESSION_HOME / "trusted.json").exists():
        shutil.copy(_SESSION_HOME / "trusted.json", home / "trusted.json")
    monkeypatch.setenv("SDSURGEON_HOME", str(home))
    return home / "trusted.json"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty folder that is also the current directory (where a default output would land)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder
