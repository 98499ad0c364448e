"""Fuzzing the loaders: seed files, hypothesis strategies of random and mutated bytes, and the check of one case.

Shared by tests/test_fuzz.py (a few seconds) and benchmarks/fuzz_loaders.py (as long as you like).
Every case must end in success or a one-line SurgeonError (exit 1 with one line through the CLI), and
must never run code: the seeds hold payloads that would write a canary file if anything ran them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

import sdsurgeon
from cli_helpers import invoke
from sdsurgeon.batch.config import check_jobs, load_config, plan_jobs
from sdsurgeon.errors import SurgeonError

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import archs  # noqa: E402

TINY = "archs:tiny_resnet"
KINDS = {"checkpoint": ".pt", "safetensors": ".safetensors", "sdsurgeon": ".sd.pt", "yaml": ".yaml"}
CANARY_MODULE = "fuzz_canary_module"


class _Shell:
    """Pickles as a call of os.system: unpickling it would run a shell."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _bytes_of(save) -> bytes:
    import io

    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def make_seeds(folder: Path) -> tuple[dict[str, list[bytes]], Path]:
    """Valid and hostile files of each kind, and the canary that hostile ones would write."""
    folder.mkdir(parents=True, exist_ok=True)
    canary = folder / "CANARY"
    (folder / f"{CANARY_MODULE}.py").write_text(
        f"import pathlib, torch\npathlib.Path({str(canary)!r}).write_text('imported')\n"
        "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        f"        pathlib.Path({str(canary)!r}).write_text('constructed')\n")
    torch.manual_seed(0)
    model = sdsurgeon.load(arch=TINY)  # trusts archs:tiny_resnet, as the user naming it would
    state = model.state_dict()
    injected = sdsurgeon.inject(sdsurgeon.load(arch=TINY), 0.5, inputs=[sdsurgeon.InputSpec(None, (1, 8))])
    sd_path = folder / "seed.sd.pt"
    sdsurgeon.save(injected, sd_path)
    touch = f"open({str(canary)!r}, 'w').write('ran')"
    hostile_sd = {"format": "sdsurgeon", "version": 1, "recipe": None, "state_dict": {},
                  "source": {"kind": "arch", "arch": f"{CANARY_MODULE}:Net", "arch_kwargs": {}}}
    safetensors_path = folder / "seed.safetensors"
    save_file(state, str(safetensors_path))
    seeds = {
        "checkpoint": [
            _bytes_of(lambda f: torch.save(state, f)),
            _bytes_of(lambda f: torch.save({"state_dict": state, "epoch": 3}, f)),
            _bytes_of(lambda f: torch.save(state, f, _use_new_zipfile_serialization=False)),
            _bytes_of(lambda f: torch.save({"w": torch.zeros(2), "x": _Shell(f"touch {canary}")}, f)),
            _bytes_of(lambda f: torch.save({"x": _Exec(touch)}, f)),
            _bytes_of(lambda f: torch.save(archs.tiny_resnet(), f)),  # a whole pickled module
        ],
        "safetensors": [safetensors_path.read_bytes()],
        "sdsurgeon": [sd_path.read_bytes(), _bytes_of(lambda f: torch.save(hostile_sd, f))],
        "yaml": [
            b"defaults: &d {pL: 0.5, input_shape: [1, 8], output_dir: out}\n"
            b"models:\n  - {name: a, arch: 'archs:tiny_resnet', weights: seed.pt, <<: *d}\n"
            b"  - {name: b, checkpoint: 'seed*.sd.pt', save_injected: true}\n",
            b"models:\n  - name: a\n    arch: archs:tiny_resnet\n    arch_kwargs: &k {width: 8}\n"
            b"    set: ['blocks=0.9']\n  - {name: c, arch: 'archs:tiny_resnet', arch_kwargs: *k}\n",
            f"models: [{{name: x, arch: !!python/object/apply:os.system ['touch {canary}']}}]\n".encode(),
        ],
    }
    (folder / "seed.pt").write_bytes(seeds["checkpoint"][0])
    seeds["payloads"] = [torch.load(sd_path, weights_only=True), hostile_sd]  # for field-level mutations
    return seeds, canary


_ARCHS = ["archs:tiny_resnet", "os:system", "this:s", "torch.nn:Linear", f"{CANARY_MODULE}:Net", "archs", ""]
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(_ARCHS) | st.just(torch.zeros(2)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _mutated_payload(draw, payloads: list[dict]) -> bytes:
    """An sdsurgeon file whose parts (source, recipe and its inputs, ...) are replaced, removed or added."""
    import copy
    import io

    payload = copy.deepcopy(draw(st.sampled_from(payloads)))
    for _ in range(draw(st.integers(1, 3))):
        containers = [payload] + [v for v in (payload.get("source"), payload.get("recipe")) if isinstance(v, dict)]
        recipe = payload.get("recipe")
        if isinstance(recipe, dict) and isinstance(recipe.get("inputs"), list) and recipe["inputs"]:
            containers += [i for i in recipe["inputs"] if isinstance(i, dict)]
        target = draw(st.sampled_from(containers))
        key = draw(st.sampled_from(sorted(map(str, target))) | st.text(max_size=8)) if target else draw(st.text(max_size=8))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(_VALUES)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@st.composite
def cases(draw, seeds: dict[str, list]) -> tuple[str, bytes]:
    """(kind, bytes): random bytes, a seed with bytes flipped, cut, inserted or spliced, or an sdsurgeon
    file with its fields changed."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    how = draw(st.sampled_from(["random", "flip", "truncate", "insert", "splice", "fields"]))
    if how == "random":
        return kind, draw(st.binary(max_size=2048))
    if how == "fields":
        return "sdsurgeon", draw(_mutated_payload(seeds["payloads"]))
    data = bytearray(draw(st.sampled_from(seeds[kind])))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        other = draw(st.sampled_from([s for k in sorted(KINDS) for s in seeds[k]]))
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))):]
    return kind, bytes(data)


def check_case(kind: str, data: bytes, folder: Path, canary: Path, *, through_cli: bool) -> None:
    """Load one case; anything but success or a one-line SurgeonError, or a canary, fails."""
    path = folder / f"case{KINDS[kind]}"
    path.write_bytes(data)
    try:
        if through_cli:
            args = ["batch", path, "--check"] if kind == "yaml" else ["plan", path, "--json"]
            if kind in ("checkpoint", "safetensors"):
                args += ["--arch", TINY]
            result = invoke(*args)
            if result.exit_code != 0:
                assert result.exit_code == 1, (result.exit_code, repr(result.exception), result.stderr)
                assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
                lines = result.stderr.strip("\n").splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
                assert result.stdout == "", result.stdout
        else:
            try:
                if kind == "yaml":
                    check_jobs(plan_jobs(load_config(path)))
                else:
                    sdsurgeon.load(path, arch=TINY if kind in ("checkpoint", "safetensors") else None)
            except SurgeonError as exc:
                assert "\n" not in str(exc), str(exc)
    finally:
        assert not canary.exists(), f"code ran: {canary.read_text()}"
