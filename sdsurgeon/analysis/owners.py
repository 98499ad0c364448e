"""Which module each residual site is rewritten in: the block that owns it, traced alone, or the captured part."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch.fx as fx
from torch import nn

from ..analysis.detect import ResidualSite, detect, module_scope
from ..capture.drop_path import find_drop_paths, leaf_classes
from ..capture.fx import Capture, trace
from ..capture.graph_facts import is_view, writes_in_place

# How a rewrite reaches the model (plan shows it; inject does it).
BLOCK = "block"  # the module owning the sites was traced alone and runs its gated graph; its class stays
PART = "part"  # the captured part runs its gated graph in place; its class stays
WHOLE = "whole model"  # an ATen capture: the captured part is replaced by a GraphModule


@dataclass
class Rewrite:
    """One module to rewrite: where it is, how, the sites it gates (node names in ``gm``) and its graph."""

    path: str  # module path in the model ("" is the model itself)
    how: str  # BLOCK | PART | WHOLE
    sites: list[ResidualSite]
    gm: fx.GraphModule
    copy_skip: dict[str, bool]  # site id -> whether the skip is written in place later, seen from the whole part


def rewrites(model: nn.Module, cap: Capture, sites: Sequence[ResidualSite], leaves: Iterable[str] = ()) -> list[Rewrite]:
    """Where inject rewrites ``sites`` (found by ``locate`` on ``cap``), in module order. Never mutates.

    A site's owner is the innermost module whose forward computes its add and its whole branch
    (the common scope of those nodes). Owners nested in another owner go with the outer one. Each
    owner is traced on its own; if every one traces and shows the same sites (ids match: the same
    adds, in a module called once), each is rewritten alone (BLOCK) and the rest of the model runs
    its own code. Otherwise the whole captured part is (PART), still in place; an ATen capture is
    replaced whole (WHOLE), as its graph has no Python module boundaries to put back.
    """
    leaves = frozenset(leaves) | set(leaf_classes([d for d in find_drop_paths(model) if d.rate > 0]))
    out: list[Rewrite] = []
    for part in cap.parts:
        mine = [s for s in sites if s.part == part.path]
        if not mine:
            continue
        nodes = {n.name: n for n in part.gm.graph.nodes}
        whole = Rewrite(part.path, PART if cap.method == "fx" else WHOLE, mine, part.gm,
                        {s.id: written_in_place(part.gm, nodes[s.add]) for s in mine})
        blocks = None if cap.method != "fx" else _blocks(model, part.path, part.gm, mine, leaves, whole.copy_skip)
        out += blocks or [whole]
    return out


def written_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether some user of ``node`` overwrites it, or a view of it, in place (ReLU(inplace=True), relu_, +=,
    ``x[:, 0] = v``, ...): a dropped gate returning its skip must then return a copy."""
    return any(u.args and u.args[0] is node and (writes_in_place(u, gm) or (is_view(u) and written_in_place(gm, u)))
               for u in node.users)


def _join(*paths: str) -> str:
    return ".".join(p for p in paths if p)


def _owner(gm: fx.GraphModule, site: ResidualSite) -> str:
    """The common scope of the site's add and branch nodes, relative to ``gm``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    scopes = [module_scope(nodes[site.add])] + [module_scope(nodes[n]) for n in site.branch_nodes]
    common = scopes[0].split(".") if scopes[0] else []
    for scope in scopes[1:]:
        atoms = scope.split(".") if scope else []
        k = 0
        while k < min(len(common), len(atoms)) and common[k] == atoms[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def _within(inner: str, outer: str) -> bool:
    return not outer or inner == outer or inner.startswith(outer + ".")


def _blocks(
    model: nn.Module, part: str, gm: fx.GraphModule, sites: list[ResidualSite], leaves: frozenset[str],
    copy_skip: dict[str, bool],
) -> list[Rewrite] | None:
    owners: dict[str, list[ResidualSite]] = {}
    for site in sites:
        owners.setdefault(_owner(gm, site), []).append(site)
    outer = [o for o in owners if not any(p != o and _within(o, p) for p in owners)]
    if outer == [""]:
        return None  # the part itself owns them: nothing narrower to trace
    grouped = {o: [s for p, ss in owners.items() if _within(p, o) for s in ss] for o in outer}
    found: list[Rewrite] = []
    for relative, expected in grouped.items():
        path = _join(part, relative)
        try:
            block_gm = trace(model.get_submodule(path), leaves)
        except Exception:  # any tracing failure: the part is rewritten whole instead
            return None
        by_id = {s.id: s for s in detect(block_gm, part=path)[0]}
        if any(s.id not in by_id for s in expected):
            return None  # the block alone shows other sites (called twice, or traced otherwise)
        matched = [replace(by_id[s.id], index=s.index, part=path) for s in expected]
        found.append(Rewrite(path, BLOCK, matched, block_gm, {s.id: copy_skip[s.id] for s in expected}))
    return sorted(found, key=lambda r: min(s.index for s in r.sites))
