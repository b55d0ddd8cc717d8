# make test: the test suite (creates .venv with the requirements unless a virtual or conda environment is active)
# make demo: phantom -> preprocessing -> training -> testing on the CPU, everything under demo_output/

ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON := python
STAMP := .make/requirements.stamp
else
PYTHON := .venv/bin/python
STAMP := .venv/requirements.stamp
endif

.PHONY: install test clean

install: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt $(if $(filter .venv/%,$(STAMP)),.venv/bin/python)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	mkdir -p $(dir $@) && touch $@

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf .make .pytest_cache
