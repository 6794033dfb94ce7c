# gwagent: `make help` lists the targets.
SHELL       := /bin/bash
.DEFAULT_GOAL := help
.SHELLFLAGS := -eu -o pipefail -c

GO          ?= go
BUILD       ?= build
PKG         := github.com/gwagent/gwagent
# The version of a build, as gwagent version prints it and the package has
# it (packaging/version.sh): X.Y.Z from the file VERSION on its tag vX.Y.Z,
# else X.Y.Z~git<commit time>.<hash>[.dirty], which dpkg sorts below X.Y.Z
# and above the builds of earlier commits. Worked out once, and only when a
# target uses it; make VERSION=… overrides it.
VERSION     ?= $(eval VERSION := $(shell packaging/version.sh))$(VERSION)
COMMIT       = $(eval COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null))$(COMMIT)
LDFLAGS      = -s -w -X $(PKG)/internal/buildinfo.Version=$(VERSION) -X $(PKG)/internal/buildinfo.Commit=$(COMMIT)
# In a recipe: stop when the version could not be worked out.
need-version = $(if $(VERSION),,$(error no version: packaging/version.sh failed (its message is above); give one with make VERSION=X.Y.Z))
# Tools are run at pinned versions through the Go module proxy.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Debian packages the tests use: brokers, bootloader tools on files, real systemd, lintian, an HTTP proxy.
APT_PACKAGES := mosquitto mosquitto-clients grub-common grub-emu e2fsprogs libubootenv-tool u-boot-tools minisign lintian \
                systemd-container debootstrap time openssl ca-certificates iproute2 python3 curl tinyproxy-bin nftables
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Install the Debian packages the tests need (apt-get, as root or with sudo)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

.PHONY: version
version: ## Print the version a build of this tree gets (packaging/version.sh)
	@$(need-version)echo '$(VERSION)'

.PHONY: build
build: ## Build gwagent, gwctl and gwhub into build/
	@$(need-version):
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILD)/ ./cmd/...

.PHONY: demo
demo: build ## Run a local hub, an agent and a firmware update watched to completion
	test/demo/run.sh $(BUILD)

.PHONY: lint
lint: ## go vet, gofmt, staticcheck, go mod tidy and the package layering
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) run $(STATICCHECK) ./...
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }
	@.ci/layering

.PHONY: unit
unit: deps ## Unit and integration tests with the race detector
	$(GO) test -race -count=1 -timeout 8m $$($(GO) list ./... | grep -v '/test/fleet')

.PHONY: fleet-demo
fleet-demo: build ## A fleet of 20 gateways (some offline, some bad) updated in waves with gwctl rollout --watch
	$(GO) run ./test/fleet/cmd/fleet demo -bin '$(BUILD)' $(FLEET_DEMO_ARGS)

# The fleet test runs the programs of make build; unit leaves it out.
.PHONY: fleet
fleet: build ## A fleet of 30 real gwagent processes on one gwhub, updated with gwctl rollout (~2 min)
	FLEET_BIN='$(abspath $(BUILD))' $(GO) test -race -count=1 -timeout 6m ./test/fleet/...

.PHONY: test
test: deps lint unit fleet interop e2e e2e-vm ## Everything CI runs: lint, unit/integration tests, the fleet test, interop, systemd end-to-end tests and the full-system VM test

# --- interop ---
# The official Azure IoT SDKs for Node.js (pinned in test/interop/package-lock.json) against gwhub and gwagent.
INTEROP := test/interop

.PHONY: interop
interop: $(INTEROP)/node_modules/.package-lock.json ## Official Azure IoT Node.js SDKs against gwhub and gwagent (root: ports 8883, 443)
	BUILD='$(abspath $(BUILD))/interop' $(INTEROP)/run.sh

# npm ci (re)writes node_modules/.package-lock.json, so it is newer than the lock file until the lock file changes.
$(INTEROP)/node_modules/.package-lock.json: $(INTEROP)/package-lock.json $(INTEROP)/package.json
	cd $(INTEROP) && npm ci --no-audit --no-fund
	@touch $@

.PHONY: e2e-qemu
e2e-qemu: ## Real GRUB A/B boots under QEMU: trial, commit, fallback (slow, ~3 min; root; not in test)
	BUILD=$(BUILD) bash test/qemu/run.sh

.PHONY: bench
bench: deps build ## Benchmarks, each as a ratio to a baseline measured in the same run
	$(GO) run ./test/fleet/cmd/fleet bench -bin '$(BUILD)' $(FLEET_BENCH_ARGS)
	GO='$(GO)' BUILD='$(BUILD)' test/bench/run.sh
	GO='$(GO)' BUILD='$(BUILD)' test/bench/agent.sh
	GO='$(GO)' BUILD='$(BUILD)' test/bench/adaptive.sh
	$(GO) test -run '^$$' -bench MethodRoundTrip -benchtime 500x ./hub/
	HUB_BENCH_DEVICES=1000 $(GO) test -run '^$$' -bench ConnectedDevices -benchtime 1x ./hub/
	$(GO) test -run '^$$' -bench 'Report|HourDownload' -benchmem ./twin/...

.PHONY: clean
clean: ## Remove build output
	rm -rf $(BUILD)

# --- packaging ---
# The Debian package (nfpm, pinned) and its end-to-end test under real systemd.
NFPM := github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2

.PHONY: deb
deb: ## Build the Debian package build/gwagent_<version>_<arch>.deb (static binary, unit, conffile)
	@$(need-version):
	NFPM='$(GO) run $(NFPM)' GO='$(GO)' packaging/build-deb.sh '$(VERSION)' $(BUILD)

.PHONY: deb-check
deb-check: deps ## Build the package, run lintian and systemd-analyze verify/security on it, print its size figures
	@$(need-version):
	deb=$$(NFPM='$(GO) run $(NFPM)' GO='$(GO)' packaging/build-deb.sh '$(VERSION)' $(BUILD)) && packaging/check-deb.sh "$$deb"

.PHONY: e2e
e2e: deps ## End-to-end test under systemd-nspawn (root): install, start, update, watchdog, upgrade, purge; prints figures
	GWAGENT_E2E=1 NFPM='$(GO) run $(NFPM)' $(GO) test -count=1 -v -timeout 30m ./test/systemd/
# --- end packaging ---

# --- full-system VM test ---
# A Debian gateway on a GPT A/B disk booted under QEMU (software emulation),
# driven from the host through gwhub. Disk and images are cached in
# $(BUILD)/vm, keyed by their inputs (the .deb among them).
VM_APT_PACKAGES := qemu-system-x86 grub-pc-bin fdisk zstd

.PHONY: e2e-vm
e2e-vm: deps build ## Full-system A/B test: Debian under QEMU, updates driven by gwhub (root; ~13 min, +1.5 min uncached)
	@missing=$$(for p in $(VM_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get -o DPkg::Lock::Timeout=600 update -qq; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	deb=$$(NFPM='$(GO) run $(NFPM)' GO='$(GO)' packaging/build-deb.sh '$(VERSION)' $(BUILD)) && \
	GWAGENT_E2E_VM=1 GWAGENT_VM_DEB="$$(realpath "$$deb")" GWAGENT_VM_BIN='$(abspath $(BUILD))' BUILD='$(abspath $(BUILD))' \
		$(GO) test -count=1 -v -timeout 50m ./test/vm/
