"""Zoo-tier set-up: import paths for the zoo's own modules and the default tier's helpers, and thread count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "tests"):  # oracle/models here; tests/ helpers (zoo.py, archs.py) if wanted
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# The dev machine is shared: one pytest with a few threads, never all cores.
torch.set_num_threads(int(os.environ.get("SDSURGEON_ZOO_THREADS", "2")))
