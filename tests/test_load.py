"""Loading and saving checkpoints: formats, trust, architecture factories, round trips, atomic writes."""

from __future__ import annotations

import os
import random
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sdsurgeon
from sdsurgeon.errors import ConfigError, LoadError, RecipeMismatchError, SurgeonError, UnsafeLoadError, WriteError
from sdsurgeon.io.files import atomic_write, check_output
from sdsurgeon.models import CifarResNet, cifar_resnet

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `--arch archs:...` and unpickling archs.TinyResNet need it
    sys.path.insert(0, str(TESTS_DIR))

import archs  # noqa: E402

TINY = "archs:tiny_resnet"
RESNET = "sdsurgeon.models:cifar_resnet"


# --- helpers ---------------------------------------------------------------------------------------


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and floating buffer (BN running stats too) non-default random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.1)
    return model


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def gate_settings(model: torch.nn.Module) -> list[tuple]:
    return [(g.index, g.site_id, g.p, g.mode, g.scaling, g.seed) for g in sdsurgeon.gates(model)]


def eval_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture
def tiny() -> archs.TinyResNet:
    return randomized(archs.tiny_resnet(), seed=1)


@pytest.fixture
def sd_file(tmp_path, tiny) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    return path


# --- weights-only checkpoints + --arch ------------------------------------------------------------


def _write_pt(path: Path, sd: dict) -> Path:
    torch.save(sd, path)
    return path


WEIGHT_FORMATS = {
    "pt": lambda d, sd: _write_pt(d / "w.pt", sd),
    "pth": lambda d, sd: _write_pt(d / "w.pth", sd),
    "safetensors": lambda d, sd: (save_file(sd, str(d / "w.safetensors")), d / "w.safetensors")[1],
    "nested_state_dict": lambda d, sd: _write_pt(d / "w.pt", {"state_dict": sd, "epoch": 3}),
    "nested_model_state_dict": lambda d, sd: _write_pt(
        d / "w.pt", {"model_state_dict": sd, "optimizer": {"lr": 0.1}, "epoch": 7}
    ),
    "dataparallel_prefix": lambda d, sd: _write_pt(d / "w.pt", {f"module.{k}": v for k, v in sd.items()}),
    "nested_dataparallel_prefix": lambda d, sd: _write_pt(
        d / "w.pt", {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    ),
    "safetensors_dataparallel_prefix": lambda d, sd: (
        save_file({f"module.{k}": v for k, v in sd.items()}, str(d / "w.safetensors")),
        d / "w.safetensors",
    )[1],
}


@pytest.mark.parametrize("fmt", sorted(WEIGHT_FORMATS))
def test_weights_only_checkpoint_loads_into_arch(tmp_path, tiny, fmt):
    path = WEIGHT_FORMATS[fmt](tmp_path, tiny.state_dict())
    model = sdsurgeon.load(path, arch=TINY)
    assert isinstance(model, archs.TinyResNet)
    assert_same_state(model.state_dict(), tiny.state_dict())
    # the comparison can fail: a fresh model from the same factory has other weights
    fresh = sdsurgeon.load(arch=TINY)
    assert not torch.equal(fresh.state_dict()["stem.weight"], tiny.state_dict()["stem.weight"])


def test_arch_kwargs_are_passed_to_the_factory(tmp_path):
    src = randomized(archs.tiny_resnet(width=4, blocks=3), seed=2)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model = sdsurgeon.load(path, arch=TINY, arch_kwargs={"width": 4, "blocks": 3})
    assert len(model.blocks) == 3 and model.stem.in_features == 4
    assert_same_state(model.state_dict(), src.state_dict())


def test_arch_alone_builds_a_fresh_model():
    model = sdsurgeon.load(arch=RESNET, arch_kwargs={"depth": 8})
    assert type(model) is CifarResNet
    assert len(model.layers) == 3


def test_no_path_and_no_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="arch="):
        sdsurgeon.load()


def test_arch_kwargs_without_arch_is_a_config_error(sd_file):
    with pytest.raises(ConfigError, match="arch="):
        sdsurgeon.load(sd_file, arch_kwargs={"width": 8})


def test_state_dict_without_arch_names_the_option(sd_file):
    with pytest.raises(LoadError, match="arch="):
        sdsurgeon.load(sd_file)


def test_safetensors_without_arch_names_the_option(tmp_path, tiny):
    path = tmp_path / "w.safetensors"
    save_file(tiny.state_dict(), str(path))
    with pytest.raises(LoadError, match="arch="):
        sdsurgeon.load(path)


