"""A Python caller's errors name his keywords (``p_L``, ``arch=``, ``trust_pickle=True``), the command line's its flags.

The library writes each message once, in the command line's words; ``sdsurgeon.<function>`` (options.in_python) says
it in the called function's keywords, from a table built from the options' declarations (options.python_table). A
batch config's keys are the same machinery's third spelling: tests/test_batch.py's
test_a_job_prunes_as_export_drop_does_and_a_bad_count_fails_in_config_terms checks that a job's error names its key.
"""

from __future__ import annotations

import ast
import inspect
import re
import traceback
from pathlib import Path

import pytest
import torch

import sdsurgeon
from sdsurgeon.errors import ConfigError, LoadError, UnsafeLoadError, option_error
from sdsurgeon.models import cifar_resnet
from sdsurgeon.options import ConvertOptions, SurgeryOptions, in_keys, in_python, python_spelling, python_table
from sdsurgeon.sdfile import load_recorded

from cli_helpers import assert_user_error, invoke

PACKAGE = Path(sdsurgeon.__file__).parent
ARCH = "sdsurgeon.models:cifar_resnet"


@pytest.fixture
def files(tmp_path):
    model = cifar_resnet()
    state, pickled = tmp_path / "state.pt", tmp_path / "whole.pt"
    torch.save(model.state_dict(), state)
    torch.save(model, pickled)
    return {"state": state, "pickled": pickled}


# --- through the public API: the keywords ------------------------------------------------------------------------


def test_inject_with_a_bad_p_L_names_p_L_not_the_flag():
    with pytest.raises(ConfigError) as caught:
        sdsurgeon.inject(cifar_resnet(), p_L=2.0)
    err = caught.value
    assert str(err) == "p_L: 2.0 is outside (0, 1]; 1 keeps a block always on", str(err)
    assert "--pL" not in str(err)
    assert (type(err), err.option, err.field, err.what) == (ConfigError, "p_L", "pL", "2.0 is outside (0, 1]; 1 keeps "
                                                                                      "a block always on")
    # the same exception, traceback and all: it still shows where it was raised (the options' check)
    assert any(frame.name == "_checked" for frame in traceback.extract_tb(err.__traceback__))


def test_a_flag_inside_a_message_and_a_choice_are_spelled_as_python_says_them():
    with pytest.raises(ConfigError) as caught:
        sdsurgeon.inject(cifar_resnet(), exit_scale=3.0)
    assert str(caught.value) == "exit_scale: applies to the early-exit loss: give early_exit=True too"
    with pytest.raises(ConfigError) as caught:
        sdsurgeon.inject(cifar_resnet(), capture="export")
    assert str(caught.value).startswith("capture='export' runs the model: give example inputs with example_inputs= "
                                        "or inputs="), str(caught.value)
    assert "--" not in str(caught.value)


def test_prune_names_its_own_keywords_for_the_options_it_calls_otherwise():
    model = sdsurgeon.inject(cifar_resnet(), seed=0)
    with pytest.raises(ConfigError) as caught:
        sdsurgeon.prune(model, 2, by="nope")
    assert str(caught.value) == "by: 'nope': use one of: schedule, influence, angular", str(caught.value)
    with pytest.raises(ConfigError) as caught:
        sdsurgeon.prune(model, layers=1)
    assert str(caught.value).endswith("drop blocks with drop=N or sites=REGEX"), str(caught.value)
    assert "--drop" not in str(caught.value) and caught.value.option == "layers"


def test_load_of_a_state_dict_without_arch_says_arch(files):
    with pytest.raises(LoadError) as caught:
        sdsurgeon.load(files["state"])
    said = str(caught.value)
    assert "arch=package.module:factory" in said and "--arch" not in said, said


def test_load_of_a_pickled_model_says_trust_pickle(files):
    with pytest.raises(UnsafeLoadError) as caught:
        sdsurgeon.load(files["pickled"])
    said = str(caught.value)
    assert "Pass trust_pickle=True" in said and "--trust-pickle" not in said, said


# --- through the command line: the flags, unchanged ----------------------------------------------------------------


def test_the_command_line_still_names_its_flags(files):
    line = assert_user_error(invoke("plan", "--arch", ARCH, "--pL", "2"))
    assert "--pL" in line and "p_L" not in line, line
    line = assert_user_error(invoke("plan", files["state"]))
    assert "--arch package.module:factory" in line and "arch=" not in line, line
    line = assert_user_error(invoke("plan", files["pickled"]))
    assert "Pass --trust-pickle" in line and "trust_pickle=True" not in line, line


