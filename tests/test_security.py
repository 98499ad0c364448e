"""Issue 14: a hostile file, folder or config runs no code and destroys nothing; every failure is one line.

Where the behaviour depends on the process (sys.path, stdin, signals) the command runs in a subprocess;
elsewhere through typer's CliRunner or the library. Canary files are written by code that must never run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon.errors import LoadError, UnsafeLoadError, WriteError
from sdsurgeon.io.files import atomic_write, check_output

RESNET8 = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}']
SCRIPT = Path(sys.executable).with_name("sdsurgeon")  # the console script of this venv

# A module that must never be imported: it leaves <canary> at import and <canary>.init when its Net is built.
HOSTILE_MODULE = """
import pathlib
pathlib.Path({canary!r}).write_text("imported")
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        pathlib.Path({canary!r} + ".init").write_text("constructed")
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)
"""

# The user's own architecture module, in the folder they work in.
USER_MODULE = """
import torch

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x))

def net():
    return Net()
"""


def cli(*args, cwd: Path, script: bool = False, stdin: str | None = None, timeout: float = 300):
    """The real command in a subprocess (environment inherited: this test's trust store)."""
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "sdsurgeon"]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          input=stdin if stdin is not None else "", timeout=timeout)


def assert_one_error_line(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def sd_file(path: Path, arch: str, state: dict | None = None, arch_kwargs: dict | None = None,
            recipe: dict | None = None, **payload) -> Path:
    """An sdsurgeon file as anyone could write it."""
    torch.save({"format": "sdsurgeon", "version": 1, "recipe": recipe, "state_dict": state or {},
                "source": {"kind": "arch", "arch": arch, "arch_kwargs": arch_kwargs or {}}, **payload}, path)
    return path


@pytest.fixture
def own_imports(monkeypatch):
    """sys.path and sys.modules as they were, after a test that imports modules from its own folders."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def hostile_folder(folder: Path, name: str = "evilmod") -> Path:
    """``folder`` holding a hostile ``name``.py and the canary path it would write."""
    folder.mkdir(parents=True, exist_ok=True)
    canary = folder / f"{name}.ran"
    (folder / f"{name}.py").write_text(HOSTILE_MODULE.format(canary=str(canary)))
    return canary


# --- 1. a weights-only file imports and calls only what the user trusts -------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("command", [["plan"], ["export", "--input-shape", "1,8"]])
def test_item1_recorded_factory_in_the_current_folder_is_never_imported(tmp_path, command):
    canary = hostile_folder(tmp_path)
    sd_file(tmp_path / "evil.sd.pt", "evilmod:Net", {"fc.weight": torch.zeros(8, 8), "fc.bias": torch.zeros(8)})
    line = assert_one_error_line(cli(command[0], "evil.sd.pt", *command[1:], cwd=tmp_path))
    assert "'evilmod:Net'" in line and "--arch evilmod:Net" in line and "not trusted" in line, line
    assert not canary.exists() and not Path(f"{canary}.init").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_item1_recorded_factory_in_the_batch_configs_folder_is_never_imported(tmp_path):
    canary = hostile_folder(tmp_path)
    sd_file(tmp_path / "evil.sd.pt", "evilmod:Net", {"fc.weight": torch.zeros(8, 8), "fc.bias": torch.zeros(8)})
    (tmp_path / "cfg.yaml").write_text("defaults: {input_shape: [1, 8]}\nmodels:\n  - {name: evil, checkpoint: evil.sd.pt}\n")
    result = invoke("batch", tmp_path / "cfg.yaml", "--report-dir", tmp_path / "reports")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    (job,) = json.loads((tmp_path / "reports" / "report.json").read_text())["jobs"]
    assert job["status"] == "failed" and "not trusted" in job["error"] and "evilmod:Net" in job["error"], job
    assert not canary.exists() and not Path(f"{canary}.init").exists()


def test_item1_recorded_this_module_is_not_imported(tmp_path, capfd):
    if "this" in sys.modules:
        pytest.skip("the 'this' module was imported by something else in this process")
    path = sd_file(tmp_path / "zen.sd.pt", "this:s")
    with pytest.raises(UnsafeLoadError, match=r"'this:s'.*arch=this:s"):
        sdsurgeon.load(path)
    assert "this" not in sys.modules
    assert "Zen" not in capfd.readouterr().out


def test_item1_recorded_torch_factory_is_not_constructed(tmp_path, own_imports):
    layer = torch.nn.Linear(2, 2)
    path = sd_file(tmp_path / "linear.sd.pt", "torch.nn:Linear", layer.state_dict(),
                   {"in_features": 2, "out_features": 2})  # weights that fit: loading it would succeed
    with pytest.raises(UnsafeLoadError, match="torch.nn:Linear"):
        sdsurgeon.load(path)
    sdsurgeon.trust("torch.nn:Linear")  # the user's word, not the file's
    assert isinstance(sdsurgeon.load(path), torch.nn.Linear)


def test_item1_trust_is_kept_in_the_users_store_not_in_the_file(tmp_path, trust_store, monkeypatch, own_imports):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mymodels.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path / "pkg")
    model = sdsurgeon.load(arch="mymodels:net")  # named by the user: found in the current folder
    path = tmp_path / "m.sd.pt"
    sdsurgeon.save(sdsurgeon.inject(model, 0.5), path)
    store = json.loads(trust_store.read_text())
    assert store["factories"]["mymodels:net"] == {"root": str((tmp_path / "pkg").resolve())}
    assert len(sdsurgeon.gates(sdsurgeon.load(path))) == 2
    monkeypatch.setenv("SDSURGEON_HOME", str(tmp_path / "another-user"))  # the same file, someone else's store
    with pytest.raises(UnsafeLoadError, match="arch=mymodels:net"):
        sdsurgeon.load(path)


def test_item1_a_trusted_factory_found_elsewhere_now_is_refused(tmp_path, monkeypatch, own_imports):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "shadowed_models.py").write_text(USER_MODULE)
    model = sdsurgeon.load(arch="shadowed_models:net", arch_folders=[mine])
    path = tmp_path / "m.sd.pt"
    sdsurgeon.save(model, path)
    # Later a folder ahead on sys.path holds a module of the same name.
    canary = hostile_folder(tmp_path / "ahead", "shadowed_models")
    monkeypatch.delitem(sys.modules, "shadowed_models")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "ahead")] + [p for p in sys.path if p != str(mine)])
    with pytest.raises(UnsafeLoadError, match="now found in"):
        sdsurgeon.load(path)
    assert not canary.exists()


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_item1_the_tour_needs_no_arch_again_on_the_same_machine(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(USER_MODULE)
    torch.save(_user_net(project).state_dict(), project / "m.pt")
    proc = cli("inject", "m.pt", "--arch", "mymodels:net", "--input-shape", "1,8", cwd=project)
    assert proc.returncode == 0, proc.stderr
    proc = cli("export", "m.sd.pt", "--json", cwd=project)  # naming no architecture again
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gates"] == 2 and (project / "m.onnx").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("plan", project / "m.sd.pt", "--json", cwd=elsewhere)  # imported from where it was trusted
    assert proc.returncode == 0, proc.stderr


def _user_net(folder: Path) -> torch.nn.Module:
    namespace: dict = {}
    exec(compile(USER_MODULE, str(folder / "mymodels.py"), "exec"), namespace)
    return namespace["net"]()


# --- 2. a transformers folder's own code never runs, and nothing asks on stdin ------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
def test_item2_custom_code_in_a_transformers_folder_never_runs(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    canary = tmp_path / "remote-code.ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "sdsurgeon-evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
    }))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(canary)!r}).write_text('ran')\n")
    line = assert_one_error_line(cli("plan", folder, "--json", cwd=tmp_path, stdin="y\ny\n"))
    assert "trust_remote_code" in line and "auto_map" in line, line
    assert not canary.exists()


# --- 3. the current folder never shadows an installed package -----------------------------------------


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_item3_current_folder_does_not_shadow_the_tools_imports(tmp_path, script):
    canaries = [tmp_path / f"{name}.ran" for name in ("onnxruntime", "rich")]
    for canary in canaries:
        (tmp_path / f"{canary.stem}.py").write_text(
            f"import pathlib\npathlib.Path({str(canary)!r}).write_text('shadowed')\nraise SystemExit(3)\n")
    (tmp_path / "mymodels.py").write_text(USER_MODULE)  # the user's own module there stays usable
    proc = cli("export", "--arch", "mymodels:net", "--input-shape", "1,8", "-o", "m.onnx", "--json",
               cwd=tmp_path, script=script)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout)["output"] == "m.onnx" and (tmp_path / "m.onnx").is_file()
    assert [c for c in canaries if c.exists()] == []


# --- 4. outputs never coincide with inputs, batch included ---------------------------------------------


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    from sdsurgeon.models import cifar_resnet

    torch.save(cifar_resnet(8, width=4).state_dict(), path)
    return path


def test_item4_batch_never_overwrites_its_input(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.sd.pt")
    before = ckpt.read_bytes()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent("""\
        defaults: {output_dir: ".", save_injected: true, input_shape: [1, 3, 16, 16]}
        models:
          - {name: m, checkpoint: m.sd.pt, arch: "sdsurgeon.models:cifar_resnet", arch_kwargs: {depth: 8, width: 4}}
        """))
    for args in (["--check"], ["--report-dir", tmp_path / "reports"]):
        line = assert_user_error(invoke("batch", cfg, *args))
        assert "never overwrites its input" in line and "cfg.yaml:3" in line, line
    assert ckpt.read_bytes() == before


def test_item4_batch_output_of_one_job_is_never_the_input_of_another(tmp_path):
    (tmp_path / "out").mkdir()
    _checkpoint(tmp_path / "out" / "b.onnx")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent("""\
        defaults: {input_shape: [1, 3, 16, 16]}
        models:
          - {name: a, checkpoint: out/b.onnx, arch: "sdsurgeon.models:cifar_resnet", arch_kwargs: {depth: 8, width: 4}}
          - {name: b, arch: "sdsurgeon.models:cifar_resnet", arch_kwargs: {depth: 8, width: 4}}
        """))
    line = assert_user_error(invoke("batch", cfg, "--check"))
    assert "b.onnx" in line and "never overwrites its input" in line, line


def test_item4_a_hard_link_to_the_input_is_the_input(tmp_path):
    model = _checkpoint(tmp_path / "m.pt")
    os.link(model, tmp_path / "same.sd.pt")
    line = assert_user_error(invoke("inject", model, *RESNET8, "-o", tmp_path / "same.sd.pt"))
    assert "never overwrites its input" in line
    with pytest.raises(WriteError):
        check_output(tmp_path / "same.sd.pt", tmp_path / "m.pt")


# --- 5. YAML alias bombs ---------------------------------------------------------------------------------


def test_item5_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 strings
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("defaults: {input_shape: [1, 8]}\nmodels:\n  - name: a\n    arch: 'sdsurgeon.models:cifar_resnet'\n"
                   "    arch_kwargs:\n" + "".join(f"      {line}\n" for line in levels))
    started = time.monotonic()
    line = assert_user_error(invoke("batch", cfg, "--check"))
    assert "alias" in line and "bomb.yaml" in line, line
    assert time.monotonic() - started < 10


def test_item5_recursive_alias_is_refused(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("models: &m\n  - {name: a, arch: 'x:y', arch_kwargs: {again: *m}}\n")
    assert "alias" in assert_user_error(invoke("batch", cfg, "--check"))


# --- 6. outputs are regular files only -------------------------------------------------------------------


def test_item6_output_that_is_a_fifo_or_a_device_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "null"
    device.symlink_to(os.devnull)  # what -o /dev/null would reach, without risking the real one
    for target, kind in ((fifo, "FIFO"), (device, "character device")):
        line = assert_user_error(invoke("inject", *RESNET8, "-o", target))
        assert kind in line and "regular file" in line, line
        with pytest.raises(WriteError, match=kind):
            atomic_write(target, lambda f: f.write(b"x"))
    assert fifo.is_fifo() and device.is_symlink() and Path(os.devnull).is_char_device()


def test_item6_batch_output_that_is_a_fifo_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "a.onnx")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("defaults: {input_shape: [1, 3, 16, 16]}\nmodels:\n"
                   "  - {name: a, arch: 'sdsurgeon.models:cifar_resnet', arch_kwargs: {depth: 8, width: 4}}\n")
    assert "FIFO" in assert_user_error(invoke("batch", cfg, "--check"))
    assert (tmp_path / "out" / "a.onnx").is_fifo()


# --- 7. one error line, never a traceback; bounded shapes ----------------------------------------------


def test_item7_sdsurgeon_file_without_source_is_one_line(work):
    torch.save({"format": "sdsurgeon", "version": 1, "recipe": None, "state_dict": {}}, work / "m.sd.pt")
    assert "source" in assert_user_error(invoke("plan", work / "m.sd.pt"))


def test_item7_sdsurgeon_file_with_an_unknown_recipe_key_is_one_line(work):
    sd_file(work / "m.sd.pt", "sdsurgeon.models:cifar_resnet", recipe={"sites": [], "colour": "red"})
    assert "'colour'" in assert_user_error(invoke("plan", work / "m.sd.pt"))


def test_item7_huge_input_shape_is_refused_before_allocating(work):
    line = assert_user_error(invoke("plan", *RESNET8, "--input-shape", "100000,3,1024,1024"))
    assert "elements" in line and "100000,3,1024,1024" in line, line


def test_item7_huge_input_shape_recorded_in_a_file_is_refused(work):
    from sdsurgeon.models import cifar_resnet

    model = cifar_resnet(8, width=4)
    recipe = sdsurgeon.inject(model, 0.5).sdsurgeon_recipe.to_dict()
    recipe["inputs"] = [{"name": None, "shape": [100000, 3, 1024, 1024], "dtype": "float32"}]
    sd_file(work / "m.sd.pt", "sdsurgeon.models:cifar_resnet", model.state_dict(), {"depth": 8, "width": 4}, recipe)
    line = assert_user_error(invoke("export", work / "m.sd.pt"))
    assert "m.sd.pt" in line and "elements" in line, line


# --- 8. no temp file outlives a run ---------------------------------------------------------------------

TEMP = re.compile(r"^\.m\.onnx\..*\.tmp$")


BIG = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 56, "width": 8}']  # seconds to export


def _export_until_its_temp_file_exists(folder: Path, command: list | None = None):
    out = folder / "out"
    out.mkdir()
    command = command or ["export", *BIG, "--input-shape", "1,3,32,32", "-o", out / "m.onnx"]
    proc = subprocess.Popen([sys.executable, "-m", "sdsurgeon", *command], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in out.iterdir() if TEMP.match(p.name)]
        if temps:
            return proc, out, temps[0]
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no temp file appeared (rc {proc.poll()}): {proc.communicate()}")


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_item8_sigterm_during_export_leaves_no_temp_file(tmp_path):
    proc, out, _temp = _export_until_its_temp_file_exists(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_item8_sigterm_to_a_batch_stops_its_workers_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "cfg.yaml").write_text("defaults: {input_shape: [1, 3, 32, 32]}\nmodels:\n"
                                       "  - {name: m, arch: 'sdsurgeon.models:cifar_resnet', arch_kwargs: {depth: 56, width: 8}}\n")
    proc, out, _temp = _export_until_its_temp_file_exists(tmp_path, ["batch", "cfg.yaml", "--report-dir", "reports"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    deadline = time.monotonic() + 60  # the worker removes its own temp file as it stops
    while time.monotonic() < deadline and list(out.iterdir()):
        time.sleep(0.1)
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_item8_temp_file_of_a_killed_run_is_swept_by_the_next(tmp_path, monkeypatch):
    proc, out, temp = _export_until_its_temp_file_exists(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert temp.exists()  # SIGKILL: nothing could clean up
    assert f"-{proc.pid}-" in temp.name  # its name says whose it is
    live = out / temp.name.replace(f"-{proc.pid}-", f"-{os.getpid()}-")  # the same name, owned by a live process
    live.write_bytes(b"")
    foreign = out / ".m.onnx.not-ours.tmp"
    foreign.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert_ok(invoke("inject", *RESNET8, "-o", out / "m.sd.pt"))
    assert not temp.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, foreign.name, "m.sd.pt"])


# --- 9. messages that say what is wrong -----------------------------------------------------------------


class _RunsAShell:
    def __reduce__(self):
        return (os.system, ("touch pickle.ran",))


def test_item9_pickle_with_a_blocked_global_names_trust_pickle(work):
    torch.save({"weights": torch.zeros(2), "payload": _RunsAShell()}, work / "evil.pt")
    line = assert_user_error(invoke("plan", work / "evil.pt", *RESNET8))
    assert "--trust-pickle" in line and "system" in line, line
    assert "damaged" not in line and "weights_only" not in line, line
    with pytest.raises(UnsafeLoadError):
        sdsurgeon.load(work / "evil.pt")
    assert not (work / "pickle.ran").exists()


@pytest.mark.onnx
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_item9_non_finite_weights_are_named_not_reported_as_error_zero(work, value):
    from sdsurgeon.models import cifar_resnet

    model = cifar_resnet(8, width=4)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = value
    torch.save(model.state_dict(), work / "m.pt")
    line = assert_user_error(invoke("export", work / "m.pt", *RESNET8, "--input-shape", "1,3,16,16"))
    assert "NaN or Inf" in line and "conv1.weight" in line, line
    assert "max abs error 0" not in line
    assert not (work / "m.onnx").exists()


def test_item9_recorded_factory_error_does_not_speak_of_arch_options(tmp_path):
    path = sd_file(tmp_path / "m.sd.pt", "sdsurgeon.models:cifar_resnet", arch_kwargs={"depth": 7})
    with pytest.raises(LoadError) as info:
        sdsurgeon.load(path)
    message = str(info.value)
    assert "recorded in" in message and "m.sd.pt" in message, message
    assert "--arch" not in message, message


@pytest.mark.parametrize("name, why", [("a\0b", "control character"), ("x" * 300, "longer than")])
def test_item9_check_refuses_job_names_no_file_can_have(tmp_path, name, why):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("models:\n  - {name: " + json.dumps(name) + ", arch: 'sdsurgeon.models:cifar_resnet'}\n")
    assert why in assert_user_error(invoke("batch", cfg, "--check"))


# === Round 2 (issue 25): specs, trust store, transformers prompts, start-up imports, bounds ===============


def _canary_kwargs(tmp_path: Path) -> tuple[Path, dict]:
    canary = tmp_path / "shell.ran"
    return canary, {"command": f"touch {canary}"}


@pytest.mark.parametrize("spec", [
    "sdsurgeon.models:torch.serialization.os.system",  # a dotted walk out of a built-in module
    "sdsurgeon.models:os.system",
    "sdsurgeon.models:__builtins__",  # dunder
    "sdsurgeon.models:CifarResNet",  # in the built-in module, but not one of the exact built-in factories
    "os:system", "posix:system", "builtins:eval", "subprocess:getoutput",
])
def test_round2_a_recorded_spec_runs_nothing_it_names(tmp_path, spec, own_imports):
    canary, kwargs = _canary_kwargs(tmp_path)
    path = sd_file(tmp_path / "evil.sd.pt", spec, arch_kwargs=kwargs)
    line = assert_user_error(invoke("plan", path))
    assert spec in line and ("not trusted" in line or "expected package.module:factory" in line), line
    assert not canary.exists()


def test_round2_a_recorded_torch_load_cannot_unpickle_a_payload(tmp_path, own_imports):
    payload = tmp_path / "payload.pt"
    canary = tmp_path / "unpickled.ran"
    payload.write_bytes(b"cos\nsystem\n(V" + f"touch {canary}".encode() + b"\ntR.")
    for spec in ("sdsurgeon.models:torch.load", "torch:load", "torch.serialization:load"):
        path = sd_file(tmp_path / "evil.sd.pt", spec, arch_kwargs={"f": str(payload), "weights_only": False})
        assert_user_error(invoke("plan", path))
    assert not canary.exists()


def test_round2_a_user_spec_is_one_name_defined_in_its_module(tmp_path, monkeypatch, own_imports):
    (tmp_path / "reexports.py").write_text("from os import system\nimport torch\nfrom torch.nn import Linear\n")
    monkeypatch.chdir(tmp_path)
    for spec, why in (("reexports:system", "not defined in 'reexports'"),
                      ("reexports:Linear", "not defined in 'reexports'"),
                      ("reexports:torch.nn.Linear", "expected package.module:factory")):
        with pytest.raises(sdsurgeon.SurgeonError, match=why):
            sdsurgeon.load(arch=spec)
    # Defined in a submodule of the package named: the usual way libraries export their classes.
    assert isinstance(sdsurgeon.load(arch="torch.nn:Identity"), torch.nn.Identity)


def test_round2_only_inject_and_export_remember_an_arch_and_only_once_it_built_a_module(
        tmp_path, trust_store, monkeypatch, own_imports):
    (tmp_path / "mymodels.py").write_text(USER_MODULE + "\n\ndef not_a_model():\n    return {'fc': 1}\n")
    monkeypatch.chdir(tmp_path)

    def stored() -> set:
        return set(json.loads(trust_store.read_text())["factories"]) if trust_store.exists() else set()

    before = stored()
    assert_user_error(invoke("inject", "--arch", "mymodels:not_a_model", "-o", tmp_path / "x.sd.pt"))
    assert_ok(invoke("plan", "--arch", "mymodels:net", "--json"))
    assert_ok(invoke("plan", "--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}',
                     "--json"))
    assert stored() == before  # plan writes nothing; a dict is no model; built-ins need no entry
    assert_ok(invoke("inject", "--arch", "mymodels:net", "-o", tmp_path / "m.sd.pt"))
    assert stored() == before | {"mymodels:net"}
    result = invoke("trust", "list", "--json")
    assert_ok(result)
    assert "mymodels:net" in json.loads(result.stdout)["factories"]
    assert_ok(invoke("trust", "forget", "mymodels:net"))
    assert stored() == before
    assert "not in the trust store" in assert_user_error(invoke("trust", "forget", "mymodels:net"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_round2_a_batch_config_never_writes_the_trust_store(tmp_path, trust_store):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(USER_MODULE)
    (project / "cfg.yaml").write_text("defaults: {input_shape: [1, 8], format: safetensors}\n"
                                      "models:\n  - {name: m, arch: 'mymodels:net'}\n")
    before = trust_store.read_text() if trust_store.exists() else None
    result = invoke("batch", project / "cfg.yaml", "--report-dir", project / "reports")
    assert_ok(result)  # the config's own architecture runs for this run
    assert (trust_store.read_text() if trust_store.exists() else None) == before
    # ... and a stranger's file naming the same spec later is still refused.
    stranger = sd_file(project / "stranger.sd.pt", "mymodels:net")
    assert "not trusted" in assert_user_error(invoke("plan", stranger))


# --- transformers: auto_map at any depth, and no question on stdin ----------------------------------------


@pytest.mark.parametrize("where", ["folder", "sd-file"])
def test_round2_auto_map_in_a_sub_config_is_refused_before_transformers_reads_it(tmp_path, where, monkeypatch):
    canary = tmp_path / "remote-code.ran"
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "vision_config": {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}}
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(canary)!r}).write_text('ran')\n")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\ny\ny\n"))
    if where == "folder":
        (folder / "config.json").write_text(json.dumps(config))
        path = folder
    else:
        path = tmp_path / "evil.sd.pt"
        torch.save({"format": "sdsurgeon", "version": 1, "recipe": None, "state_dict": {},
                    "source": {"kind": "hf", "arch": "LlavaForConditionalGeneration", "arch_kwargs": config}}, path)
    monkeypatch.chdir(folder)
    with pytest.raises(UnsafeLoadError, match="auto_map"):
        sdsurgeon.load(path)
    assert not canary.exists()


@pytest.mark.hf
def test_round2_no_transformers_call_can_prompt(monkeypatch):
    from transformers import dynamic_module_utils

    from sdsurgeon.io import hf

    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\n"))
    with hf.quiet(), pytest.raises(ValueError):  # transformers' own refusal, never its question
        dynamic_module_utils.resolve_trust_remote_code(None, "folder", has_local_code=False, has_remote_code=True)
    assert dynamic_module_utils.TIME_OUT_REMOTE_CODE > 0 and sys.stdin.read() == "y\n"  # both given back


@pytest.mark.parametrize("depth", [200, 100_000])
def test_round2_a_deeply_nested_config_json_is_one_line(work, depth):
    (work / "deep").mkdir()
    (work / "deep" / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * depth + "]" * depth + "}")
    assert "nest" in assert_user_error(invoke("plan", work / "deep"))


# --- the current folder, before anything is imported ------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
def test_round2_python_m_imports_nothing_from_the_current_folder(tmp_path):
    names = ("json", "zipfile", "pickletools", "contextlib", "typing", "importlib")
    for name in names:
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / (name + '.ran'))!r}, 'w').write('shadowed')\n")
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.ran")) == []


# --- bounds: what a tiny file can make the tool compute or allocate ----------------------------------------


def test_round2_a_compressed_checkpoint_is_refused_unread(work):
    import zipfile

    torch.save({"w": torch.zeros(4)}, work / "plain.pt")
    with zipfile.ZipFile(work / "plain.pt") as src, zipfile.ZipFile(work / "packed.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    line = assert_user_error(invoke("plan", work / "packed.pt", *RESNET8))
    assert "compressed member" in line, line


def test_round2_a_recorded_factory_may_not_build_more_than_the_file_holds(work, monkeypatch):
    from sdsurgeon.models import cifar_resnet

    small = cifar_resnet(depth=8, width=4)
    path = sd_file(work / "huge.sd.pt", "sdsurgeon.models:cifar_resnet", small.state_dict(),
                   {"depth": 6 * 100_000 + 2, "width": 4})
    built = []
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: built.append(self))
    line = assert_user_error(invoke("plan", path))
    assert "far more than" in line and "not built" in line, line
    assert len(built) < 200  # stopped at the first tensors past the budget, not after 600k blocks
    # The same factory with what the file holds builds as before.
    good = sd_file(work / "good.sd.pt", "sdsurgeon.models:cifar_resnet", small.state_dict(), {"depth": 8, "width": 4})
    assert isinstance(sdsurgeon.load(good), torch.nn.Module)


@pytest.mark.hf
def test_round2_a_recorded_transformers_config_may_not_build_more_than_the_file_holds(work):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=16384, num_hidden_layers=200, num_attention_heads=32,
                         vocab_size=128_000).to_dict()
    path = work / "huge.sd.pt"
    torch.save({"format": "sdsurgeon", "version": 1, "recipe": None, "state_dict": {"x": torch.zeros(1)},
                "source": {"kind": "hf", "arch": "LlamaForCausalLM", "arch_kwargs": config}}, path)
    line = assert_user_error(invoke("plan", path))
    assert "far more than" in line, line


# --- fuzz: recorded specs ----------------------------------------------------------------------------------

_MODULES = ["sdsurgeon.models", "sdsurgeon", "sdsurgeon.io.trust", "os", "posix", "subprocess", "builtins", "torch",
            "torch.serialization", "torch.nn", "evilmod", "__main__", "sys", "importlib", "this", "pickle"]
_ATTRS = ["cifar_resnet", "vit", "CifarResNet", "system", "getoutput", "eval", "exec", "load", "import_module",
          "Net", "torch.serialization.os.system", "os.system", "__builtins__", "__class__", "__import__", "loads",
          "Linear", "trust", "popen", "_remember"]


@pytest.mark.slow  # 60 examples, a few through the CLI: about 5 s
def test_round2_fuzz_a_recorded_spec_imports_and_calls_nothing_but_the_built_in_factories(tmp_path, monkeypatch,
                                                                                          own_imports):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import subprocess as subprocess_module

    from sdsurgeon.io.trust import BUILTIN_FACTORIES

    canary = hostile_folder(tmp_path)  # evilmod.py in the current folder
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(("os.system", a)))
    monkeypatch.setattr(subprocess_module.Popen, "__init__", lambda *a, **k: called.append(("Popen", a)))
    weights_only_load = torch.load

    def load(f, *args, **kwargs):  # the loader's own weights-only reads go through; anything else is recorded
        if kwargs.get("weights_only") is not True or Path(f) != tmp_path / "fuzz.sd.pt":
            called.append(("torch.load", f))
            return None
        return weights_only_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.serialization, "load", load)
    before = set(sys.modules)
    specs = st.one_of(st.builds("{}:{}".format, st.sampled_from(_MODULES), st.sampled_from(_ATTRS)),
                      st.text(alphabet=st.sampled_from("ab_.:os_"), max_size=24), st.text(max_size=24))
    values = st.one_of(st.text(max_size=12), st.booleans(), st.integers(-3, 10**9), st.none())
    kwargs = st.dictionaries(st.sampled_from(["command", "f", "weights_only", "depth", "width", "cmd", "args"]),
                             values, max_size=3)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(spec=specs, arch_kwargs=kwargs, through_cli=st.booleans())
    def run(spec, arch_kwargs, through_cli):
        path = tmp_path / "fuzz.sd.pt"
        torch.save({"format": "sdsurgeon", "version": 1, "recipe": None, "state_dict": {},
                                  "source": {"kind": "arch", "arch": spec, "arch_kwargs": arch_kwargs}}, path)
        if through_cli:
            result = invoke("plan", path, "--json")
            if result.exit_code != 0:
                assert_user_error(result)
            else:
                assert spec in BUILTIN_FACTORIES
        else:
            try:
                sdsurgeon.load(path)
            except sdsurgeon.SurgeonError as exc:
                assert "\n" not in str(exc)
            else:
                assert spec in BUILTIN_FACTORIES
        assert called == [] and not canary.exists()
        named = spec.partition(":")[0]
        imported = set(sys.modules) - before
        assert "evilmod" not in sys.modules and (spec in BUILTIN_FACTORIES or named not in imported), named

    run()


@pytest.mark.hf
def test_round2_a_folder_whose_config_asks_for_far_more_than_its_weights_is_not_built(work):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    small.save_pretrained(work / "llama")
    config = json.loads((work / "llama" / "config.json").read_text())
    sdsurgeon.load(work / "llama")  # as saved: loads
    (work / "llama" / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=100_000, hidden_size=1024,
                                                                intermediate_size=4096, num_attention_heads=8)))
    line = assert_user_error(invoke("plan", work / "llama"))
    assert "far more than" in line and "config.json" in line, line


# --- fuzz: batch configs ------------------------------------------------------------------------------------

_CONFIG_KEYS = ["pL", "rule", "trust_pickle", "rtol", "atol", "timeout", "input_shape", "format", "output_dir",
                "seed", "drop", "arch", "name", "checkpoint", "weights", "arch_kwargs", "bogus", "<<"]
_CONFIG_VALUES = ["0.5", ".nan", ".inf", "-.inf", "true", "false", "null", "'os:system'", "'evilmod:Net'",
                  "'sdsurgeon.models:torch.serialization.os.system'", "'sdsurgeon.models:cifar_resnet'", "[1, 3, 8, 8]",
                  "{command: 'touch x'}", "'m.pt'", "'*.pt'", "1e308", "-1", "'a\\x1bb'", "&a [1]", "*a", "!!python/object:os.system {}"]


@pytest.mark.slow  # 80 configs through `batch --check`: a few seconds
def test_round2_fuzz_a_batch_config_checks_or_fails_in_one_line_and_imports_or_trusts_nothing(
        tmp_path, trust_store, monkeypatch, own_imports):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    canary = hostile_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a))
    store = trust_store.read_text() if trust_store.exists() else None
    pair = st.tuples(st.sampled_from(_CONFIG_KEYS), st.sampled_from(_CONFIG_VALUES))
    entry = st.lists(pair, max_size=5).map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}")
    config = st.tuples(st.lists(pair, max_size=4), st.lists(entry, max_size=3), st.sampled_from(["", "bogus: 1\n"]))

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(parts=config)
    def run(parts):
        defaults, entries, extra = parts
        text = ("defaults: {" + ", ".join(f"{k}: {v}" for k, v in defaults) + "}\n" + extra
                + "models:\n" + "".join(f"  - {e}\n" for e in entries))
        (tmp_path / "cfg.yaml").write_text(text)
        result = invoke("batch", tmp_path / "cfg.yaml", "--check")
        if result.exit_code != 0:
            assert_user_error(result)
        assert called == [] and not canary.exists() and "evilmod" not in sys.modules
        assert (trust_store.read_text() if trust_store.exists() else None) == store

    run()


def test_round2_deeply_nested_arch_kwargs_are_one_line(work):
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    line = assert_user_error(invoke("plan", "--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", deep))
    assert "nests too deeply" in line and len(line) < 300, line
