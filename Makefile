# Two commands do everything on a fresh machine, as root: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test unit demo clean image vm-test-local vm-test

setup:
	@bash scripts/setup.sh

test: setup
	MESHBPF_REQUIRE_KERNEL=1 $(PY) -m pytest -ra -p no:cacheprovider -m "not vm" $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -ra -p no:cacheprovider -m "not kernel and not vm" $(PYTEST_ARGS)

# The node agent's container image (deploy/Containerfile), built with podman from a local
# Debian base (no registry): localhost/meshbpf:<version>. Cached by content.
image: setup
	@bash deploy/build-image.sh

# Boot Debian's 5.10, 6.1, 6.12 kernels (and a Debian 11 userland) under QEMU and run the
# kernel smoke tier in each (tests/vm). Not yet part of
# `make test`: under TCG it takes about 35 minutes.
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
