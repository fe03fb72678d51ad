# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
#   make test            the locked versions of constraints.txt, in .venv
#   make test LATEST=1   the newest versions pyproject.toml allows, in .venv-latest (torch stays at TORCH_SPEC)
#   make lock            refresh constraints.txt from a fresh environment of the newest allowed versions
PYTHON ?= python3
# torch for LATEST=1 and `make lock`: PyPI's newer torch releases are CUDA builds of several GB; the CPU build
# named here is the newest this project's machines hold. The locked install takes torch from constraints.txt.
TORCH_SPEC ?= torch==2.13.0
LOCK := constraints.txt
KEY_PACKAGES := torch transformers triton liger-kernel numpy pillow tokenizers peft pybind11 scikit-build-core kernels

ifeq ($(LATEST),1)
VENV ?= .venv-latest
PIN = -c $(VENV)/torch-constraint.txt
UPGRADE := --upgrade --upgrade-strategy eager
else
VENV ?= .venv
PIN = -c $(LOCK)
UPGRADE :=
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastjudge-installed
# The editable install knows the package's modules as they were when it ran: a module added or moved since needs
# a reinstall. The list of module files, rewritten only when it changes, is a dependency of the install.
MODULES := $(VENV)/.fastjudge-modules
$(shell mkdir -p $(VENV) && find fastjudge kernels -name '*.py' | sort > $(MODULES).new && \
	(cmp -s $(MODULES).new $(MODULES) || mv $(MODULES).new $(MODULES)); rm -f $(MODULES).new)

.PHONY: setup demo test bench versions lock clean

setup: $(STAMP)

# an isolated environment (no system packages), so that what runs is what the lock names
$(STAMP): pyproject.toml CMakeLists.txt $(LOCK) $(wildcard csrc/*) $(MODULES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q $(PIN) --upgrade pip
	$(PY) -m pip install -q $(PIN) $(UPGRADE) torch
	$(PY) -m pip install -q $(PIN) $(UPGRADE) "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja
	$(PY) -m pip install -q $(PIN) $(UPGRADE) --no-build-isolation -e ".[test]"
	touch $(STAMP)

# a run already in runs/demo is continued, never deleted (a finished one prints its summary again)
demo: setup
	$(VENV)/bin/fastjudge iterate --out runs/demo --seed 0 --resume

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/vote.py

# the resolved versions of the packages that matter (CI prints them first)
versions: setup
	@$(PY) -c "import sys, importlib.metadata as m; print('python', sys.version.split()[0]); \
	[print(n, m.version(n)) for n in sys.argv[1:]]" $(KEY_PACKAGES)

lock:
	rm -rf .venv-lock
	$(MAKE) setup LATEST=1 VENV=.venv-lock
	grep '^#' $(LOCK) > .venv-lock/lock.txt
	.venv-lock/bin/python -m pip freeze --all --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/' >> .venv-lock/lock.txt
	mv .venv-lock/lock.txt $(LOCK)
	@echo "constraints.txt refreshed: run make test, then commit it"

clean:
	rm -rf build runs .venv .venv-latest .venv-lock
