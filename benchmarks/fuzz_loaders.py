"""A longer fuzz run of the loaders than the test suite's: `python benchmarks/fuzz_loaders.py [EXAMPLES]`.

The same cases as tests/test_fuzz.py (random and mutated checkpoint, safetensors, sdsurgeon-file and batch
YAML bytes, half of them through the CLI): each must load or fail with one SurgeonError line, and none may
run code. Prints the number of cases and the time taken; a failing case is printed by hypothesis, shrunk.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def main(examples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SDSURGEON_HOME"] = str(Path(tmp) / "home")  # trust nothing of the user's, write nothing there
        from fuzz_loaders import cases, check_case, make_seeds

        seeds, canary = make_seeds(Path(tmp) / "fuzz")
        folder = canary.parent

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=cases(seeds), through_cli=st.booleans())
        def run(case, through_cli):
            check_case(*case, folder, canary, through_cli=through_cli)

        started = time.perf_counter()
        warnings.simplefilter("ignore")  # torch warns about the odd pickle protocols mutations make
        with contextlib.chdir(folder):
            run()
        print(f"{examples} cases: every one loaded or failed in one line, none ran code "
              f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
