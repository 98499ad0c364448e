"""Fuzz the loaders (checkpoint, safetensors, sdsurgeon file, batch YAML): one-line errors only, no code run.

A short run (seconds) in the default tier; `benchmarks/fuzz_loaders.py` runs the same cases for longer.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_loaders import cases, check_case, make_seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.slow
def test_random_and_mutated_files_load_or_fail_in_one_line_and_run_no_code(seeds):
    seed_bytes, canary = seeds
    folder = canary.parent  # also the current folder: a file naming the canary module there must not import it

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases(seed_bytes), through_cli=st.booleans())
    def run(case, through_cli):
        check_case(*case, folder, canary, through_cli=through_cli)

    with contextlib.chdir(folder):
        run()
