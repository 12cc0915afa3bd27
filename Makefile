# Two commands: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# The bundled model needs no hub; mpirun refuses root unless told.
export HF_HUB_OFFLINE := 1
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

SYSTEM_PACKAGES := openssh-server openssh-client iputils-ping iproute2

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@if [ "$$(id -u)" = 0 ] && ! (test -x /usr/sbin/sshd && command -v ping ip >/dev/null); then \
		echo "installing system packages: $(SYSTEM_PACKAGES)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	fi
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/testbed run examples/quickstart.yaml --out runs/quickstart

test: install
	$(BIN)/python -m pytest

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs *.egg-info
