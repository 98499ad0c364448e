"""The typed options: said once (options.py), checked when made, and each error naming its field, which the command
line spells as its flag and a batch config as its key."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from sdsurgeon.errors import ConfigError
from sdsurgeon.options import ConvertOptions, CurveOptions, SurgeryOptions, flag_of, key_of


@pytest.mark.parametrize("cls", [SurgeryOptions, ConvertOptions, CurveOptions])
def test_every_option_explains_itself(cls):
    for f in fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


BAD = [
    (SurgeryOptions, "pL", 0.0, "outside (0, 1]"),
    (SurgeryOptions, "pL", math.nan, "outside (0, 1]"),
    (SurgeryOptions, "rule", "cosine", "'cosine' is not one of linear, uniform"),
    (SurgeryOptions, "mode", "column", "is not one of"),
    (SurgeryOptions, "seed", "3", "expected an integer"),
    (SurgeryOptions, "include", "blocks", "expected a list of strings"),
    (ConvertOptions, "rtol", -1.0, "must be a finite number"),
    (ConvertOptions, "format", "tflite", "'tflite' is not one of onnx, safetensors, hf"),
    (ConvertOptions, "drop_by", "random", "is not one of"),
    (ConvertOptions, "calibration", "calib.pt", "measures a pruned model"),  # nothing pruned to measure
    (CurveOptions, "drop_by", "random", "is not one of"),
]


@pytest.mark.parametrize("cls, name, value, what", BAD, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in BAD])
def test_a_bad_value_is_refused_when_made_naming_its_field(cls, name, value, what):
    with pytest.raises(ConfigError) as info:
        cls(**{name: value})
    err = info.value
    assert err.field == name and what in err.what
    assert err.option == flag_of(cls, name) and flag_of(cls, name) in str(err)  # the command line's own wording


def test_sequences_become_tuples_and_numbers_floats():
    o = SurgeryOptions(pL=1, overrides=["a=0.5"], leaves=["Block"])
    assert o.pL == 1.0 and isinstance(o.pL, float)
    assert o.overrides == ("a=0.5",) and o.leaves == ("Block",)


def test_each_front_spells_a_field_its_own_way():
    assert (flag_of(SurgeryOptions, "overrides"), key_of(SurgeryOptions, "overrides")) == ("--set", "set")
    assert (flag_of(SurgeryOptions, "keep_existing"), key_of(SurgeryOptions, "keep_existing")) == \
        ("--keep-existing", "keep_existing")
    assert (flag_of(ConvertOptions, "dynamic_batch"), key_of(ConvertOptions, "dynamic_batch")) == \
        ("--static-batch", "static_batch")
    assert key_of(ConvertOptions, "compare") == ""  # the command line's alone


def test_batch_takes_every_option_with_a_key_under_that_key_and_default():
    from sdsurgeon.batch.config import JobOptions

    job = {f.name: f.default for f in fields(JobOptions)}
    for cls in (SurgeryOptions, ConvertOptions):
        for f in fields(cls):
            key = key_of(cls, f.name)
            if key:
                assert job[key] == ((not f.default) if f.metadata.get("negated") else f.default), key
    made = JobOptions(pL=0.7, set=("a=0.5",), static_batch=True, drop="2")
    assert made.surgery() == SurgeryOptions(pL=0.7, overrides=("a=0.5",))
    assert made.convert() == ConvertOptions(dynamic_batch=False, drop="2")


def test_the_command_line_offers_each_flag_the_options_declare():
    from typer.testing import CliRunner

    from sdsurgeon.cli import app

    for command, cls, names in (("inject", SurgeryOptions, None), ("export", ConvertOptions, None),
                                ("plan", SurgeryOptions, ("pL", "rule", "overrides", "include", "exclude", "leaves",
                                                          "capture", "keep_existing"))):
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
        for f in fields(cls):
            flag = flag_of(cls, f.name).split("/")[0]
            if flag and (names is None or f.name in names):
                assert flag in shown, (command, flag)


# Rules between fields: decided once, when the options are made, so the library, the command line and a batch config
# refuse the same combinations (each in its own spelling).
CONFLICTS = [
    (dict(drop="2", drop_sites="layer"), "drop_sites", "names the blocks itself"),
    (dict(drop="1", drop_layers="1"), "drop_layers", "counts whole layers"),
    (dict(drop_sites="layer", drop_layers="1"), "drop_layers", "counts whole layers"),
    (dict(format="safetensors", drop="1"), "format", "which a pruned model is not"),
    (dict(format="hf", fold=False), "format", "keeps a multiply"),
    (dict(format="safetensors", fold=False), "format", "keeps a multiply"),
]


@pytest.mark.parametrize("given, field, what", CONFLICTS, ids=[",".join(c[0]) for c in CONFLICTS])
def test_conflicting_fields_are_refused_when_made_in_each_fronts_own_terms(tmp_path, monkeypatch, given, field, what):
    from typer.testing import CliRunner

    from sdsurgeon.cli import app

    with pytest.raises(ConfigError) as info:
        ConvertOptions(**given)
    assert info.value.field == field and what in str(info.value)
    # The same refusal from the command line (before any file is read) and from a batch config (at --check), where
    # every flag the message names is spelled as its key.
    flags = []
    for name, value in given.items():
        flag = flag_of(ConvertOptions, name)
        flags += ["--no-fold"] if name == "fold" else [flag, value]
    result = CliRunner().invoke(app, ["export", "missing.sd.pt", *flags])
    line = result.stderr.strip()
    assert result.exit_code == 1 and len(line.splitlines()) == 1 and what in line, line
    assert flag_of(ConvertOptions, field) in line
    monkeypatch.chdir(tmp_path)
    keys = "".join(f"\n    {name}: {str(value).lower() if isinstance(value, bool) else value}"
                   for name, value in given.items())
    (tmp_path / "cfg.yaml").write_text(f"models:\n  - name: a\n    arch: archs:tiny_resnet{keys}\n")
    result = CliRunner().invoke(app, ["batch", "cfg.yaml", "--check"])
    line = result.stderr.strip()
    assert result.exit_code == 1 and what in line and f"{field}: " in line, line
    assert "--" not in line, line  # no command-line flag in a config's error
