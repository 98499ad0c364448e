"""Zoo-tier set-up: import paths for the zoo's own modules and the default tier's helpers, and thread count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Waiting OpenMP threads sleep (as tests/conftest.py says why), set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "tests"):  # oracle/models here; tests/ helpers (zoo.py, archs.py) if wanted
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# The dev machine is shared: never more threads than cores. Under pytest-xdist (`make test-zoo`: 2 workers, each
# taking whole models) the cores are shared out among the workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("SDSURGEON_ZOO_THREADS", max(1, 2 // _WORKERS))))
