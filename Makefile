# `make demo` and `make test` each set everything up first (venv, pinned torch, the package).
# `make test` runs the default tier (.venv, torch 2.13.0 CPU), the packaging check and the docs build, and then the
# zoo tier (.venv-zoo: torch 2.14.1, torchvision, timm); the first run installs the zoo venv (~5.5 GB of CUDA
# wheels, run on the CPU).
# `make test-fast` is the inner loop: the default tier without the tests marked compile, onnx, multiprocess,
# hf or slow (pyproject.toml says what each means).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ZOO_VENV := .venv-zoo
ZOO_BIN := $(ZOO_VENV)/bin
ZOO_STAMP := $(ZOO_VENV)/.installed

.PHONY: demo test zoo-venv-logged test-fast test-default test-zoo test-zoo-all zoo-venv dist-check docs bench clean

$(STAMP): pyproject.toml constraints.txt constraints-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -c constraints-test.txt -e '.[test,docs]'
	touch $(STAMP)

# torch first, alone: installing it with timm in one resolve could pick another build.
$(ZOO_STAMP): pyproject.toml constraints-zoo.txt constraints-test.txt
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_BIN)/python -m pip install --quiet --upgrade pip
	$(ZOO_BIN)/python -m pip install --quiet -c constraints-zoo.txt torch torchvision
	$(ZOO_BIN)/python -m pip install --quiet -c constraints-zoo.txt -c constraints-test.txt timm -e '.[test]'
	touch $(ZOO_STAMP)

zoo-venv: $(ZOO_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# The zoo venv installs while the default tier runs: its 5.5 GB of wheels wait on the network and the disk, the tests
# on the CPU. Its pip output goes to .venv-zoo.log, printed only if the install fails, so the two never interleave.
test:
	$(MAKE) --no-print-directory -j2 test-default zoo-venv-logged
	$(MAKE) --no-print-directory dist-check
	$(MAKE) --no-print-directory docs
	$(MAKE) --no-print-directory test-zoo

zoo-venv-logged:
	@$(MAKE) --no-print-directory zoo-venv > .venv-zoo.log 2>&1 || { cat .venv-zoo.log; exit 1; }

# Two workers (pytest-xdist), each taking whole files (module fixtures are built once): the tests run on one core
# each (the serial run used 42.6 min of CPU in 42.5 min of wall on 2 cores). Two, not one per core: every worker
# holds torch and its models, and the 2 GB external-data test needs its memory.
test-default: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 -n 2 --dist loadfile

# The fast tier also checks its own boundary (tests/conftest.py): a test that does a marker's work without the
# marker fails, so does an unmarked test that takes over 5 s of CPU (CPU, not wall: on a loaded machine one test
# went from 2 s to 7 s), and so does the run if it left a module of sdsurgeon/ unimported. The full run takes
# none of these: every unmarked test runs here, so it would check nothing more, and a time limit there could
# only add a way for CI to fail that says nothing about sdsurgeon.
# (Option values after '=': pytest reads a separate `sdsurgeon` as a test path before it knows the option.)
FAST_TIER := -m "not (compile or onnx or multiprocess or hf or slow)"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 $(FAST_TIER) --check-marks --slow-guard=5 --check-modules=sdsurgeon

# The zoo tier also runs the default tier's checks of the private torch names (sdsurgeon/_torch.py and the ones
# compiled gates rely on),
# its compiled layout tests, and the FSDP2 tests (skipping relies on FSDP2 gathering in a forward
# pre-hook), on its own torch: both versions are checked. Compiled training of the
# zoo models marked slow (minutes each; see tests_zoo/test_real_models.py) runs in test-zoo-all.
ZOO_TRAINING := tests/test_training.py::test_the_private_torch_names_cond_backward_needs_are_all_here_and_it_is_installed_by_gates_only \
	tests/test_torch_private.py \
	tests/test_training.py::test_compiled_torchvision_style_blocks_train_like_the_eager_original \
	tests/test_training.py::test_compiled_convnext_style_blocks_train_like_the_eager_original \
	tests/test_training.py::test_fsdp2_units_whose_gates_drop_are_neither_gathered_nor_reduced_and_training_equals_one_process \
	tests/test_training.py::test_fsdp2_with_per_rank_draws_is_refused_in_one_line_on_every_rank \
	tests/test_training.py::test_the_fsdp2_example_skips_gathers_of_dropped_blocks_and_resumes_two_ranks_bit_exactly

# Two workers as in the default tier, each taking whole models (xdist_group per model: its build, injection and
# reference are cached per process); the tests of tests/ run one by one on either.
ZOO_WORKERS := -n 2 --dist loadgroup

test-zoo: $(ZOO_STAMP)
	$(ZOO_BIN)/python -m pytest -q --durations=25 $(ZOO_WORKERS) -m "not slow" tests_zoo $(ZOO_TRAINING)

test-zoo-all: $(ZOO_STAMP)
	$(ZOO_BIN)/python -m pytest -q --durations=25 $(ZOO_WORKERS) tests_zoo $(ZOO_TRAINING)

# The sdist and the wheel built from it (python -m build: an isolated build env with the build-system's setuptools),
# then checked as PyPI would take them (twine check --strict: metadata, the README rendered as the long description),
# that both carry LICENSE (setuptools only warns when license-files matches nothing), and that the sdist carries
# CHANGELOG.md and CITATION.cff (MANIFEST.in).
dist-check: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --quiet --outdir dist .
	$(BIN)/python -m twine check --strict dist/*
	$(BIN)/python -c "import glob, sys, tarfile, zipfile; \
	names = zipfile.ZipFile(*glob.glob('dist/*.whl')).namelist() + tarfile.open(*glob.glob('dist/*.tar.gz')).getnames(); \
	sys.exit(0 if sum(n.endswith('/LICENSE') for n in names) == 2 else 'dist-check: LICENSE is missing from the wheel or the sdist')"
	$(BIN)/python -c "import glob, sys, tarfile; names = {n.split('/', 1)[-1] for n in tarfile.open(*glob.glob('dist/*.tar.gz')).getnames()}; \
	missing = {'CHANGELOG.md', 'CITATION.cff'} - names; sys.exit('dist-check: the sdist lacks ' + ', '.join(sorted(missing)) if missing else 0)"

# The documentation site (mkdocs.yml, docs/) built into site/, with every warning an error: a broken link or anchor,
# a docstring mkdocstrings cannot render, a page left out of the nav. The CLI page is rendered from the typer app
# at build time (docs/hooks.py); tests/test_readme.py runs the pages' code blocks.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(ZOO_VENV) build dist site *.egg-info
