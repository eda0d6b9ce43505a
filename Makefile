# `make demo` and `make test` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Without CUDA, install the CPU wheel of torch first so that no CUDA build is pulled in.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# Never assume free cores: a busy core makes multi-threaded torch ~10x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(if $(HAS_CUDA),,$(PY) -m pip install -q torch==2.13.0)
	$(PY) -m pip install -q -e '.[dev,triton,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/golfquant demo

# Two workers, a test file each at a time (module fixtures are built once): CI has two cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