@pytest.mark.parametrize(
    "arch, kwargs, error, message",
    [
        ("no_such_module_for_sdsurgeon_tests:build", None, LoadError, "cannot import"),
        ("archs:no_such_factory", None, LoadError, "no attribute"),
        ("archs:not_a_module", None, LoadError, "not a torch.nn.Module"),
        ("archs:NOT_CALLABLE", None, LoadError, "not callable"),
        ("archs", None, ConfigError, "package.module:factory"),
        (":tiny_resnet", None, ConfigError, "package.module:factory"),
        ("archs:tiny_resnet", {"no_such_argument": 1}, LoadError, "no_such_argument"),
    ],
)
def test_bad_arch_is_a_clear_error(sd_file, arch, kwargs, error, message):
    for path in (None, sd_file):
        with pytest.raises(error, match=message):
            sdsurgeon.load(path, arch=arch, arch_kwargs=kwargs)


def test_factory_rejecting_its_arguments_is_a_user_error():
    with pytest.raises(SurgeonError, match="depth"):
        sdsurgeon.load(arch=RESNET, arch_kwargs={"depth": 7})


def test_weights_of_another_depth_do_not_fit(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(cifar_resnet(depth=20).state_dict(), path)
    with pytest.raises(LoadError, match="do not fit"):
        sdsurgeon.load(path, arch=RESNET, arch_kwargs={"depth": 32})
    with pytest.raises(LoadError, match="do not fit"):
        sdsurgeon.load(path, arch=RESNET, arch_kwargs={"depth": 8})


def test_weights_of_another_width_do_not_fit(sd_file):
    with pytest.raises(LoadError, match="do not fit"):
        sdsurgeon.load(sd_file, arch=TINY, arch_kwargs={"width": 16})


def test_state_dict_with_extra_keys_does_not_fit(tmp_path, tiny):
    path = tmp_path / "w.pt"
    torch.save({**tiny.state_dict(), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(LoadError, match="do not fit"):
        sdsurgeon.load(path, arch=TINY)


def test_file_without_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(LoadError, match="not a model or a state_dict"):
        sdsurgeon.load(path, arch=TINY)


# --- pickled modules ------------------------------------------------------------------------------


def test_pickled_module_needs_trust(tmp_path, tiny):
    path = tmp_path / "full.pt"
    torch.save(tiny, path)
    with pytest.raises(UnsafeLoadError, match="trust_pickle=True"):
        sdsurgeon.load(path)
    model = sdsurgeon.load(path, trust_pickle=True)
    assert type(model) is archs.TinyResNet
    assert_same_state(model.state_dict(), tiny.state_dict())


def test_pickled_module_with_arch_is_a_config_error(tmp_path, tiny):
    path = tmp_path / "full.pt"
    torch.save(tiny, path)
    with pytest.raises(ConfigError, match="arch="):
        sdsurgeon.load(path, trust_pickle=True, arch=TINY)


# --- files that are not checkpoints ----------------------------------------------------------------


def test_torchscript_archive_is_refused(tmp_path, tiny):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(tiny.eval(), torch.randn(1, 8)), str(path))
    for trust in (False, True):
        with pytest.raises(LoadError, match="TorchScript"):
            sdsurgeon.load(path, trust_pickle=trust, arch=TINY)
        with pytest.raises(LoadError, match="TorchScript"):
            sdsurgeon.load(path, trust_pickle=trust)


def test_truncated_checkpoint_is_a_load_error(tmp_path, sd_file):
    data = sd_file.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError) as info:
        sdsurgeon.load(path, arch=TINY)
    assert not isinstance(info.value, UnsafeLoadError)
    assert str(path) in str(info.value)


def test_truncated_full_pickle_is_a_load_error(tmp_path, tiny):
    full = tmp_path / "full.pt"
    torch.save(tiny, full)
    data = full.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError):
        sdsurgeon.load(path, trust_pickle=True)


@pytest.mark.parametrize("name", ["noise.pt", "noise.pth", "noise.safetensors", "noise.bin"])
@pytest.mark.parametrize("size", [0, 7, 4096])
def test_random_bytes_are_a_load_error(tmp_path, name, size):
    path = tmp_path / name
    path.write_bytes(random.Random(size).randbytes(size))
    with pytest.raises(LoadError) as info:
        sdsurgeon.load(path, arch=TINY)
    assert not isinstance(info.value, UnsafeLoadError)
    assert "\n" not in str(info.value)


def test_text_file_is_a_load_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(LoadError):
        sdsurgeon.load(path, arch=TINY)


