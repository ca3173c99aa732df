# Two quick-start targets: `make demo` (main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: setup demo test clean

$(BIN)/redlens-compile: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned exactly: the CPU wheel; a looser spec pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# the ray extra too: its tests run in CI (a plain `pip install redlens-compile` stays Ray-free)
	$(BIN)/pip install --quiet -e ".[test,ray]"
	touch $@

setup: $(BIN)/redlens-compile

demo: setup
	$(BIN)/redlens-compile demo --out $(OUT)

# a worker per core (pytest-xdist, whole files per worker: module fixtures built once); -n0 runs serially
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n logical --maxprocesses 4 --dist loadfile tests

clean:
	rm -rf $(VENV) out
