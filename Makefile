# Two commands do everything on a fresh machine, as root: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test unit demo clean image

setup:
	@bash scripts/setup.sh

test: setup
	MESHBPF_REQUIRE_KERNEL=1 $(PY) -m pytest -ra -p no:cacheprovider $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -ra -p no:cacheprovider -m "not kernel" $(PYTEST_ARGS)

# The node agent's container image (deploy/Containerfile), built with podman from a local
# Debian base (no registry): localhost/meshbpf:<version>. Cached by content.
image: setup
	@bash deploy/build-image.sh

demo: setup
	$(VENV)/bin/meshbpf demo

clean:
	-$(PY) -c 'from meshbpf.testbed import Sandbox; Sandbox.cleanup_stale()' 2>/dev/null
	rm -rf $(VENV) build *.egg-info bench-out