def test_missing_file_is_a_load_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(LoadError, match="no such file"):
        sdsurgeon.load(path, arch=TINY)


def test_folder_is_a_load_error(tmp_path):
    with pytest.raises(LoadError, match="folder"):
        sdsurgeon.load(tmp_path, arch=TINY)


# --- save / load round trips -----------------------------------------------------------------------


def test_round_trip_injected_arch_model_needs_no_trust(tmp_path):
    model = randomized(sdsurgeon.load(arch=TINY, arch_kwargs={"blocks": 3}), seed=3)
    injected = sdsurgeon.inject(
        model, 0.6, mode="row", scaling="inverted", seed=11, overrides=[r"blocks\.1=0.9"]
    )
    path = tmp_path / "inj.sd.pt"
    sdsurgeon.save(injected, path)

    torch.load(path, map_location="cpu", weights_only=True)  # weights-only: no pickled code in the file
    loaded = sdsurgeon.load(path)  # no trust needed

    assert_same_state(loaded.state_dict(), injected.state_dict())
    assert_same_state(loaded.state_dict(), model.state_dict())
    settings = gate_settings(loaded)
    assert settings == gate_settings(injected)
    assert [s[1] for s in settings] == ["blocks.0:add", "blocks.1:add", "blocks.2:add"]
    assert settings[1][2] == 0.9 and {s[3:] for s in settings} == {("row", "inverted", 11)}
    assert loaded.sdsurgeon_recipe.to_dict() == injected.sdsurgeon_recipe.to_dict()
    x = torch.randn(5, 8)
    assert torch.equal(eval_output(loaded, x), eval_output(injected, x))


def test_round_trip_injected_resnet_keeps_batchnorm_statistics(tmp_path):
    model = randomized(sdsurgeon.load(arch=RESNET, arch_kwargs={"depth": 8}), seed=4)
    injected = sdsurgeon.inject(model, 0.5, seed=1)
    path = tmp_path / "r8.sd.pt"
    sdsurgeon.save(injected, path)
    loaded = sdsurgeon.load(path)
    assert_same_state(loaded.state_dict(), injected.state_dict())
    assert gate_settings(loaded) == gate_settings(injected)
    assert len(gate_settings(loaded)) == 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(eval_output(loaded, x), eval_output(injected, x), rtol=0, atol=0)


def test_round_trip_injected_model_from_state_dict_file(tmp_path, sd_file, tiny):
    model = sdsurgeon.load(sd_file, arch=TINY)
    injected = sdsurgeon.inject(model, 0.5)
    path = tmp_path / "out.sd.pt"
    sdsurgeon.save(injected, path)
    loaded = sdsurgeon.load(path)
    assert_same_state(loaded.state_dict(), tiny.state_dict())
    assert gate_settings(loaded) == gate_settings(injected)


