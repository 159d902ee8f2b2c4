# Set-up and entry points. `make train` and `make test` work on a fresh machine (Python 3.11, pip,
# root, no GPU): they create .venv, install the CPU build of torch 2.13.0 and trainkit (editable, with
# the dev extras) and, for the tests, the Debian packages the integration tests use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
# Debian packages used by integration tests: pods as network namespaces with real DNS, a real
# Prometheus server scraping the exporter.
SYSTEM_PACKAGES ?= iproute2 dnsmasq-base prometheus util-linux

.PHONY: train test test-ray lint system-deps venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $@

venv: $(BIN)/.installed

system-deps:
	@missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "missing Debian packages:$$missing (tests that need them are skipped)"; \
		fi; \
	fi

train: venv
	$(BIN)/trainkit-run --standalone --nproc-per-node 2 examples/train_minimal.py

# ruff for style and format; lint-imports for the layers (contracts in pyproject.toml).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

test: venv system-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# trainkit-ray on a real local Ray cluster (namespace pods too, as root): the ray extra goes into
# .venv first. Without it `make test` skips these tests; CI runs this as a stage of its own (~5 min).
RAY_TESTS ?= tests/integration/test_ray_api.py tests/integration/test_ray_launcher.py \
	tests/integration/test_ray_netns.py tests/integration/test_ray_manifest.py tests/launchers/test_ray_env.py
test-ray: venv system-deps
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]" "$(TORCH_PIN)"
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(RAY_TESTS)

clean:
	rm -rf $(VENV) .pytest_cache

# Container image and Kubernetes manifests (deploy/). Opt-in: never part of `make test`.
# `make image` builds the CPU variant with buildah on a Debian bookworm base it makes locally
# (debootstrap; no registry needed) from wheels downloaded here, then runs deploy/image/check.sh:
# tini as PID 1, trainkit-run --help, trainkit doctor, a 2-process job, SIGTERM -> save -> exit 75.
# IMAGE_VARIANT=gpu builds FROM a CUDA runtime image with torch from the index (needs a registry).
IMAGE_VARIANT ?= cpu
IMAGE ?= localhost/trainkit:$(IMAGE_VARIANT)
IMAGE_BUILDER ?= buildah

.PHONY: image image-deps image-clean image-context manifests

# buildah (with what Debian recommends beside it) and debootstrap, when run as root and missing.
IMAGE_PACKAGES ?= buildah debootstrap
image-deps:
	@missing=""; \
	for pkg in $(IMAGE_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

image: venv image-deps
	@if [ "$(IMAGE_VARIANT)" = cpu ] && [ -z "$(BASE_IMAGE)" ]; then deploy/image/debian-base.sh; fi
	VARIANT=$(IMAGE_VARIANT) IMAGE=$(IMAGE) BUILDER=$(IMAGE_BUILDER) PYTHON=$(BIN)/python deploy/image/build.sh
	@if [ "$(IMAGE_BUILDER)" = buildah ]; then deploy/image/check.sh $(IMAGE); fi

# Remove what `make image` left: the image, its Debian base and the build context.
image-clean:
	-buildah --storage-driver vfs rmi --force $(IMAGE) localhost/debian:bookworm >/dev/null 2>&1
	-buildah --storage-driver vfs rmi --prune >/dev/null 2>&1
	rm -rf deploy/.build

# The build context alone (deploy/.build/context), for docker/podman/buildah by hand.
image-context: venv
	VARIANT=$(IMAGE_VARIANT) CONTEXT_ONLY=1 PYTHON=$(BIN)/python deploy/image/build.sh

# Every manifest and every overlay (kubectl kustomize) validated, values checked against the code.
manifests: venv
	$(BIN)/python -m pytest -q tests/deploy
