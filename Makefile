# Two commands do everything on a fresh machine, as root: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test unit demo clean vm-test-local vm-test

setup:
	@bash scripts/setup.sh

test: setup
	MESHBPF_REQUIRE_KERNEL=1 $(PY) -m pytest -ra -p no:cacheprovider $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -ra -p no:cacheprovider -m "not kernel" $(PYTEST_ARGS)

# Boot Debian's 5.10, 6.1, 6.12 kernels (and a Debian 11 userland) under QEMU and run the
# kernel smoke tier in each (tests/vm; also part of `make test`).
vm-test-local: setup
	$(PY) -m pytest -ra -s -p no:cacheprovider -m vm tests/vm $(PYTEST_ARGS)

# vagrant/: one VM per kernel family (VM=name for one).
vm-test:
	sh vagrant/run.sh $(VM)

demo: setup
	$(VENV)/bin/meshbpf demo

clean:
	-$(PY) -c 'from meshbpf.testbed import Sandbox; Sandbox.cleanup_stale()' 2>/dev/null
	rm -rf $(VENV) build *.egg-info bench-out
