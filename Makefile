# Two commands do everything on a fresh machine, as root: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test unit demo clean image vm-test-local vm-test test-510-variant

setup:
	@bash scripts/setup.sh

test: setup
	MESHBPF_REQUIRE_KERNEL=1 $(PY) -m pytest -ra -p no:cacheprovider $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -ra -p no:cacheprovider -m "not kernel and not vm" $(PYTEST_ARGS)

# The node agent's container image (deploy/Containerfile), built with podman from a local
# Debian base (no registry): localhost/meshbpf:<version>. Cached by content.
image: setup
	@bash deploy/build-image.sh

# The eBPF end-to-end tests in the variant a 5.10 LTS kernel gets (no netns cookie in
# sock_ops, sk_msg, getsockopt; no SO_NETNS_COOKIE), loaded through the old-bcc path, here.
test-510-variant: setup
	MESHBPF_REQUIRE_KERNEL=1 \
	MESHBPF_DISABLE_FEATURES=netns_cookie_sock_ops,netns_cookie_sockopt,so_netns_cookie \
	MESHBPF_OWN_PROG_LOAD=1 $(PY) -m pytest -ra -p no:cacheprovider tests/kernel/test_e2e.py \
	tests/kernel/test_ebpf_datapath.py tests/kernel/test_ebpf_inbound.py \
	tests/kernel/test_netns_fallback.py $(PYTEST_ARGS)

# Boot Debian's 5.10, 6.1, 6.12 kernels (and a Debian 11 userland) under QEMU and run the
# kernel smoke tier in each (tests/vm), two guests at a time (MESHBPF_VM_LANES). `make test`
# runs them too, booting them in the background while the host's tests run.
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