def test_round_trip_plain_arch_model(tmp_path):
    model = randomized(sdsurgeon.load(arch=TINY), seed=5)
    path = tmp_path / "plain.sd.pt"
    sdsurgeon.save(model, path)
    torch.load(path, map_location="cpu", weights_only=True)
    loaded = sdsurgeon.load(path)
    assert type(loaded) is archs.TinyResNet
    assert sdsurgeon.gates(loaded) == []
    assert_same_state(loaded.state_dict(), model.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(eval_output(loaded, x), eval_output(model, x))


def test_round_trip_plain_pickled_model_needs_trust(tmp_path, tiny):
    src = tmp_path / "full.pt"
    torch.save(tiny, src)
    model = sdsurgeon.load(src, trust_pickle=True)
    path = tmp_path / "plain.sd.pt"
    sdsurgeon.save(model, path)
    with pytest.raises(UnsafeLoadError, match="trust_pickle=True"):
        sdsurgeon.load(path)
    loaded = sdsurgeon.load(path, trust_pickle=True)
    assert_same_state(loaded.state_dict(), tiny.state_dict())


def _pickled_injected(tmp_path, tiny):
    src = tmp_path / "full.pt"
    torch.save(tiny, src)
    injected = sdsurgeon.inject(sdsurgeon.load(src, trust_pickle=True), 0.5, mode="row", scaling="inverted", seed=2)
    path = tmp_path / "inj.sd.pt"
    sdsurgeon.save(injected, path)
    return injected, path


def test_round_trip_injected_pickled_model_is_refused_without_trust(tmp_path, tiny):
    _, path = _pickled_injected(tmp_path, tiny)
    with pytest.raises(UnsafeLoadError, match="trust_pickle=True"):
        sdsurgeon.load(path)


def test_round_trip_injected_pickled_model_loads_with_trust(tmp_path, tiny):
    # An injected GraphModule pickles its tracer class; unpickling must be able to rebuild it.
    injected, path = _pickled_injected(tmp_path, tiny)
    loaded = sdsurgeon.load(path, trust_pickle=True)
    assert_same_state(loaded.state_dict(), injected.state_dict())
    assert gate_settings(loaded) == gate_settings(injected)
    x = torch.randn(4, 8)
    assert torch.equal(eval_output(loaded, x), eval_output(injected, x))
    # the gates' branches still run the model's own layers (training updates what is saved)
    gate = sdsurgeon.gates(loaded)[0]
    assert any(m is loaded.get_submodule("blocks.0.fc1") for m in gate.branch.modules())


def test_sdsurgeon_file_of_unknown_version_is_refused(tmp_path):
    path = tmp_path / "future.sd.pt"
    torch.save({"format": "sdsurgeon", "version": 99, "source": {"kind": "arch", "arch": TINY}, "recipe": None,
                "state_dict": {}}, path)
    with pytest.raises(LoadError, match="version"):
        sdsurgeon.load(path)


def test_sdsurgeon_file_whose_recipe_does_not_fit_is_refused(tmp_path, tiny):
    injected = sdsurgeon.inject(sdsurgeon.load(arch=TINY), 0.5)
    recipe = injected.sdsurgeon_recipe.to_dict()
    recipe["sites"] = [["no_such_block:add", 0.5]]
    path = tmp_path / "bad.sd.pt"
    torch.save({"format": "sdsurgeon", "version": 1, "recipe": recipe, "state_dict": tiny.state_dict(),
                "source": {"kind": "arch", "arch": TINY, "arch_kwargs": {}}}, path)
    with pytest.raises(RecipeMismatchError, match="no_such_block"):
        sdsurgeon.load(path)


# --- recorded architectures are not a way to run code ----------------------------------------------


def _sdsurgeon_file(path: Path, arch: str, arch_kwargs: dict) -> Path:
    torch.save({"format": "sdsurgeon", "version": 1, "recipe": None, "state_dict": {},
                "source": {"kind": "arch", "arch": arch, "arch_kwargs": arch_kwargs}}, path)
    return path


@pytest.mark.parametrize("arch", ["subprocess:run", "os:system", "builtins:eval", "torch:load", "os.path:join"])
def test_recorded_stdlib_or_torch_factory_is_refused(tmp_path, arch):
    marker = tmp_path / "ran"
    kwargs = {"args": ["touch", str(marker)]} if arch == "subprocess:run" else {}
    path = _sdsurgeon_file(tmp_path / "evil.sd.pt", arch, kwargs)
    with pytest.raises(UnsafeLoadError, match="arch="):
        sdsurgeon.load(path)
    assert not marker.exists()


def test_recorded_third_party_function_is_not_called(tmp_path):
    marker = tmp_path / "written_by_the_file"
    path = _sdsurgeon_file(
        tmp_path / "evil.sd.pt", "safetensors.torch:save_file", {"tensors": {}, "filename": str(marker)}
    )
    with pytest.raises(LoadError):
        sdsurgeon.load(path)
    assert not marker.exists()


# --- atomic writes --------------------------------------------------------------------------------


def test_atomic_write_writes_the_file_with_normal_permissions(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"hello"))
    assert path.read_bytes() == b"hello"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.bin"

    def writer(f):
        f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(path, writer)
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def writer(f):
        f.write(b"new but partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, writer)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_into_a_missing_folder_is_a_write_error(tmp_path):
    with pytest.raises(WriteError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "out.bin", lambda f: f.write(b"x"))
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_folder_is_a_write_error(tmp_path):
    with pytest.raises(WriteError):
        sdsurgeon.save(sdsurgeon.load(arch=TINY), tmp_path / "missing" / "m.sd.pt")
    assert os.listdir(tmp_path) == []


def test_check_output_refuses_the_input(tmp_path, sd_file):
    with pytest.raises(WriteError, match="input"):
        check_output(sd_file, sd_file)
    with pytest.raises(WriteError, match="input"):
        check_output(tmp_path / "." / sd_file.name, None, sd_file)  # another spelling of the same file
    link = tmp_path / "link.pt"
    link.symlink_to(sd_file)
    with pytest.raises(WriteError):
        check_output(link, sd_file)
    assert check_output(tmp_path / "other.pt", sd_file) == tmp_path / "other.pt"
    assert check_output(tmp_path / "other.pt", None) == tmp_path / "other.pt"
