# sprite-operator: `make demo` runs the whole thing locally, `make test` runs
# every test. Both install what they need (control-plane binaries, Python
# venv and wheelhouse) into a cache outside the checkout.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
BIN := target/debug/sprite-operator

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: build
build: ## Build the operator binary (debug)
	$(CARGO) build

.PHONY: controlplane
controlplane: ## Build (or reuse) kube-apiserver, etcd, kube-controller-manager, kubectl, helm
	hack/controlplane/build.sh helm

.PHONY: python-env
python-env: ## Create (or reuse) the runtime's venv and wheelhouse
	hack/python-env.sh

.PHONY: test
test: ## Run all tests: unit, runtime (pytest), integration on a real kube-apiserver
	@t0=$$(date +%s); \
	assets=$$(hack/controlplane/build.sh helm); \
	eval "$$(hack/python-env.sh)"; \
	echo "[test] control plane: $$assets"; \
	echo "[test] runtime tests (pytest)"; \
	"$$VENV/bin/python" -m pytest -q sprite/tests; \
	echo "[test] cargo tests"; \
	KUBEBUILDER_ASSETS="$$assets" SPRITE_WHEELHOUSE="$$WHEELHOUSE" SPRITE_PYTHON="$$VENV/bin/python" \
	  $(CARGO) test --lib --bins --tests -- --test-threads=4; \
	echo "[test] all tests passed in $$(( $$(date +%s) - t0 ))s"

.PHONY: lint
lint: ## cargo fmt --check and clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

.PHONY: shellcheck
shellcheck: ## Lint every shell script (*.sh and .ci/run) with shellcheck
	shellcheck .ci/run $$(git ls-files --cached --others --exclude-standard '*.sh')

.PHONY: helm-lint
helm-lint: ## helm lint --strict the chart with default and every-option values
	@assets=$$(hack/controlplane/build.sh helm); \
	"$$assets/helm" lint --strict charts/sprite-operator --set sprites.token=x; \
	"$$assets/helm" lint --strict charts/sprite-operator -f charts/sprite-operator/ci/values-full.yaml

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: crds
crds: build ## Regenerate crds/ (and the chart's copies) from the Rust types
	$(BIN) crds --out-dir crds
	cp crds/*.yaml charts/sprite-operator/crds/

.PHONY: demo
demo: build ## Run everything locally on the embedded simulator (Ctrl-C stops)
	@assets=$$(hack/controlplane/build.sh); \
	eval "$$(hack/python-env.sh)"; \
	KUBEBUILDER_ASSETS="$$assets" SPRITE_WHEELHOUSE="$$WHEELHOUSE" $(BIN) demo

.PHONY: bench
bench: ## Run the benchmarks and print their figures (installs nginx, the relay's peer)
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
	  { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
	$(CARGO) bench --bench sim_client
	$(CARGO) bench --bench relay
	@assets=$$(hack/controlplane/build.sh); eval "$$(hack/python-env.sh)"; \
	  KUBEBUILDER_ASSETS="$$assets" SPRITE_WHEELHOUSE="$$WHEELHOUSE" $(CARGO) bench --bench apply_to_ready

.PHONY: e2e-kind
e2e-kind: ## End-to-end tests in a kind cluster built offline
	@echo "not built yet"; exit 1

# Images. With a registry: `make image` builds Dockerfile (release, musl,
# distroless). Without one: build the Debian base images once
# (`make image-base`, debootstrap), then `make image IMAGE_BASE=...`, which
# puts the debug binary on that base with Dockerfile.local and no network.
IMAGE ?= sprite-operator:dev
IMAGE_SIM ?= sprite-operator-sim:dev
IMAGE_BASE ?=
IMAGE_BASE_SIM ?= sprite-operator-base-sim:bookworm
IMAGE_CONTEXT := target/image-context

.PHONY: image-base
image-base: ## Build the registry-free Debian base images (debootstrap; root, dockerd)
	hack/image-base.sh all

.PHONY: image
image: ## Build the operator image (IMAGE_BASE=<local base>: Dockerfile.local, no registry)
	@if [ -n "$(IMAGE_BASE)" ]; then \
	  $(CARGO) build; \
	  rm -rf $(IMAGE_CONTEXT) && mkdir -p $(IMAGE_CONTEXT); \
	  cp $(BIN) Dockerfile.local $(IMAGE_CONTEXT)/; \
	  docker build -f $(IMAGE_CONTEXT)/Dockerfile.local --target operator \
	    --build-arg IMAGE_BASE=$(IMAGE_BASE) -t $(IMAGE) $(IMAGE_CONTEXT); \
	else \
	  docker build --target operator -t $(IMAGE) .; \
	fi

.PHONY: image-sim
image-sim: ## Build the simulator image (binary + python3, venv, wheelhouse); IMAGE_BASE set: no registry
	@if [ -n "$(IMAGE_BASE)" ]; then \
	  $(CARGO) build; \
	  eval "$$(hack/python-env.sh)"; \
	  rm -rf $(IMAGE_CONTEXT) && mkdir -p $(IMAGE_CONTEXT); \
	  cp $(BIN) Dockerfile.local $(IMAGE_CONTEXT)/; \
	  cp -r "$$WHEELHOUSE" $(IMAGE_CONTEXT)/wheelhouse; \
	  docker build -f $(IMAGE_CONTEXT)/Dockerfile.local --target sim \
	    --build-arg IMAGE_BASE=$(IMAGE_BASE) --build-arg IMAGE_BASE_SIM=$(IMAGE_BASE_SIM) \
	    -t $(IMAGE_SIM) $(IMAGE_CONTEXT); \
	else \
	  docker build --target sim -t $(IMAGE_SIM) .; \
	fi