def test_the_command_line_and_batch_call_the_functions_themselves():
    """The wrapper is on what ``sdsurgeon.<name>`` hands out only, never on the functions that pipeline, the CLI and
    batch import (which would re-spell their messages)."""
    from sdsurgeon.surgery import inject

    assert sdsurgeon.inject.__wrapped__ is inject.inject and not hasattr(inject.inject, "__wrapped__")
    assert inspect.signature(sdsurgeon.inject) == inspect.signature(inject.inject)
    assert sdsurgeon.inject.__doc__ == inject.inject.__doc__


def test_a_public_function_pickles_by_reference_as_it_did_unwrapped():
    """A process pool sends functions by name: ``sdsurgeon.load`` must come back as itself, not fail as "not the
    same object as sdsurgeon.sdfile.load"."""
    import pickle

    for name in ("load", "inject", "prune"):
        public = getattr(sdsurgeon, name)
        assert pickle.loads(pickle.dumps(public)) is public, name


# --- only the outermost public call re-spells; re-spelled text stays ---------------------------------------------


def test_only_the_outermost_public_call_respells():
    @in_python
    def inner(model, *, inputs=None):
        raise option_error("--input", "'1,8': expected NAME:SHAPE[:DTYPE]")

    @in_python
    def outer(model, *, input_specs=None):
        return inner(model)

    with pytest.raises(ConfigError) as caught:
        outer(None)
    # outer's keyword: had inner re-spelled first, it would say inputs
    assert str(caught.value) == "input_specs: '1,8': expected NAME:SHAPE[:DTYPE]", str(caught.value)
    assert caught.value.option == "input_specs"


def test_respelled_text_is_left_as_it_is():
    spelled = python_spelling(frozenset(inspect.signature(sdsurgeon.inject.__wrapped__).parameters))
    once = in_keys("give --early-exit too; --drop N or --drop-sites REGEX; --arch package.module:factory", spelled)
    assert once == "give early_exit=True too; drop=N or sites=REGEX; arch=package.module:factory", once
    assert in_keys(once, spelled) == once


def test_a_batch_config_reads_its_keys_as_before():
    from sdsurgeon.batch.config import KEY_OF_FLAG

    assert in_keys("try --capture fx|export, or --leaf CLASS; --drop N", KEY_OF_FLAG) == \
        "try capture fx|export, or leaf CLASS; drop N"


# --- the table against the public functions' signatures and the library's messages ---------------------------------

# Flags a library message names that have no keyword in Python: the command line's own (output, reporting, batch),
# and what Python says otherwise (export's --format and --compare, --schedule's parts: a ScheduleSpec).
NO_KEYWORD = {"--help", "--version", "--json", "--shard", "--report-dir", "--prune-curve", "--plot", "--name",
              "--draft-tokens", "--compare", "--format", "--schedule", "--theta", "--gamma", "--warmup", "--ramp"}


def _public_keywords() -> set[str]:
    """Every keyword of a public function (load's are load_recorded's, which it hands them to), and schedules'."""
    found = set()
    for name in sdsurgeon.__all__:
        value = getattr(sdsurgeon, name)
        if inspect.isfunction(value):
            found |= set(inspect.signature(value).parameters)
    for fn in (load_recorded, *(v for k, v in vars(sdsurgeon.schedules).items()
                                if inspect.isfunction(v) and not k.startswith("_"))):
        found |= set(inspect.signature(fn).parameters)
    return found - {"kwargs", "keywords"}


def _message_flags() -> set[str]:
    """The flags the library's strings name (docstrings and comments left out), outside the CLI and batch."""
    flags = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py" or "batch" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                flags |= set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", node.value))
    return flags


def test_every_keyword_in_the_table_is_one_a_public_function_takes():
    keywords = _public_keywords()
    named = {said.split("=")[0] for spellings in python_table().values() for said in spellings}
    assert named - keywords == set(), "the table names keywords no public function takes"
    # a SurgeryOptions field that inject takes by another name would be missed: p_L is its pL
    assert {"p_L", "arch", "trust_pickle", "by", "sites", "layers", "into_weights", "input_specs"} <= named


def test_every_flag_a_library_message_names_is_in_the_table_or_has_no_keyword():
    flags = {flag.split("/")[0] for flag in _message_flags()}
    assert "--pL" in flags and "--arch" in flags  # the scan finds them
    assert flags - set(python_table()) - NO_KEYWORD == set(), "a new flag: give it a keyword or list it above"
    assert NO_KEYWORD & set(python_table()) == set()


def test_every_option_field_with_a_flag_is_spelled_for_python_or_said_to_have_no_keyword():
    from sdsurgeon.options import flag_of, python_of

    for cls in (SurgeryOptions, ConvertOptions):
        for name in inspect.signature(cls).parameters:
            flag = flag_of(cls, name).split("/")[0]
            if flag.startswith("--"):
                assert (flag in python_table()) == bool(python_of(cls, name)), (cls.__name__, name)
                assert bool(python_of(cls, name)) or flag in NO_KEYWORD, (cls.__name__, name)
