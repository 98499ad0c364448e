"""A name kept for models pickled before the installer moved to surgery.install (it re-exports what they name)."""

# torch.save of an injected model names sdsurgeon.capture.in_place._rebuild (each installed graph forward) and
# .prepare_units (the FSDP2 hook): those pickles must still load. This file sits on surgery's floor (see
# tests/test_layout.py), like sdsurgeon.layers above the gate; nothing in the package imports it.

from ..distributed import prepare_units, unwatch_units, watch_units  # noqa: F401
from ..surgery.install import (  # noqa: F401
    FORWARD, GraphForward, _rebuild, graph_forward, install, rewritten, uninstall, view,
)
