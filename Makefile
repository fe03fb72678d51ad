# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch is installed only when the environment has none (the venv sees system packages); override the spec
# for another build, e.g. `make test TORCH_SPEC="torch==2.11.0"`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastjudge-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: setup
	rm -rf runs/demo
	$(VENV)/bin/fastjudge iterate --out runs/demo --seed 0

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/vote.py

clean:
	rm -rf build runs $(VENV)
